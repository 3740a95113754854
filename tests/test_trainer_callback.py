"""SubpruneCallback: the cut inside a stock Trainer run, optimizer state carried over, training going on, the saved
folder loading like a prune() output, two processes cutting identically; bad input refused with what to fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_subprune import PruneConfig, SubpruneCallback
from hf_subprune.integrations.trainer import train_calibration, train_text_calibration
from hf_subprune.pipeline.widths import site_costs

from conftest import outputs, tiny_config, tiny_model

VOCAB, SEQ = 128, 16


def examples(n: int, seed: int = 0, ragged: bool = False) -> list[dict]:
    """A learnable toy language: each sequence counts up by one from a random start (mod 32). ``ragged``: random
    lengths, for padded batches."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, SEQ + 1, (), generator=gen)) if ragged else SEQ
        start = int(torch.randint(0, 32, (), generator=gen))
        out.append({"input_ids": (start + torch.arange(length)) % 32})
    return out


def collate(batch: list[dict], pad: int = 99) -> dict:
    """Right padding with a token the data never holds; labels -100 on padding."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = b["input_ids"]
        mask[i, : len(b["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def make_trainer(tmp_path, model, callbacks, *, steps: int = 6, accumulation: int = 1, lr: float = 3e-3,
                 data: list | None = None, processing_class=None, **args) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=accumulation, learning_rate=lr, use_cpu=True, report_to=[],
                             logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, **args)
    return Trainer(model=model, args=args, train_dataset=data or examples(64, ragged=True), data_collator=collate,
                   callbacks=callbacks, processing_class=processing_class)


def prunable(model) -> int:
    from hf_subprune.adapters import get_adapter
    from hf_subprune.pipeline.capture import find_blocks

    adapter = get_adapter(model.config)
    return sum(site_costs(adapter, b).mlp_params + site_costs(adapter, b).attention_params
               for b in find_blocks(model)[1])


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def saved_and_reloaded(trainer, model: nn.Module, folder: Path, export: str) -> dict:
    """Save through ``trainer.save_model``, check the export kind, reload with ``from_pretrained`` (remote code for
    the heterogeneous export) and compare outputs with the trained model; returns the saved report."""
    trainer.save_model(str(folder))
    report = json.loads((folder / "subprune_report.json").read_text())
    assert report["export"] == export
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=export == "heterogeneous")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    model.eval()
    torch.testing.assert_close(outputs(reloaded, ids), outputs(model, ids), rtol=1e-4, atol=1e-5)
    return report


def optimizer_matches_model(trainer) -> None:
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            if key in trainer.optimizer.state[p]:
                assert trainer.optimizer.state[p][key].shape == p.shape


class Moments(TrainerCallback):
    """Copies the Adam state by parameter name at the given step's end (before or after the cut, by its place in
    the callback list)."""

    def __init__(self, step: int) -> None:
        self.step, self.state = step, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.step:
            by_id = {id(p): n for n, p in model.named_parameters()}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    self.state[by_id[id(p)]] = {k: v.clone() for k, v in optimizer.state[p].items()}


class BeforeCut(Moments):
    pass


class AfterCut(Moments):
    pass


def moments_follow_the_cut(before: Moments, after: Moments, cut) -> None:
    """Each parameter's moments after the cut are its moments before it at the kept indices (all of them where
    the cut did not resize it); ``step`` is unchanged; parameters the cut added start without state."""
    assert cut.kept
    for name, state in after.state.items():
        if name not in before.state:
            assert not state
            continue
        old = before.state[name]
        assert torch.equal(state["step"], old["step"])
        dim, kept = cut.kept.get(name, (None, None))
        for key in ("exp_avg", "exp_avg_sq"):
            expected = old[key] if kept is None else old[key].index_select(dim, kept)
            torch.testing.assert_close(state[key], expected, rtol=0, atol=0)


@pytest.fixture(autouse=True)
def _threads(single_thread):
    yield


def test_one_cut_at_step_0_then_saved_and_reloaded(tmp_path):
    """The default: one cut before the first optimizer step, to the config's sparsity (here the per-layer budget:
    the heterogeneous export), training goes on, save_model writes a folder that reloads to the same outputs."""
    model = tiny_model("llama")
    before = sum(p.numel() for p in model.parameters())
    callback = SubpruneCallback(PruneConfig(sparsity=0.25, num_samples=8, seq_len=16), check_saves=True)
    trainer = make_trainer(tmp_path, model, [callback])
    trainer.train()
    assert [c.step for c in callback.cuts] == [0]
    assert sum(p.numel() for p in model.parameters()) < before
    assert callback.cuts[0].result.config.budget == "fluctuation"
    assert all(torch.isfinite(torch.tensor(losses(trainer))))
    optimizer_matches_model(trainer)

    out = tmp_path / "saved"
    report = saved_and_reloaded(trainer, model, out, "heterogeneous")
    assert report["reload_check"]["relative_max_difference"] < 1e-4
    assert report["training"]["cuts"][0]["step"] == 0 and report["training"]["global_step"] == 6
    assert "pruned during training" in (out / "README.md").read_text()
    assert (out / "subprune_config.json").exists()
    from hf_subprune.outputs.export import load_calibration_ids

    saved_ids = load_calibration_ids(out)  # recover(out, "calibration") trains on them
    assert saved_ids is not None and saved_ids.shape[0] > 0


def test_schedule_with_accumulation_slices_the_optimizer_state(tmp_path):
    """Two cuts (uniform widths) with gradient accumulation: the moments after the second cut are the moments
    just before it at the kept indices; untouched parameters keep theirs; the total removed fraction is the
    schedule's last value; the folder loads with plain from_pretrained."""
    model = tiny_model("llama")
    total = prunable(model)
    before, after = BeforeCut(4), AfterCut(4)
    callback = SubpruneCallback(PruneConfig(sparsity=0.5, num_samples=8, seq_len=16, budget="uniform"),
                                schedule={2: 0.2, 4: 0.45})
    trainer = make_trainer(tmp_path, model, [before, callback, after], steps=6, accumulation=2)
    trainer.train()
    assert [c.step for c in callback.cuts] == [2, 4]
    assert all(c.result.config.budget == "uniform" for c in callback.cuts)
    assert 1 - prunable(model) / total == pytest.approx(0.45, abs=0.04)
    cut = callback.cuts[1]
    assert cut.relative_sparsity == pytest.approx(1 - 0.55 * total / cut.prunable_before)
    assert cut.optimizer_state == "sliced"
    assert set(before.state) == set(after.state)
    moments_follow_the_cut(before, after, cut)
    assert any(name.endswith("down_proj.weight") and dim == 1 for name, (dim, _) in cut.kept.items())
    assert any(name.endswith("q_proj.weight") and dim == 0 for name, (dim, _) in cut.kept.items())
    optimizer_matches_model(trainer)
    assert trainer.lr_scheduler.optimizer is trainer.optimizer  # the same object: the schedule goes on

    report = saved_and_reloaded(trainer, model, tmp_path / "saved", "stock")
    assert report["training"]["schedule"] == [{"step": 2, "sparsity": 0.2}, {"step": 4, "sparsity": 0.45}]
    assert [c["step"] for c in report["training"]["cuts"]] == [2, 4]
    assert report["training"]["gradient_accumulation_steps"] == 2
    assert report["config"]["sparsity"] == 0.45


