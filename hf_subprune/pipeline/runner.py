"""The block-by-block runner: statistics per site, selection, the cut, then the stream moves on.

Only the current block sits on the compute device. One hidden-state stream (a list of batches) enters each
block: the pruned-so-far model's (sequential, asymmetric) or the original model's (layerwise). The asymmetric
variant also keeps an uncut copy of the current block, whose output on that same stream is its target.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter
from ..maths.methods import select
from ..maths.allocation import SiteOptions, mlp_options
from .budget import Widths, head_options, site_costs
from .capture import BlockInputs, HookSet, find_blocks, run_block
from ..config import PruneConfig
from ..maths.selection import SiteStatistics, auto_shrinkage, greedy_select, reconstruction_error
from .sites import Site, attention_site, block_sites, mlp_site
from .surgery import apply_selection

__all__ = ["SiteReport", "prune_blocks", "curve_pass", "site_inputs", "all_reduce_sum"]


@dataclass
class SiteReport:
    """What happened at one site (everything the report and the card show)."""

    name: str
    kind: str
    block: int
    groups_before: int
    groups_kept: int
    kept: list[int]
    error: float
    error_original_columns: float
    target_sq: float
    tokens: int
    curve: list[float] = field(default_factory=list)
    diagnostics: dict = field(default_factory=dict)
    seconds_statistics: float = 0.0
    seconds_selection: float = 0.0

    @property
    def relative_error(self) -> float:
        return self.error / max(self.target_sq, 1e-30)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["relative_error"] = self.relative_error
        return out


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum tensors over processes in place (nothing to do in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _all_reduce(stats: SiteStatistics) -> None:
    """Sum the statistics over processes (one reduction per site)."""
    all_reduce_sum(stats.tensors())


def _consumer_inputs(block: nn.Module, path: str, inputs: BlockInputs, hidden: list[torch.Tensor], index: int, device):
    box: list[torch.Tensor] = []
    run_block(block, inputs, hidden, index, device, stop_at=block.get_submodule(path), on_input=box.append)
    return box[0].reshape(-1, box[0].shape[-1])


def site_inputs(block: nn.Module, site: Site, inputs: BlockInputs, hidden: list[torch.Tensor], index: int, device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The consumer's input and the residual stream the site's output is added to (both tokens x features),
    from one partial forward of ``block`` on batch ``index``."""
    seen: list[torch.Tensor] = []
    with HookSet() as hooks:
        if site.residual is not None:
            hooks.pre_hook(block.get_submodule(site.residual), lambda module, args: seen.append(args[0]))
        x = _consumer_inputs(block, site.consumer, inputs, hidden, index, device)
    residual = seen[0] if seen else hidden[index].to(device)
    return x, residual.reshape(-1, residual.shape[-1])


