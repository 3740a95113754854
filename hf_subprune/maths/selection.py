"""Greedy submodular channel selection with a least-squares refit of the next layer.

Pure tensor code (no transformers import): everything here works on one *site*'s summed statistics
(DESIGN.md s.1-2), so it can be tested on random matrices and runs the same on CPU and CUDA.

Notation: the consumer layer has weight ``W`` (m x d, ``nn.Linear`` layout). Over the calibration tokens,
``b_t`` is its input in the model pruned so far and ``y_t`` the output it should reproduce. We keep a set
S of *groups* of input columns (neurons, or ``head_dim`` columns per head) and new weights ``W'`` so that
``sum_t ||y_t - W' b_{t,S} - c||^2`` is small.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Callable, Iterator, Sequence

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
    "check_budget",
]


class NonFiniteStatisticsError(ValueError):
    """Raised when a site's statistics hold NaN or Inf (usually an overflowing half-precision forward)."""


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


STATISTICS_PANEL = 512
"""Rows of a d x d matrix that one step of a panel loop (``SiteStatistics.update``, ``sub_matrix``) handles."""

GRAM_PANEL = 256
"""Rows of the gram that one product of ``SiteStatistics.update`` adds: from the diagonal on, so that the upper
triangle costs (1 + GRAM_PANEL / d) / 2 of the full product (0.58 at d = 1536). One core, 2048 tokens, the whole
update against the full products: 1.2-1.3x faster at d = 1536 and 5632, level at d = 576."""


