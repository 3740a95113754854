"""What the greedy chooses on: the refit's error, or the kept columns' own error (LayerGreedyFS's criterion) where
a site saw fewer calibration tokens than a quarter of its input columns."""

from __future__ import annotations

import pytest
import torch

from conftest import calibration_ids, tiny_model
from hf_subprune import PruneConfig, prune
from hf_subprune.maths.methods import layer_greedy_fs, select
from hf_subprune.maths.selection import GroupLayout, SiteStatistics
from hf_subprune.pipeline.runner import selection_error_for


def _stats(tokens: int, d: int = 40, m: int = 5, seed: int = 0) -> tuple[SiteStatistics, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen,
                                                                                  dtype=torch.float64)
    weight = torch.randn(m, d, generator=gen, dtype=torch.float64)
    return SiteStatistics.from_activations(x, x @ weight.T), weight


def test_auto_chooses_on_the_original_columns_below_a_token_per_four_columns():
    few, _ = _stats(tokens=9)
    many, _ = _stats(tokens=10)
    auto = PruneConfig(sparsity=0.3)
    assert selection_error_for(auto, few) == "original" and selection_error_for(auto, many) == "refit"
    assert selection_error_for(PruneConfig(sparsity=0.3, selection_error="refit"), few) == "refit"
    assert selection_error_for(PruneConfig(sparsity=0.3, selection_error="original"), many) == "original"
    with pytest.raises(ValueError, match="selection_error"):
        PruneConfig(sparsity=0.3, selection_error="best")


def test_original_error_picks_as_layer_greedy_fs_then_refits():
    stats, weight = _stats(tokens=8)
    picked, _ = layer_greedy_fs(stats, weight, GroupLayout.build(40, 1, None), 7)
    chosen = select("greedy", stats, weight, 7, selection_error="original", damping=1e-2, prior=weight,
                    shrinkage=1.5)
    assert sorted(chosen.kept) == sorted(picked) and chosen.diagnostics["selection_error"] == "original"
    assert not torch.allclose(chosen.weight, weight[:, chosen.kept_columns])  # refitted after the choice
    kept_as_is = select("greedy", stats, weight, 7, selection_error="original", refit_weights=False)
    torch.testing.assert_close(kept_as_is.weight, weight[:, kept_as_is.kept_columns])
    refit = select("greedy", stats, weight, 7, damping=1e-2, prior=weight, shrinkage=1.5)
    assert refit.diagnostics["selection_error"] == "refit"


def test_prune_reports_which_error_each_site_chose_on():
    """A tiny Llama (MLP 40 columns, attention 48): 8 tokens are fewer than a quarter of either, 400 more than
    both."""
    few = prune(tiny_model("llama"), input_ids=calibration_ids(1, 8), sparsity=0.3, synthetic_samples=0,
                budget="uniform", progress=False)
    many = prune(tiny_model("llama"), input_ids=calibration_ids(25, 16), sparsity=0.3, budget="uniform",
                 progress=False)
    assert {s.diagnostics["selection_error"] for s in few.sites} == {"original"}
    assert {s.diagnostics["selection_error"] for s in many.sites} == {"refit"}
    assert few.config.selection_error == "auto"
