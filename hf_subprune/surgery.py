"""Cutting producer rows and consumer columns in place, and keeping the config in step with the weights."""

from __future__ import annotations

import torch
from torch import nn

from .adapters import Adapter
from .budget import Widths

__all__ = ["cut_rows", "set_consumer", "apply_selection", "update_config"]


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
    if not transposed:
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
        attention = block.get_submodule(adapter.attention.module)
        head_dim = int(attention.head_dim)
        heads = block.get_submodule(adapter.attention.query).weight.shape[0] // head_dim
        kv_heads = block.get_submodule(adapter.attention.key).weight.shape[0] // head_dim
        attention.num_key_value_groups = heads // kv_heads  # transformers repeats each kv head this often


def update_config(config, adapter: Adapter, widths: Widths) -> None:
    """Write the kept widths into the config (uniform widths: one value describes every block)."""
    setattr(config, adapter.mlp.width_field, widths.mlp)
    if adapter.attention is not None:
        att = adapter.attention
        head_dim = adapter.head_dim(config)  # read before the head count changes
        setattr(config, att.heads_field, widths.heads)
        if att.kv_heads_field:
            setattr(config, att.kv_heads_field, widths.kv_heads)
        if att.head_dim_field:
            setattr(config, att.head_dim_field, head_dim)
