"""``prune(model, ...)``: the one verb. Saving is a separate call on the result."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter
from .maths.methods import METHODS, Method
from .maths.allocation import allocate
from .pipeline.budget import Widths, site_costs, uniform_widths, widths_from_options
from .calibration import fingerprint, load_texts, shard, token_blocks
from .pipeline.capture import capture_block_inputs, find_blocks
from .config import PruneConfig
from .pipeline.runner import SiteReport, curve_pass, prune_blocks
from .pipeline.surgery import update_config

__all__ = ["prune", "PruneResult", "count_parameters"]


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

    def report(self) -> dict:
        """Everything about the run, as JSON-ready data (written as ``subprune_report.json``)."""
        import transformers

        from . import __version__
        from .adapters import auto_class_for

        return {
            "hf_subprune_version": __version__,
            "base_model": self.base_model,
            "license": self.license,
            "model_type": self.model.config.model_type,
            "config": self.config.to_dict(),
            "auto_class": auto_class_for(self.model).__name__,
            "widths_before": self.widths_before,
            "widths": [{"mlp": w.mlp, "heads": w.heads, "kv_heads": w.kv_heads} for w in self.widths],
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
            lines.append(f"{name}: {value}")
        return "\n".join(lines)

    def _width_lines(self) -> list[str]:
        if self.uniform:
            w = self.widths[0]
            return [f"kept widths in every block: mlp {w.mlp}, heads {w.heads}, kv heads {w.kv_heads}"]
        return ["kept widths per block (mlp/heads/kv heads): "
                + ", ".join(f"{i}:{w.mlp}/{w.heads}/{w.kv_heads}" for i, w in enumerate(self.widths))]

    def save(self, path: str | Path, *, overwrite: bool = False, check: bool = True) -> Path:
        """Write the model folder (see ``export.save_pruned``)."""
        from .outputs.export import save_pruned

        return save_pruned(self, Path(path), overwrite=overwrite, check=check)


def _describe_source(calibration: Any, input_ids_given: bool) -> str:
    if input_ids_given:
        return "token ids given by the caller"
    if calibration is None:
        return "builtin (pydoc_data.topics)"
    if isinstance(calibration, (str, Path)):
        return str(calibration)
    return type(calibration).__name__


def _global_widths(model, adapter, inputs, config: PruneConfig, device, progress: bool) -> list[Widths]:
    """Per-block widths from the sites' error curves on the original model (DESIGN.md s.4)."""
    _, blocks = find_blocks(model)
    options = curve_pass(model, adapter, inputs, config, device, progress)
    costs = site_costs(adapter, model.config, blocks[0])
    # Never more than the uniform widths of the same sparsity keep, so that the two compare at equal size.
    uniform = uniform_widths(adapter, model.config, blocks[0], config)
    uniform_params = sum(uniform.mlp * costs.per_neuron if o.kind == "mlp" else
                         uniform.heads * costs.per_query_head + uniform.kv_heads * costs.per_kv_head for o in options)
    total = sum(max(o.params) for o in options)
    picks = allocate(options, min(int((1 - config.sparsity) * total), uniform_params))
    widths = widths_from_options(options, picks, len(blocks), Widths(costs.mlp_width, costs.heads, costs.kv_heads))
    kept = sum(o.params[j] for o, j in zip(options, picks))
    widths[0].notes.append(f"global budget: kept widths remove {1 - kept / total:.2%} of the prunable parameters "
                           f"(asked {config.sparsity:.0%}, at most as many kept as uniform widths would), "
                           "allocated from the greedy error curves")
    if adapter.attention is None:
        widths[0].notes.append(f"sparsity applies to the MLPs only: {adapter.notes}")
    return widths


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


MIN_ALLOCATION_TOKENS = 64
"""Below this many calibration tokens the default budget is uniform: FLAP's allocation standardises per-channel
variances, whose relative error is about sqrt(2 / tokens) (18% at 64), and follows the noise. MiniLM at 50%
calibrated on 4 sentences (17-48 tokens) lost 25 points of accuracy with the allocation."""


