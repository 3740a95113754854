"""The command line, end to end on a tiny model folder (real files, a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a word-level tokenizer over a small vocabulary, saved like a hub folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    words = sorted(set(_corpus().split()))[:126]
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    tiny_model("llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _corpus() -> str:
    from hf_subprune.calibration import builtin_text

    return builtin_text()[:20000]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hf_subprune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_prune_then_eval(model_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(_corpus())
    out = tmp_path / "pruned"
    run = _run("prune", str(model_dir), "--output", str(out), "--sparsity", "0.3", "--calibration", str(text),
               "--budget", "uniform",
               "--num-samples", "8", "--seq-len", "32", "--batch-size", "3", "--evaluate", "--eval-text", str(text),
               "--eval-window", "32", "--eval-tokens", "256", "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "parameters:" in run.stdout and "saved to" in run.stdout
    report = json.loads((out / "subprune_report.json").read_text())
    assert report["config"]["num_samples"] == 8 and report["evaluation"]["perplexity"]["after"] > 1
    assert transformers.AutoConfig.from_pretrained(out).intermediate_size == report["widths"][0]["mlp"] < 40

    again = _run("prune", str(model_dir), "--output", str(out), "--sparsity", "0.3", "--calibration", str(text),
                 "--num-samples", "8", "--seq-len", "32", "--quiet", cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr

    ev = _run("eval", str(out), "--perplexity", str(text), "--window", "32", "--max-tokens", "256", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert "windows of 32 tokens" in ev.stdout


def test_recipe_and_flags(model_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("prune:\n  mlp_sparsity: 0.5\n  method: flap-score\n  num_samples: 6\n  seq_len: 32\n")
    text = tmp_path / "calib.txt"
    text.write_text(_corpus())
    out = tmp_path / "pruned"
    run = _run("prune", str(model_dir), "--output", str(out), "--recipe", str(recipe), "--calibration", str(text),
               "--no-refit", "--seed", "3", "--token-weights", "none", "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    cfg = json.loads((out / "subprune_report.json").read_text())["config"]
    assert (cfg["method"], cfg["refit"], cfg["seed"], cfg["mlp_sparsity"], cfg["token_weights"]) == (
        "flap-score", False, 3, 0.5, "none")


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "sparsity must be in"),
    (["--sparsity", "0.2", "--num-samples", "5000", "--seq-len", "32"], "--num-samples"),
    (["--mlp-sparsity", "0.3", "--method", "flap"], "one overall `sparsity`"),
])
def test_bad_input_gets_a_clear_error(model_dir, tmp_path, args, message):
    run = _run("prune", str(model_dir), "--output", str(tmp_path / "o"), *args, "--quiet", cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_synthetic_samples_flag(model_dir, tmp_path):
    """--synthetic-samples N with the model in memory: N sequences the model wrote join the calibration; lazily
    loaded (the default for a folder), asking for them is refused with what to do."""
    text = tmp_path / "calib.txt"
    text.write_text(_corpus())
    common = ["--sparsity", "0.3", "--calibration", str(text), "--num-samples", "2", "--seq-len", "24",
              "--budget", "uniform", "--quiet"]
    out = tmp_path / "pruned"
    run = _run("prune", str(model_dir), "--output", str(out), "--synthetic-samples", "3", "--no-lazy", *common,
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    cal = json.loads((out / "subprune_report.json").read_text())["calibration"]
    assert (cal["real_samples"], cal["synthetic_samples"], cal["num_samples"]) == (2, 3, 5)
    refused = _run("prune", str(model_dir), "--output", str(tmp_path / "lazy"), "--synthetic-samples", "3", *common,
                   cwd=tmp_path)
    assert refused.returncode == 2 and "--no-lazy" in refused.stderr, refused.stderr
    assert not (tmp_path / "lazy").exists()


def test_help_lists_every_flag():
    run = _run("prune", "--help", cwd=ROOT)
    for flag in ("--output", "--overwrite", "--sparsity", "--mlp-sparsity", "--attention-sparsity", "--calibration",
                 "--num-samples", "--synthetic-samples", "--seq-len", "--method", "--variant", "--no-refit", "--recipe", "--seed",
                 "--device", "--dtype", "--stats-dtype"):
        assert flag in run.stdout


def test_global_budget_flags(model_dir, tmp_path):
    """--budget global with the rounding and minimum-width flags: the widths follow them, and the folder
    reloads (with the remote code when the widths differ per layer). --stats-dtype reaches the config."""
    text = tmp_path / "calib.txt"
    text.write_text(_corpus())
    out = tmp_path / "global"
    run = _run("prune", str(model_dir), "--output", str(out), "--sparsity", "0.4", "--budget", "global",
               "--mlp-multiple", "4", "--min-width-fraction", "0.25", "--calibration", str(text),
               "--num-samples", "8", "--seq-len", "32", "--stats-dtype", "float32", "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "subprune_report.json").read_text())
    config = report["config"]
    assert (config["budget"], config["mlp_multiple"], config["min_width_fraction"], config["stats_dtype"]) == (
        "global", 4, 0.25, "float32")
    mlp = [w["mlp"] for w in report["widths"]]
    full = transformers.AutoConfig.from_pretrained(model_dir).intermediate_size
    assert all(w % 4 == 0 or w == full for w in mlp) and min(mlp) >= 0.25 * full
    remote = report["export"] == "heterogeneous"
    assert (out / "modeling_subprune.py").exists() == remote
    transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote)
