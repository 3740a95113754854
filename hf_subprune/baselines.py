"""Selection methods behind one interface: the greedy method and the baselines it is compared with.

Pure tensor code, like ``selection.py``. Every method registers itself under a name; ``select`` runs a
method for a budget and then either the least-squares refit or the method's own way of keeping the
consumer (the original columns, plus FLAP's bias compensation), so that every comparison is side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .selection import GroupLayout, Selection, SiteStatistics, check_budget, greedy_select, reconstruction_error, refit

__all__ = ["METHODS", "Method", "register_method", "select", "group_scores"]

ScoreFn = Callable[[SiteStatistics, torch.Tensor, GroupLayout, int], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A registered selection method.

    Attributes:
        name: the name used in configs and on the command line.
        score: per-group importance (higher is kept) for score-based baselines; ``None`` for greedy.
        compensates_bias: without a refit, add the removed columns' mean contribution to the bias (FLAP).
        description: one line for ``--help`` and the report.
    """

    name: str
    score: ScoreFn | None
    compensates_bias: bool = False
    description: str = ""


METHODS: dict[str, Method] = {}


def register_method(name: str, *, compensates_bias: bool = False, description: str = ""):
    """Decorator registering a per-group score function as a baseline selection method."""

    def wrap(fn: ScoreFn) -> ScoreFn:
        METHODS[name] = Method(name, fn, compensates_bias, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


METHODS["greedy"] = Method(
    "greedy", None, description="greedy submodular selection on the reconstruction error (El Halabi et al. 2022)"
)


def _per_group(column_scores: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    return column_scores[layout.columns.to(column_scores.device)].sum(-1)


@register_method("random")
def _random(stats: SiteStatistics, weight: torch.Tensor, layout: GroupLayout, seed: int) -> torch.Tensor:
    """uniformly random groups (seeded)"""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(layout.num_groups, generator=gen, dtype=torch.float64)


@register_method("magnitude")
def _magnitude(stats: SiteStatistics, weight: torch.Tensor, layout: GroupLayout, seed: int) -> torch.Tensor:
    """squared Frobenius norm of the group's consumer columns"""
    return _per_group(weight.double().square().sum(0), layout)


@register_method("wanda-sp")
def _wanda_sp(stats: SiteStatistics, weight: torch.Tensor, layout: GroupLayout, seed: int) -> torch.Tensor:
    """input activation norm times the consumer column's L1 norm (Wanda-sp, An et al. 2024)"""
    act_norm = stats.gram.diagonal().clamp_min(0).sqrt().to(torch.float64)
    return _per_group(act_norm * weight.double().abs().sum(0).to(act_norm.device), layout)


@register_method("flap", compensates_bias=True)
def _flap(stats: SiteStatistics, weight: torch.Tensor, layout: GroupLayout, seed: int) -> torch.Tensor:
    """input fluctuation (variance) times the squared column norm, with bias compensation (FLAP, An et al. 2024)"""
    n = stats.count.clamp_min(1)
    mean = stats.input_sum / n
    variance = (stats.gram.diagonal() / n - mean.square()).clamp_min(0).to(torch.float64)
    return _per_group(variance * weight.double().square().sum(0).to(variance.device), layout)


def group_scores(name: str, stats: SiteStatistics, weight: torch.Tensor, layout: GroupLayout, seed: int = 0) -> torch.Tensor:
    method = _method(name)
    if method.score is None:
        raise ValueError(f"method {name!r} does not rank groups by a score")
    return method.score(stats, weight, layout, seed).cpu()


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown selection method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _top_k(scores: torch.Tensor, k: int, partition: torch.Tensor | None, per_class: int | None) -> list[int]:
    """Highest scores first, ties to the lowest index; with a partition, ``per_class`` from every class."""
    order = sorted(range(len(scores)), key=lambda g: (-float(scores[g]), g))
    if partition is None:
        return order[:k]
    counts: dict[int, int] = {}
    kept = []
    for g in order:
        c = int(partition[g])
        if counts.get(c, 0) < per_class:
            counts[c] = counts.get(c, 0) + 1
            kept.append(g)
    return kept


def select(
    method: str,
    stats: SiteStatistics,
    weight: torch.Tensor,
    k: int | None,
    group_size: int = 1,
    groups: Sequence[Sequence[int]] | torch.Tensor | None = None,
    *,
    refit_weights: bool = True,
    damping: float = 1e-3,
    bias_shift: bool = True,
    partition: Sequence[int] | torch.Tensor | None = None,
    per_class: int | None = None,
    prior: torch.Tensor | None = None,
    seed: int = 0,
    site: str = "site",
) -> Selection:
    """Keep ``k`` groups of the consumer's input columns with ``method``.

    Args:
        weight: the consumer's current weight (m x d): baselines score it, and without a refit its kept
            columns are returned unchanged.
        refit_weights: least-squares refit of the kept columns (with the intercept when ``bias_shift``);
            otherwise the original columns, plus the method's bias compensation if it has one.
        prior: damp the refit towards this weight (usually ``weight`` itself) instead of towards zero.
        Other arguments as in ``greedy_select``.

    ``Selection.error`` is always the undamped reconstruction error of the returned weights, so that
    methods compare on the same footing.
    """
    spec = _method(method)
    stats.check_finite(site)
    layout = GroupLayout.build(stats.in_features, group_size, groups)
    part = torch.as_tensor(partition, dtype=torch.long) if partition is not None else None
    if spec.score is None:
        result = greedy_select(
            stats, k, group_size, groups, damping=damping, bias_shift=bias_shift,
            partition=part, per_class=per_class, prior=prior, site=site,
        )
    else:
        k, part = check_budget(k, layout, part, per_class)
        kept = _top_k(spec.score(stats, weight, layout, seed), k, part, per_class)
        cols = layout.kept_columns(kept)
        result = Selection(kept, cols, None, torch.zeros(weight.shape[0]), torch.zeros(0), float(stats.target_sq))
        if refit_weights:
            result.weight, result.bias_shift, _, result.diagnostics = refit(
                stats, cols, damping=damping, bias_shift=bias_shift, prior=prior, site=site
            )
    if not refit_weights:
        result.weight = weight[:, result.kept_columns.to(weight.device)].clone()
        result.bias_shift = torch.zeros(weight.shape[0], dtype=stats.gram.dtype, device=stats.gram.device)
        if spec.compensates_bias and stats.count > 0:
            removed = torch.ones(stats.in_features, dtype=torch.bool)
            removed[result.kept_columns] = False
            mean = (stats.input_sum / stats.count)[removed.to(stats.input_sum.device)]
            result.bias_shift = weight[:, removed.to(weight.device)].to(mean) @ mean
    result.error = reconstruction_error(stats, result.kept_columns, result.weight, result.bias_shift)
    return result