def residual_weights(stream: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Token weights ``1 / (ms(h_t) + ms(y_t))``: ``h_t`` the residual stream entering the block, ``y_t`` the
    site's output, ms the mean square over features. The weighted error is then the perturbation relative to
    the residual stream the site writes into, which is what the next (normalised) layer sees, and the few
    tokens that carry massive activations (attention sinks, 100x the usual norm) stop dominating the sums."""
    h = stream.reshape(-1, stream.shape[-1]).to(device=outputs.device, dtype=torch.float32)
    ms = h.square().mean(-1) + outputs.float().square().mean(-1)
    return 1.0 / ms.clamp_min(1e-6)


@torch.no_grad()
def collect_statistics(site: Site, adapter: Adapter, block: nn.Module, original: nn.Module, inputs: BlockInputs,
                       hidden: list[torch.Tensor], variant: str, device, dtype: torch.dtype,
                       token_weights: str = "none") -> SiteStatistics:
    """Sum the site's statistics over this process's batches of ``hidden`` (the stream entering the block),
    then over processes. ``block`` is the block as cut so far, ``original`` an uncut copy of it."""
    weight = adapter.weight(original.get_submodule(site.consumer)).to(device=device, dtype=torch.float32)
    d = weight.shape[1]
    weighted = token_weights == "residual"
    if variant == "asymmetric":
        # Input from the cut block, target from the uncut one, both on the same block input: the target is the
        # uncut block's residual stream after the site less the cut block's stream before it, i.e. the site's
        # original output plus what the block's earlier cuts changed in the stream. The refit (of the MLP) then
        # corrects the attention's pruning error rather than passing it on. Matching the original *model's*
        # stream instead (the drift from every earlier block) fits calibration noise that compounds from
        # block to block (README, "The method").
        stats = SiteStatistics.zeros(d, weight.shape[0], device=device, dtype=dtype)
        for i in range(len(inputs.hidden)):
            a, r_orig = site_inputs(original, site, inputs, hidden, i, device)
            b, r_pruned = site_inputs(block, site, inputs, hidden, i, device)
            y = a.float() @ weight.T + (r_orig.float() - r_pruned.float())
            stats.update(b, y, weights=residual_weights(hidden[i], y) if weighted else None)
        _all_reduce(stats)
        return stats
    # sequential / layerwise: a = b, so the input sums are enough (C = G W^T).
    source = block if variant == "sequential" else original
    stats = SiteStatistics.zeros(d, 0, device=device, dtype=dtype)
    for i in range(len(inputs.hidden)):
        b = _consumer_inputs(source, site.consumer, inputs, hidden, i, device)
        w = residual_weights(hidden[i], b.float() @ weight.T) if weighted else None
        stats.update(b, b[:, :0], weights=w)
    _all_reduce(stats)
    return SiteStatistics.from_inputs_only(stats, weight)


def _shrinkage(cfg: PruneConfig, stats: SiteStatistics) -> float:
    return auto_shrinkage(stats) if cfg.shrinkage is None else cfg.shrinkage


def _prune_site(site: Site, adapter: Adapter, block: nn.Module, stats: SiteStatistics, cfg: PruneConfig,
                block_index: int) -> SiteReport:
    consumer = block.get_submodule(site.consumer)
    weight = adapter.weight(consumer).detach()
    bias_shift = cfg.bias_shift and getattr(consumer, "bias", None) is not None
    sel = select(
        cfg.method, stats, weight.to(stats.gram), site.keep, groups=site.groups, refit_weights=cfg.refit,
        damping=cfg.damping, shrinkage=_shrinkage(cfg, stats), bias_shift=bias_shift, partition=site.partition,
        per_class=site.per_class,
        prior=weight.to(stats.gram) if cfg.damp_to_original else None, seed=cfg.seed + block_index, site=site.name,
    )
    untouched = reconstruction_error(stats, sel.kept_columns, weight.to(stats.gram)[:, sel.kept_columns.to(weight.device)])
    apply_selection(block, adapter, site, sel.kept, sel.weight, sel.bias_shift if bias_shift else None)
    return SiteReport(
        name=site.name, kind=site.kind, block=block_index, groups_before=site.num_groups, groups_kept=len(sel.kept),
        kept=sorted(sel.kept), error=float(sel.error), error_original_columns=untouched,
        target_sq=float(stats.target_sq), tokens=int(stats.tokens), curve=sel.relative_curve.tolist(),
        diagnostics=sel.diagnostics,
    )


@torch.no_grad()
def prune_blocks(model: nn.Module, adapter: Adapter, inputs: BlockInputs, cfg: PruneConfig, widths: list[Widths],
                 device, progress: bool = True) -> list[SiteReport]:
    """Prune every block in place to its widths (one ``Widths`` per block) and return one report per pruned site."""
    prefix, blocks = find_blocks(model)
    dtype = getattr(torch, cfg.stats_dtype)
    offload = torch.device(cfg.offload_device)
    hidden = inputs.hidden
    mlp_width = adapter.weight(blocks[0].get_submodule(adapter.mlp.consumer)).shape[1]
    reports: list[SiteReport] = []
    bar = tqdm(range(len(blocks)), desc="pruning blocks", disable=not progress)
    for i in bar:
        block = blocks[i].to(device)
        sites = block_sites(adapter, model.config, f"{prefix}.{i}", widths[i], mlp_width, cfg.attention_mode)
        original = copy.deepcopy(block) if sites and cfg.variant != "sequential" else block
        for site in sites:
            t0 = time.perf_counter()
            stats = collect_statistics(site, adapter, block, original, inputs, hidden, cfg.variant, device, dtype,
                                       cfg.token_weights)
            t1 = time.perf_counter()
            report = _prune_site(site, adapter, block, stats, cfg, i)
            report.seconds_statistics, report.seconds_selection = t1 - t0, time.perf_counter() - t1
            reports.append(report)
            bar.set_postfix({site.kind: f"rel.err {report.relative_error:.3f}"})
            del stats
        # Move the stream on with hooks off: through the original block (layerwise) or the cut one.
        mover = original if cfg.variant == "layerwise" else block
        hidden = [run_block(mover, inputs, hidden, j, device).to(offload) for j in range(len(hidden))]
        blocks[i].to(offload)
        del original
    return reports


@torch.no_grad()
def curve_pass(model: nn.Module, adapter: Adapter, inputs: BlockInputs, cfg: PruneConfig, device,
               progress: bool = True) -> list[SiteOptions]:
    """One pass through the original model (layerwise statistics) giving each site's error at every width
    it may take, for the global budget: the full greedy curve of every MLP, and one quota-constrained
    greedy per valid head count of every attention site."""
    prefix, blocks = find_blocks(model)
    dtype = getattr(torch, cfg.stats_dtype)
    offload = torch.device(cfg.offload_device)
    x = inputs.hidden
    options: list[SiteOptions] = []
    for i in tqdm(range(len(blocks)), desc="error curves", disable=not progress):
        block = blocks[i].to(device)
        costs = site_costs(adapter, model.config, block)
        name = f"{prefix}.{i}"
        sites = [mlp_site(adapter, f"{name}.mlp", costs.mlp_width, costs.mlp_width)]
        if adapter.attention is not None:
            sites.insert(0, attention_site(adapter, model.config, f"{name}.attention", costs.heads, costs.kv_heads,
                                           cfg.attention_mode))
        for site in sites:
            stats = collect_statistics(site, adapter, block, block, inputs, x, "layerwise", device, dtype,
                                       cfg.token_weights)
            weight = adapter.weight(block.get_submodule(site.consumer)).detach().to(stats.gram)
            prior = weight if cfg.damp_to_original else None
            # Weighted errors are already relative (to the residual stream, token by token): compare sites by
            # their mean over tokens. Unweighted ones are made relative to the site's own output.
            per_token = float(stats.tokens) if cfg.token_weights == "residual" else None
            if site.kind == "mlp":
                sel = greedy_select(stats, costs.mlp_width, damping=cfg.damping, shrinkage=_shrinkage(cfg, stats), bias_shift=False, prior=prior,
                                    site=site.name)
                floor = max(cfg.mlp_multiple, int(cfg.min_width_fraction * costs.mlp_width))
                widths, params, errors = mlp_options(sel.curve.tolist(), per_token or sel.target_sq, costs.mlp_width,
                                                     costs.per_neuron, cfg.mlp_multiple, floor)
            else:
                widths, params, errors = [], [], []
                for heads, kv_heads in head_options(adapter, model.config, cfg.attention_mode):
                    error = 0.0
                    if heads < costs.heads:
                        att = attention_site(adapter, model.config, site.name, heads, kv_heads, cfg.attention_mode)
                        sel = greedy_select(stats, att.keep, groups=att.groups, damping=cfg.damping, shrinkage=_shrinkage(cfg, stats), bias_shift=False,
                                            partition=att.partition, per_class=att.per_class, prior=prior,
                                            site=site.name)
                        error = float(sel.curve[-1]) / max(per_token or sel.target_sq, 1e-30)
                    widths.append((heads, kv_heads))
                    params.append(heads * costs.per_query_head + kv_heads * costs.per_kv_head)
                    errors.append(error)
            options.append(SiteOptions(i, site.kind, tuple(widths), tuple(params), tuple(errors)))
        x = [run_block(block, inputs, x, j, device).to(offload) for j in range(len(x))]
        blocks[i].to(offload)
    return options
