"""``prune(model, ...)``: the one verb. Saving, pushing and the report are methods of its result."""

from __future__ import annotations

import dataclasses
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .adapters import auto_class_for, get_adapter
from .checks import check_model, check_run
from .calibration import check_attention_mask, draw_samples, fingerprint, load_texts, shard
from .config import PruneConfig
from .distributed import compute_device, process_state
from .logs import get_logger
from .maths.methods import METHODS, Method
from .pipeline.blocks import forwards_on
from .pipeline.budget import plan_widths, resolve_budget
from .pipeline.capture import capture_block_inputs, find_blocks
from .pipeline.flap import MODEL_PASSES
from .pipeline.lazy import lazy_blocks
from .pipeline.runner import SiteReport, prune_blocks
from .pipeline.statistics import summed_dtype
from .pipeline.surgery import update_config
from .pipeline.variants import drift_correction_for
from .pipeline.widths import Widths, site_costs
from .synthetic import TOP_P, NonFiniteOutputError, prompt_tokens, self_generated, synthetic_count

__all__ = ["prune", "PruneResult", "count_parameters", "Evaluator"]

logger = get_logger(__name__)

Evaluator = Callable[[nn.Module], dict]
"""Measures a model: returns ``{metric: value, ...}`` and optionally ``"<metric>_protocol": {...}`` (how it was
measured). ``prune`` calls it before and after the cut (``evaluation.PerplexityEvaluator`` is one)."""


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class PruneResult:
    """The pruned model (pruned in place) and everything needed to report and save it."""

    model: nn.Module
    tokenizer: Any
    config: PruneConfig  # as run: a published method's own settings replace the asked ones (the notes say which)
    widths: list[Widths]  # per block
    widths_before: dict
    sites: list[SiteReport]
    params_before: int
    params_after: int
    seconds: float
    calibration: dict
    base_model: str | None = None
    license: str | None = None
    evaluation: dict = field(default_factory=dict)
    input_ids: torch.Tensor | None = field(default=None, repr=False)  # the calibration tokens: saved for recovery
    attention_mask: torch.Tensor | None = field(default=None, repr=False)  # their padding (None: there is none)

    def report(self, *, export: str | None = None, reload_check: dict | None = None) -> dict:
        """Everything about the run, as JSON-ready data: what ``save`` writes as ``subprune_report.json`` (with
        the ``export`` kind and the ``reload_check`` it measured) and what the card is built from."""
        import transformers

        from . import __version__

        report = {
            "hf_subprune_version": __version__,
            "base_model": self.base_model,
            "license": self.license,
            "model_type": self.model.config.model_type,
            "pipeline_tag": get_adapter(self.model.config).pipeline_tag,
            "config": self.config.to_dict(),
            "auto_class": auto_class_for(self.model).__name__,
            "widths_before": self.widths_before,
            "widths": [w.counts() for w in self.widths],
            "uniform": self.uniform,
            "notes": self.notes,
            "parameters": {"before": self.params_before, "after": self.params_after,
                           "removed_fraction": 1 - self.params_after / self.params_before},
            "calibration": self.calibration,
            "evaluation": self.evaluation,
            "seconds": self.seconds,
            "sites": [s.to_dict() for s in self.sites],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
        }
        if export is not None:
            report["export"] = export
        if reload_check is not None:
            report["reload_check"] = reload_check
        return report

    @property
    def uniform(self) -> bool:
        """Every block has the same widths (the stock config can describe the model)."""
        return len({(w.mlp, w.heads, w.kv_heads) for w in self.widths}) == 1

    @property
    def notes(self) -> list[str]:
        return self.widths[0].notes if self.widths else []

    def summary(self) -> str:
        """A plain-text table: parameters, widths, reconstruction errors, time."""
        lines = [
            f"parameters: {self.params_before:,} -> {self.params_after:,} "
            f"({1 - self.params_after / self.params_before:.1%} removed) in {self.seconds:.1f} s",
            *self._width_lines(),
            *[f"note: {n}" for n in self.notes],
            f"{'site':<28}{'kept':>12}{'rel.err':>10}{'no refit':>10}{'stats s':>9}{'select s':>9}",
        ]
        for s in self.sites:
            rel0 = s.error_original_columns / max(s.target_sq, 1e-30)
            lines.append(f"{s.name:<28}{f'{s.groups_kept}/{s.groups_before}':>12}{s.relative_error:>10.4f}"
                         f"{rel0:>10.4f}{s.seconds_statistics:>9.2f}{s.seconds_selection:>9.2f}")
        for name, value in self.evaluation.items():
            if isinstance(value, dict) and "before" in value:
                lines.append(f"{name}: {value['before']:.4g} before, {value['after']:.4g} after")
        return "\n".join(lines)

    def _width_lines(self) -> list[str]:
        if self.uniform:
            w = self.widths[0]
            return [f"kept widths in every block: mlp {w.mlp}, heads {w.heads}, kv heads {w.kv_heads}"]
        return ["kept widths per block (mlp/heads/kv heads): "
                + ", ".join(f"{i}:{w.mlp}/{w.heads}/{w.kv_heads}" for i, w in enumerate(self.widths))]

    def save(self, path: str | Path, *, overwrite: bool = False, check: bool = True,
             max_shard_size: int | None = None) -> Path:
        """Write the model folder (see ``outputs.export.save_pruned``); weights above ``max_shard_size`` bytes
        (default: transformers' 50 GB) are split into shards."""
        from .outputs.export import save_pruned
        from .outputs.shards import DEFAULT_MAX_SHARD_SIZE

        return save_pruned(self, Path(path), overwrite=overwrite, check=check,
                           max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                           device=compute_device(self.config.device))

    def push_to_hub(self, repo_id: str, *, private: bool = False, revision: str | None = None,
                    commit_message: str | None = None, token: str | None = None, create_pr: bool = False,
                    check: bool = True) -> str:
        """Save the model folder (with its card and report) to a temporary folder, reload-checked, and upload it
        to ``repo_id`` in one commit; returns the commit (or pull request) URL. The token is checked first."""
        from .outputs.hub import check_can_push, push_folder

        token = check_can_push(token)
        with tempfile.TemporaryDirectory(prefix="hf_subprune-push-") as tmp:
            folder = self.save(Path(tmp) / "model", check=check)
            return push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                               token=token, create_pr=create_pr)


