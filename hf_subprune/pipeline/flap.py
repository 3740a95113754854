"""Published baselines that decide over the whole model at once: FLAP as its official code runs it.

FLAP (An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI 2024; official
code lib/prune.py ``prune_flap`` with metric WIFV and structure AL-AM, lib/layerwrapper.py ``BiasGPT``):

1. one pass over the *dense* model (each block reads the previous dense block's output), collecting per input
   column of every o_proj / down_proj the mean and the fluctuation (variance over the calibration tokens);
2. scores ``var_j * ||W[:, j]||^2`` (squared for attention), standardised per layer and site type;
3. one ranking of every head and neuron of the model, weighted by parameter count, cut where the kept weight is
   closest to ``1 - sparsity`` (``maths.methods.flap_allocate``);
4. each block cut to its units, the removed columns' mean contribution added to the consumer's bias, no refit.

This module holds the model-level pass (step 1 and 4 and the bookkeeping); the scores and the allocation are pure
tensor functions in ``maths/methods.py``. A second pass over the dense stream collects the full statistics of the cut
sites, for the report's reconstruction errors only: keeping every site's d x d gram from the first pass until the
allocation is known would not fit for large models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from ..adapters import Adapter
from ..config import PruneConfig
from ..distributed import reduce_sum
from ..maths.methods import compensation, flap_allocate, flap_unit_scores
from ..maths.selection import GroupLayout, SiteStatistics, reconstruction_error
from .blocks import walk_blocks
from .capture import BlockInputs, HookSet, find_blocks, run_block
from .runner import SiteReport
from .sites import Site, attention_site, mlp_site
from .statistics import summed_dtype
from .surgery import add_consumer_bias, apply_selection, lacks_consumer_bias
from .widths import SiteCosts, Widths, site_costs

__all__ = ["MODEL_PASSES", "register_model_pass", "prune_flap", "flap_units", "fluctuation_widths"]

# (model, adapter, block inputs, effective config, device, progress) -> (widths per block, one report per cut site)
ModelPass = Callable[[nn.Module, Adapter, BlockInputs, PruneConfig, torch.device, bool],
                     "tuple[list[Widths], list[SiteReport]]"]
MODEL_PASSES: dict[str, ModelPass] = {}


def register_model_pass(name: str):
    """Register the whole-model pass of the method ``name`` (a ``Method`` with ``scope="global"``)."""

    def wrap(fn: ModelPass) -> ModelPass:
        MODEL_PASSES[name] = fn
        return fn

    return wrap


MOMENT_ROWS = 256
"""Token rows that ``_Moments.update`` widens to float64 at a time."""


@dataclass
class _Moments:
    """Token count, sum and sum of squares of each input column of a consumer.

    FLAP's ``BiasGPT`` keeps a running mean and a running update of the fluctuation that only approximates the
    variance (it mixes the old and new means); here the exact variance over all calibration tokens is taken from
    the sums, in float64 so that ``E[x^2] - E[x]^2`` does not cancel, and the sums add over batches and
    processes. (Its scale, n or n - 1, does not matter: the scores are standardised per site.)
    """

    count: torch.Tensor
    total: torch.Tensor
    squares: torch.Tensor

    @classmethod
    def zeros(cls, d: int, device) -> "_Moments":
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(()), z(d), z(d))

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.count += x.shape[0]
        for lo in range(0, x.shape[0], MOMENT_ROWS):  # float64 copies of a few rows at a time, not of the batch
            rows = x[lo : lo + MOMENT_ROWS].to(device=self.total.device, dtype=torch.float64)
            self.total += rows.sum(0)
            self.squares += rows.square().sum(0)

    def tensors(self) -> list[torch.Tensor]:
        return [self.count, self.total, self.squares]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)

    @property
    def variance(self) -> torch.Tensor:
        return (self.squares / self.count.clamp_min(1) - self.mean.square()).clamp_min(0)


@dataclass
class _Units:
    """One site's units (kv groups or neurons) with what the allocation and the cut need."""

    block: int
    site: Site
    scores: torch.Tensor
    unit_params: int
    mean: torch.Tensor  # dense-model mean of each consumer input column
    kept: torch.Tensor | None = None  # mask over units, after the allocation
    heads_per_unit: int = 0  # attention: query heads in one unit (a kv group) of this block

    @property
    def cut(self) -> bool:
        return self.kept is not None and not bool(self.kept.all())


