"""Checks of a run against the machine and the model, made before calibration so that a bad request fails in
seconds with what to change, not after minutes of work with a stack trace."""

from __future__ import annotations

from typing import Any

import torch

from .adapters import get_adapter

__all__ = ["check_device", "check_config", "check_run", "check_model", "max_positions"]

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
MIN_SEQ_LEN = 2


def check_device(device: str | None, flag: str = "--device") -> None:
    """Refuse a device string torch cannot parse, or a device this machine does not have."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N (N the GPU index) or mps "
                         f"({flag})") from None
    if parsed.type not in DEVICE_TYPES:
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda, cuda:N or mps ({flag})")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: no CUDA device is visible on this machine (torch "
                             f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use {flag} cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{flag} {device}: only {count} CUDA device(s) are visible (cuda:0 to "
                             f"cuda:{count - 1}); use one of those, or check CUDA_VISIBLE_DEVICES")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device}: MPS (Apple GPU) is not available on this machine; use {flag} cpu")
    if parsed.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ValueError(f"{flag} {device}: no XPU device is visible on this machine; use {flag} cpu")


def check_config(config: Any) -> None:
    """What can be checked without the model: the devices exist and a calibration window is long enough."""
    check_device(config.device)
    check_device(config.offload_device, flag="offload_device")
    _check_seq_len(config.seq_len)


def _check_seq_len(seq_len: int) -> None:
    if seq_len < MIN_SEQ_LEN:
        raise ValueError(f"seq_len (--seq-len) must be at least {MIN_SEQ_LEN} tokens, got {seq_len}: "
                         "a calibration window needs tokens that attend to others; use e.g. --seq-len 512")


def max_positions(model_config: Any) -> int | None:
    """The longest input the model's position embeddings cover, or None where it does not say (rotary models
    still name one: longer inputs run but are out of distribution)."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            if get_adapter(model_config).positions_after_padding:  # RoBERTa: positions start after padding
                value -= (getattr(model_config, "pad_token_id", None) or 0) + 1
            return value
    return None


def check_run(model_config: Any, config: Any, input_ids: torch.Tensor | None = None) -> None:
    """Before calibration: the devices exist, and the calibration windows (``input_ids`` when given, else
    ``config.seq_len``) fit in the model's positions."""
    check_device(config.device)
    check_device(config.offload_device, flag="offload_device")
    seq_len = int(input_ids.shape[-1]) if input_ids is not None else int(config.seq_len)
    _check_seq_len(seq_len)
    encoder = not get_adapter(model_config).causal_lm
    if input_ids is None and encoder and seq_len < 3:
        raise ValueError(f"seq_len (--seq-len) {seq_len} leaves no text token for an encoder (its windows are "
                         "wrapped in [CLS] ... [SEP]); use at least 3")
    limit = max_positions(model_config)
    if limit is not None and seq_len > limit:
        what = "the calibration token blocks are" if input_ids is not None else "seq_len (--seq-len) is"
        raise ValueError(f"{what} {seq_len} tokens long, but this {model_config.model_type} model takes at most "
                         f"{limit} positions; use --seq-len {limit} or less")


def check_model(model: Any) -> None:
    """Refuse a model whose weights are not all in memory (``device_map`` with offloading to disk or meta): the
    pipeline moves one block at a time to the compute device itself and needs real tensors to cut and save. A
    lazy model (``pipeline.lazy``) passes: its blocks' meta weights are on disk, and its block source (the
    attribute named by ``pipeline.lazy.LAZY_ATTRIBUTE``; checks import no pipeline module) streams them."""
    source = getattr(model, "_hf_subprune_blocks", None)
    offloaded = sorted({name.rsplit(".", 1)[0] for name, p in model.named_parameters()
                        if p.device.type == "meta" and not (source is not None and source.owns(name))})
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} modules of the model have no weights in memory (offloaded by a device_map, e.g. "
            f"{offloaded[0]}): load it without device_map (on the CPU) and pass device='cuda' (CLI: --device "
            "cuda); hf_subprune moves one block at a time to the GPU itself")
