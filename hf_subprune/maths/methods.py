"""Selection methods behind one interface: the greedy method and the baselines it is compared with.

Pure tensor code, like ``selection.py``. Every method registers a ``Method`` record under its name. Two kinds of
baselines:

- *hybrids* (``flap-score``, ``wanda-sp-score``, ``magnitude-score``, ``random-score``): a published score ranks
  the groups of each site, and everything else is ours (the variant's stream, token weights, refit, budget), so
  that the selection alone is compared;
- *published* methods under their plain names (``flap``, ``wanda-sp``, ``magnitude``, ``random``,
  ``layer-greedy-fs``), run as their papers' code runs them: each fixes its own settings (``Method.settings``,
  applied over the ``PruneConfig``), and FLAP, which allocates widths over the whole model, runs its own pass
  (``scope="global"``, ``pipeline/flap.py``); its scores and allocation are the pure functions at the end of this file.

``select`` runs a per-site method for a budget and then either the least-squares refit or the method's own way of
keeping the consumer (the original columns, plus bias compensation for the methods that have it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .selection import (GroupLayout, Selection, SiteStatistics, _Picker, check_budget, greedy_select,
                        reconstruction_error, refit)

__all__ = ["METHODS", "Method", "register_method", "select", "group_scores", "layer_greedy_fs", "flap_unit_scores",
           "flap_allocate", "FlapAllocation"]

ScoreFn = Callable[[SiteStatistics, torch.Tensor, GroupLayout, int], torch.Tensor]
# (stats, weight, layout, k, partition, per_class) -> (kept groups in pick order, error after each pick)
PickFn = Callable[[SiteStatistics, torch.Tensor, GroupLayout, int, "torch.Tensor | None", "int | None"],
                  "tuple[list[int], torch.Tensor]"]


@dataclass(frozen=True)
class Method:
    """A registered selection method.

    Attributes:
        name: the name used in configs and on the command line.
        score: per-group importance (higher is kept) for score-based methods.
        pick: a greedy pick of groups from the statistics, without a refit (LayerGreedyFS). A method with
            neither ``score`` nor ``pick`` is the greedy submodular selection with its own refit.
        compensates_bias: without a refit, add the removed columns' mean contribution to the bias (FLAP).
        description: one line for ``--help`` and the report.
        published: run as its paper's code does; ``settings`` then says how.
        settings: ``PruneConfig`` fields the method fixes, whatever the config asks (e.g. ``refit=False``).
        scope: ``"site"`` (one site at a time, in the block runner) or ``"global"`` (a pass over the whole model
            that decides every width itself, registered in ``pipeline.flap.MODEL_PASSES``).
        note: how the method runs, for the report's notes.
    """

    name: str
    score: ScoreFn | None = None
    pick: PickFn | None = None
    compensates_bias: bool = False
    description: str = ""
    published: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    scope: str = "site"
    note: str = ""


METHODS: dict[str, Method] = {}


def register_method(name: str, **fields: Any):
    """Decorator registering a per-group score function (``kind="score"``, the default) or a pick function
    (``kind="pick"``) as a selection method; ``fields`` are the other ``Method`` attributes."""
    kind = fields.pop("kind", "score")

    def wrap(fn: Callable) -> Callable:
        fields.setdefault("description", (fn.__doc__ or "").strip().split("\n")[0])
        METHODS[name] = Method(name, **{kind: fn}, **fields)
        return fn

    return wrap


METHODS["greedy"] = Method(
    "greedy", description="greedy submodular selection on the reconstruction error (El Halabi et al. 2022)"
)

# Settings of the published per-site methods: the FLAP repository's lib/prune.py prunes layer by layer on the
# stream of the model pruned so far, with unweighted statistics, the same ratio in every layer, and keeps the
# original columns.
# Published methods calibrate on the samples given: none written by the model (synthetic.py is ours).
_UNIFORM_NO_REFIT = {"variant": "sequential", "token_weights": "none", "refit": False, "bias_shift": False,
                     "budget": "uniform", "synthetic_samples": 0, "drift_correction": 0.0}


def _per_group(column_scores: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    return column_scores[layout.columns.to(column_scores.device)].sum(-1)


def _random(stats: SiteStatistics, weight: torch.Tensor, layout: GroupLayout, seed: int) -> torch.Tensor:
    """uniformly random groups (seeded)"""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(layout.num_groups, generator=gen, dtype=torch.float64)


register_method("random-score", description="uniformly random groups (seeded), then our refit")(_random)
register_method("random", published=True, settings=_UNIFORM_NO_REFIT,
                description="uniformly random groups (seeded), uniform widths, no refit",
                note="random as published: uniformly random groups (seeded per block), uniform widths, no refit",
                )(_random)


@register_method("magnitude-score")
def _magnitude_score(stats: SiteStatistics, weight: torch.Tensor, layout: GroupLayout, seed: int) -> torch.Tensor:
    """squared Frobenius norm of the group's consumer columns, then our refit"""
    return _per_group(weight.double().square().sum(0), layout)


