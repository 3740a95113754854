"""Calibration sequences written by the model itself, added to a few real ones.

With a handful of calibration sequences the statistics see one narrow slice of text: the greedy and the refit fit
that slice's correlations, and the pruned model then loses more on other text. A causal LM can write more text from
its own distribution at no data cost: short prompts taken from the real samples keep the continuations near the
calibration's domain, and nucleus sampling at temperature 1 lets them wander the way the model's text does. The
dense model writes them before anything is cut, so they describe the function being preserved.

It is a trade measured on SmolLM2 (README, "Calibration the model writes itself"; results in
benchmarks/results/data_efficiency_smollm2.md and ood_diagnosis.md): with one real sequence of 512 tokens the written
ones helped on every text at 20%; with two, on every text on average over three draws (one draw lost 3% in the
calibration's own domain); from four on they cost a little there for more out of it. Hence the default: top a
calibration of fewer than ``AUTO_BELOW_TOKENS`` tokens up to ``AUTO_TARGET`` sequences; ``synthetic_samples=N``
asks for N at any size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PROMPT_TOKENS", "TOP_P", "AUTO_TARGET", "AUTO_BELOW_TOKENS", "SyntheticError", "synthetic_count",
           "self_generated"]

PROMPT_TOKENS = 8  # tokens of real text each synthetic sequence starts from
TOP_P = 0.95  # nucleus sampling, temperature 1
AUTO_TARGET = 8  # synthetic_samples=None tops the calibration up to this many sequences ...
AUTO_BELOW_TOKENS = 2048  # ... when it holds fewer real tokens than this (see the module's docstring)
GENERATION_BATCH = 8  # sequences generated at once: fixed, so the tokens do not depend on config.batch_size


class SyntheticError(ValueError):
    """Synthetic calibration was asked for where it cannot be made."""


def synthetic_count(asked: int | None, real: int, *, seq_len: int, generative: bool,
                    lazy: bool, padded: bool = False, option: str = "synthetic_samples") -> tuple[int, str | None]:
    """How many sequences to generate, and a note when the automatic choice made none for a reason the user may
    want to know. ``asked`` None: top up to ``AUTO_TARGET`` sequences when the real ones hold fewer than
    ``AUTO_BELOW_TOKENS`` tokens and the model can write them in memory. Padded samples (an attention mask)
    are not continued: their prompts would run into the padding. ``option``: the setting the errors name
    (recovery's ``teacher_samples`` asks for sequences the same way)."""
    if padded:
        if asked:
            raise SyntheticError(f"{option}={asked}: the calibration samples are padded (attention_mask), "
                                 "and the model continues unpadded ones only; give full-length samples or set "
                                 f"{option}=0")
        return 0, None
    if asked is not None:
        if asked and seq_len <= PROMPT_TOKENS:
            raise SyntheticError(f"{option}={asked}: the model continues prompts of {PROMPT_TOKENS} tokens, "
                                 f"so seq_len must be longer than that (it is {seq_len}); or set {option}=0")
        if asked and not generative:
            raise SyntheticError(f"{option}={asked}: this model cannot generate text (it is not a causal "
                                 f"language model); set {option}=0")
        if asked and lazy:
            raise SyntheticError(f"{option}={asked} needs the whole model in memory: a lazily loaded model "
                                 "reads every block from disk for every generated token. Load it whole (lazy=False, "
                                 f"CLI --no-lazy) or set {option}=0")
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
def self_generated(model: nn.Module, real: torch.Tensor, count: int, *, seed: int) -> torch.Tensor:
    """``count`` sequences as long as the real rows, each a real prompt continued by the model (sampled, seeded
    per batch of ``GENERATION_BATCH``), on the device the model is on. The prompts are all the same length, so no
    padding is needed; end-of-sequence tokens are not allowed to stop a sequence early."""
    device = next(model.parameters()).device
    pad_token_id = model.generation_config.pad_token_id  # never used (no padding); set to keep generate quiet
    if pad_token_id is None:
        eos = model.generation_config.eos_token_id
        pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
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
