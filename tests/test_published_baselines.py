"""The published baselines against small re-implementations written here from the papers' recipes.

Every reference works on raw activations captured with plain forward hooks on the consumers (o_proj / down_proj
and their BERT counterparts), not through hf_subprune's statistics, and prunes a copy of the model by zeroing the
removed consumer columns (and, for FLAP, adding the compensation to the output), which is what cutting the units
does. FLAP follows the official code (lib/prune.py prune_flap, WIFV, AL-AM); wanda-sp and magnitude the FLAP
repository's prune_wanda_sp / prune_magnitude_sp; layer-greedy-fs a brute-force greedy on the tokens.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers

from hf_subprune import PruneConfig, prune
from hf_subprune.maths.methods import select
from hf_subprune.maths.selection import SiteStatistics
from hf_subprune.pipeline.budget import GLOBAL_FROM_SPARSITY

from conftest import calibration_ids, outputs, tiny_config, tiny_model

F64 = torch.float64

# Where the consumers and the producers of each tiny family are: written out here, not read from the adapters.
FAMILIES = {
    "llama": dict(layers=lambda m: m.model.layers, attention="self_attn.o_proj", mlp="mlp.down_proj",
                  qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  producers=("mlp.gate_proj", "mlp.up_proj"), heads=6, kv_heads=2, head_dim=8),
    "bert": dict(layers=lambda m: m.encoder.layer, attention="attention.output.dense", mlp="output.dense",
                 qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
                 producers=("intermediate.dense",), heads=4, kv_heads=4, head_dim=8),
}
KINDS = ("attention", "mlp")


def consumer_inputs(model, family: str, ids: torch.Tensor, only: tuple[int, str] | None = None) -> dict:
    """Every consumer's input over all tokens (tokens x features), from one plain forward with pre-hooks."""
    fam = FAMILIES[family]
    seen, handles = {}, []

    def keep(key):
        def hook(module, args):
            seen[key] = args[0].reshape(-1, args[0].shape[-1]).double()
        return hook

    for i, layer in enumerate(fam["layers"](model)):
        for kind in KINDS:
            if only is None or only == (i, kind):
                handles.append(layer.get_submodule(fam[kind]).register_forward_pre_hook(keep((i, kind))))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def unit_columns(family: str, kind: str, width: int) -> list[list[int]]:
    """Consumer columns of each unit: a kv group (its query heads' columns) or a neuron."""
    fam = FAMILIES[family]
    if kind == "mlp":
        return [[j] for j in range(width)]
    size = fam["heads"] // fam["kv_heads"] * fam["head_dim"]
    return [list(range(g * size, (g + 1) * size)) for g in range(fam["kv_heads"])]


def rows_params(module) -> int:
    return module.out_features * (module.in_features + (module.bias is not None))


