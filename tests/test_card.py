"""The model card and plots of a saved folder, and their regeneration from the report."""

from __future__ import annotations

import subprocess
import sys

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
