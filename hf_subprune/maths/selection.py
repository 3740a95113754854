"""Greedy submodular channel selection with a least-squares refit of the next layer.

Pure tensor code (no transformers import): everything here works on one *site*'s summed statistics
(DESIGN.md s.1-3), so it can be tested on random matrices and runs the same on CPU and CUDA.

Notation: the consumer layer has weight ``W`` (m x d, ``nn.Linear`` layout). Over the calibration tokens,
``b_t`` is its input in the model pruned so far and ``y_t`` the output it should reproduce. We keep a set
S of *groups* of input columns (neurons, or ``head_dim`` columns per head) and new weights ``W'`` so that
``sum_t ||y_t - W' b_{t,S} - c||^2`` is small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

__all__ = [
    "NonFiniteStatisticsError",
    "SiteStatistics",
    "Selection",
    "GroupLayout",
    "greedy_select",
    "refit",
    "auto_shrinkage",
    "reconstruction_error",
]


class NonFiniteStatisticsError(ValueError):
    """Raised when a site's statistics hold NaN or Inf (usually an overflowing half-precision forward)."""


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@dataclass
class SiteStatistics:
    """Sufficient statistics of one site, summed over tokens (a mergeable, streaming sum).

    Attributes:
        gram: ``sum_t b_t b_t^T`` (d x d).
        cross: ``sum_t b_t y_t^T`` (d x m).
        target_sq: ``sum_t ||y_t||^2`` (0-dim tensor).
        count: total token weight ``sum_t w_t`` (the number of tokens when unweighted; 0-dim, kept as a
            float so that it reduces like the others).
        input_sum: ``sum_t b_t`` (d), for the bias shift.
        target_sum: ``sum_t y_t`` (m), for the bias shift.
        tokens: number of tokens, whatever their weights.

    With token weights ``w_t`` every sum is weighted (``G = sum_t w_t b_t b_t^T`` and so on), so the problem
    becomes a weighted least squares and everything downstream (centring, greedy, refit) is unchanged.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    target_sq: torch.Tensor
    count: torch.Tensor
    input_sum: torch.Tensor
    target_sum: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def zeros(cls, d: int, m: int, *, device=None, dtype: torch.dtype = torch.float64) -> "SiteStatistics":
        z = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
        return cls(z(d, d), z(d, m), z(()), z(()), z(d), z(m), z(()))

    @classmethod
    def from_activations(cls, inputs: torch.Tensor, targets: torch.Tensor, *, weights: torch.Tensor | None = None,
                         dtype=torch.float64) -> "SiteStatistics":
        """Statistics of one batch: ``inputs`` (n x d) are the b_t, ``targets`` (n x m) the y_t."""
        stats = cls.zeros(inputs.shape[-1], targets.shape[-1], device=inputs.device, dtype=dtype)
        stats.update(inputs, targets, weights=weights)
        return stats

    @property
    def in_features(self) -> int:
        return self.gram.shape[0]

    @property
    def out_features(self) -> int:
        return self.cross.shape[1]

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, targets: torch.Tensor, *, weights: torch.Tensor | None = None,
               compute_dtype: torch.dtype | None = None) -> None:
        """Add a batch of token rows, each with an optional weight ``w_t >= 0``. The products run in
        ``compute_dtype`` (default: the inputs' dtype promoted to at least fp32) and are summed into the
        accumulators' dtype, so a bf16 model still accumulates in fp32 or fp64."""
        inputs, targets = inputs.flatten(0, -2), targets.flatten(0, -2)  # tokens x features
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs have {inputs.shape[0]} tokens but targets have {targets.shape[0]}")
        dt = compute_dtype or torch.promote_types(inputs.dtype, torch.float32)
        b = inputs.to(device=self.gram.device, dtype=dt)
        y = targets.to(device=self.gram.device, dtype=dt)
        if weights is not None:
            w = weights.reshape(-1, 1).to(device=b.device, dtype=dt)
            if w.shape[0] != b.shape[0] or bool((w < 0).any()):  # NaN passes: check_finite names it
                raise ValueError(f"weights must be {b.shape[0]} non-negative numbers, one per token")
        wb, wy = (b, y) if weights is None else (b * w, y * w)
        acc = self.gram.dtype
        self.gram += (wb.T @ b).to(acc)
        self.cross += (wb.T @ y).to(acc)
        self.target_sq += (wy * y).to(acc).sum()
        self.count += b.shape[0] if weights is None else w.to(acc).sum()
        self.tokens += b.shape[0]
        self.input_sum += wb.sum(0).to(acc)
        self.target_sum += wy.sum(0).to(acc)

    def __add__(self, other: "SiteStatistics") -> "SiteStatistics":
        return SiteStatistics(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __iadd__(self, other: "SiteStatistics") -> "SiteStatistics":
        for f in fields(self):
            getattr(self, f.name).add_(getattr(other, f.name))
        return self

    def to(self, device=None, dtype: torch.dtype | None = None) -> "SiteStatistics":
        return SiteStatistics(*(getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)))

    def tensors(self) -> list[torch.Tensor]:
        """The accumulators, in a fixed order (for an all-reduce across processes)."""
        return [getattr(self, f.name) for f in fields(self)]

    def check_finite(self, site: str = "site") -> None:
        for f in fields(self):
            if not torch.isfinite(getattr(self, f.name)).all():
                raise NonFiniteStatisticsError(
                    f"{site}: the calibration statistics ({f.name}) contain NaN or Inf. The forward pass "
                    "overflowed or the model weights are broken: run in float32 (--dtype float32) or check "
                    "the model with a plain forward first."
                )

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(G, C, s)`` about the token means: the least-squares problem with a free intercept."""
        n = self.count.clamp_min(1)
        mb, my = self.input_sum / n, self.target_sum / n
        gram = self.gram - n * torch.outer(mb, mb)
        cross = self.cross - n * torch.outer(mb, my)
        target_sq = self.target_sq - n * my.square().sum()
        return gram, cross, target_sq

    @classmethod
    def from_inputs_only(cls, gram_stats: "SiteStatistics", weight: torch.Tensor) -> "SiteStatistics":
        """Statistics for ``y_t = W b_t`` from the input-side sums alone (sequential and layerwise
        variants, where a = b): ``C = G W^T``, ``s = tr(W G W^T)``, no second input stream needed."""
        w = weight.to(gram_stats.gram)
        cross = gram_stats.gram @ w.T
        return cls(
            gram=gram_stats.gram,
            cross=cross,
            target_sq=(w.T * cross).sum(),
            count=gram_stats.count,
            input_sum=gram_stats.input_sum,
            target_sum=w @ gram_stats.input_sum,
            tokens=gram_stats.tokens,
        )


# --------------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupLayout:
    """Which input columns form each group, as an (num_groups x group_size) index tensor."""

    columns: torch.Tensor

    @classmethod
    def build(cls, d: int, group_size: int = 1, groups: Sequence[Sequence[int]] | torch.Tensor | None = None) -> "GroupLayout":
        if groups is None:
            if group_size < 1 or d % group_size:
                raise ValueError(f"{d} input columns cannot be split into groups of {group_size}")
            return cls(torch.arange(d).view(-1, group_size))
        cols = torch.as_tensor([list(g) for g in groups] if not torch.is_tensor(groups) else groups, dtype=torch.long)
        if cols.ndim != 2 or cols.numel() == 0:
            raise ValueError("groups must be a non-empty list of index lists of equal size")
        flat = cols.flatten()
        if flat.min() < 0 or flat.max() >= d or flat.unique().numel() != flat.numel():
            raise ValueError(f"groups must hold distinct column indices in [0, {d})")
        return cls(cols)

    @property
    def num_groups(self) -> int:
        return self.columns.shape[0]

    @property
    def group_size(self) -> int:
        return self.columns.shape[1]

    def kept_columns(self, kept_groups: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Input columns of the kept groups, ascending (the order the cut layer will have)."""
        idx = torch.as_tensor(kept_groups, dtype=torch.long)
        return self.columns[idx].flatten().sort().values


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """What a selection returns.

    Attributes:
        kept: kept group indices in the order they were picked.
        kept_columns: the kept input columns, ascending.
        weight: refitted consumer weight for ``kept_columns`` (m x len(kept_columns)); ``None`` when no
            refit was asked for.
        bias_shift: m-vector to add to the consumer bias (zeros when disabled).
        curve: reconstruction error after each greedy step (length k); empty for baselines.
        target_sq: ``sum_t ||y_t||^2``, so that ``curve / target_sq`` is the relative error.
        error: reconstruction error of the returned weights (damped objective), when a refit was done.
        diagnostics: rank and conditioning figures (see ``greedy_select``).
    """

    kept: list[int]
    kept_columns: torch.Tensor
    weight: torch.Tensor | None
    bias_shift: torch.Tensor
    curve: torch.Tensor
    target_sq: float
    error: float | None = None
    diagnostics: dict = field(default_factory=dict)

    @property
    def relative_curve(self) -> torch.Tensor:
        return self.curve / max(self.target_sq, 1e-30)


# --------------------------------------------------------------------------------------------------
# Solves
# --------------------------------------------------------------------------------------------------


def _dependence_tol(dtype: torch.dtype) -> float:
    """Residual variance (relative to the column's own) below which a column counts as dependent."""
    return 1e-9 if dtype == torch.float64 else 1e-5


def _damping(gram: torch.Tensor, damping: float) -> float:
    diag = gram.diagonal()
    return float(damping * diag.mean().clamp_min(0)) if diag.numel() else 0.0


def _jittered_cholesky(a: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a (batch of) symmetric PSD matrices, adding the least jitter that makes it work.

    Only the matrices that fail get a jitter, of ``eps * mean(diag)`` growing by 10x until the
    factorisation succeeds, so singular blocks (dead neurons, duplicated columns, fewer tokens than
    dimensions) still give a finite factor and do not disturb their neighbours in the batch.
    """
    factor, info = torch.linalg.cholesky_ex(a)
    failed = info > 0
    if not bool(failed.any()):
        return factor
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    tiny = torch.finfo(a.dtype).tiny
    scale = a.diagonal(dim1=-2, dim2=-1).mean(-1).abs().clamp_min(tiny)[..., None, None]
    jitter = 10 * torch.finfo(a.dtype).eps
    while jitter < 1e6:
        retry, info = torch.linalg.cholesky_ex(a + jitter * scale * eye)
        factor = torch.where(failed[..., None, None], retry, factor)
        failed = failed & (info > 0)
        if not bool(failed.any()):
            return factor
        jitter *= 10
    raise RuntimeError("could not factorise the statistics even with heavy damping; they are not PSD")


@dataclass
class _Problem:
    """The centred (or raw) statistics in the solve dtype, with the ridge already folded in."""

    stats: SiteStatistics
    gram: torch.Tensor  # G + diag(lambda)
    cross: torch.Tensor  # C (+ diag(lambda) W^T with a prior)
    target_sq: float  # s (+ sum_j lambda_j ||W_j||^2 with a prior)
    lam: torch.Tensor  # per-column ridge lambda_j (d)
    own: torch.Tensor  # undamped diagonal of G, to tell dead or dependent columns


def _problem(stats: SiteStatistics, bias_shift: bool, dtype: torch.dtype, damping: float,
             prior: torch.Tensor | None, shrinkage: float = 0.0) -> _Problem:
    """Centre (for the intercept) and damp the statistics.

    The ridge on column j is ``lambda_j = damping * mean(diag G) + shrinkage * G_jj``. The first term is a small
    numerical damping. The second shrinks the input correlations towards zero: ``G + shrinkage diag(G)`` is
    (up to scale) the calibration covariance with its off-diagonal part shrunk by ``1 / (1 + shrinkage)``, the
    classic remedy for a covariance estimated from few samples, and what keeps a selection from trusting
    correlations between channels that another text will not reproduce.

    Without ``prior`` the ridge pulls the weights towards zero. With ``prior`` (the consumer's original
    m x d weight) it pulls them towards the original columns instead: the same as adding d pseudo-tokens
    ``sqrt(lambda_j) e_j`` with targets ``sqrt(lambda_j) W e_j``, so greedy and refit need no change, a dropped
    column costs ``lambda_j ||W_j||^2`` (with shrinkage: its own energy ``G_jj ||W_j||^2`` times the shrinkage,
    FLAP's fluctuation score when centred) and, with little data, the refit stays close to the original
    weights rather than shrinking them.
    """
    stats = stats.to(dtype=dtype)
    gram, cross, target_sq = stats.centred() if bias_shift else (stats.gram, stats.cross, stats.target_sq)
    own = gram.diagonal().clone()
    lam = _damping(gram, damping) + shrinkage * own.clamp_min(0)
    gram = gram + torch.diag(lam)
    if prior is not None and bool((lam > 0).any()):
        w = prior.to(cross)
        cross = cross + lam[:, None] * w.T
        target_sq = target_sq + (lam * w.square().sum(0)).sum()
    return _Problem(stats, gram, cross, float(target_sq), lam, own)


def auto_shrinkage(stats: SiteStatistics) -> float:
    """The default correlation shrinkage of a site: ``max(1, d / tokens)``. At least 1: a dropped channel costs
    its own energy as much as the correlations say it can be rebuilt, which keeps the cut sound on text unlike
    the calibration; more when there are fewer tokens than input columns and the sample covariance is singular."""
    return max(1.0, stats.in_features / max(float(stats.tokens), 1.0))


def refit(
    stats: SiteStatistics,
    kept_columns: Sequence[int] | torch.Tensor,
    *,
    damping: float = 1e-3,
    bias_shift: bool = True,
    prior: torch.Tensor | None = None,
    shrinkage: float = 0.0,
    dtype: torch.dtype | None = None,
    site: str = "site",
) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """Least-squares consumer weights for a given set of kept input columns.

    Solves ``W'^T = (G_SS + lambda I)^{-1} C_S`` by a Cholesky factorisation (never an explicit inverse),
    ``lambda = damping * mean(diag G)`` over all the site's columns (towards ``prior`` instead of zero when
    given, see ``_problem``); with ``bias_shift`` the problem is centred so that the intercept
    ``c = mean(y) - W' mean(b_S)`` is exact.

    Returns:
        ``(weight m x |S|, bias_shift m, error, diagnostics)`` in the statistics' dtype.
    """
    stats.check_finite(site)
    dtype = dtype or stats.gram.dtype
    prob = _problem(stats, bias_shift, dtype, damping, prior, shrinkage)
    stats, cross, target_sq = prob.stats, prob.cross, prob.target_sq
    cols = torch.as_tensor(kept_columns, dtype=torch.long, device=cross.device).sort().values
    m = cross.shape[1]
    if cols.numel() == 0:
        shift = stats.target_sum / stats.count.clamp_min(1) if bias_shift else cross.new_zeros(m)
        return cross.new_zeros(m, 0), shift, target_sq, {"rank": 0}
    factor = _jittered_cholesky(prob.gram[cols][:, cols])
    c_s = cross[cols]
    w_t = torch.cholesky_solve(c_s, factor)  # |S| x m
    # Damped objective: s - 2 tr(W C) + tr(W (G + lam) W^T) = s - tr(W C) at the optimum.
    error = target_sq - float((w_t * c_s).sum())
    if bias_shift:
        n = stats.count.clamp_min(1)
        shift = stats.target_sum / n - w_t.T @ (stats.input_sum[cols] / n)
    else:
        shift = cross.new_zeros(m)
    pivots = factor.diagonal().square()
    diagnostics = {
        "damping": float(prob.lam.mean()),
        "condition_estimate": float(pivots.max() / pivots.min().clamp_min(torch.finfo(dtype).tiny)),
    }
    return w_t.T.contiguous(), shift, error, diagnostics


# --------------------------------------------------------------------------------------------------
# Greedy
# --------------------------------------------------------------------------------------------------


def check_budget(k: int, layout: GroupLayout, partition, per_class) -> tuple[int, torch.Tensor | None]:
    if partition is not None:
        partition = torch.as_tensor(partition, dtype=torch.long)
        if partition.shape != (layout.num_groups,):
            raise ValueError(f"partition must give a class for each of the {layout.num_groups} groups")
        if per_class is None:
            raise ValueError("partition needs per_class (how many groups to keep in each class)")
        sizes = torch.bincount(partition)
        if (sizes[sizes > 0] < per_class).any():
            raise ValueError(f"a class has fewer than per_class={per_class} groups")
        quota_k = per_class * int((sizes > 0).sum())
        if k is None:
            k = quota_k
        elif k != quota_k:
            raise ValueError(f"k={k} but the quota keeps {per_class} in each of {int((sizes > 0).sum())} classes = {quota_k}")
    if k is None or not 0 <= k <= layout.num_groups:
        raise ValueError(f"k must be between 0 and the number of groups ({layout.num_groups}), got {k}")
    return k, partition


TIE_RTOL = 1e-4
"""Gains within this relative margin of the best are a tie, taken by the lowest index. Near-equal gains are
common (late MLP steps, similar heads); without a margin a rounding-level change in the statistics (another
batch size, process count or accumulation order) flips such picks, and the flips compound over the blocks."""


class _Picker:
    """Which group a greedy step takes: among the live candidates whose gain is within ``rtol`` (relative)
    of the best, the lowest index; within quotas."""

    def __init__(self, num_groups: int, partition: torch.Tensor | None, per_class: int | None, device,
                 rtol: float = TIE_RTOL) -> None:
        self.available = torch.ones(num_groups, dtype=torch.bool, device=device)
        self.partition = partition.to(device) if partition is not None else None
        self.per_class = per_class
        self.rtol = rtol
        self.counts = (torch.zeros(int(partition.max()) + 1, dtype=torch.long, device=device)
                       if partition is not None else None)

    def pick(self, gain: torch.Tensor) -> int:
        candidates = self.available
        if self.partition is not None:
            candidates = candidates & (self.counts[self.partition] < self.per_class)
        masked = torch.where(candidates, gain, torch.full_like(gain, -1.0))
        best = masked.max()
        near = candidates & (masked >= best - self.rtol * best.abs())
        g = int(torch.argmax(near.to(torch.uint8)))  # the first (lowest-index) near-best candidate
        self.available[g] = False
        if self.partition is not None:
            self.counts[self.partition[g]] += 1
        return g


def _greedy_neurons(gram, cross, lam: torch.Tensor, own: torch.Tensor, k: int, r: int, picker: _Picker, tol: float):
    """Single-column groups. ``C_r`` is never formed: the factor ``F`` (d x s) and the whitened targets
    ``U`` (s x m) represent it as ``C - F U``, and only the squared row norms of ``C_r`` are updated,
    so a step reads C once (``C u``), F once and U once: O(d (s + m)) with s kept so far."""
    d, m = cross.shape
    dtype, device = cross.dtype, cross.device
    tiny = torch.finfo(dtype).tiny
    own = own.clamp_min(tiny)  # undamped: a dead column stays dead under the ridge
    resid = gram.diagonal().clone()  # residual variances G_r[j, j] of the damped problem
    norms = cross.square().sum(1)  # ||C_r[j]||^2
    # Row t of ``factor_t`` is the t-th factor column, so that ``factor_t[:s]`` is contiguous.
    factor_t = torch.zeros(k, d, dtype=dtype, device=device)
    whitened = torch.zeros(k, m, dtype=dtype, device=device)
    kept, gains, dependent, s = [], torch.zeros(k, dtype=dtype), 0, 0
    for step in range(k):
        live = resid - lam > tol * own
        gain = torch.where(live, norms.clamp_min(0) / resid.clamp_min(tiny), torch.zeros_like(norms))
        j = picker.pick(gain)
        kept.append(j)
        if not bool(live[j]):
            dependent += 1  # in the span of the kept columns (or dead): contributes nothing
            continue
        pivot = resid[j].sqrt()
        f_j = factor_t[:s, j]
        u = (cross[j] - f_j @ whitened[:s]) / pivot
        # One pass over F for both F f_j (the new factor column) and F (U u) (for C_r u). Written as
        # (2 x s) @ (s x d): the (d x s) @ (s x 2) form is ~40x slower in CPU BLAS.
        both = torch.stack([f_j, whitened[:s] @ u]) @ factor_t[:s]
        q = (gram[j] - both[0]) / pivot
        c_r_u = cross @ u - both[1]
        u_sq = u.dot(u)
        norms += q * (q * u_sq - 2 * c_r_u)
        resid -= q.square()
        factor_t[s], whitened[s] = q, u
        gains[step] = u_sq
        s += 1
    return kept, gains, dependent


def _greedy_groups(gram, cross, lam: torch.Tensor, own: torch.Tensor, k: int, r: int, picker: _Picker, tol: float):
    """Groups of r columns (heads): keeps ``C_r`` and the residual diagonal blocks, updated by rank-r
    products; a group's gain needs its block's Cholesky factor (batched over groups)."""
    d, m = cross.shape
    dtype, device = cross.dtype, cross.device
    ng = d // r
    c_r = cross.clone()
    blocks = gram.view(ng, r, ng, r).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()  # ng x r x r
    own = own.view(ng, r).sum(-1).clamp_min(torch.finfo(dtype).tiny)  # undamped
    lam_groups = lam.view(ng, r).sum(-1)
    eye_r = torch.eye(r, dtype=dtype, device=device)
    factor = torch.zeros(d, k * r, dtype=dtype, device=device)
    kept, gains, dependent, used = [], torch.zeros(k, dtype=dtype), 0, 0
    for step in range(k):
        live = blocks.diagonal(dim1=-2, dim2=-1).sum(-1) - lam_groups > tol * own
        # Picked and dependent blocks are masked; factor identities there instead.
        chol = _jittered_cholesky(torch.where((live & picker.available)[:, None, None], blocks, eye_r))
        gain = torch.linalg.solve_triangular(chol, c_r.view(ng, r, m), upper=False).square().sum((-2, -1))
        g = picker.pick(torch.where(live, gain, torch.zeros_like(gain)))
        kept.append(g)
        if not bool(live[g]):
            dependent += 1
            continue
        gains[step] = gain[g].cpu()
        rows = slice(g * r, (g + 1) * r)
        # New factor columns: the group's residual gram columns, whitened by its block's Cholesky factor.
        v = gram[rows].T.clone()  # d x r (rows of a symmetric matrix: contiguous reads)
        v -= factor[:, :used] @ factor[rows, :used].T
        l_g = _jittered_cholesky(blocks[g])
        q = torch.linalg.solve_triangular(l_g, v.T, upper=False).T  # q q^T = the projected gram
        u = torch.linalg.solve_triangular(l_g, c_r[rows], upper=False)  # r x m
        factor[:, used : used + r] = q
        used += r
        c_r.addmm_(q, u, alpha=-1)
        qg = q.reshape(ng, r, r)
        blocks -= qg @ qg.transpose(-1, -2)
    return kept, gains, dependent


@torch.no_grad()
def greedy_select(
    stats: SiteStatistics,
    k: int | None,
    group_size: int = 1,
    groups: Sequence[Sequence[int]] | torch.Tensor | None = None,
    *,
    damping: float = 1e-3,
    bias_shift: bool = True,
    partition: Sequence[int] | torch.Tensor | None = None,
    per_class: int | None = None,
    prior: torch.Tensor | None = None,
    shrinkage: float = 0.0,
    dtype: torch.dtype | None = None,
    tie_rtol: float = TIE_RTOL,
    site: str = "site",
) -> Selection:
    """Greedy forward selection of ``k`` groups of input columns, then the least-squares refit.

    Each step adds the group with the largest gain ``||L_g^{-1} C_r[g]||_F^2``, where ``C_r`` is the cross
    term with the kept groups projected out and ``L_g L_g^T`` the group's residual gram block; then it
    extends a Cholesky-like factor ``F`` (d x kept columns) by the new group and updates ``C_r`` and the
    residual diagonal blocks by rank-r products. Nothing is re-solved from scratch and no Python loop runs
    over d: with groups of r columns a step costs O(d (|S| r + m r)), so k steps cost O(k d (k r + m) r)
    (O(k d (k + m)) for single neurons), plus O(|S|^3) once for the refit.

    The problem is damped by ``lambda = damping * mean(diag G)`` (the same ridge that the refit uses), so
    the error curve and the returned weights are consistent. Groups whose residual variance is negligible
    (in the span of the kept ones, or dead) get zero gain and are only picked once nothing else is left;
    such picks are counted in ``diagnostics["dependent_picks"]``.

    Args:
        stats: the site's statistics.
        k: number of groups to keep (``None`` with a quota: ``per_class`` times the number of classes).
        group_size: columns per group when groups are contiguous blocks.
        groups: explicit index sets (all of equal size) instead of contiguous blocks.
        damping: relative ridge on the gram diagonal.
        prior: the consumer's original weight (m x d): damp towards it instead of towards zero.
        shrinkage: shrink the input correlations towards zero (a ridge of ``shrinkage * G_jj`` on column j,
            see ``_problem``).
        bias_shift: fit an intercept (returned as ``bias_shift``) by centring the statistics.
        partition: class of each group (e.g. its kv head); with ``per_class`` keeps exactly that many
            groups in every class (grouped-query attention stays valid).
        dtype: dtype to solve in (default: the statistics' dtype; float32 and float64 both work).
        tie_rtol: gains within this relative margin of the step's best tie; the lowest index wins (``TIE_RTOL``).
        site: name used in error messages.
    """
    stats.check_finite(site)
    dtype = dtype or stats.gram.dtype
    prob = _problem(stats, bias_shift, dtype, damping, prior, shrinkage)
    gram, cross, target_sq = prob.gram, prob.cross, prob.target_sq
    d, m = cross.shape
    layout = GroupLayout.build(d, group_size, groups)
    k, partition = check_budget(k, layout, partition, per_class)
    device = gram.device
    r, ng = layout.group_size, layout.num_groups
    cols = layout.columns.to(device)

    # Work in group-contiguous order: row p of every state tensor is column order[p].
    order = cols.flatten()
    identity = bool(torch.equal(order, torch.arange(d, device=device)))
    gram_p = gram if identity else gram.index_select(0, order).index_select(1, order)
    cross_p = cross if identity else cross.index_select(0, order)
    own = prob.own if identity else prob.own[order]
    lam = prob.lam if identity else prob.lam[order]
    picker = _Picker(ng, partition, per_class, device, tie_rtol)
    run = _greedy_neurons if r == 1 else _greedy_groups
    kept, gains, dependent_picks = run(gram_p, cross_p, lam, own, k, r, picker, _dependence_tol(dtype))

    curve = target_sq - torch.cumsum(gains, 0)
    kept_columns = layout.kept_columns(kept)
    weight, shift, error, diag = refit(stats, kept_columns, damping=damping, bias_shift=bias_shift, prior=prior,
                                       shrinkage=shrinkage, dtype=dtype, site=site)
    diag.update(dependent_picks=dependent_picks, rank=len(kept) - dependent_picks)
    return Selection(
        kept=kept,
        kept_columns=kept_columns,
        weight=weight,
        bias_shift=shift,
        curve=curve,
        target_sq=float(prob.stats.target_sq),
        error=error,
        diagnostics=diag,
    )


def reconstruction_error(
    stats: SiteStatistics,
    kept_columns: torch.Tensor,
    weight: torch.Tensor,
    bias_shift: torch.Tensor | None = None,
) -> float:
    """``sum_t ||y_t - W' b_{t,S} - c||^2`` of given weights, from the statistics alone (undamped).

    Lets every method, refitted or not, be scored on the same footing in the report.
    """
    dt = stats.gram.dtype
    cols = torch.as_tensor(kept_columns, dtype=torch.long, device=stats.gram.device)
    w = weight.to(device=stats.gram.device, dtype=dt)
    c = torch.zeros(w.shape[0], dtype=dt, device=w.device) if bias_shift is None else bias_shift.to(w)
    g_ss = stats.gram[cols][:, cols]
    err = (
        stats.target_sq
        - 2 * (w.T * stats.cross[cols]).sum()
        + (w @ g_ss * w).sum()
        - 2 * c @ stats.target_sum
        + 2 * c @ (w @ stats.input_sum[cols])
        + stats.count * c.square().sum()
    )
    return float(err)
