"""Cutting producer rows and consumer columns in place, and keeping the config in step with the weights."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..adapters import Adapter
from .widths import Widths, attention_widths

__all__ = ["cut_rows", "set_consumer", "apply_selection", "set_head_attributes", "update_config",
           "lacks_consumer_bias", "add_consumer_bias", "ParameterCut", "record_cuts"]


@dataclass(frozen=True)
class ParameterCut:
    """One parameter the surgery replaced, so that whoever holds the old one (an optimizer and its moments) can
    follow: ``getattr(module, name)`` was ``old`` and is now ``new``.

    Attributes:
        dim / kept: ``new`` holds the entries ``kept`` (ascending indices into ``old``) along ``dim`` of ``old``;
            both None where the shape did not change (a bias shift) or there was no ``old`` (an added bias).
        refitted: the kept entries changed value (the consumer's least-squares refit, a bias shift), rather than
            being copied.
    """

    module: nn.Module
    name: str
    old: nn.Parameter | None
    new: nn.Parameter
    dim: int | None
    kept: torch.Tensor | None
    refitted: bool


_RECORDERS: ContextVar[tuple[list[ParameterCut], ...]] = ContextVar("hf_subprune_cut_recorders", default=())


@contextmanager
def record_cuts() -> Iterator[list[ParameterCut]]:
    """Collect every ``ParameterCut`` the surgery makes inside the ``with`` block, in order (``prune()`` included):
    a training loop uses them to carry its optimizer state over to the smaller parameters."""
    cuts: list[ParameterCut] = []
    token = _RECORDERS.set(_RECORDERS.get() + (cuts,))
    try:
        yield cuts
    finally:
        _RECORDERS.reset(token)


def _record(module: nn.Module, name: str, old: nn.Parameter | None, dim: int | None = None,
            kept: torch.Tensor | None = None, refitted: bool = False) -> None:
    recorders = _RECORDERS.get()
    if recorders:
        cut = ParameterCut(module, name, old, getattr(module, name), dim,
                           None if kept is None else kept.detach().to("cpu", torch.long), refitted)
        for cuts in recorders:
            cuts.append(cut)


def _param(tensor: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.to(dtype=like.dtype, device=like.device).contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def cut_rows(module: nn.Module, rows: torch.Tensor, transposed: bool = False) -> None:
    """Keep only output features ``rows`` of a Linear (or GPT-2 Conv1D)."""
    rows = rows.to(module.weight.device)
    old = module.weight
    if transposed:
        module.weight = _param(old[:, rows], old)
        module.nf = len(rows)
    else:
        module.weight = _param(old[rows], old)
        module.out_features = len(rows)
    _record(module, "weight", old, 1 if transposed else 0, rows)
    if getattr(module, "bias", None) is not None:
        old = module.bias
        module.bias = _param(old[rows], old)
        _record(module, "bias", old, 0, rows)


@torch.no_grad()
def set_consumer(module: nn.Module, weight: torch.Tensor, bias_shift: torch.Tensor | None, transposed: bool = False,
                 columns: torch.Tensor | None = None) -> None:
    """Install the new (m x kept) weight of a consumer, and add the bias shift where it has a bias. ``columns``
    (the original input columns the new weight holds, ascending) only goes into the ``record_cuts`` record."""
    old = module.weight
    module.weight = _param(weight.T if transposed else weight, old)
    if transposed:
        module.nx = weight.shape[1]
    else:
        module.in_features = weight.shape[1]
    _record(module, "weight", old, 0 if transposed else 1, columns, refitted=True)
    if bias_shift is not None and getattr(module, "bias", None) is not None:
        old = module.bias
        module.bias = _param(old.double() + bias_shift.to(old.device, torch.float64), old)
        _record(module, "bias", old, refitted=True)


def apply_selection(block: nn.Module, adapter: Adapter, site, kept_groups: list[int], weight: torch.Tensor,
                    bias_shift: torch.Tensor | None) -> None:
    """Cut the producers' rows of the removed groups and install the consumer's kept (refitted) columns."""
    for path, rows in site.rows_to_keep(kept_groups).items():
        cut_rows(block.get_submodule(path), rows, adapter.transposed)
    columns = site.groups[torch.as_tensor(sorted(kept_groups), dtype=torch.long)].flatten().sort().values
    set_consumer(block.get_submodule(site.consumer), weight, bias_shift, adapter.transposed, columns)
    if site.kind == "attention":
        set_head_attributes(block, adapter)


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


def lacks_consumer_bias(blocks, adapter: Adapter, kind: str) -> bool:
    """Whether some block's ``kind`` consumer has no bias (FLAP's bias compensation needs one). Reads module
    attributes only, so it holds for blocks on the meta device too."""
    consumer = adapter.spec(kind).consumer
    return any(getattr(block.get_submodule(consumer), "bias", None) is None for block in blocks)


@torch.no_grad()
def add_consumer_bias(block: nn.Module, adapter: Adapter, kind: str) -> tuple[int, int]:
    """Give one block's ``kind`` consumer a bias (for FLAP's bias compensation) as the family's config flag would
    (``bias_field``, which the caller sets).

    A stock flag adds biases to more than the consumer (Llama's ``attention_bias``: q, k, v and o;
    ``mlp_bias``: gate, up and down), so every module it covers gets one, zero where it had none: the outputs
    do not change, and the saved model loads with the stock classes (and the heterogeneous modeling file, which
    builds the stock layers from the same flags). The cost is the zero biases: per layer, the q, k and v widths
    with ``attention_bias`` and twice the MLP width with ``mlp_bias`` (4,032 per layer of SmolLM2-135M at full
    width, 0.09% of its parameters), besides the consumer biases that carry the compensation.

    Returns the parameters added to the consumer and to the other modules. The block must be in memory (a lazy
    model's block materialised by ``blocks.walk_blocks``): a bias made on the meta device would have no value.
    """
    spec = adapter.spec(kind)
    added = {True: 0, False: 0}
    for path in spec.biased_modules:
        module = block.get_submodule(path)
        if getattr(module, "bias", None) is None:
            weight = module.weight
            rows = adapter.weight(module).shape[0]
            module.bias = nn.Parameter(torch.zeros(rows, dtype=weight.dtype, device=weight.device),
                                       requires_grad=weight.requires_grad)
            _record(module, "bias", None)
            added[path == spec.consumer] += rows
    return added[True], added[False]