def flap_reference(model, family: str, ids: torch.Tensor, sparsity: float):
    """FLAP (WIFV, AL-AM) by hand: returns the kept units per (layer, kind) and the dense input means."""
    fam = FAMILIES[family]
    layers = fam["layers"](model)
    acts = consumer_inputs(model, family, ids)  # one forward of the dense model: each block on dense inputs
    layer = layers[0]
    hd, per_kv = fam["head_dim"], fam["heads"] // fam["kv_heads"]
    neuron = sum(layer.get_submodule(p).in_features + (layer.get_submodule(p).bias is not None)
                 for p in fam["producers"]) + layer.get_submodule(fam["mlp"]).out_features
    q, k, v = (layer.get_submodule(p) for p in fam["qkv"])
    o = layer.get_submodule(fam["attention"])
    group = (rows_params(q) * per_kv // fam["heads"] + o.out_features * per_kv * hd
             + rows_params(k) // fam["kv_heads"] + rows_params(v) // fam["kv_heads"])
    keys, scores, weights, means = [], [], [], {}
    for kind in KINDS:  # FLAP concatenates every attention layer, then every MLP layer
        for i, layer in enumerate(layers):
            x = acts[i, kind]
            w = layer.get_submodule(fam[kind]).weight.detach().double()
            means[i, kind] = x.mean(0)
            metric = x.var(0, unbiased=False) * w.pow(2).sum(0)
            if kind == "attention":
                metric = metric ** 2
            metric = (metric - metric.mean()) / metric.std()
            cols = unit_columns(family, kind, w.shape[1])
            unit = torch.stack([metric[c].mean() for c in cols])
            keys.append((i, kind))
            scores.append(unit)
            weights.append(torch.full((len(unit),), group / neuron if kind == "attention" else 1.0, dtype=F64))
    flat, weight = torch.cat(scores), torch.cat(weights)
    order = torch.sort(flat, descending=True, stable=True).indices
    cumulative = torch.cumsum(weight[order], 0)
    threshold = flat[order[torch.argmin((cumulative - weight.sum() * (1 - sparsity)).abs())]]
    kept = {}
    for key, unit in zip(keys, scores):
        units = [g for g in range(len(unit)) if unit[g] > threshold] or [int(torch.argmax(unit))]
        kept[key] = units
    return kept, means


def zero_removed(model, family: str, i: int, kind: str, kept_columns: list[int], shift: torch.Tensor | None = None):
    """Prune by masking: zero the consumer's removed columns (and add ``shift`` to its output)."""
    module = FAMILIES[family]["layers"](model)[i].get_submodule(FAMILIES[family][kind])
    with torch.no_grad():
        mask = torch.zeros(module.in_features, dtype=torch.bool)
        mask[kept_columns] = True
        module.weight[:, ~mask] = 0
    if shift is not None:
        module.register_forward_hook(lambda mod, args, out, s=shift.float(): out + s)


def reported_kept(result) -> dict:
    return {(s.block, s.kind): s.kept for s in result.sites}


# --------------------------------------------------------------------------------------------------
# FLAP
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, sparsity", [("llama", 0.3), ("llama", 0.5), ("bert", 0.3)])
def test_flap_matches_the_official_recipe(family, sparsity):
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    ids = calibration_ids(12, 16)
    expected, means = flap_reference(dense, family, ids, sparsity)
    result = prune(model, input_ids=ids, sparsity=sparsity, method="flap", batch_size=5, progress=False)

    got = reported_kept(result)
    fam = FAMILIES[family]
    reference = copy.deepcopy(dense)
    for (i, kind), units in expected.items():
        dense_layer, layer = fam["layers"](dense)[i], fam["layers"](model)[i]
        w = dense_layer.get_submodule(fam[kind]).weight.detach().double()
        cols = unit_columns(family, kind, w.shape[1])
        if len(units) == len(cols):
            assert (i, kind) not in got  # nothing removed, no report, untouched
            continue
        assert got[i, kind] == units, (i, kind)
        kept_columns = sorted(c for g in units for c in cols[g])
        removed = sorted(set(range(w.shape[1])) - set(kept_columns))
        shift = w[:, removed] @ means[i, kind][removed]
        consumer = layer.get_submodule(fam[kind])
        torch.testing.assert_close(consumer.weight.double(), w[:, kept_columns], rtol=0, atol=0)
        bias = dense_layer.get_submodule(fam[kind]).bias
        torch.testing.assert_close(consumer.bias.double(), (0 if bias is None else bias.double()) + shift,
                                   rtol=1e-5, atol=1e-6)
        zero_removed(reference, family, i, kind, kept_columns, shift)
    probe = calibration_ids(3, 10, seed=7)
    torch.testing.assert_close(outputs(model, probe), outputs(reference, probe), rtol=1e-4, atol=1e-5)
    # Its own settings, whatever the config asked, and a report that says so.
    assert (result.config.refit, result.config.variant, result.config.token_weights) == (False, "layerwise", "none")
    assert any("flap as published" in n for n in result.notes)
    assert any("site(s) would have lost every unit" in n for n in result.notes)
    for site in result.sites:  # errors from the dense statistics, with the bias compensation
        assert site.error <= site.error_original_columns * (1 + 1e-9)


def test_flap_adds_the_llama_biases_it_needs():
    model = tiny_model("llama")
    result = prune(model, input_ids=calibration_ids(), sparsity=0.5, method="flap", progress=False)
    assert {s.kind for s in result.sites} == {"attention", "mlp"}
    assert model.config.attention_bias and model.config.mlp_bias
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.count_nonzero(getattr(layer.self_attn, name).bias) == 0
        for name in ("gate_proj", "up_proj"):
            assert torch.count_nonzero(getattr(layer.mlp, name).bias) == 0
    assert any("attention_bias=True" in n for n in result.notes) and any("mlp_bias=True" in n for n in result.notes)


def test_flap_without_a_bias_flag_skips_the_compensation():
    """Qwen2's o_proj and down_proj are built without a bias whatever the config says: no compensation, said."""
    model = tiny_model("qwen2")
    result = prune(model, input_ids=calibration_ids(), sparsity=0.5, method="flap", progress=False)
    assert model.model.layers[0].mlp.down_proj.bias is None
    assert any("without FLAP's bias compensation" in n for n in result.notes)
    for site in result.sites:
        assert site.error == pytest.approx(site.error_original_columns)


@pytest.mark.parametrize("layers", [1, 2])
def test_flap_llama_saves_and_reloads(layers, tmp_path):
    """Per-layer widths go through the heterogeneous export, uniform ones (one layer) through the stock one; both
    reload with the added biases and give the same outputs."""
    config = tiny_config("llama")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    result = prune(model, input_ids=calibration_ids(), sparsity=0.5, method="flap", progress=False)
    folder = result.save(tmp_path / "pruned")
    report = json.loads((folder / "subprune_report.json").read_text())
    assert report["export"] == ("stock" if result.uniform else "heterogeneous")
    assert (layers == 1) == result.uniform
    saved = json.loads((folder / "config.json").read_text())
    assert saved["mlp_bias"] is True
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder,
                                                                 trust_remote_code=report["export"] == "heterogeneous")
    assert reloaded.model.layers[0].mlp.down_proj.bias is not None
    probe = calibration_ids(3, 10, seed=7)
    torch.testing.assert_close(outputs(reloaded, probe), outputs(model, probe), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [{"mlp_sparsity": 0.3}, {"attention_sparsity": 0.3},
                                 {"sparsity": 0.3, "mlp_sparsity": 0.3}])
