"""Padded calibration: encoders calibrate on one text per sample (``text_samples``), padding is masked in
attention and left out of every statistic, so neither its amount, its token ids nor the batching change the cut."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import tiny_model
from hf_subprune import prune
from hf_subprune.calibration import CalibrationError, check_attention_mask, fingerprint, text_samples
from hf_subprune.synthetic import SyntheticError

WORDS = [f"w{i}" for i in range(120)]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]")


def _texts(count: int, seed: int = 0, longest: int = 12) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, longest, (count,), generator=gen).tolist()
    return [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (n,), generator=gen).tolist()) for n in lengths]


def _padded(count: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded samples of 3 to 16 random tokens (ids 4 and up), and their mask."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 17, (count,), generator=gen)
    ids = torch.randint(4, 128, (count, 16), generator=gen)
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def test_one_text_per_sample_wrapped_and_right_padded(tokenizer):
    texts = _texts(9)
    ids, mask = text_samples(texts, tokenizer, 9, 64)
    assert ids.shape == mask.shape and ids.shape[1] == max(len(t.split()) for t in texts) + 2
    for row, m, text in zip(ids, mask, texts):  # all nine drawn, in their order
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
        assert row[0] == tokenizer.cls_token_id and row[n - 1] == tokenizer.sep_token_id
        assert tokenizer.decode(row[1 : n - 1]) == text
        assert (row[n:] == tokenizer.pad_token_id).all()


def test_long_texts_give_windows_and_draws_are_seeded(tokenizer):
    long = " ".join(WORDS[:50])  # 50 tokens: windows of 14 -> 4 pieces (14, 14, 14, 8)
    ids, mask = text_samples([long, "w1 w2"], tokenizer, 5, 16)
    assert mask.sum(1).tolist() == [16, 16, 16, 10, 4]
    drawn, _ = text_samples(_texts(30), tokenizer, 6, 16, seed=3)
    assert torch.equal(drawn, text_samples(_texts(30), tokenizer, 6, 16, seed=3)[0])
    assert not torch.equal(drawn, text_samples(_texts(30), tokenizer, 6, 16, seed=4)[0])
    with pytest.raises(CalibrationError, match="give 3 samples.*4 were asked for"):
        text_samples(_texts(3), tokenizer, 4, 16)
    with pytest.raises(CalibrationError, match="empty"):
        text_samples(["", "  "], tokenizer, 1, 16)


@pytest.mark.parametrize("mask, message", [
    (torch.ones(2, 5), "shape"),
    (torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]), "first position"),
    (torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]]), "padding before real tokens"),
    (torch.tensor([[1, 2, 1, 0], [1, 1, 1, 1]]), "0 .padding. and 1"),
])
def test_bad_masks_are_refused(mask, message):
    with pytest.raises(CalibrationError, match=message):
        check_attention_mask(torch.zeros(2, 4, dtype=torch.long), mask)
    assert check_attention_mask(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4)) is None


def test_prune_refuses_a_bad_mask_and_changes_nothing():
    model = tiny_model("bert")
    before = copy.deepcopy(model.state_dict())
    ids, mask = _padded()
    with pytest.raises(CalibrationError, match="pad on the right"):
        prune(model, input_ids=ids, attention_mask=mask.flip(1), sparsity=0.3, progress=False)
    with pytest.raises(ValueError, match="attention_mask goes with input_ids"):
        prune(model, attention_mask=mask, sparsity=0.3, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("method", ["greedy", "flap"])
def test_padding_changes_nothing(model_type, method, single_thread):
    """More padding, other pad ids and another batching give the same pruned weights (up to rounding); dropping
    the mask (padding read as text) does not: the test can fail."""
    ids, mask = _padded()
    settings = dict(sparsity=0.4, num_samples=len(ids), seq_len=ids.shape[1], method=method, progress=False)
    if model_type == "llama":
        settings["synthetic_samples"] = 0
    reference = tiny_model(model_type)
    prune(reference, input_ids=ids, attention_mask=mask, batch_size=4, **settings)
    wider = torch.cat([ids, torch.randint(4, 128, (len(ids), 7))], 1)
    wider_mask = torch.cat([mask, torch.zeros(len(ids), 7, dtype=torch.long)], 1)
    wider = wider.masked_fill(wider_mask == 0, 5)  # pad ids that are real tokens elsewhere
    other = tiny_model(model_type)
    prune(other, input_ids=wider, attention_mask=wider_mask, batch_size=3, **{**settings, "seq_len": 23})
    unmasked = tiny_model(model_type)
    prune(unmasked, input_ids=ids, batch_size=4, **settings)
    expected = reference.state_dict()
    assert other.state_dict().keys() == expected.keys()
    for name, value in other.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(v.shape != expected[k].shape or not torch.allclose(v, expected[k], rtol=1e-3, atol=1e-4)
               for k, v in unmasked.state_dict().items())


def test_encoders_calibrate_from_text_one_per_sample(tokenizer, tmp_path):
    texts = _texts(12, seed=1)
    model = tiny_model("bert")
    result = prune(model, tokenizer, texts, sparsity=0.3, num_samples=8, seq_len=32, progress=False)
    ids, mask = text_samples(texts, tokenizer, 8, 32, seed=result.config.seed)
    calibration = result.calibration
    assert calibration["padded"] and calibration["tokens"] == int(mask.sum()) < ids.numel()
    assert calibration["fingerprint"] == fingerprint(ids, mask) != fingerprint(ids)
    assert torch.equal(result.attention_mask, mask)
    out = result.save(tmp_path / "pruned")
    from hf_subprune.outputs.export import load_calibration

    stored_ids, stored_mask = load_calibration(out)
    assert torch.equal(stored_ids, ids) and torch.equal(stored_mask, mask)
    assert json.loads((out / "subprune_report.json").read_text())["calibration"]["tokens"] == int(mask.sum())
    assert f"8 texts of up to {ids.shape[1]} tokens, one per sample, {int(mask.sum())} tokens" in (
        out / "README.md").read_text()


def test_padded_samples_are_not_continued_by_the_model():
    ids, mask = _padded(4)
    model = tiny_model("llama")
    with pytest.raises(SyntheticError, match="padded"):
        prune(model, input_ids=ids, attention_mask=mask, sparsity=0.3, synthetic_samples=4, progress=False)
    result = prune(model, input_ids=ids, attention_mask=mask, sparsity=0.3, progress=False)
    assert result.calibration["synthetic_samples"] == 0 and result.calibration["num_samples"] == 4