def _describe_source(calibration: Any, input_ids_given: bool) -> str:
    if input_ids_given:
        return "token ids given by the caller"
    if calibration is None:
        return "builtin (pydoc_data.topics)"
    if isinstance(calibration, (str, Path)):
        return str(calibration)
    return type(calibration).__name__


def _method_notes(method: Method, asked: PruneConfig) -> list[str]:
    """How a published method ran, and which of the asked settings it replaced with its own."""
    if not method.published:
        return []
    replaced = [f"{name}={value} (asked {getattr(asked, name)})" for name, value in method.settings.items()
                if getattr(asked, name) != value]
    notes = [method.note]
    if replaced:
        notes.append(f"{method.name} fixes its own settings: " + ", ".join(replaced))
    return notes


def _measure(evaluate: Evaluator | None, model: nn.Module, device=None) -> dict:
    """``evaluate(model)`` in eval mode; with ``device``, run there one block at a time (``forwards_on``)."""
    if evaluate is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        with forwards_on(model, device):
            return dict(evaluate(model))
    finally:
        model.train(was_training)


def _evaluation(before: dict, after: dict) -> dict:
    """``{metric: {"before", "after"}}`` plus each metric's protocol, as the report and the card show them."""
    out = {}
    for name, value in after.items():
        if name.endswith("_protocol"):
            out[name] = value
        else:
            out[name] = {"before": before.get(name), "after": value}
    return out


def _add_synthetic(model: nn.Module, input_ids: torch.Tensor, config: PruneConfig, causal_lm: bool,
                   padded: bool) -> tuple[torch.Tensor, dict, list[str]]:
    """The calibration with the sequences the model writes itself appended (``synthetic.py``), what the report
    says about them, and the notes for the result. Every process generates the same ones (same seed, same
    batches) before the samples are shared out, so the result does not depend on the process count."""
    count, note = synthetic_count(config.synthetic_samples, len(input_ids), seq_len=int(input_ids.shape[1]),
                                  generative=causal_lm and model.can_generate(), lazy=lazy_blocks(model) is not None,
                                  padded=padded)
    if not count:
        return input_ids, {"synthetic_samples": 0}, [note] if note else []
    logger.info(f"the model writes {count} calibration sequences to go with the {len(input_ids)} given "
                "(synthetic_samples; see hf_subprune/synthetic.py)")
    start = time.perf_counter()
    prompt = prompt_tokens(int(input_ids.shape[1]))
    try:
        generated = self_generated(model, input_ids, count, seed=config.seed, prompt=prompt)
    except NonFiniteOutputError as e:  # the statistics' finiteness check then names the site
        return input_ids, {"synthetic_samples": 0}, [f"no synthetic calibration: {e}"]
    record = {"synthetic_samples": count, "synthetic": {"prompt_tokens": prompt, "top_p": TOP_P,
                                                         "temperature": 1.0,
                                                         "seconds": round(time.perf_counter() - start, 3)}}
    note = (f"{count} synthetic calibration sequences: the dense model continued {prompt}-token prompts from "
            f"the {len(input_ids)} given ones (nucleus {TOP_P}), to go with them")
    return torch.cat([input_ids, generated]), record, [note]


