"""PruneConfig: every setting of a pruning run, strict and serialisable (recipes are the same as YAML)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import CONFIG_FILE, REPORT_FILE

__all__ = ["PruneConfig", "CONFIG_FILE", "VARIANTS", "ATTENTION_MODES", "BUDGETS", "TOKEN_WEIGHTS",
           "SELECTION_ERRORS"]

VARIANTS = ("asymmetric", "sequential", "layerwise")  # pipeline.variants.VARIANTS names them (a test checks)
ATTENTION_MODES = ("query_quota", "kv_group")
BUDGETS = ("uniform", "global", "fluctuation")
TOKEN_WEIGHTS = ("residual", "none")
SELECTION_ERRORS = ("auto", "refit", "original")


_BASE_TYPES: dict[str, tuple[type, str]] = {
    "bool": (bool, "true or false"),
    "int": (int, "a whole number"),
    "float": (float, "a number"),
    "str": (str, "a string"),
}
"""The field annotations PruneConfig uses (strings under ``from __future__ import annotations``), mapped by hand
so that a recipe's ``refit: "no"`` or ``num_samples: 8.7`` is refused instead of silently meaning something else."""


def _parse_annotation(annotation: str) -> tuple[str, bool]:
    """``("float", True)`` for ``"float | None"``: the base type's name and whether None is allowed."""
    parts = [p.strip() for p in str(annotation).split("|")]
    optional = "None" in parts
    bases = [p for p in parts if p != "None"]
    if len(bases) != 1 or bases[0] not in _BASE_TYPES:
        raise TypeError(f"PruneConfig: no type check for the annotation {annotation!r}; add it to _BASE_TYPES")
    return bases[0], optional


def _type_ok(value: Any, base: str) -> bool:
    """bool fields take bools only; int fields ints but not bools; float fields ints or floats but not bools."""
    if base == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if base == "int":
        return isinstance(value, int)
    if base == "float":
        return isinstance(value, (int, float))
    return isinstance(value, str)


def _recipe_loader() -> type:
    """PyYAML's safe loader, reading ``1e-2`` as a number as YAML 1.2 does (YAML 1.1 wants ``1.0e-2``), so that
    ``damping: 1e-2`` is not refused as a string."""
    import re

    import yaml

    class RecipeLoader(yaml.SafeLoader):
        pass

    RecipeLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return RecipeLoader


# The default budget's thresholds (pipeline/budget.py applies them): here, where the help text can name them.
MIN_ALLOCATION_TOKENS = 64
"""Below this many calibration tokens the default budget is uniform: FLAP's allocation standardises per-channel
variances, whose relative error is about sqrt(2 / tokens) (18% at 64), and follows the noise. MiniLM at 50%
calibrated on 4 sentences (17-48 tokens) lost 25 points of accuracy with the allocation."""

