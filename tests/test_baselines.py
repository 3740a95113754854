"""Tests of hf_subprune.maths.methods: every registered method behind ``select``, side by side.

Scores are checked against formulas computed by hand from the raw activations; errors are checked
against the reconstruction error computed directly on the tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_subprune.maths.methods import METHODS, group_scores, select
from hf_subprune.maths.selection import GroupLayout, NonFiniteStatisticsError, SiteStatistics, refit

F64 = torch.float64
# Methods that choose one site at a time (FLAP as published allocates over the whole model: test_published_baselines).
ALL_METHODS = sorted(name for name, m in METHODS.items() if m.scope == "site")
BASELINES = [name for name in ALL_METHODS if name != "greedy"]


pytestmark = pytest.mark.usefixtures("single_thread")


def test_registry_holds_the_documented_methods():
    hybrids = {"random-score", "magnitude-score", "wanda-sp-score", "flap-score"}
    published = {"random", "magnitude", "wanda-sp", "flap", "layer-greedy-fs"}
    assert {"greedy"} | hybrids | published == set(METHODS)
    assert METHODS["greedy"].score is None and METHODS["greedy"].pick is None
    assert {name for name, m in METHODS.items() if m.published} == published
    assert not any(METHODS[name].settings for name in hybrids | {"greedy"})
    assert all(METHODS[name].settings["refit"] is False for name in published)
    assert {name for name, m in METHODS.items() if m.compensates_bias} == {"flap", "flap-score"}
    assert [name for name, m in METHODS.items() if m.scope != "site"] == ["flap"]


def test_whole_model_methods_are_refused_per_site():
    _, _, w, stats = correlated_problem(0, d=12)
    with pytest.raises(ValueError, match="whole model"):
        select("flap", stats, w, 4)


# --------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------


def correlated_problem(seed: int, n: int = 400, d: int = 48, m: int = 10, noise: float = 0.3):
    """Asymmetric problem: ``y = A W^T`` from the original stream, ``b = A + noise`` the pruned stream.

    Columns of A are correlated (a shared low-rank part), have unequal scales and non-zero means.
    Returns ``(b, y, W, stats)``.
    """
    gen = torch.Generator().manual_seed(seed)
    p = max(2, d // 6)
    a = 0.8 * torch.randn(n, p, generator=gen, dtype=F64) @ torch.randn(p, d, generator=gen, dtype=F64)
    a = (a + torch.randn(n, d, generator=gen, dtype=F64)) * torch.exp(0.5 * torch.randn(d, generator=gen, dtype=F64))
    a = a + torch.randn(d, generator=gen, dtype=F64)
    w = torch.randn(m, d, generator=gen, dtype=F64) / math.sqrt(d)
    y = a @ w.T
    b = a + noise * torch.randn(n, d, generator=gen, dtype=F64)
    return b, y, w, SiteStatistics.from_activations(b, y)


def direct_error(b, y, cols, weight, shift) -> float:
    """``sum_t ||y_t - W' b_{t,S} - c||^2`` on the tokens."""
    return float((y - b[:, cols] @ weight.T - shift).square().sum())


# --------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("refit_weights", [True, False])
@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_keeps_the_budget(method, r, refit_weights):
    b, y, w, stats = correlated_problem(0)
    ng = 48 // r
    k = ng * 2 // 3
    sel = select(method, stats, w, k, group_size=r, refit_weights=refit_weights)
    assert len(sel.kept) == k and len(set(sel.kept)) == k
    assert all(0 <= g < ng for g in sel.kept)
    assert torch.equal(sel.kept_columns, GroupLayout.build(48, r).kept_columns(sel.kept))
    assert sel.weight.shape == (10, k * r)
    assert sel.bias_shift.shape == (10,)
    assert bool(torch.isfinite(sel.weight).all()) and bool(torch.isfinite(sel.bias_shift).all())
    # Selection.error is the undamped reconstruction error of exactly what is returned.
    expected = direct_error(b, y, sel.kept_columns, sel.weight, sel.bias_shift)
    assert sel.error == pytest.approx(expected, rel=1e-8)
    if not refit_weights:  # the original columns are kept unchanged
        torch.testing.assert_close(sel.weight, w[:, sel.kept_columns], rtol=0, atol=0)