@register_method("magnitude", published=True, settings=_UNIFORM_NO_REFIT,
                 note="magnitude as published (FLAP repository, prune_magnitude_sp): consumer column L2 norms, "
                      "a head the sum of its columns' norms; no data used for the choice; uniform widths; no refit")
def _magnitude(stats: SiteStatistics, weight: torch.Tensor, layout: GroupLayout, seed: int) -> torch.Tensor:
    """consumer column L2 norm, summed over a head's columns; uniform widths, no refit (prune_magnitude_sp)"""
    return _per_group(weight.double().norm(dim=0), layout)


@register_method("wanda-sp-score")
def _wanda_sp_score(stats: SiteStatistics, weight: torch.Tensor, layout: GroupLayout, seed: int) -> torch.Tensor:
    """input activation norm times the consumer column's L1 norm (Wanda-sp, An et al. 2024), then our refit"""
    act_norm = stats.gram.diagonal().clamp_min(0).sqrt().to(torch.float64)
    return _per_group(act_norm * weight.double().abs().sum(0).to(act_norm.device), layout)


@register_method("wanda-sp", published=True, settings=_UNIFORM_NO_REFIT,
                 note="wanda-sp as published (FLAP repository, prune_wanda_sp): mean_i |W_ij| * sqrt(mean_t x_tj^2) "
                      "on the pruned-so-far stream, unweighted, a head the sum of its columns; uniform widths; "
                      "no refit, no bias compensation")
def _wanda_sp(stats: SiteStatistics, weight: torch.Tensor, layout: GroupLayout, seed: int) -> torch.Tensor:
    """mean |W_ij| over outputs times the input RMS, summed over a head's columns; uniform widths, no refit"""
    rms = (stats.gram.diagonal() / stats.count.clamp_min(1)).clamp_min(0).sqrt().to(torch.float64)
    return _per_group(weight.double().abs().mean(0).to(rms.device) * rms, layout)


@register_method("flap-score", compensates_bias=True)
def _flap_score(stats: SiteStatistics, weight: torch.Tensor, layout: GroupLayout, seed: int) -> torch.Tensor:
    """input fluctuation (variance) times the squared column norm, ranked per site, then our refit (or, without
    one, FLAP's bias compensation)"""
    n = stats.count.clamp_min(1)
    mean = stats.input_sum / n
    variance = (stats.gram.diagonal() / n - mean.square()).clamp_min(0).to(torch.float64)
    return _per_group(variance * weight.double().square().sum(0).to(variance.device), layout)