@pytest.mark.parametrize("family, settings", [("llama", {"budget": "global"}), ("llama", {"method": "flap"}),
                                               ("gpt2", {})])
def test_schedule_cuts_again_from_per_layer_widths(tmp_path, family, settings):
    """A later cut starts from the widths the first one left, different per block (a per-layer budget or FLAP's
    allocation; GPT-2, whose config cannot hold a pruned head count, even with uniform widths): the widths only
    shrink, the removed fraction is the schedule's, the optimizer follows, and the folder reloads."""
    model = tiny_model(family)
    total = prunable(model)
    callback = SubpruneCallback(PruneConfig(sparsity=0.5, num_samples=8, seq_len=16, **settings),
                                schedule={1: 0.2, 3: 0.45}, check_saves=True)
    trainer = make_trainer(tmp_path, model, [callback], steps=5)
    trainer.train()
    first, second = (c.result for c in callback.cuts)
    assert second.widths_before.get("layers") == [{"mlp": w.mlp, "heads": w.heads, "kv_heads": w.kv_heads}
                                                  for w in first.widths] or family == "gpt2"
    assert all(b.mlp <= a.mlp and b.heads <= a.heads for a, b in zip(first.widths, second.widths))
    assert 1 - prunable(model) / total == pytest.approx(0.45, abs=0.05)
    assert all(torch.isfinite(torch.tensor(losses(trainer))))
    optimizer_matches_model(trainer)
    report = saved_and_reloaded(trainer, model, tmp_path / "saved", "heterogeneous")
    assert report["reload_check"]["relative_max_difference"] < 1e-4