def _dense_pass(block: nn.Module, paths: list[str], inputs: BlockInputs, hidden: list[torch.Tensor], device,
                offload, on_input: Callable[[str, torch.Tensor], None]) -> list[torch.Tensor]:
    """Run ``block`` on every batch, handing each consumer's input (its real tokens' rows) to ``on_input``; return
    the block's outputs (the dense stream entering the next block). One forward per batch serves every site."""
    out = []
    batch = [0]
    with HookSet() as hooks:
        for path in paths:
            hooks.pre_hook(block.get_submodule(path),
                           lambda module, args, path=path: on_input(path, inputs.rows(batch[0], args[0])))
        for j in range(len(hidden)):
            batch[0] = j
            out.append(run_block(block, inputs, hidden, j, device).to(offload))
    return out


def _full_sites(adapter: Adapter, costs: SiteCosts, name: str) -> list[Site]:
    """The block's sites at full width. Attention units are whole kv groups (kv head and its query heads): FLAP
    scores heads of multi-head attention, and dropping query heads alone would break the even kv groups."""
    sites = [mlp_site(adapter, f"{name}.mlp", costs.mlp_width, costs.mlp_width)]
    if adapter.attention is not None:
        sites.insert(0, attention_site(adapter, costs, f"{name}.attention", costs.heads, costs.kv_heads, "kv_group"))
    return sites


@torch.no_grad()
def flap_units(model: nn.Module, adapter: Adapter, inputs: BlockInputs, cfg: PruneConfig, device,
               progress: bool = True) -> tuple[list[_Units], int, dict[int, float]]:
    """FLAP's statistics pass over the dense model and its global allocation (steps 1 to 3 of the module
    docstring): every site's units with the kept mask set. Returns ``(units, floored sites, seconds per block)``."""
    offload = torch.device(cfg.offload_device)
    units: list[_Units] = []
    seconds: dict[int, float] = {}
    for step in walk_blocks(model, inputs, device, offload, desc="FLAP statistics (dense model)", show=progress):
        start, i, block = time.perf_counter(), step.index, step.block
        costs = site_costs(adapter, block)  # before any bias is added: the model's own parameters
        sites = _full_sites(adapter, costs, step.name)
        weights = {s.consumer: adapter.weight(block.get_submodule(s.consumer)).detach() for s in sites}
        moments = {path: _Moments.zeros(w.shape[1], device) for path, w in weights.items()}
        step.outputs = _dense_pass(block, list(moments), inputs, step.hidden, device, offload,
                                   lambda path, t: moments[path].update(t))
        for s in sites:
            acc = moments[s.consumer]
            reduce_sum(acc.tensors())
            attention = s.kind == "attention"
            per_kv = costs.heads // max(costs.kv_heads, 1)
            params = per_kv * costs.per_query_head + costs.per_kv_head if attention else costs.per_neuron
            scores = flap_unit_scores(acc.variance, weights[s.consumer], GroupLayout(s.groups), squared=attention)
            units.append(_Units(i, s, scores.cpu(), params, acc.mean.cpu(), heads_per_unit=per_kv if attention else 0))
        seconds[i] = time.perf_counter() - start

    # FLAP's order: every attention site, then every MLP site (it only decides ties).
    ordered = sorted(units, key=lambda u: (u.site.kind != "attention", u.block))
    per_neuron = next(u.unit_params for u in units if u.site.kind == "mlp")
    allocation = flap_allocate([u.scores for u in ordered], [u.unit_params / per_neuron for u in ordered],
                               cfg.sparsity)
    for u, kept in zip(ordered, allocation.kept):
        u.kept = kept
    return units, allocation.floored, seconds