def sub_matrix(matrix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """``matrix[rows][:, cols]`` (``cols`` default: ``rows``), gathered a panel of rows at a time so that the only
    temporary is one panel's full rows, not all of them (``matrix[rows]`` is |rows| x d)."""
    cols = rows if cols is None else cols
    out = matrix.new_empty(rows.numel(), cols.numel())
    for lo in range(0, rows.numel(), STATISTICS_PANEL):
        out[lo : lo + STATISTICS_PANEL] = matrix.index_select(0, rows[lo : lo + STATISTICS_PANEL]).index_select(1, cols)
    return out


@contextmanager
def _exact_float32_matmul() -> Iterator[None]:
    """Full-precision float32 products for the duration. A caller's ``torch.set_float32_matmul_precision("high")``
    (TF32 on a GPU, a 10-bit mantissa) or ``"medium"`` (bfloat16 products, on a CPU with AMX too) would put
    errors of 1e-3 of the largest entry into the statistics and the greedy's gains, which rank channels by
    differences far smaller than that."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


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
        # By panels of rows, added in place: the only temporary is one panel of the product, never a d x d one in
        # the products' dtype and another in the accumulators' (0.4 GB at d = 5632). The gram is symmetric: each
        # panel multiplies only from its diagonal on (about half the products at GRAM_PANEL << d), and the lower
        # triangle, diagonal panels' included, is copied from the upper one: exactly symmetric, whatever the rounding.
        d = self.gram.shape[0]
        with _exact_float32_matmul():
            for lo in range(0, d, STATISTICS_PANEL):
                self.cross[lo : lo + STATISTICS_PANEL] += wb[:, lo : lo + STATISTICS_PANEL].T @ y
            for lo in range(0, d, GRAM_PANEL):
                self.gram[lo : lo + GRAM_PANEL, lo:] += wb[:, lo : lo + GRAM_PANEL].T @ b[:, lo:]
        for lo in range(0, d, GRAM_PANEL):
            self.gram[lo : lo + GRAM_PANEL, :lo] = self.gram[:lo, lo : lo + GRAM_PANEL].T
            diagonal = self.gram[lo : lo + GRAM_PANEL, lo : lo + GRAM_PANEL]
            diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
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
            t = getattr(self, f.name)
            # A sum is finite when every term is (one pass, no mask); only an overflowing sum needs a closer look.
            if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
                raise NonFiniteStatisticsError(
                    f"{site}: the calibration statistics ({f.name}) contain NaN or Inf. The forward pass "
                    "overflowed or the model weights are broken: run in float32 (--dtype float32) or check "
                    "the model with a plain forward first."
                )

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(G, C, s)`` about the token means: the least-squares problem with a free intercept."""
        n = self.count.clamp_min(1)
        mb, my = self.input_sum / n, self.target_sum / n
        gram = torch.addr(self.gram, mb, mb, alpha=-float(n))
        cross = torch.addr(self.cross, mb, my, alpha=-float(n))
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
        curve: reconstruction error (damped objective) of the first t picks, for t = 1..k, from the refit's
            factor in pick order; empty for baselines.
        target_sq: ``sum_t ||y_t||^2``, so that ``curve / target_sq`` is the relative error.
        error: reconstruction error of the returned weights (damped objective), when a refit was done.
        undamped_error: the same without the ridge's terms (what ``reconstruction_error`` gives for these
            weights), from the refit's own terms; ``None`` where it is not known.
        diagnostics: rank and conditioning figures, and the dtype the picks were solved in and why
            (see ``greedy_select``).
    """

    kept: list[int]
    kept_columns: torch.Tensor
    weight: torch.Tensor | None
    bias_shift: torch.Tensor
    curve: torch.Tensor
    target_sq: float
    error: float | None = None
    diagnostics: dict = field(default_factory=dict)
    undamped_error: float | None = None

    @property
    def relative_curve(self) -> torch.Tensor:
        return self.curve / max(self.target_sq, 1e-30)


# --------------------------------------------------------------------------------------------------
# Solves
# --------------------------------------------------------------------------------------------------


def _dependence_tol(dtype: torch.dtype) -> float:
    """Residual variance (relative to the column's own) below which a column counts as dependent."""
    return 1e-9 if dtype == torch.float64 else 1e-5


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
    """The damped (and, for the intercept, centred) least-squares problem of a site.

    The d x d gram is not stored: the greedy writes ``G + diag(lambda)`` straight into its own state
    (``gram_into``) and a fit takes the kept columns' block (``sub_gram``), both from the raw statistics, centred
    and damped in the statistics' dtype there. At an MLP site of a 1B model (d = 5632) each d x d float64 copy is
    254 MB, and the greedy's state is one such matrix already.
    """

    stats: SiteStatistics  # in the exact dtype (the statistics' dtype, at least the solve's)
    mean: torch.Tensor | None  # the inputs' token mean (centred problem), in the exact dtype
    cross: torch.Tensor  # C (+ diag(lambda) W^T with a prior), in the solve dtype
    target_sq: float  # s (+ sum_j lambda_j ||W_j||^2 with a prior)
    own: torch.Tensor  # undamped diagonal of G, to tell dead or dependent columns, in the solve dtype
    lam_exact: torch.Tensor  # per-column ridge lambda_j (d) in the exact dtype, where the gram is damped
    prior: torch.Tensor | None = None  # the m x d weight the ridge pulls towards (None: zero), as given
    prior_sq: torch.Tensor | None = None  # ||P_j||^2 of its columns (d), in the exact dtype

    def to(self, dtype: torch.dtype) -> "_Problem":
        """The same problem for a solve in ``dtype``. Centring and ridge are done in the exact dtype before any
        cast, so a float32 gram only rounds each damped entry (by 6e-8 of it): a perturbation of the order of 6e-8
        of the largest variance, well below a ridge of more than ~1e-5 of the diagonal, which bounds how far the
        residual variances of the greedy can move. ``greedy_select`` checks the outcome rather than assume it."""
        if dtype == self.cross.dtype:
            return self
        return _Problem(self.stats, self.mean, self.cross.to(dtype), self.target_sq, self.own.to(dtype),
                        self.lam_exact, self.prior, self.prior_sq)

    @property
    def lam(self) -> torch.Tensor:
        """The ridge in the solve dtype."""
        return self.lam_exact.to(self.cross.dtype)

    @property
    def dim(self) -> int:
        return self.stats.in_features

    @property
    def device(self) -> torch.device:
        return self.stats.gram.device

    def gram_into(self, out: torch.Tensor, panel: int = 256) -> torch.Tensor:
        """Write ``G + diag(lambda)`` into ``out`` (d x d, any float dtype), a panel of rows at a time centred and
        damped in the exact dtype, so that the only temporary is one panel."""
        gram, d = self.stats.gram, self.dim
        n = float(self.stats.count.clamp_min(1))
        for lo in range(0, d, panel):
            hi = min(d, lo + panel)
            rows = gram[lo:hi].clone() if self.mean is None else torch.addr(gram[lo:hi], self.mean[lo:hi],
                                                                            self.mean, alpha=-n)
            rows[:, lo:hi].diagonal().add_(self.lam_exact[lo:hi])
            out[lo:hi].copy_(rows)
        return out

    def gram(self, dtype: torch.dtype) -> torch.Tensor:
        """``G + diag(lambda)`` as a new d x d tensor in ``dtype``."""
        return self.gram_into(torch.empty(self.dim, self.dim, dtype=dtype, device=self.device))

    def sub_gram(self, cols: torch.Tensor) -> torch.Tensor:
        """``G_SS + diag(lambda_S)`` of the columns ``cols`` (in their order), in the exact dtype."""
        block = sub_matrix(self.stats.gram, cols)
        if self.mean is not None:
            m = self.mean[cols]
            block.addr_(m, m, alpha=-float(self.stats.count.clamp_min(1)))
        block.diagonal().add_(self.lam_exact[cols])
        return block


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

    Centring subtracts ``n mean mean^T`` from the raw sums, which cancels badly where the means are large: it is
    done in the wider of the statistics' dtype and ``dtype`` (the gram's entries as they are needed, see
    ``_Problem``), and only the damped result is cast to ``dtype``.
    """
    stats = stats.to(dtype=torch.promote_types(stats.gram.dtype, dtype))
    n = stats.count.clamp_min(1)
    if bias_shift:
        mean, my = stats.input_sum / n, stats.target_sum / n
        own = stats.gram.diagonal() - n * mean.square()
        cross = torch.addr(stats.cross, mean, my, alpha=-float(n))
        target_sq = stats.target_sq - n * my.square().sum()
    else:
        mean, own = None, stats.gram.diagonal().clone()
        cross, target_sq = stats.cross, stats.target_sq
    lam = float(damping * own.mean().clamp_min(0)) if own.numel() else 0.0
    lam = lam + shrinkage * own.clamp_min(0)
    prior_sq = None
    if prior is None or not bool((lam > 0).any()):
        prior = None
    else:
        # On the centred copy (a d x m term: 44 MB in float32 at d = 5632, m = 2048), never on the stats; the prior
        # (a bfloat16 model's own weight, say) in the exact dtype a panel of columns at a time, never whole.
        cross = cross if bias_shift else cross.clone()
        prior_sq = lam.new_empty(lam.shape)
        for lo in range(0, prior.shape[1], STATISTICS_PANEL):
            hi = lo + STATISTICS_PANEL
            w = prior[:, lo:hi].to(cross)
            cross[lo:hi].addcmul_(lam[lo:hi, None], w.T)
            prior_sq[lo:hi] = torch.linalg.vector_norm(w, dim=0).square()
        target_sq = target_sq + lam @ prior_sq
    return _Problem(stats, mean, cross, float(target_sq), own, lam, prior, prior_sq).to(dtype)


def auto_shrinkage(stats: SiteStatistics) -> float:
    """The default correlation shrinkage of a site: ``max(1, d / tokens)``. At least 1: a dropped channel costs
    its own energy as much as the correlations say it can be rebuilt, which keeps the cut sound on text unlike
    the calibration; more when there are fewer tokens than input columns and the sample covariance is singular."""
    return max(1.0, stats.in_features / max(float(stats.tokens), 1.0))


@dataclass
class _Fit:
    """The least-squares weights of a column set, and what their Cholesky factor tells on the way."""

    weight: torch.Tensor  # m x |S|, columns ascending
    bias_shift: torch.Tensor  # m
    error: float  # damped objective at the optimum
    step_gains: torch.Tensor  # error drop of each column, in the order given (float64, CPU)
    diagnostics: dict
    undamped_error: float | None = None  # the error without the ridge's terms (None where a jitter was added)


def _ridge_terms(prob: _Problem, weight: torch.Tensor, cols: torch.Tensor) -> float:
    """What the ridge adds to the damped objective at ``weight`` (m x |S|, for the columns ``cols``):
    ``sum_{j in S} lambda_j ||W_j - P_j||^2 + sum_{j not in S} lambda_j ||P_j||^2``, P the prior (or zero).

    At the optimum the damped objective is ``target_sq - sum(gains)``, known from the fit, so subtracting these
    gives the undamped error in O(m d) instead of the O(m |S|^2) of ``reconstruction_error``.
    """
    lam = prob.lam_exact.to(weight)
    if prob.prior is None:
        return float(lam[cols] @ weight.square().sum(0))
    own = prob.prior_sq.to(weight)
    total = float(lam @ own)
    for lo in range(0, cols.numel(), STATISTICS_PANEL):
        part = cols[lo : lo + STATISTICS_PANEL]
        prior = prob.prior.index_select(1, part.to(prob.prior.device)).to(weight)
        moved = (weight[:, lo : lo + STATISTICS_PANEL] - prior).square().sum(0)
        total += float(lam[part] @ (moved - own[part]))
    return total


def _fit(prob: _Problem, cols: torch.Tensor, bias_shift: bool) -> _Fit:
    """Solve ``W'^T = (G_SS + lambda)^{-1} C_S`` for the columns ``cols`` taken in the order given.

    ``G_SS = L L^T`` and ``U = L^{-1} C_S``: row t of U holds what column t adds to the fit once the columns
    before it are in, so in the greedy's pick order the rows' squared norms are its error curve, computed
    afresh from the statistics rather than carried through the greedy's updates.
    """
    stats, cross, target_sq = prob.stats, prob.cross, prob.target_sq
    m = cross.shape[1]
    n, target_sum = stats.count.clamp_min(1).to(cross), stats.target_sum.to(cross)
    if cols.numel() == 0:
        shift = target_sum / n if bias_shift else cross.new_zeros(m)
        empty = cross.new_zeros(m, 0)
        return _Fit(empty, shift, target_sq, torch.zeros(0, dtype=torch.float64), {"rank": 0},
                    target_sq - _ridge_terms(prob, empty, cols))
    # Factorised in place (one |S| x |S| matrix, 0.16 GB in float64 at |S| = 4500); a failure, where a jitter is
    # needed, rebuilds it.
    factor = prob.sub_gram(cols).to(cross.dtype)
    info = torch.empty((), dtype=torch.int32, device=factor.device)
    torch.linalg.cholesky_ex(factor, out=(factor, info))
    jittered = bool(int(info))
    if jittered:
        factor = _jittered_cholesky(prob.sub_gram(cols).to(cross.dtype))
    # Right-hand solves on the m x |S| transposes (the same products, about twice as fast in CPU LAPACK), both in
    # place in one buffer, gathered from C's transpose without an |S| x m copy: U^T, then the weights. Once the
    # greedy's state was packed, this phase (the factor beside three m x |S| tensors) set a 1.2B model's peak.
    weight = torch.index_select(cross.T, 1, cols)  # C_S^T, in cols' order
    torch.linalg.solve_triangular(factor.T, weight, upper=True, left=False, out=weight)  # U^T
    step_gains = weight.square().sum(0).to(device="cpu", dtype=torch.float64)
    torch.linalg.solve_triangular(factor, weight, upper=False, left=False, out=weight)  # m x |S|, cols' order
    pivots = factor.diagonal().square()
    del factor
    ascending = torch.argsort(cols)
    weight, cols = weight[:, ascending], cols[ascending]
    error = target_sq - float(step_gains.sum())
    if bias_shift:
        shift = target_sum / n - weight @ (stats.input_sum[cols].to(cross) / n)
    else:
        shift = cross.new_zeros(m)
    diagnostics = {
        "damping": float(prob.lam.mean()),
        "condition_estimate": float(pivots.max() / pivots.min().clamp_min(torch.finfo(pivots.dtype).tiny)),
    }
    undamped = None if jittered else error - _ridge_terms(prob, weight, cols)
    return _Fit(weight, shift, error, step_gains, diagnostics, undamped)


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
        ``(weight m x |S|, bias_shift m, error, diagnostics)`` in ``dtype`` (default: the statistics' dtype);
        ``error`` is the reconstruction error of the returned weights without the ridge (as
        ``reconstruction_error`` gives it).
    """
    stats.check_finite(site)
    prob = _problem(stats, bias_shift, dtype or stats.gram.dtype, damping, prior, shrinkage)
    cols = torch.as_tensor(kept_columns, dtype=torch.long, device=prob.device).sort().values
    fit = _fit(prob, cols, bias_shift)
    error = fit.undamped_error
    if error is None:
        error = reconstruction_error(stats, cols, fit.weight, fit.bias_shift)
    return fit.weight, fit.bias_shift, error, fit.diagnostics


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

