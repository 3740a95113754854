"""``SubpruneCallback``: the cut inside a stock ``transformers.Trainer`` run, so that training recovers what the cut
lost in the same ``trainer.train()``, with the optimizer's moments carried over to the kept rows and columns.

What the Trainer does not hand a callback (its DDP wrapper, to rebuild after the parameters change shape) is read
from the Trainer that calls the callback's events, found on the call stack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import random
import time
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from transformers import TrainerCallback

from ..adapters import get_adapter
from ..api import PruneResult, count_parameters, prune
from ..calibration import pad_right
from ..config import PruneConfig
from ..files import REPORT_FILE
from ..logs import get_logger
from ..outputs.card import write_card
from ..outputs.export import _make_readable, check_reload, save_calibration_ids
from ..outputs.heterogeneous import needs_heterogeneous, write_heterogeneous
from ..pipeline.budget import resolve_budget
from ..pipeline.capture import find_blocks
from ..pipeline.surgery import ParameterCut, record_cuts
from ..pipeline.widths import site_costs

__all__ = ["SubpruneCallback", "CutRecord", "train_calibration", "carry_optimizer", "rebuild_ddp"]

logger = get_logger(__name__)


@dataclass
class CutRecord:
    """One cut made during training.

    Attributes:
        step: the optimizer steps taken before the cut (0: before the first one).
        sparsity: the scheduled fraction of the original prunable parameters removed in all (None: the config's
            own sparsities, for the default one-cut schedule).
        relative_sparsity: the fraction of the current model's prunable parameters this cut removed (asked).
        kept: ``{parameter name: (dim, kept indices)}`` for every parameter the cut resized: the entries of the
            pre-cut parameter (and of its optimizer moments) that the new one holds; ``(None, None)`` where only
            the values changed (a bias shift).
        result: what ``prune()`` returned for this cut.
    """

    step: int
    sparsity: float | None
    relative_sparsity: float | None
    params_before: int
    params_after: int
    prunable_before: int
    prunable_after: int
    seconds: float
    kept: dict[str, tuple[int | None, torch.Tensor | None]] = field(repr=False)
    result: PruneResult = field(repr=False)
    optimizer_state: str = "sliced"

    def to_dict(self) -> dict:
        r = self.result
        return {"step": self.step, "sparsity": self.sparsity, "relative_sparsity": self.relative_sparsity,
                "parameters": {"before": self.params_before, "after": self.params_after},
                "prunable_parameters": {"before": self.prunable_before, "after": self.prunable_after},
                "budget": r.config.budget, "widths": [w.counts() for w in r.widths],
                "calibration": r.calibration, "notes": r.notes, "seconds": self.seconds,
                "optimizer_state": self.optimizer_state}


def _check_schedule(schedule: Mapping[int, float] | None, config: PruneConfig) -> list[tuple[int, float | None]]:
    """The cuts as ``(step, total sparsity)`` in step order; a bad schedule fails here, with what to change."""
    if schedule is None:
        return [(0, None)]
    if not isinstance(schedule, Mapping) or not schedule:
        raise ValueError("schedule must be a non-empty {global_step: sparsity} mapping, e.g. {0: 0.2, 100: 0.4}, "
                         f"got {schedule!r}")
    cuts = []
    for step, sparsity in schedule.items():
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"schedule step {step!r} must be a whole number >= 0 (the optimizer steps taken before "
                             "the cut; 0 cuts before the first one)")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"schedule sparsity {sparsity!r} at step {step} must be a number in [0, 1): the "
                             "fraction of the original prunable parameters removed by then (0.3 = 30%)")
        cuts.append((step, float(sparsity)))
    cuts.sort()
    for (s0, v0), (s1, v1) in zip(cuts, cuts[1:]):
        if v1 <= v0:
            raise ValueError(f"schedule sparsities must increase with the step (each is the total removed so far): "
                             f"{v0} at step {s0} is followed by {v1} at step {s1}; give increasing values")
    if config.mlp_sparsity is not None or config.attention_sparsity is not None:
        raise ValueError("a schedule gives one overall sparsity per step: leave mlp_sparsity and attention_sparsity "
                         "unset in the config (or drop the schedule for one cut to the config's sparsities)")
    return cuts


def _refuse_adapters(model: nn.Module) -> None:
    if any(type(m).__module__.split(".")[0] == "peft" for m in model.modules()):
        raise ValueError("SubpruneCallback cannot prune a peft-wrapped model: the adapters sit on the projections the "
                         "cut resizes. Prune the base model first (SubpruneCallback on the base model, or "
                         "hf_subprune.prune), then attach the adapters to the pruned model")


def _calling_trainer():
    """The ``transformers.Trainer`` whose method is running an event of this callback (None outside one)."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


