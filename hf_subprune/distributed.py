"""Several processes, one result: which share of the calibration samples this process takes, and the sums
over processes. Everything goes through accelerate's ``PartialState``, so a script that calls ``prune()``
under ``accelerate launch`` shards and reduces without creating an ``Accelerator`` itself."""

from __future__ import annotations

import os

import torch

__all__ = ["process_state", "reduce_sum", "compute_device", "finish"]


def _launched() -> bool:
    """Started by ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _state(device: str | torch.device | None = None):
    """accelerate's process state, created on first use in a multi-process launch (None in a single process
    that nobody set up). On machines without CUDA, or when the run's device is the CPU, the state is created with
    ``cpu=True``: without it every CPU process would be a world of its own and the sums would do nothing."""
    from accelerate.state import PartialState

    if PartialState._shared_state:
        return PartialState()
    if not _launched():
        return None
    cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
    return PartialState(cpu=cpu)


def process_state(device: str | torch.device | None = None) -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` outside a distributed launch."""
    state = _state(device)
    if state is None:
        return 0, 1
    return state.process_index, state.num_processes


def reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the processes, in place (nothing to do in a single process)."""
    state = _state()
    if state is None or state.num_processes == 1:
        return
    from accelerate.utils import reduce

    for tensor in tensors:
        tensor.copy_(reduce(tensor, reduction="sum"))


def compute_device(asked: str | None = None) -> torch.device:
    """The device blocks run on: the one asked for, else this process's device in a multi-process launch
    (``cuda:<local rank>``), else cuda when available, else the CPU."""
    if asked:
        return torch.device(asked)
    state = _state()
    if state is not None and state.num_processes > 1:
        return state.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def finish() -> None:
    """End of a multi-process run: wait for every process (e.g. until the main one has saved), then close the
    process group so that the launcher sees a clean exit."""
    state = _state()
    if state is None or state.num_processes == 1:
        return
    state.wait_for_everyone()
    state.destroy_process_group()