@pytest.mark.parametrize("refit_weights", [True, False])
@pytest.mark.parametrize("k", [6, None])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_respects_a_quota(method, k, refit_weights):
    b, y, w, stats = correlated_problem(1, d=48)
    r = 4
    partition = torch.arange(12) % 3  # interleaved classes, as query heads of 3 kv heads
    sel = select(method, stats, w, k, group_size=r, partition=partition, per_class=2, refit_weights=refit_weights)
    assert len(sel.kept) == 6 and len(set(sel.kept)) == 6
    assert torch.bincount(partition[sel.kept], minlength=3).tolist() == [2, 2, 2]
    assert sel.weight.shape == (10, 6 * r)


@pytest.mark.parametrize("k", [5, 7])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_quota_with_inconsistent_k_raises(method, k):
    """A budget k that the quota cannot meet (2 per class x 3 classes = 6) is an error for every method,
    as it is for greedy_select; keeping a different number of groups than asked would be silent."""
    _, _, w, stats = correlated_problem(1, d=12)
    with pytest.raises(ValueError):
        select(method, stats, w, k, partition=torch.arange(12) % 3, per_class=2)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_malformed_quota_raises_value_error(method):
    """As in greedy_select: a partition needs per_class, and every class must hold per_class groups."""
    _, _, w, stats = correlated_problem(1, d=12)
    with pytest.raises(ValueError):
        select(method, stats, w, 6, partition=torch.arange(12) % 3)
    with pytest.raises(ValueError):
        select(method, stats, w, None, partition=torch.tensor([0] * 10 + [1] * 2), per_class=3)


@pytest.mark.parametrize("k", [-1, 13])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_invalid_k_raises(method, k):
    _, _, w, stats = correlated_problem(0, d=12)
    with pytest.raises(ValueError):
        select(method, stats, w, k)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_non_finite_statistics_raise_with_site_name(method):
    _, _, w, stats = correlated_problem(0, d=12)
    stats.gram[3, 3] = math.inf
    with pytest.raises(NonFiniteStatisticsError, match=r"layers\.2\.self_attn\.o_proj"):
        select(method, stats, w, 4, site="layers.2.self_attn.o_proj")


def test_unknown_method_lists_registered_names():
    _, _, w, stats = correlated_problem(0, d=12)
    with pytest.raises(ValueError) as info:
        select("obd", stats, w, 4)
    message = str(info.value)
    assert "obd" in message
    for name in METHODS:
        assert name in message
    with pytest.raises(ValueError):
        group_scores("nope", stats, w, GroupLayout.build(12))


# --------------------------------------------------------------------------------------------------
# Refit against no refit
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_refit_is_never_worse_than_the_original_columns(method, r, seed):
    """The refit is the least-squares optimum over (W', c) for the kept columns, and the original columns
    (with FLAP's bias compensation, or none) are one feasible (W', c): so refit error <= no-refit error.

    The refit solves a ridge problem; with damping=1e-8 its objective differs from the undamped optimum
    by O(lambda ||W'||^2), far below the slack allowed (1e-9 relative).
    """
    b, y, w, stats = correlated_problem(seed)
    k = 48 // r // 2
    refitted = select(method, stats, w, k, group_size=r, refit_weights=True, damping=1e-8, seed=seed)
    original = select(method, stats, w, k, group_size=r, refit_weights=False, damping=1e-8, seed=seed)
    assert refitted.kept == original.kept
    assert refitted.error <= original.error * (1 + 1e-9)
    # And the refit is the plain least-squares optimum for those columns.
    cols = refitted.kept_columns
    x = torch.cat([b[:, cols], torch.ones(len(b), 1, dtype=F64)], 1)
    sol = torch.linalg.lstsq(x, y, driver="gelsd").solution
    assert refitted.error == pytest.approx(float((y - x @ sol).square().sum()), rel=1e-7)


