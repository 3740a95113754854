"""The heterogeneous export: per-layer widths in config.json, a modeling file wired with auto_map, and a
reload with trust_remote_code=True that reproduces the pruned model; uniform Llama widths stay stock."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from hf_subprune import prune
from hf_subprune.adapters import get_adapter
from hf_subprune.pipeline.capture import find_blocks
from hf_subprune.pipeline.widths import site_costs
from hf_subprune.adapters import auto_class_for
from hf_subprune.outputs.export import check_reload
from hf_subprune.outputs.heterogeneous import REMOTE_FILE, layer_widths, needs_heterogeneous, write_heterogeneous
from hf_subprune.pipeline.sites import attention_site, mlp_site
from hf_subprune.pipeline.surgery import apply_selection

from conftest import calibration_ids, outputs, tiny_model


def _kept_groups(site, generator: torch.Generator) -> list[int]:
    """Random kept groups that respect a grouped-query quota (the same count in every kv group)."""
    if site.partition is None:
        return sorted(torch.randperm(site.num_groups, generator=generator)[: site.keep].tolist())
    kept = []
    for cls in range(int(site.partition.max()) + 1):
        members = (site.partition == cls).nonzero().flatten()
        kept += members[torch.randperm(len(members), generator=generator)[: site.per_class]].tolist()
    return sorted(kept)


@torch.no_grad()
def cut_block(model, index: int, *, heads: int | None = None, kv_heads: int | None = None, mlp: int | None = None,
              mode: str = "query_quota") -> None:
    """Prune one block to the given widths with random kept groups and a perturbed ("refitted") consumer."""
    adapter = get_adapter(model.config)
    prefix, blocks = find_blocks(model)
    block = blocks[index]
    gen = torch.Generator().manual_seed(index)
    sites = []
    if heads is not None:
        sites.append(attention_site(adapter, site_costs(adapter, block), f"{prefix}.{index}.attention", heads, kv_heads,
                                    mode))
    if mlp is not None:
        width = adapter.weight(block.get_submodule(adapter.mlp.consumer)).shape[1]
        sites.append(mlp_site(adapter, f"{prefix}.{index}.mlp", width, mlp))
    for site in sites:
        kept = _kept_groups(site, gen)
        weight = adapter.weight(block.get_submodule(site.consumer)).detach()[:, site.groups[kept].flatten()]
        apply_selection(block, adapter, site, kept, weight + 0.01 * torch.randn(weight.shape, generator=gen), None)


def _reload(model, folder, **kwargs):
    return auto_class_for(model).from_pretrained(folder, **kwargs)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral", "qwen2"])
def test_llama_family_with_per_layer_widths_reloads_with_remote_code(model_type, tmp_path):
    model = tiny_model(model_type)
    probe = calibration_ids(2, 12, seed=3)
    cut_block(model, 0, heads=4, kv_heads=2, mlp=24)  # 2 query heads per kv head, narrower MLP
    cut_block(model, 1, heads=3, kv_heads=1, mode="kv_group")  # one kv group left: 3 heads (48 % 3 == 0)
    assert layer_widths(model) == [
        {"intermediate_size": 24, "num_attention_heads": 4, "num_key_value_heads": 2},
        {"intermediate_size": 40, "num_attention_heads": 3, "num_key_value_heads": 1},
    ]
    assert needs_heterogeneous(model)
    model.save_pretrained(tmp_path)
    export = write_heterogeneous(model, tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert (tmp_path / REMOTE_FILE).exists()
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_subprune.SubprunedForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "modeling_subprune.SubprunedConfig"
    # Sparse overrides against the global widths (ties go to the larger width).
    assert config["intermediate_size"] == 40 and config["head_dim"] == 8
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["per_layer_config"] == {"0": {"intermediate_size": 24},
                                          "1": {"num_attention_heads": 3, "num_key_value_heads": 1}}
    assert export.per_layer_config == {0: {"intermediate_size": 24}, 1: {"num_attention_heads": 3, "num_key_value_heads": 1}}
    assert f'STOCK_MODEL_TYPE = "{model_type}"' in (tmp_path / REMOTE_FILE).read_text()

    reloaded = _reload(model, tmp_path, trust_remote_code=True)
    assert reloaded.config.is_heterogeneous
    assert reloaded.config.per_layer_config[1].num_key_value_heads == 1
    torch.testing.assert_close(outputs(reloaded, probe), outputs(model, probe), rtol=1e-5, atol=1e-6)
    assert check_reload(model, tmp_path, trust_remote_code=True) < 1e-5
    # Generation reads the per-layer kv heads through the cache.
    generated = reloaded.generate(probe[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)


def test_remote_code_leaves_stock_auto_mapping_alone(tmp_path):
    model = tiny_model("llama")
    cut_block(model, 0, mlp=20)
    model.save_pretrained(tmp_path)
    write_heterogeneous(model, tmp_path)
    _reload(model, tmp_path, trust_remote_code=True)
    stock = transformers.AutoModelForCausalLM.from_config(model.config)
    assert type(stock) is transformers.LlamaForCausalLM


def test_uniform_heads_that_the_stock_config_rejects_go_heterogeneous(tmp_path):
    """A stock Llama config refuses hidden_size % num_attention_heads != 0 even with an explicit head_dim."""
    config = transformers.LlamaConfig(hidden_size=40, intermediate_size=16, num_attention_heads=5,
                                      num_key_value_heads=5, head_dim=8, num_hidden_layers=2, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for i in range(2):
        cut_block(model, i, heads=3, kv_heads=3)  # the same in both layers, but 40 % 3 != 0
    assert needs_heterogeneous(model)
    model.save_pretrained(tmp_path)
    write_heterogeneous(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_attention_heads"] == 3 and "per_layer_config" not in saved and "auto_map" in saved
    check_reload(model, tmp_path, trust_remote_code=True)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "gpt2"])
def test_head_pruning_through_prune_and_save(model_type, tmp_path):
    model = tiny_model(model_type)
    result = prune(model, input_ids=calibration_ids(), attention_sparsity=0.5, mlp_sparsity=0.25,
                   progress=False)
    adapter = get_adapter(model.config)
    heads_field, mlp_field = adapter.attention.heads_field, adapter.mlp.width_field
    assert layer_widths(model) == [{heads_field: 2, mlp_field: 30}] * 2
    assert all(s.groups_kept == 2 for s in result.sites if s.kind == "attention")
    assert getattr(model.config, heads_field) == 4  # the stock config keeps the count its head size derives from

    folder = result.save(tmp_path / "pruned")
    assert (folder / REMOTE_FILE).exists()
    config = json.loads((folder / "config.json").read_text())
    assert config[heads_field] == 4 and config[mlp_field] == 30
    assert config["per_layer_config"] == {"0": {heads_field: 2}, "1": {heads_field: 2}}
    report = json.loads((folder / "subprune_report.json").read_text())
    assert report["export"] == "heterogeneous" and report["reload_check"]["relative_max_difference"] < 1e-4
    assert "trust_remote_code=True" in (folder / "README.md").read_text()

    reloaded = _reload(model, folder, trust_remote_code=True)
    probe = calibration_ids(3, 10, seed=7)
    torch.testing.assert_close(outputs(reloaded, probe), outputs(model, probe), rtol=1e-5, atol=1e-6)


def test_gpt2_fused_qkv_rows_keep_whole_heads():
    """A kept GPT-2 head keeps its rows in each of the q, k and v segments of c_attn, in segment order."""
    model = tiny_model("gpt2")  # 4 heads of 8: segments of 32 rows
    adapter = get_adapter(model.config)
    site = attention_site(adapter, site_costs(adapter, find_blocks(model)[1][0]), "h.0.attention", 2, 2, "query_quota")
    rows = site.rows_to_keep([3, 1])["attn.c_attn"].tolist()
    heads = list(range(8, 16)) + list(range(24, 32))
    assert rows == heads + [32 + r for r in heads] + [64 + r for r in heads]


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "llama"])
@torch.no_grad()
def test_cut_without_refit_equals_masking_the_removed_heads(model_type):
    """Cutting heads and keeping the consumer's original columns computes what the full model computes with
    the removed heads' output columns zeroed: the producer rows and head attributes are consistent."""
    model, masked = tiny_model(model_type), tiny_model(model_type)
    adapter = get_adapter(model.config)
    prefix, blocks = find_blocks(model)
    _, masked_blocks = find_blocks(masked)
    costs = site_costs(adapter, blocks[0])
    heads, kv_heads = costs.heads, costs.kv_heads
    keep = heads // 2 if heads == kv_heads else heads // 2 // kv_heads * kv_heads
    site = attention_site(adapter, costs, f"{prefix}.0.attention", keep, kv_heads if heads != kv_heads else keep,
                          "query_quota")
    kept = _kept_groups(site, torch.Generator().manual_seed(0))
    columns = site.groups[kept].flatten()
    consumer = adapter.weight(blocks[0].get_submodule(site.consumer)).detach()
    apply_selection(blocks[0], adapter, site, kept, consumer[:, columns].clone(), None)
    removed = torch.ones(consumer.shape[1], dtype=torch.bool)
    removed[columns] = False
    weight = masked_blocks[0].get_submodule(site.consumer).weight
    if adapter.transposed:
        weight[removed, :] = 0
    else:
        weight[:, removed] = 0
    probe = calibration_ids(2, 12, seed=3)
    torch.testing.assert_close(outputs(model, probe), outputs(masked, probe), rtol=1e-5, atol=1e-6)


