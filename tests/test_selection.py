"""Tests of hf_subprune.maths.selection: greedy selection, refit and statistics (DESIGN.md s.1-3).

The greedy selection works on summed statistics only; every test compares it with a slow reference that
recomputes the least-squares error from the raw activations (``torch.linalg.lstsq``) for every candidate
at every step. All problems are small and run in float64 on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_subprune.maths import selection
from hf_subprune.maths.methods import select
from hf_subprune.maths.selection import (
    FLOAT32_ERROR_SHARE,
    TIE_RTOL,
    GroupLayout,
    NonFiniteStatisticsError,
    SiteStatistics,
    _Picker,
    greedy_select,
    reconstruction_error,
    refit,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------------
# Problem generators
# --------------------------------------------------------------------------------------------------


def correlated_inputs(gen: torch.Generator, n: int, d: int, dtype=F64) -> torch.Tensor:
    """Token activations with correlated columns, unequal scales and a non-zero mean."""
    p = max(2, d // 4)
    low_rank = torch.randn(n, p, generator=gen, dtype=dtype) @ torch.randn(p, d, generator=gen, dtype=dtype)
    x = 0.6 * low_rank + torch.randn(n, d, generator=gen, dtype=dtype)
    scales = torch.exp(0.5 * torch.randn(d, generator=gen, dtype=dtype))
    offset = torch.randn(d, generator=gen, dtype=dtype)
    return x * scales + offset


def asymmetric_problem(seed: int, n: int, d: int, m: int, *, noise: float = 0.3):
    """Targets ``y = A W^T`` from the original stream A, inputs ``b`` from a perturbed stream ``B = A + noise``.

    Returns ``(B, Y, W, stats)``.
    """
    gen = torch.Generator().manual_seed(seed)
    a = correlated_inputs(gen, n, d)
    w = torch.randn(m, d, generator=gen, dtype=F64) / math.sqrt(d)
    y = a @ w.T
    b = a + noise * torch.randn(n, d, generator=gen, dtype=F64)
    return b, y, w, SiteStatistics.from_activations(b, y)


def contiguous_groups(d: int, r: int) -> torch.Tensor:
    return torch.arange(d).view(-1, r)


# --------------------------------------------------------------------------------------------------
# Slow references, straight from the definition E(S) = min_{W', c} sum_t ||y_t - W' b_{t,S} - c||^2
# --------------------------------------------------------------------------------------------------


def ridge_lambda(b: torch.Tensor, damping: float, bias_shift: bool) -> float:
    """``damping * mean(diag G)`` over all the site's columns, G centred when there is an intercept."""
    bc = b - b.mean(0) if bias_shift else b
    return damping * float(bc.square().sum(0).mean())


def lstsq_fit(b: torch.Tensor, y: torch.Tensor, cols: torch.Tensor, *, bias_shift: bool, lam: float = 0.0):
    """Least squares (ridge when ``lam > 0``, intercept unpenalised) on the raw activations.

    Returns ``(weight m x |S|, intercept m, objective)``; the objective includes the ridge penalty.
    """
    n, m = y.shape
    x = b[:, cols]
    s = x.shape[1]
    if bias_shift:
        x = torch.cat([x, torch.ones(n, 1, dtype=b.dtype)], 1)
    rhs = y
    if lam > 0 and s > 0:
        pen = torch.zeros(s, x.shape[1], dtype=b.dtype)
        pen[:, :s] = math.sqrt(lam) * torch.eye(s, dtype=b.dtype)
        x = torch.cat([x, pen], 0)
        rhs = torch.cat([y, torch.zeros(s, m, dtype=b.dtype)], 0)
    if x.shape[1] == 0:
        return y.new_zeros(m, 0), y.new_zeros(m), float(y.square().sum())
    sol = torch.linalg.lstsq(x, rhs, driver="gelsd").solution
    objective = float((rhs - x @ sol).square().sum())
    weight = sol[:s].T
    intercept = sol[s] if bias_shift else y.new_zeros(m)
    return weight, intercept, objective


def reference_greedy(
    b, y, k, columns, *, bias_shift, lam=0.0, partition=None, per_class=None
) -> tuple[list[int], torch.Tensor]:
    """Greedy forward selection that re-solves every candidate from scratch; ties go to the lowest index."""
    ng = columns.shape[0]
    kept: list[int] = []
    curve = []
    for _ in range(k):
        best, best_err = None, math.inf
        for g in range(ng):
            if g in kept:
                continue
            if partition is not None and sum(int(partition[h]) == int(partition[g]) for h in kept) >= per_class:
                continue
            cols = columns[kept + [g]].flatten().sort().values
            err = lstsq_fit(b, y, cols, bias_shift=bias_shift, lam=lam)[2]
            if err < best_err:
                best, best_err = g, err
        kept.append(best)
        curve.append(best_err)
    return kept, torch.tensor(curve, dtype=F64)


def assert_curve_close(curve: torch.Tensor, ref: torch.Tensor, target_sq: float, rtol: float = 1e-6):
    torch.testing.assert_close(curve.to(F64), ref, rtol=rtol, atol=1e-9 * target_sq)


# --------------------------------------------------------------------------------------------------
# Greedy against the reference
# --------------------------------------------------------------------------------------------------

# (group size, d, k): small enough for the O(k * groups) reference solves.
SHAPES = [(1, 20, 12), (8, 64, 5)]


@pytest.fixture(params=[(selection.GREEDY_BLOCK, selection.GREEDY_COMPACT), (2, selection.GREEDY_COMPACT),
                        (2, 3)], ids=["default", "block2", "block2-compact3"])
def greedy_block(request, monkeypatch):
    """The single-column greedy's block size and compaction: the defaults; blocks small enough that the tests'
    problems cross several block updates (picks moved out of the updates after every block); and picks carried
    in the updates for a few blocks before they are moved out."""
    block, compact = request.param
    monkeypatch.setattr(selection, "GREEDY_BLOCK", block)
    monkeypatch.setattr(selection, "GREEDY_COMPACT", compact)
    return block