# --------------------------------------------------------------------------------------------------
# FLAP's bias compensation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 4])
def test_flap_score_without_refit_compensates_the_bias(r):
    b, y, w, stats = correlated_problem(2)
    k = 48 // r // 2
    sel = select("flap-score", stats, w, k, group_size=r, refit_weights=False)
    removed = torch.ones(48, dtype=torch.bool)
    removed[sel.kept_columns] = False
    expected = w[:, removed] @ b[:, removed].mean(0)
    assert float(expected.abs().max()) > 1e-3  # non-trivial: the inputs have non-zero means
    torch.testing.assert_close(sel.bias_shift, expected, rtol=1e-10, atol=1e-12)
    # The compensation helps on these inputs with non-zero means.
    assert sel.error < direct_error(b, y, sel.kept_columns, sel.weight, torch.zeros(10, dtype=F64))


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if not METHODS[m].compensates_bias])
def test_other_methods_without_refit_have_no_bias_shift(method):
    _, _, w, stats = correlated_problem(2)
    sel = select(method, stats, w, 20, refit_weights=False)
    assert torch.count_nonzero(sel.bias_shift) == 0


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["random", "random-score"])
def test_random_is_seeded(method):
    _, _, w, stats = correlated_problem(0, d=240, n=50, m=4)
    first = select(method, stats, w, 120, seed=5)
    again = select(method, stats, w, 120, seed=5)
    other = select(method, stats, w, 120, seed=6)
    assert first.kept == again.kept
    assert set(first.kept) != set(other.kept)
    assert set(first.kept) != set(range(120))  # not simply the first groups


@pytest.mark.parametrize("method", ["magnitude", "magnitude-score"])
@pytest.mark.parametrize("r", [1, 3])
def test_magnitude_keeps_the_largest_norm_columns(r, method):
    d, m, ng = 12 * r, 5, 12
    gen = torch.Generator().manual_seed(0)
    norms = torch.randperm(ng, generator=gen).to(F64) + 1.0  # distinct group norms 1..12
    direction = torch.randn(m, d, generator=gen, dtype=F64)
    # Group g has Frobenius norm norms[g], its columns equal norms (so the sum of their norms ranks the same).
    direction = direction / direction.norm(dim=0) / math.sqrt(r)
    w = direction * norms.repeat_interleave(r)
    b = torch.randn(100, d, generator=gen, dtype=F64)
    stats = SiteStatistics.from_activations(b, b @ w.T)
    sel = select(method, stats, w, 5, group_size=r, refit_weights=False)
    assert sel.kept == torch.argsort(norms, descending=True)[:5].tolist()
    assert set(sel.kept) == {g for g in range(ng) if norms[g] > 7}


@pytest.mark.parametrize("r", [1, 4])
def test_scores_equal_the_published_formulas(r):
    b, _, w, stats = correlated_problem(3)
    layout = GroupLayout.build(48, r)
    n = b.shape[0]
    per_group = lambda col: col.view(-1, r).sum(-1)  # noqa: E731
    expected = {
        # Frobenius norm squared of the consumer columns.
        "magnitude-score": per_group(w.square().sum(0)),
        # prune_magnitude_sp: the sum of the columns' L2 norms.
        "magnitude": per_group(w.norm(dim=0)),
        # Wanda-sp: ||b_j||_2 over the tokens times ||W[:, j]||_1.
        "wanda-sp-score": per_group(b.norm(dim=0) * w.abs().sum(0)),
        # prune_wanda_sp: mean_i |W_ij| times sqrt(mean_t b_tj^2), summed over a head's columns.
        "wanda-sp": per_group(w.abs().mean(0) * b.square().mean(0).sqrt()),
        # FLAP: the input's fluctuation (variance over the tokens) times ||W[:, j]||_2^2.
        "flap-score": per_group(b.var(dim=0, unbiased=False) * w.square().sum(0)),
    }
    for name, ref in expected.items():
        torch.testing.assert_close(group_scores(name, stats, w, layout), ref, rtol=1e-9, atol=1e-12)
        # ... and select keeps the top k of that score.
        sel = select(name, stats, w, 5, group_size=r)
        assert set(sel.kept) == set(torch.topk(ref, 5).indices.tolist())
    with pytest.raises(ValueError):
        group_scores("greedy", stats, w, layout)


