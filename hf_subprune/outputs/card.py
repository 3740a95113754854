"""The model card (README.md) and its plots, built from ``subprune_report.json`` alone, so that a card
can be regenerated from a folder (``hf-subprune card DIR``)."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..adapters import ADAPTERS
from ..files import CALIBRATION_FILE, REPORT_FILE

__all__ = ["build_card", "write_card", "write_plots", "regenerate"]

TEMPLATE = Path(__file__).parents[1] / "model_cards" / "pruned_model.md"
LOCAL_CALIBRATION = {"wikitext": "wikitext", "sst2": "glue"}


def _pipeline_tag(report: dict) -> str | None:
    """The Hub task, from the report (older reports: from the family's adapter)."""
    adapter = ADAPTERS.get(report["model_type"])
    return report.get("pipeline_tag") or (adapter.pipeline_tag if adapter else None)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _evaluation_rows(evaluation: dict) -> list[dict]:
    return [{"name": name, "before": _fmt(v["before"]), "after": _fmt(v["after"])}
            for name, v in evaluation.items() if isinstance(v, dict) and "before" in v]


def _layer_rows(report: dict) -> list[dict]:
    errors: dict[tuple[int, str], float] = {(s["block"], s["kind"]): s["relative_error"] for s in report["sites"]}
    rows = []
    for i, w in enumerate(report["widths"]):
        rows.append({"layer": i, "mlp": w["mlp"], "heads": w["heads"] or "-", "kv_heads": w["kv_heads"] or "-",
                     "mlp_error": _fmt(errors[(i, "mlp")]) if (i, "mlp") in errors else "-",
                     "attention_error": _fmt(errors[(i, "attention")]) if (i, "attention") in errors else "-"})
    return rows


def _recovery(report: dict) -> dict | None:
    """The Recovery section's facts: how the pruned model was fine-tuned, and its quality before and after."""
    recovery = report.get("recovery")
    if not recovery:
        return None
    data, lora, distill = recovery["data"], recovery.get("lora"), recovery.get("distill")
    size = (f"{data['num_samples']} x {data['seq_len']} = {data['tokens']:,} tokens" if "seq_len" in data
            else f"{data['num_samples']} labelled texts of at most {data['max_length']} tokens")
    source = ("the calibration samples of the cut" if data["source"] == "calibration" else f"`{data['source']}`")
    protocols = [p for name, p in recovery.get("evaluation", {}).items() if name.endswith("_protocol")]
    return {
        "training": (f"LoRA (r = {lora['r']}, alpha = {lora['alpha']}, dropout {lora['dropout']}) on every linear "
                     "layer, merged into the weights" if lora else "full fine-tuning of every weight"),
        "loss": (f"KL divergence from the output distribution of {distill['teacher']} (temperature "
                 f"{distill['temperature']:g}" + (f", weight {distill['kl_weight']:g} with the model's own loss)"
                                                  if distill["kl_weight"] < 1 else ")")
                 + (f", plus {distill['hidden_weight']:g} x its hidden states' relative squared error after every "
                    "block" if distill.get("hidden_weight") else "")
                 if distill else ("cross-entropy on the labels" if data.get("labelled") else "next-token loss")),
        "data": f"{source} ({size}, fingerprint `{data['fingerprint']}`)" + _teacher_written(data),
        "steps": recovery["steps"], "tokens": f"{recovery['tokens']:,}", "seconds": f"{recovery['seconds']:.1f}",
        "learning_rate": f"{recovery['learning_rate']:g}" + _warmup(recovery.get("config", {})),
        "batch_size": recovery["batch_size"],
        "rows": _evaluation_rows(recovery.get("evaluation", {})),
        "protocol": _protocol_text(protocols[0]) if protocols else None,
    }


def _warmup(config: dict) -> str:
    """The learning rate's note on a warmup (``recover(warmup=...)``); the decay is linear either way."""
    share = config.get("warmup") or 0
    return f" after a linear warmup over {share:.0%} of the steps" if share else ""


def _teacher_written(data: dict) -> str:
    """The data line's note on sequences the teacher wrote for distillation (``recover(teacher_samples=N)``)."""
    written = data.get("teacher_written")
    if not written:
        return ""
    return (f", and {written['num_samples']} x {written['seq_len']} tokens the teacher wrote from "
            f"{written['prompt_tokens']}-token prompts of them (nucleus {written['top_p']:g}, fingerprint "
            f"`{written['fingerprint']}`)")


def _shape(calibration: dict) -> str:
    """How many tokens in what samples: fixed windows, or padded texts (whose padding is not counted)."""
    n, length, tokens = calibration["num_samples"], calibration["seq_len"], calibration["tokens"]
    if calibration.get("padded"):
        return f"{n} texts of up to {length} tokens, one per sample, {tokens} tokens in all"
    return f"{n} x {length} = {tokens} tokens"


def _synthetic(calibration: dict) -> str:
    """The calibration line's note on sequences the base model wrote itself (``synthetic.py``)."""
    count = calibration.get("synthetic_samples") or 0
    if not count:
        return ""
    how = calibration.get("synthetic", {})
    return (f"; {count} of the sequences written by the base model from {how.get('prompt_tokens', '?')}-token "
            f"prompts of the others, nucleus {how.get('top_p', '?')}")


def _protocol_text(protocol: dict) -> str:
    if "window" in protocol:
        return (f"Perplexity on {protocol['text']}: {protocol['tokens']} tokens in non-overlapping windows of "
                f"{protocol['window']}.")
    return (f"Accuracy on {protocol['data']}: {protocol['examples']} examples, truncated to {protocol['max_length']} "
            "tokens.")


def _datasets(report: dict) -> list[str] | None:
    source = str(report["calibration"].get("source", ""))
    return [v for k, v in LOCAL_CALIBRATION.items() if k in source.lower()] or None


def _span(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _base_widths(before: dict) -> str:
    """The widths the cut started from: one set, or the ranges of a model pruned before with per-layer widths."""
    layers = before.get("layers") or [before]
    text = f"MLP width {_span([w['mlp'] for w in layers])}"
    if before.get("heads"):
        text += (f", {_span([w['heads'] for w in layers])} attention heads "
                 f"({_span([w['kv_heads'] for w in layers])} kv heads)")
    return text + (" per layer (it was pruned before with per-layer widths)" if "layers" in before else "")


def write_plots(folder: Path, report: dict) -> list[dict]:
    """Kept width per layer for each site type, and the greedy error curves, as PNGs next to the card.

    matplotlib is a core dependency, so every card has its plots. Figures are built without pyplot: no
    backend is chosen or changed for the caller's session, and nothing global is left open."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    widths, before = report["widths"], report["widths_before"]
    kinds = [("mlp", "MLP neurons")] + ([("heads", "attention heads")] if before.get("heads") else [])
    fig = Figure(figsize=(5 * len(kinds), 3.2))
    axes = fig.subplots(1, len(kinds), squeeze=False)
    for ax, (key, label) in zip(axes[0], kinds):
        ax.bar(range(len(widths)), [w[key] for w in widths], color="tab:blue")
        if "layers" in before:  # pruned before: each layer's own base width
            ax.step(range(len(widths)), [w[key] for w in before["layers"]], where="mid", color="gray",
                    linestyle="--", label="base")
        else:
            ax.axhline(before[key], color="gray", linestyle="--", label="base")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"kept {label}")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "kept_widths.png", dpi=100)
    plots = [{"title": "kept width per layer", "file": "kept_widths.png"}]
    curves = [s for s in report["sites"] if s.get("curve")]
    curve_kinds = [k for k in ("mlp", "attention") if any(c["kind"] == k for c in curves)]  # a panel per pruned kind
    if curve_kinds:
        fig = Figure(figsize=(5 * len(curve_kinds), 3.2))
        axes = fig.subplots(1, len(curve_kinds), squeeze=False)
        cmap = colormaps["viridis"]
        for ax, kind in zip(axes[0], curve_kinds):
            for s in (c for c in curves if c["kind"] == kind):
                ax.plot(range(1, len(s["curve"]) + 1), s["curve"], color=cmap(s["block"] / max(len(widths) - 1, 1)),
                        linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xlabel(f"{kind} groups kept (greedy order)")
            ax.set_ylabel("relative reconstruction error")
            ax.set_title(f"{kind} sites (colour: layer)")
        fig.tight_layout()
        fig.savefig(folder / "error_curves.png", dpi=100)
        plots.append({"title": "greedy error curves", "file": "error_curves.png"})
    return plots


def build_card(report: dict, plots: list[dict] | None = None, file_size: dict | None = None) -> ModelCard:
    base = report.get("base_model")
    hub_base = base if base and "/" in base and not Path(base).exists() else None
    evaluation = report.get("evaluation") or {}
    data = ModelCardData(
        base_model=hub_base,
        library_name="transformers",
        pipeline_tag=_pipeline_tag(report),
        license=report.get("license"),
        datasets=_datasets(report),
        tags=["pruned", "hf-subprune", "structured-pruning", report["model_type"]],
    )
    if evaluation.get("perplexity"):
        data.model_name = f"{Path(base).name if base else 'model'}-pruned"
        data.eval_results = _eval_results(evaluation, report)
    cfg = report["config"]
    cal = report["calibration"]
    settings = [("method", cfg["method"]), ("variant", cfg["variant"]),
                ("drift correction", cfg.get("drift_correction") or 0.0), ("refit", cfg["refit"]),
                ("refit of sites kept whole", bool(cfg.get("refit_full_width"))),
                ("budget", cfg["budget"]), ("sparsity", cfg["sparsity"]), ("mlp sparsity", cfg["mlp_sparsity"]),
                ("attention sparsity", cfg["attention_sparsity"]), ("attention mode", cfg["attention_mode"]),
                ("damping", cfg["damping"]), ("token weights", cfg.get("token_weights", "none")),
                ("selection error", cfg.get("selection_error", "refit")),
                ("seed", cfg["seed"]),
                ("calibration data", f"{cal['source']} ({_shape(cal)}{_synthetic(cal)}, fingerprint "
                                     f"`{cal['fingerprint']}`)"),
                ("time", f"{report['seconds']:.0f} s")]
    protocol = evaluation.get("perplexity_protocol")
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        title=f"{Path(base).name if base else 'model'} pruned with hf_subprune",
        base_model=base,
        base_model_url=f"https://huggingface.co/{hub_base}" if hub_base else "#",
        heads_pruned=any(s["kind"] == "attention" for s in report["sites"]),
        calibration=cal,
        parameters=report["parameters"],
        file_size=file_size,
        base_widths=_base_widths(report["widths_before"]),
        uniform=report.get("uniform", True),
        layer_rows=_layer_rows(report),
        evaluation_rows=_evaluation_rows(evaluation),
        protocol=_protocol_text(protocol) if protocol else None,
        recovery=_recovery(report),
        plots=plots or [],
        settings=settings,
        notes=report.get("notes", []),
        auto_class=report.get("auto_class", "AutoModel"),
        remote_code=report.get("export") == "heterogeneous",
    )


def _eval_results(evaluation: dict, report: dict):
    from huggingface_hub import EvalResult

    task = _pipeline_tag(report) or "text-generation"
    recovered = (report.get("recovery") or {}).get("evaluation", {})
    rows = [(evaluation, "base", "before"), (evaluation, "pruned", "after")]
    if recovered.get("perplexity"):
        rows.append((recovered, "recovered", "after"))
    results = []
    for source, stage, key in rows:
        dataset = str(source.get("perplexity_protocol", {}).get("text", "held-out text"))
        results.append(EvalResult(task_type=task, dataset_type=dataset, dataset_name=Path(dataset).name or dataset,
                                  metric_type="perplexity", metric_name=f"perplexity ({stage})",
                                  metric_value=round(source["perplexity"][key], 4)))
    return results


def write_card(folder: Path, report: dict) -> Path:
    folder = Path(folder)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.name != CALIBRATION_FILE)
    bytes_per_param = weights / max(report["parameters"]["after"], 1)
    file_size = {"base": _size(int(report["parameters"]["before"] * bytes_per_param)) + " (same dtype)",
                 "pruned": _size(weights)} if weights else None
    path = folder / "README.md"
    build_card(report, write_plots(folder, report), file_size).save(path)
    return path


def regenerate(folder: Path) -> Path:
    """Rewrite README.md and the plots of a pruned folder from its ``subprune_report.json``."""
    folder = Path(folder)
    report_path = folder / REPORT_FILE
    if not report_path.exists():
        raise FileNotFoundError(f"{folder} has no {REPORT_FILE}: it was not written by hf_subprune")
    damaged = "the report is damaged: prune again to rewrite it, or restore it from the Hub repo or a backup"
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{report_path} is not UTF-8 text ({e.reason}); {damaged}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{report_path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                         f"{damaged}") from None
    if not isinstance(report, dict):
        raise ValueError(f"{report_path} holds a {type(report).__name__}, not the report's mapping; {damaged}")
    required = ("model_type", "config", "calibration", "parameters", "widths", "widths_before", "sites", "seconds")
    missing = [key for key in required if key not in report]
    if missing:
        raise ValueError(f"{report_path} lacks {', '.join(missing)}; {damaged}")
    try:  # a dry run, so that a malformed value fails before README.md or a plot is replaced
        build_card(report)
        float(report["parameters"]["before"]) / max(float(report["parameters"]["after"]), 1.0)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ValueError(f"{report_path} has a missing or malformed entry ({type(e).__name__}: {e}); "
                         f"{damaged}") from None
    return write_card(folder, report)
