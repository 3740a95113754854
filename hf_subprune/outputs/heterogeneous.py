"""The heterogeneous export: per-layer widths that a stock config cannot express.

When the blocks keep different widths (a per-block budget), or the config derives the head size from the head
count (BERT, GPT-2: fewer heads would change it), ``config.json`` gets the widths as transformers'
``per_layer_config`` overrides, and a small modeling file (``outputs/remote_code``), wired with
``auto_map``, builds each layer at its width under ``from_pretrained(..., trust_remote_code=True)``. Uniform
widths that the stock config accepts keep the stock export, which every tool reading HF checkpoints loads.

The widths are read from the weights, not from the config: after a per-block budget the in-memory config
does not describe the blocks, and the weights are what gets saved.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from importlib import import_module, resources
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from torch import nn

from ..adapters import Adapter, auto_class_for, get_adapter
from ..pipeline.capture import find_blocks
from ..pipeline.widths import attention_widths

__all__ = ["REMOTE_FILE", "HeterogeneousExport", "layer_widths", "config_widths", "per_layer_overrides",
           "needs_heterogeneous", "auto_map_for", "modeling_source", "write_heterogeneous"]

REMOTE_MODULE = "modeling_subprune"
REMOTE_FILE = f"{REMOTE_MODULE}.py"
_STOCK_LINE = re.compile(r'^STOCK_MODEL_TYPE = "[^"]*"', re.MULTILINE)


@dataclass(frozen=True)
class HeterogeneousExport:
    """What the export wrote: the global widths, the sparse per-layer overrides and the ``auto_map``."""

    config_widths: dict[str, int]
    per_layer_config: dict[int, dict[str, int]]
    auto_map: dict[str, str]


def layer_widths(model: nn.Module, adapter: Adapter | None = None) -> list[dict[str, int]]:
    """Each block's widths, read from its weights, keyed by the adapter's config field names."""
    adapter = adapter or get_adapter(model.config)
    _, blocks = find_blocks(model)
    widths = []
    for block in blocks:
        layer = {adapter.mlp.width_field: int(adapter.weight(block.get_submodule(adapter.mlp.consumer)).shape[1])}
        if adapter.attention is not None:
            heads, kv_heads, _ = attention_widths(block, adapter)
            layer[adapter.attention.heads_field] = heads
            if adapter.attention.kv_heads_field:
                layer[adapter.attention.kv_heads_field] = kv_heads
        widths.append(layer)
    return widths


def _most_common(values: list) -> object:
    """The most frequent value, the largest among equally frequent ones (deterministic)."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def config_widths(model: nn.Module, adapter: Adapter | None = None,
                  layers: list[dict[str, int]] | None = None) -> dict[str, int]:
    """The widths the global config keeps: the most common ones (so that the overrides are sparse), except
    where the config derives the head size from the head count (``stock_export=False``): there the count
    stays the original one so that the derived head size stays right, and every pruned layer overrides it."""
    adapter = adapter or get_adapter(model.config)
    layers = layers if layers is not None else layer_widths(model, adapter)
    mlp_field = adapter.mlp.width_field
    glob = {mlp_field: _most_common([layer[mlp_field] for layer in layers])}
    att = adapter.attention
    if att is None:
        return glob
    _, blocks = find_blocks(model)
    head_dim = attention_widths(blocks[0], adapter)[2]
    if not att.stock_export:
        glob[att.heads_field] = model.config.hidden_size // head_dim
        return glob
    fields = [att.heads_field] + ([att.kv_heads_field] if att.kv_heads_field else [])
    pair = _most_common([tuple(layer[f] for f in fields) for layer in layers])  # heads and kv heads go together
    glob.update(zip(fields, pair))
    if att.head_dim_field:
        glob[att.head_dim_field] = head_dim
    return glob


def per_layer_overrides(layers: list[dict[str, int]], glob: dict[str, int]) -> dict[int, dict[str, int]]:
    """Sparse overrides: only the layers, and their fields, that differ from the global config."""
    overrides = {i: {k: v for k, v in layer.items() if glob.get(k) != v} for i, layer in enumerate(layers)}
    return {i: o for i, o in overrides.items() if o}