GLOBAL_FROM_SPARSITY = 0.3
"""From this overall sparsity on, a causal LM's default budget is global rather than fluctuation. FLAP's allocation
reads each channel's own energy and cannot see what a deep cut costs the blocks after it: at 50% it cut SmolLM2's
first MLP to a fifth and its last to a tenth. SmolLM2 calibrated on 8 x 512 WikiText-2 tokens (seed 0), global
against fluctuation, perplexity on WikiText-2 / pydoc / Python source / SST-2: 0.92x / 0.86x / 0.84x / 0.88x at
30%, 0.81x / 0.66x / 0.68x / 0.76x at 35%; at 25% 0.99x / 1.05x / 1.06x / 0.97x, a tie; at 20% (n = 4, 8 and 32)
1.01-1.07x on WikiText-2 and SST-2 and 1.13-1.33x on pydoc and Python source; at 50% (n = 4, seeds 0-2) 0.51-0.60x
on WikiText-2 and 0.11-0.60x on the others (``benchmarks/results/budget_threshold_smollm2.md``,
``data_efficiency_smollm2_65k.md``)."""


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
        "blocks; moved towards the dense model's stream by drift_correction), sequential (inputs and targets from "
        "the model pruned so far: every layer keeps its own response to the cut stream; the same as asymmetric "
        "without drift correction wherever a block's attention keeps all its heads) "
        "or layerwise (both from the original model; one calibration stream).",
        "asymmetric",
    )
    drift_correction: float | None = _help(
        "asymmetric variant: the fraction of the residual stream's drift from the dense model's (what the earlier "
        "blocks' cuts changed in the stream entering this block) that each site's target asks the refit to undo. "
        "0: the target is the uncut block's output on the cut stream (the paper's asymmetric target); 1: the "
        "dense model's stream after the site. None (default): 0.5 for causal LMs (on SmolLM2 better than 0 in the "
        "calibration's domain and on other text, and than 1, which fits the calibration's own errors; "
        "benchmarks/results/ood_diagnosis.md), 0 for encoders (minilm_drift.md: within the seed spread) and the "
        "other variants.",
    )
    refit: bool = _help("Least-squares refit of the consumer layer on the kept channels.", True)
    refit_full_width: bool | None = _help(
        "Refit the consumer of the sites that keep all their channels too (under a per-layer budget most attention "
        "sites and some MLPs): their target also differs from what the layer computes (the drift correction, an "
        "earlier cut in the same block), and the refit undoes part of that there as well. Costs one more statistics "
        "pass per such site (SmolLM2 at 20%: +25-35% prune time). None (default): on wherever the drift correction is "
        "(causal LMs; on SmolLM2 at 20%, n = 4-8, 0.5-1.9% lower WikiText-2 perplexity, SST-2 lower too, pydoc and "
        "Python source within 0.9% either way: benchmarks/results/ood_diagnosis.md).",
    )
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
    selection_error: str = _help(
        "What the greedy selection minimises. refit: the error left after refitting the kept channels (the "
        "paper's gains). original: the error of the kept channels with their original weights (LayerGreedyFS's "
        "criterion), the refit coming after the choice. auto (default): original where a site saw fewer "
        "calibration tokens than a quarter of its input columns, refit elsewhere. With so few tokens the "
        "refit-aware gains credit compensations that the tokens cannot pin down, and the choice overfits "
        "them; the refit itself stays damped towards the original weights.",
        "auto",
    )
    attention_mode: str = _help(
        "Grouped-query attention: query_quota keeps the same number of query heads in every kv group; "
        "kv_group removes whole kv groups (kv head and its query heads).",
        "query_quota",
    )
    budget: str | None = _help(
        f"fluctuation (the default for causal LMs with an overall `sparsity` below {GLOBAL_FROM_SPARSITY:.0%}): "
        "per-block widths from FLAP's allocation (one pass over the dense model: each channel's input variance "
        "times its squared weights, standardised per layer, one threshold over the whole model weighted by "
        "parameter count), then the method chooses and refits within them; attention in whole kv groups "
        "(attention_mode kv_group). uniform: the same widths in every block, so that the stock config describes "
        "the model (plain from_pretrained, any serving stack). global: per-block widths minimising the summed "
        "reconstruction error under the same parameter count, from each site's greedy error curve (slower: a full "
        "greedy per site). fluctuation and global are saved with the heterogeneous export (trust_remote_code=True). "
        "None (default): for a causal LM with `sparsity` given and "
        f"at least {MIN_ALLOCATION_TOKENS} calibration tokens (fewer cannot tell the layers apart: their variance "
        f"estimates are noise), fluctuation below {GLOBAL_FROM_SPARSITY:.0%} and global from "
        f"{GLOBAL_FROM_SPARSITY:.0%} on (measured on SmolLM2: fluctuation better at 20%, a tie at 25%, "
        "global better from 30% and far better at 50%); else uniform; uniform for encoders (measured better for a "
        "classifier).",
    )
    mlp_multiple: int = _help("Round MLP widths to a multiple of this (e.g. 8 or 64 for fast kernels).", 1)
    min_width_fraction: float = _help("Global budgets: no MLP keeps fewer than this fraction of its neurons.", 0.1)
    num_samples: int = _help("Number of calibration sequences.", 128)
    synthetic_samples: int | None = _help(
        "Sequences the dense model writes itself (continuing prompts of an eighth of a sequence taken from the "
        "calibration, nucleus sampling), added to the calibration: with a few samples the statistics then also "
        "see more text near the calibration's and from the model's own distribution, and the cut holds better in "
        "the calibration's domain and out of it. None (default): 8 of them for a calibration of fewer than 8192 "
        "tokens, for a causal LM held in memory (none for a lazily loaded model or an encoder). 0: off.",
    )
    seq_len: int = _help("Tokens per calibration sequence.", 512)
    batch_size: int = _help("Sequences per forward pass during calibration (results do not depend on it).", 8)
    seed: int = _help("Seed of every random choice (calibration windows, random baseline).", 0)
    device: str | None = _help("Device the current block runs on (default: cuda if available, else cpu).")
    offload_device: str = _help("Where blocks and hidden states wait when not being pruned.", "cpu")
    stats_dtype: str = _help(
        "Accumulator dtype of the statistics and their refit (the products are float32 unless the model is "
        "float64): float64, float32 (half the memory) or auto (default: float32; float64 for a float64 model or "
        "with shrinkage 0).", "auto")

    def __post_init__(self) -> None:
        self._check_types()
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
        self._choice("selection_error", SELECTION_ERRORS)
        self._choice("stats_dtype", ("auto", "float64", "float32"))
        for name in ("num_samples", "seq_len", "batch_size", "mlp_multiple"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}: give 1 or more")
        if self.budget in ("global", "fluctuation") and self.sparsity is None:
            raise ValueError("a global budget takes one overall `sparsity` (it decides the split between sites)")
        if not 0 <= self.min_width_fraction <= 1:
            raise ValueError(f"min_width_fraction must be in [0, 1], got {self.min_width_fraction}")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.synthetic_samples is not None and self.synthetic_samples < 0:
            raise ValueError(f"synthetic_samples must be >= 0, got {self.synthetic_samples}: 0 turns it off")
        if self.drift_correction is not None:
            if not 0 <= self.drift_correction <= 1:
                raise ValueError(f"drift_correction must be in [0, 1], got {self.drift_correction}")
            # Only asymmetric has the uncut-block target (pipeline.variants; config may not import the pipeline).
            if self.drift_correction and self.variant != "asymmetric":
                raise ValueError(
                    f"drift_correction moves the uncut-block target of the asymmetric variant; the {self.variant} "
                    "variant has none to move: leave drift_correction unset (or 0), or use variant='asymmetric'")
        if self.shrinkage is not None and self.shrinkage < 0:
            raise ValueError(f"shrinkage must be >= 0, got {self.shrinkage}")

    def _check_types(self) -> None:
        """Refuse values of the wrong type up front: the checks below (and the pruning) assume the annotated types."""
        for f in dataclasses.fields(self):
            base, optional = _parse_annotation(f.type)
            value = getattr(self, f.name)
            if (value is None and optional) or (value is not None and _type_ok(value, base)):
                continue
            expected = _BASE_TYPES[base][1] + (" or null" if optional else "")
            hint = ""
            if isinstance(value, str) and base != "str":
                hint = " (write it without quotes)" if base != "bool" else " (write true or false, without quotes)"
            raise ValueError(f"{f.name} must be {expected}, got {value!r} ({type(value).__name__}){hint}")

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

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist: check the --recipe path" if not path.exists()
                                    else f"recipe {path} is not a file; give a .yaml, .yml or .json recipe file")
        try:
            text = path.read_text()
            data = yaml.load(text, Loader=_recipe_loader()) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except UnicodeDecodeError as e:
            raise ValueError(f"recipe {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"recipe {path} is not valid YAML{where}: {problem}; fix that line") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"recipe {path} is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
                             "fix that line (or name the file .yaml to write YAML)") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe is a mapping of PruneConfig keys to values")
        data = data.get("prune", data)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: `prune:` must hold a mapping of PruneConfig keys to values")
        data = dict(data)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    @staticmethod
    def help_text(name: str) -> str:
        return next(f.metadata["help"] for f in dataclasses.fields(PruneConfig) if f.name == name)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the settings as ``subprune_config.json`` in ``folder``, next to a model as its config.json is,
        so that the run can be repeated or inspected from the folder alone. Returns the file's path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, folder_or_file: str | Path) -> "PruneConfig":
        """The settings of ``subprune_config.json``: given its folder (a pruned model folder included) or the
        file itself (or any recipe file). A folder without it that holds ``subprune_report.json`` gives the
        report's ``config``, so that older pruned folders load too. Unknown keys are refused as in ``from_dict``."""
        path = Path(folder_or_file)
        if path.is_dir():
            if (path / CONFIG_FILE).is_file():
                path = path / CONFIG_FILE
            elif (path / REPORT_FILE).is_file():
                path = path / REPORT_FILE
            else:
                raise FileNotFoundError(
                    f"{path} has neither {CONFIG_FILE} nor {REPORT_FILE}: it was not written by hf_subprune")
        elif not path.is_file():
            raise FileNotFoundError(f"{path}: no such folder or file")
        if path.name != REPORT_FILE:
            return cls.from_file(path)  # subprune_config.json, or any JSON/YAML recipe
        try:
            config = json.loads(path.read_text()).get("config")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{path} is not a report written by hf_subprune: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"{path} has no \"config\" mapping of PruneConfig keys")
        return cls.from_dict(config)
