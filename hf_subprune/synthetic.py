"""Calibration sequences written by the model itself, added to a few real ones.

With a handful of calibration sequences the statistics see one narrow slice of text: the greedy and the refit fit
that slice's correlations, and the pruned model then loses more on other text. A causal LM can write more text from
its own distribution at no data cost: short prompts taken from the real samples keep the continuations near the
calibration's domain, and nucleus sampling at temperature 1 lets them wander the way the model's text does. The
dense model writes them before anything is cut, so they describe the function being preserved.

Measured on SmolLM2-135M calibrated on WikiText-2 (benchmarks/results/data_efficiency_smollm2.md): at 20% with one
sequence of 512 tokens, 7 written by the model lowered perplexity on every text and seed (0-2), WikiText-2 test
40.3 -> 37.4, pydoc 28.2 -> 23.8, Python source 24.2 -> 18.6, SST-2 139.6 -> 106.0 (geometric means); at 50% (seed
0) WikiText-2 rose 4.5% and the other texts fell 1.6-2x. With two real sequences (20%, seed 0) it depended on the
draw: 7 more won on every text (36.2 -> 35.1, 26.0 -> 25.1, 18.8 -> 18.6, 121.2 -> 97.6), 6 more lost 3% on
WikiText-2 and 1% on Python source; with four, 7 more were 7-11% better on the other texts and 2.7% worse on
WikiText-2. Hence the default: top a calibration of fewer than ``AUTO_BELOW_TOKENS`` tokens (one sequence of 512)
up to ``AUTO_TARGET`` sequences; ``synthetic_samples=N`` asks for N at any size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PROMPT_TOKENS", "TOP_P", "AUTO_TARGET", "AUTO_BELOW_TOKENS", "SyntheticError", "can_generate",
           "synthetic_count", "self_generated"]

PROMPT_TOKENS = 8  # tokens of real text each synthetic sequence starts from
TOP_P = 0.95  # nucleus sampling, temperature 1
AUTO_TARGET = 8  # synthetic_samples=None tops the calibration up to this many sequences ...
AUTO_BELOW_TOKENS = 1024  # ... when it holds fewer real tokens than this (see the module's docstring)
GENERATION_BATCH = 8  # sequences generated at once: fixed, so the tokens do not depend on config.batch_size


class SyntheticError(ValueError):
    """Synthetic calibration was asked for where it cannot be made."""


def can_generate(model: nn.Module) -> bool:
    """A causal LM with ``generate``: encoders and classifiers cannot write text."""
    return callable(getattr(model, "generate", None)) and getattr(model, "can_generate", lambda: False)()


def synthetic_count(asked: int | None, real: int, *, seq_len: int, generative: bool,
                    lazy: bool) -> tuple[int, str | None]:
    """How many sequences to generate, and a note when the automatic choice made none for a reason the user may
    want to know. ``asked`` None: top up to ``AUTO_TARGET`` sequences when the real ones hold fewer than
    ``AUTO_BELOW_TOKENS`` tokens and the model can write them in memory."""
    if asked is not None:
        if asked > 0 and seq_len <= PROMPT_TOKENS:
            raise SyntheticError(f"synthetic_samples={asked}: the model continues prompts of {PROMPT_TOKENS} tokens, "
                                 f"so seq_len must be longer than that (it is {seq_len}); or set synthetic_samples=0")
        if asked > 0 and not generative:
            raise SyntheticError(f"synthetic_samples={asked}: this model cannot generate text (it is not a causal "
                                 "language model); set synthetic_samples=0")
        if asked > 0 and lazy:
            raise SyntheticError(f"synthetic_samples={asked} needs the whole model in memory: a lazily loaded model "
                                 "reads every block from disk for every generated token. Load it whole (lazy=False, "
                                 "CLI --no-lazy) or set synthetic_samples=0")
        return asked, None
    wanted = max(0, AUTO_TARGET - real) if real * seq_len < AUTO_BELOW_TOKENS else 0
    if wanted == 0 or not generative or seq_len <= PROMPT_TOKENS:
        return 0, None
    if lazy:
        return 0, (f"no synthetic calibration: {real} calibration samples are few, but the model is loaded lazily "
                   f"(load it whole to let it write {wanted} more, or give more samples)")
    return wanted, None


def _prompts(real: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` prompts of ``PROMPT_TOKENS`` tokens: the real rows in turn, at offsets spread along each row."""
    rows, length = real.shape
    span = max(1, length - PROMPT_TOKENS)
    per_row = math.ceil(count / rows)
    picks = []
    for i in range(count):
        row, k = i % rows, i // rows
        offset = (k * span) // per_row
        picks.append(real[row, offset : offset + PROMPT_TOKENS])
    return torch.stack(picks)


@torch.no_grad()
def self_generated(model: nn.Module, real: torch.Tensor, count: int, *, seed: int,
                   pad_token_id: int | None = None) -> torch.Tensor:
    """``count`` sequences as long as the real rows, each a real prompt continued by the model (sampled, seeded
    per batch of ``GENERATION_BATCH``), on the device the model is on. The prompts are all the same length, so no
    padding is needed; end-of-sequence tokens are not allowed to stop a sequence early."""
    device = next(model.parameters()).device
    prompts = _prompts(real.cpu(), count)
    new_tokens = real.shape[1] - PROMPT_TOKENS
    was_training = model.training
    model.eval()
    out = []
    try:
        for index, start in enumerate(range(0, count, GENERATION_BATCH)):
            batch = prompts[start : start + GENERATION_BATCH].to(device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed * 100_003 + index)
                ids = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, top_p=TOP_P,
                                     top_k=0, temperature=1.0, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, pad_token_id=pad_token_id)
            out.append(ids[:, : real.shape[1]].cpu())
    finally:
        model.train(was_training)
    generated = torch.cat(out)
    if generated.shape[1] != real.shape[1]:
        raise SyntheticError(f"the model wrote {generated.shape[1]} tokens per sequence, not {real.shape[1]}")
    return generated.to(real.dtype)
