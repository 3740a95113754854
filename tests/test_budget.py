"""Global budgets: the allocation against brute force, and a global prune of a tiny model."""

from __future__ import annotations

import itertools
import random

import pytest

from hf_subprune import prune
from hf_subprune.maths.allocation import SiteOptions, allocate, mlp_options

from conftest import calibration_ids, tiny_model


def _random_sites(seed: int, n_sites: int = 4) -> list[SiteOptions]:
    rng = random.Random(seed)
    sites = []
    for s in range(n_sites):
        widths = sorted(rng.sample(range(1, 20), 4))
        params = [w * rng.choice([3, 5]) for w in widths]
        # decreasing errors, not necessarily convex
        errors = sorted((rng.random() for _ in widths), reverse=True)
        errors[-1] = 0.0
        sites.append(SiteOptions(s, "mlp", tuple(widths), tuple(params), tuple(errors)))
    return sites


@pytest.mark.parametrize("seed", range(8))
def test_allocation_meets_the_budget_and_is_near_optimal(seed):
    sites = _random_sites(seed)
    total = sum(max(o.params) for o in sites)
    budget = int(0.6 * total)
    pick = allocate(sites, budget)
    cost = sum(o.params[j] for o, j in zip(sites, pick))
    error = sum(o.errors[j] for o, j in zip(sites, pick))
    assert cost <= budget
    best = min(sum(o.errors[j] for o, j in zip(sites, combo))
               for combo in itertools.product(*(range(len(o.params)) for o in sites))
               if sum(o.params[j] for o, j in zip(sites, combo)) <= budget)
    # The Lagrangian answer plus the greedy fill is optimal on the convex hull; allow the duality gap.
    assert error <= best + max(max(o.errors) for o in sites)
    assert error >= best - 1e-12


def test_budget_below_minimum_widths_is_refused():
    sites = _random_sites(0)
    with pytest.raises(ValueError, match="minimum widths"):
        allocate(sites, sum(min(o.params) for o in sites) - 1)


def test_mlp_options_follow_the_rounding_grid_and_floor():
    curve = [10.0 - i for i in range(10)]
    widths, params, errors = mlp_options(curve, 10.0, 10, 3, 4, 3)
    assert widths == (4, 8, 10) and params == (12, 24, 30)
    assert errors == (curve[3] / 10, curve[7] / 10, 0.0)


def test_global_prune_lands_on_budget_with_per_block_widths():
    model = tiny_model("llama")
    result = prune(model, input_ids=calibration_ids(16, 16), sparsity=0.4, budget="global", mlp_multiple=4,
                   progress=False)
    assert len(result.widths) == model.config.num_hidden_layers
    assert all(w.mlp % 4 == 0 and w.mlp >= 4 for w in result.widths)
    removed = result.params_before - result.params_after
    assert removed > 0
    note = next(n for n in result.notes if n.startswith("global budget"))
    assert "asked 40%" in note
    uniform = prune(tiny_model("llama"), budget="uniform", input_ids=calibration_ids(16, 16), sparsity=0.4, mlp_multiple=4,
                    progress=False)
    assert result.params_after <= uniform.params_after  # compared at equal size, never larger
    for block, w in zip(model.model.layers, result.widths):
        assert block.mlp.down_proj.weight.shape[1] == w.mlp
        assert block.self_attn.q_proj.weight.shape[0] == w.heads * 8


def test_global_budget_needs_one_overall_sparsity():
    with pytest.raises(ValueError, match="overall"):
        prune(tiny_model("llama"), input_ids=calibration_ids(), mlp_sparsity=0.3, budget="global", progress=False)


def test_global_prune_saves_heterogeneous_and_reloads(tmp_path):
    import json

    import torch
    import transformers

    from conftest import outputs

    model = tiny_model("qwen3")
    result = prune(model, input_ids=calibration_ids(16, 16), sparsity=0.4, budget="global", progress=False)
    folder = result.save(tmp_path / "global")
    report = json.loads((folder / "subprune_report.json").read_text())
    assert report["uniform"] is False and report["export"] == "heterogeneous"
    config = json.loads((folder / "config.json").read_text())
    assert config["per_layer_config"] and "AutoModelForCausalLM" in config["auto_map"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    probe = calibration_ids(2, 12, seed=5)
    torch.testing.assert_close(outputs(reloaded, probe), outputs(model, probe), rtol=1e-4, atol=1e-5)
