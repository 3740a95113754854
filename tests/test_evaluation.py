"""Perplexity: the fast negative log-likelihood is the cross-entropy, and the batch size does not change it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from conftest import tiny_model
from hf_subprune.evaluation import NLL_ROWS, _negative_log_likelihood, perplexity


class _CharTokenizer:
    """One token per character (codes below 128): enough to feed a tiny model a text."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % 128 for c in text]}


def test_negative_log_likelihood_is_the_cross_entropy_sum():
    # Rows longer than the float32 chunks (NLL_ROWS), sliced as perplexity slices them (not contiguous).
    logits = (torch.randn(3, 2 * NLL_ROWS + 23, 1000, generator=torch.Generator().manual_seed(0)) * 4)[:, :-1]
    targets = torch.randint(0, 1000, logits.shape[:2], generator=torch.Generator().manual_seed(1))
    expected = F.cross_entropy(logits.double().reshape(-1, 1000), targets.reshape(-1), reduction="sum")
    assert math.isclose(float(_negative_log_likelihood(logits, targets)), float(expected), rel_tol=1e-6)
    # bf16 logits are widened before the log-sum-exp, as cross_entropy of their float32 copy would be
    half = logits.bfloat16()
    expected = F.cross_entropy(half.double().reshape(-1, 1000), targets.reshape(-1), reduction="sum")
    assert math.isclose(float(_negative_log_likelihood(half, targets)), float(expected), rel_tol=1e-6)


def test_perplexity_matches_the_direct_computation_at_any_batch_size():
    model = tiny_model("llama")
    text = "the quick brown fox jumps over the lazy dog, " * 20
    ids = torch.tensor(_CharTokenizer()(text)["input_ids"][: 5 * 32]).view(5, 32)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()
    direct = math.exp(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))))
    for batch_size in (1, 2, 5):
        out = perplexity(model, _CharTokenizer(), text, window=32, max_tokens=5 * 32, batch_size=batch_size)
        assert out["windows"] == 5 and out["tokens"] == 160
        assert math.isclose(out["perplexity"], direct, rel_tol=1e-5)
