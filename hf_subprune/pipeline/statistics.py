"""Each site's sufficient statistics (grams of the consumer's inputs, cross terms with its target), summed over
this process's calibration batches and then over processes."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import Adapter
from ..config import PruneConfig
from ..distributed import reduce_sum
from ..maths.selection import SiteStatistics
from .capture import BlockInputs, HookSet, run_block
from .sites import Site
from .variants import Variant

__all__ = ["accumulator_dtype", "summed_dtype", "collect_statistics", "dense_targets", "uncut_outputs",
           "site_inputs", "consumer_inputs", "residual_weights"]


def accumulator_dtype(choice: str, shrinkage: float | None = None, model_dtype: torch.dtype | None = None
                      ) -> torch.dtype:
    """The dtype the statistics are summed in (``PruneConfig.stats_dtype``), and the dtype of the refit that solves
    from them. The products are float32 whatever it is (float64 for a float64 model; ``SiteStatistics.update``), so
    float64 sums would only make the addition of the batches exact. ``auto``: float32, on every device. It halves the
    memory (a d x d float64 gram of an 8B model's MLP takes 1.6 GB; at a 1B model's MLP, with the float64 problem and
    refit beside it, the CPU prune's peak fell from 1.97 to 1.20 GiB and its time by 18%). float64 for a float64 model
    (its products are float64) and wherever ``shrinkage`` is 0: without its ridge a gram can be singular up to the
    small damping, and the refit and its float64 fallback need the sums exact."""
    if choice != "auto":
        return getattr(torch, choice)
    if shrinkage == 0 or model_dtype == torch.float64:
        return torch.float64
    return torch.float32


def summed_dtype(cfg: PruneConfig, model: nn.Module) -> torch.dtype:
    """``accumulator_dtype`` for a run of ``cfg`` on ``model``: the model's dtype is its first floating-point
    parameter's (on the meta device too, for a lazy model)."""
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return accumulator_dtype(cfg.stats_dtype, cfg.shrinkage, model_dtype)


def _product(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """A consumer's output less its bias: its weight times its input, as the model's own forward computed it (in
    the model's dtype; a bfloat16 model's matmul accumulates in float32 and rounds once, which is 2.5x faster here
    than redoing the product in float32 from the rounded input, and what the model really outputs)."""
    bias = getattr(module, "bias", None)
    return output if bias is None else output - bias


def consumer_inputs(block: nn.Module, path: str, inputs: BlockInputs, hidden: list[torch.Tensor], index: int,
                    device, *, product: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The input of module ``path`` of ``block`` on batch ``index`` (real tokens x features), from a partial
    forward; with ``product``, also that module's output less its bias (the forward then stops after it)."""
    module = block.get_submodule(path)
    box: list[torch.Tensor] = []
    out: list[torch.Tensor] = []
    run_block(block, inputs, hidden, index, device, stop_at=module, on_input=box.append,
              on_output=(lambda y: out.append(_product(module, y))) if product else None)
    x = inputs.rows(index, box[0])
    return (x, inputs.rows(index, out[0])) if product else x


def site_inputs(block: nn.Module, site: Site, inputs: BlockInputs, hidden: list[torch.Tensor], index: int, device,
                *, product: bool = False) -> tuple[torch.Tensor, ...]:
    """The consumer's input and the residual stream the site's output is added to (both tokens x features),
    from one partial forward of ``block`` on batch ``index``; with ``product``, third, the consumer's output
    less its bias."""
    seen: list[torch.Tensor] = []
    with HookSet() as hooks:
        if site.residual is not None:
            hooks.pre_hook(block.get_submodule(site.residual), lambda module, args: seen.append(args[0]))
        got = consumer_inputs(block, site.consumer, inputs, hidden, index, device, product=product)
    x, *product_rows = got if product else (got,)
    residual = seen[0] if seen else hidden[index].to(device)
    return (x, inputs.rows(index, residual), *product_rows)


def _site_outputs(block: nn.Module, sites: list[Site], inputs: BlockInputs, stream: list[torch.Tensor], index: int,
                  device) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One forward of ``block`` on batch ``index`` of ``stream``: each site's consumer output less its bias and the
    residual stream it is added to (real tokens x features, as the forward computed them), and the block's
    output."""
    seen: dict[tuple[str, str], torch.Tensor] = {}
    with HookSet() as hooks:
        for site in sites:
            hooks.hook(block.get_submodule(site.consumer),
                       lambda module, args, output, key=(site.name, "product"):
                       seen.__setitem__(key, _product(module, output)))
            if site.residual is not None:
                hooks.pre_hook(block.get_submodule(site.residual),
                               lambda module, args, key=(site.name, "residual"): seen.__setitem__(key, args[0]))
        out = run_block(block, inputs, stream, index, device)
    # No residual module: the site adds to the block's input (attention), the stream the forward took.
    return {site.name: (inputs.rows(index, seen[(site.name, "product")]),
                        inputs.rows(index, seen[(site.name, "residual")] if site.residual is not None
                                    else stream[index]).to(device))
            for site in sites}, out


@torch.no_grad()
def dense_targets(block: nn.Module, sites: list[Site], inputs: BlockInputs,
                  dense: list[torch.Tensor], device) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """One forward of the uncut ``block`` per batch of the dense model's stream ``dense``: for each site, the
    dense stream after it (the consumer's output without bias plus the residual stream it is added to; real
    tokens x features, in the stream's dtype on its device), and the block's outputs, the dense stream entering
    the next block. One forward serves every site: the drift correction then costs one block forward per batch."""
    after: dict[str, list[torch.Tensor]] = {site.name: [] for site in sites}
    outputs: list[torch.Tensor] = []
    for i in range(len(dense)):
        found, out = _site_outputs(block, sites, inputs, dense, i, device)
        for name, (product, residual) in found.items():
            after[name].append((product.float() + residual.float()).to(device=dense[i].device, dtype=dense[i].dtype))
        outputs.append(out.to(dense[i].device))
    return after, outputs


@torch.no_grad()
def uncut_outputs(block: nn.Module, sites: list[Site], inputs: BlockInputs, hidden: list[torch.Tensor],
                  device) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """What the uncut-block target of ``sites`` reads from the block before its first cut: per site and batch of
    the stream ``hidden``, the consumer's output less its bias and the residual stream it is added to, as the
    forward computed them (real tokens x features, on ``device``). Kept instead of an uncut copy of the block:
    two tokens x hidden tensors per site (16 MB at a 1B model's 2048 tokens) against the block's weights
    (88 MB in bfloat16; 1.7 GB at a 70B model)."""
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {site.name: [] for site in sites}
    if not sites:
        return out
    for i in range(len(hidden)):
        found, _ = _site_outputs(block, sites, inputs, hidden, i, device)
        for name, pair in found.items():
            out[name].append(pair)
    return out


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
                       hidden: list[torch.Tensor], variant: Variant, device, dtype: torch.dtype,
                       token_weights: str = "none", dense_after: list[torch.Tensor] | None = None,
                       drift_correction: float = 0.0,
                       uncut: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> SiteStatistics:
    """Sum the site's statistics over this process's batches of ``hidden`` (the stream entering the block),
    then over processes. ``block`` is the block as cut so far; ``original`` an uncut copy of it, or ``block``
    itself while nothing in it is cut (one partial forward per batch then serves both), read by the variants
    whose inputs or stream are the uncut block's. The uncut-block target reads ``uncut`` instead
    (``uncut_outputs``, taken before the block's first cut), or ``block`` itself where it is None (nothing cut
    yet). ``dense_after``: the dense model's stream after the site (``dense_targets``), which the uncut-block
    target moves towards by ``drift_correction``."""
    weight = adapter.weight(original.get_submodule(site.consumer))
    d = weight.shape[1]
    weighted = token_weights == "residual"
    if variant.target == "uncut_block":
        # The target is the uncut block's residual stream after the site less the cut block's stream before it:
        # the site's original output plus what the block's earlier cuts changed in the stream.
        stats = SiteStatistics.zeros(d, weight.shape[0], device=device, dtype=dtype)
        for i in range(len(inputs.hidden)):
            if uncut is None:  # nothing cut in this block yet: the block computes the uncut output itself
                b, r_cut, y = site_inputs(block, site, inputs, hidden, i, device, product=True)
                y = y.float()
            else:
                b, r_cut = site_inputs(block, site, inputs, hidden, i, device)
                y, r_orig = uncut[i]
                y = y.to(device).float() + (r_orig.to(device).float() - r_cut.float())
            if drift_correction:
                # The dense model's stream after the site, less the cut stream before it, is the target that would
                # undo every earlier cut's drift; take that share of the way towards it.
                y = torch.lerp(y, dense_after[i].to(device).float() - r_cut.float(), drift_correction)
            stats.update(b, y, weights=residual_weights(inputs.rows(i, hidden[i]), y) if weighted else None)
        reduce_sum(stats.tensors())
        return stats
    # The target is the consumer's own output on the same input: the input sums are enough (C = G W^T).
    source = block if variant.inputs == "cut" else original
    stats = SiteStatistics.zeros(d, 0, device=device, dtype=dtype)
    for i in range(len(inputs.hidden)):
        if weighted:
            b, y = consumer_inputs(source, site.consumer, inputs, hidden, i, device, product=True)
            w = residual_weights(inputs.rows(i, hidden[i]), y)
        else:
            b, w = consumer_inputs(source, site.consumer, inputs, hidden, i, device), None
        stats.update(b, b[:, :0], weights=w)
    reduce_sum(stats.tensors())
    return SiteStatistics.from_inputs_only(stats, weight.to(device=device, dtype=torch.float32))
