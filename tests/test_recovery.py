"""Recovery after pruning: ``hf-subprune finetune`` / ``recover`` on pruned tiny folders (stock and
heterogeneous), LoRA merged or full, the exact calibration tokens, distillation, the report and card section,
bad input, ``prune --finetune-steps``, and classification accuracy."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from hf_subprune import prune, recover
from hf_subprune.calibration import builtin_text, fingerprint, load_labelled
from hf_subprune.evaluation import AccuracyEvaluator, PerplexityEvaluator, accuracy
from hf_subprune.files import CALIBRATION_FILE, REPORT_FILE
from hf_subprune.integrations.recovery import RecoveryConfig, _merge, _wrap, hidden_state_loss
from hf_subprune.outputs.export import load_calibration_ids

from conftest import calibration_ids, outputs, tiny_config

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--quiet"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hf_subprune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(builtin_text()[:20000])
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, corpus) -> Path:
    """A tiny Llama with a word-level tokenizer, its weights large enough (init range 0.2) that pruning changes
    its output distribution measurably."""
    folder = tmp_path_factory.mktemp("base")
    words = sorted(set(corpus.read_text().split()))[:126]
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    config = tiny_config("llama")
    config.initializer_range, config.eos_token_id = 0.2, 1
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _pruned(base_dir: Path, corpus: Path, folder: Path, budget: str, synthetic_samples: int | None = 0) -> Path:
    """Pruned from the 8 calibration blocks alone by default (the tests count them), or with written ones."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    evaluate = PerplexityEvaluator(tok, corpus.read_text(), str(corpus), window=32, max_tokens=256)
    result = prune(model, tok, str(corpus), sparsity=0.4, budget=budget, num_samples=8, seq_len=32, progress=False,
                   base_model=str(base_dir), evaluate=evaluate, synthetic_samples=synthetic_samples)
    return result.save(folder)


