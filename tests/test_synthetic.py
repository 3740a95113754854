"""Synthetic calibration: sequences the dense model writes from prompts of the real ones (``synthetic.py``)."""

from __future__ import annotations

import pytest
import torch

from conftest import calibration_ids, tiny_model
from hf_subprune import PruneConfig, prune
from hf_subprune.calibration import fingerprint
from hf_subprune.synthetic import (AUTO_BELOW_TOKENS, AUTO_COUNT, MIN_PROMPT_TOKENS, SyntheticError, _prompts,
                                   prompt_tokens, self_generated, synthetic_count)

PROMPT = MIN_PROMPT_TOKENS


def test_prompts_take_every_row_in_turn_at_spread_offsets():
    real = torch.arange(3 * 40).view(3, 40)
    prompts = _prompts(real, 7, PROMPT)
    assert prompts.shape == (7, PROMPT)
    for i, prompt in enumerate(prompts):
        row = real[i % 3]
        start = int(prompt[0] - row[0])
        assert torch.equal(prompt, row[start : start + PROMPT])
    starts = [int(p[0]) % 40 for p in prompts[::3]]  # the first row's prompts: distinct offsets along it
    assert len(set(starts)) == len(starts) and starts[0] == 0


def test_generated_sequences_continue_their_prompts_and_depend_only_on_the_seed():
    model = tiny_model("llama")
    real = calibration_ids(2, 24)
    a = self_generated(model, real, 5, seed=3)
    b = self_generated(model, real, 5, seed=3)
    c = self_generated(model, real, 5, seed=4)
    assert a.shape == (5, 24) and a.dtype == real.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :PROMPT], _prompts(real, 5, PROMPT))  # 24 tokens: prompts of the shortest length
    assert int(a.max()) < model.config.vocab_size


def test_prompts_are_an_eighth_of_the_sequence_and_never_shorter_than_the_minimum():
    assert prompt_tokens(512) == 64 and prompt_tokens(2048) == 256
    assert prompt_tokens(24) == prompt_tokens(64) == MIN_PROMPT_TOKENS
    long = calibration_ids(2, 128)
    written = self_generated(tiny_model("llama"), long, 3, seed=0)
    assert torch.equal(written[:, :16], _prompts(long, 3, 16))


def test_automatic_count_adds_sequences_to_short_calibrations_of_causal_lms_in_memory_only():
    assert synthetic_count(None, 3, seq_len=64, generative=True, lazy=False) == (AUTO_COUNT, None)
    seq_len = AUTO_BELOW_TOKENS // 16  # 16 sequences reach the threshold
    assert synthetic_count(None, 15, seq_len=seq_len, generative=True, lazy=False) == (AUTO_COUNT, None)
    assert synthetic_count(None, 16, seq_len=seq_len, generative=True, lazy=False) == (0, None)
    assert synthetic_count(None, 1, seq_len=AUTO_BELOW_TOKENS, generative=True, lazy=False) == (0, None)
    assert synthetic_count(None, 3, seq_len=64, generative=False, lazy=False) == (0, None)
    assert synthetic_count(None, 3, seq_len=PROMPT, generative=True, lazy=False) == (0, None)
    count, note = synthetic_count(None, 3, seq_len=64, generative=True, lazy=True)
    assert count == 0 and "lazily" in note
    assert synthetic_count(5, 100, seq_len=64, generative=True, lazy=False) == (5, None)


@pytest.mark.parametrize("kwargs, words", [
    (dict(generative=False, lazy=False, seq_len=64), "cannot generate"),
    (dict(generative=True, lazy=True, seq_len=64), "lazy=False"),
    (dict(generative=True, lazy=False, seq_len=PROMPT), "seq_len"),
])
def test_asking_for_synthetic_samples_where_none_can_be_made_says_why(kwargs, words):
    with pytest.raises(SyntheticError, match=words):
        synthetic_count(2, 3, **kwargs)


def test_negative_count_is_refused():
    with pytest.raises(ValueError, match="synthetic_samples"):
        PruneConfig(sparsity=0.2, synthetic_samples=-1)


def test_prune_records_the_synthetic_samples_and_batch_size_does_not_matter(single_thread):
    real = calibration_ids(3, 20)
    results = []
    for batch_size in (1, 8):
        model = tiny_model("llama")
        results.append(prune(model, input_ids=real, sparsity=0.3, num_samples=3, seq_len=20,
                             batch_size=batch_size, progress=False))
    first, second = results
    cal = first.calibration
    assert (cal["real_samples"], cal["synthetic_samples"], cal["num_samples"]) == (3, AUTO_COUNT, 3 + AUTO_COUNT)
    assert cal["tokens"] == (3 + AUTO_COUNT) * 20 and cal["synthetic"]["prompt_tokens"] == prompt_tokens(20)
    assert torch.equal(first.input_ids[:3], real)
    assert cal["fingerprint"] == second.calibration["fingerprint"] == fingerprint(first.input_ids)
    assert any("synthetic calibration" in note for note in first.notes)
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_synthetic_samples_change_the_cut_and_zero_turns_them_off(single_thread):
    real = calibration_ids(2, 20)
    off = prune(tiny_model("llama"), input_ids=real, sparsity=0.3, num_samples=2, seq_len=20,
                synthetic_samples=0, progress=False)
    assert off.calibration["synthetic_samples"] == 0 and off.calibration["num_samples"] == 2
    on = prune(tiny_model("llama"), input_ids=real, sparsity=0.3, num_samples=2, seq_len=20, progress=False)
    assert on.calibration["synthetic_samples"] == AUTO_COUNT
    assert any(not torch.equal(a, b) for a, b in zip(off.model.parameters(), on.model.parameters()))


def test_encoders_get_none_and_refuse_an_explicit_count(single_thread):
    ids = calibration_ids(2, 20)
    result = prune(tiny_model("bert"), input_ids=ids, sparsity=0.3, num_samples=2, seq_len=20, progress=False)
    assert result.calibration["synthetic_samples"] == 0
    model = tiny_model("bert")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(SyntheticError, match="cannot generate"):
        prune(model, input_ids=ids, sparsity=0.3, num_samples=2, seq_len=20, synthetic_samples=4, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("method", ["flap", "wanda-sp", "layer-greedy-fs"])
def test_published_baselines_calibrate_on_the_given_samples_only(method, single_thread):
    """A peer as its own code runs it: the model writes nothing for it, whatever synthetic_samples says."""
    result = prune(tiny_model("llama"), input_ids=calibration_ids(2, 20), sparsity=0.3, method=method,
                   num_samples=2, seq_len=20, progress=False)
    assert result.calibration["synthetic_samples"] == 0 and result.calibration["num_samples"] == 2
    assert any("synthetic_samples=0" in note for note in result.notes)
