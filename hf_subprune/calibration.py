"""Calibration data: text from anywhere, to a tensor of fixed-length token blocks.

Pruning needs unlabeled text only. The default is text that ships with Python (the pydoc topic help), so
that a run works offline with nothing downloaded.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch

__all__ = ["CalibrationError", "builtin_text", "load_texts", "token_blocks", "fingerprint", "shard"]


class CalibrationError(ValueError):
    """The calibration data cannot give what was asked for."""


def builtin_text(part: str = "calibration") -> str:
    """Python's own documentation topics. ``part`` splits it in two disjoint halves: ``"calibration"``
    (even topics) and ``"heldout"`` (odd topics), so that the demo evaluates on text it did not see."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    start = {"calibration": 0, "heldout": 1}[part]
    return "\n\n".join(topics[k] for k in keys[start::2])


def _texts_from_file(path: Path, text_field: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        key = text_field or next((k for k in ("text", "sentence", "content") if rows and k in rows[0]), None)
        if key is None:
            raise CalibrationError(f"{path}: no 'text' field in the jsonl rows; name it with text_field")
        return [str(r[key]) for r in rows]
    if suffix in (".tsv", ".csv"):
        with path.open(newline="") as f:
            rows = list(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",", quoting=csv.QUOTE_NONE))
        header = rows[0] if rows else []
        column = header.index(text_field) if text_field in header else (
            header.index("sentence") if "sentence" in header else 0
        )
        body = rows[1:] if header and not any(c.strip().isdigit() for c in header) else rows
        return [r[column] for r in body if len(r) > column]
    return [path.read_text()]


def load_texts(source: Any = None, *, text_field: str | None = None, split: str = "train") -> list[str]:
    """Texts from: ``None`` (the built-in default), a local .txt/.jsonl/.tsv/.csv file, a ``datasets``
    dataset object, a list of strings, or a hub dataset name (needs ``datasets`` and a network)."""
    if source is None or source == "builtin":
        return [builtin_text()]
    if isinstance(source, (list, tuple)) and all(isinstance(s, str) for s in source):
        return list(source)
    if isinstance(source, (str, Path)) and Path(source).exists():
        return _texts_from_file(Path(source), text_field)
    if hasattr(source, "column_names"):  # a datasets.Dataset
        key = text_field or next((k for k in ("text", "sentence", "content") if k in source.column_names), None)
        if key is None:
            raise CalibrationError(f"the dataset has columns {source.column_names}; say which holds text (text_field)")
        return [str(t) for t in source[key]]
    if isinstance(source, str):
        try:
            import datasets
        except ImportError as e:
            raise CalibrationError(
                f"{source!r} is not a local file, and loading a hub dataset needs `pip install datasets`"
            ) from e
        try:
            return load_texts(datasets.load_dataset(source, split=split), text_field=text_field)
        except Exception as e:  # offline, unknown name, ...
            raise CalibrationError(
                f"could not load calibration data {source!r}: not a local file, and the hub dataset failed to load "
                f"({type(e).__name__}: {e}). Give a local .txt/.jsonl/.tsv file or omit it for the built-in text."
            ) from e
    raise CalibrationError(f"unsupported calibration source of type {type(source).__name__}")


def token_blocks(
    texts: Iterable[str],
    tokenizer,
    num_samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    special_tokens: bool = False,
) -> torch.Tensor:
    """``num_samples`` disjoint windows of ``seq_len`` tokens, drawn at random (seeded) from the
    concatenated token stream.

    With ``special_tokens`` (encoders such as BERT), each window is wrapped in the tokenizer's
    [CLS] ... [SEP] so that the model sees inputs shaped like its training data.
    """
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CalibrationError("the calibration set is empty: give a file or dataset with text in it")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None and len(texts) > 1 and not special_tokens:
            ids.append(tokenizer.eos_token_id)
    wrap = special_tokens and tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None
    body = seq_len - 2 if wrap else seq_len
    if body < 1:
        raise CalibrationError(f"seq_len={seq_len} is too short")
    available = len(ids) // body
    if available < num_samples:
        raise CalibrationError(
            f"the calibration text has {len(ids)} tokens, enough for {available} windows of {seq_len}; "
            f"{num_samples} x {seq_len} needs {num_samples * body} tokens. Give more text, or lower "
            "num_samples (--num-samples) or seq_len (--seq-len)."
        )
    stream = torch.tensor(ids[: available * body], dtype=torch.long).view(available, body)
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(available, generator=gen)[:num_samples].sort().values
    blocks = stream[picked]
    if wrap:
        n = blocks.shape[0]
        cls = torch.full((n, 1), tokenizer.cls_token_id, dtype=torch.long)
        sep = torch.full((n, 1), tokenizer.sep_token_id, dtype=torch.long)
        blocks = torch.cat([cls, blocks, sep], 1)
    return blocks


def fingerprint(blocks: torch.Tensor) -> str:
    """A short hash of the exact calibration tokens, for the report (same hash = same data)."""
    return hashlib.sha256(blocks.cpu().numpy().tobytes()).hexdigest()[:16]


def shard(blocks: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's share of the sequences (contiguous, as equal as possible)."""
    bounds = [len(blocks) * r // world_size for r in range(world_size + 1)]
    return blocks[bounds[rank] : bounds[rank + 1]]
