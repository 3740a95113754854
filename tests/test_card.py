"""The model card and plots of a saved folder, and their regeneration from the report."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from hf_subprune import prune

from conftest import calibration_ids, tiny_model


def _front_matter(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


def test_card_metadata_tables_and_plots(tmp_path):
    result = prune(tiny_model("llama"), budget="uniform", input_ids=calibration_ids(), sparsity=0.3, progress=False,
                   base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    result.license = "apache-2.0"
    result.evaluation = {"perplexity": {"before": 10.0, "after": 12.5},
                         "perplexity_protocol": {"text": "wikitext-2/test.txt", "window": 16, "tokens": 64}}
    folder = result.save(tmp_path / "out")
    card = (folder / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"pruned", "hf-subprune"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert "model-index" in meta and "12.5" in card
    assert "| 1 | " in card  # a row per layer
    assert (folder / "kept_widths.png").stat().st_size > 1000 and "kept_widths.png" in card
    assert (folder / "error_curves.png").exists()
    assert "AutoModelForCausalLM.from_pretrained" in card and "elhalabi2022data" in card

    (folder / "README.md").unlink()
    (folder / "kept_widths.png").unlink()
    run = subprocess.run([sys.executable, "-m", "hf_subprune", "card", str(folder)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (folder / "README.md").read_text() == card and (folder / "kept_widths.png").exists()


def test_card_of_a_folder_without_report_is_a_clear_error(tmp_path):
    run = subprocess.run([sys.executable, "-m", "hf_subprune", "card", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "subprune_report.json" in run.stderr


RUNS = {  # model, prune() arguments, whether the widths differ per layer
    "uniform": ("llama", dict(input_ids=calibration_ids(), sparsity=0.3, budget="uniform"), True),
    "heterogeneous": ("qwen3", dict(input_ids=calibration_ids(16, 16), sparsity=0.4, budget="global"), False),
    "encoder-mlp-only": ("bert", dict(input_ids=calibration_ids(), mlp_sparsity=0.3), True),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_every_saved_card_has_its_plots(run, tmp_path):
    """matplotlib is a dependency: every card written by a save has both plots, and shows them."""
    model_type, kwargs, uniform = RUNS[run]
    result = prune(tiny_model(model_type), progress=False, **kwargs)
    assert result.uniform is uniform
    folder = result.save(tmp_path / "out")
    card = (folder / "README.md").read_text()
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert sorted(shown) == ["error_curves.png", "kept_widths.png"]
    for name in shown:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (folder / name).stat().st_size > 1000
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(shown)


def test_card_says_which_calibration_sequences_the_model_wrote_itself(tmp_path):
    result = prune(tiny_model("llama"), budget="uniform", input_ids=calibration_ids(3, 20), sparsity=0.3,
                   progress=False)
    card = (result.save(tmp_path / "out") / "README.md").read_text()
    count = result.calibration["synthetic_samples"]
    assert count > 0
    assert f"({count} of them written by the base model itself" in card
    assert f"{count} of the sequences written by the base model from 8-token prompts" in card