@pytest.mark.parametrize("method", BASELINES)
def test_explicit_groups_score_their_own_columns(method):
    b, y, w, stats = correlated_problem(5)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    groups = perm.view(-1, 4)
    explicit = select(method, stats, w, 5, groups=groups, seed=3)
    permuted = select(method, SiteStatistics.from_activations(b[:, perm], y), w[:, perm], 5, group_size=4, seed=3)
    assert explicit.kept == permuted.kept
    assert torch.equal(explicit.kept_columns, groups[explicit.kept].flatten().sort().values)
    assert explicit.error == pytest.approx(permuted.error, rel=1e-9)


# --------------------------------------------------------------------------------------------------
# Greedy against the baselines
# --------------------------------------------------------------------------------------------------


def redundant_problem(seed: int, n: int = 600, d: int = 96, m: int = 10, copies: int = 4):
    """Each of d / copies latent features appears in ``copies`` columns (scaled, plus a little own noise).

    Column j carries feature j % (d / copies), so contiguous groups repeat too (with d = 96, groups of 2
    g and g + 12 carry the same features). The consumer reads every column.
    """
    gen = torch.Generator().manual_seed(seed)
    p = d // copies
    mixing = torch.eye(p, dtype=F64) + 0.3 * torch.randn(p, p, generator=gen, dtype=F64)
    latent = torch.randn(n, p, generator=gen, dtype=F64) @ mixing
    a = latent[:, torch.arange(d) % p] + 0.1 * torch.randn(n, d, generator=gen, dtype=F64)
    a = a * torch.exp(0.5 * torch.randn(d, generator=gen, dtype=F64)) + torch.randn(d, generator=gen, dtype=F64)
    w = torch.randn(m, d, generator=gen, dtype=F64) / math.sqrt(d)
    y = a @ w.T
    b = a + 0.1 * torch.randn(n, d, generator=gen, dtype=F64)
    return b, y, w, SiteStatistics.from_activations(b, y)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("r", [1, 2])
def test_greedy_beats_every_baseline_with_refit(seed, r):
    """A property, not a theorem (greedy is not optimal, and on generic correlated data a score-based pick
    with a refit sometimes does better). It clearly holds with redundant features, the case the method is
    for: the budget fits one copy of every feature; greedy keeps distinct ones, while scores keep every
    copy of the loudest features. All methods get the same refit. (Over 20 seeds the best baseline's
    error was at least 1.9x greedy's for r in (1, 2); with r = 4 and only 24 groups the margin is thin.)"""
    _, _, w, stats = redundant_problem(seed)
    k = 24 // r  # as many columns as distinct features
    greedy = select("greedy", stats, w, k, group_size=r, damping=1e-6)
    for name in BASELINES:
        other = select(name, stats, w, k, group_size=r, damping=1e-6, seed=seed)
        assert greedy.error < other.error, name


def test_greedy_through_select_matches_greedy_select():
    from hf_subprune.maths.selection import greedy_select

    _, _, w, stats = correlated_problem(4)
    direct = greedy_select(stats, 10, group_size=2, damping=1e-4)
    via = select("greedy", stats, w, 10, group_size=2, damping=1e-4)
    assert via.kept == direct.kept
    torch.testing.assert_close(via.weight, direct.weight)
    torch.testing.assert_close(via.curve, direct.curve)
    # select reports the undamped error; greedy_select the damped objective.
    weight, shift, _, _ = refit(stats, direct.kept_columns, damping=1e-4)
    torch.testing.assert_close(via.bias_shift, shift)