def test_finetune_loads_an_export_with_per_layer_head_counts(base_dir, corpus, tmp_path, single_thread):
    """Per-layer head counts (here from the global budget on blocks and written sequences): the stock config
    class refuses the folder's config, so the tokenizer is loaded with the modeling file too."""
    pruned = _pruned(base_dir, corpus, tmp_path / "pruned", "global", synthetic_samples=None)
    heads = {w["heads"] for w in _report(pruned)["widths"]}
    assert len(heads) > 1, heads
    out = tmp_path / "recovered"
    run = _run("finetune", str(pruned), "--data", "calibration", "--output", str(out), "--max-steps", "1",
               "--full", *QUIET, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert _report(out)["widths"] == _report(pruned)["widths"]


@pytest.fixture(scope="module")
def pruned_dirs(base_dir, corpus, tmp_path_factory, single_thread) -> dict[str, Path]:
    """The same tiny Llama pruned to uniform widths (stock export) and to per-layer widths (heterogeneous)."""
    root = tmp_path_factory.mktemp("pruned")
    dirs = {"stock": _pruned(base_dir, corpus, root / "stock", "uniform"),
            "heterogeneous": _pruned(base_dir, corpus, root / "heterogeneous", "global")}
    for kind, folder in dirs.items():
        assert json.loads((folder / REPORT_FILE).read_text())["export"] == kind
    return dirs


def _report(folder: Path) -> dict:
    return json.loads((folder / REPORT_FILE).read_text())


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
@pytest.mark.parametrize("kind", ["stock", "heterogeneous"])
def test_finetune_writes_the_same_export_reload_checked(pruned_dirs, tmp_path, kind, full):
    pruned = pruned_dirs[kind]
    out = tmp_path / "recovered"
    run = _run("finetune", str(pruned), "--data", "calibration", "--output", str(out), "--max-steps", "3",
               "--lr", "1e-3" if full else "1e-2", *(["--full"] if full else []), *QUIET, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "recovery:" in run.stdout and "saved to" in run.stdout
    report, before = _report(out), _report(pruned)
    assert report["export"] == kind and report["reload_check"]["relative_max_difference"] < 1e-4
    assert report["widths"] == before["widths"] and report["parameters"] == before["parameters"]
    recovery = report["recovery"]
    assert recovery["steps"] == 3 and recovery["tokens"] == 3 * 4 * 32
    assert (recovery["lora"] is None) == full and ("merge_check" in recovery) == (not full)
    if not full:
        assert recovery["merge_check"]["relative_max_difference"] < 1e-5
        assert recovery["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
    assert (out / "modeling_subprune.py").exists() == (kind == "heterogeneous")
    assert (out / CALIBRATION_FILE).read_bytes() == (pruned / CALIBRATION_FILE).read_bytes()
    remote = kind == "heterogeneous"
    new = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote)
    old = transformers.AutoModelForCausalLM.from_pretrained(pruned, trust_remote_code=remote)
    assert not any("lora" in name for name, _ in new.named_parameters())
    probe = calibration_ids(2, 16)
    assert not torch.allclose(outputs(new, probe), outputs(old, probe), atol=1e-4)  # the training did something


def test_merged_model_equals_the_adapters(pruned_dirs):
    """merge_and_unload gives the model the adapters computed (trained adapters: B is not zero)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(pruned_dirs["heterogeneous"], trust_remote_code=True)
    wrapped = _wrap(model, RecoveryConfig())
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    probe = {"input_ids": calibration_ids(2, 16)}
    wrapped.eval()
    with torch.no_grad():
        adapted = wrapped(**probe).logits
        with wrapped.disable_adapter():
            plain = wrapped(**probe).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)
    merged, rel = _merge(wrapped, probe)
    assert rel < 1e-5 and torch.allclose(outputs(merged, probe["input_ids"]), adapted, atol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_calibration_data_is_the_exact_tokens_of_the_cut(pruned_dirs, corpus, tmp_path):
    """The folder keeps the blocks; without them they are drawn again from the source and checked against the
    fingerprint, which refuses other tokens."""
    pruned = pruned_dirs["stock"]
    recorded = _report(pruned)["calibration"]["fingerprint"]
    assert fingerprint(load_calibration_ids(pruned)) == recorded
    result = recover(pruned, "calibration", max_steps=1, progress=False)
    assert result.recovery["data"]["fingerprint"] == recorded and result.recovery["data"]["num_samples"] == 8

    bare = tmp_path / "bare"
    shutil.copytree(pruned, bare)
    (bare / CALIBRATION_FILE).unlink()
    assert recover(bare, "calibration", max_steps=1, progress=False).recovery["data"]["fingerprint"] == recorded

    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    report = _report(bare)
    report["calibration"]["source"] = str(other)
    (bare / REPORT_FILE).write_text(json.dumps(report))
    with pytest.raises(ValueError, match="fingerprint"):
        recover(bare, "calibration", max_steps=1, progress=False)


def test_distillation_from_the_base_model_lowers_its_loss(pruned_dirs, base_dir):
    """Teacher by default: the report's base model; every step sees the same full batch, so the KL must fall."""
    result = recover(pruned_dirs["stock"], "calibration", distill=True, max_steps=8, batch_size=8, lr=1e-2,
                     progress=False)
    recovery = result.recovery
    assert recovery["distill"] == {"teacher": str(base_dir), "temperature": 1.0, "kl_weight": 1.0}
    assert 0 < recovery["loss"]["last"] < recovery["loss"]["first"]


def test_hidden_state_loss_is_the_relative_error_per_block():
    """Against a direct sum: per block, the squared error over the teacher's energy on the unpadded tokens, then
    the mean over blocks; the embeddings' output does not count; a depth mismatch is refused."""
    torch.manual_seed(0)
    teacher = tuple(torch.randn(2, 5, 4) for _ in range(4))
    student = (torch.randn(2, 5, 4),) + tuple(t + 0.1 * torch.randn_like(t) for t in teacher[1:])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float32)
    keep = mask.bool()
    expected = sum(((s[keep] - t[keep]) ** 2).sum() / (t[keep] ** 2).sum()
                   for s, t in zip(student[1:], teacher[1:])) / 3
    assert hidden_state_loss(student, teacher, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert hidden_state_loss(teacher, teacher).item() == 0
    padded = tuple(torch.where(keep[..., None], s, s + 100) for s in student)
    assert hidden_state_loss(padded, teacher, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="same depth"):
        hidden_state_loss(student[:3], teacher)


def test_distillation_with_hidden_states_brings_the_blocks_closer(pruned_dirs, base_dir, tmp_path):
    """``distill_hidden``: the hidden-state term is trained on (the blocks' outputs move towards the teacher's on
    the calibration blocks), and the report and card say so; without distill it is refused."""
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(pruned_dirs["stock"]).eval()
    ids = load_calibration_ids(pruned_dirs["stock"])

    def distance(model) -> float:
        with torch.no_grad():
            return hidden_state_loss(model(input_ids=ids, output_hidden_states=True).hidden_states,
                                     base(input_ids=ids, output_hidden_states=True).hidden_states).item()

    before = distance(student)
    result = recover(pruned_dirs["stock"], "calibration", distill=True, distill_hidden=1.0, full=True, max_steps=8,
                     batch_size=8, lr=1e-3, output=tmp_path / "out", progress=False)
    assert result.recovery["distill"]["hidden_weight"] == 1.0
    assert 0 < result.recovery["loss"]["last"] < result.recovery["loss"]["first"]
    assert distance(result.model.eval()) < 0.9 * before
    assert "hidden states' relative squared error" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(ValueError, match="--distill"):
        RecoveryConfig(distill_hidden=1.0)
    with pytest.raises(ValueError, match="0 or more"):
        RecoveryConfig(distill=True, distill_hidden=-1.0)


@pytest.mark.parametrize("full", [True, False], ids=["full", "lora"])
def test_distillation_in_bf16_mixed_precision(pruned_dirs, full):
    """bf16 autocast for student and teacher: the weights stay float32, the KL still falls, the report records
    the setting, and the model comes back without the Trainer's autocast (LoRA: the merge check compares float32
    outputs, and a later forward runs in float32)."""
    result = recover(pruned_dirs["stock"], "calibration", distill=True, full=full, bf16=True, max_steps=8,
                     batch_size=8, lr=1e-2 if not full else 1e-3, progress=False)
    assert result.recovery["config"]["bf16"] is True
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    assert 0 < result.recovery["loss"]["last"] < result.recovery["loss"]["first"]
    ids = torch.randint(0, result.model.config.vocab_size, (1, 8))
    assert result.model(input_ids=ids).logits.dtype == torch.float32


def test_default_learning_rates():
    """LoRA 2e-4, full 2e-5; distillation alone (smaller gradients) 5x the LoRA rate and 20x the full one; a mix
    keeps the language-model loss's; a rate given is used as given."""
    assert RecoveryConfig().learning_rate == 2e-4 and RecoveryConfig(full=True).learning_rate == 2e-5
    assert RecoveryConfig(distill=True).learning_rate == pytest.approx(1e-3)
    assert RecoveryConfig(full=True, distill=True).learning_rate == pytest.approx(4e-4)
    assert RecoveryConfig(full=True, distill=True, distill_weight=0.5).learning_rate == 2e-5
    assert RecoveryConfig(full=True, distill=True, lr=3e-5).learning_rate == 3e-5


def test_recovery_section_in_report_and_card(pruned_dirs, tmp_path):
    """Quality before and after with the prune report's own protocol; the card shows it and regenerates."""
    pruned = pruned_dirs["stock"]
    out = tmp_path / "recovered"
    recover(pruned, "calibration", output=out, max_steps=4, lr=1e-2, progress=False)
    report = _report(out)
    recovery, evaluation = report["recovery"], _report(pruned)["evaluation"]
    assert recovery["evaluation"]["perplexity_protocol"] == evaluation["perplexity_protocol"]
    assert recovery["evaluation"]["perplexity"]["before"] == pytest.approx(evaluation["perplexity"]["after"],
                                                                           rel=1e-4)
    assert recovery["data"]["source"] == "calibration" and recovery["data"]["tokens"] == 8 * 32
    assert recovery["seconds"] > 0 and recovery["config"]["max_steps"] == 4 and recovery["distill"] is None
    card = (out / "README.md").read_text()
    section = card.split("## Recovery")[1].split("## Widths")[0]
    assert "LoRA (r = 8, alpha = 16" in section and recovery["data"]["fingerprint"] in section
    assert "4 steps" in section and "| perplexity |" in section and "next-token loss" in section
    assert "perplexity (recovered)" in card and "No fine-tuning" not in card
    (out / "README.md").unlink()
    run = _run("card", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (out / "README.md").read_text() == card


BAD = {  # flags, the message, and the input: the pruned folder or the base model's (no report)
    "missing data file": (["--data", "missing.txt"], "missing.txt does not exist", "pruned"),
    "not an hf_subprune folder": (["--data", "calibration"], "subprune_report.json", "base"),
    "steps and epochs": (["--data", "calibration", "--max-steps", "2", "--epochs", "1"], "not allowed with argument",
                         "pruned"),
    "existing output": (["--data", "calibration"], "--overwrite", "pruned"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_any_work(pruned_dirs, base_dir, tmp_path, case):
    args, message, source = BAD[case]
    folder = base_dir if source == "base" else pruned_dirs["stock"]
    out = tmp_path / "out"
    if case == "existing output":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    run = _run("finetune", str(folder), *args, "--output", str(out), *QUIET, cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if case == "existing output" else [])
    if case == "existing output":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_config_refuses_steps_with_epochs():
    with pytest.raises(ValueError, match="not both"):
        RecoveryConfig(max_steps=2, epochs=1.0)
    with pytest.raises(ValueError, match="--distill"):
        RecoveryConfig(teacher="smollm2")


def test_prune_with_finetune_steps_saves_once(base_dir, corpus, tmp_path):
    out = tmp_path / "pruned"
    run = _run("prune", str(base_dir), "--output", str(out), "--sparsity", "0.4", "--budget", "uniform",
               "--calibration", str(corpus), "--num-samples", "8", "--seq-len", "32", "--evaluate", "--eval-text",
               str(corpus), "--eval-window", "32", "--eval-tokens", "256", "--finetune-steps", "2", "--lr", "1e-2",
               "--lora-r", "4", *QUIET, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = _report(out)
    recovery = report["recovery"]
    assert recovery["steps"] == 2 and recovery["lora"]["r"] == 4
    assert recovery["data"]["fingerprint"] == report["calibration"]["fingerprint"]
    assert recovery["evaluation"]["perplexity"]["before"] == pytest.approx(report["evaluation"]["perplexity"]["after"],
                                                                           rel=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]

    refused = _run("prune", str(base_dir), "--output", str(tmp_path / "o"), "--sparsity", "0.4", "--lora-r", "4",
                   *QUIET, cwd=tmp_path)
    assert refused.returncode == 2 and "--finetune-steps" in refused.stderr


# --- classification --------------------------------------------------------------------------------------------

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "movie", "was", "very", "plot"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny BERT with a two-class head, its tokenizer ([CLS] ... [SEP]) and a small labelled TSV."""
    folder = tmp_path_factory.mktemp("classifier")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                               cls_token="[CLS]", sep_token="[SEP]")
    config = tiny_config("bert")
    config.num_labels = 2
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    rng = random.Random(0)
    rows = []
    for i in range(24):
        label = i % 2
        words = [rng.choice(WORDS[:4] if label else WORDS[4:8])]
        words += [rng.choice(WORDS[8:]) for _ in range(rng.randint(2, 6))]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)}\t{'positive' if label else 'negative'}\n")
    data = folder / "sst.tsv"
    data.write_text("sentence\tlabel\n" + "".join(rows))
    return model, tok, data


def test_accuracy_of_a_classifier_on_a_labelled_file(classifier):
    model, tok, data = classifier
    texts, labels = load_labelled(data, label2id={"negative": 0, "positive": 1})
    assert len(texts) == 24 and labels[:2] == [0, 1]
    with torch.no_grad():
        enc = tok(texts, padding=True, return_tensors="pt")
        expected = float((model(**enc).logits.argmax(-1) == torch.tensor(labels)).float().mean())
    out = accuracy(model, tok, texts, labels, batch_size=5)
    assert out == {"accuracy": pytest.approx(expected), "examples": 24, "max_length": 128}
    measured = AccuracyEvaluator(tok, texts, labels, "sst.tsv")(model)
    assert measured["accuracy_protocol"] == {"data": "sst.tsv", "examples": 24, "max_length": 128}
    with pytest.raises(ValueError, match="label"):
        load_labelled(data)  # label names, and no label2id to map them


def test_classifier_recovers_on_its_labels(classifier, tmp_path):
    _, tok, data = classifier
    model = transformers.BertForSequenceClassification.from_pretrained(data.parent / "base")
    model.config.label2id, model.config.id2label = {"negative": 0, "positive": 1}, {0: "negative", 1: "positive"}
    ids = torch.tensor([tok(" ".join(random.Random(i).choices(WORDS, k=10)))["input_ids"] for i in range(8)])
    pruned = prune(model, tok, input_ids=ids, mlp_sparsity=0.3, progress=False).save(tmp_path / "pruned")
    result = recover(pruned, data, output=tmp_path / "recovered", epochs=1, batch_size=8, lr=1e-3, progress=False,
                     eval_data=data)
    recovery = _report(tmp_path / "recovered")["recovery"]
    assert recovery["data"]["labelled"] and recovery["data"]["num_samples"] == 24 and recovery["steps"] == 3
    assert 0 <= recovery["evaluation"]["accuracy"]["after"] <= 1
    assert "cross-entropy on the labels" in (tmp_path / "recovered" / "README.md").read_text()
    assert type(result.model).__name__ == "BertForSequenceClassification"
    # columns named otherwise: the names given for training read the evaluation file too
    renamed = tmp_path / "reviews.tsv"
    renamed.write_text("review\tstars\n" + data.read_text().split("\n", 1)[1])
    recover(pruned, renamed, output=tmp_path / "recovered-renamed", epochs=1, batch_size=8, lr=1e-3, progress=False,
            eval_data=renamed, text_column="review", label_column="stars")
    measured = _report(tmp_path / "recovered-renamed")["recovery"]["evaluation"]
    assert measured["accuracy_protocol"]["examples"] == 24 and measured["accuracy"]["before"] is not None
    with pytest.raises(ValueError, match="distill"):
        recover(pruned, "calibration", max_steps=1, progress=False)
    with pytest.raises(ValueError, match="needs labels"):  # no labels to mix the classifier's own loss with
        recover(pruned, "calibration", max_steps=1, distill=True, distill_weight=0.5, progress=False)


def test_classifier_distils_on_its_padded_calibration(classifier, tmp_path):
    """A classifier pruned from text is calibrated one sentence per sample (padded); recovery on 'calibration'
    trains on exactly those sentences, stored with their mask or drawn again from the file."""
    _, tok, data = classifier
    model = transformers.BertForSequenceClassification.from_pretrained(data.parent / "base")
    result = prune(model, tok, data, mlp_sparsity=0.3, num_samples=6, seq_len=16, progress=False)
    assert result.calibration["padded"] and result.attention_mask is not None
    pruned = result.save(tmp_path / "pruned")
    recorded = _report(pruned)["calibration"]
    recovered = recover(pruned, "calibration", distill=True, teacher=str(data.parent / "base"), max_steps=1,
                        batch_size=6, progress=False)
    assert recovered.recovery["data"]["fingerprint"] == recorded["fingerprint"]
    assert recovered.recovery["data"]["tokens"] == recorded["tokens"] == int(result.attention_mask.sum())
    (pruned / CALIBRATION_FILE).unlink()  # drawn again from the TSV, one sentence per sample
    again = recover(pruned, "calibration", distill=True, teacher=str(data.parent / "base"), max_steps=1,
                    batch_size=6, progress=False)
    assert again.recovery["data"]["fingerprint"] == recorded["fingerprint"]


def test_distillation_on_sequences_the_teacher_writes(pruned_dirs, base_dir, tmp_path):
    """``teacher_samples``: the teacher continues 8-token prompts cut from the calibration blocks, seeded; the
    written sequences join the training data (one epoch covers them), and report and card say so."""
    from hf_subprune.integrations.recovery import _teacher_written, lm_examples

    pruned = pruned_dirs["stock"]
    out = tmp_path / "recovered"
    result = recover(pruned, "calibration", distill=True, teacher_samples=4, epochs=1, batch_size=4, lr=1e-3,
                     output=out, progress=False)
    recovery = result.recovery
    written = recovery["data"]["teacher_written"]
    assert written["num_samples"] == 4 and written["seq_len"] == 32 and written["prompt_tokens"] == 8
    assert recovery["steps"] == 3 and recovery["tokens"] == (8 + 4) * 32  # 8 calibration blocks + 4 written
    assert "the teacher wrote from 8-token prompts" in (out / "README.md").read_text()

    ids = load_calibration_ids(pruned)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    config = RecoveryConfig(distill=True, teacher_samples=4)
    examples, info = _teacher_written(teacher, lm_examples(ids), config)
    assert info["fingerprint"] == written["fingerprint"]  # seeded: the same sequences again
    prompts = [row["input_ids"][:8] for row in examples]
    windows = {tuple(r[i : i + 8].tolist()) for r in ids for i in range(ids.shape[1] - 7)}
    assert all(tuple(p.tolist()) in windows for p in prompts)
    assert not all(torch.equal(row["input_ids"], ids[i % len(ids)]) for i, row in enumerate(examples))


def test_teacher_samples_need_distillation():
    with pytest.raises(ValueError, match="--distill"):
        RecoveryConfig(teacher_samples=4)
    with pytest.raises(ValueError, match="0 or more"):
        RecoveryConfig(distill=True, teacher_samples=-1)


def test_teacher_samples_flag_reaches_recover():
    """``--teacher-samples N`` on both verbs becomes ``recover(teacher_samples=N)``; unset, recover's default."""
    from hf_subprune.cli import _recovery_settings, build_parser

    parser = build_parser()
    args = parser.parse_args(["finetune", "DIR", "--data", "calibration", "--output", "OUT", "--distill",
                              "--teacher-samples", "24"])
    assert _recovery_settings(args) == {"distill": True, "teacher_samples": 24}
    args = parser.parse_args(["prune", "smollm2", "--output", "OUT", "--finetune-steps", "4", "--distill",
                              "--teacher-samples", "8"])
    assert _recovery_settings(args)["teacher_samples"] == 8
    args = parser.parse_args(["finetune", "DIR", "--data", "calibration", "--output", "OUT"])
    assert "teacher_samples" not in _recovery_settings(args) and "distill_hidden" not in _recovery_settings(args)
    args = parser.parse_args(["finetune", "DIR", "--data", "calibration", "--output", "OUT", "--distill",
                              "--distill-hidden", "0.5"])
    assert _recovery_settings(args) == {"distill": True, "distill_hidden": 0.5}


def test_warmup_raises_the_rate_from_zero_then_decays(pruned_dirs, tmp_path):
    """``warmup=0.5`` over 8 steps: the rate the optimizer uses climbs from 0 to ``lr`` over the first 4 steps,
    then falls linearly; without warmup it starts at ``lr``. The card says so; out of [0, 1) is refused; the flag
    reaches recover."""
    from transformers import TrainerCallback

    from hf_subprune.cli import _recovery_settings, build_parser
    from hf_subprune.integrations.recovery import finetune, lm_examples

    class Rates(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            self.seen.append(optimizer.param_groups[0]["lr"])

    result = recover(pruned_dirs["stock"], "calibration", max_steps=2, warmup=0.5, output=tmp_path / "out",
                     progress=False)
    assert result.recovery["config"]["warmup"] == 0.5
    assert "after a linear warmup over 50% of the steps" in (tmp_path / "out" / "README.md").read_text()
    ids = torch.randint(0, result.model.config.vocab_size, (8, 16))
    rates = {}
    for warmup in (0.0, 0.5):
        rates[warmup] = Rates()
        finetune(result.model, None, lm_examples(ids), RecoveryConfig(full=True, max_steps=8, lr=1e-3, warmup=warmup),
                 device="cpu", progress=False, callbacks=[rates[warmup]])
    warm = rates[0.5].seen
    assert rates[0.0].seen[0] == pytest.approx(1e-3)
    assert warm[0] == 0 and all(a < b for a, b in zip(warm[:4], warm[1:5])) and warm[4] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(warm[4:], warm[5:]))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="warmup"):
            RecoveryConfig(warmup=bad)
    args = build_parser().parse_args(["finetune", "DIR", "--data", "calibration", "--output", "OUT",
                                      "--warmup", "0.1"])
    assert _recovery_settings(args) == {"warmup": 0.1}
