"""Calibration data: text from anywhere, to a tensor of fixed-length token blocks (decoders) or of one text per
sample with an attention mask (encoders).

Pruning needs unlabeled text only. The default is text that ships with Python (the pydoc topic help), so
that a run works offline with nothing downloaded. Files and hub datasets are read through ``datasets``, whose
builders already parse CSV quoting, JSON arrays and Parquet correctly.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

__all__ = ["CalibrationError", "builtin_text", "load_texts", "load_labelled", "token_blocks", "text_samples",
           "pad_right", "draw_samples", "check_attention_mask", "fingerprint", "shard"]

TEXT_COLUMNS = ("text", "sentence", "content", "document", "question", "prompt")
LABEL_COLUMNS = ("label", "labels", "class", "target")
_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
    ".parquet": ("parquet", {}),
}
_FILE_SUFFIXES = (".txt", *_BUILDERS)


class CalibrationError(ValueError):
    """The calibration data cannot give what was asked for."""


def builtin_text(part: str = "calibration") -> str:
    """Python's own documentation topics. ``part`` splits it in two disjoint halves: ``"calibration"``
    (even topics) and ``"heldout"`` (odd topics), so that the demo evaluates on text it did not see."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    start = {"calibration": 0, "heldout": 1}[part]
    return "\n\n".join(topics[k] for k in keys[start::2])


def _not_utf8(path: Path, error: UnicodeDecodeError) -> CalibrationError:
    return CalibrationError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8")