METHODS["flap"] = Method(
    "flap", compensates_bias=True, published=True, scope="global",
    settings={"variant": "layerwise", "token_weights": "none", "refit": False, "bias_shift": True,
              "budget": "global", "attention_mode": "kv_group", "synthetic_samples": 0, "drift_correction": 0.0},
    description="FLAP as published (An et al. 2024): fluctuation scores standardised per layer, one global "
                "allocation over layers and site types, bias compensation, no refit",
    note="flap as published (FLAP, An et al. AAAI 2024; official lib/prune.py prune_flap, metric WIFV, structure "
         "AL-AM): dense-model statistics (each block on the previous dense block's output), unweighted; per-layer "
         "standardised scores; one global allocation across layers and site types weighted by parameter count "
         "(FLAP's threshold, not the greedy error curves of our global budget); bias compensation; no refit. "
         "Grouped-query attention: a unit is a whole kv group",
)


# --------------------------------------------------------------------------------------------------
# LayerGreedyFS
# --------------------------------------------------------------------------------------------------


@register_method(
    "layer-greedy-fs", kind="pick", published=True, settings=_UNIFORM_NO_REFIT,
    note="layer-greedy-fs as published (LayerGreedyFS, Ye et al. 2020, as run by El Halabi et al. 2022): greedy "
         "forward selection minimising the layer's output reconstruction error with the original weights (no "
         "reweighting), on the pruned-so-far stream, unweighted; uniform widths; no refit",
)
@torch.no_grad()
def layer_greedy_fs(stats: SiteStatistics, weight: torch.Tensor, layout: GroupLayout, k: int,
                    partition: torch.Tensor | None = None, per_class: int | None = None
                    ) -> tuple[list[int], torch.Tensor]:
    """greedy forward selection on the output error with the original weights (LayerGreedyFS, Ye et al. 2020)

    Minimises ``error(S) = sum_t ||y_t - W[:, S] b_{t,S}||^2`` without refitting ``W``. In the statistics:
    ``error(S) = s - 2 sum_{j in S} a_j + sum_{i,j in S} M_ij`` with ``a_j = <W[:, j], C[j]>`` and
    ``M = (W^T W) * G`` (elementwise). Adding group g lowers the error by
    ``2 (A_g - R_g) - D_g``: ``A_g`` its columns' ``a``, ``R_g`` their running sums ``sum_{i in S} M_ij`` and
    ``D_g`` the sum of its own block of ``M``. Each step updates the running sums with the picked columns'
    rows of ``M``, formed on the fly (O(m d r): no d x d matrix besides ``G``).

    Returns the kept groups in pick order and the error after each pick.

    The arithmetic is float64 whatever the statistics' dtype: the late gains are small differences of sums
    accumulated over the picks, which float32 resolves only to ~1e-4 of themselves (all-MiniLM-L6-v2's MLP inputs
    from 16 lines: on the same float32 sums, float32 arithmetic swapped 7-105 of the 1101 kept columns at blocks 0-3).
    """
    dtype, device = torch.float64, stats.gram.device
    w = weight.to(device=device, dtype=dtype)
    cols = layout.columns.to(device)
    a_groups = (w.T * stats.cross.to(dtype)).sum(1)[cols].sum(1)
    w_groups = w[:, cols]  # m x groups x r
    own = torch.einsum("mgi,mgj->gij", w_groups, w_groups) * stats.gram[cols[:, :, None], cols[:, None, :]].to(dtype)
    d_groups = own.sum((1, 2))
    running = torch.zeros(w.shape[1], dtype=dtype, device=device)
    picker = _Picker(layout.num_groups, partition, per_class, device)
    error, kept, curve = stats.target_sq.to(dtype), [], torch.zeros(k, dtype=dtype)
    for step in range(k):
        gain = 2 * (a_groups - running[cols].sum(1)) - d_groups
        # Gains can be negative here (a column can make the output worse); shifted so that the picker's
        # masking value (-1) stays below every candidate. The order, and so the pick, is unchanged.
        g = picker.pick(gain - gain.min())
        kept.append(g)
        error = error - gain[g]
        curve[step] = error.cpu()
        picked = cols[g]
        running += ((w[:, picked].T @ w) * stats.gram[picked].to(dtype)).sum(0)
    return kept, curve


