"""Widths: what each block keeps, what a unit of each site costs, and the uniform widths a stock config can express.

Every count is read from the block's own weights, never from the config: a model pruned before with per-layer
widths has blocks of different widths (and, loaded from its heterogeneous export, a config whose head counts are
per layer), and each block is pruned from what it has."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..adapters import Adapter
from ..config import PruneConfig
from ..maths.allocation import SiteOptions

__all__ = ["Widths", "SiteCosts", "attention_widths", "site_costs", "uniform_widths", "head_options",
           "widths_from_options"]


@dataclass
class Widths:
    """Kept widths per block, and what was rounded to get them (said to the user)."""

    mlp: int
    heads: int
    kv_heads: int
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """The widths as the report and the card store them."""
        return {"mlp": self.mlp, "heads": self.heads, "kv_heads": self.kv_heads}


@dataclass(frozen=True)
class SiteCosts:
    """Parameters of one block's prunable parts, and what one unit of each costs."""

    mlp_width: int
    per_neuron: int
    heads: int
    kv_heads: int
    per_query_head: int
    per_kv_head: int  # k and v rows of one kv head
    head_dim: int = 0

    @property
    def widths(self) -> Widths:
        """The block's widths as they are."""
        return Widths(self.mlp_width, self.heads, self.kv_heads)

    @property
    def mlp_params(self) -> int:
        return self.mlp_width * self.per_neuron

    @property
    def attention_params(self) -> int:
        return self.heads * self.per_query_head + self.kv_heads * self.per_kv_head

    def params(self, widths: Widths) -> int:
        return widths.mlp * self.per_neuron + widths.heads * self.per_query_head + widths.kv_heads * self.per_kv_head


def _row_cost(module: nn.Module, adapter: Adapter) -> int:
    """Parameters in one output row (weight row plus bias entry)."""
    w = adapter.weight(module)
    return w.shape[1] + (1 if getattr(module, "bias", None) is not None else 0)


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


def site_costs(adapter: Adapter, block: nn.Module) -> SiteCosts:
    """The block's widths and unit costs, from its weights (module docstring)."""
    mlp = adapter.mlp
    consumer = block.get_submodule(mlp.consumer)
    width = adapter.weight(consumer).shape[1]
    per_neuron = sum(_row_cost(block.get_submodule(p), adapter) for p in mlp.producers) + adapter.weight(consumer).shape[0]
    if adapter.attention is None:
        return SiteCosts(width, per_neuron, 0, 0, 0, 0)
    att = adapter.attention
    heads, kv_heads, hd = attention_widths(block, adapter)
    per_q = hd * _row_cost(block.get_submodule(att.query), adapter) + hd * adapter.weight(block.get_submodule(att.output)).shape[0]
    per_kv = hd * (_row_cost(block.get_submodule(att.key), adapter) + _row_cost(block.get_submodule(att.value), adapter))
    return SiteCosts(width, per_neuron, heads, kv_heads, per_q, per_kv, hd)


def head_options(adapter: Adapter, config, costs: SiteCosts, mode: str) -> list[tuple[int, int]]:
    """(heads, kv_heads) pairs up to the block's own (``costs``) that the export can express: heads even per kv
    group, and for stock configs the hidden size divisible by the head count (families without a stock route take
    any count)."""
    heads, kv_heads = costs.heads, costs.kv_heads
    per_kv = heads // kv_heads
    if mode == "kv_group" or per_kv == 1:  # multi-head attention: both modes drop whole heads
        pairs = [(j * per_kv, j) for j in range(1, kv_heads + 1)]
    else:
        pairs = [(q * kv_heads, kv_heads) for q in range(1, per_kv + 1)]
    if not adapter.attention.stock_export:
        return pairs
    return [(h, kv) for h, kv in pairs if config.hidden_size % h == 0]


def uniform_widths(adapter: Adapter, config, block: nn.Module, prune: PruneConfig) -> Widths:
    """Widths for every block from the requested sparsities.

    ``sparsity`` removes that fraction of the MLP + attention parameters: attention takes the valid head
    count closest to the same fraction, and the MLP width absorbs the difference so that the total lands on
    the request. Explicit per-type sparsities are each rounded to the nearest valid width.
    """
    costs = site_costs(adapter, block)
    notes: list[str] = []
    heads, kv_heads = costs.heads, costs.kv_heads
    att_frac = prune.attention_sparsity
    if adapter.attention is None:
        if att_frac:
            raise ValueError(
                f"attention_sparsity is not supported for model_type {config.model_type!r}: {adapter.notes}"
            )
        if prune.sparsity and prune.mlp_sparsity is None:
            notes.append(f"sparsity {prune.sparsity:.0%} applies to the MLPs only: {adapter.notes}")
    else:
        att_frac = prune.sparsity if att_frac is None else att_frac
        if att_frac:
            options = head_options(adapter, config, costs, prune.attention_mode)
            target = costs.attention_params * (1 - att_frac)
            heads, kv_heads = min(options, key=lambda o: (abs(o[0] * costs.per_query_head + o[1] * costs.per_kv_head - target), -o[0]))
            if heads != round(costs.heads * (1 - att_frac)):
                notes.append(
                    f"attention: {att_frac:.0%} of {costs.heads} heads is not a width the config can express "
                    f"({prune.attention_mode}: heads even per kv group"
                    f"{', hidden size divisible by heads' if adapter.attention.stock_export else ''}); "
                    f"keeping {heads} heads and {kv_heads} kv heads"
                )
    mult = prune.mlp_multiple
    if prune.mlp_sparsity is not None:
        mlp = costs.mlp_width * (1 - prune.mlp_sparsity)
    elif prune.sparsity:
        total = costs.mlp_params + costs.attention_params if adapter.attention is not None else costs.mlp_params
        removed_att = costs.attention_params - (heads * costs.per_query_head + kv_heads * costs.per_kv_head)
        mlp = costs.mlp_width - (prune.sparsity * total - removed_att) / costs.per_neuron
    else:
        mlp = costs.mlp_width
    mlp_width = int(min(costs.mlp_width, max(mult, round(mlp / mult) * mult)))
    widths = Widths(mlp_width, heads, kv_heads, notes)
    if prune.sparsity:
        got = 1 - costs.params(widths) / (costs.mlp_params + costs.attention_params)
        notes.append(f"kept widths remove {got:.2%} of the prunable parameters (asked {prune.sparsity:.0%})")
    return widths


def widths_from_options(options: list[SiteOptions], picks: list[int], full: list[Widths]) -> list[Widths]:
    """Per-block widths from the chosen options (sites without options keep the block's ``full`` widths)."""
    widths = [Widths(f.mlp, f.heads, f.kv_heads) for f in full]
    for option, j in zip(options, picks):
        if option.kind == "mlp":
            widths[option.block].mlp = option.widths[j]
        else:
            widths[option.block].heads, widths[option.block].kv_heads = option.widths[j]
    return widths
