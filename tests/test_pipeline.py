"""End-to-end pruning of tiny random models of every supported family: prune, save, reload, compare."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers

from hf_subprune import PruneConfig, UnsupportedModelError, count_parameters, prune
from hf_subprune.adapters import get_adapter
from hf_subprune.maths.methods import METHODS
from hf_subprune.pipeline.widths import site_costs
from hf_subprune.pipeline.capture import capture_block_inputs, find_blocks, run_block
from hf_subprune.adapters import auto_class_for
from hf_subprune.outputs.heterogeneous import layer_widths
from hf_subprune.pipeline.statistics import accumulator_dtype, residual_weights, site_inputs
from hf_subprune.maths.selection import NonFiniteStatisticsError
from hf_subprune.pipeline.sites import attention_site, mlp_site

from conftest import calibration_ids, outputs, tiny_config, tiny_model

ALL_TYPES = ["llama", "mistral", "qwen2", "qwen3", "bert", "roberta", "gpt2"]
GQA_TYPES = ["llama", "mistral", "qwen2", "qwen3"]


def _prunable(model) -> int:
    adapter = get_adapter(model.config)
    _, blocks = find_blocks(model)
    return sum(c.mlp_params + c.attention_params for c in (site_costs(adapter, b) for b in blocks))


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_prune_save_reload_matches(model_type, tmp_path):
    model = tiny_model(model_type)
    ids = calibration_ids()
    prunable_before, total_before = _prunable(model), count_parameters(model)
    result = prune(model, budget="uniform", input_ids=ids, sparsity=0.3, batch_size=5, progress=False)

    # The config describes the weights, in every block.
    adapter = get_adapter(model.config)
    _, blocks = find_blocks(model)
    for block in blocks:
        assert adapter.weight(block.get_submodule(adapter.mlp.consumer)).shape[1] == result.widths[0].mlp
    # The parameter count lands on the budget, up to one unit of the coarsest site per block.
    removed = total_before - count_parameters(model)
    assert removed == result.params_before - result.params_after
    costs = site_costs(adapter, blocks[0])
    unit = max(costs.per_neuron, costs.per_query_head * (costs.heads // max(costs.kv_heads, 1)))
    assert abs(removed - 0.3 * prunable_before) <= unit * len(blocks)

    folder = result.save(tmp_path / "pruned")
    assert {"model.safetensors", "config.json", "subprune_report.json", "README.md"} <= {p.name for p in folder.iterdir()}
    report = json.loads((folder / "subprune_report.json").read_text())
    # Pruned BERT/GPT-2 heads need the heterogeneous export (remote code); everything else loads stock.
    assert report["export"] == ("heterogeneous" if any(s.kind == "attention" for s in result.sites)
                                and not adapter.attention.stock_export else "stock")
    reloaded = auto_class_for(model).from_pretrained(folder, trust_remote_code=report["export"] == "heterogeneous")
    probe = calibration_ids(3, 10, seed=7)
    torch.testing.assert_close(outputs(reloaded, probe), outputs(model, probe), rtol=1e-4, atol=1e-5)
    assert report["parameters"]["after"] == count_parameters(reloaded)
    assert len(report["sites"]) == len(result.sites) > 0


@pytest.mark.parametrize("model_type", ["llama", "bert", "gpt2"])
def test_zero_sparsity_leaves_model_unchanged(model_type):
    model = tiny_model(model_type)
    probe = calibration_ids(3, 10, seed=7)
    before = outputs(model, probe)
    result = prune(model, input_ids=calibration_ids(), sparsity=0.0, progress=False)
    assert result.sites == [] and result.params_after == result.params_before
    torch.testing.assert_close(outputs(model, probe), before, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "bert"])
def test_refit_never_worse_than_original_columns(model_type):
    model = tiny_model(model_type)
    result = prune(model, budget="uniform", input_ids=calibration_ids(24, 16), sparsity=0.4, progress=False, damping=1e-6)
    for site in result.sites:
        assert site.error <= site.error_original_columns * (1 + 1e-6) + 1e-9, site.name


@pytest.mark.parametrize("mode", ["query_quota", "kv_group"])
def test_grouped_query_modes_give_valid_configs(mode, tmp_path):
    model = tiny_model("llama")
    result = prune(model, input_ids=calibration_ids(), attention_sparsity=0.5, mlp_sparsity=0.0,
                   attention_mode=mode, progress=False)
    cfg = model.config
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.hidden_size % cfg.num_attention_heads == 0
    if mode == "kv_group":
        assert cfg.num_key_value_heads == 1 and cfg.num_attention_heads == 3
    else:
        assert cfg.num_key_value_heads == 2 and cfg.num_attention_heads == 2
    assert all(s.kind == "attention" for s in result.sites if s.groups_kept < s.groups_before)
    folder = result.save(tmp_path / mode)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    probe = calibration_ids(2, 12, seed=3)
    torch.testing.assert_close(outputs(reloaded, probe), outputs(model, probe), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", sorted(name for name, m in METHODS.items() if m.scope == "site"))
@pytest.mark.parametrize("refit", [True, False])
def test_every_method_prunes_to_the_same_widths(method, refit):
    """Every per-site method keeps the uniform widths (FLAP as published allocates its own: test_published_baselines)."""
    model = tiny_model("llama")
    result = prune(model, budget="uniform", input_ids=calibration_ids(), sparsity=0.3, method=method, refit=refit, progress=False)
    assert model.config.intermediate_size == result.widths[0].mlp < 40
    assert all(s.groups_kept == (result.widths[0].mlp if s.kind == "mlp" else result.widths[0].heads) for s in result.sites)


@pytest.mark.parametrize("variant", ["asymmetric", "sequential", "layerwise"])
def test_variants_agree_on_the_first_site(variant):
    """All variants see the same inputs at the first site, so they keep the same groups there."""
    picks = {}
    for v in ("asymmetric", variant):
        model = tiny_model("llama")
        result = prune(model, budget="uniform", input_ids=calibration_ids(), sparsity=0.3, variant=v, progress=False)
        picks[v] = result.sites[0].kept
    assert picks["asymmetric"] == picks[variant]


def test_results_do_not_depend_on_batch_size():
    kept, weights = [], []
    for batch_size in (1, 5, 12):
        model = tiny_model("llama")
        result = prune(model, budget="uniform", input_ids=calibration_ids(), sparsity=0.3, batch_size=batch_size, progress=False)
        kept.append([s.kept for s in result.sites])
        weights.append(model.model.layers[1].mlp.down_proj.weight.detach().clone())
    assert kept[0] == kept[1] == kept[2]
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights[0], weights[2], rtol=1e-4, atol=1e-5)


def test_statistics_summed_in_float32_cut_as_float64_does():
    """``stats_dtype="auto"`` sums in float32 (float64 for a float64 model or without shrinkage): the same cut as
    float64's, up to the refit's rounding."""
    assert accumulator_dtype("auto") == accumulator_dtype("auto", model_dtype=torch.bfloat16) == torch.float32
    assert accumulator_dtype("float64") == accumulator_dtype("auto", shrinkage=0) == torch.float64
    assert accumulator_dtype("auto", model_dtype=torch.float64) == accumulator_dtype("float64") == torch.float64
    assert accumulator_dtype("float32", model_dtype=torch.float64) == torch.float32  # as asked
    assert accumulator_dtype("auto", shrinkage=None) == torch.float32  # None: the automatic shrinkage, >= 1
    kept, weights = [], []
    for dtype in ("float64", "float32"):
        model = tiny_model("llama")
        result = prune(model, input_ids=calibration_ids(), sparsity=0.3, stats_dtype=dtype, progress=False)
        assert result.config.stats_dtype == dtype
        kept.append([s.kept for s in result.sites])
        weights.append(model.model.layers[1].mlp.down_proj.weight.detach().clone())
    assert kept[0] == kept[1]
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-4, atol=1e-5)
    # "auto" as the report says it ran: float32 for a float32 model, float64 for a float64 one
    assert prune(tiny_model("llama"), input_ids=calibration_ids(), sparsity=0.3,
                 progress=False).config.stats_dtype == "float32"
    assert prune(tiny_model("llama").double(), input_ids=calibration_ids(), sparsity=0.3,
                 progress=False).config.stats_dtype == "float64"


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_site_output_plus_declared_residual_is_the_next_stream(model_type):
    """Each site's output added to the residual stream its adapter names gives the stream after the site
    (then BERT's LayerNorm, the blocks being post-norm): what the asymmetric target's drift term relies on."""
    model = tiny_model(model_type)
    adapter, config = get_adapter(model.config), model.config
    prefix, blocks = find_blocks(model)
    block, inputs = blocks[0], capture_block_inputs(model, calibration_ids(4), 2, "cpu", "cpu")
    costs = site_costs(adapter, block)
    att = attention_site(adapter, costs, "attention", costs.heads, costs.kv_heads, "kv_group")
    mlp = mlp_site(adapter, "mlp", costs.mlp_width, costs.mlp_width)

    def written(site, a, r):
        out = r + block.get_submodule(site.consumer)(a)
        if model_type in ("bert", "roberta"):
            out = block.get_submodule(site.consumer.rsplit(".", 1)[0] + ".LayerNorm")(out)
        return out

    with torch.no_grad():
        for index in range(len(inputs.hidden)):
            a_att, r_att = site_inputs(block, att, inputs, inputs.hidden, index, "cpu")
            a_mlp, r_mlp = site_inputs(block, mlp, inputs, inputs.hidden, index, "cpu")
            after = run_block(block, inputs, inputs.hidden, index, "cpu")
            torch.testing.assert_close(r_att, inputs.hidden[index].reshape(r_att.shape))
            torch.testing.assert_close(written(att, a_att, r_att), r_mlp, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(written(mlp, a_mlp, r_mlp), after.reshape(r_mlp.shape), rtol=1e-5, atol=1e-5)


def _block_output(block, inputs, index):
    out = block(inputs.hidden[index], *inputs.args[index], **inputs.kwargs[index])
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("model_type", [*GQA_TYPES, "gpt2"])
def test_asymmetric_refit_is_least_squares_on_the_uncut_block_output(model_type):
    """The asymmetric MLP target is the uncut block's output on the cut model's input to that block (the
    block's own attention error included, not the drift of earlier blocks), so after the refit the squared
    distance between the cut and the uncut last block, on that input, is stationary in the MLP's consumer
    weights; the sequential refit, which only keeps the MLP's own response to the cut attention, is not
    (pre-norm blocks, where the MLP writes the block output)."""
    grads = {}
    for variant in ("asymmetric", "sequential"):
        model = tiny_model(model_type)
        _, blocks = find_blocks(model)
        uncut = copy.deepcopy(blocks[-1])
        prune(model, input_ids=calibration_ids(), mlp_sparsity=0.3, attention_sparsity=0.5, variant=variant,
              drift_correction=0.0, token_weights="none", damping=1e-8, shrinkage=0.0, synthetic_samples=0,
              progress=False)
        inputs = capture_block_inputs(model, calibration_ids(), 8, "cpu", "cpu")  # the statistics' tokens
        for block in blocks[:-1]:
            inputs.hidden = [run_block(block, inputs, inputs.hidden, i, "cpu") for i in range(len(inputs.hidden))]
        loss = sum((_block_output(blocks[-1], inputs, i) - _block_output(uncut, inputs, i).detach()).square().sum()
                   for i in range(len(inputs.hidden)))
        loss.backward()
        grads[variant] = float(blocks[-1].get_submodule(get_adapter(model.config).mlp.consumer).weight.grad.norm())
    assert grads["asymmetric"] < 1e-3 * grads["sequential"]


@pytest.mark.parametrize("variant, copies", [("asymmetric", False), ("sequential", False), ("layerwise", True)])
def test_only_the_layerwise_variant_copies_a_block(variant, copies, monkeypatch):
    """The asymmetric target reads the uncut block's outputs, taken before the block's first cut, instead of an
    uncut copy of the block (a block of memory: 1.7 GB at a 70B model); only the layerwise variant, whose inputs
    and stream are the uncut block's, copies it."""
    import hf_subprune.pipeline.runner as runner

    copied = []
    real = copy.deepcopy

    def spy(x, *args):
        if isinstance(x, torch.nn.Module):
            copied.append(type(x))
        return real(x, *args)

    monkeypatch.setattr(runner.copy, "deepcopy", spy)
    model = tiny_model("llama")
    prune(model, input_ids=calibration_ids(), mlp_sparsity=0.3, attention_sparsity=0.5, variant=variant,
          synthetic_samples=0, progress=False)
    _, blocks = find_blocks(model)
    assert copied == ([type(blocks[0])] * len(blocks) if copies else [])


@pytest.mark.parametrize("model_type", [*GQA_TYPES, "gpt2"])
def test_full_drift_correction_refits_towards_the_dense_model_stream(model_type):
    """With ``drift_correction=1`` the MLP target is the dense model's stream after the block, less the cut
    stream entering it: after the refit the squared distance between the cut model's last block output and the
    dense model's, each on its own stream, is stationary in the MLP's consumer weights; without the correction
    (the uncut block's output on the cut stream) it is not. ``drift_correction=0.5`` lands in between."""
    grads = {}
    for correction in (0.0, 0.5, 1.0):
        model = tiny_model(model_type)
        _, blocks = find_blocks(model)
        dense_blocks = copy.deepcopy(blocks)
        prune(model, input_ids=calibration_ids(), mlp_sparsity=0.3, attention_sparsity=0.5,
              drift_correction=correction, token_weights="none", damping=1e-8, shrinkage=0.0, synthetic_samples=0,
              progress=False)
        cut = capture_block_inputs(model, calibration_ids(), 8, "cpu", "cpu")  # the statistics' tokens
        dense = copy.copy(cut)
        for block, dense_block in zip(blocks[:-1], dense_blocks[:-1]):
            cut.hidden = [run_block(block, cut, cut.hidden, i, "cpu") for i in range(len(cut.hidden))]
            dense.hidden = [run_block(dense_block, dense, dense.hidden, i, "cpu") for i in range(len(dense.hidden))]
        loss = sum((_block_output(blocks[-1], cut, i) - _block_output(dense_blocks[-1], dense, i).detach()
                    ).square().sum() for i in range(len(cut.hidden)))
        loss.backward()
        grads[correction] = float(blocks[-1].get_submodule(get_adapter(model.config).mlp.consumer).weight.grad.norm())
    assert grads[1.0] < 1e-3 * grads[0.0]
    assert grads[1.0] < grads[0.5] < grads[0.0]


def test_drift_correction_defaults_and_bounds():
    """0.5 for a causal LM's asymmetric target, 0 for an encoder and for the other variants; the report records
    the value used; out of range or on a variant without the uncut-block target, a clear error."""
    ids = calibration_ids()
    assert prune(tiny_model("llama"), input_ids=ids, sparsity=0.3, budget="uniform", synthetic_samples=0,
                 progress=False).config.drift_correction == 0.5
    assert prune(tiny_model("llama"), input_ids=ids, sparsity=0.3, budget="uniform", variant="sequential",
                 progress=False).config.drift_correction == 0.0
    assert prune(tiny_model("bert"), input_ids=ids, sparsity=0.3, progress=False).config.drift_correction == 0.0
    # The whole-site refit follows the drift correction unless asked for.
    assert prune(tiny_model("llama"), input_ids=ids, sparsity=0.3, budget="uniform", synthetic_samples=0,
                 progress=False).config.refit_full_width is True
    assert prune(tiny_model("bert"), input_ids=ids, sparsity=0.3, progress=False).config.refit_full_width is False
    assert prune(tiny_model("llama"), input_ids=ids, sparsity=0.3, budget="uniform", synthetic_samples=0,
                 refit_full_width=False, progress=False).config.refit_full_width is False
    with pytest.raises(ValueError, match=r"drift_correction must be in \[0, 1\]"):
        PruneConfig(sparsity=0.3, drift_correction=1.5)
    with pytest.raises(ValueError, match="variant='asymmetric'"):
        PruneConfig(sparsity=0.3, drift_correction=0.5, variant="layerwise")


def test_residual_weights_discount_massive_tokens():
    """A token whose residual stream is 100x larger (an attention sink) gets ~1e-4 of the weight; the others
    keep 1 / (ms(h) + ms(y))."""
    gen = torch.Generator().manual_seed(0)
    h, y = torch.randn(2, 5, 8, generator=gen), torch.randn(10, 8, generator=gen)
    plain = residual_weights(h, y)
    torch.testing.assert_close(plain, 1 / (h.reshape(10, 8).square().mean(-1) + y.square().mean(-1)))
    h[0, 3] *= 100
    sink = residual_weights(h, y)
    assert sink[3] < 2e-4 * plain[3]
    torch.testing.assert_close(sink[torch.arange(10) != 3], plain[torch.arange(10) != 3])


def test_nan_activations_raise_a_clear_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteStatisticsError, match=r"layers\.0\.mlp"):
        prune(model, input_ids=calibration_ids(), mlp_sparsity=0.3, progress=False)


def test_unsupported_architecture_lists_supported_types():
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.OPTConfig(hidden_size=16, ffn_dim=32, num_attention_heads=2, num_hidden_layers=1,
                               vocab_size=64, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedModelError, match="llama.*qwen3"):
        prune(model, budget="uniform", input_ids=calibration_ids(vocab=64), sparsity=0.2, progress=False)


@pytest.mark.parametrize("bad", [{"sparsity": 1.0}, {"sparsity": -0.1}, {"mlp_sparsity": 1.5}, {},
                                 {"sparsity": 0.2, "method": "nope"}, {"sparsity": 0.2, "variant": "x"},
                                 {"sparsity": 0.2, "token_weights": "uniform"},
                                 {"sparsity": 0.2, "unknown_key": 1}])
def test_bad_config_is_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        PruneConfig.from_dict(bad)


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_bert_and_gpt2_heads_are_pruned_through_the_heterogeneous_export(model_type, tmp_path):
    model = tiny_model(model_type)
    result = prune(model, input_ids=calibration_ids(), attention_sparsity=0.5,
                   progress=False)
    assert [s.groups_kept for s in result.sites if s.kind == "attention"] == [2, 2]
    folder = result.save(tmp_path / "pruned")
    assert json.loads((folder / "subprune_report.json").read_text())["export"] == "heterogeneous"
    reloaded = auto_class_for(model).from_pretrained(folder, trust_remote_code=True)
    probe = calibration_ids(3, 10, seed=7)
    torch.testing.assert_close(outputs(reloaded, probe), outputs(model, probe), rtol=1e-4, atol=1e-5)


def test_overall_sparsity_on_encoders_applies_to_mlps_and_heads():
    model = tiny_model("bert")
    adapter = get_adapter(model.config)
    _, blocks = find_blocks(model)
    costs = site_costs(adapter, blocks[0])
    prunable = _prunable(model)
    result = prune(model, budget="uniform", input_ids=calibration_ids(), sparsity=0.25, progress=False)
    assert not any("MLPs only" in note for note in result.notes)
    # Every block has the budget's widths, read from its weights.
    w = result.widths[0]
    assert layer_widths(model) == [{"intermediate_size": w.mlp, "num_attention_heads": w.heads}] * len(blocks)
    # The budget counts MLP and attention parameters: it lands on 25% of both, up to one unit per block.
    removed = result.params_before - result.params_after
    assert removed == len(blocks) * (costs.mlp_params + costs.attention_params - costs.params(w))
    assert abs(removed - 0.25 * prunable) <= max(costs.per_neuron, costs.per_query_head + costs.per_kv_head) * len(blocks)


def test_existing_output_folder_is_kept_unless_overwrite(tmp_path):
    model = tiny_model("llama")
    result = prune(model, budget="uniform", input_ids=calibration_ids(), sparsity=0.3, progress=False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        result.save(target)
    assert (target / "precious.txt").read_text() == "keep me"
    result.save(target, overwrite=True)
    assert not (target / "precious.txt").exists() and (target / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left behind


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    config = PruneConfig.from_file(recipe)
    assert config.sparsity is not None and config.num_samples >= 1


def test_full_width_refit_fits_the_sites_kept_whole():
    """``refit_full_width``: a site that keeps all its channels (here every attention, only MLPs are cut) is refit
    too: its consumer changes but keeps its shape, the report lists it whole, and with the drift correction the
    model's output on the calibration tokens comes closer to the dense model's than without that refit."""
    ids = calibration_ids()
    dense = tiny_model("llama")
    with torch.no_grad():
        reference = dense(ids).logits
    errors, reports = {}, {}
    for full_width in (False, True):
        model = copy.deepcopy(dense)
        reports[full_width] = prune(model, input_ids=ids, mlp_sparsity=0.3, drift_correction=1.0, shrinkage=0.0,
                                    damping=1e-6, synthetic_samples=0, refit_full_width=full_width, progress=False)
        with torch.no_grad():
            errors[full_width] = float((model(ids).logits - reference).square().mean())
        o_proj = find_blocks(model)[1][-1].self_attn.o_proj.weight
        dense_o_proj = find_blocks(dense)[1][-1].self_attn.o_proj.weight
        assert o_proj.shape == dense_o_proj.shape
        assert torch.equal(o_proj, dense_o_proj) != full_width
    whole = [s for s in reports[True].sites if s.kind == "attention"]
    assert whole and all(s.groups_kept == s.groups_before for s in whole)
    assert not [s for s in reports[False].sites if s.kind == "attention"]
    assert errors[True] < errors[False]
