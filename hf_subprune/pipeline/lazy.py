"""One block in memory: a model whose blocks stay on disk until a pass needs them.

``load_lazy`` builds the model from its config under ``accelerate.init_empty_weights`` (parameters on the meta
device, buffers real, so that non-persistent ones such as rotary frequencies are computed as usual), loads every
tensor outside the blocks (embeddings, final norm, head) from the safetensors files, and leaves the blocks on
meta. The ``BlockSource`` it attaches knows where each block's weights are: the input checkpoint, or, once a pass
changed the block, a spill file (one safetensors file per block in a temporary work folder, removed with the
model). ``blocks.walk_blocks`` materialises one block at a time through it; hooks on every block do the same for
a plain ``model(input_ids)``, so that evaluation and the reload check stream the blocks too. Surgery replaces a
block's modules while it is materialised, and releasing it keeps the new shapes on meta, so the skeleton always
describes the pruned model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..logs import get_logger
from .capture import find_blocks
from .memory import release_freed_memory

__all__ = ["LAZY_ATTRIBUTE", "SINGLE_FILE", "INDEX_FILE", "SAFETENSORS_DTYPES", "Tally", "TALLY", "BlockSource",
           "lazy_blocks", "checkpoint_files", "load_lazy"]

_log = get_logger(__name__)

LAZY_ATTRIBUTE = "_hf_subprune_blocks"
"""The model attribute holding its ``BlockSource`` (``checks.check_model`` reads it by this name)."""

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
"""The safetensors format's dtype names (header ``dtype`` fields)."""


@dataclass
class Tally:
    """Blocks materialised by the block sources of this process: now, and the most at once since ``reset``."""

    current: int = 0
    peak: int = 0

    def reset(self) -> None:
        self.peak = self.current

    def add(self, count: int) -> None:
        self.current += count
        self.peak = max(self.peak, self.current)


TALLY = Tally()


class _State:
    """What must be undone when a source goes away: its live blocks leave the tally, its work folder the disk."""

    def __init__(self) -> None:
        self.live: set[int] = set()
        self.folder: Path | None = None


def _forget(state: _State) -> None:
    TALLY.add(-len(state.live))
    state.live.clear()
    if state.folder is not None:
        shutil.rmtree(state.folder, ignore_errors=True)


def _assign(root: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Put ``tensor`` in place of the parameter or buffer ``name`` (a parameter stays a parameter); returns what
    now sits there."""
    path, _, leaf = name.rpartition(".")
    module = root.get_submodule(path)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
        return module._parameters[leaf]
    module._buffers[leaf] = tensor
    return tensor


def _meta_like(param: nn.Parameter) -> nn.Parameter:
    """A placeholder with ``param``'s shape, dtype and ``requires_grad``, on the meta device."""
    return nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)


def _place(root: nn.Module, name: str, param: nn.Parameter) -> None:
    """Put the very object ``param`` in place of the parameter ``name`` (tied names share it)."""
    path, _, leaf = name.rpartition(".")
    root.get_submodule(path)._parameters[leaf] = param


def _vocabulary_names(model: nn.Module) -> set[str]:
    """The parameter names of the input embeddings and the output head, the modules that scale with the
    vocabulary (tied ones under both names)."""
    modules = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            modules.append(module)
    return {f"{path}.{leaf}" if path else leaf
            for path, module in model.named_modules(remove_duplicate=False) if any(module is m for m in modules)
            for leaf in module._parameters}


