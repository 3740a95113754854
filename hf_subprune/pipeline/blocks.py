"""The one loop over blocks that every pass uses: bring a block to the compute device, let the pass work on it,
move the hidden-state stream on, send the block back. Only the current block sits on the compute device; in a
lazy model (``lazy.py``) it is also the only block in memory, the others wait on disk."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..logs import progress
from .capture import BlockInputs, find_blocks, move_outside, run_block
from .lazy import lazy_blocks

__all__ = ["BlockStep", "walk_blocks", "forwards_on"]


@dataclass
class BlockStep:
    """One block as a pass sees it.

    Attributes:
        index / name: position and module path (``model.layers.3``).
        block: the block, on the compute device.
        hidden: the stream entering it (one tensor per calibration batch, on the offload device).
        through: the module the stream goes through to reach the next block (default: ``block`` as the pass
            leaves it); a pass that computed the next stream itself sets ``outputs`` instead.
    """

    index: int
    name: str
    block: nn.Module
    hidden: list[torch.Tensor]
    through: nn.Module | None = None
    outputs: list[torch.Tensor] | None = None


def walk_blocks(model: nn.Module, inputs: BlockInputs, device, offload, *, desc: str, show: bool = True,
                stop: int | None = None, modifies: bool = False) -> Iterator[BlockStep]:
    """Yield each block (up to ``stop``) with the stream entering it; after the pass is done with a step, move
    the stream on through ``step.through`` (or take ``step.outputs``) and send the block back to ``offload``.

    In a lazy model the block is materialised from disk instead, and released to the meta device after: a pass
    that changes blocks says so (``modifies``), and each block it walked is stored for the next pass to read. The
    embeddings and the head wait on disk for the walk's duration (``BlockSource.vocabulary_released``)."""
    prefix, blocks = find_blocks(model)
    source = lazy_blocks(model)
    offload = torch.device(offload)
    hidden = inputs.hidden
    count = len(blocks) if stop is None else stop
    # The walk never reads the embeddings or the head: a lazy model leaves them on disk meanwhile.
    with source.vocabulary_released(model) if source is not None else nullcontext():
        for i in progress(range(count), desc=desc, enabled=show):
            if source is not None:
                source.materialize(i, blocks[i], device)
            else:
                blocks[i].to(device)
            step = BlockStep(i, f"{prefix}.{i}", blocks[i], hidden)
            done = False
            try:  # a pass that fails still sends its block back (a half-cut block is not stored)
                yield step
                if step.outputs is not None:
                    hidden = step.outputs
                else:
                    mover = step.through if step.through is not None else step.block
                    hidden = [run_block(mover, inputs, hidden, j, device).to(offload) for j in range(len(hidden))]
                done = True
            finally:
                if source is not None:
                    source.release(i, blocks[i], store=modifies and done)
                else:
                    blocks[i].to(offload)


@contextmanager
def forwards_on(model: nn.Module, device: torch.device | str | None) -> Iterator[None]:
    """Plain forwards of ``model`` (an evaluation, the reload check) run on ``device`` one block at a time, as the
    passes run: the tensors outside the blocks (embeddings, final norm, head) move to ``device`` for the duration,
    and each block comes to ``device`` before its forward and goes back after (a lazy model's blocks already
    materialise on their input's device). Where ``device`` is None or the model's first parameter already sits
    there, nothing moves; on exit everything is where it was."""
    home = next(model.parameters()).device
    if device is None or home == torch.device(device) or home.type == "meta":
        yield
        return
    prefix, blocks = find_blocks(model)
    handles = []
    if lazy_blocks(model) is None:
        for block in blocks:
            handles.append(block.register_forward_pre_hook(lambda module, args: module.to(device)))
            handles.append(block.register_forward_hook(lambda module, args, out: module.to(home), always_call=True))
    move_outside(model, prefix, device)
    try:
        yield
    finally:
        move_outside(model, prefix, home)
        for h in handles:
            h.remove()
