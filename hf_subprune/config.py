"""PruneConfig: every setting of a pruning run, strict and serialisable (recipes are the same as YAML)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PruneConfig", "VARIANTS", "ATTENTION_MODES", "DTYPES", "BUDGETS", "TOKEN_WEIGHTS"]

VARIANTS = ("asymmetric", "sequential", "layerwise")
ATTENTION_MODES = ("query_quota", "kv_group")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BUDGETS = ("uniform", "global", "fluctuation")
TOKEN_WEIGHTS = ("residual", "none")


def _help(text: str, default: Any = None, **kw) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class PruneConfig:
    """How much to prune, how to choose, and on what data. Unknown keys and bad combinations are errors."""

    sparsity: float | None = _help(
        "Fraction of the prunable (MLP + attention) parameters to remove, split between the site types so that "
        "both are pruned by about the same fraction. Ignored for a site type given its own sparsity."
    )
    mlp_sparsity: float | None = _help("Fraction of MLP neurons to remove (overrides `sparsity` for MLPs).")
    attention_sparsity: float | None = _help(
        "Fraction of attention heads to remove (overrides `sparsity` for attention)."
    )
    method: str = _help(
        "Selection method: greedy (the submodular method); a published baseline run as its paper's code runs it, "
        "fixing its own settings whatever the others here say (flap: dense-model statistics, one global "
        "allocation over layers and site types from `sparsity`, bias compensation, no refit; wanda-sp, magnitude, "
        "random, layer-greedy-fs: uniform widths on the pruned-so-far stream, unweighted, no refit); or a hybrid "
        "that ranks each site by a baseline's score and then refits like greedy (flap-score, wanda-sp-score, "
        "magnitude-score, random-score). The report's notes say which settings a method fixed.",
        "greedy",
    )
    variant: str = _help(
        "asymmetric (inputs from the cut block, target the uncut block's output on the same block input, so the "
        "MLP's refit also corrects the error the block's attention cut left: the paper's variant on residual "
        "blocks), sequential (inputs and targets from the model pruned so far: every layer keeps its own "
        "response to the cut stream; the same as asymmetric wherever a block's attention keeps all its heads) "
        "or layerwise (both from the original model; one calibration stream). See benchmarks/results.",
        "asymmetric",
    )
    refit: bool = _help("Least-squares refit of the consumer layer on the kept channels.", True)
    bias_shift: bool = _help(
        "Fit a bias correction too (only where the consumer layer has a bias: BERT, GPT-2).", True
    )
    damping: float = _help("Ridge damping of the least-squares solves, relative to the mean gram diagonal.", 1e-2)
    shrinkage: float | None = _help(
        "Shrink the calibration inputs' correlations towards zero: a ridge of shrinkage x (each column's own mean "
        "square), towards the original weights. A dropped channel then also costs its own energy (FLAP's "
        "fluctuation score, centred), so that selection and refit do not lean on correlations between channels "
        "that another text, or a few more samples, would not reproduce. None (default): max(1, d / tokens) per "
        "site, d its input columns: 1, and more where the calibration has fewer tokens than columns. 0: off.",
    )
    damp_to_original: bool = _help(
        "Damp the refit towards the original weights rather than towards zero: with little calibration data "
        "the refit then corrects the kept columns instead of shrinking them.", True
    )
    token_weights: str = _help(
        "residual: weight each token's reconstruction error by 1 / (mean square of the residual stream + of the "
        "site's output), i.e. measure the perturbation relative to the residual stream the next normalised layer "
        "reads, so that the few massive-activation tokens (attention sinks) do not dominate the statistics. "
        "none: every token counts the same.",
        "residual",
    )
    attention_mode: str = _help(
        "Grouped-query attention: query_quota keeps the same number of query heads in every kv group; "
        "kv_group removes whole kv groups (kv head and its query heads).",
        "query_quota",
    )
    budget: str | None = _help(
        "fluctuation (the default with an overall `sparsity`): per-block widths from FLAP's allocation (one pass over the dense model: each "
        "channel's input variance times its squared weights, standardised per layer, one threshold over the "
        "whole model weighted by parameter count), then the method chooses and refits within them; attention in "
        "whole kv groups (attention_mode kv_group). uniform: the same widths in every block, so that the stock "
        "config describes the model (plain from_pretrained, any serving stack). global: per-block widths "
        "minimising the summed reconstruction error under the same parameter count, from each site's greedy "
        "error curve (slower: a full greedy per site). fluctuation and global are saved with the heterogeneous "
        "export (trust_remote_code=True). None (default): fluctuation when `sparsity` is given and the "
        "calibration has at least 64 tokens (fewer cannot tell the layers apart: their variance estimates are "
        "noise), else uniform.",
    )
    mlp_multiple: int = _help("Round MLP widths to a multiple of this (e.g. 8 or 64 for fast kernels).", 1)
    min_width_fraction: float = _help("Global budgets: no MLP keeps fewer than this fraction of its neurons.", 0.1)
    num_samples: int = _help("Number of calibration sequences.", 128)
    seq_len: int = _help("Tokens per calibration sequence.", 512)
    batch_size: int = _help("Sequences per forward pass during calibration (results do not depend on it).", 8)
    seed: int = _help("Seed of every random choice (calibration windows, random baseline).", 0)
    device: str | None = _help("Device the current block runs on (default: cuda if available, else cpu).")
    offload_device: str = _help("Where blocks and hidden states wait when not being pruned.", "cpu")
    stats_dtype: str = _help("Accumulator dtype of the statistics: float64 (exact) or float32 (less memory).", "float64")

    def __post_init__(self) -> None:
        for name in ("sparsity", "mlp_sparsity", "attention_sparsity"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}: it is the fraction removed (0.3 = 30%)")
        if self.sparsity is None and self.mlp_sparsity is None and self.attention_sparsity is None:
            raise ValueError("say how much to prune: sparsity, or mlp_sparsity and/or attention_sparsity")
        from .maths.methods import METHODS  # local import: config must load without torch-heavy modules first

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if METHODS[self.method].scope == "global" and (
                self.sparsity is None or self.mlp_sparsity is not None or self.attention_sparsity is not None):
            raise ValueError(
                f"method {self.method!r} takes one overall `sparsity` (the fraction of the MLP + attention parameters "
                "to remove) and decides itself how much each layer and site type loses, by one global ranking of "
                "heads and neurons; mlp_sparsity / attention_sparsity cannot be honoured: give sparsity alone")
        self._choice("variant", VARIANTS)
        self._choice("attention_mode", ATTENTION_MODES)
        if self.budget is None and (self.sparsity is None or self.mlp_sparsity is not None
                                    or self.attention_sparsity is not None):
            self.budget = "uniform"  # per-type sparsities: one width per site type
        if self.budget is not None:  # None: decided by prune() from the calibration size (see the help)
            self._choice("budget", BUDGETS)
        self._choice("token_weights", TOKEN_WEIGHTS)
        self._choice("stats_dtype", ("float64", "float32"))
        for name in ("num_samples", "seq_len", "batch_size", "mlp_multiple"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.budget in ("global", "fluctuation") and self.sparsity is None:
            raise ValueError("a global budget takes one overall `sparsity` (it decides the split between sites)")
        if not 0 <= self.min_width_fraction <= 1:
            raise ValueError(f"min_width_fraction must be in [0, 1], got {self.min_width_fraction}")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.shrinkage is not None and self.shrinkage < 0:
            raise ValueError(f"shrinkage must be >= 0, got {self.shrinkage}")

    def _choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")

    # --- serialisation ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PruneConfig keys: {', '.join(unknown)}. Known keys: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "PruneConfig":
        """Load a YAML or JSON recipe; ``overrides`` (e.g. from the command line) win over the file."""
        import yaml

        text = Path(path).read_text()
        data = yaml.safe_load(text) if str(path).endswith((".yaml", ".yml")) else json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe is a mapping of PruneConfig keys to values")
        data = dict(data.get("prune", data))
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    @staticmethod
    def help_text(name: str) -> str:
        return next(f.metadata["help"] for f in dataclasses.fields(PruneConfig) if f.name == name)