class BlockSource:
    """Where each block's weights are, and the one way blocks come into memory and go back to meta.

    Attributes:
        prefix: the blocks' module path (``model.layers``).
    """

    def __init__(self, prefix: str, locations: dict[str, tuple[str, str]],
                 vocabulary: dict[str, tuple[str, str]] | None = None) -> None:
        self.prefix = prefix
        self._locations = locations  # full parameter name -> (safetensors file, key in it), for the input checkpoint
        self._vocabulary = vocabulary or {}  # the same for the embeddings' and the head's parameters
        self._as_read: dict[int, tuple[weakref.ref, int]] = {}  # vocabulary parameters as read, and their version
        self._spilled: dict[int, tuple[Path, set[str]]] = {}
        self._streamed: set[int] = set()
        self._state = _State()
        weakref.finalize(self, _forget, self._state)  # at garbage collection or at exit, whichever comes first

    @property
    def work_dir(self) -> Path | None:
        """The folder of the spill files (None until a pass stores a block)."""
        return self._state.folder

    def owns(self, name: str) -> bool:
        """Whether the parameter ``name`` of the model is in a block (streamed, on meta between uses)."""
        return name.startswith(self.prefix + ".")

    def is_live(self, index: int) -> bool:
        return index in self._state.live

    def materialize(self, index: int, block: nn.Module, device) -> None:
        """Load block ``index`` onto ``device`` from where its weights are now, in the dtypes its meta placeholders
        carry (a live block is only moved)."""
        if self.is_live(index):
            block.to(device)
            return
        placeholders = block.state_dict(keep_vars=True)
        for name, tensor in self._read(index, list(placeholders)):
            placeholder = placeholders[name]
            if tensor.shape != placeholder.shape:
                raise RuntimeError(f"{self.prefix}.{index}.{name} is stored with shape {tuple(tensor.shape)}, but the "
                                   f"model expects {tuple(placeholder.shape)}")
            _assign(block, name, tensor.to(device=device, dtype=placeholder.dtype))
        block.to(device)  # the non-persistent buffers
        self._state.live.add(index)
        TALLY.add(1)

    def release(self, index: int, block: nn.Module, *, store: bool) -> None:
        """Send block ``index`` back to meta, keeping its shapes; with ``store``, first write its weights to its
        spill file, where the next ``materialize`` reads them (the pass changed it)."""
        if store:
            self._store(index, block)
        for module in block.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    module._parameters[name] = _meta_like(param)
            for name, buffer in module._buffers.items():
                if buffer is not None and name not in module._non_persistent_buffers_set:
                    module._buffers[name] = torch.empty_like(buffer, device="meta")
        self._streamed.discard(index)
        if self.is_live(index):
            self._state.live.discard(index)
            TALLY.add(-1)
            release_freed_memory()  # only a live block had real tensors to free

    @contextmanager
    def vocabulary_released(self, model: nn.Module) -> Iterator[None]:
        """The embeddings and the head on the meta device for the duration, read back from the checkpoint after
        (on their device, in their dtype, tied ones tied again). A pass over the blocks never reads them (the
        stream entering block 0 was captured before), and they are the largest tensors outside the blocks: 0.19 GiB
        of a 1.2B model with a 49k vocabulary, 2 GB of an 8B one with an untied 128k vocabulary. Parameters the
        checkpoint lacks (initialised on load), or that changed since they were read (another object in their place,
        or changed in place: their version counter moved), stay in memory."""
        held = self._send_vocabulary_to_meta(model)
        if held:
            release_freed_memory()
        try:
            yield
        finally:
            from safetensors import safe_open

            for names, (file, key), device, dtype in held:
                with safe_open(file, framework="pt") as f:
                    restored = _assign(model, names[0], f.get_tensor(key).to(device=device, dtype=dtype))
                restored._is_hf_initialized = True
                self.note_read(restored)
                for name in names[1:]:
                    _place(model, name, restored)

    def note_read(self, param: nn.Parameter) -> None:
        """Remember that ``param`` holds a vocabulary tensor as the checkpoint has it (a walk may read it back)."""
        self._as_read = {key: entry for key, entry in self._as_read.items() if entry[0]() is not None}
        self._as_read[id(param)] = (weakref.ref(param), param._version)

    def _unchanged(self, param: nn.Parameter) -> bool:
        ref, version = self._as_read.get(id(param), (None, -1))
        return ref is not None and ref() is param and param._version == version

    def _send_vocabulary_to_meta(self, model: nn.Module) -> list[tuple[list[str], tuple[str, str], Any, Any]]:
        """Put meta placeholders in place of the vocabulary parameters the checkpoint holds; what reloads them."""
        groups: dict[int, tuple[nn.Parameter, list[str]]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if not self.owns(name) and not param.is_meta:
                groups.setdefault(id(param), (param, []))[1].append(name)
        held = []
        for param, names in groups.values():
            stored = next((self._vocabulary[n] for n in names if n in self._vocabulary), None)
            if stored is not None and self._unchanged(param):
                held.append((names, stored, param.device, param.dtype))
                placeholder = _meta_like(param)  # keeps requires_grad, which the restore's ``_assign`` reads
                for name in names:
                    _place(model, name, placeholder)
        return held

    def _read(self, index: int, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The block's tensors one by one, on the CPU (each moved on before the next is read)."""
        from safetensors import safe_open

        where: dict[str, list[tuple[str, str]]] = {}
        spilled = self._spilled.get(index)
        for name in names:
            if spilled is not None:
                found = (str(spilled[0]), name) if name in spilled[1] else None
            else:
                found = self._locations.get(f"{self.prefix}.{index}.{name}")
            if found is None:
                raise KeyError(f"{self.prefix}.{index}.{name} has no stored weights: a tensor added to a block while "
                               "it was on the meta device (outside blocks.walk_blocks) cannot be streamed")
            where.setdefault(found[0], []).append((name, found[1]))
        for file, pairs in where.items():
            with safe_open(file, framework="pt") as f:
                for name, key in pairs:
                    yield name, f.get_tensor(key)

    def _store(self, index: int, block: nn.Module) -> None:
        from safetensors.torch import save_file

        if self._state.folder is None:
            self._state.folder = Path(tempfile.mkdtemp(prefix="hf_subprune-blocks-"))
        path = self._state.folder / f"block-{index}.safetensors"
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in block.state_dict().items()}
        save_file(tensors, str(path))
        self._spilled[index] = (path, set(tensors))

    def attach(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Make ``model`` lazy: hold this source, and stream each block through a plain forward (materialised on
        the device of its input before, released without storing after, even when the forward raises)."""
        setattr(model, LAZY_ATTRIBUTE, self)
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(self._before(index), with_kwargs=True)
            block.register_forward_hook(self._after(index), always_call=True)

    def _before(self, index: int) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.is_live(index):  # inside a pass, which brought the block in itself
                return
            hidden = args[0] if args else kwargs.get("hidden_states")
            self.materialize(index, module, hidden.device if isinstance(hidden, torch.Tensor) else "cpu")
            self._streamed.add(index)

        return hook

    def _after(self, index: int) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if index in self._streamed:
                self.release(index, module, store=False)

        return hook


def lazy_blocks(model: nn.Module) -> BlockSource | None:
    """The model's block source, or None for a model held in memory."""
    return getattr(model, LAZY_ATTRIBUTE, None)


def checkpoint_files(folder: Path) -> dict[str, str] | None:
    """Each checkpoint key of a folder's safetensors weights (one file, or shards listed by an index) and the file
    holding it; None where the folder has no safetensors weights."""
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return {key: str(folder / file) for key, file in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
            return {key: str(folder / SINGLE_FILE) for key in f.keys()}
    return None


def _checkpoint_dtype(config, files: dict[str, str]) -> torch.dtype:
    """What transformers' ``dtype="auto"`` picks: the config's dtype, else the first floating tensor's."""
    from safetensors import safe_open

    dtype = getattr(config, "dtype", None)
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with safe_open(next(iter(files.values())), framework="pt") as f:
        for key in f.keys():
            found = SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
            if found is not None and found.is_floating_point:
                return found
    return torch.get_default_dtype()


def _locate(model: nn.Module, files: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Each tensor of the model and where the checkpoint has it, keys renamed as ``from_pretrained`` renames them
    (legacy names such as ``LayerNorm.gamma``, the base model's prefix added or stripped)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming, rename_source_key

    if any(not isinstance(t, PrefixChange) for t in get_model_conversion_mapping(model, add_legacy=False)):
        raise ValueError(f"transformers converts {type(model).__name__} weights on load, which a block-by-block load "
                         "cannot follow: load the model whole (prune(..., lazy=False), CLI --no-lazy)")
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    meta = model.state_dict()
    out: dict[str, tuple[str, str]] = {}
    for key, file in files.items():
        name, _ = rename_source_key(key, renamings, [], model.base_model_prefix, meta)
        if name in meta:
            out.setdefault(name, (file, key))
    return out


def _load(root: nn.Module, placeholders: dict[str, torch.Tensor], where: dict[str, tuple[str, str]]) -> None:
    """Load the tensors ``where`` says into ``root`` (on the CPU, in their placeholders' dtypes)."""
    from safetensors import safe_open

    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, (file, key) in where.items():
        by_file.setdefault(file, []).append((name, key))
    for file, pairs in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name, key in pairs:
                tensor, placeholder = f.get_tensor(key), placeholders[name]
                if tensor.shape != placeholder.shape:
                    raise ValueError(f"{key} in {file} has shape {tuple(tensor.shape)}, but the config gives "
                                     f"{name} the shape {tuple(placeholder.shape)}")
                # Marked as transformers marks loaded weights: its initialisers leave them alone.
                _assign(root, name, tensor.to(placeholder.dtype))._is_hf_initialized = True


def _initialise_missing(model: nn.Module, source: BlockSource, folder: Path) -> None:
    """Weights outside the blocks that the checkpoint lacks (a BERT saved without its pooler) are initialised by
    the model's own ``_init_weights``, as ``from_pretrained`` does, with a warning."""
    missing = [name for name, p in model.named_parameters() if p.is_meta and not source.owns(name)]
    if not missing:
        return
    _log.warning(f"{folder} has no weights for {', '.join(missing)}: initialised as from_pretrained initialises "
                 "missing weights")
    for name in missing:
        _assign(model, name, torch.empty_like(model.get_parameter(name), device="cpu"))
    for path in sorted({name.rpartition(".")[0] for name in missing}):
        model._init_weights(model.get_submodule(path))


def load_lazy(folder: str | Path, auto_class: type, *, dtype: torch.dtype | None = None,
              trust_remote_code: bool = False) -> nn.Module:
    """The model of a folder with safetensors weights, its blocks left on disk (module docstring): built with
    ``auto_class`` (an ``AutoModel...`` class) from the folder's config, in ``dtype`` (default: the checkpoint's,
    as ``from_pretrained``'s ``dtype="auto"``), in eval mode. Every block tensor must be in the checkpoint;
    outside the blocks, tied weights are tied (``tie_weights``) and missing ones initialised."""
    import transformers
    from accelerate import init_empty_weights

    folder = Path(folder)
    files = checkpoint_files(folder)
    if files is None:
        raise FileNotFoundError(f"{folder} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    dtype = dtype or _checkpoint_dtype(config, files)
    with init_empty_weights():
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.config.name_or_path = str(folder)
    prefix, blocks = find_blocks(model)
    where = _locate(model, files)
    placeholders = model.state_dict(keep_vars=True)
    vocabulary = _vocabulary_names(model)
    source = BlockSource(prefix, {name: found for name, found in where.items() if name.startswith(prefix + ".")},
                         {name: found for name, found in where.items() if name in vocabulary})
    missing = [name for name in placeholders if source.owns(name) and name not in where]
    if missing:
        raise ValueError(f"the weights in {folder} lack {len(missing)} block tensors (e.g. {missing[0]}): they do not "
                         "match the config; download or save the model again")
    _load(model, placeholders, {name: found for name, found in where.items() if not source.owns(name)})
    model.tie_weights()
    for name in vocabulary & where.keys():
        source.note_read(model.get_parameter(name))
    _initialise_missing(model, source, folder)
    if model.can_generate():
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
        except OSError:  # no generation_config.json: the one built from the model config stays
            pass
    source.attach(model, blocks)
    model.eval()
    return model