def _widths(units: list[_Units], num_blocks: int) -> list[Widths]:
    widths = []
    for i in range(num_blocks):
        att = next((u for u in units if u.block == i and u.site.kind == "attention"), None)
        mlp = next(u for u in units if u.block == i and u.site.kind == "mlp")
        groups = int(att.kept.sum()) if att is not None else 0
        per_kv = att.heads_per_unit if att is not None else 0
        widths.append(Widths(int(mlp.kept.sum()), groups * per_kv, groups))
    return widths


def fluctuation_widths(model: nn.Module, adapter: Adapter, inputs: BlockInputs, cfg: PruneConfig, device,
                       progress: bool = True) -> list[Widths]:
    """Per-block widths from FLAP's allocation (dense-model fluctuation scores, standardised per layer, one
    global threshold weighted by parameter count), for ``budget="fluctuation"``: the greedy then chooses and
    refits within them. Attention widths are whole kv groups (``attention_mode="kv_group"``)."""
    units, floored, _ = flap_units(model, adapter, inputs, cfg, device, progress)
    _, blocks = find_blocks(model)
    widths = _widths(units, len(blocks))
    kept = _kept_note(units, cfg.sparsity).removeprefix("flap: ")
    widths[0].notes.append(f"fluctuation budget (FLAP's allocation on the dense model): {kept}"
                           + (f"; {floored} site(s) keep one unit rather than none" if floored else ""))
    return widths


@register_model_pass("flap")
@torch.no_grad()
def prune_flap(model: nn.Module, adapter: Adapter, inputs: BlockInputs, cfg: PruneConfig, device,
               progress: bool = True) -> tuple[list[Widths], list[SiteReport]]:
    """Prune ``model`` in place as FLAP does (module docstring) to remove ``cfg.sparsity`` of its prunable
    parameters; returns the kept widths per block (different per block in general: the heterogeneous export
    saves them) and one report per cut site.

    Grouped-query attention (FLAP has none): a unit is a kv group, scored by the mean of its standardised o_proj
    columns and weighing its q, k, v and o parameters; in multi-head models that is one head, as in FLAP. Every
    site keeps at least one unit. Llama-family consumers get the bias the compensation needs through the config
    flag the adapter declares (``surgery.add_consumer_bias``); a family without one is pruned without the
    compensation, and the notes say so.
    """
    _, blocks = find_blocks(model)
    config = model.config
    units, floored, seconds = flap_units(model, adapter, inputs, cfg, device, progress)
    notes = [_kept_note(units, cfg.sparsity), f"flap: {floored} site(s) would have lost every unit and keep "
             "their best one (FLAP can empty a layer; the export cannot express zero heads or neurons)"]
    if cfg.mlp_multiple != 1:
        notes.append(f"flap: mlp_multiple={cfg.mlp_multiple} not applied (FLAP keeps the neurons above its threshold)")
    compensate, biased = {}, []
    for kind in sorted({u.site.kind for u in units if u.cut}):
        spec, lacks = adapter.spec(kind), lacks_consumer_bias(blocks, adapter, kind)
        compensate[kind] = not lacks or spec.bias_field is not None
        if not compensate[kind]:
            notes.append(f"flap: model_type {config.model_type!r} has no config flag for a {spec.consumer} bias: "
                         f"{kind} sites pruned without FLAP's bias compensation")
        elif lacks:
            setattr(config, spec.bias_field, True)
            biased.append(kind)

    reports, added = _cut(model, adapter, inputs, cfg, units, compensate, biased, seconds, device, progress)
    for kind, (consumer, others) in added.items():
        spec = adapter.spec(kind)
        notes.append(f"flap: {spec.consumer} has no bias in {config.model_type!r}: set {spec.bias_field}=True, adding "
                     f"{consumer:,} bias parameters that carry the compensation and {others:,} zero biases on the "
                     "other projections the flag covers")
    widths = _widths(units, len(blocks))
    widths[0].notes.extend(notes)
    return widths, reports