def _stock_config_accepts(config, values: dict[str, int]) -> bool:
    """Whether the stock config class validates with these global widths (e.g. Llama asks for
    hidden_size % num_attention_heads == 0 even with an explicit head_dim)."""
    data = {**config.to_dict(), **values}
    data.pop("per_layer_config", None)
    try:
        type(config).from_dict(data).validate()
    except (ValueError, TypeError, StrictDataclassError):
        return False
    return True


def needs_heterogeneous(model: nn.Module, adapter: Adapter | None = None) -> bool:
    """Whether the stock config cannot describe the model: widths differ between blocks, a head count the
    config cannot express (BERT, GPT-2), or uniform widths that the stock config rejects."""
    adapter = adapter or get_adapter(model.config)
    layers = layer_widths(model, adapter)
    glob = config_widths(model, adapter, layers)
    return bool(per_layer_overrides(layers, glob)) or not _stock_config_accepts(model.config, glob)


def _template(adapter: Adapter, model_type: str):
    if adapter.remote_code is None:
        raise ValueError(f"model_type {model_type!r} has no heterogeneous export: its blocks must keep the same widths")
    return import_module(f"{__package__}.remote_code.{adapter.remote_code}")


def auto_map_for(model: nn.Module, adapter: Adapter | None = None) -> dict[str, str]:
    """``auto_map`` entries: the config class, the Auto class the export reloads with, and ``AutoModel``."""
    adapter = adapter or get_adapter(model.config)
    template = _template(adapter, model.config.model_type)
    prefix = type(model.config).__name__.removesuffix("Config")
    name = type(model).__name__
    remote = f"Subpruned{name.removeprefix(prefix)}"
    if not name.startswith(prefix) or not hasattr(template, remote):
        served = [n.replace("Subpruned", prefix) for n in dir(template)
                  if n.startswith("Subpruned") and n != "SubprunedConfig"]
        raise ValueError(f"the heterogeneous export has no class for {name}; it serves {', '.join(served)}")
    auto_map = {"AutoConfig": f"{REMOTE_MODULE}.SubprunedConfig", "AutoModel": f"{REMOTE_MODULE}.SubprunedModel"}
    auto_map[auto_class_for(model).__name__] = f"{REMOTE_MODULE}.{remote}"
    return auto_map


def modeling_source(adapter: Adapter, model_type: str) -> str:
    """The family's modeling file with this checkpoint's ``model_type`` written in."""
    template = _template(adapter, model_type)
    text = resources.files(template.__package__).joinpath(f"{adapter.remote_code}.py").read_text()
    text, count = _STOCK_LINE.subn(f'STOCK_MODEL_TYPE = "{model_type}"', text, count=1)
    if count != 1:
        raise RuntimeError(f"remote code template {adapter.remote_code}.py has no STOCK_MODEL_TYPE line")
    return text


def write_heterogeneous(model: nn.Module, folder: Path, adapter: Adapter | None = None) -> HeterogeneousExport:
    """Turn a folder written by ``save_pretrained`` into a heterogeneous one: the global widths and the
    ``per_layer_config`` overrides and ``auto_map`` in ``config.json``, and the modeling file beside it.

    ``config.json`` is edited as JSON rather than saved from a config object: the stock config class refuses
    to validate (and so to save) per-layer head counts, and the in-memory model keeps its stock config.
    """
    adapter = adapter or get_adapter(model.config)
    folder = Path(folder)
    layers = layer_widths(model, adapter)
    glob = config_widths(model, adapter, layers)
    overrides = per_layer_overrides(layers, glob)
    auto_map = auto_map_for(model, adapter)
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(glob)
    data.pop("per_layer_config", None)
    if overrides:
        digits = len(str(max(overrides)))  # zero-padded keys sort numerically, as transformers writes them
        data["per_layer_config"] = {str(i).zfill(digits): o for i, o in overrides.items()}
    data["auto_map"] = auto_map
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (folder / REMOTE_FILE).write_text(modeling_source(adapter, model.config.model_type))
    return HeterogeneousExport(glob, overrides, auto_map)