# --------------------------------------------------------------------------------------------------
# One site
# --------------------------------------------------------------------------------------------------


def _keep_all(stats: SiteStatistics, weight: torch.Tensor, layout: GroupLayout, k: int,
              partition: torch.Tensor | None = None, per_class: int | None = None) -> tuple[list[int], torch.Tensor]:
    """Every group, for a site only refit (``PruneConfig.refit_full_width``)."""
    return list(range(layout.num_groups)), torch.zeros(0)


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
    shrinkage: float = 0.0,
    seed: int = 0,
    site: str = "site",
    selection_error: str = "refit",
) -> Selection:
    """Keep ``k`` groups of the consumer's input columns with a per-site ``method``.

    Args:
        weight: the consumer's current weight (m x d): baselines score it, and without a refit its kept
            columns are returned unchanged.
        refit_weights: least-squares refit of the kept columns (with the intercept when ``bias_shift``);
            otherwise the original columns, plus the method's bias compensation if it has one.
        prior: damp the refit towards this weight (usually ``weight`` itself) instead of towards zero.
        selection_error: for ``greedy``, what the choice minimises: ``"refit"`` the error after the refit (the
            greedy's own gains), ``"original"`` the error of the kept columns as they are (``layer_greedy_fs``);
            the refit, when asked, follows either way. Resolved per site by the caller (``PruneConfig``'s "auto").
        Other arguments as in ``greedy_select``.

    The arguments are taken as given: a published method's fixed settings are applied to the ``PruneConfig``
    (``Method.settings``), not here. ``Selection.error`` is always the undamped reconstruction error of the
    returned weights, so that methods compare on the same footing.
    """
    spec = _method(method)
    if spec.scope != "site":
        raise ValueError(f"method {method!r} chooses over the whole model at once, not one site at a time: run it "
                         "with hf_subprune.prune")
    stats.check_finite(site)
    layout = GroupLayout.build(stats.in_features, group_size, groups)
    part = torch.as_tensor(partition, dtype=torch.long) if partition is not None else None
    greedy = spec.score is None and spec.pick is None
    if k is not None and k == layout.num_groups:  # a site kept whole for its refit: nothing to choose
        spec, greedy = Method(spec.name, pick=_keep_all), False
    elif greedy and selection_error == "original":
        spec = Method(spec.name, pick=layer_greedy_fs)
    if spec.score is None and spec.pick is None:
        result = greedy_select(
            stats, k, group_size, groups, damping=damping, bias_shift=bias_shift,
            partition=part, per_class=per_class, prior=prior, shrinkage=shrinkage, site=site,
        )
    else:
        k, part = check_budget(k, layout, part, per_class)
        weight = weight.to(stats.gram)  # scores and picks in the statistics' dtype
        curve = torch.zeros(0)
        if spec.pick is not None:
            kept, curve = spec.pick(stats, weight, layout, k, part, per_class)
        else:
            kept = _top_k(spec.score(stats, weight, layout, seed), k, part, per_class)
        cols = layout.kept_columns(kept)
        result = Selection(kept, cols, None, torch.zeros(weight.shape[0]), curve, float(stats.target_sq))
        if refit_weights:
            result.weight, result.bias_shift, result.undamped_error, result.diagnostics = refit(
                stats, cols, damping=damping, bias_shift=bias_shift, prior=prior, shrinkage=shrinkage, site=site
            )
    if not refit_weights:
        weight = weight.to(stats.gram)
        result.weight = weight[:, result.kept_columns.to(weight.device)].clone()
        result.bias_shift = torch.zeros(weight.shape[0], dtype=stats.gram.dtype, device=stats.gram.device)
        if spec.compensates_bias and stats.count > 0:
            result.bias_shift = compensation(weight, stats.input_sum / stats.count, result.kept_columns)
    if refit_weights and result.undamped_error is not None:  # known from the refit: O(m d), not O(m |S|^2)
        result.error = result.undamped_error
    else:
        result.error = reconstruction_error(stats, result.kept_columns, result.weight, result.bias_shift)
    if greedy:
        result.diagnostics = {**result.diagnostics, "selection_error": selection_error}
    return result


