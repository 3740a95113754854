"""Finding a model's blocks, capturing what enters them, and running one block up to a module.

One ``HookSet`` owns every hook it adds and removes them on exit, whatever happens; forwards are stopped
with a dedicated exception (never a generic error that could hide a real bug).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from accelerate.utils import send_to_device
from torch import nn

from ..logs import progress as progress_bar

__all__ = ["StopForward", "HookSet", "find_blocks", "BlockInputs", "capture_block_inputs", "move_outside", "run_block"]


class StopForward(Exception):
    """Raised by a hook to end a forward early once it has what it came for."""


class HookSet:
    """Owns forward hooks: records every handle and removes them all on exit."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def pre_hook(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False, prepend: bool = False) -> None:
        """Add ``fn`` after the module's other pre-hooks, or before them with ``prepend``."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs, prepend=prepend))

    def hook(self, module: nn.Module, fn: Callable) -> None:
        """Add ``fn(module, args, output)``, run after the module's forward."""
        self._handles.append(module.register_forward_hook(fn))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks, from the model's own ``_no_split_modules`` metadata: the longest
    ``ModuleList`` whose entries are of a no-split class (decoder layers, encoder layers, GPT-2 blocks)."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in no_split:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(
            f"could not find the repeated blocks of {type(model).__name__}: no ModuleList of its "
            f"_no_split_modules ({sorted(no_split)})"
        )
    return best


@dataclass
class BlockInputs:
    """What enters block 0 for each calibration batch: hidden states, the other arguments by name, and for padded
    calibration (an attention mask) which token positions are real."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict[str, Any]]
    masks: list[torch.Tensor | None] = field(default_factory=list)

    def rows(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` of batch ``index`` (batch x tokens x features, or already tokens x features) as the rows of its
        real tokens: padding never enters a statistic, so results do not depend on how much of it there is."""
        x = x.reshape(-1, x.shape[-1])
        mask = self.masks[index] if index < len(self.masks) else None
        return x if mask is None else x[mask.reshape(-1).to(x.device)]


def move_outside(model: nn.Module, blocks_prefix: str, device) -> None:
    """Move every parameter and buffer outside the blocks (embeddings, final norm, head)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith(blocks_prefix + "."):
            tensor.data = tensor.data.to(device)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int, device, offload, *, attention_mask=None,
    progress: bool = False,
) -> BlockInputs:
    """Run the model on each batch up to block 0 and keep what block 0 receives (moved to ``offload``); with an
    ``attention_mask`` (1 = real token, 0 = padding) the model masks the padding and each batch keeps its mask."""
    prefix, blocks = find_blocks(model)
    move_outside(model, prefix, device)
    captured = BlockInputs([], [], [])

    def grab(module, args, kwargs):
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        captured.hidden.append(hidden.to(offload))
        captured.args.append(send_to_device(rest, offload))
        captured.kwargs.append(send_to_device(dict(kwargs), offload))
        raise StopForward

    try:
        with HookSet() as hooks:
            # Before a lazy model's own hook (``lazy.py``), which would load block 0 only for it to be skipped.
            hooks.pre_hook(blocks[0], grab, with_kwargs=True, prepend=True)
            for start in progress_bar(range(0, len(input_ids), batch_size), "calibration batches", progress):
                batch = {"input_ids": input_ids[start : start + batch_size].to(device), "use_cache": False}
                if attention_mask is not None:
                    mask = attention_mask[start : start + batch_size]
                    batch["attention_mask"] = mask.to(device)
                    captured.masks.append(mask.bool().to(offload))
                try:
                    model(**batch)
                except StopForward:
                    pass
    finally:
        move_outside(model, prefix, offload)
    return captured


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, hidden: list[torch.Tensor], index: int, device,
              stop_at: nn.Module | None = None, on_input: Callable[[torch.Tensor], None] | None = None,
              on_output: Callable[[torch.Tensor], None] | None = None):
    """Run ``block`` on batch ``index`` of ``hidden``. With ``stop_at``, hand the input of that module to
    ``on_input`` and stop there (returns None), or with ``on_output`` also run the module, hand over its
    output and stop after it; without, return the block's output on ``device``."""
    args = send_to_device(inputs.args[index], device)
    kwargs = send_to_device(inputs.kwargs[index], device)
    x = hidden[index].to(device)
    if stop_at is None:
        return _output(block(x, *args, **kwargs))

    def grab(module, module_args):
        on_input(module_args[0])
        if on_output is None:
            raise StopForward

    def grab_output(module, module_args, output):
        on_output(output)
        raise StopForward

    with HookSet() as hooks:
        hooks.pre_hook(stop_at, grab)
        if on_output is not None:
            hooks.hook(stop_at, grab_output)
        try:
            block(x, *args, **kwargs)
        except StopForward:
            return None
    raise RuntimeError(f"{type(stop_at).__name__} was never called in the block's forward")