def _widths_before(adapter, blocks: nn.ModuleList) -> dict:
    """The widths the model has before the cut, for the report and the card: the largest of each site type, and,
    where the blocks differ (pruned before with per-layer widths), every block's under ``layers``."""
    layers = [site_costs(adapter, block).widths.counts() for block in blocks]
    widths = {key: max(layer[key] for layer in layers) for key in layers[0]}
    if any(layer != layers[0] for layer in layers):
        widths["layers"] = layers
    return widths


@torch.no_grad()
def prune(
    model: nn.Module | str | Path,
    tokenizer=None,
    calibration: Any = None,
    config: PruneConfig | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
    base_model: str | None = None,
    license: str | None = None,
    evaluate: Evaluator | None = None,
    text_column: str | None = None,
    dataset_config: str | None = None,
    split: str | None = None,
    streaming: bool = False,
    lazy: bool = True,
    dtype: str = "auto",
    **overrides: Any,
) -> PruneResult:
    """Prune ``model`` in place and return a ``PruneResult``.

    Args:
        model: a transformers model of a supported family (``hf_subprune.ADAPTERS``), or where to load one from
            (a hub id, a local folder, a .gguf file or an alias of ``loading.load_model``). A folder or hub id
            with safetensors weights loads lazily: the blocks stay on disk and are read one at a time, cut, and
            kept in a temporary folder until saved (``pipeline.lazy``), so the whole model is never in memory.
        tokenizer: its tokenizer (needed unless ``input_ids`` is given; default for a loaded model: its own).
        lazy / dtype: how a ``model`` given by name loads: ``lazy=False`` loads it whole in memory; ``dtype``
            "float32", "bfloat16" or "float16" (default "auto": the checkpoint's).
        calibration: text source: ``None`` (built-in text), a local .txt/.json/.jsonl/.csv/.tsv/.parquet file, a
            list of strings, a ``datasets`` dataset, or a Hub dataset name (see ``calibration.load_texts``).
        config: a ``PruneConfig``; keyword ``overrides`` build or update one (``prune(m, tok, sparsity=0.2)``).
        input_ids: ready token blocks (num_samples x seq_len) instead of ``calibration``.
        attention_mask: with ``input_ids``, 1 for real tokens and 0 for padding (on the right): padding is masked
            in attention and left out of every statistic. From text, encoders are calibrated this way, one text per
            sample (``calibration.text_samples``); decoders on packed windows (``calibration.token_blocks``).
        base_model / license: what the report and the card say the model was pruned from.
        evaluate: measures the model before and after the cut (``Evaluator``); the report keeps both.
        text_column: the column holding text in a tabular or dataset source (default: the first of
            ``calibration.TEXT_COLUMNS`` it has).
        dataset_config / split / streaming: how to load a Hub dataset (``split`` default ``"train"``, slices such
            as ``"train[:1000]"`` work); a streamed one is read for ``64 * num_samples`` non-empty texts at most.

    A published baseline (``config.method``, see ``maths.methods.METHODS``) runs with the settings it fixes,
    whatever ``config`` says; ``PruneResult.config`` holds the settings as run and the notes say what was replaced.

    Under ``accelerate launch`` (with or without an ``Accelerator`` in the script) each process calibrates on its
    share of the samples and the statistics are summed across processes, so every process ends with the same
    pruned model.
    """
    if config is None:
        config = PruneConfig(**overrides)
    elif overrides:
        config = PruneConfig.from_dict({**config.to_dict(), **overrides})
    method = METHODS[config.method]
    asked, config = config, PruneConfig.from_dict({**config.to_dict(), **method.settings})
    if isinstance(model, (str, Path)):
        from .loading import base_license, load_model

        name = str(model)
        model, own_tokenizer, base = load_model(name, dtype=dtype, lazy=lazy,
                                                need_tokenizer=tokenizer is None and input_ids is None)
        tokenizer = own_tokenizer if tokenizer is None else tokenizer
        base_model, license = base_model or base, license or base_license(name)
    adapter = get_adapter(model.config)
    check_model(model)
    _, blocks = find_blocks(model)
    before_widths = _widths_before(adapter, blocks)
    if attention_mask is not None and input_ids is None:
        raise ValueError("attention_mask goes with input_ids: give both, or calibration text (encoders are then "
                         "padded one text per sample by themselves)")
    check_run(model.config, config, input_ids=input_ids)  # a bad device or seq_len fails before calibrating
    attention_mask = check_attention_mask(input_ids, attention_mask) if input_ids is not None else None
    rank, world = process_state(config.device)
    start = time.perf_counter()
    input_ids_given = input_ids is not None
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("prune needs a tokenizer to turn the calibration text into tokens (or input_ids)")
        texts = load_texts(calibration, text_column=text_column, dataset_config=dataset_config, split=split,
                           streaming=streaming, max_texts=config.num_samples * 64 if streaming else None)
        input_ids, attention_mask = draw_samples(texts, tokenizer, config.num_samples, config.seq_len,
                                                 seed=config.seed, causal=adapter.causal_lm)
    real_samples = len(input_ids)
    input_ids, synthetic, synthetic_notes = _add_synthetic(model, input_ids, config, adapter.causal_lm,
                                                           padded=attention_mask is not None)
    tokens = int(input_ids.numel() if attention_mask is None else attention_mask.sum())
    config, budget_notes = resolve_budget(config, tokens, adapter.causal_lm)
    correction = drift_correction_for(config.drift_correction, config.variant, adapter.causal_lm)
    # Sites kept whole are refit by default wherever the drift correction gives their target something to undo.
    whole = bool(correction) if config.refit_full_width is None else config.refit_full_width
    config = dataclasses.replace(config, drift_correction=correction, refit_full_width=whole)
    budget_notes[:0] = synthetic_notes
    if len(input_ids) < world:
        raise ValueError(f"{len(input_ids)} calibration samples cannot be shared by {world} processes: "
                         "give at least one sample per process (num_samples)")
    device = compute_device(config.device)
    # What ran, in the report and the card: "auto" resolved for this model.
    summed_in = summed_dtype(config, model)
    config = dataclasses.replace(config, stats_dtype=str(summed_in).removeprefix("torch."))
    show = progress and rank == 0
    measured = time.perf_counter()
    before = _measure(evaluate, model, device)
    start += time.perf_counter() - measured  # the time is the pruning's: no evaluation in it
    params_before = count_parameters(model)
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, shard(input_ids, rank, world), config.batch_size, device,
                                      torch.device(config.offload_device), progress=show,
                                      attention_mask=None if attention_mask is None
                                      else shard(attention_mask, rank, world))
        if method.scope == "global":  # the method decides every width itself, in its own pass
            widths, reports = MODEL_PASSES[method.name](model, adapter, inputs, config, device, show)
        else:
            widths, config = plan_widths(model, adapter, inputs, config, device, show)
            reports = prune_blocks(model, adapter, inputs, config, widths, device, show=show)
        widths[0].notes[:0] = _method_notes(method, asked) + budget_notes
    finally:
        model.train(was_training)
    if len({(w.mlp, w.heads, w.kv_heads) for w in widths}) == 1:
        update_config(model.config, adapter, widths[0])
    seconds = time.perf_counter() - start
    for note in widths[0].notes:
        logger.info(note)
    return PruneResult(
        model=model, tokenizer=tokenizer, config=config, widths=widths, widths_before=before_widths, sites=reports,
        params_before=params_before, params_after=count_parameters(model), seconds=seconds,
        calibration={"num_samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]),
                     "tokens": tokens, "fingerprint": fingerprint(input_ids, attention_mask),
                     **({"padded": "one text per sample, padded on the right"} if attention_mask is not None else {}),
                     "source": _describe_source(calibration, input_ids_given), "processes": world,
                     "real_samples": real_samples, **synthetic},
        base_model=base_model or getattr(model.config, "_name_or_path", None) or None,
        license=license,
        evaluation=_evaluation(before, _measure(evaluate, model, device)) if evaluate is not None else {},
        input_ids=input_ids.cpu(),
        attention_mask=None if attention_mask is None else attention_mask.cpu(),
    )