@contextlib.contextmanager
def _rng_kept(seed: int) -> Iterator[None]:
    """Seed every generator a collator may use (identically on every process), and give the training run its own
    states back afterwards: reading calibration data must not change the training order or masking."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def _plain_forward(model: nn.Module) -> Iterator[None]:
    """Run the model's own forward, without the autocast wrapper accelerate installs for mixed precision: the cut's
    statistics and the reload check are computed in the model's dtype."""
    patched = model.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if patched is not None:
            model.forward = patched


def _batches(items: Iterator[Any], size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _real_rows(dataloader, seed: int) -> Iterator[tuple[torch.Tensor, bool]]:
    """The real tokens (``attention_mask`` 1) of each example of the dataloader's dataset, in a seeded random order,
    through its own collate function, with whether the batch had a mask. Labels are not read; the run's random
    generators are left as they were."""
    dataset = dataloader.dataset
    if type(dataset).__name__ == "IterableDatasetShard":  # accelerate's per-process view: read the whole stream
        dataset = dataset.dataset
    collate = dataloader.collate_fn
    with _rng_kept(seed):
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            examples = iter(dataset)
        else:
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
            examples = (dataset[int(i)] for i in order)
        for chunk in _batches(examples, 16):
            batch = collate(chunk)
            if "input_ids" not in batch:
                raise ValueError("the train dataloader's batches have no input_ids to calibrate on: pass "
                                 "SubpruneCallback(calibration=...) (text, a dataset or token ids)")
            ids = torch.as_tensor(batch["input_ids"])
            mask = batch.get("attention_mask") if hasattr(batch, "get") else None
            keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
            for row, real in zip(ids, keep):
                yield row[real].long(), mask is not None


def _source(masked: bool, how: str) -> str:
    return (f"the Trainer's train dataset (real tokens of seeded random examples, {how}"
            + ("; padding dropped by attention_mask)" if masked else "; batches without attention_mask: all tokens)"))


def train_calibration(dataloader, num_samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, str]:
    """Calibration windows from the training data, as decoders calibrate: the real tokens of seeded random examples
    (``_real_rows``) concatenated and cut into ``num_samples`` windows of ``seq_len`` (fewer if the data runs out,
    with a warning). The same on every process, without touching the dataloader or the run's generators."""
    need = num_samples * seq_len
    pieces: list[torch.Tensor] = []
    have, masked = 0, True
    with contextlib.closing(_real_rows(dataloader, seed)) as real:  # closing restores the run's generators
        for row, has_mask in real:
            pieces.append(row)
            have += len(row)
            masked = masked and has_mask
            if have >= need:
                break
    windows = min(num_samples, have // seq_len)
    if windows == 0:
        raise ValueError(f"the train dataset holds {have} tokens, fewer than one calibration window of seq_len="
                         f"{seq_len}: lower seq_len in the PruneConfig, or pass calibration=...")
    if windows < num_samples:
        logger.warning(f"the train dataset gives {windows} calibration windows of {seq_len} tokens, not "
                       f"num_samples={num_samples}: calibrating on those")
    ids = torch.cat(pieces)[: windows * seq_len].view(windows, seq_len)
    return ids, _source(masked, "concatenated")


def train_text_calibration(dataloader, num_samples: int, seq_len: int,
                           seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Calibration samples from the training data, as encoders calibrate (``calibration.text_samples``): one
    example per sample (its real tokens, cut at ``seq_len``), padded on the right, with the attention mask."""
    rows: list[torch.Tensor] = []
    masked = True
    with contextlib.closing(_real_rows(dataloader, seed)) as real:
        for row, has_mask in real:
            if len(row):
                rows.append(row[:seq_len])
                masked = masked and has_mask
            if len(rows) == num_samples:
                break
    if not rows:
        raise ValueError("the train dataset holds no tokens to calibrate on: pass calibration=...")
    if len(rows) < num_samples:
        logger.warning(f"the train dataset gives {len(rows)} calibration samples, not num_samples={num_samples}: "
                       "calibrating on those")
    ids, mask = pad_right(rows)
    return ids, mask, _source(masked, "one per sample")


def _prunable(model: nn.Module) -> int:
    """Parameters of the MLP and attention sites, over all blocks (what ``PruneConfig.sparsity`` is a fraction of)."""
    adapter = get_adapter(model.config)
    _, blocks = find_blocks(model)
    total = 0
    for block in blocks:
        costs = site_costs(adapter, block)
        total += costs.mlp_params + (costs.attention_params if adapter.attention is not None else 0)
    return total


def _torch_optimizer(optimizer):
    """The ``torch.optim.Optimizer`` inside accelerate's (and any other) wrapper."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _slice_state(state: dict, cut: ParameterCut) -> dict | None:
    """The optimizer state of ``cut.old`` for ``cut.new``: entries shaped like the parameter (Adam's moments, a
    momentum buffer) at the kept indices, scalars (``step``) as they are; None where an entry has another shape
    (a factored second moment) and the state cannot follow."""
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == cut.old.shape:
            out[key] = value if cut.kept is None else value.index_select(cut.dim, cut.kept.to(value.device))
        elif isinstance(value, torch.Tensor) and value.numel() > 1:
            return None
        else:
            out[key] = value
    return out


def carry_optimizer(optimizer, cuts: list[ParameterCut], model: nn.Module) -> str:
    """Point the optimizer at the new parameters, in place (the same object, so that the LR scheduler and the
    Trainer keep it): each replaced parameter takes its old one's place in ``param_groups`` and its state sliced
    to the kept entries; a new bias joins the group without weight decay. Returns "sliced", or "reset" where some
    state could not be sliced (and was dropped for those parameters)."""
    opt = _torch_optimizer(optimizer)
    where = {id(p): (group, i) for group in opt.param_groups for i, p in enumerate(group["params"])}
    outcome = "sliced"
    for cut in cuts:
        if cut.old is None:
            if cut.new.requires_grad:
                group = min(opt.param_groups, key=lambda g: g.get("weight_decay", 0.0))
                group["params"].append(cut.new)
                where[id(cut.new)] = (group, len(group["params"]) - 1)
            continue
        place = where.pop(id(cut.old), None)
        if place is None:  # a parameter the optimizer does not train
            continue
        group, i = place
        group["params"][i] = cut.new
        where[id(cut.new)] = place
        state = opt.state.pop(cut.old, None)
        if state:
            sliced = _slice_state(state, cut)
            if sliced is None:
                outcome = "reset"
                logger.warning(f"the optimizer state of {cut.name} has entries not shaped like the parameter; "
                               "it starts afresh for the cut parameters")
            else:
                opt.state[cut.new] = sliced
    live = {id(p) for p in model.parameters()}
    stale = [i for group in opt.param_groups for i, p in enumerate(group["params"]) if id(p) not in live]
    if stale:
        raise RuntimeError(f"{len(stale)} optimizer parameters are no longer in the model after the cut")
    return outcome


def rebuild_ddp(wrapped: nn.Module, module: nn.Module) -> None:
    """Rebuild a DistributedDataParallel wrapper in place after its module's parameters changed shape: DDP
    registers the parameters (buckets, gradient hooks) when it is built. In place, because the Trainer's loop
    holds the wrapper in a local variable; same settings and communication hook."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(wrapped, DistributedDataParallel):
        return
    settings = dict(device_ids=wrapped.device_ids, output_device=wrapped.output_device, dim=wrapped.dim,
                    broadcast_buffers=wrapped.broadcast_buffers, process_group=wrapped.process_group,
                    bucket_cap_mb=wrapped.bucket_bytes_cap / 2**20,
                    find_unused_parameters=wrapped.find_unused_parameters,
                    gradient_as_bucket_view=wrapped.gradient_as_bucket_view, static_graph=wrapped.static_graph,
                    mixed_precision=wrapped.mixed_precision)
    hooks = list(getattr(wrapped, "_comm_hooks", []))
    wrapped._remove_autograd_hooks()
    DistributedDataParallel.__init__(wrapped, module, **settings)
    if not wrapped._comm_hooks:
        for hook, state in hooks:
            wrapped.register_comm_hook(state, hook)


def _save_pretrained_with_report(callback: "SubpruneCallback", model: nn.Module, save_directory, *args, **kwargs):
    """``save_pretrained`` of a model the callback cut: the stock save, then what makes the folder load like a
    ``prune()`` output (the heterogeneous config and modeling file for per-layer widths), the report and the card."""
    out = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        callback.write_folder(model, Path(save_directory))
    return out


class SubpruneCallback(TrainerCallback):
    """Prune a model inside ``transformers.Trainer.train()`` and keep training it.

    ``Trainer(..., callbacks=[SubpruneCallback(config)])`` cuts the model to ``config``'s sparsities before the
    first optimizer step; ``schedule={0: 0.2, 200: 0.4}`` prunes gradually: after ``step`` optimizer steps the cut
    removes what brings the removed fraction of the original prunable (MLP + attention) parameters to the scheduled
    value (the schedule's values replace ``config.sparsity``). Each incremental cut is computed against the
    current model's actual parameter count, so rounding does not accumulate.

    Budgets: one cut uses ``config.budget`` as given (by default prune()'s per-layer budget: fluctuation, global
    from ``GLOBAL_FROM_SPARSITY``). A schedule of several cuts uses ``config.budget`` at every cut; where it is None,
    the global budget if the final sparsity is at least ``GLOBAL_FROM_SPARSITY`` (for causal LMs), else uniform
    widths (``_schedule_budget``). A per-layer budget (or a method that chooses its own widths, such as flap) decides
    each cut's widths afresh from the model as it is then, whose blocks differ after the first cut.

    Calibration: ``config.num_samples`` windows of ``config.seq_len`` tokens from the Trainer's own training data
    (``train_calibration``: the train dataloader's dataset and collate function, real tokens only), or any source
    ``prune()`` takes as ``calibration`` (text, a file, a dataset: tokenised with the Trainer's ``processing_class``;
    a tensor of token ids). Under ``accelerate launch`` every process reads the same windows and ``prune()`` sums
    the statistics over processes, so every process cuts identically.

    After a cut the same optimizer object trains the smaller parameters: each cut parameter's state (Adam's
    ``exp_avg``, ``exp_avg_sq``, ``step``) is sliced to the kept rows or columns; the refitted consumer weights keep
    their moments sliced by column too (their values changed, their moments' scale still fits them); untouched
    parameters keep theirs; the LR scheduler goes on. A DDP wrapper is rebuilt in place. DeepSpeed, FSDP, peft
    adapters and resuming from a checkpoint are refused. A second ``train()`` does not repeat cuts already made.

    Saving: once cut, the model's ``save_pretrained`` (which ``trainer.save_model`` and checkpoints call) also writes
    what ``PruneResult.save`` writes: the heterogeneous config for per-layer widths, ``subprune_report.json`` (with
    a ``training`` entry: the schedule, each cut's step, the steps trained) and the card. ``check_saves=True``
    reloads each saved folder and compares outputs (a second copy of the model on its device).
    """

    def __init__(self, config: PruneConfig, schedule: Mapping[int, float] | None = None, calibration: Any = None,
                 *, check_saves: bool = False, progress: bool = False) -> None:
        if not isinstance(config, PruneConfig):
            raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
        self.config = config
        self.schedule = _check_schedule(schedule, config)
        self.scheduled = schedule is not None
        self.calibration = calibration
        self.check_saves = check_saves
        self.progress = progress
        self.cuts: list[CutRecord] = []
        self._done: set[int] = set()
        self._trainer_ref = None
        self._state = None
        self._args = None
        self._tokenizer = None
        self._prunable_original: int | None = None
        self._params_original: int | None = None

    # --- events ---
    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if model is not None:
            self._check_model(model)
        self._check_calibration(processing_class)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._bind(_calling_trainer())
        self._check_model(model)
        self._check_calibration(processing_class)
        trainer = self._trainer()
        if trainer is not None and (getattr(trainer, "is_deepspeed_enabled", False)
                                    or getattr(trainer, "is_fsdp_enabled", False)):
            raise ValueError("SubpruneCallback works with one process or DDP: DeepSpeed and FSDP shard the parameters "
                             "the cut resizes; prune before training instead (hf_subprune.prune)")
        late = [(step, sparsity) for step, sparsity in self.schedule if step > state.max_steps]
        if late:
            raise ValueError(f"schedule step {late[0][0]} is past max_steps={state.max_steps}: the cut would never "
                             "happen; schedule every cut at or before the last step (or train longer)")
        if state.global_step > 0 and any(step not in self._done for step, _ in self.schedule):
            raise ValueError("SubpruneCallback cannot resume a run from a checkpoint: start the training from the "
                             "unpruned model, or load the pruned model saved by the run and train it without "
                             "the callback")
        self._args, self._state = args, state
        self._maybe_cut(0, model=model, processing_class=processing_class, **kwargs)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._args, self._state = args, state
        self._maybe_cut(state.global_step, model=model, processing_class=processing_class, **kwargs)

    # --- the cut ---
    def _bind(self, trainer) -> None:
        self._trainer_ref = weakref.ref(trainer) if trainer is not None else None

    def _trainer(self):
        return self._trainer_ref() if self._trainer_ref is not None else None

    def _check_model(self, model: nn.Module) -> None:
        _refuse_adapters(model)

    def _check_calibration(self, processing_class) -> None:
        if self.calibration is not None and not isinstance(self.calibration, torch.Tensor) and processing_class is None:
            raise ValueError("SubpruneCallback(calibration=...) tokenises with the Trainer's processing_class: pass "
                             "Trainer(..., processing_class=tokenizer), or give token ids as the calibration")

    def _maybe_cut(self, step: int, *, model, processing_class, optimizer=None, train_dataloader=None, **_) -> None:
        for entry_step, sparsity in self.schedule:
            if entry_step == step and step not in self._done:
                self._done.add(step)
                self._cut(step, sparsity, model, optimizer, train_dataloader, processing_class)

    def _cut_config(self, sparsity: float | None, model: nn.Module) -> tuple[PruneConfig, float | None]:
        """The config of this cut and its sparsity relative to the current model (None: the config's own)."""
        device = self.config.device or str(next(model.parameters()).device)
        # the training data is the calibration: the model writes none itself unless asked (synthetic.py)
        synthetic = 0 if self.config.synthetic_samples is None else self.config.synthetic_samples
        if sparsity is None:
            return dataclasses.replace(self.config, device=device, synthetic_samples=synthetic), None
        relative = 1 - (1 - sparsity) * self._prunable_original / _prunable(model)
        budget = self.config.budget or (self._schedule_budget(model) if len(self.schedule) > 1 else None)
        cfg = PruneConfig.from_dict({**self.config.to_dict(), "sparsity": max(relative, 0.0), "budget": budget,
                                     "device": device, "synthetic_samples": synthetic})
        return cfg, relative

    def _schedule_budget(self, model: nn.Module) -> str:
        """A schedule's budget where the config gives none: global where prune()'s default for the final sparsity is
        (a causal LM from ``GLOBAL_FROM_SPARSITY`` on), uniform widths otherwise. SmolLM2 at 50%, six cuts while
        distilling on 32 x 512 tokens: 42.26 with the global budget at every cut against 47.74 with uniform widths
        (``benchmarks/results/recovery_global_gradual6.md``, ``recovery_smollm2_bf16_gradual6.md``); FLAP's
        allocation (the one-cut default below 30%) is not measured in schedules."""
        final = dataclasses.replace(self.config, sparsity=self.schedule[-1][1], budget=None)
        tokens = self.config.num_samples * self.config.seq_len
        chosen = resolve_budget(final, tokens, get_adapter(model.config).causal_lm)[0].budget
        return "global" if chosen == "global" else "uniform"

    def _cut(self, step: int, sparsity: float | None, model: nn.Module, optimizer, dataloader,
             processing_class) -> None:
        start = time.perf_counter()
        if self._prunable_original is None:
            self._prunable_original, self._params_original = _prunable(model), count_parameters(model)
        self._tokenizer = processing_class
        cfg, relative = self._cut_config(sparsity, model)
        if relative is not None and relative <= 1e-9:
            logger.info(f"step {step}: the model already has {sparsity:.0%} of its prunable parameters removed; no cut")
            return
        device = next(model.parameters()).device
        prunable_before, params_before = _prunable(model), count_parameters(model)
        if self.calibration is None:
            if dataloader is None:
                raise ValueError("the Trainer gave no train dataloader to calibrate on: pass calibration=...")
            if get_adapter(model.config).causal_lm:
                ids, source = train_calibration(dataloader, cfg.num_samples, cfg.seq_len, cfg.seed)
                kwargs = {"input_ids": ids}
            else:
                ids, mask, source = train_text_calibration(dataloader, cfg.num_samples, cfg.seq_len, cfg.seed)
                kwargs = {"input_ids": ids, "attention_mask": mask}
        elif isinstance(self.calibration, torch.Tensor):
            kwargs, source = {"input_ids": self.calibration}, None
        else:
            kwargs, source = {"tokenizer": processing_class, "calibration": self.calibration}, None
        with _plain_forward(model), record_cuts() as cuts:
            result = prune(model, config=cfg, progress=self.progress, **kwargs)
        model.to(device)  # the cut leaves the blocks on the offload device
        if source is not None:
            result.calibration["source"] = source
        names = {id(m): path for path, m in model.named_modules()}
        kept = {f"{names[id(c.module)]}.{c.name}" if names.get(id(c.module)) else c.name: (c.dim, c.kept)
                for c in cuts if c.old is not None}
        outcome = carry_optimizer(optimizer, cuts, model) if optimizer is not None else "none"
        trainer = self._trainer()
        if trainer is not None:
            rebuild_ddp(trainer.model_wrapped, model)
        elif getattr(self._args, "world_size", 1) > 1:
            raise RuntimeError("SubpruneCallback found no Trainer running it, so it cannot rebuild the DDP wrapper "
                               "after the cut; use it with transformers.Trainer (or a subclass)")
        self.cuts.append(CutRecord(step=step, sparsity=sparsity, relative_sparsity=relative,
                                   params_before=params_before, params_after=count_parameters(model),
                                   prunable_before=prunable_before, prunable_after=_prunable(model),
                                   seconds=time.perf_counter() - start, kept=kept, result=result,
                                   optimizer_state=outcome))
        if "save_pretrained" not in model.__dict__:
            model.save_pretrained = types.MethodType(
                lambda m, *a, **k: _save_pretrained_with_report(self, m, *a, **k), model)
        logger.info(f"step {step}: pruned to {count_parameters(model):,} parameters "
                    f"({1 - count_parameters(model) / self._params_original:.1%} removed in all)")

    # --- saving ---
    def result(self, model: nn.Module) -> PruneResult:
        """One ``PruneResult`` for the run so far: the original size and widths, the last cut's sites and widths,
        the current parameters, and a note on the training (the card shows it)."""
        if not self.cuts:
            raise ValueError("SubpruneCallback has not cut the model yet: nothing to report")
        first, last = self.cuts[0].result, self.cuts[-1].result
        settings = {"device": self.config.device}  # the cut ran on the training device; record what was asked
        if self.scheduled:
            settings["sparsity"] = self.cuts[-1].sparsity
        config = PruneConfig.from_dict({**last.config.to_dict(), **settings})
        widths = [dataclasses.replace(w, notes=list(w.notes)) for w in last.widths]
        widths[0].notes.append(self._training_note())
        return PruneResult(
            model=model, tokenizer=self._tokenizer, config=config, widths=widths, widths_before=first.widths_before,
            sites=last.sites, params_before=self._params_original, params_after=count_parameters(model),
            seconds=sum(c.seconds for c in self.cuts), calibration=last.calibration, base_model=first.base_model,
            license=first.license, input_ids=last.input_ids, attention_mask=last.attention_mask)

    def _training_note(self) -> str:
        state = self._state
        done = state.global_step if state is not None else self.cuts[-1].step
        cuts = ", ".join(f"step {c.step}" + (f" ({c.sparsity:.0%} removed in all)" if c.sparsity is not None else "")
                         for c in self.cuts)
        return (f"pruned during training (SubpruneCallback): cut at {cuts}; {done} optimizer steps trained, "
                f"{done - self.cuts[-1].step} after the last cut. The weights are the trained ones; the errors are "
                "those the cut measured")

    def training_report(self) -> dict:
        """The schedule, each cut and the training so far: the report's ``training`` entry."""
        state, args = self._state, self._args
        return {
            "callback": "SubpruneCallback",
            "schedule": [{"step": s, "sparsity": v} for s, v in self.schedule],
            "cuts": [c.to_dict() for c in self.cuts],
            "global_step": state.global_step if state is not None else None,
            "max_steps": state.max_steps if state is not None else None,
            "epoch": state.epoch if state is not None else None,
            "gradient_accumulation_steps": getattr(args, "gradient_accumulation_steps", None),
            "per_device_train_batch_size": getattr(args, "per_device_train_batch_size", None),
            "processes": getattr(args, "world_size", None),
            "learning_rate": getattr(args, "learning_rate", None),
        }

    def write_folder(self, model: nn.Module, folder: Path) -> None:
        """Complete a folder ``save_pretrained`` wrote for the cut model as ``PruneResult.save`` would: the
        heterogeneous config and modeling file where the widths need them, the report, ``subprune_config.json`` and
        the card (the tokenizer is the Trainer's to save)."""
        folder = Path(folder)
        heterogeneous = needs_heterogeneous(model)
        if heterogeneous:
            write_heterogeneous(model, folder)
        reload_check = None
        if self.check_saves:
            with _plain_forward(model):
                reload_check = {"relative_max_difference":
                                check_reload(model, folder, trust_remote_code=heterogeneous)}
        result = self.result(model)
        report = result.report(export="heterogeneous" if heterogeneous else "stock", reload_check=reload_check)
        report["training"] = self.training_report()
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
        result.config.save_pretrained(folder)
        if result.input_ids is not None:  # what recover(folder, "calibration") trains on
            save_calibration_ids(result.input_ids, folder, result.attention_mask)
        write_card(folder, report)
        _make_readable(folder)

    def save(self, model: nn.Module, folder: str | Path) -> Path:
        """Save the cut model with its report and card outside the Trainer (``model.save_pretrained`` does the same
        once the model is cut)."""
        model.save_pretrained(folder)
        if self._tokenizer is not None:
            self._tokenizer.save_pretrained(folder)
        return Path(folder)