FLOAT32_ERROR_SHARE = 1e-3
"""A float32 greedy is kept when what its rounding can have cost is at most this share of the site's error:
twice the summed absolute error of its live picks' gains (against the gains the refit computes for them in the
statistics' dtype), the most that ranking by off gains can lose at each step (the pick's and the best
candidate's gains each off by about as much). A greedy whose step gains are off by ``delta_t`` keeps its
guarantee up to ``sum_t delta_t``, so the float32 picks are as good as float64's up to 0.1% of the error.

Why not a per-pick relative margin (the earlier rule, ``TIE_RTOL``): the late gains are small differences of
large sums and float32 resolves them to ~1e-4 of themselves. On bench_scale's 0.1B random-weight model every MLP
site failed that rule (worst errors 1.1e-4 to 2.0e-4) and was solved again in float64, which kept the very same
columns at every site; this rule puts those sites at 1.6e-4 to 4.2e-4 of their error. On SmolLM2 at 50% (32 x 512
WikiText-2 tokens) 5 of the 45 sites the float32 greedy now decides had failed it, and all 45 keep float64's set."""

FLOAT32_GAIN_FLOOR = 1e-6
"""Gains below this fraction of the largest gain are left out of the relative error the diagnostics report:
float32 resolves them only to ~1e-7 of the largest."""

