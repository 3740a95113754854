"""Calibration sequences written by the model itself, added to a few real ones.

With a handful of calibration sequences the statistics see one narrow slice of text: the greedy and the refit fit
that slice's correlations, and the pruned model then loses more on other text. A causal LM can write more text from
its own distribution at no data cost: short prompts taken from the real samples keep the continuations near the
calibration's domain, and nucleus sampling at temperature 1 lets them wander the way the model's text does. The
dense model writes them before anything is cut, so they describe the function being preserved.

The prompt's length sets how near: the continuations of 8-token prompts wandered furthest (best on other
domains, worst in the calibration's own), those of half-sequence prompts stayed in it; an eighth of the sequence
(64 of 512 tokens) gave the best of both. Measured on SmolLM2 at 20% (README, "Calibration the model writes
itself"; benchmarks/results/ood_diagnosis.md): with 2, 4 and 8 real sequences of 512 tokens, 6-8 written ones from
64-token prompts lowered the perplexity on WikiText-2, pydoc, Python source and SST-2 against none (n = 4, 8) and in
the calibration's domain by 5% against 8-token prompts (n = 2). Hence the default: a calibration of fewer than
``AUTO_BELOW_TOKENS`` tokens gets ``AUTO_COUNT`` written sequences; ``synthetic_samples=N`` asks for N at any size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MIN_PROMPT_TOKENS", "PROMPT_FRACTION", "prompt_tokens", "TOP_P", "AUTO_COUNT", "AUTO_BELOW_TOKENS",
           "SyntheticError", "NonFiniteOutputError", "synthetic_count", "self_generated"]

MIN_PROMPT_TOKENS = 8  # the shortest prompt of real text a synthetic sequence starts from
PROMPT_FRACTION = 8  # the calibration's prompts are 1 / PROMPT_FRACTION of the sequence (64 of 512 tokens)
TOP_P = 0.95  # nucleus sampling, temperature 1
AUTO_COUNT = 8  # synthetic_samples=None adds this many sequences ...
AUTO_BELOW_TOKENS = 8192  # ... to a calibration of fewer real tokens than this (see the module's docstring)
GENERATION_BATCH = 8  # sequences generated at once: fixed, so the tokens do not depend on config.batch_size


class SyntheticError(ValueError):
    """Synthetic calibration was asked for where it cannot be made."""


class NonFiniteOutputError(SyntheticError):
    """The model's outputs on the prompts are not finite: it cannot sample a continuation."""


def prompt_tokens(seq_len: int) -> int:
    """The prompt length of the calibration's written sequences: an eighth of the sequence, at least
    ``MIN_PROMPT_TOKENS`` (see the module's docstring for what the length trades)."""
    return max(MIN_PROMPT_TOKENS, seq_len // PROMPT_FRACTION)


def synthetic_count(asked: int | None, real: int, *, seq_len: int, generative: bool, lazy: bool,
                    padded: bool = False, option: str = "synthetic_samples",
                    prompt: int | None = None) -> tuple[int, str | None]:
    """How many sequences to generate, and a note when the automatic choice made none for a reason the user may
    want to know. ``asked`` None: ``AUTO_COUNT`` sequences when the real ones hold fewer than
    ``AUTO_BELOW_TOKENS`` tokens and the model can write them in memory. ``prompt``: the prompt length the
    sequences will continue (default ``prompt_tokens(seq_len)``). Padded samples (an attention mask)
    are not continued: their prompts would run into the padding. ``option``: the setting the errors name
    (recovery's ``teacher_samples`` asks for sequences the same way)."""
    if padded:
        if asked:
            raise SyntheticError(f"{option}={asked}: the calibration samples are padded (attention_mask), "
                                 "and the model continues unpadded ones only; give full-length samples or set "
                                 f"{option}=0")
        return 0, None
    prompt = prompt_tokens(seq_len) if prompt is None else prompt
    if asked is not None:
        if asked and seq_len <= prompt:
            raise SyntheticError(f"{option}={asked}: the model continues prompts of {prompt} tokens, "
                                 f"so seq_len must be longer than that (it is {seq_len}); or set {option}=0")
        if asked and not generative:
            raise SyntheticError(f"{option}={asked}: this model cannot generate text (it is not a causal "
                                 f"language model); set {option}=0")
        if asked and lazy:
            raise SyntheticError(f"{option}={asked} needs the whole model in memory: a lazily loaded model "
                                 "reads every block from disk for every generated token. Load it whole (lazy=False, "
                                 f"CLI --no-lazy) or set {option}=0")
        return asked, None
    wanted = AUTO_COUNT if real * seq_len < AUTO_BELOW_TOKENS else 0
    if wanted == 0 or not generative or seq_len <= prompt:
        return 0, None
    if lazy:
        return 0, (f"no synthetic calibration: {real} calibration samples are few, but the model is loaded lazily "
                   f"(load it whole to let it write {wanted} more, or give more samples)")
    return wanted, None


def _prompts(real: torch.Tensor, count: int, prompt: int) -> torch.Tensor:
    """``count`` prompts of ``prompt`` tokens: the real rows in turn, at offsets spread along each row."""
    rows, length = real.shape
    span = max(1, length - prompt)
    per_row = math.ceil(count / rows)
    picks = []
    for i in range(count):
        row, k = i % rows, i // rows
        offset = (k * span) // per_row
        picks.append(real[row, offset : offset + prompt])
    return torch.stack(picks)


@torch.no_grad()
def self_generated(model: nn.Module, real: torch.Tensor, count: int, *, seed: int,
                   prompt: int | None = None) -> torch.Tensor:
    """``count`` sequences as long as the real rows, each a real prompt of ``prompt`` tokens (default
    ``prompt_tokens`` of the rows' length) continued by the model (sampled, seeded
    per batch of ``GENERATION_BATCH``), on the device the model is on. The prompts are all the same length, so no
    padding is needed; end-of-sequence tokens are not allowed to stop a sequence early."""
    device = next(model.parameters()).device
    pad_token_id = model.generation_config.pad_token_id  # never used (no padding); set to keep generate quiet
    if pad_token_id is None:
        eos = model.generation_config.eos_token_id
        pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    prompt = prompt_tokens(real.shape[1]) if prompt is None else prompt
    prompts = _prompts(real.cpu(), count, prompt)
    new_tokens = real.shape[1] - prompt
    was_training = model.training
    model.eval()
    out = []
    try:
        # Sampling from NaN probabilities fails deep in generate(): say so here, once, on the first batch's prompts.
        if not bool(torch.isfinite(model(prompts[:GENERATION_BATCH].to(device)).logits).all()):
            raise NonFiniteOutputError("the model's next-token logits on the calibration prompts are not finite")
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
