"""Saving a lazy model (``pipeline.lazy``) as ``save_pretrained`` would, with one block in memory at a time.

``save_pretrained`` needs every tensor in memory. Here each safetensors file's header is written from the
tensors' shapes and dtypes (the meta blocks carry the pruned ones), then the tensors are appended in state-dict
order, each block materialised from its spill file (or the input checkpoint) while its tensors are written and
released after. The files are the standard ones: ``model.safetensors``, or ``model-0000i-of-0000N.safetensors``
with ``model.safetensors.index.json`` once the weights pass ``max_shard_size``; the keys are those
``save_pretrained`` writes (tied weights once, the same ones), with metadata ``{"format": "pt"}``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from ..pipeline.capture import find_blocks
from ..pipeline.lazy import INDEX_FILE, SAFETENSORS_DTYPES, SINGLE_FILE, lazy_blocks

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "save_lazy"]

DEFAULT_MAX_SHARD_SIZE = 50 * 10**9
"""Bytes per weights file: transformers' ``save_pretrained`` default ("50GB")."""

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _shards(state: dict[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    """Keys in state-dict order, cut into files of at most ``max_shard_size`` bytes (a larger tensor alone): each
    block's tensors stay together in order, so that each block is read once."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        if shards[-1] and size + _nbytes(tensor) > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += _nbytes(tensor)
    return shards


def _write_header(f: BinaryIO, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """The safetensors header: 8 bytes of length, then JSON (names, dtypes, shapes, offsets), padded with spaces
    so that the data starts 8-byte aligned, as the safetensors writer pads it."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, tensor in tensors:
        header[key] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + _nbytes(tensor)]}
        offset += _nbytes(tensor)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(struct.pack("<Q", len(text)))
    f.write(text)


def _write_tensor(f: BinaryIO, key: str, tensor: torch.Tensor, planned: torch.Tensor) -> None:
    if tensor.shape != planned.shape or tensor.dtype != planned.dtype:
        raise RuntimeError(f"{key} is {tuple(tensor.shape)} {tensor.dtype} in memory, but the model's skeleton says "
                           f"{tuple(planned.shape)} {planned.dtype}")
    f.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)


@torch.no_grad()
def save_lazy(model: nn.Module, folder: Path, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write a lazy model's weights, config and generation config into ``folder`` as ``save_pretrained`` does
    (module docstring), holding at most one block's tensors besides those outside the blocks."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    source = lazy_blocks(model)
    prefix, blocks = find_blocks(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()  # the blocks' entries on meta: shapes and dtypes only
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    shards = _shards(state, max_shard_size)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    current: tuple[int, dict[str, torch.Tensor]] | None = None
    try:
        for name, keys in zip(names, shards):
            with open(folder / name, "wb") as f:
                _write_header(f, [(key, state[key]) for key in keys])
                for key in keys:
                    tensor = state[key]
                    if source.owns(key):
                        index, local = key[len(prefix) + 1:].split(".", 1)
                        if current is None or current[0] != int(index):
                            if current is not None:
                                source.release(current[0], blocks[current[0]], store=False)
                            source.materialize(int(index), blocks[int(index)], "cpu")
                            current = (int(index), blocks[int(index)].state_dict())
                        tensor = current[1][local]
                    _write_tensor(f, key, tensor, state[key])
    finally:
        if current is not None:
            source.release(current[0], blocks[current[0]], store=False)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": model.num_parameters(),
                              "total_size": sum(_nbytes(t) for t in state.values())},
                 "weight_map": {key: name for name, keys in zip(names, shards) for key in keys}}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