@pytest.mark.parametrize("final, budget", [(0.25, "uniform"), (0.3, "global")])
def test_a_schedules_default_budget_follows_its_final_sparsity(tmp_path, final, budget):
    """Without a budget in the config, every cut of a schedule takes the global budget where prune()'s default for
    the final sparsity is global (causal LMs from 30% on), uniform widths below."""
    callback = SubpruneCallback(PruneConfig(sparsity=final, num_samples=8, seq_len=16),
                                schedule={0: final / 2, 2: final})
    make_trainer(tmp_path, tiny_model("llama"), [callback], steps=3).train()
    assert [c.result.config.budget for c in callback.cuts] == [budget, budget]


@pytest.mark.parametrize("family, settings", [("gpt2", {}), ("llama", {"method": "flap"})])
def test_one_cut_mid_run(tmp_path, family, settings):
    """GPT-2's transposed Conv1D weights (rows and columns swap places in the moments), and FLAP's bias
    compensation on Llama (new biases join the optimizer, without state)."""
    model = tiny_model(family)
    before, after = BeforeCut(2), AfterCut(2)
    callback = SubpruneCallback(PruneConfig(sparsity=0.3, num_samples=8, seq_len=16, **settings), schedule={2: 0.3})
    trainer = make_trainer(tmp_path, model, [before, callback, after], steps=3)
    trainer.train()
    moments_follow_the_cut(before, after, callback.cuts[0])
    if family == "gpt2":
        assert callback.cuts[0].kept["transformer.h.0.mlp.c_fc.weight"][0] == 1
        assert callback.cuts[0].kept["transformer.h.0.mlp.c_proj.weight"][0] == 0
    else:
        assert set(after.state) > set(before.state)  # the added biases
    optimizer_matches_model(trainer)


def test_loss_keeps_falling_after_a_cut(tmp_path):
    """On a learnable toy language the cut costs some loss, and training recovers it in the same run."""
    model = tiny_model("llama")
    callback = SubpruneCallback(PruneConfig(sparsity=0.4, num_samples=8, seq_len=16, budget="uniform"),
                                schedule={20: 0.4})
    trainer = make_trainer(tmp_path, model, [callback], steps=40, lr=1e-2, data=examples(256))
    trainer.train()
    curve = losses(trainer)
    assert [c.step for c in callback.cuts] == [20] and callback.cuts[0].params_after < callback.cuts[0].params_before
    assert len(curve) == 40 and all(torch.isfinite(torch.tensor(curve)))
    assert curve[19] < curve[0] / 2  # it learned before the cut
    assert sum(curve[-5:]) / 5 < curve[20]  # and goes on learning after it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16(tmp_path, dtype):
    """bf16 mixed precision, on a float32 model (autocast) and a bfloat16 one: the cut computes its statistics in
    float64 in the model's own dtype, and training goes on in the same dtype."""
    model = tiny_model("llama").to(dtype)
    callback = SubpruneCallback(PruneConfig(sparsity=0.3, num_samples=8, seq_len=16, budget="uniform"))
    trainer = make_trainer(tmp_path, model, [callback], steps=3, bf16=True)
    trainer.train()
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(losses(trainer))))
    optimizer_matches_model(trainer)