def _kept_note(units: list[_Units], sparsity: float) -> str:
    total = sum(len(u.scores) * u.unit_params for u in units)
    kept = sum(int(u.kept.sum()) * u.unit_params for u in units)
    return (f"flap: kept units remove {1 - kept / total:.2%} of the prunable parameters (asked {sparsity:.0%}), "
            "allocated across layers and site types by one global threshold")


def _cut(model: nn.Module, adapter: Adapter, inputs: BlockInputs, cfg: PruneConfig, units: list[_Units],
         compensate: dict[str, bool], biased: list[str], seconds: dict[int, float], device, progress: bool
         ) -> tuple[list[SiteReport], dict[str, tuple[int, int]]]:
    """Second pass over the dense stream: the cut sites' full statistics (for the report's errors), then the cut
    of each block once the dense stream has moved past it. Every block first gets the zero biases of the
    ``biased`` site kinds (whose config flag is set), here, where the block is in memory; returns the reports and
    the bias parameters added per kind (to the consumers, to the other modules the flag covers)."""
    offload = torch.device(cfg.offload_device)
    dtype = summed_dtype(cfg, model)
    last = max((u.block for u in units if u.cut), default=-1)
    reports: list[SiteReport] = []
    added = {kind: (0, 0) for kind in biased}
    stop = None if biased else last + 1
    for step in walk_blocks(model, inputs, device, offload, desc="FLAP cut", show=progress, stop=stop, modifies=True):
        start, i, block = time.perf_counter(), step.index, step.block
        for kind in biased:
            consumer, others = add_consumer_bias(block, adapter, kind)
            added[kind] = (added[kind][0] + consumer, added[kind][1] + others)
        if i > last:  # nothing to cut: the block only took its biases, and no later block needs the stream
            step.outputs = step.hidden
            continue
        cut = [u for u in units if u.block == i and u.cut]
        weights = {u.site.consumer: adapter.weight(block.get_submodule(u.site.consumer)).detach() for u in cut}
        stats = {path: SiteStatistics.zeros(w.shape[1], 0, device=device, dtype=dtype) for path, w in weights.items()}
        step.outputs = _dense_pass(block, list(stats), inputs, step.hidden, device, offload,
                                   lambda path, t: stats[path].update(t, t[..., :0]))
        statistics_seconds = seconds[i] + time.perf_counter() - start
        for u in cut:
            t0 = time.perf_counter()
            weight = weights[u.site.consumer]
            acc = stats[u.site.consumer]
            reduce_sum(acc.tensors())
            full = SiteStatistics.from_inputs_only(acc, weight)
            kept = u.kept.nonzero().flatten().tolist()
            columns = GroupLayout(u.site.groups).kept_columns(kept)
            kept_weight = weight[:, columns.to(weight.device)]
            shift = compensation(weight, u.mean.to(weight.device), columns) if compensate[u.site.kind] else None
            error = reconstruction_error(full, columns, kept_weight, shift)
            untouched = reconstruction_error(full, columns, kept_weight)
            apply_selection(block, adapter, replace(u.site, keep=len(kept)), kept, kept_weight, shift)
            reports.append(SiteReport(
                name=u.site.name, kind=u.site.kind, block=i, groups_before=u.site.num_groups, groups_kept=len(kept),
                kept=kept, error=error, error_original_columns=untouched, target_sq=float(full.target_sq),
                tokens=int(full.tokens), diagnostics={"bias_compensation": compensate[u.site.kind]},
                seconds_statistics=statistics_seconds, seconds_selection=time.perf_counter() - t0,
            ))
    return reports, added