def test_flap_needs_one_overall_sparsity(bad):
    with pytest.raises(ValueError, match="one overall `sparsity`"):
        PruneConfig(method="flap", **bad)
    with pytest.raises(ValueError, match="mlp_sparsity / attention_sparsity"):
        prune(tiny_model("llama"), input_ids=calibration_ids(), method="flap", progress=False, **bad)


def test_flap_at_zero_sparsity_changes_nothing():
    model = tiny_model("llama")
    probe = calibration_ids(3, 10, seed=7)
    before = outputs(model, probe)
    result = prune(model, input_ids=calibration_ids(), sparsity=0.0, method="flap", progress=False)
    assert result.sites == [] and result.params_after == result.params_before
    torch.testing.assert_close(outputs(model, probe), before, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Per-site published methods: layer by layer on the pruned-so-far stream, uniform widths, no refit
# --------------------------------------------------------------------------------------------------


def wanda_sp_units(x, w, units):
    """prune_wanda_sp: mean_i |W_ij| * sqrt(mean_t x_tj^2), summed over a unit's columns."""
    column = w.abs().mean(0) * x.pow(2).mean(0).sqrt()
    return [float(column[c].sum()) for c in units]


def magnitude_units(x, w, units):
    """prune_magnitude_sp: ||W[:, j]||_2, summed over a unit's columns."""
    column = w.norm(dim=0)
    return [float(column[c].sum()) for c in units]


def top_units(scores: list[float], keep: int, classes: list[int]) -> list[int]:
    """The ``keep`` best units of every class (ties to the lower index)."""
    kept = []
    for c in sorted(set(classes)):
        members = sorted((g for g in range(len(scores)) if classes[g] == c), key=lambda g: (-scores[g], g))
        kept += members[:keep]
    return sorted(kept)


def brute_force_greedy(x, w, units, keep: int, classes: list[int]) -> list[int]:
    """Greedy forward selection, each candidate's error evaluated on the tokens: ||X W^T - X_S W_S^T||^2."""
    target = x @ w.T
    chosen: list[int] = []
    for _ in range(keep * len(set(classes))):
        best, best_error = None, math.inf
        for g in range(len(units)):
            if g in chosen or sum(classes[h] == classes[g] for h in chosen) >= keep:
                continue
            cols = [c for h in chosen + [g] for c in units[h]]
            error = float((target - x[:, cols] @ w[:, cols].T).square().sum())
            if error < best_error:
                best, best_error = g, error
        chosen.append(best)
    return chosen


def sequential_reference(model, widths, ids, choose):
    """Prune a copy of a tiny Llama layer by layer (attention, then MLP), each site chosen on the inputs of the
    copy pruned so far; query heads under a per-kv-group quota (the default attention mode)."""
    fam = FAMILIES["llama"]
    reference = copy.deepcopy(model)
    hd, per_kv = fam["head_dim"], fam["heads"] // fam["kv_heads"]
    kept = {}
    for i, layer in enumerate(fam["layers"](reference)):
        for kind in KINDS:
            w = layer.get_submodule(fam[kind]).weight.detach().double()
            if kind == "attention":
                if widths.heads == fam["heads"]:
                    continue
                units = [list(range(h * hd, (h + 1) * hd)) for h in range(fam["heads"])]
                classes, keep = [h // per_kv for h in range(fam["heads"])], widths.heads // fam["kv_heads"]
            else:
                if widths.mlp == w.shape[1]:
                    continue
                units, classes, keep = [[j] for j in range(w.shape[1])], [0] * w.shape[1], widths.mlp
            x = consumer_inputs(reference, "llama", ids, only=(i, kind))[i, kind]
            kept[i, kind] = choose(x, w, units, keep, classes)
            zero_removed(reference, "llama", i, kind, sorted(c for g in kept[i, kind] for c in units[g]))
    return kept, reference


CHOOSERS = {
    "wanda-sp": lambda x, w, units, keep, classes: top_units(wanda_sp_units(x, w, units), keep, classes),
    "magnitude": lambda x, w, units, keep, classes: top_units(magnitude_units(x, w, units), keep, classes),
    "layer-greedy-fs": lambda x, w, units, keep, classes: sorted(brute_force_greedy(x, w, units, keep, classes)),
}


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("method", sorted(CHOOSERS))
def test_per_site_published_methods_match_a_hand_computation(method):
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    ids = calibration_ids(12, 16)
    result = prune(model, input_ids=ids, sparsity=0.4, method=method, progress=False)
    expected, reference = sequential_reference(dense, result.widths[0], ids, CHOOSERS[method])
    assert set(expected) == set(reported_kept(result)) and len(expected) == 4
    assert reported_kept(result) == expected
    assert result.config.refit is False and result.config.token_weights == "none"
    assert result.config.variant == "sequential" and result.uniform
    probe = calibration_ids(3, 10, seed=7)
    torch.testing.assert_close(outputs(model, probe), outputs(reference, probe), rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("r, quota", [(1, False), (3, False), (2, True)])
def test_layer_greedy_fs_is_the_brute_force_greedy(r, quota):
    """On random correlated activations: the picks (in order) and the error curve of the brute-force greedy."""
    gen = torch.Generator().manual_seed(r)
    n, d, m = 200, 24, 7
    x = (torch.randn(n, 4, generator=gen, dtype=F64) @ torch.randn(4, d, generator=gen, dtype=F64)
         + torch.randn(n, d, generator=gen, dtype=F64) + torch.randn(d, generator=gen, dtype=F64))
    w = torch.randn(m, d, generator=gen, dtype=F64)
    units = [list(range(g * r, (g + 1) * r)) for g in range(d // r)]
    classes = [g % 2 for g in range(len(units))] if quota else [0] * len(units)
    keep = 3 if quota else len(units) // 2
    expected = brute_force_greedy(x, w, units, keep, classes)
    stats = SiteStatistics.from_activations(x, x @ w.T)
    sel = select("layer-greedy-fs", stats, w, len(expected), group_size=r, refit_weights=False,
                 partition=torch.tensor(classes) if quota else None, per_class=keep if quota else None)
    assert sel.kept == expected
    errors = [float((x @ w.T - x[:, c] @ w[:, c].T).square().sum())
              for c in ([col for g in expected[: s + 1] for col in units[g]] for s in range(len(expected)))]
    torch.testing.assert_close(sel.curve, torch.tensor(errors, dtype=F64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sel.weight, w[:, sel.kept_columns])
    assert sel.error == pytest.approx(errors[-1], rel=1e-9)


def test_random_is_seeded_reproducible_and_keeps_the_widths():
    kept = {}
    for seed in (0, 0, 1):
        model = tiny_model("llama")
        result = prune(model, input_ids=calibration_ids(), sparsity=0.4, method="random", seed=seed, progress=False)
        w = result.widths[0]
        for s in result.sites:
            assert s.groups_kept == len(s.kept) == (w.mlp if s.kind == "mlp" else w.heads)
            assert len(set(s.kept)) == len(s.kept)
        assert model.config.intermediate_size == w.mlp and result.config.refit is False
        kept.setdefault(seed, []).append(reported_kept(result))
    assert kept[0][0] == kept[0][1]
    assert kept[0][0] != kept[1][0]


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_data_free_methods_ignore_the_calibration(method):
    """magnitude and random read no calibration data: two calibrations of different sizes and tokens give the same
    pruned weights (bench_data_efficiency runs them once per seed and draws that run at every n)."""
    states = []
    for ids in (calibration_ids(n=4, seed=1), calibration_ids(n=12, seed=2)):
        model = tiny_model("llama")
        prune(model, input_ids=ids, sparsity=0.4, method=method, seed=0, progress=False)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_flap_allocation_weights_units_and_keeps_one_unit_per_site():
    """Two sites: 4 heavy units (weight 3) and 6 light ones (weight 1), total 18. In score order the cumulative
    weight runs 3, 4, 5, 6, 7, 8, 9, ...: it meets 50% (9) at the seventh unit (score -0.5), the threshold; the units
    scoring above it are kept, the one on it is not. A site whose every score is below keeps its best unit."""
    from hf_subprune.maths.methods import flap_allocate

    heavy = torch.tensor([0.9, -1.0, -2.0, -3.0], dtype=F64)
    light = torch.tensor([0.8, 0.7, 0.5, 0.4, -0.5, 0.0], dtype=F64)
    out = flap_allocate([heavy, light], [3.0, 1.0], 0.5)
    assert out.kept[0].tolist() == [True, False, False, False]
    assert out.kept[1].tolist() == [True, True, True, True, False, True]
    assert out.threshold == -0.5 and out.floored == 0
    low = torch.tensor([-5.0, -4.0, -6.0], dtype=F64)
    out = flap_allocate([heavy, low], [3.0, 1.0], 0.5)
    assert out.kept[1].tolist() == [False, True, False] and out.floored == 1


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_fluctuation_budget_takes_flaps_widths_and_greedy_picks_within(family):
    """``budget="fluctuation"``: the widths FLAP's allocation gives, then greedy selection and refit inside them."""
    ids = calibration_ids(12, 16)
    flap = prune(tiny_model(family), input_ids=ids, sparsity=0.4, method="flap", progress=False)
    model = tiny_model(family)
    # asked: the decoders' default below GLOBAL_FROM_SPARSITY, never the encoders'
    ours = prune(model, input_ids=ids, sparsity=0.4, budget="fluctuation", progress=False, synthetic_samples=0)
    assert [(w.mlp, w.heads, w.kv_heads) for w in ours.widths] == [(w.mlp, w.heads, w.kv_heads) for w in flap.widths]
    assert ours.config.method == "greedy" and ours.config.refit and ours.config.budget == "fluctuation"
    assert ours.config.attention_mode == "kv_group"  # FLAP's attention units, whatever was asked
    assert any("fluctuation budget" in n for n in ours.notes)
    assert ours.params_after <= flap.params_after  # FLAP's added zero biases aside, the same kept units
    assert PruneConfig(mlp_sparsity=0.4).budget == "uniform"  # per-type sparsities: uniform widths


def test_default_budget_needs_enough_calibration_tokens():
    """By default, FLAP's allocation from 64 calibration tokens on, uniform widths below, and the report says why."""
    enough = prune(tiny_model("llama"), input_ids=calibration_ids(4, 16), sparsity=0.25, synthetic_samples=0,
                   progress=False)
    few = prune(tiny_model("llama"), input_ids=calibration_ids(3, 16), sparsity=0.25, synthetic_samples=0,
                progress=False)
    assert enough.config.budget == "fluctuation" and few.config.budget == "uniform"
    assert any("too few for the default per-layer budget" in n for n in few.notes)
    assert PruneConfig(sparsity=0.3).budget is None and PruneConfig(sparsity=0.3, budget="global").budget == "global"


def test_default_budget_turns_global_at_global_from_sparsity():
    """From GLOBAL_FROM_SPARSITY on, a decoder's default budget is the global one (the report says so), with the
    widths and weights of asking for it; below, and when a budget is asked, nothing changes."""
    ids = calibration_ids(8, 16)
    default_model, asked_model = tiny_model("llama"), tiny_model("llama")
    deep = prune(default_model, input_ids=ids, sparsity=GLOBAL_FROM_SPARSITY, synthetic_samples=0, progress=False)
    assert deep.config.budget == "global" and any("global budget: the default" in n for n in deep.notes)
    asked = prune(asked_model, input_ids=ids, sparsity=GLOBAL_FROM_SPARSITY, budget="global", synthetic_samples=0,
                  progress=False)
    assert [(w.mlp, w.heads, w.kv_heads) for w in deep.widths] == [(w.mlp, w.heads, w.kv_heads) for w in asked.widths]
    assert len({w.mlp for w in deep.widths}) > 1  # per-layer widths, not uniform ones
    for name, tensor in asked_model.state_dict().items():
        torch.testing.assert_close(default_model.state_dict()[name], tensor, rtol=0, atol=0)
    assert not any("global budget: the default" in n for n in asked.notes)
    below = prune(tiny_model("llama"), input_ids=ids, sparsity=GLOBAL_FROM_SPARSITY - 0.05, synthetic_samples=0,
                  progress=False)
    assert below.config.budget == "fluctuation"
    kept = prune(tiny_model("llama"), input_ids=ids, sparsity=0.5, budget="fluctuation", synthetic_samples=0,
                 progress=False)
    assert kept.config.budget == "fluctuation"


def test_encoders_default_to_uniform_widths():
    """FLAP's allocation is the decoders' default; an encoder keeps the same widths in every block unless it asks,
    and the report says why."""
    ids = calibration_ids(12, 16)
    default = prune(tiny_model("bert"), input_ids=ids, sparsity=0.4, progress=False)
    assert default.config.budget == "uniform" and default.uniform
    assert len({(w.mlp, w.heads) for w in default.widths}) == 1
    assert any("default for encoders" in n for n in default.notes)
    asked = prune(tiny_model("bert"), input_ids=ids, sparsity=0.4, budget="fluctuation", progress=False)
    assert asked.config.budget == "fluctuation" and not any("default for encoders" in n for n in asked.notes)
