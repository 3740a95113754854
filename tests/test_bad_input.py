"""Every bad input gets exit code 2 and one ``error: ...`` paragraph that says what to change, before the model is
loaded where it can be, and nothing is written (no output folder, no hidden temporary folder)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import tiny_model
from hf_subprune.cli import main

FAST = ["--num-samples", "2", "--seq-len", "16", "--quiet", "--budget", "uniform"]


def _tokenizer(words: list[str]) -> transformers.PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words[:126])}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")


def _save(folder: Path, model_type: str) -> Path:
    tiny_model(model_type).save_pretrained(folder)
    _tokenizer([f"w{i}" for i in range(126)]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama (64 positions) with a word-level tokenizer, saved like a hub folder."""
    return _save(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 (n_positions 64)."""
    return _save(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"w{i % 126}" for i in range(2000)))
    return path


def _fails(capsys, argv: list[str], fix: str, output: Path | None = None) -> str:
    """Run the CLI; assert exit code 2, the fix in the one-paragraph message, no traceback, nothing written."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("error: ") == 1, err
    message = err[err.index("error: "):]
    assert fix in message and message.strip().count("\n") == 0, err
    if output is not None:
        assert not output.exists(), f"{output} was written"
        assert not list(output.parent.glob(f".{output.name}.tmp-*")), "a temporary folder was left"
    return message


def _argparse_fails(capsys, argv: list[str], fix: str) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and fix in err and "Traceback" not in err, err


def _prune(model: Path | str, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--output", str(out), "--sparsity", "0.3", *FAST, *extra]


# --- 1. recipes: types, syntax, existence (all before the model is loaded: the model path here does not exist) ---

@pytest.mark.parametrize("body, fix", [
    ("prune:\n  sparsity: 0.3\n  refit: \"no\"\n", "refit must be true or false"),
    ("prune:\n  sparsity: 0.3\n  num_samples: 8.7\n", "num_samples must be a whole number"),
    ("prune:\n  sparsity: 0.3\n  num_samples: \"8\"\n", "without quotes"),
    ("prune:\n  sparsity: 0.3\n  num_samples: true\n", "num_samples must be a whole number"),
    ("prune:\n  sparsity: \"0.3\"\n", "sparsity must be a number"),
    ("prune:\n  sparsity: 0.3\n  device: 0\n", "device must be a string"),
])
def test_recipe_value_of_the_wrong_type(capsys, tmp_path, body, fix):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(body)
    out = tmp_path / "out"
    _fails(capsys, ["prune", str(tmp_path / "no-model"), "--output", str(out), "--recipe", str(recipe)], fix, out)


def test_recipe_exponent_is_a_number(tmp_path):
    """YAML 1.1 reads 1e-2 as a string; a recipe reads it as the number it means."""
    from hf_subprune.config import PruneConfig

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("prune:\n  sparsity: 3e-1\n  damping: 1e-2\n")
    config = PruneConfig.from_file(recipe)
    assert (config.sparsity, config.damping) == (0.3, 0.01)


def test_recipe_bad_yaml_names_the_file_and_line(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("prune:\n  sparsity: 0.3\n  method: [greedy\n")
    out = tmp_path / "out"
    err = _fails(capsys, ["prune", str(tmp_path / "no-model"), "--output", str(out), "--recipe", str(recipe)],
                 "fix that line", out)
    assert str(recipe) in err and "line " in err


def test_recipe_bad_json_names_the_file_and_line(capsys, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text('{"sparsity": 0.3,\n "seed": }\n')
    out = tmp_path / "out"
    err = _fails(capsys, ["prune", str(tmp_path / "no-model"), "--output", str(out), "--recipe", str(recipe)],
                 "line 2", out)
    assert str(recipe) in err


def test_missing_recipe_file(capsys, tmp_path):
    out = tmp_path / "out"
    recipe = tmp_path / "nope.yaml"
    err = _fails(capsys, ["prune", str(tmp_path / "no-model"), "--output", str(out), "--recipe", str(recipe)],
                 "does not exist", out)
    assert str(recipe) in err


# --- 2. the model path ---

def test_nonexistent_local_path(capsys, tmp_path):
    out = tmp_path / "out"
    _fails(capsys, _prune(tmp_path / "no" / "such" / "model", out), "does not exist", out)


def test_hub_id_offline_without_a_cached_copy(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    _fails(capsys, _prune("hf-subprune-test/not-a-cached-model", out), "unset HF_HUB_OFFLINE", out)


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    _fails(capsys, _prune(tmp_path / "empty", out), "has no config.json", out)


def test_folder_without_weights(capsys, tmp_path, llama_dir):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((llama_dir / "config.json").read_text())
    out = tmp_path / "out"
    _fails(capsys, _prune(folder, out), "but no weights", out)


def test_truncated_weights(capsys, tmp_path):
    folder = _save(tmp_path / "truncated", "llama")
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    out = tmp_path / "out"
    err = _fails(capsys, _prune(folder, out), "corrupt", out)
    assert str(folder) in err


# --- 3. calibration sizes against the model ---

@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_seq_len_above_the_models_positions(capsys, tmp_path, llama_dir, gpt2_dir, model):
    folder = llama_dir if model == "llama" else gpt2_dir
    out = tmp_path / "out"
    argv = ["prune", str(folder), "--output", str(out), "--sparsity", "0.3", "--num-samples", "2",
            "--seq-len", "65", "--quiet", "--budget", "uniform"]
    _fails(capsys, argv, "use --seq-len 64 or less", out)


@pytest.mark.parametrize("flag, value, fix", [
    ("--seq-len", "1", "at least 2"),
    ("--num-samples", "0", "num_samples must be a positive integer"),
    ("--batch-size", "0", "batch_size must be a positive integer"),
])
def test_calibration_sizes_too_small(capsys, tmp_path, llama_dir, flag, value, fix):
    out = tmp_path / "out"
    _fails(capsys, _prune(llama_dir, out, flag, value), fix, out)


# --- 4. the output folder ---

def test_output_parent_is_a_file(capsys, tmp_path, llama_dir):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    _fails(capsys, _prune(llama_dir, out), "is a file, not a folder", out)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_output_parent_not_writable(capsys, tmp_path, llama_dir):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        _fails(capsys, _prune(llama_dir, parent / "out"), "choose an output folder you can write to", parent / "out")
    finally:
        parent.chmod(0o700)


@pytest.mark.parametrize("output", [".", "..", "cwd"])
def test_output_is_the_current_folder_or_holds_it(capsys, tmp_path, llama_dir, monkeypatch, output):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("precious")
    monkeypatch.chdir(work)
    target = str(work) if output == "cwd" else output
    _fails(capsys, ["prune", str(llama_dir), "--output", target, "--overwrite", "--sparsity", "0.3", *FAST],
           "give a new folder")
    assert (work / "keep.txt").read_text() == "precious"


def test_output_is_the_input_model_folder(capsys, tmp_path):
    folder = _save(tmp_path / "model", "llama")
    before = sorted(p.name for p in folder.iterdir())
    _fails(capsys, _prune(folder, folder, "--overwrite"), "give another output folder")
    assert sorted(p.name for p in folder.iterdir()) == before
    assert not list(tmp_path.glob(".model.tmp-*"))


def test_output_is_the_folder_holding_the_gguf_file(capsys, tmp_path):
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF")
    _fails(capsys, _prune(folder / "model.gguf", folder, "--overwrite"), "give another output folder")
    assert (folder / "model.gguf").read_bytes() == b"GGUF"


# --- 5. devices ---

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda(capsys, tmp_path, llama_dir, device):
    out = tmp_path / "out"
    _fails(capsys, _prune(llama_dir, out, "--device", device), "use --device cpu", out)
    _fails(capsys, ["eval", str(llama_dir), "--perplexity", "builtin", "--device", device], "no CUDA device is visible")


def test_unknown_device(capsys, tmp_path, llama_dir):
    out = tmp_path / "out"
    _fails(capsys, _prune(llama_dir, out, "--device", "gpu"), "use cpu, cuda", out)
    _fails(capsys, ["eval", str(llama_dir), "--perplexity", "builtin", "--device", "tpu0"], "use cpu, cuda")


# --- 6. eval ---

@pytest.mark.parametrize("flag, value", [("--window", "0"), ("--window", "-3"), ("--max-tokens", "-5"),
                                         ("--max-tokens", "0"), ("--window", "eight")])
def test_eval_counts_must_be_positive(capsys, llama_dir, flag, value):
    _argparse_fails(capsys, ["eval", str(llama_dir), "--perplexity", "builtin", flag, value], flag)


@pytest.mark.parametrize("flag", ["--eval-window", "--eval-tokens"])
def test_prune_eval_counts_must_be_positive(capsys, tmp_path, llama_dir, flag):
    out = tmp_path / "out"
    _argparse_fails(capsys, _prune(llama_dir, out, "--evaluate", flag, "0"), "positive whole number")
    assert not out.exists()


def test_eval_text_missing(capsys, tmp_path, llama_dir):
    _fails(capsys, ["eval", str(llama_dir), "--perplexity", str(tmp_path / "nope.txt")], "give a UTF-8 text file")
    out = tmp_path / "out"
    _fails(capsys, _prune(llama_dir, out, "--evaluate", "--eval-text", str(tmp_path / "nope.txt")),
           "give a UTF-8 text file", out)


def test_eval_text_undecodable(capsys, tmp_path, llama_dir):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\xff\xfe\x00\x81" * 100)
    _fails(capsys, ["eval", str(llama_dir), "--perplexity", str(path)], "is not UTF-8 text")


def test_eval_text_shorter_than_a_window(capsys, tmp_path, llama_dir):
    path = tmp_path / "short.txt"
    path.write_text("w1 w2 w3")
    _fails(capsys, ["eval", str(llama_dir), "--perplexity", str(path), "--window", "32"], "give a longer text")


# --- 7. card ---

def _report_folder(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "pruned"
    folder.mkdir()
    (folder / "subprune_report.json").write_text(text)
    (folder / "README.md").write_text("old card")
    return folder


@pytest.mark.parametrize("text, fix", [
    ('{"model_type": "llama", ', "is not valid JSON (line 1"),
    ('{"model_type": "llama"}', "lacks config"),
    ("[1, 2]", "not the report's mapping"),
])
def test_card_on_a_broken_report(capsys, tmp_path, text, fix):
    folder = _report_folder(tmp_path, text)
    err = _fails(capsys, ["card", str(folder)], fix)
    assert "subprune_report.json" in err and "prune again" in err
    assert (folder / "README.md").read_text() == "old card"


def test_card_on_a_report_with_a_malformed_entry(capsys, tmp_path):
    report = {"model_type": "llama", "config": {}, "calibration": {}, "parameters": {"before": 1, "after": 1},
              "widths": [], "widths_before": {}, "sites": [], "seconds": 1.0}
    folder = _report_folder(tmp_path, json.dumps(report))
    _fails(capsys, ["card", str(folder)], "missing or malformed entry")
    assert (folder / "README.md").read_text() == "old card"


# --- 8. help ---

@pytest.mark.parametrize("command", ["prune", "eval"])
def test_help_says_each_default_once(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    out = " ".join(text.split())
    assert "(default: None)" not in out
    for option in text.split("\n  -")[1:]:
        said = " ".join(option.split())
        assert said.count("(default:") + said.count("None (default)") <= 1, said
    if command == "prune":
        for said in ("(default: 128)", "(default: 512)", "(default: greedy)", "(default: 0.01)", "(default: auto)",
                     "(default: 16384)"):
            assert out.count(said) >= 1, said
        assert out.count("(default: 128)") == 1


def test_offloaded_model_is_refused_before_any_work():
    """A model whose weights a device_map left on the meta device (offloaded) cannot be cut: a clear error."""
    import torch

    from hf_subprune import prune
    from conftest import calibration_ids, tiny_model

    model = tiny_model("llama")
    layer = model.model.layers[1].mlp.down_proj
    layer.weight = torch.nn.Parameter(torch.empty_like(layer.weight, device="meta"))
    with pytest.raises(ValueError, match="load it without device_map"):
        prune(model, input_ids=calibration_ids(4, 16), sparsity=0.3, device="cpu", progress=False)
    assert model.model.layers[0].mlp.down_proj.weight.shape[1] == model.config.intermediate_size  # nothing cut