def _is_blank(path: Path) -> bool:
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _cause(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _innermost(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _load_file(path: Path, split: str | None, streaming: bool):
    """A ``datasets`` dataset from one local file, or a ``str`` for a plain text file (kept as one text)."""
    if _is_blank(path):
        raise CalibrationError(f"the calibration source {path} is empty")
    suffix = path.suffix.lower()
    if suffix not in _BUILDERS:
        try:
            return path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
    import datasets

    builder, options = _BUILDERS[suffix]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split=split or "train", streaming=streaming,
                                     **options)
    except Exception as e:
        decode = _cause(e, UnicodeDecodeError)
        if decode is not None:
            raise _not_utf8(path, decode) from None
        raise CalibrationError(f"could not read {path} as {suffix[1:]}: {_innermost(e)}") from e


def _load_hub(name: str, dataset_config: str | None, split: str | None, streaming: bool):
    """A dataset from the Hub (or its cache), or from a local folder of data files."""
    import datasets

    try:
        return datasets.load_dataset(name, dataset_config, split=split or "train", streaming=streaming)
    except Exception as e:
        if Path(name).is_dir():
            raise CalibrationError(f"could not load the folder {name} as a dataset: {_innermost(e)}") from e
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise CalibrationError(
            f"calibration source {name!r}: no such file or folder, and it did not load as a Hugging Face Hub "
            f"dataset ({_innermost(e)}). Hub datasets need a network{' (HF_HUB_OFFLINE is set)' if offline else ''}; "
            f"for local data give the path of an existing {'/'.join(_FILE_SUFFIXES)} file."
        ) from None


def _column(columns: list[str], text_column: str | None, where: str) -> str:
    if text_column is not None:
        if text_column not in columns:
            raise CalibrationError(f"{where} has no column {text_column!r}; its columns are {columns}")
        return text_column
    found = next((c for c in TEXT_COLUMNS if c in columns), None)
    if found is None:
        raise CalibrationError(
            f"{where} has columns {columns}, none of them a text column ({', '.join(TEXT_COLUMNS)}); "
            "name the one holding text with text_column (CLI: --text-column)"
        )
    return found


def _dataset_texts(dataset: Any, text_column: str | None, split: str | None, max_texts: int | None, where: str,
                   null_is_empty: bool = False) -> list[str]:
    """The non-empty strings of the text column. A missing or null value is an error, except where the format
    cannot tell it from an empty one (``null_is_empty``: an empty CSV cell)."""
    import datasets

    if isinstance(dataset, dict):  # DatasetDict / IterableDatasetDict
        key = split or "train"
        if key not in dataset:
            raise CalibrationError(f"{where} has splits {list(dataset)}, not {key!r}; choose one with split")
        dataset = dataset[key]
    columns = dataset.column_names
    if columns is None:  # a streamed dataset whose features are not known until read
        first = next(iter(dataset), None)
        columns = list(first) if first is not None else []
    if not columns:
        raise CalibrationError(f"the calibration source {where} is empty")
    column = _column(list(columns), text_column, where)
    rows = dataset[column] if isinstance(dataset, datasets.Dataset) else (row.get(column) for row in dataset)
    texts: list[str] = []
    for i, value in enumerate(rows):
        if max_texts is not None and len(texts) >= max_texts:
            break
        if value is None and null_is_empty:
            continue
        if value is None:
            raise CalibrationError(f"{where}: row {i + 1} has no {column!r} value (missing or null)")
        if not isinstance(value, str):
            raise CalibrationError(
                f"{where}: row {i + 1} of column {column!r} holds {value!r} ({type(value).__name__}), not text; "
                "name the text column with text_column (CLI: --text-column)"
            )
        if value.strip():
            texts.append(value)
    return texts


def _looks_like_path(source: str) -> bool:
    return (Path(source).is_absolute() or source.startswith(".") or source.count("/") > 1
            or Path(source).suffix.lower() in _FILE_SUFFIXES)


def load_texts(
    source: Any = None,
    *,
    text_column: str | None = None,
    dataset_config: str | None = None,
    split: str | None = None,
    streaming: bool = False,
    max_texts: int | None = None,
) -> list[str]:
    """The non-empty texts of a calibration source.

    ``source`` is one of: ``None`` or ``"builtin"`` (the built-in text); a list of strings; a ``datasets``
    ``Dataset``/``IterableDataset`` (or a dict of them, indexed by ``split``); a local ``.json``/``.jsonl``/
    ``.csv``/``.tsv``/``.parquet`` file (tabular); a local ``.txt`` file, or one with any other suffix (the whole
    file is one text); or a Hugging Face Hub dataset name (needs a network unless cached), loaded with
    ``dataset_config``, ``split`` (default ``"train"``; slices such as ``"train[:1000]"`` work) and ``streaming``.
    Tabular sources take their text from ``text_column``, or else from the first of ``TEXT_COLUMNS`` they have.
    ``max_texts`` keeps the first that many non-empty texts (a streamed dataset is read no further).
    """
    where = type(source).__name__
    if source is None or (isinstance(source, str) and source == "builtin"):
        texts = [builtin_text()]
    elif isinstance(source, (list, tuple)) and all(isinstance(s, str) for s in source):
        texts = [s for s in source if s.strip()]
    elif isinstance(source, (str, Path)):
        path = Path(source)
        where = str(path)
        if path.is_file():
            loaded = _load_file(path, split, streaming)
        elif path.is_dir() or not (isinstance(source, Path) or _looks_like_path(source)):
            loaded = _load_hub(str(source), dataset_config, split, streaming)
        else:
            raise CalibrationError(f"calibration file {source} does not exist")
        if isinstance(loaded, str):
            texts = [loaded] if loaded.strip() else []
        else:
            try:
                texts = _dataset_texts(loaded, text_column, split, max_texts, where,
                                       null_is_empty=path.suffix.lower() in (".csv", ".tsv"))
            except UnicodeDecodeError as e:  # some builders only decode when the rows are read
                raise _not_utf8(path, e) from None
    elif hasattr(source, "column_names"):
        texts = _dataset_texts(source, text_column, split, max_texts, where)
    else:
        raise CalibrationError(f"unsupported calibration source of type {type(source).__name__}")
    if max_texts is not None:
        texts = texts[:max_texts]
    if not texts:
        raise CalibrationError(f"the calibration source {where} is empty: it holds no text")
    return texts


def _label(value: Any, label2id: dict[str, int] | None, where: str, row: int) -> int:
    """An integer class: ints as they are, names through the model's ``label2id``, digit strings as numbers."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        if label2id and value in label2id:
            return int(label2id[value])
        if value.strip().lstrip("-").isdigit():
            return int(value)
    known = f" (the model's label names: {sorted(label2id)})" if label2id else ""
    raise CalibrationError(f"{where}: row {row + 1} has the label {value!r}, not a class number{known}")


def load_labelled(source: str | Path, *, text_column: str | None = None, label_column: str | None = None,
                  split: str | None = None, label2id: dict[str, int] | None = None) -> tuple[list[str], list[int]]:
    """Texts and integer labels of a local ``.tsv``/``.csv``/``.json``/``.jsonl``/``.parquet`` file with a header:
    the text column as ``load_texts`` finds it, the label column by ``label_column`` or else the first of
    ``LABEL_COLUMNS``; label names are mapped through ``label2id`` (a model config's). Rows without text are
    skipped, as an empty CSV cell cannot be told from a missing one."""
    path = Path(source)
    if not path.is_file():
        raise CalibrationError(f"labelled data file {source} " + ("does not exist" if not path.exists()
                                                                   else "is not a file"))
    if path.suffix.lower() not in _BUILDERS:
        raise CalibrationError(f"{path}: labelled data is a {'/'.join(_BUILDERS)} file with a text and a label "
                               "column, not plain text")
    dataset = _load_file(path, split, streaming=False)
    columns = list(dataset.column_names)
    text = _column(columns, text_column, str(path))
    label = label_column or next((c for c in LABEL_COLUMNS if c in columns), None)
    if label not in columns:
        raise CalibrationError(f"{path} has columns {columns}, none of them a label column "
                               f"({label_column or ', '.join(LABEL_COLUMNS)}); name it with label_column")
    texts, labels = [], []
    for i, (value, target) in enumerate(zip(dataset[text], dataset[label])):
        if not isinstance(value, str) or not value.strip():
            continue
        if target is None:
            raise CalibrationError(f"{path}: row {i + 1} has no {label!r} value")
        texts.append(value)
        labels.append(_label(target, label2id, str(path), i))
    if not texts:
        raise CalibrationError(f"{path} holds no labelled text")
    return texts, labels


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


def text_samples(
    texts: Iterable[str], tokenizer, num_samples: int, seq_len: int, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` samples of one text each, as encoders are used: each [CLS] text [SEP], padded on the right
    to the longest, with its attention mask ``(input_ids, attention_mask)``. A text longer than ``seq_len``
    tokens gives consecutive windows of its own (each wrapped); the samples are drawn from all the pieces at
    random (seeded) and kept in their original order.

    Packing several texts into one window (``token_blocks``) suits decoders, which read every position; an
    encoder's pooled output or [CLS] token sees one text, so a packed window under-represents it (one [CLS] for
    a few sentences) and, with few samples, the refit fits positions the model never reads.
    """
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CalibrationError("the calibration set is empty: give a file or dataset with text in it")
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise CalibrationError(f"{type(tokenizer).__name__} has no [CLS]/[SEP] tokens to wrap each text in")
    body = seq_len - 2
    if body < 1:
        raise CalibrationError(f"seq_len={seq_len} is too short")
    pieces: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces.extend(ids[i : i + body] for i in range(0, len(ids), body))
    pieces = [p for p in pieces if p]
    if len(pieces) < num_samples:
        raise CalibrationError(
            f"the calibration texts give {len(pieces)} samples (one per text, longer texts cut into windows of "
            f"{seq_len} tokens); {num_samples} were asked for. Give more text, or lower num_samples (--num-samples)."
        )
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(pieces), generator=gen)[:num_samples].sort().values.tolist()
    rows = [[tokenizer.cls_token_id, *pieces[i], tokenizer.sep_token_id] for i in picked]
    return pad_right(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def pad_right(rows: Sequence[Sequence[int] | torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one right-padded tensor and its attention mask (1 real, 0 padding)."""
    lengths = torch.tensor([len(row) for row in rows])
    attention_mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()
    input_ids = torch.full(attention_mask.shape, pad, dtype=torch.long)
    input_ids[attention_mask.bool()] = torch.cat([torch.as_tensor(row, dtype=torch.long) for row in rows])
    return input_ids, attention_mask


def draw_samples(texts: Iterable[str], tokenizer, num_samples: int, seq_len: int, *, seed: int,
                 causal: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The calibration samples ``prune`` draws from text, as the model reads text: packed windows for a causal LM
    (``token_blocks``), one text per sample for an encoder (``text_samples``); the mask is None without padding."""
    if causal:
        return token_blocks(texts, tokenizer, num_samples, seq_len, seed=seed), None
    input_ids, attention_mask = text_samples(texts, tokenizer, num_samples, seq_len, seed=seed)
    return input_ids, None if attention_mask.all() else attention_mask


def check_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask as 0/1 integers, after checking it fits the samples: same shape, right padding (positions are
    absolute, so a sample must start at 0), at least one real token per sample. ``None`` when all are real."""
    if attention_mask is None:
        return None
    mask = torch.as_tensor(attention_mask)
    if mask.shape != input_ids.shape:
        raise CalibrationError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}: "
                               "give one mask entry per token")
    if not ((mask == 0) | (mask == 1)).all():
        raise CalibrationError("attention_mask must hold 0 (padding) and 1 (real token) only")
    mask = mask.long()
    if not mask[:, 0].all():
        raise CalibrationError("every calibration sample needs real tokens from its first position: pad on the "
                               "right (tokenizer padding_side='right'), and drop empty samples")
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise CalibrationError("attention_mask has padding before real tokens: pad on the right only "
                               "(tokenizer padding_side='right')")
    return None if mask.all() else mask


def fingerprint(blocks: torch.Tensor, attention_mask: torch.Tensor | None = None) -> str:
    """A short hash of the exact calibration tokens, for the report (same hash = same data). Padding is hashed as
    -1, whatever its token id; without padding the hash is that of the tokens alone."""
    if attention_mask is not None and not attention_mask.all():
        blocks = blocks.long().masked_fill(attention_mask.to(blocks.device) == 0, -1)
    return hashlib.sha256(blocks.cpu().numpy().tobytes()).hexdigest()[:16]


def shard(blocks: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's share of the sequences (contiguous, as equal as possible)."""
    bounds = [len(blocks) * r // world_size for r in range(world_size + 1)]
    return blocks[bounds[rank] : bounds[rank + 1]]
