"""Sites of one block, built from an adapter: which consumer columns form each group, how many to keep,
and which producer rows go with the kept groups."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import Adapter
from .widths import SiteCosts, Widths

__all__ = ["Site", "block_sites", "attention_site", "mlp_site"]


@dataclass
class Site:
    """One producer/consumer pair of a block.

    Attributes:
        kind: ``"attention"`` or ``"mlp"`` (attention first: it feeds the MLP).
        name: e.g. ``layers.3.mlp``, for reports and errors.
        consumer: module path (relative to the block) whose input columns are refitted.
        groups: consumer input columns of each group (num_groups x group_size).
        keep: number of groups to keep.
        residual: module path whose input is the residual stream the site's output is added to (None: the
            block's input, as for attention).
        partition / per_class: grouped-query quota (class of each group, groups kept per class).
        producer_rows: for each producer path, the rows (output features) owned by each group
            (num_groups x rows_per_group).
    """

    kind: str
    name: str
    consumer: str
    groups: torch.Tensor
    keep: int
    producer_rows: dict[str, torch.Tensor]
    residual: str | None = None
    partition: torch.Tensor | None = None
    per_class: int | None = None

    @property
    def num_groups(self) -> int:
        return self.groups.shape[0]

    @property
    def whole(self) -> bool:
        """Keeps every group: only its consumer is refit (``PruneConfig.refit_full_width``)."""
        return self.keep >= self.num_groups

    def rows_to_keep(self, kept_groups: list[int]) -> dict[str, torch.Tensor]:
        kept = torch.as_tensor(sorted(kept_groups), dtype=torch.long)
        # Ascending, so that a fused [q; k; v] projection keeps its segments in order.
        return {path: rows[kept].flatten().sort().values for path, rows in self.producer_rows.items()}


def _blocks_of(n: int, size: int) -> torch.Tensor:
    return torch.arange(n * size).view(n, size)


def _producer_rows(parts: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rows per producer path from the (path, rows per group) of q, k and v in that order. Where one module
    produces several of them (a fused [q; k; v] projection), each later segment's rows are offset by the rows
    of the segments before it, and a group owns its rows in every segment."""
    rows: dict[str, torch.Tensor] = {}
    for path, blocks in parts:
        if path in rows:
            rows[path] = torch.cat([rows[path], blocks + rows[path].numel()], dim=1)
        else:
            rows[path] = blocks
    return rows


def attention_site(adapter: Adapter, costs: SiteCosts, name: str, heads_kept: int, kv_heads_kept: int,
                   mode: str) -> Site:
    """The attention site of a block whose widths are ``costs`` (``widths.site_costs``), keeping ``heads_kept``."""
    spec = adapter.attention
    heads, kv_heads, hd = costs.heads, costs.kv_heads, costs.head_dim
    per_kv = heads // kv_heads
    if mode == "kv_group" or per_kv == 1:
        # One group = a kv head with all its query heads: their o columns are contiguous. With one query head
        # per kv head (BERT, GPT-2, any multi-head attention) both modes are this one.
        return Site(
            kind="attention", name=name, consumer=spec.output, groups=_blocks_of(kv_heads, per_kv * hd),
            keep=heads_kept // per_kv,
            producer_rows=_producer_rows([(spec.query, _blocks_of(kv_heads, per_kv * hd)),
                                          (spec.key, _blocks_of(kv_heads, hd)), (spec.value, _blocks_of(kv_heads, hd))]),
        )
    if spec.fused:
        raise ValueError(f"{name}: a fused q/k/v projection with grouped-query attention can only drop whole kv "
                         "groups (attention_mode kv_group)")
    per_class = heads_kept // kv_heads
    return Site(
        kind="attention", name=name, consumer=spec.output, groups=_blocks_of(heads, hd), keep=heads_kept,
        producer_rows={spec.query: _blocks_of(heads, hd)},
        partition=torch.arange(heads) // per_kv, per_class=per_class,
    )


def mlp_site(adapter: Adapter, name: str, width: int, keep: int) -> Site:
    spec = adapter.mlp
    neurons = _blocks_of(width, 1)
    return Site(kind="mlp", name=name, consumer=spec.consumer, groups=neurons, keep=keep,
                producer_rows={p: neurons for p in spec.producers}, residual=spec.residual)


def block_sites(adapter: Adapter, costs: SiteCosts, block_name: str, widths: Widths, mode: str,
                full_width: bool = False) -> list[Site]:
    """The sites of a block whose widths are ``costs``, cut to ``widths``, in forward order, skipping those left
    at full width (nothing to cut there) unless ``full_width`` asks for their refit too."""
    sites = []
    if adapter.attention is not None and (full_width or widths.heads < costs.heads):
        sites.append(attention_site(adapter, costs, f"{block_name}.attention", widths.heads, widths.kv_heads, mode))
    if full_width or widths.mlp < costs.mlp_width:
        sites.append(mlp_site(adapter, f"{block_name}.mlp", costs.mlp_width, widths.mlp))
    return sites