GREEDY_BLOCK = 128
"""Single-column greedy steps between two block updates of its residual matrices (see ``_greedy_neurons``). One
core, keeping 80%: level with 32 and 64 up to d = 2816; at d = 5632, 8% faster than 64 in float32 (4.9 s against
5.3 s) and 15% in float64; 192 is slower below d = 5632."""

GREEDY_WORKSPACE = 32
"""The greedy allocates its per-block buffers once, at the largest block's size, and moves picked rows and
columns out of the span this many at a time. Its temporaries then keep their sizes, where buffers that shrank
with the span (up to 16 MB at d = 5632) left about 100 MB of freed heap resident at a 1.2B model's MLP site
(glibc serves tensors below 32 MB from its heap and keeps what they fragment)."""

GREEDY_COMPACT = 16
"""The single-column greedy moves its picks out of the block updates once they are this fraction (1 / n) of the
rows and columns updated: moving them costs strided column copies, carrying them costs wasted products."""


class _Picker:
    """Which group a greedy step takes: among the live candidates whose gain is within ``rtol`` (relative)
    of the best, the lowest index; within quotas. ``take`` stays on the device (a 0-dim index, no host sync),
    so a GPU greedy queues its steps without waiting for each pick."""

    def __init__(self, num_groups: int, partition: torch.Tensor | None, per_class: int | None, device,
                 rtol: float = TIE_RTOL) -> None:
        self.available = torch.ones(num_groups, dtype=torch.bool, device=device)
        self.partition = partition.to(device) if partition is not None else None
        self.per_class = per_class
        self.rtol = rtol
        self.counts = (torch.zeros(int(partition.max()) + 1, dtype=torch.long, device=device)
                       if partition is not None else None)

    def take(self, gain: torch.Tensor) -> torch.Tensor:
        """The pick for gains ``>= 0`` (``-1`` masks the others), as a 0-dim long tensor on the gains' device."""
        candidates = self.available
        if self.partition is not None:
            candidates = candidates & (self.counts.index_select(0, self.partition) < self.per_class)
        masked = torch.where(candidates, gain, -1.0)
        best = masked.max()
        near = candidates & (masked >= best - self.rtol * best.abs())
        g = torch.argmax(near.view(torch.uint8))  # the first (lowest-index) near-best candidate
        self.available.index_fill_(0, g.view(1), False)
        if self.partition is not None:
            self.counts.index_add_(0, self.partition.index_select(0, g.view(1)), torch.ones_like(g).view(1))
        return g

    def pick(self, gain: torch.Tensor) -> int:
        return int(self.take(gain))


@dataclass
class _Run:
    """One greedy pass: picks, the gain each pick was taken with, whether it was live, and how many groups
    this dtype found dependent although they are not dead (nothing to tell apart in float64)."""

    kept: list[int]
    gains: torch.Tensor  # k, float64 on CPU
    live: torch.Tensor  # k, bool on CPU
    undecided: int


PACKED_PANELS = 8
"""Panels of rows of the greedy's packed block updates (``_greedy_neurons``): each panel updates its part left of
the diagonal (G) or right of it (H) in one product, and its diagonal block through a small tile."""