@pytest.mark.parametrize("dtype", [None, F64], ids=["auto", "float64"])
@pytest.mark.parametrize("bias_shift", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("r,d,k", SHAPES)
def test_greedy_equals_reference_undamped_asymmetric(r, d, k, seed, bias_shift, dtype, greedy_block):
    b, y, _, stats = asymmetric_problem(seed, n=300, d=d, m=7)
    sel = greedy_select(stats, k, group_size=r, damping=0.0, bias_shift=bias_shift, dtype=dtype)
    ref_kept, ref_curve = reference_greedy(b, y, k, contiguous_groups(d, r), bias_shift=bias_shift)
    assert sel.kept == ref_kept
    assert_curve_close(sel.curve, ref_curve, float(stats.target_sq))


@pytest.mark.parametrize("dtype", [None, F64], ids=["auto", "float64"])
@pytest.mark.parametrize("bias_shift", [True, False])
@pytest.mark.parametrize("damping", [1e-3, 5e-2])
@pytest.mark.parametrize("r,d,k", SHAPES)
def test_greedy_equals_ridge_reference_damped(r, d, k, damping, bias_shift, dtype, greedy_block):
    b, y, _, stats = asymmetric_problem(7, n=300, d=d, m=7)
    lam = ridge_lambda(b, damping, bias_shift)
    sel = greedy_select(stats, k, group_size=r, damping=damping, bias_shift=bias_shift, dtype=dtype)
    assert sel.diagnostics["damping"] == pytest.approx(lam, rel=1e-10)
    ref_kept, ref_curve = reference_greedy(b, y, k, contiguous_groups(d, r), bias_shift=bias_shift, lam=lam)
    assert sel.kept == ref_kept
    assert_curve_close(sel.curve, ref_curve, float(stats.target_sq))
    # The returned weights are the ridge solution for the kept columns.
    w_ref, c_ref, obj_ref = lstsq_fit(b, y, sel.kept_columns, bias_shift=bias_shift, lam=lam)
    torch.testing.assert_close(sel.weight, w_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(sel.bias_shift, c_ref, rtol=1e-7, atol=1e-9)
    assert sel.error == pytest.approx(obj_ref, rel=1e-7)


@pytest.mark.parametrize("damping", [0.0, 1e-3])
@pytest.mark.parametrize("r", [1, 4, 8])
def test_explicit_groups_equal_permuted_contiguous_problem(r, damping):
    d, m, k = 48, 6, 24 // r + 1
    b, y, _, stats = asymmetric_problem(3, n=250, d=d, m=m)
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(11))
    groups = perm.view(-1, r)  # non-contiguous index sets
    explicit = greedy_select(stats, k, groups=groups, damping=damping)
    permuted = greedy_select(SiteStatistics.from_activations(b[:, perm], y), k, group_size=r, damping=damping)

    assert explicit.kept == permuted.kept
    assert_curve_close(explicit.curve, permuted.curve, float(stats.target_sq), rtol=1e-9)
    # Same columns (permuted-problem column p is original column perm[p]) and the same weights.
    assert torch.equal(explicit.kept_columns, perm[permuted.kept_columns].sort().values)
    assert torch.equal(explicit.kept_columns, groups[explicit.kept].flatten().sort().values)
    full_explicit = torch.zeros(m, d, dtype=F64)
    full_explicit[:, explicit.kept_columns] = explicit.weight
    full_permuted = torch.zeros(m, d, dtype=F64)
    full_permuted[:, perm[permuted.kept_columns]] = permuted.weight
    torch.testing.assert_close(full_explicit, full_permuted, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(explicit.bias_shift, permuted.bias_shift, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# Refit and Selection fields
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_shift", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refit_equals_lstsq(seed, bias_shift):
    d = 30
    b, y, _, stats = asymmetric_problem(seed, n=200, d=d, m=9)
    gen = torch.Generator().manual_seed(100 + seed)
    cols = torch.randperm(d, generator=gen)[:13]  # unsorted on purpose
    weight, shift, error, _ = refit(stats, cols, damping=0.0, bias_shift=bias_shift)
    w_ref, c_ref, err_ref = lstsq_fit(b, y, cols.sort().values, bias_shift=bias_shift)
    assert weight.shape == (9, 13)
    torch.testing.assert_close(weight, w_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(shift, c_ref, rtol=1e-8, atol=1e-10)
    assert error == pytest.approx(err_ref, rel=1e-8)
    assert reconstruction_error(stats, cols.sort().values, weight, shift) == pytest.approx(err_ref, rel=1e-8)
    if not bias_shift:
        assert torch.count_nonzero(shift) == 0


def test_refit_of_no_columns_is_the_mean():
    b, y, _, stats = asymmetric_problem(0, n=100, d=8, m=4)
    weight, shift, error, _ = refit(stats, [], damping=0.0)
    assert weight.shape == (4, 0)
    torch.testing.assert_close(shift, y.mean(0))
    assert error == pytest.approx(float((y - y.mean(0)).square().sum()), rel=1e-9)


def direct_sum(b: torch.Tensor, y: torch.Tensor, cols: torch.Tensor, weight: torch.Tensor,
               shift: torch.Tensor) -> float:
    """``sum_t ||y_t - W b_{t,S} - c||^2`` on the activations themselves."""
    return float((y - b[:, cols] @ weight.T - shift).square().sum())


def test_reconstruction_error_by_symmetric_panels(monkeypatch):
    """The error's quadratic term is summed a panel of rows at a time over the lower triangle (the part left of the
    diagonal block twice): with panels of 4 columns across 23 kept ones it equals the sum over the tokens."""
    b, y, _, stats = asymmetric_problem(9, n=150, d=30, m=6)
    gen = torch.Generator().manual_seed(3)
    cols = torch.randperm(30, generator=gen)[:23].sort().values
    weight = torch.randn(6, 23, generator=gen, dtype=F64)
    shift = torch.randn(6, generator=gen, dtype=F64)
    whole = reconstruction_error(stats, cols, weight, shift)
    monkeypatch.setattr(selection, "STATISTICS_PANEL", 4)
    assert reconstruction_error(stats, cols, weight, shift) == pytest.approx(direct_sum(b, y, cols, weight, shift),
                                                                             rel=1e-10)
    assert reconstruction_error(stats, cols, weight, shift) == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("bias_shift", [True, False])
@pytest.mark.parametrize("with_prior", [True, False])
def test_undamped_error_from_the_refit_equals_the_sum_over_tokens(bias_shift, with_prior):
    """The refit knows its damped objective; minus the ridge's terms (pulling towards the prior, or zero) it is
    the undamped error of its weights, which the report shows without another O(m |S|^2) pass."""
    b, y, w, stats = asymmetric_problem(11, n=60, d=40, m=7)  # fewer tokens than columns: the ridge matters
    prior = w if with_prior else None
    sel = greedy_select(stats, 25, damping=1e-2, shrinkage=1.5, bias_shift=bias_shift, prior=prior)
    expected = direct_sum(b, y, sel.kept_columns, sel.weight, sel.bias_shift)
    assert sel.undamped_error == pytest.approx(expected, rel=1e-9)
    assert sel.undamped_error < sel.error  # the damped objective adds positive ridge terms
    cols = sel.kept_columns[:-3]
    weight, shift, error, _ = refit(stats, cols, damping=1e-2, shrinkage=1.5, bias_shift=bias_shift, prior=prior)
    assert error == pytest.approx(direct_sum(b, y, cols, weight, shift), rel=1e-9)
    # methods.select reports the same error as the direct sum
    chosen = select("greedy", stats, w, 25, damping=1e-2, shrinkage=1.5, bias_shift=bias_shift, prior=prior)
    assert chosen.error == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("r", [1, 4])
def test_selection_fields(r):
    d, m, k = 32, 5, 16 // r + 1
    b, y, _, stats = asymmetric_problem(4, n=200, d=d, m=m)
    groups = torch.randperm(d, generator=torch.Generator().manual_seed(5)).view(-1, r)
    sel = greedy_select(stats, k, groups=groups, damping=0.0)

    assert len(sel.kept) == k and len(set(sel.kept)) == k
    expected_cols = groups[sel.kept].flatten().sort().values
    assert torch.equal(sel.kept_columns, expected_cols)
    assert bool((sel.kept_columns[1:] > sel.kept_columns[:-1]).all())  # strictly ascending
    assert sel.weight.shape == (m, k * r)
    # Weight columns follow kept_columns (ascending), and the bias shift is the least-squares intercept.
    w_ref, c_ref, err_ref = lstsq_fit(b, y, expected_cols, bias_shift=True)
    torch.testing.assert_close(sel.weight, w_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sel.bias_shift, c_ref, rtol=1e-8, atol=1e-10)
    assert sel.curve.shape == (k,)
    assert sel.error == pytest.approx(float(sel.curve[-1]), rel=1e-9)
    assert sel.error == pytest.approx(err_ref, rel=1e-8)
    assert sel.target_sq == pytest.approx(float(y.square().sum()))
    torch.testing.assert_close(sel.relative_curve, sel.curve / sel.target_sq)
    assert sel.diagnostics["rank"] == k and sel.diagnostics["dependent_picks"] == 0


@pytest.mark.parametrize("damping", [0.0, 1e-3, 1e-1])
@pytest.mark.parametrize("r", [1, 8])
def test_curve_non_increasing_and_ends_at_error(r, damping):
    d = 64
    _, _, _, stats = asymmetric_problem(2, n=300, d=d, m=10)
    k = d // r
    sel = greedy_select(stats, k, group_size=r, damping=damping)
    scale = float(stats.target_sq)
    assert bool((sel.curve[1:] <= sel.curve[:-1] + 1e-10 * scale).all())
    assert float(sel.curve[-1]) == pytest.approx(sel.error, rel=1e-8, abs=1e-10 * scale)
    # The first step already beats keeping nothing (the centred target energy).
    centred_target = float(stats.centred()[2])
    assert float(sel.curve[0]) < centred_target


@pytest.mark.parametrize("bias_shift", [True, False])
@pytest.mark.parametrize("r", [1, 8])
def test_keeping_every_group_reconstructs_exactly(r, bias_shift):
    """With y = W b and G full rank, keeping all groups reproduces the target."""
    d, m = 40, 12
    gen = torch.Generator().manual_seed(9)
    b = correlated_inputs(gen, 200, d)
    w = torch.randn(m, d, generator=gen, dtype=F64)
    stats = SiteStatistics.from_activations(b, b @ w.T)
    sel = greedy_select(stats, d // r, group_size=r, damping=0.0, bias_shift=bias_shift)
    assert sel.diagnostics["rank"] == d // r
    assert abs(float(sel.curve[-1])) < 1e-9 * sel.target_sq
    assert abs(sel.error) < 1e-9 * sel.target_sq
    full = torch.zeros(m, d, dtype=F64)
    full[:, sel.kept_columns] = sel.weight
    torch.testing.assert_close(full, w, rtol=1e-7, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def assert_stats_close(a: SiteStatistics, b: SiteStatistics, **tol):
    for ta, tb in zip(a.tensors(), b.tensors()):
        torch.testing.assert_close(ta, tb, **tol)


def test_statistics_merge_by_add_and_iadd():
    b, y, _, whole = asymmetric_problem(0, n=301, d=24, m=6)
    first = SiteStatistics.from_activations(b[:120], y[:120])
    second = SiteStatistics.from_activations(b[120:], y[120:])
    assert_stats_close(first + second, whole, rtol=1e-12, atol=1e-9)

    merged = SiteStatistics.zeros(24, 6)
    merged += first
    merged += second
    assert_stats_close(merged, whole, rtol=1e-12, atol=1e-9)
    assert float(merged.count) == 301

    # Streaming updates give the same sums as one batch.
    streamed = SiteStatistics.zeros(24, 6)
    for lo in range(0, 301, 50):
        streamed.update(b[lo : lo + 50], y[lo : lo + 50])
    assert_stats_close(streamed, whole, rtol=1e-12, atol=1e-9)

    sel_whole = greedy_select(whole, 10, damping=0.0)
    sel_merged = greedy_select(merged, 10, damping=0.0)
    assert sel_merged.kept == sel_whole.kept
    assert_curve_close(sel_merged.curve, sel_whole.curve, float(whole.target_sq), rtol=1e-9)


def test_weighted_statistics_equal_repeated_tokens():
    """Integer token weights give the sums (and so the selection and the bias shift) of the tokens repeated
    that many times; the token count stays the number of rows."""
    b, y, _, _ = asymmetric_problem(3, n=120, d=16, m=5)
    reps = torch.randint(0, 4, (120,), generator=torch.Generator().manual_seed(0))
    weighted = SiteStatistics.from_activations(b, y, weights=reps.to(F64))
    repeated = SiteStatistics.from_activations(b.repeat_interleave(reps, 0), y.repeat_interleave(reps, 0))
    for name in ("gram", "cross", "target_sq", "count", "input_sum", "target_sum"):
        torch.testing.assert_close(getattr(weighted, name), getattr(repeated, name), rtol=1e-12, atol=1e-9)
    assert float(weighted.tokens) == 120 and float(repeated.tokens) == float(reps.sum())
    a = greedy_select(weighted, 6, damping=0.0, bias_shift=True)
    c = greedy_select(repeated, 6, damping=0.0, bias_shift=True)
    assert a.kept == c.kept
    torch.testing.assert_close(a.bias_shift, c.bias_shift, rtol=1e-8, atol=1e-8)

    # Streaming with weights gives the same sums as one batch.
    streamed = SiteStatistics.zeros(16, 5)
    for lo in range(0, 120, 50):
        streamed.update(b[lo : lo + 50], y[lo : lo + 50], weights=reps[lo : lo + 50].to(F64))
    assert_stats_close(streamed, weighted, rtol=1e-12, atol=1e-9)


def test_gram_built_from_its_upper_triangle_equals_the_full_product():
    """The panel loop multiplies only from the diagonal on and mirrors the rest: across panel edges (d not a
    multiple of GRAM_PANEL), with token weights and over several updates, the gram is the full weighted product
    and exactly symmetric."""
    gen = torch.Generator().manual_seed(5)
    d = selection.GRAM_PANEL * 2 + 37
    b = torch.randn(90, d, generator=gen, dtype=F64)
    y = torch.randn(90, 3, generator=gen, dtype=F64)
    w = torch.rand(90, generator=gen, dtype=F64)
    stats = SiteStatistics.zeros(d, 3)
    for lo in range(0, 90, 40):
        stats.update(b[lo : lo + 40], y[lo : lo + 40], weights=w[lo : lo + 40])
    torch.testing.assert_close(stats.gram, (b * w[:, None]).T @ b, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(stats.cross, (b * w[:, None]).T @ y, rtol=1e-12, atol=1e-10)
    assert torch.equal(stats.gram, stats.gram.T)


def test_weights_must_match_tokens_and_be_non_negative():
    b, y, _, _ = asymmetric_problem(4, n=30, d=8, m=3)
    with pytest.raises(ValueError, match="one per token"):
        SiteStatistics.from_activations(b, y, weights=torch.ones(29, dtype=F64))
    with pytest.raises(ValueError, match="non-negative"):
        SiteStatistics.from_activations(b, y, weights=-torch.ones(30, dtype=F64))


def test_statistics_to_dtype_round_trip():
    _, _, _, stats = asymmetric_problem(1, n=100, d=16, m=4)
    low = stats.to(dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in low.tensors())
    assert low.in_features == 16 and low.out_features == 4
    back = low.to(dtype=F64)
    assert all(t.dtype == F64 for t in back.tensors())
    assert_stats_close(back, stats, rtol=1e-6, atol=1e-5)
    assert_stats_close(stats.to(dtype=F64), stats, rtol=0, atol=0)


def test_from_inputs_only_equals_statistics_of_w_b():
    gen = torch.Generator().manual_seed(2)
    b = correlated_inputs(gen, 150, 20)
    w = torch.randn(7, 20, generator=gen, dtype=F64)
    inputs_only = SiteStatistics.from_inputs_only(SiteStatistics.from_activations(b, torch.zeros(150, 1, dtype=F64)), w)
    direct = SiteStatistics.from_activations(b, b @ w.T)
    assert_stats_close(inputs_only, direct, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("r", [1, 4])
def test_float32_statistics_select_like_float64(r):
    """Well-conditioned (independent inputs, clearly different column importances): same picks in fp32."""
    d, m, n = 64, 16, 2000
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(n, d, generator=gen, dtype=F64) + 0.5
    importance = torch.linspace(0.5, 3.0, d, dtype=F64)[torch.randperm(d, generator=gen)]
    w = torch.randn(m, d, generator=gen, dtype=F64) * importance
    y = b @ w.T + 0.1 * torch.randn(n, m, generator=gen, dtype=F64)
    stats64 = SiteStatistics.from_activations(b, y)
    stats32 = SiteStatistics.from_activations(b, y, dtype=torch.float32)
    k = d // r // 2
    sel64 = greedy_select(stats64, k, group_size=r)
    for stats, kwargs in [(stats32, {}), (stats64, {"dtype": torch.float32})]:
        sel32 = greedy_select(stats, k, group_size=r, **kwargs)
        assert sel32.kept == sel64.kept
        assert sel32.weight.dtype == torch.float32
        torch.testing.assert_close(sel32.curve.double(), sel64.curve, rtol=1e-4, atol=1e-5 * sel64.target_sq)
        torch.testing.assert_close(sel32.weight.double(), sel64.weight, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(sel32.bias_shift.double(), sel64.bias_shift, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Solve dtype: float32 greedy, checked against the float64 refit, float64 where it fails
# --------------------------------------------------------------------------------------------------


def assert_same_selection(a, b, target_sq: float):
    assert a.kept == b.kept
    assert_curve_close(a.curve, b.curve, target_sq, rtol=1e-9)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.bias_shift, b.bias_shift, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("r", [1, 4])
def test_well_conditioned_site_stays_float32_and_selects_like_float64(r, greedy_block):
    """The pipeline's settings on correlated inputs, over several block updates: the float32 greedy stands, and
    its picks, curve (from the float64 refit), weights and bias are float64's."""
    d, m, n = 96, 12, 2000
    b, y, w, stats = asymmetric_problem(11, n=n, d=d, m=m)
    k = 3 * d // (4 * r)
    kwargs = dict(group_size=r, damping=1e-2, shrinkage=1.0, prior=w)
    auto = greedy_select(stats, k, **kwargs)
    exact = greedy_select(stats, k, dtype=F64, **kwargs)
    assert auto.diagnostics["solve_dtype"] == "float32"
    assert auto.diagnostics["float32_gain_error"] < TIE_RTOL
    assert exact.diagnostics["solve_dtype"] == "float64" and exact.diagnostics["solve_dtype_reason"] == "requested"
    assert auto.weight.dtype == F64  # the refit stays in the statistics' dtype
    assert_same_selection(auto, exact, float(stats.target_sq))


@pytest.mark.parametrize("r", [1, 4])
def test_nearly_duplicated_columns_fall_back_to_float64(r):
    """Group 3 repeats group 1 up to a 1e-4 relative perturbation that the target needs, with a tiny ridge:
    float32 cannot resolve the copy's residual variance (~1e-8 of its own), so the site is solved again in
    float64, which keeps both, and gives float64's answer."""
    gen = torch.Generator().manual_seed(12)
    n, d, m = 400, 8 * r, 5
    b = correlated_inputs(gen, n, d)
    b[:, 3 * r : 4 * r] = b[:, r : 2 * r] + 1e-4 * torch.randn(n, r, generator=gen, dtype=F64)
    w = torch.randn(m, d, generator=gen, dtype=F64)
    w[:, r : 2 * r] = 10.0 - 1e5  # group 1 leads; the target also holds the copy's small difference, x 10
    w[:, 3 * r : 4 * r] = 1e5
    stats = SiteStatistics.from_activations(b, b @ w.T)
    k = 6
    auto = greedy_select(stats, k, group_size=r, damping=1e-12)
    exact = greedy_select(stats, k, group_size=r, damping=1e-12, dtype=F64)
    assert auto.diagnostics["solve_dtype"] == "float64"
    assert auto.diagnostics["solve_dtype_reason"] != "requested"
    assert sorted(auto.kept[:2]) == [1, 3]  # float64 tells the copy apart
    assert_same_selection(auto, exact, float(stats.target_sq))
    # Explicitly asked for, float32 is used unchecked, and does not tell the copy apart.
    forced = greedy_select(stats, k, group_size=r, damping=1e-12, dtype=torch.float32)
    assert forced.diagnostics["solve_dtype"] == "float32" and forced.diagnostics["solve_dtype_reason"] == "requested"
    assert forced.kept != exact.kept


def test_float32_rounding_that_could_cost_a_share_of_the_error_falls_back_to_float64():
    """A target the kept columns fit almost exactly (the dropped columns carry 1e-5 of the weight): float32's
    rounding of the large early gains is then far more than 0.1% of the tiny error left, so the site is solved
    again in float64 and gives float64's answer; the diagnostics say what was measured."""
    gen = torch.Generator().manual_seed(3)
    n, d, m = 400, 32, 4
    b = correlated_inputs(gen, n, d)
    w = torch.randn(m, d, generator=gen, dtype=F64)
    w[:, 28:] *= 1e-5
    stats = SiteStatistics.from_activations(b, b @ w.T)
    auto = greedy_select(stats, 28, damping=1e-10, bias_shift=False)
    exact = greedy_select(stats, 28, damping=1e-10, bias_shift=False, dtype=F64)
    assert auto.diagnostics["solve_dtype"] == "float64"
    assert "of the site's error" in auto.diagnostics["solve_dtype_reason"]
    assert auto.diagnostics["float32_error_share"] > FLOAT32_ERROR_SHARE
    assert_same_selection(auto, exact, float(stats.target_sq))


def test_keeping_as_many_columns_as_tokens_solves_in_float64():
    b, y, _, stats = asymmetric_problem(1, n=20, d=32, m=4)
    sel = greedy_select(stats, 20, damping=1e-3)
    assert sel.diagnostics["solve_dtype"] == "float64" and "tokens" in sel.diagnostics["solve_dtype_reason"]
    assert "float32_gain_error" not in sel.diagnostics
    assert greedy_select(stats, 19, damping=1e-3).diagnostics["solve_dtype"] != "requested"


def test_keeping_more_columns_than_tokens_with_shrinkage_stays_float32():
    """The pipeline's few-tokens setting (shrinkage d / tokens, kept columns beyond the tokens): the ridge keeps
    the gram regular, the float32 greedy stands the verdict and selects like float64."""
    d, n = 96, 48
    b, y, w, stats = asymmetric_problem(5, n=n, d=d, m=12)
    kwargs = dict(damping=1e-2, shrinkage=d / n, prior=w)
    auto = greedy_select(stats, 72, **kwargs)
    exact = greedy_select(stats, 72, dtype=F64, **kwargs)
    assert auto.diagnostics["solve_dtype"] == "float32"
    assert auto.diagnostics["float32_gain_error"] < TIE_RTOL
    assert_same_selection(auto, exact, float(stats.target_sq))


@pytest.mark.parametrize("seed", range(4))
def test_near_ties_resolve_alike_in_float32_and_float64(seed):
    """Exactly uncorrelated columns whose gains sit at relative distances around the tie margin from one
    another (inside, at its edge, outside): the float32 greedy takes the same columns in the same order."""
    gen = torch.Generator().manual_seed(seed)
    n, d, m = 600, 24, 3
    basis = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=F64)).Q  # orthonormal columns
    gaps = torch.tensor([0.0, 0.3, 0.9, 0.99, 1.01, 1.1, 2.0, 5.0, 20.0, 100.0, 400.0, 1000.0], dtype=F64) * TIE_RTOL
    gains = torch.cat([1.0 - gaps, 0.5 * (1.0 - gaps)])  # two clusters of near-ties
    gains = gains[torch.randperm(d, generator=gen)]
    w = torch.zeros(m, d, dtype=F64)
    w[0] = gains.sqrt()
    b = basis * math.sqrt(n)  # G = n I, so column j's gain is ||w_j||^2 whatever was kept before
    stats = SiteStatistics.from_activations(b, (b @ w.T) / math.sqrt(n))
    auto = greedy_select(stats, 16, damping=0.0, bias_shift=False)
    exact = greedy_select(stats, 16, damping=0.0, bias_shift=False, dtype=F64)
    assert auto.diagnostics["solve_dtype"] == "float32"
    assert auto.kept == exact.kept


def test_picker_take_matches_pick_and_respects_quota():
    gain = torch.tensor([1.0, 3.0, 3.0 * (1 - 0.5 * TIE_RTOL), 2.0, 3.0 * (1 - 2 * TIE_RTOL)], dtype=F64)
    partition = torch.tensor([0, 0, 1, 1, 2])
    a = _Picker(5, partition, 1, "cpu")
    b = _Picker(5, partition, 1, "cpu")
    taken = [int(a.take(gain)) for _ in range(3)]
    assert taken == [b.pick(gain) for _ in range(3)] == [1, 2, 4]
    t = _Picker(5, None, None, "cpu").take(gain)
    assert t.dim() == 0 and t.dtype == torch.long and int(t) == 1


def test_float32_matmul_precision_is_restored():
    _, _, _, stats = asymmetric_problem(0, n=200, d=16, m=3)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        greedy_select(stats, 8)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("precision", ["high", "medium"])  # TF32 on a GPU; bfloat16 products (a CPU with AMX too)
def test_statistics_products_ignore_a_lowered_float32_matmul_precision(precision):
    gen = torch.Generator().manual_seed(3)
    b, y = torch.randn(300, 64, generator=gen), torch.randn(300, 24, generator=gen)
    exact = SiteStatistics.from_activations(b, y, dtype=torch.float32)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        lowered = SiteStatistics.from_activations(b, y, dtype=torch.float32)
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(before)
    assert all(torch.equal(x, z) for x, z in zip(exact.tensors(), lowered.tensors()))


# --------------------------------------------------------------------------------------------------
# Degenerate inputs
# --------------------------------------------------------------------------------------------------


def degenerate_problem(kind: str, d: int = 32, m: int = 6):
    gen = torch.Generator().manual_seed(21)
    n = 12 if kind == "few_tokens" else 200
    b = correlated_inputs(gen, n, d)
    if kind == "duplicates":
        b[:, d // 2 :] = b[:, : d // 2]  # every column twice (within and across groups of 4)
    elif kind == "dead":
        b[:, ::3] = 0.0
    elif kind == "constant":
        b[:, ::3] = 1.5  # dead once centred
    w = torch.randn(m, d, generator=gen, dtype=F64)
    return b, SiteStatistics.from_activations(b, b @ w.T)


@pytest.mark.parametrize("damping", [0.0, 1e-3])
@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("kind", ["few_tokens", "duplicates", "dead", "constant"])
def test_degenerate_inputs_stay_finite(kind, r, damping):
    b, stats = degenerate_problem(kind)
    ng = 32 // r
    column_rank = int(torch.linalg.matrix_rank(b - b.mean(0)))
    for k in (ng // 2, ng - 1, ng):
        sel = greedy_select(stats, k, group_size=r, damping=damping)
        assert len(sel.kept) == k and len(set(sel.kept)) == k
        assert sel.weight.shape == (6, k * r)
        for t in (sel.weight, sel.bias_shift, sel.curve):
            assert bool(torch.isfinite(t).all())
        assert math.isfinite(sel.error)
        # Still a fit: never (meaningfully) worse than keeping nothing.
        assert float(sel.curve[-1]) <= float(stats.centred()[2]) * (1 + 1e-9)
        assert float(sel.curve.min()) >= -1e-8 * sel.target_sq
        assert sel.diagnostics["rank"] + sel.diagnostics["dependent_picks"] == k
        if damping == 0.0:  # never claims more independent groups than the data has
            assert sel.diagnostics["rank"] <= column_rank


@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_duplicate_of_kept_column_has_no_gain(damping):
    """Column 5 duplicates the most useful column 0: once 0 is kept, every independent column goes first."""
    n, d, m = 400, 8, 5
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(n, d, generator=gen, dtype=F64)
    b[:, 5] = b[:, 0]
    w = torch.randn(m, d, generator=gen, dtype=F64)
    w[:, 0] *= 10  # column 0 (= column 5) is by far the most useful
    w[:, 5] = 0.0
    stats = SiteStatistics.from_activations(b, b @ w.T)
    sel = greedy_select(stats, d, damping=damping)
    # 0 and 5 tie up to rounding in the first step; whichever comes second has no gain left.
    assert sorted([sel.kept[0], sel.kept[-1]]) == [0, 5]
    if damping == 0.0:
        assert sel.diagnostics["dependent_picks"] == 1
        assert sel.diagnostics["rank"] == d - 1
        # The duplicate adds nothing to the fit.
        assert float(sel.curve[-1]) == pytest.approx(float(sel.curve[-2]), abs=1e-9 * sel.target_sq)


@pytest.mark.parametrize("damping", [0.0, 1e-3])
@pytest.mark.parametrize("r", [1, 2])
def test_dead_neurons_reported_as_dependent_picks(r, damping):
    """Forced to keep dead (all-zero) groups, the greedy keeps them last and says so in the diagnostics.

    The default damping (1e-3) must not hide them: a dead group spans nothing whatever the ridge.
    """
    n, d, m = 300, 16, 5
    gen = torch.Generator().manual_seed(4)
    b = torch.randn(n, d, generator=gen, dtype=F64)
    dead_groups = [1, 4, 6] if r == 2 else [0, 3, 9, 10, 15]
    for g in dead_groups:
        b[:, g * r : (g + 1) * r] = 0.0
    w = torch.randn(m, d, generator=gen, dtype=F64)
    stats = SiteStatistics.from_activations(b, b @ w.T)
    ng = d // r
    live = ng - len(dead_groups)
    sel = greedy_select(stats, ng, group_size=r, damping=damping)
    assert sorted(sel.kept[live:]) == dead_groups  # dead ones last
    assert bool(torch.isfinite(sel.weight).all())
    assert sel.diagnostics["dependent_picks"] == len(dead_groups)
    assert sel.diagnostics["rank"] == live


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("gram", math.nan), ("cross", math.inf), ("target_sq", math.nan)])
def test_non_finite_statistics_raise_with_site_name(field, value):
    _, _, _, stats = asymmetric_problem(0, n=50, d=8, m=3)
    t = getattr(stats, field)
    t.view(-1)[0] = value
    site = "model.layers.7.mlp.down_proj"
    with pytest.raises(NonFiniteStatisticsError, match=site.replace(".", r"\.")):
        greedy_select(stats, 3, site=site)
    with pytest.raises(NonFiniteStatisticsError, match=site.replace(".", r"\.")):
        refit(stats, [0, 1], site=site)
    assert issubclass(NonFiniteStatisticsError, ValueError)


@pytest.mark.parametrize("k", [-1, 9, 100])
def test_invalid_k_raises(k):
    _, _, _, stats = asymmetric_problem(0, n=50, d=16, m=3)
    with pytest.raises(ValueError):
        greedy_select(stats, k, group_size=2)  # 8 groups


def test_k_none_without_quota_raises():
    _, _, _, stats = asymmetric_problem(0, n=50, d=16, m=3)
    with pytest.raises(ValueError):
        greedy_select(stats, None)


@pytest.mark.parametrize("r", [3, 5, 0])
def test_d_not_divisible_by_group_size_raises(r):
    _, _, _, stats = asymmetric_problem(0, n=50, d=16, m=3)
    with pytest.raises(ValueError):
        greedy_select(stats, 1, group_size=r)


@pytest.mark.parametrize(
    "groups", [[[0, 1], [1, 2]], [[0, 1], [2, 16]], [[0, 1], [2]], [[-1, 0]], []], ids=["overlap", "out_of_range", "ragged", "negative", "empty"]
)
def test_invalid_groups_raise(groups):
    _, _, _, stats = asymmetric_problem(0, n=50, d=16, m=3)
    with pytest.raises(ValueError):
        greedy_select(stats, 1, groups=groups)


def test_k_zero_keeps_nothing():
    b, y, _, stats = asymmetric_problem(0, n=50, d=16, m=3)
    sel = greedy_select(stats, 0)
    assert sel.kept == [] and sel.kept_columns.numel() == 0 and sel.curve.numel() == 0
    assert sel.weight.shape == (3, 0)
    torch.testing.assert_close(sel.bias_shift, y.mean(0))


# --------------------------------------------------------------------------------------------------
# Quotas (grouped-query attention)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r,d,per_class", [(1, 18, 2), (4, 48, 1), (4, 48, 2)])
def test_quota_keeps_per_class_and_matches_reference(r, d, per_class):
    b, y, _, stats = asymmetric_problem(6, n=300, d=d, m=6)
    ng = d // r
    partition = torch.arange(ng) % 3  # interleaved classes
    k = 3 * per_class
    sel = greedy_select(stats, k, group_size=r, partition=partition, per_class=per_class, damping=0.0)
    assert len(sel.kept) == k
    assert torch.bincount(partition[sel.kept], minlength=3).tolist() == [per_class] * 3
    ref_kept, ref_curve = reference_greedy(
        b, y, k, contiguous_groups(d, r), bias_shift=True, partition=partition, per_class=per_class
    )
    assert sel.kept == ref_kept
    assert_curve_close(sel.curve, ref_curve, float(stats.target_sq))
    # k=None takes the budget from the quota.
    implicit = greedy_select(stats, None, group_size=r, partition=partition, per_class=per_class, damping=0.0)
    assert implicit.kept == sel.kept


def test_quota_binds_where_the_unconstrained_greedy_would_not_follow_it():
    """Make class 0 hold all the useful groups: the quota still keeps per_class in every class."""
    b, _, _, _ = asymmetric_problem(0, n=200, d=12, m=4)
    w = torch.zeros(4, 12, dtype=F64)
    w[:, :4] = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    stats = SiteStatistics.from_activations(b, b @ w.T)
    partition = torch.arange(12) // 4  # class 0 = columns 0..3
    free = greedy_select(stats, 6, damping=0.0)
    assert sum(g < 4 for g in free.kept) == 4
    quota = greedy_select(stats, 6, partition=partition, per_class=2, damping=0.0)
    assert torch.bincount(partition[quota.kept], minlength=3).tolist() == [2, 2, 2]


@pytest.mark.parametrize("k", [5, 7, 0])
def test_quota_inconsistent_k_raises(k):
    _, _, _, stats = asymmetric_problem(0, n=100, d=12, m=3)
    with pytest.raises(ValueError):
        greedy_select(stats, k, partition=torch.arange(12) % 3, per_class=2)


def test_quota_errors():
    _, _, _, stats = asymmetric_problem(0, n=100, d=12, m=3)
    with pytest.raises(ValueError):  # partition without per_class
        greedy_select(stats, 6, partition=torch.arange(12) % 3)
    with pytest.raises(ValueError):  # a class smaller than the quota
        greedy_select(stats, None, partition=torch.tensor([0] * 10 + [1] * 2), per_class=3)
    with pytest.raises(ValueError):  # wrong length
        greedy_select(stats, None, partition=torch.arange(6) % 3, per_class=1)


# --------------------------------------------------------------------------------------------------
# Determinism and ties
# --------------------------------------------------------------------------------------------------


def integer_problem(n: int = 256, d: int = 8, m: int = 4, seed: int = 0):
    """Small-integer activations and weights: every sum is exact in float64, so equal groups tie exactly."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randint(-3, 4, (n, d), generator=gen).to(F64)
    w = torch.randint(-2, 3, (m, d), generator=gen).to(F64)
    return b, w


@pytest.mark.parametrize("bias_shift", [True, False])
@pytest.mark.parametrize("r", [1, 4])
def test_identical_groups_tie_to_lowest_index(r, bias_shift):
    b, w = integer_problem(d=r)
    ng = 6
    b_all = b.repeat(1, ng)  # every group identical
    stats = SiteStatistics.from_activations(b_all, b @ w.T)
    sel = greedy_select(stats, 4, group_size=r, damping=0.0, bias_shift=bias_shift)
    assert sel.kept == [0, 1, 2, 3]
    assert sel.diagnostics["dependent_picks"] == 3


@pytest.mark.parametrize("damping", [0.0, 1e-3])
@pytest.mark.parametrize("r", [1, 4])
def test_duplicated_best_group_picks_lower_index(r, damping):
    b, _ = integer_problem(d=5 * r, seed=1)
    b[:, 3 * r : 4 * r] = b[:, 1 * r : 2 * r]  # group 3 is a copy of group 1
    gen = torch.Generator().manual_seed(2)
    w = torch.randint(-1, 2, (4, 5 * r), generator=gen).to(F64)
    w[:, r : 2 * r] = 8.0  # group 1 (= group 3) dominates
    w[:, 3 * r : 4 * r] = 8.0
    stats = SiteStatistics.from_activations(b, b @ w.T)
    first = greedy_select(stats, 5, group_size=r, damping=damping)
    assert first.kept[0] == 1
    assert first.kept[-1] == 3
    again = greedy_select(stats, 5, group_size=r, damping=damping)
    assert again.kept == first.kept
    assert torch.equal(again.curve, first.curve)
    assert torch.equal(again.weight, first.weight)


@pytest.mark.parametrize("r", [1, 4])
def test_near_ties_go_to_the_lowest_index(r):
    """Only group 3 feeds the target; group 1 is a copy of it plus ``eps`` noise, so its gain is short of group
    3's by about eps^2 (relative). Inside the tie margin the lower index wins; outside it, the larger gain."""
    b, _ = integer_problem(d=5 * r, seed=3)
    noise = torch.randn(b.shape[0], r, generator=torch.Generator().manual_seed(4), dtype=F64)
    w = torch.zeros(4, 5 * r, dtype=F64)
    w[:, 3 * r : 4 * r] = 8.0
    for eps, expected in ((1e-3, 1), (0.3, 3)):
        b_t = b.clone()
        b_t[:, r : 2 * r] = b_t[:, 3 * r : 4 * r] + eps * noise
        stats = SiteStatistics.from_activations(b_t, b_t @ w.T)
        assert greedy_select(stats, 1, group_size=r, damping=0.0, bias_shift=False).kept == [expected]
        # Without a margin the larger gain wins, however small the lead.
        assert greedy_select(stats, 1, group_size=r, damping=0.0, bias_shift=False, tie_rtol=0.0).kept == [3]


def test_rounding_level_changes_do_not_move_the_picks():
    """Column 7 duplicates column 2 (equal gains up to rounding). Statistics summed in float32 in other orders
    (other batch sizes or process counts) round differently, and still keep the same columns in the same order."""
    b, _, w, _ = asymmetric_problem(seed=5, n=600, d=24, m=6)
    b[:, 7] = b[:, 2]
    w[:, 7] = w[:, 2] = 3.0  # the duplicated pair is the best first pick
    y = b @ w.T
    picks = []
    for size in (600, 37, 5):
        stats = SiteStatistics.zeros(24, 6, dtype=torch.float32)
        for start in range(0, 600, size):
            stats.update(b[start : start + size], y[start : start + size])
        picks.append(greedy_select(stats.to(dtype=F64), 12, damping=1e-2).kept)
    assert picks[0][0] == 2
    assert picks[0] == picks[1] == picks[2]


# --------------------------------------------------------------------------------------------------
# Correlation shrinkage
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_shift", [False, True])
def test_shrinkage_is_least_squares_with_one_pseudo_token_per_column(bias_shift):
    """``shrinkage`` = a pseudo-token ``sqrt(s G_jj) e_j`` per column, with target ``sqrt(s G_jj) W e_j``:
    the refit equals least squares on the tokens plus those pseudo-tokens (G centred with an intercept)."""
    b, y, w, stats = asymmetric_problem(seed=7, n=120, d=16, m=5)
    cols = torch.tensor([0, 2, 3, 7, 8, 11, 15])
    shrink = 0.4
    centred = b - b.mean(0) if bias_shift else b
    scale = (shrink * centred.square().sum(0)).sqrt()  # sqrt(s G_jj)
    pseudo_b = torch.diag(scale)
    pseudo_y = pseudo_b @ w.T
    # Pseudo-tokens enter the centred problem: centre the real tokens first, then append them (no intercept).
    yc = y - y.mean(0) if bias_shift else y
    x = torch.cat([centred[:, cols], pseudo_b[:, cols]])
    rhs = torch.cat([yc, pseudo_y])
    expected = torch.linalg.lstsq(x, rhs, driver="gelsd").solution.T
    weight, shift, _, _ = refit(stats, cols, damping=0.0, bias_shift=bias_shift, prior=w, shrinkage=shrink)
    torch.testing.assert_close(weight, expected, rtol=1e-8, atol=1e-10)
    if bias_shift:
        torch.testing.assert_close(shift, y.mean(0) - weight @ b[:, cols].mean(0), rtol=1e-8, atol=1e-10)


def test_strong_shrinkage_ranks_columns_by_their_own_energy_and_keeps_the_weights():
    """With a shrinkage far above 1 a dropped column costs about ``s G_jj ||W_j||^2``: the greedy keeps the
    columns of largest own energy, whatever their correlations, and the refit returns the original columns."""
    b, _, w, _ = asymmetric_problem(seed=8, n=300, d=20, m=6)
    stats = SiteStatistics.from_activations(b, b @ w.T)
    energy = b.square().sum(0) * w.square().sum(0)
    sel = greedy_select(stats, 8, damping=0.0, bias_shift=False, prior=w, shrinkage=1e6)
    assert sorted(sel.kept) == sorted(torch.argsort(energy, descending=True)[:8].tolist())
    torch.testing.assert_close(sel.weight, w[:, sel.kept_columns], rtol=1e-4, atol=1e-6)
    # Without shrinkage the greedy exploits the correlations and keeps another set.
    assert sorted(greedy_select(stats, 8, damping=0.0, bias_shift=False, prior=w).kept) != sorted(sel.kept)


@pytest.mark.parametrize("bias_shift", [True, False])
def test_damped_gram_is_built_by_panels_from_the_raw_statistics(bias_shift):
    """The problem keeps no d x d gram of its own: panels of rows (two panels here) and the kept columns' block
    are centred and damped from the raw sums, and must equal the whole centred gram plus the ridge."""
    from hf_subprune.maths.selection import _problem

    torch.manual_seed(0)
    d = 300
    x = torch.randn(400, d) * 0.5 + 3.0  # large means: centring cancels
    stats = SiteStatistics.from_activations(x, x[:, :7])
    prob = _problem(stats, bias_shift, torch.float64, damping=1e-3, prior=None, shrinkage=0.5)
    gram = stats.centred()[0] if bias_shift else stats.gram
    expected = gram + torch.diag(prob.lam_exact)
    assert torch.allclose(prob.gram(torch.float64), expected, rtol=1e-12, atol=1e-9)
    cols = torch.tensor([250, 3, 17, 299])
    assert torch.allclose(prob.sub_gram(cols), expected[cols][:, cols], rtol=1e-12, atol=1e-9)
    assert torch.equal(prob.to(torch.float32).gram(torch.float32), prob.gram(torch.float64).float())