def compensation(weight: torch.Tensor, mean: torch.Tensor, kept_columns: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation ``W[:, removed] @ mean[removed]``: the removed columns' mean contribution."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[kept_columns.cpu()] = False
    mean = mean[removed.to(mean.device)]
    return weight[:, removed.to(weight.device)].to(mean) @ mean


# --------------------------------------------------------------------------------------------------
# FLAP over the whole model (scores and allocation; the pass itself is in pipeline/flap.py)
# --------------------------------------------------------------------------------------------------


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` with torch's unbiased std, as FLAP does per layer; all zeros where x is constant."""
    std = x.std()
    return (x - x.mean()) / std if bool(std > 0) else torch.zeros_like(x)


def flap_unit_scores(variance: torch.Tensor, weight: torch.Tensor, layout: GroupLayout, squared: bool) -> torch.Tensor:
    """FLAP's per-unit scores at one site (metric WIFV).

    Column j scores ``var_j * ||W[:, j]||^2`` (squared again for attention, as FLAP does for o_proj); the column
    scores are standardised over the site's columns, then averaged over each unit's columns (a head, a kv
    group, or a single neuron), so that units of different layers and site types compare on one scale.
    """
    energy = torch.linalg.vector_norm(weight, dim=0, dtype=torch.float64).square()  # no float64 copy of W
    column = variance.to(torch.float64) * energy.to(variance.device)
    if squared:
        column = column.square()
    return _standardise(column)[layout.columns.to(column.device)].mean(-1)


@dataclass
class FlapAllocation:
    """Which units every site keeps after FLAP's global allocation.

    Attributes:
        kept: per site, a boolean mask over its units.
        threshold: the score at the cut (units above it are kept).
        floored: sites that would have lost every unit and keep their best one.
    """

    kept: list[torch.Tensor]
    threshold: float
    floored: int


def flap_allocate(scores: Sequence[torch.Tensor], unit_weights: Sequence[float], sparsity: float) -> FlapAllocation:
    """FLAP's global allocation (structure AL-AM) over every unit of every site.

    All units are sorted by score, descending; each weighs its parameter count relative to one MLP neuron
    (FLAP hard-codes 512/3 for a LLaMA head); the threshold is the score where the cumulative weight is closest
    to ``(1 - sparsity)`` of the total, and the units scoring strictly above it are kept. Unlike FLAP, a site
    never loses all its units (the export cannot express an empty attention or MLP): it keeps its best one.
    With ``sparsity == 0`` every unit is kept (FLAP would still drop the unit at the threshold).

    Args:
        scores: per site, one score per unit (``flap_unit_scores``), in FLAP's order (all attention sites,
            then all MLP sites; it only matters for ties).
        unit_weights: per site, the weight of each of its units.
    """
    if sparsity == 0:
        return FlapAllocation([torch.ones(len(s), dtype=torch.bool) for s in scores], float("-inf"), 0)
    flat = torch.cat([s.to(torch.float64).cpu() for s in scores])
    weights = torch.cat([torch.full((len(s),), float(w), dtype=torch.float64) for s, w in zip(scores, unit_weights)])
    order = torch.sort(flat, descending=True, stable=True).indices
    cumulative = torch.cumsum(weights[order], 0)
    position = int(torch.argmin((cumulative - weights.sum() * (1 - sparsity)).abs()))
    threshold = float(flat[order[position]])
    kept, floored = [], 0
    for s in scores:
        mask = s.to(torch.float64).cpu() > threshold
        if not bool(mask.any()):
            mask[int(torch.argmax(s.cpu()))] = True
            floored += 1
        kept.append(mask)
    return FlapAllocation(kept, threshold, floored)
