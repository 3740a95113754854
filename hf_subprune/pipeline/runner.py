"""Pruning every block to its widths: per site, the statistics, the selection and the cut; then the stream moves
on to the next block (``blocks.walk_blocks``). The variant (``variants.py``) says which stream feeds what."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..adapters import Adapter
from ..config import PruneConfig
from ..maths.methods import select
from ..maths.selection import SiteStatistics, auto_shrinkage, reconstruction_error
from .blocks import walk_blocks
from .capture import BlockInputs
from .memory import release_freed_memory
from .sites import Site, block_sites
from .statistics import collect_statistics, dense_targets, summed_dtype, uncut_outputs
from .surgery import apply_selection
from .variants import VARIANTS
from .widths import Widths, site_costs

__all__ = ["SiteReport", "prune_blocks", "shrinkage_for"]


@dataclass
class SiteReport:
    """What happened at one site (everything the report and the card show)."""

    name: str
    kind: str
    block: int
    groups_before: int
    groups_kept: int
    kept: list[int]
    error: float
    error_original_columns: float
    target_sq: float
    tokens: int
    curve: list[float] = field(default_factory=list)
    diagnostics: dict = field(default_factory=dict)
    seconds_statistics: float = 0.0
    seconds_selection: float = 0.0

    @property
    def relative_error(self) -> float:
        return self.error / max(self.target_sq, 1e-30)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["relative_error"] = self.relative_error
        return out


def shrinkage_for(cfg: PruneConfig, stats: SiteStatistics) -> float:
    """The configured correlation shrinkage, or the automatic one for this site's data."""
    return auto_shrinkage(stats) if cfg.shrinkage is None else cfg.shrinkage


FEW_TOKENS_PER_COLUMN = 0.25
"""``selection_error="auto"`` chooses on the original columns below this many calibration tokens per input column.
Below one the sample covariance is singular; at a third (SmolLM2, 512 tokens for 1536 MLP columns) the original
columns' error still traded the other domains for the calibration's (3-6% worse there, 4% better in it); at a
sixth and below (the MiniLM classifier, 4-16 sentences) it won (``benchmarks/results/minilm_exp.md``)."""


def selection_error_for(cfg: PruneConfig, stats: SiteStatistics) -> str:
    """The configured selection error, or the automatic one: the original columns' error where the site saw far
    fewer tokens than it has input columns (``FEW_TOKENS_PER_COLUMN``), the refit's elsewhere."""
    if cfg.selection_error != "auto":
        return cfg.selection_error
    return "original" if float(stats.tokens) < FEW_TOKENS_PER_COLUMN * stats.in_features else "refit"


def _prune_site(site: Site, adapter: Adapter, block: nn.Module, stats: SiteStatistics, cfg: PruneConfig,
                block_index: int) -> SiteReport:
    consumer = block.get_submodule(site.consumer)
    weight = adapter.weight(consumer).detach()
    bias_shift = cfg.bias_shift and getattr(consumer, "bias", None) is not None
    # The weight as the model holds it: each use takes it to the statistics' dtype where and as far as it needs
    # (a float32 copy of a bfloat16 MLP's consumer is 46 MB at a 1B model, beside the selection's peak).
    sel = select(
        cfg.method, stats, weight, site.keep, groups=site.groups, refit_weights=cfg.refit,
        damping=cfg.damping, shrinkage=shrinkage_for(cfg, stats), bias_shift=bias_shift, partition=site.partition,
        per_class=site.per_class, prior=weight if cfg.damp_to_original else None, seed=cfg.seed + block_index,
        site=site.name, selection_error=selection_error_for(cfg, stats),
    )
    untouched = reconstruction_error(stats, sel.kept_columns, weight[:, sel.kept_columns.to(weight.device)])
    apply_selection(block, adapter, site, sel.kept, sel.weight, sel.bias_shift if bias_shift else None)
    return SiteReport(
        name=site.name, kind=site.kind, block=block_index, groups_before=site.num_groups, groups_kept=len(sel.kept),
        kept=sorted(sel.kept), error=float(sel.error), error_original_columns=untouched,
        target_sq=float(stats.target_sq), tokens=int(stats.tokens), curve=sel.relative_curve.tolist(),
        diagnostics=sel.diagnostics,
    )


@torch.no_grad()
def prune_blocks(model: nn.Module, adapter: Adapter, inputs: BlockInputs, cfg: PruneConfig, widths: list[Widths],
                 device, show: bool = True) -> list[SiteReport]:
    """Prune every block in place to its widths (one ``Widths`` per block); one report per pruned site."""
    variant = VARIANTS[cfg.variant]
    dtype = summed_dtype(cfg, model)
    reports: list[SiteReport] = []
    correction = cfg.drift_correction or 0.0  # resolved by prune(); the config allows it on uncut-block targets only
    dense = list(inputs.hidden) if correction else None  # the dense model's stream, for the drift correction
    cut_yet = False
    for step in walk_blocks(model, inputs, device, cfg.offload_device, desc="pruning blocks", show=show,
                            modifies=True):
        block = step.block
        sites = block_sites(adapter, site_costs(adapter, block), step.name, widths[step.index], cfg.attention_mode,
                            full_width=bool(cfg.refit_full_width) and cfg.refit)
        if not cut_yet:  # before the first cut the stream is the dense one: a whole site has nothing to undo
            sites = sites[next((i for i, s in enumerate(sites) if not s.whole), len(sites)):]
            cut_yet = bool(sites)
        original = copy.deepcopy(block) if sites and variant.needs_uncut_copy else block
        after: dict[str, list[torch.Tensor]] = {}
        start = time.perf_counter()
        if dense is not None:  # before any cut: the block is the dense model's
            after, dense = dense_targets(block, sites, inputs, dense, device)
        # The uncut block's outputs that the later sites' targets need, read before the first cut.
        uncut_after = (uncut_outputs(block, sites[1:], inputs, step.hidden, device)
                       if variant.target == "uncut_block" else {})
        for number, site in enumerate(sites):
            t0 = start if number == 0 else time.perf_counter()  # the first site's time includes the dense targets
            # Before the block's first cut, its uncut copy (layerwise) computes what the block does: read one of them.
            stats = collect_statistics(site, adapter, block, original if number else block, inputs, step.hidden,
                                       variant, device, dtype, cfg.token_weights,
                                       dense_after=after.pop(site.name, None), drift_correction=correction,
                                       uncut=uncut_after.pop(site.name, None))
            release_freed_memory()  # the activations the statistics were built from, before the selection's buffers
            t1 = time.perf_counter()
            report = _prune_site(site, adapter, block, stats, cfg, step.index)
            report.seconds_statistics, report.seconds_selection = t1 - t0, time.perf_counter() - t1
            reports.append(report)
            del stats
            release_freed_memory()  # the site's statistics and selection buffers
        step.through = original if variant.stream == "original" else block
    return reports