def _bounds(n: int, panels: int = PACKED_PANELS) -> list[tuple[int, int]]:
    edges = [round(i * n / panels) for i in range(panels + 1)]
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def _product_above(x: torch.Tensor, out: torch.Tensor, tile: torch.Tensor) -> torch.Tensor:
    """Write the strictly upper triangle of ``x x^T`` into ``out``, leaving its lower triangle as it is; returns the
    diagonal. Each panel of columns against the rows before it: half the products of one matmul."""
    n = x.shape[0]
    diag = x.new_empty(n)
    for lo, hi in _bounds(n):
        if lo:
            torch.mm(x[:lo], x[lo:hi].T, out=out[:lo, lo:hi])
        t = tile[: (hi - lo) ** 2].view(hi - lo, hi - lo)
        torch.mm(x[lo:hi], x[lo:hi].T, out=t)
        diag[lo:hi] = t.diagonal()
        block = out[lo:hi, lo:hi]
        above = torch.ones(hi - lo, hi - lo, dtype=torch.bool, device=x.device).triu_(1)
        block.copy_(torch.where(above, t, block))
    return diag


def _greedy_neurons(gram_into: Callable[[torch.Tensor], object], cross, lam: torch.Tensor, own: torch.Tensor, k: int,
                    picker: _Picker, tol: float) -> _Run:
    """Single-column groups, right-looking and blocked.

    The state is the residual gram ``G_r = G - F F^T`` and ``H_r = C_r C_r^T`` (``C_r = C - F U``, the cross
    term with the kept columns projected out), both d x d and symmetric, packed into one d x d matrix: ``G_r``
    below the diagonal, ``H_r`` above it, their diagonals beside it (at d = 5632 in float32, 127 MB instead of
    254 MB). Picking column j with pivot ``p^2 = G_r[j, j]`` gives the new factor column ``q = G_r[:, j] / p``
    and ``C_r u = H_r[:, j] / p``, which update the residual variances (``-q^2``) and ``||C_r[i]||^2``
    (``-q (2 C_r u - q ||u||^2)``), so a step reads one row and one column of the packed matrix (both halves of
    both) instead of C (d x m) and F (d x s). They are read as of the last block update and brought up to date by
    the (at most ``GREEDY_BLOCK``) picks since, whose ``q`` and ``C_r u`` are kept; every block ends with one
    rank-block update of the rows and columns still in play, each triangle by panels (``PACKED_PANELS``: about
    two thirds of the time of updating two full matrices at d = 5632; a strided column read costs 0.1 ms a step).
    Picks are moved out of the span once they are ``1 / GREEDY_COMPACT`` of it (at d = 5632 keeping 78%, a third
    fewer products than updating whole rows). Steps make no host sync; a block makes one, to track the picks.
    ``gram_into`` writes the damped gram into the state, which is then the only d x d copy of it.
    """
    d, m = cross.shape
    dtype, device = cross.dtype, cross.device
    own = own.clamp_min(0)  # undamped: a dead column stays dead under the ridge
    tile_side = -(-d // PACKED_PANELS) + 1
    tile = torch.empty(tile_side * tile_side, dtype=dtype, device=device)  # a panel's diagonal block
    packed = torch.empty(d, d, dtype=dtype, device=device)  # G_r below, H_r above; rows and columns permuted (``at``)
    gram_into(packed)
    diags = torch.stack([packed.diagonal().clone(), _product_above(cross, packed, tile)])  # [G_r; H_r] diagonals
    excess = own.clone()  # residual variance beyond the ridge: G_r[j, j] - lambda_j, without the cancellation
    norms = cross.square().sum(1)  # ||C_r[j]||^2
    threshold = tol * own
    zero = torch.zeros((), dtype=dtype, device=device)
    kept = torch.zeros(k, dtype=torch.long, device=device)
    gains = torch.zeros(k, dtype=dtype, device=device)
    live_picks = torch.zeros(k, dtype=torch.bool, device=device)
    order = list(range(d))  # order[p]: the column at position p; the first ``span`` are kept up to date
    at = torch.arange(d, device=device)  # at[c]: the position of column c's row
    positions = torch.arange(d, device=device)
    span, dead = d, []  # ``dead``: positions in the span that were picked
    # Buffers of the largest block, reused by every block (``GREEDY_WORKSPACE``).
    recent_all = torch.empty(2 * GREEDY_BLOCK, d, dtype=dtype, device=device)  # rows 2i, 2i+1: q, C_r u of pick i
    work = torch.empty(4 * GREEDY_BLOCK * d, dtype=dtype, device=device)  # the block update's operands
    for start in range(0, k, GREEDY_BLOCK):
        b = min(GREEDY_BLOCK, k - start)
        recent = recent_all[: 2 * b]  # a step reads only the rows of the picks before it
        coef = torch.zeros(2, b, 2, dtype=dtype, device=device)
        usq = gains[start : start + b]  # ||u||^2 of each pick: its gain
        for i in range(b):
            step = start + i
            resid = excess + lam
            live = excess > threshold
            j = picker.take(torch.where(live, norms / resid, zero).clamp_min_(0))
            jj = j.view(1)
            live_j = live.index_select(0, jj)
            scale = torch.where(live_j, resid.index_select(0, jj).rsqrt(), zero)  # 1 / p; 0 adds nothing
            # The picked column's rows of G_r and H_r, back in column order (positions from ``span`` on are stale).
            a = at.index_select(0, jj)
            row = torch.cat(_packed_rows(packed, a, d, positions))
            row.index_copy_(1, a, diags.index_select(1, a))
            row = row.index_select(1, at)
            if i:
                # G_r[j] -= sum_l q_l q_l[j];  H_r[j] -= sum_l q_l (c_l[j] - |u_l|^2 q_l[j]) + c_l q_l[j]
                col = recent[: 2 * i].index_select(1, jj).view(i, 2)  # (q_l[j], c_l[j])
                coef[0, :i, 0] = col[:, 0]
                coef[1, :i] = col.flip(1)
                coef[1, :i, 0].addcmul_(usq[:i], col[:, 0], value=-1)
                row = row - coef[:, :i].reshape(2, 2 * i) @ recent[: 2 * i]
            new = recent[2 * i : 2 * i + 2]
            torch.mul(row, scale, out=new)
            q, c_r_u = new[0], new[1]
            torch.mul(c_r_u.index_select(0, jj), scale, out=usq[i : i + 1])
            norms.addcmul_(q, (q * usq[i]).add_(c_r_u, alpha=-2))
            excess.addcmul_(q, q, value=-1)
            kept[step : step + 1] = jj
            live_picks[step : step + 1] = live_j
        if start + b == k:
            break
        # Picks stay in the span the block updates cover (their rows and columns are never read again) until
        # they make up ``1 / GREEDY_COMPACT`` of it; then every pick's position before the span's new end takes
        # the row and column of a candidate from after it ...
        dead += at[kept[start : start + b]].tolist()
        if len(dead) * GREEDY_COMPACT >= span:
            new_span = span - len(dead)
            holes = sorted(p for p in dead if p < new_span)
            movers = sorted(set(range(new_span, span)) - set(dead))
            if holes:
                _move_packed(packed, diags, holes, movers, span, new_span, positions)
                for h, mv in zip(holes, movers):
                    order[h] = order[mv]
                at[[order[h] for h in holes]] = torch.tensor(holes, device=device)
            span, dead = new_span, []
        # ... and bring the span up to date: G_r -= Q^T Q, H_r -= Q^T X + X^T Q, X = C - |u|^2 Q / 2.
        cols = torch.tensor(order[:span], device=device)
        qx = work[: 2 * b * span].view(2 * b, span)  # [Q; X]
        xq = work[2 * b * span : 4 * b * span].view(2 * b, span)  # [X; Q]; C first
        q_b, x_b, c_b = qx[:b], qx[b:], xq[:b]
        torch.index_select(recent[0::2], 1, cols, out=q_b)
        torch.index_select(recent[1::2], 1, cols, out=c_b)
        torch.mul(q_b, usq[:, None] / 2, out=x_b)
        torch.sub(c_b, x_b, out=x_b)
        xq[:b].copy_(x_b)
        xq[b:].copy_(q_b)
        for lo, hi in _bounds(span):
            if lo:  # G_r left of the panel's diagonal block
                packed[lo:hi, :lo].addmm_(q_b[:, lo:hi].T, q_b[:, :lo], alpha=-1)
            if hi < span:  # H_r right of it
                packed[lo:hi, hi:span].addmm_(qx[:, lo:hi].T, xq[:, hi:span], alpha=-1)
            t = tile[: (hi - lo) ** 2].view(hi - lo, hi - lo)
            torch.mm(q_b[:, lo:hi].T, q_b[:, lo:hi], out=t)
            diags[0, lo:hi] -= t.diagonal()
            packed[lo:hi, lo:hi] -= t.tril_(-1)
            torch.mm(qx[:, lo:hi].T, xq[:, lo:hi], out=t)
            diags[1, lo:hi] -= t.diagonal()
            packed[lo:hi, lo:hi] -= t.triu_(1)
    picked_dependent = torch.zeros(d, dtype=torch.bool, device=device).index_put_((kept,), ~live_picks)
    found_dependent = picked_dependent | (picker.available & (excess <= threshold))
    undecided = int((found_dependent & (own > 0)).sum())
    return _Run(kept.tolist(), gains.to(device="cpu", dtype=torch.float64), live_picks.cpu(), undecided)


def _packed_rows(packed: torch.Tensor, at: torch.Tensor, span: int, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of G_r and H_r (``len(at)`` x ``span``, in positions) of the positions ``at``, from the packed
    layout of ``_greedy_neurons``: left of a position, G_r is in its row and H_r in its column; right of it, the
    other way round. The diagonal entries are whatever the packed matrix holds there (``diags`` has them)."""
    along = packed.index_select(0, at)[:, :span]  # packed[a, p]
    across = packed[:span].index_select(1, at).T  # packed[p, a]
    before = positions[:span] < at[:, None]
    return torch.where(before, along, across), torch.where(before, across, along)


def _move_packed(packed: torch.Tensor, diags: torch.Tensor, holes: list[int], movers: list[int], span: int,
                 new_span: int, positions: torch.Tensor) -> None:
    """Give each hole (a picked position before ``new_span``) the rows and columns of G_r and H_r of its mover (a
    candidate's position from ``new_span`` to ``span``), in the packed layout of ``_greedy_neurons``: a mover's
    entries change triangle where a position lies between the hole and the mover. By chunks of
    ``GREEDY_WORKSPACE`` movers; a chunk writes only rows and columns before ``new_span`` and reads only the
    movers', so none reads what another wrote."""
    device = packed.device
    hole_t, mover_t = torch.tensor(holes, device=device), torch.tensor(movers, device=device)
    for i in range(0, len(holes), GREEDY_WORKSPACE):
        hs, ms = hole_t[i : i + GREEDY_WORKSPACE], mover_t[i : i + GREEDY_WORKSPACE]
        g_rows, h_rows = _packed_rows(packed, ms, span, positions)
        g_new, h_new = g_rows[:, :new_span].clone(), h_rows[:, :new_span].clone()
        g_new[:, hole_t], h_new[:, hole_t] = g_rows[:, mover_t], h_rows[:, mover_t]  # every mover at its hole
        left = positions[:new_span] < hs[:, None]
        packed[:, :new_span].index_copy_(0, hs, torch.where(left, g_new, h_new))
        packed[:new_span].index_copy_(1, hs, torch.where(left, h_new, g_new).T)
        diags[:, hs] = diags[:, ms]


def _greedy_groups(gram, cross, own: torch.Tensor, k: int, r: int, picker: _Picker,
                   tol: float) -> _Run:
    """Groups of r columns (heads): keeps ``C_r`` and the residual diagonal blocks, updated by rank-r
    products; a group's gain needs its block's Cholesky factor (batched over groups). A step costs
    4 d r m in matrix products (the gains' ``C_r[g] C_r[g]^T`` and the update of ``C_r``): ``k`` is a few
    dozen heads, and keeping ``C_r`` (d x m) is cheaper than building the d x d ``C C^T`` that
    ``_greedy_neurons`` reads instead."""
    d, m = cross.shape
    dtype, device = cross.dtype, cross.device
    ng = d // r
    c_r = cross.clone()
    blocks = gram.view(ng, r, ng, r).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()  # ng x r x r
    own = own.clamp_min(0).view(ng, r).sum(-1)  # undamped
    excess = own.clone()  # trace of the residual block beyond the ridge
    threshold = tol * own
    eye_r = torch.eye(r, dtype=dtype, device=device)
    factor = torch.zeros(d, k * r, dtype=dtype, device=device)
    kept, gains, live_picks, used = [], torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.bool), 0
    for step in range(k):
        live = excess > threshold
        # Picked and dependent blocks are masked; factor identities there instead.
        chol = _jittered_cholesky(torch.where((live & picker.available)[:, None, None], blocks, eye_r))
        # ||L_g^{-1} C_r[g]||^2 = tr(B_g^{-1} C_r[g] C_r[g]^T): one batched product, then r x r solves.
        c_g = c_r.view(ng, r, m)
        gain = torch.cholesky_solve(c_g @ c_g.transpose(1, 2), chol).diagonal(dim1=-2, dim2=-1).sum(-1)
        g = int(picker.take(torch.where(live, gain, torch.zeros_like(gain))))
        kept.append(g)
        if not bool(live[g]):
            continue
        live_picks[step] = True
        gains[step] = float(gain[g])
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
        excess -= qg.square().sum((-2, -1))
    picked_dependent = torch.zeros(ng, dtype=torch.bool)
    picked_dependent[kept] = ~live_picks
    found_dependent = picked_dependent.to(device) | (picker.available & (excess <= threshold))
    undecided = int((found_dependent & (own > 0)).sum())
    return _Run(kept, gains, live_picks, undecided)


def _greedy(prob: _Problem, layout: GroupLayout, k: int, partition, per_class, tie_rtol: float) -> _Run:
    """The greedy in ``prob``'s dtype, in group-contiguous order (row p of every state tensor is column
    ``order[p]``)."""
    cross, dtype, device, d = prob.cross, prob.cross.dtype, prob.device, prob.dim
    order = layout.columns.to(device).flatten()
    identity = bool(torch.equal(order, torch.arange(d, device=device)))
    cross_p = cross if identity else cross.index_select(0, order)
    own = prob.own if identity else prob.own[order]
    lam = prob.lam if identity else prob.lam[order]
    picker = _Picker(layout.num_groups, partition, per_class, device, tie_rtol)
    tol = _dependence_tol(dtype)
    with _exact_float32_matmul():
        if layout.group_size == 1 and identity:
            return _greedy_neurons(prob.gram_into, cross_p, lam, own, k, picker, tol)
        gram_p = prob.gram(dtype)
        if not identity:
            gram_p = gram_p.index_select(0, order).index_select(1, order)
        if layout.group_size == 1:
            return _greedy_neurons(lambda out: out.copy_(gram_p), cross_p, lam, own, k, picker, tol)
        return _greedy_groups(gram_p, cross_p, own, k, layout.group_size, picker, tol)


def _float32_verdict(run: _Run, fit: _Fit, r: int) -> tuple[dict, str | None]:
    """What the float32 gains' rounding measured (for the diagnostics), and why the float32 greedy cannot
    stand (``None``: it can), judged against the refit of its picks.

    - A group it found dependent that is not dead: float32 resolves a residual variance to ~1e-6 of the
      column's own, so it cannot tell a dependent group (float64's threshold is 1e-9) from a nearly dependent
      one, which float64 would still rank by its gain.
    - Twice the summed absolute error of its live picks' gains, against those the refit computes in the
      statistics' dtype from a fresh factorisation, above ``FLOAT32_ERROR_SHARE`` of the site's error: the
      rounding may have cost more than that share.
    """
    if run.undecided:
        return {}, f"{run.undecided} groups found dependent in float32 are not dead"
    if not run.kept:
        return {"float32_gain_error": 0.0, "float32_error_share": 0.0}, None
    exact = fit.step_gains.view(-1, r).sum(1)
    off = (run.gains - exact).abs()[run.live]
    total = float(off.sum())
    share = 2 * total / fit.error if fit.error > 0 else (0.0 if total == 0 else math.inf)
    large = (exact > FLOAT32_GAIN_FLOOR * float(exact.max()))[run.live]
    relative = (off / exact[run.live].clamp_min(torch.finfo(torch.float64).tiny))[large]
    measured = {"float32_gain_error": float(relative.max()) if relative.numel() else 0.0,
                "float32_error_share": share}
    if share > FLOAT32_ERROR_SHARE:
        return measured, (f"float32 gains' rounding may cost {share:.1e} of the site's error "
                          f"> {FLOAT32_ERROR_SHARE:g}")
    return measured, None


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
    extends a Cholesky-like factor by the new group and updates the residual state by rank-r products.
    Nothing is re-solved from scratch and no Python loop runs over d (see ``_greedy_neurons`` and
    ``_greedy_groups`` for the costs).

    The problem is damped by ``lambda = damping * mean(diag G)`` (the same ridge that the refit uses), so
    the error curve and the returned weights are consistent. Groups whose residual variance is negligible
    (in the span of the kept ones, or dead) get zero gain and are only picked once nothing else is left;
    such picks are counted in ``diagnostics["dependent_picks"]``.

    Precision: by default the greedy runs in float32 on the statistics' device (half the bytes of float64 and
    twice its product rate; 1.4x faster on one CPU core, with the refit), and the refit of its picks
    (one Cholesky solve) in the statistics' dtype, centred and damped there before any cast. The refit's
    factor, taken in pick order, gives every step's exact gain, hence ``curve``; the float32 greedy stands if
    ``_float32_verdict`` finds nothing (what rounding can have cost is at most ``FLOAT32_ERROR_SHARE`` of the
    site's error), otherwise the site is solved again in float64. Sites keeping at least
    as many columns as there are tokens without shrinkage (a gram singular up to the small damping at the end)
    go to float64 at once; with shrinkage the ridge holds every column's own energy and float32 resolves the
    late steps as well (the pipeline's default shrinkage ``max(1, d / tokens)``: at a 1B model's MLP, d = 5632,
    from 2048 tokens, the greedy's packed d x d state takes 127 MB instead of 254).
    ``diagnostics["solve_dtype"]`` says which dtype the greedy's picks come from and
    ``diagnostics["solve_dtype_reason"]`` why.

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
        dtype: solve greedy and refit in this dtype, unchecked (default: the automatic choice above).
        tie_rtol: gains within this relative margin of the step's best tie; the lowest index wins (``TIE_RTOL``).
        site: name used in error messages.
    """
    stats.check_finite(site)
    exact = dtype or torch.promote_types(stats.gram.dtype, torch.float32)
    prob = _problem(stats, bias_shift, exact, damping, prior, shrinkage)
    d = prob.dim
    layout = GroupLayout.build(d, group_size, groups)
    k, partition = check_budget(k, layout, partition, per_class)
    r = layout.group_size

    if dtype is not None:
        work, reason = dtype, "requested"
    elif k * r >= float(stats.tokens) and shrinkage <= 0:
        work, reason = torch.float64, (f"keeps {k * r} columns from {int(stats.tokens)} tokens without shrinkage: "
                                       "a gram singular up to the damping")
    else:
        work, reason = torch.float32, ""
    run = _greedy(prob.to(work), layout, k, partition, per_class, tie_rtol)
    pick_order = layout.columns[run.kept].flatten().to(prob.device)
    fit = _fit(prob, pick_order, bias_shift)
    checked = {}
    if dtype is None and work == torch.float32:
        checked, verdict = _float32_verdict(run, fit, r)
        if verdict is None:
            reason = (f"float32 gains' rounding costs at most {checked['float32_error_share']:.1e} of the site's "
                      "error")
        else:
            work, reason = torch.float64, verdict
            prob = prob.to(torch.float64)
            run = _greedy(prob, layout, k, partition, per_class, tie_rtol)
            pick_order = layout.columns[run.kept].flatten().to(prob.device)
            fit = _fit(prob, pick_order, bias_shift)

    dependent_picks = int((~run.live).sum())
    diag = dict(fit.diagnostics, dependent_picks=dependent_picks, rank=k - dependent_picks,
                solve_dtype=str(work).removeprefix("torch."), solve_dtype_reason=reason, **checked)
    return Selection(
        kept=run.kept,
        kept_columns=layout.kept_columns(run.kept),
        weight=fit.weight,
        bias_shift=fit.bias_shift,
        curve=prob.target_sq - torch.cumsum(fit.step_gains.view(-1, r).sum(1), 0),
        target_sq=float(prob.stats.target_sq),
        error=fit.error,
        diagnostics=diag,
        undamped_error=fit.undamped_error,
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
    # sum_ab G_SS[a, b] (W^T W)[a, b], both symmetric: each panel of rows against the columns up to its end, the
    # part left of the panel counted twice. Half the products of the whole sum, and no |S| x |S| matrix is built.
    quadratic = 0.0
    for lo in range(0, cols.numel(), STATISTICS_PANEL):
        hi = lo + STATISTICS_PANEL
        part = sub_matrix(stats.gram, cols[lo:hi], cols[:hi]) * (w[:, lo:hi].T @ w[:, :hi])
        quadratic += 2 * float(part[:, :lo].sum()) + float(part[:, lo:].sum())
    err = (
        stats.target_sq
        - 2 * (w.T * stats.cross.index_select(0, cols)).sum()
        + quadratic
        - 2 * c @ stats.target_sum
        + 2 * c @ (w @ stats.input_sum[cols])
        + stats.count * c.square().sum()
    )
    return float(err)