def _resolve_budget(config: PruneConfig, tokens: int) -> PruneConfig:
    """The default budget: FLAP's allocation (fluctuation) from ``MIN_ALLOCATION_TOKENS`` calibration tokens on,
    uniform widths below."""
    budget = "fluctuation" if tokens >= MIN_ALLOCATION_TOKENS else "uniform"
    return PruneConfig.from_dict({**config.to_dict(), "budget": budget})


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def prune(
    model: nn.Module,
    tokenizer=None,
    calibration: Any = None,
    config: PruneConfig | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    progress: bool = True,
    base_model: str | None = None,
    **overrides: Any,
) -> PruneResult:
    """Prune ``model`` in place and return a ``PruneResult``.

    Args:
        model: a transformers model of a supported family (``hf_subprune.ADAPTERS``).
        tokenizer: its tokenizer (needed unless ``input_ids`` is given).
        calibration: text source: ``None`` (built-in text), a file path, a list of strings or a
            ``datasets`` dataset (see ``calibration.load_texts``).
        config: a ``PruneConfig``; keyword ``overrides`` build or update one (``prune(m, tok, sparsity=0.2)``).
        input_ids: ready token blocks (num_samples x seq_len) instead of ``calibration``.

    A published baseline (``config.method``, see ``baselines.METHODS``) runs with the settings it fixes, whatever
    ``config`` says; ``PruneResult.config`` holds the settings as run and the notes say what was replaced.

    Under ``accelerate launch`` each process calibrates on its share of the samples and the statistics are
    summed across processes, so every process ends with the same pruned model.
    """
    if config is None:
        config = PruneConfig(**overrides)
    elif overrides:
        config = PruneConfig.from_dict({**config.to_dict(), **overrides})
    method = METHODS[config.method]
    asked, config = config, PruneConfig.from_dict({**config.to_dict(), **method.settings})
    adapter = get_adapter(model.config)
    start = time.perf_counter()
    input_ids_given = input_ids is not None
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("prune needs a tokenizer to turn the calibration text into tokens (or input_ids)")
        encoder = not getattr(model.config, "is_decoder", False) and model.config.model_type in ("bert", "roberta")
        input_ids = token_blocks(load_texts(calibration), tokenizer, config.num_samples, config.seq_len,
                                 seed=config.seed, special_tokens=encoder)
    budget_note = []
    if config.budget is None:
        config = _resolve_budget(config, int(input_ids.numel()))
        if config.budget == "uniform":
            budget_note.append(f"uniform widths: {input_ids.numel()} calibration tokens are too few for the "
                               f"fluctuation budget's per-layer allocation (it needs {MIN_ALLOCATION_TOKENS})")
    rank, world = _world()
    if len(input_ids) < world:
        raise ValueError(f"{len(input_ids)} calibration samples cannot be shared by {world} processes")
    device = torch.device(config.device) if config.device else _default_device()
    params_before = count_parameters(model)
    _, blocks = find_blocks(model)
    costs = site_costs(adapter, model.config, blocks[0])
    widths_before = {"mlp": costs.mlp_width, "heads": costs.heads, "kv_heads": costs.kv_heads}
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, shard(input_ids, rank, world), config.batch_size, device,
                                      torch.device(config.offload_device), progress=progress and rank == 0)
        if method.scope == "global":  # the method decides every width itself, in its own pass
            from .pipeline.flap import MODEL_PASSES

            widths, reports = MODEL_PASSES[method.name](model, adapter, inputs, config, device, progress and rank == 0)
        else:
            if config.budget == "global":
                widths = _global_widths(model, adapter, inputs, config, device, progress and rank == 0)
            elif config.budget == "fluctuation":
                from .pipeline.flap import fluctuation_widths

                widths = fluctuation_widths(model, adapter, inputs, config, device, progress and rank == 0)
                if adapter.attention is not None and config.attention_mode != "kv_group":
                    config = PruneConfig.from_dict({**config.to_dict(), "attention_mode": "kv_group"})
                    widths[0].notes.append("fluctuation budget: attention widths are whole kv groups (FLAP's "
                                           "units), so attention is pruned with attention_mode kv_group")
            else:
                uniform = uniform_widths(adapter, model.config, blocks[0], config)
                widths = [uniform] * len(blocks)
            reports = prune_blocks(model, adapter, inputs, config, widths, device, progress=progress and rank == 0)
        widths[0].notes[:0] = _method_notes(method, asked) + budget_note
    finally:
        model.train(was_training)
    if len({(w.mlp, w.heads, w.kv_heads) for w in widths}) == 1:
        update_config(model.config, adapter, widths[0])
    return PruneResult(
        model=model, tokenizer=tokenizer, config=config, widths=widths, widths_before=widths_before, sites=reports,
        params_before=params_before, params_after=count_parameters(model), seconds=time.perf_counter() - start,
        calibration={"num_samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]),
                     "tokens": int(input_ids.numel()), "fingerprint": fingerprint(input_ids),
                     "source": _describe_source(calibration, input_ids_given),
                     "processes": world},
        base_model=base_model or getattr(model.config, "_name_or_path", None) or None,
    )
