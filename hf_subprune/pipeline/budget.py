"""The budget: how many units each block keeps, decided before the cut (``PruneConfig.budget``).

- ``uniform``: the same widths everywhere, on counts the stock config can express (``widths.uniform_widths``);
- ``fluctuation``: FLAP's allocation over layers and site types from one pass over the dense model (``flap.py``);
- ``global``: the widths minimising the summed reconstruction error for the parameter count, from every site's
  greedy error curve on the original model (the curve pass below, ``maths.allocation.allocate``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..adapters import Adapter
from ..config import GLOBAL_FROM_SPARSITY, MIN_ALLOCATION_TOKENS, PruneConfig
from ..maths.allocation import SiteOptions, allocate, mlp_options
from ..maths.selection import greedy_select
from .blocks import walk_blocks
from .capture import BlockInputs, find_blocks
from .flap import fluctuation_widths
from .runner import shrinkage_for
from .sites import attention_site, mlp_site
from .statistics import collect_statistics, summed_dtype
from .variants import VARIANTS
from .widths import Widths, head_options, site_costs, uniform_widths, widths_from_options

__all__ = ["MIN_ALLOCATION_TOKENS", "GLOBAL_FROM_SPARSITY", "resolve_budget", "plan_widths", "curve_pass"]


def resolve_budget(config: PruneConfig, tokens: int, causal_lm: bool = True) -> tuple[PruneConfig, list[str]]:
    """The config with its budget decided, and a note when the default chose other than fluctuation: for causal LMs
    fluctuation from ``MIN_ALLOCATION_TOKENS`` calibration tokens on, global from ``GLOBAL_FROM_SPARSITY`` on;
    uniform below those tokens, and for encoders.

    Encoders: FLAP's allocation was made and measured for decoders' perplexity; on the MiniLM SST-2 classifier
    it halved the last blocks' MLPs and cost accuracy and embedding similarity that uniform widths kept
    (``benchmarks/results/minilm_exp.md``)."""
    if config.budget is not None:
        return config, []
    if not causal_lm:
        return dataclasses.replace(config, budget="uniform"), [
            "uniform widths: the default for encoders (FLAP's per-layer allocation, the decoders' default, cost "
            "a classifier accuracy); budget='fluctuation' or 'global' asks for per-layer widths"]
    if tokens >= MIN_ALLOCATION_TOKENS:
        if config.sparsity is not None and config.sparsity >= GLOBAL_FROM_SPARSITY:
            return dataclasses.replace(config, budget="global"), [
                f"global budget: the default from an overall sparsity of {GLOBAL_FROM_SPARSITY:.0%} on (the "
                "fluctuation budget's allocation cuts the first and last blocks too deep there)"]
        return dataclasses.replace(config, budget="fluctuation"), []
    return dataclasses.replace(config, budget="uniform"), [
        f"uniform widths: {tokens} calibration tokens are too few for the default per-layer budget's allocation "
        f"(it needs {MIN_ALLOCATION_TOKENS})"]


@torch.no_grad()
def curve_pass(model: nn.Module, adapter: Adapter, inputs: BlockInputs, cfg: PruneConfig, device,
               show: bool = True) -> list[SiteOptions]:
    """One pass through the original model (layerwise statistics) giving each site's error at every width it may
    take: the full greedy curve of every MLP, and one quota-constrained greedy per valid head count of every
    attention site."""
    dtype = summed_dtype(cfg, model)
    layerwise = VARIANTS["layerwise"]
    options: list[SiteOptions] = []
    for step in walk_blocks(model, inputs, device, cfg.offload_device, desc="error curves", show=show):
        block = step.block
        costs = site_costs(adapter, block)
        sites = [mlp_site(adapter, f"{step.name}.mlp", costs.mlp_width, costs.mlp_width)]
        if adapter.attention is not None:
            sites.insert(0, attention_site(adapter, costs, f"{step.name}.attention", costs.heads, costs.kv_heads,
                                           cfg.attention_mode))
        for site in sites:
            stats = collect_statistics(site, adapter, block, block, inputs, step.hidden, layerwise, device, dtype,
                                       cfg.token_weights)
            weight = adapter.weight(block.get_submodule(site.consumer)).detach().to(stats.gram)
            solve = {"damping": cfg.damping, "shrinkage": shrinkage_for(cfg, stats), "bias_shift": False,
                     "prior": weight if cfg.damp_to_original else None, "site": site.name}
            # Weighted errors are already relative (to the residual stream, token by token): compare sites by
            # their mean over tokens. Unweighted ones are made relative to the site's own output.
            per_token = float(stats.tokens) if cfg.token_weights == "residual" else None
            if site.kind == "mlp":
                sel = greedy_select(stats, costs.mlp_width, **solve)
                floor = max(cfg.mlp_multiple, int(cfg.min_width_fraction * costs.mlp_width))
                widths, params, errors = mlp_options(sel.curve.tolist(), per_token or sel.target_sq, costs.mlp_width,
                                                     costs.per_neuron, cfg.mlp_multiple, floor)
            else:
                widths, params, errors = [], [], []
                for heads, kv_heads in head_options(adapter, model.config, costs, cfg.attention_mode):
                    error = 0.0
                    if heads < costs.heads:
                        att = attention_site(adapter, costs, site.name, heads, kv_heads, cfg.attention_mode)
                        sel = greedy_select(stats, att.keep, groups=att.groups, partition=att.partition,
                                            per_class=att.per_class, **solve)
                        error = float(sel.curve[-1]) / max(per_token or sel.target_sq, 1e-30)
                    widths.append((heads, kv_heads))
                    params.append(heads * costs.per_query_head + kv_heads * costs.per_kv_head)
                    errors.append(error)
            options.append(SiteOptions(step.index, site.kind, tuple(widths), tuple(params), tuple(errors)))
    return options


def _error_curve_widths(model: nn.Module, adapter: Adapter, inputs: BlockInputs, cfg: PruneConfig, device,
                        show: bool) -> list[Widths]:
    _, blocks = find_blocks(model)
    options = curve_pass(model, adapter, inputs, cfg, device, show)
    costs = [site_costs(adapter, block) for block in blocks]
    # Never more than the uniform widths of the same sparsity keep, so that the two compare at equal size.
    uniform = _uniform(model, adapter, blocks, cfg)
    uniform_params = sum(uniform[o.block].mlp * costs[o.block].per_neuron if o.kind == "mlp" else
                         uniform[o.block].heads * costs[o.block].per_query_head
                         + uniform[o.block].kv_heads * costs[o.block].per_kv_head for o in options)
    total = sum(max(o.params) for o in options)
    picks = allocate(options, min(int((1 - cfg.sparsity) * total), uniform_params))
    widths = widths_from_options(options, picks, [c.widths for c in costs])
    kept = sum(o.params[j] for o, j in zip(options, picks))
    widths[0].notes.append(f"global budget: kept widths remove {1 - kept / total:.2%} of the prunable parameters "
                           f"(asked {cfg.sparsity:.0%}, at most as many kept as uniform widths would), "
                           "allocated from the greedy error curves")
    if adapter.attention is None:
        widths[0].notes.append(f"sparsity applies to the MLPs only: {adapter.notes}")
    return widths


def _uniform(model: nn.Module, adapter: Adapter, blocks: nn.ModuleList, cfg: PruneConfig) -> list[Widths]:
    """The uniform budget's widths: each block cut by the same fractions of what it has (one set of widths where
    the blocks are alike; a model pruned before with per-layer widths keeps its shape). The notes are the first
    block's."""
    costs = [site_costs(adapter, block) for block in blocks]
    widths = [uniform_widths(adapter, model.config, blocks[0], cfg)]
    widths += [dataclasses.replace(widths[0] if c == costs[0] else uniform_widths(adapter, model.config, block, cfg),
                                   notes=[]) for c, block in zip(costs[1:], blocks[1:])]
    if any(c != costs[0] for c in costs):
        widths[0].notes.append("uniform budget on blocks of different widths (pruned before with per-layer widths): "
                               "each block cut by the same fractions of its own widths; the note above is layer 0's")
    return widths


def plan_widths(model: nn.Module, adapter: Adapter, inputs: BlockInputs, cfg: PruneConfig, device,
                show: bool = True) -> tuple[list[Widths], PruneConfig]:
    """The widths every block keeps under ``cfg.budget`` (decided: see ``resolve_budget``), and the config the
    cut runs with (the fluctuation budget's attention widths are whole kv groups)."""
    _, blocks = find_blocks(model)
    if cfg.budget == "global":
        return _error_curve_widths(model, adapter, inputs, cfg, device, show), cfg
    if cfg.budget == "fluctuation":
        widths = fluctuation_widths(model, adapter, inputs, cfg, device, show)
        if adapter.attention is not None and cfg.attention_mode != "kv_group":
            cfg = dataclasses.replace(cfg, attention_mode="kv_group")
            widths[0].notes.append("fluctuation budget: attention widths are whole kv groups (FLAP's units), so "
                                   "attention is pruned with attention_mode kv_group")
        return widths, cfg
    return _uniform(model, adapter, blocks, cfg), cfg
