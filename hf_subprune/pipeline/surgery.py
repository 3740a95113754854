"""Cutting producer rows and consumer columns in place, and keeping the config in step with the weights."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import Adapter
from .widths import Widths

__all__ = ["cut_rows", "set_consumer", "apply_selection", "attention_widths", "set_head_attributes", "update_config",
           "add_consumer_bias"]


def _param(tensor: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.to(dtype=like.dtype, device=like.device).contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def cut_rows(module: nn.Module, rows: torch.Tensor, transposed: bool = False) -> None:
    """Keep only output features ``rows`` of a Linear (or GPT-2 Conv1D)."""
    rows = rows.to(module.weight.device)
    if transposed:
        module.weight = _param(module.weight[:, rows], module.weight)
        module.nf = len(rows)
    else:
        module.weight = _param(module.weight[rows], module.weight)
        module.out_features = len(rows)
    if getattr(module, "bias", None) is not None:
        module.bias = _param(module.bias[rows], module.bias)


@torch.no_grad()
def set_consumer(module: nn.Module, weight: torch.Tensor, bias_shift: torch.Tensor | None, transposed: bool = False) -> None:
    """Install the new (m x kept) weight of a consumer, and add the bias shift where it has a bias."""
    module.weight = _param(weight.T if transposed else weight, module.weight)
    if transposed:
        module.nx = weight.shape[1]
    else:
        module.in_features = weight.shape[1]
    if bias_shift is not None and getattr(module, "bias", None) is not None:
        module.bias = _param(module.bias.double() + bias_shift.to(module.bias.device, torch.float64), module.bias)


def apply_selection(block: nn.Module, adapter: Adapter, site, kept_groups: list[int], weight: torch.Tensor,
                    bias_shift: torch.Tensor | None) -> None:
    """Cut the producers' rows of the removed groups and install the consumer's kept (refitted) columns."""
    for path, rows in site.rows_to_keep(kept_groups).items():
        cut_rows(block.get_submodule(path), rows, adapter.transposed)
    set_consumer(block.get_submodule(site.consumer), weight, bias_shift, adapter.transposed)
    if site.kind == "attention":
        set_head_attributes(block, adapter)


def attention_widths(block: nn.Module, adapter: Adapter) -> tuple[int, int, int]:
    """``(heads, kv_heads, head_dim)`` of one block, read from its weights: after a per-block budget the
    config no longer says, and the export needs each block's own counts."""
    spec = adapter.attention
    head_dim = int(getattr(block.get_submodule(spec.module), spec.head_dim_attr))
    heads = adapter.weight(block.get_submodule(spec.output)).shape[1] // head_dim
    if spec.fused:  # rows [q; k; v]: heads + 2 kv_heads head-sized segments
        kv_heads = (adapter.weight(block.get_submodule(spec.query)).shape[0] // head_dim - heads) // 2
    else:
        kv_heads = adapter.weight(block.get_submodule(spec.key)).shape[0] // head_dim
    return heads, kv_heads, head_dim


def set_head_attributes(block: nn.Module, adapter: Adapter) -> None:
    """Set the attention module's head counts (``AttentionSpec.module_attrs``) from its weights: its forward
    reads them rather than the weight shapes."""
    heads, kv_heads, head_dim = attention_widths(block, adapter)
    values = {"heads": heads, "kv_heads": kv_heads, "groups": heads // kv_heads, "width": heads * head_dim}
    module = block.get_submodule(adapter.attention.module)
    for attr, quantity in adapter.attention.module_attrs:
        setattr(module, attr, values[quantity])


def update_config(config, adapter: Adapter, widths: Widths) -> None:
    """Write the kept widths into the config (uniform widths: one value describes every block)."""
    setattr(config, adapter.mlp.width_field, widths.mlp)
    if adapter.attention is not None and adapter.attention.stock_export:
        # Where the config derives the head size from the head count (BERT, GPT-2) it keeps the original
        # count: the heterogeneous export records the pruned counts per layer.
        att = adapter.attention
        head_dim = adapter.head_dim(config)  # read before the head count changes
        setattr(config, att.heads_field, widths.heads)
        if att.kv_heads_field:
            setattr(config, att.kv_heads_field, widths.kv_heads)
        if att.head_dim_field:
            setattr(config, att.head_dim_field, head_dim)


@torch.no_grad()
def add_consumer_bias(blocks, adapter: Adapter, kind: str, config) -> tuple[int, int] | None:
    """Give every block's ``kind`` consumer a bias (for FLAP's bias compensation) through the family's config flag.

    A stock flag adds biases to more than the consumer (Llama's ``attention_bias``: q, k, v and o;
    ``mlp_bias``: gate, up and down), so every module it covers gets one, zero where it had none: the outputs
    do not change, and the saved model loads with the stock classes (and the heterogeneous modeling file, which
    builds the stock layers from the same flags). The cost is the zero biases: per layer, the q, k and v widths
    with ``attention_bias`` and twice the MLP width with ``mlp_bias`` (4,032 per layer of SmolLM2-135M at full
    width, 0.09% of its parameters), besides the consumer biases that carry the compensation.

    Returns the parameters added to the consumers and to the other modules (``(0, 0)`` when the consumers already
    have a bias), or None when they have none and the family declares no flag that would add one.
    """
    spec = adapter.spec(kind)
    if all(getattr(block.get_submodule(spec.consumer), "bias", None) is not None for block in blocks):
        return 0, 0
    if spec.bias_field is None:
        return None
    added = {True: 0, False: 0}
    for block in blocks:
        for path in spec.biased_modules:
            module = block.get_submodule(path)
            if getattr(module, "bias", None) is None:
                weight = module.weight
                rows = adapter.weight(module).shape[0]
                module.bias = nn.Parameter(torch.zeros(rows, dtype=weight.dtype, device=weight.device),
                                           requires_grad=weight.requires_grad)
                added[path == spec.consumer] += rows
    setattr(config, spec.bias_field, True)
    return added[True], added[False]
