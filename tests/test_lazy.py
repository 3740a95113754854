"""One block in memory: pruning from a folder keeps the blocks on disk, gives exactly the in-memory result, never
holds two blocks at once (calibration, cut, evaluation, save, reload check), and writes standard shards."""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from hf_subprune import prune
from hf_subprune.adapters import auto_class_for, get_adapter
from hf_subprune.checks import check_model
from hf_subprune.loading import load_model
from hf_subprune.pipeline.blocks import walk_blocks
from hf_subprune.pipeline.capture import capture_block_inputs, find_blocks
from hf_subprune.pipeline.lazy import LAZY_ATTRIBUTE, TALLY, lazy_blocks
from hf_subprune.pipeline.widths import site_costs

from conftest import calibration_ids, outputs, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL_SHARDS = 20_000  # bytes: the tiny models' weights then take several files


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder's weights (one file or shards), checking that an index lists exactly them."""
    out: dict[str, torch.Tensor] = {}
    files = sorted(f for f in folder.glob("model*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            out.update({key: f.get_tensor(key) for key in f.keys()})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        assert data["weight_map"] == {key: file.name for file in files for key in _keys(file)}
        assert data["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


def _keys(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints: one file, shards with an index, BERTs saved with a classifier head and with a masked-LM
    head (keys under the ``bert.`` prefix, read by a ``BertModel``; the masked LM has no pooler), and a GPT-2 with
    tied embeddings."""
    root = tmp_path_factory.mktemp("checkpoints")
    tiny_model("llama").save_pretrained(root / "llama")
    tiny_model("llama").save_pretrained(root / "llama-sharded", max_shard_size=SMALL_SHARDS)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(tiny_config("bert")).save_pretrained(root / "bert")
    transformers.BertForMaskedLM(tiny_config("bert")).save_pretrained(root / "bert-masked-lm")
    tiny_model("gpt2").save_pretrained(root / "gpt2")
    return {p.name: p for p in root.iterdir()}


CASES = {
    "llama-sharded-input-uniform": ("llama-sharded", {"budget": "uniform"}),
    "llama-per-layer": ("llama", {}),  # the fluctuation budget: widths differ per block
    "llama-flap": ("llama", {"method": "flap"}),  # adds biases to every block, and cuts them
    "bert-prefixed-uniform": ("bert", {"budget": "uniform"}),
    "gpt2-tied": ("gpt2", {"budget": "uniform"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lazy_prune_equals_the_in_memory_prune(folders, tmp_path, case):
    folder, settings = CASES[case]
    ids, probe = calibration_ids(8, 16), calibration_ids(2, 12, seed=7)
    # A lazily loaded model writes no calibration sequences itself: the in-memory one is asked for none either.
    settings = {"input_ids": ids, "sparsity": 0.3, "batch_size": 4, "progress": False, "synthetic_samples": 0,
                **settings}
    config = transformers.AutoConfig.from_pretrained(folders[folder])
    auto = transformers.AutoModel if config.model_type == "bert" else transformers.AutoModelForCausalLM
    whole = prune(auto.from_pretrained(folders[folder]), **settings)
    whole.model.save_pretrained(tmp_path / "whole", max_shard_size=SMALL_SHARDS)

    TALLY.reset()
    # One output feature (a mean over features is fixed by a final LayerNorm, whatever the cut).
    lazy = prune(str(folders[folder]), evaluate=lambda model: {"mean": float(outputs(model, probe)[..., 0].mean())},
                 **settings)
    assert lazy_blocks(lazy.model) is not None and TALLY.current == 0
    _, blocks = find_blocks(lazy.model)
    assert all(p.is_meta for p in blocks.parameters())  # nothing of the blocks stays in memory
    assert (lazy.params_before, lazy.params_after) == (whole.params_before, whole.params_after)
    assert [s.kept for s in lazy.sites] == [s.kept for s in whole.sites] and lazy.notes == whole.notes
    out = lazy.save(tmp_path / "lazy", max_shard_size=SMALL_SHARDS)  # with the reload check, streamed too
    assert TALLY.peak == 1

    # The same tensors under the same names as save_pretrained writes, in at least three indexed shards.
    saved, expected = _weights(out), _weights(tmp_path / "whole")
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[key], expected[key]) for key in expected)
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 3
    index, expected_index = (json.loads((written / "model.safetensors.index.json").read_text())
                             for written in (out, tmp_path / "whole"))
    assert index["metadata"] == expected_index["metadata"]  # total_size and total_parameters
    report = json.loads((out / "subprune_report.json").read_text())
    assert report["reload_check"]["relative_max_difference"] == 0.0
    assert report["evaluation"]["mean"]["before"] != report["evaluation"]["mean"]["after"]

    # Plain transformers reads the shards (the heterogeneous export with its modeling file).
    remote = report["export"] == "heterogeneous"
    assert remote == (case != "llama-sharded-input-uniform")
    reloaded = auto_class_for(lazy.model).from_pretrained(out, trust_remote_code=remote)
    assert torch.equal(outputs(reloaded, probe), outputs(whole.model, probe))


@pytest.mark.parametrize("folder", ["llama", "gpt2"])  # an untied head, and a head tied to the embeddings
def test_the_embeddings_and_head_wait_on_disk_during_a_walk(folders, folder):
    """A walk over the blocks never reads them, so a lazy model holds one block and no vocabulary matrix; they
    come back after, equal and tied as before, also when the pass fails."""
    model, _, _ = load_model(str(folders[folder]), lazy=True, need_tokenizer=False)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not lazy_blocks(model).owns(n)}
    tied = embeddings.weight is head.weight
    inputs = capture_block_inputs(model, calibration_ids(2, 8), 2, "cpu", "cpu")
    walked = 0
    for step in walk_blocks(model, inputs, "cpu", "cpu", desc="test", show=False):
        assert embeddings.weight.is_meta and head.weight.is_meta
        assert not any(p.is_meta for p in step.block.parameters())
        walked += 1
    assert walked == len(find_blocks(model)[1])
    with pytest.raises(RuntimeError, match="pass failed"):
        for _ in walk_blocks(model, inputs, "cpu", "cpu", desc="test", show=False):
            raise RuntimeError("pass failed")
    after = {n: p for n, p in model.named_parameters() if not lazy_blocks(model).owns(n)}
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert (embeddings.weight is head.weight) == tied
    assert model.get_input_embeddings() is embeddings and tied == (folder == "gpt2")

    # Changed since read (in place here): the checkpoint no longer has them, so they stay in memory.
    with torch.no_grad():
        embeddings.weight.add_(1.0)
    changed = embeddings.weight.detach().clone()
    for _ in walk_blocks(model, inputs, "cpu", "cpu", desc="test", show=False):
        assert not embeddings.weight.is_meta and head.weight.is_meta != tied
    assert torch.equal(embeddings.weight, changed)


def test_the_work_folder_goes_with_the_model(folders):
    result = prune(str(folders["llama"]), input_ids=calibration_ids(4, 16), sparsity=0.3, budget="uniform",
                   progress=False)
    work = lazy_blocks(result.model).work_dir
    assert sorted(p.name for p in work.iterdir()) == ["block-0.safetensors", "block-1.safetensors"]
    del result
    gc.collect()
    assert not work.exists()


def test_dtype_is_the_checkpoints_or_the_one_asked(folders, tmp_path):
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    probe = calibration_ids(2, 8)
    for folder, asked, dtype in [(tmp_path / "bf16", "auto", torch.bfloat16), (folders["llama"], "auto", torch.float32),
                                 (folders["llama"], "float16", torch.float16)]:
        model, _, _ = load_model(str(folder), dtype=asked, lazy=True, need_tokenizer=False)
        spill = lazy_blocks(model)
        _, blocks = find_blocks(model)
        spill.materialize(0, blocks[0], "cpu")
        assert {p.dtype for p in model.parameters()} == {dtype}
        spill.release(0, blocks[0], store=False)
        if dtype != torch.float16:  # no half-precision matmul on every CPU build
            assert outputs(model, probe).shape == (2, 8, 128)


def test_checks_accept_a_lazy_model_and_refuse_other_meta_weights(folders):
    model, _, _ = load_model(str(folders["llama"]), lazy=True, need_tokenizer=False)
    check_model(model)  # its meta blocks are streamed
    delattr(model, LAZY_ATTRIBUTE)
    with pytest.raises(ValueError, match="load it without device_map"):
        check_model(model)
    offloaded = tiny_model("llama")  # in memory, one weight left on meta as a device_map would
    offloaded.lm_head.weight = torch.nn.Parameter(torch.empty_like(offloaded.lm_head.weight, device="meta"))
    with pytest.raises(ValueError, match="load it without device_map"):
        prune(offloaded, input_ids=calibration_ids(4, 16), sparsity=0.3, progress=False)


@pytest.fixture
def hf_subprune_log(caplog):
    """hf_subprune's logger does not propagate to the root logger, where caplog listens."""
    logger = logging.getLogger("hf_subprune")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="hf_subprune"):
        yield caplog
    logger.removeHandler(caplog.handler)


def test_bin_weights_load_whole_and_say_so(tmp_path, hf_subprune_log):
    model = tiny_model("llama")  # as an older transformers saved it (version 5 writes safetensors only)
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model, _, _ = load_model(str(tmp_path / "bin"), lazy=True, need_tokenizer=False)
    assert lazy_blocks(model) is None and not any(p.is_meta for p in model.parameters())
    assert any(".bin weights are loaded whole" in r.getMessage() for r in hf_subprune_log.records)


def test_weights_missing_outside_the_blocks_are_initialised(folders, hf_subprune_log):
    """As from_pretrained does: the masked LM's checkpoint has no pooler, which a BertModel has."""
    model, _, _ = load_model(str(folders["bert-masked-lm"]), lazy=True, need_tokenizer=False)
    pooler = model.pooler.dense
    assert not pooler.weight.is_meta and torch.equal(pooler.bias, torch.zeros_like(pooler.bias))
    assert 0 < float(pooler.weight.detach().std()) < 0.1  # the config's initializer_range (0.02)
    reference = transformers.BertModel.from_pretrained(folders["bert-masked-lm"])
    assert torch.equal(model.embeddings.word_embeddings.weight, reference.embeddings.word_embeddings.weight)
    assert any("pooler.dense.weight" in r.getMessage() for r in hf_subprune_log.records)


def test_hub_id_from_the_cache_offline(folders, tmp_path, monkeypatch):
    """A hub id resolves to its cached snapshot (snapshot_download answers from the cache with HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in folders["llama"].iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, _, base = load_model("someone/tiny-llama", lazy=True, need_tokenizer=False)
    assert base == "someone/tiny-llama" and lazy_blocks(model) is not None
    probe = calibration_ids(2, 8)
    assert torch.equal(outputs(model, probe), outputs(transformers.AutoModelForCausalLM.from_pretrained(
        folders["llama"]), probe))


def test_a_per_layer_export_loads_by_name_and_prunes_again(folders, tmp_path):
    """The default (per-layer) output: load_model reads it without asking for trust_remote_code (its modeling file
    is hf_subprune's own), a tampered modeling file is not trusted, and it prunes again from its own per-layer
    widths, to a folder that reloads."""
    from hf_subprune.loading import load_model

    out = prune(str(folders["llama"]), input_ids=calibration_ids(8, 16), sparsity=0.3, progress=False).save(
        tmp_path / "pruned")
    report = json.loads((out / "subprune_report.json").read_text())
    assert report["export"] == "heterogeneous"
    assert len({(w["mlp"], w["heads"], w["kv_heads"]) for w in report["widths"]}) > 1
    model, _, _ = load_model(str(out), need_tokenizer=False)
    adapter = get_adapter(model.config)

    def prunable():
        return sum(c.mlp_params + c.attention_params for c in (site_costs(adapter, b) for b in find_blocks(model)[1]))

    before = prunable()
    again = prune(model, input_ids=calibration_ids(8, 16), sparsity=0.3, progress=False)
    assert prunable() == pytest.approx(0.7 * before, abs=0.02 * before)  # 30% of what it had
    assert again.widths_before["layers"] == report["widths"]  # it starts from what the first cut kept
    assert all(w.mlp <= before["mlp"] and w.heads <= before["heads"]
               for w, before in zip(again.widths, report["widths"]))
    twice = again.save(tmp_path / "twice")  # the save's reload check compares outputs
    assert json.loads((twice / "subprune_report.json").read_text())["widths_before"]["layers"] == report["widths"]
    assert "per layer (it was pruned before with per-layer widths)" in (twice / "README.md").read_text()

    (out / "modeling_subprune.py").write_text((out / "modeling_subprune.py").read_text() + "\n# changed\n")
    with pytest.raises(Exception):  # not ours any more: transformers asks for trust_remote_code
        load_model(str(out), need_tokenizer=False)
