"""The model card (README.md) of a pruned folder, built from ``subprune_report.json`` alone."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

__all__ = ["build_card", "write_card"]

TEMPLATE = Path(__file__).parent / "model_cards" / "pruned_model.md"
PIPELINE_TAGS = {"llama": "text-generation", "mistral": "text-generation", "qwen2": "text-generation",
                 "qwen3": "text-generation", "gpt2": "text-generation", "bert": "feature-extraction",
                 "roberta": "feature-extraction"}


def _evaluation_rows(evaluation: dict) -> list[dict]:
    rows = []
    for name, values in evaluation.items():
        if isinstance(values, dict) and "before" in values:
            fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
            rows.append({"name": name, "before": fmt(values["before"]), "after": fmt(values["after"])})
    return rows


def build_card(report: dict) -> ModelCard:
    base = report.get("base_model")
    hub_base = base if base and "/" in base and not Path(base).exists() else None
    data = ModelCardData(
        base_model=hub_base,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS.get(report["model_type"]),
        tags=["pruned", "hf-subprune", "structured-pruning", report["model_type"]],
    )
    cfg = report["config"]
    settings = [("method", cfg["method"]), ("variant", cfg["variant"]), ("refit", cfg["refit"]),
                ("budget", cfg["budget"]), ("sparsity", cfg["sparsity"]), ("mlp sparsity", cfg["mlp_sparsity"]),
                ("attention sparsity", cfg["attention_sparsity"]), ("attention mode", cfg["attention_mode"]),
                ("seed", cfg["seed"]),
                ("calibration data", "{source} ({tokens} tokens, fingerprint `{fingerprint}`)".format(**report["calibration"]))]
    sites = report["sites"]
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        title=f"{Path(base).name if base else 'model'} pruned with hf_subprune",
        base_model=base,
        base_model_url=f"https://huggingface.co/{hub_base}" if hub_base else "#",
        heads_pruned=any(s["kind"] == "attention" for s in sites),
        calibration=report["calibration"],
        parameters=report["parameters"],
        widths=report["widths"],
        before_widths=report["widths_before"],
        evaluation=report.get("evaluation"),
        evaluation_rows=_evaluation_rows(report.get("evaluation", {})),
        settings=settings,
        notes=report.get("notes", []),
        auto_class=report.get("auto_class", "AutoModel"),
    )


def write_card(folder: Path, report: dict) -> Path:
    path = Path(folder) / "README.md"
    build_card(report).save(path)
    return path
