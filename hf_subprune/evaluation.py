"""Quality measures: perplexity on fixed windows, classification accuracy, and embedding similarity for
encoders."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["perplexity", "PerplexityEvaluator", "accuracy", "AccuracyEvaluator", "mean_pooled_embeddings",
           "embedding_cosine", "BUILTIN_HELDOUT"]

BUILTIN_HELDOUT = "builtin held-out half (pydoc topics)"
"""The name a protocol gives ``calibration.builtin_text("heldout")``: a report naming it can be measured again."""


NLL_ROWS = 64
"""Token rows of logits that ``_negative_log_likelihood`` converts to float32 at a time (3 MB at a 49k vocabulary:
cache-sized, where the whole batch in float32 was 400 MB and 1.6x slower on one core)."""


def _negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``sum_t -log softmax(logits_t)[target_t]`` (float64), as ``logsumexp - target logit`` in float32 by chunks
    of ``NLL_ROWS`` tokens: the same sum as ``F.cross_entropy(..., reduction="sum")`` in float32, 7x faster on the
    CPU for a 49k vocabulary (it skips the full log-softmax and the copy of the sliced logits)."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row_logits, row_targets in zip(logits.reshape(-1, *logits.shape[-2:]), targets.reshape(-1, targets.shape[-1])):
        for lo in range(0, row_targets.shape[0], NLL_ROWS):
            chunk = row_logits[lo : lo + NLL_ROWS].float()
            picked = chunk.gather(-1, row_targets[lo : lo + NLL_ROWS, None]).squeeze(-1)
            total += (torch.logsumexp(chunk, -1) - picked).double().sum()
    return total


@torch.no_grad()
def perplexity(model, tokenizer, text: str, *, window: int = 512, max_tokens: int | None = None,
               batch_size: int = 4) -> dict:
    """Perplexity over non-overlapping windows of ``window`` tokens (each window scored on its own, so
    the first token of a window has no context: the usual "stride = window" protocol).

    Returns ``{"perplexity", "window", "tokens", "windows"}``: the figures to state next to the number.
    """
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {window}: give a "
                         "longer text, a smaller window (--window / --eval-window) or a larger --max-tokens")
    windows = ids[: n * window].view(n, window)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            total += float(_negative_log_likelihood(logits, batch[:, 1:]))
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return {"perplexity": math.exp(total / count), "window": window, "tokens": int(n * window), "windows": n}


@torch.no_grad()
def mean_pooled_embeddings(model, tokenizer, sentences: list[str], *, batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM: mean over real tokens."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(out)


def embedding_cosine(reference: torch.Tensor, pruned: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows."""
    return float(F.cosine_similarity(reference, pruned, dim=-1).mean())


@dataclass
class PerplexityEvaluator:
    """Perplexity on one text with a fixed protocol: an ``evaluate=`` for ``prune`` (measured before and after)."""

    tokenizer: object
    text: str
    name: str
    window: int = 512
    max_tokens: int | None = 16384

    def __call__(self, model) -> dict:
        out = perplexity(model, self.tokenizer, self.text, window=self.window, max_tokens=self.max_tokens)
        return {"perplexity": out["perplexity"],
                "perplexity_protocol": {"text": self.name, "window": out["window"], "tokens": out["tokens"]}}


@torch.no_grad()
def accuracy(model, tokenizer, texts: list[str], labels: list[int], *, batch_size: int = 32,
             max_length: int = 128) -> dict:
    """Accuracy of a sequence-classification model: the arg-max class against ``labels``, texts truncated to
    ``max_length`` tokens. Returns ``{"accuracy", "examples", "max_length"}``."""
    classes = model.config.num_labels
    if max(labels) >= classes or min(labels) < 0:
        raise ValueError(f"the labels run from {min(labels)} to {max(labels)}, but the model has {classes} classes "
                         f"(0 to {classes - 1})")
    device = next(model.parameters()).device
    correct = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            predicted = model(**enc).logits.argmax(-1).cpu()
            correct += int((predicted == torch.tensor(labels[start : start + batch_size])).sum())
    finally:
        model.train(was_training)
    return {"accuracy": correct / len(texts), "examples": len(texts), "max_length": max_length}


@dataclass
class AccuracyEvaluator:
    """Accuracy on one labelled set with a fixed protocol: an ``evaluate=`` for ``prune`` and ``recover``."""

    tokenizer: object
    texts: list[str]
    labels: list[int]
    name: str
    max_length: int = 128

    def __call__(self, model) -> dict:
        out = accuracy(model, self.tokenizer, self.texts, self.labels, max_length=self.max_length)
        return {"accuracy": out["accuracy"],
                "accuracy_protocol": {"data": self.name, "examples": out["examples"], "max_length": self.max_length}}