def test_uniform_llama_prune_keeps_the_stock_export(tmp_path):
    model = tiny_model("llama")
    result = prune(model, budget="uniform", input_ids=calibration_ids(), sparsity=0.3, progress=False)
    assert result.sites and not needs_heterogeneous(model)
    folder = result.save(tmp_path / "pruned")
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and "per_layer_config" not in config
    assert not (folder / REMOTE_FILE).exists()
    assert json.loads((folder / "subprune_report.json").read_text())["export"] == "stock"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(reloaded) is transformers.LlamaForCausalLM
    probe = calibration_ids(2, 12, seed=3)
    torch.testing.assert_close(outputs(reloaded, probe), outputs(model, probe), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_global_budget_saves_per_layer_widths(model_type, tmp_path):
    model = tiny_model(model_type)
    result = prune(model, input_ids=calibration_ids(), sparsity=0.3, budget="global", progress=False)
    folder = result.save(tmp_path / "pruned")
    report = json.loads((folder / "subprune_report.json").read_text())
    assert report["export"] == ("stock" if result.uniform else "heterogeneous")
    reloaded = _reload(model, folder, trust_remote_code=report["export"] == "heterogeneous")
    probe = calibration_ids(2, 12, seed=3)
    torch.testing.assert_close(outputs(reloaded, probe), outputs(model, probe), rtol=1e-4, atol=1e-5)