def test_calibration_text_through_the_trainers_tokenizer(tmp_path):
    """Any source prune() takes, tokenised with the Trainer's processing_class."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(100)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    texts = [" ".join(f"w{(i * 7 + j) % 100}" for j in range(40)) for i in range(10)]
    callback = SubpruneCallback(PruneConfig(sparsity=0.3, num_samples=4, seq_len=16), calibration=texts)
    trainer = make_trainer(tmp_path, tiny_model("llama"), [callback], steps=2, processing_class=tokenizer)
    trainer.train()
    assert callback.cuts[0].result.calibration["source"] == "list"
    out = callback.save(trainer.model, tmp_path / "saved")
    assert (out / "subprune_report.json").exists() and (out / "tokenizer.json").exists()


def test_calibration_from_padded_batches_drops_padding():
    """Windows of real tokens only: the padding token (99) never appears, labels are not read."""
    loader = torch.utils.data.DataLoader(examples(40, ragged=True), batch_size=4, collate_fn=collate)
    rng = torch.get_rng_state()
    ids, source = train_calibration(loader, num_samples=6, seq_len=16, seed=0)
    assert ids.shape == (6, 16) and not (ids == 99).any() and "padding dropped" in source
    assert torch.equal(torch.get_rng_state(), rng)  # the run's generator is left as it was
    again, _ = train_calibration(loader, num_samples=6, seq_len=16, seed=0)
    assert torch.equal(ids, again)
    few, _ = train_calibration(loader, num_samples=1000, seq_len=16, seed=0)
    assert 0 < len(few) < 1000


def test_encoder_calibration_from_padded_batches_is_one_example_per_sample(tmp_path):
    """An encoder in a Trainer calibrates on one training example per sample, padded, as prune() calibrates
    encoders from text; the cut's report counts only the real tokens."""
    loader = torch.utils.data.DataLoader(examples(40, ragged=True), batch_size=4, collate_fn=collate)
    rng = torch.get_rng_state()
    ids, mask, source = train_text_calibration(loader, num_samples=6, seq_len=12, seed=0)
    lengths = mask.sum(1)
    assert ids.shape == (6, int(lengths.max())) and "one per sample" in source
    assert not ids[mask.bool()].eq(99).any() and bool((lengths <= 12).all())
    assert torch.equal(torch.get_rng_state(), rng)
    model = transformers.BertForSequenceClassification(tiny_config("bert"))
    callback = SubpruneCallback(PruneConfig(sparsity=0.3, num_samples=6, seq_len=12, budget="uniform"))
    data = [{**e, "labels": int(e["input_ids"][0] % 2)} for e in examples(32, ragged=True)]

    def classify(batch):
        out = collate(batch)
        out["labels"] = torch.tensor([b["labels"] for b in batch])
        return out

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=data, data_collator=classify, callbacks=[callback]).train()
    calibration = callback.cuts[0].result.calibration
    assert calibration["padded"] and calibration["num_samples"] == 6
    assert calibration["tokens"] < 6 * calibration["seq_len"]


@pytest.mark.parametrize("schedule, message", [
    ({0: 0.3, 5: 0.2}, "must increase"),
    ({0: 1.0}, r"in \[0, 1\)"),
    ({0: -0.1}, r"in \[0, 1\)"),
    ({-1: 0.2}, "whole number >= 0"),
    ({}, "non-empty"),
])
def test_bad_schedule(schedule, message):
    with pytest.raises(ValueError, match=message):
        SubpruneCallback(PruneConfig(sparsity=0.3), schedule=schedule)


def test_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="mlp_sparsity"):
        SubpruneCallback(PruneConfig(mlp_sparsity=0.3), schedule={0: 0.1})
    with pytest.raises(ValueError, match="processing_class"):
        make_trainer(tmp_path, tiny_model("llama"), [SubpruneCallback(PruneConfig(sparsity=0.3), calibration="text")])
    trainer = make_trainer(tmp_path, tiny_model("llama"), [SubpruneCallback(PruneConfig(sparsity=0.3),
                                                                            schedule={10: 0.3})], steps=4)
    with pytest.raises(ValueError, match="past max_steps=4"):
        trainer.train()


def test_peft_model_refused(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    with pytest.raises(ValueError, match="(?i)prune the base model first"):
        make_trainer(tmp_path, model, [SubpruneCallback(PruneConfig(sparsity=0.3))])


@pytest.mark.slow
def test_two_processes_cut_and_train_identically(tmp_path):
    """accelerate launch, two CPU processes (gloo): the same cuts on both ranks, DDP rebuilt after each, and both
    ranks end with the same weights (gradients still all-reduced after the parameters changed shape)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29519", str(Path(__file__).with_name("distributed_train.py")),
         str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["cuts"] == ranks[1]["cuts"] == [2, 4]
    assert ranks[0]["kept"].keys() == ranks[1]["kept"].keys()
    for name in ranks[0]["kept"]:
        assert torch.equal(ranks[0]["kept"][name], ranks[1]["kept"][name])
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    assert ranks[0]["steps"] == 6 and all(torch.isfinite(torch.tensor(ranks[0]["losses"])))
    report = json.loads((tmp_path / "saved" / "subprune_report.json").read_text())
    assert report["training"]["processes"] == 2 and report["calibration"]["processes"] == 2
