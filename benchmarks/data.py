"""The benchmarks' data sets, from one place: WikiText-2 (the tokenized version, ``<unk>`` for rare words) and SST-2.

Local (the default): the files of the shared data folder (``default_data_path()``, the project's
``../shared/data``; see its README), or of the folder given with ``--data DIR``:

- ``wikitext-2/valid.txt``, ``wikitext-2/test.txt``: the WikiText-2 splits as the original ``wiki.*.tokens``
  files lay them out: one line per paragraph or heading (`` = Title = ``, `` = = Section = = ``), each line
  starting and ending with a space, blank lines holding one space, every line ending with ``\\n``;
- ``sst2/train.tsv``, ``sst2/validation.tsv``: ``sentence<TAB>label`` rows after a header row.

Hub (``--hub``, needs a network or a ``datasets`` cache that holds them): the same sets through
``datasets.load_dataset``:

- ``wikitext``, config ``wikitext-2-v1``, splits ``validation`` / ``test``. Its rows are the lines of the same
  ``wiki.*.tokens`` files (3,760 and 4,358, as many as the local files have), each kept with its ``\\n``, except
  that the blank lines became empty strings. ``wikitext_text`` puts the blank lines' space back and joins the
  rows, which rebuilds the local layout: the text is meant to equal the local file character for character
  (the local files are the pytorch/examples copies of the same release; no byte-for-byte comparison was possible
  on the offline machines where this was written).
- ``glue``, config ``sst2``, splits ``train`` / ``validation`` (columns ``sentence``, ``label``; sentences keep
  their trailing space, as in the local files). The validation split is the same 872 GLUE dev sentences in the
  same order. The train split is NOT the local one: the Hub has GLUE's full 67,349-row train set in GLUE's
  order, while the local ``sst2/train.tsv`` (from the forest-snow/alps repository) has 60,614 rows in another
  order, so calibration draws and fine-tuning subsets taken from SST-2 train differ between the two.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["default_data_path", "add_data_arguments", "require", "wikitext_text", "sst2_rows"]

# local file and Hub split of each (set, split)
_WIKITEXT = {"valid": ("wikitext-2/valid.txt", "validation"), "test": ("wikitext-2/test.txt", "test")}
_SST2 = {"train": ("sst2/train.tsv", "train"), "validation": ("sst2/validation.tsv", "validation")}


def default_data_path() -> Path:
    """The shared data folder next to the project: ``<project>/../shared/data``."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data DIR`` (default the shared data folder) and ``--hub``."""
    parser.add_argument("--data", type=Path, default=default_data_path(), metavar="DIR",
                        help="the folder holding wikitext-2/ and sst2/ (default: %(default)s)")
    parser.add_argument("--hub", action="store_true",
                        help="load WikiText-2 and SST-2 through `datasets` from the Hugging Face Hub instead of "
                        "--data (needs a network; SST-2 train there is GLUE's full 67,349-row set, not the "
                        "local 60,614 rows)")


def _split(table: dict, split: str, name: str) -> tuple[str, str]:
    if split not in table:
        raise ValueError(f"{name} split {split!r}: one of {', '.join(table)}")
    return table[split]


def _local(data: Path | None, relative: str) -> Path:
    folder = default_data_path() if data is None else Path(data)
    path = folder / relative
    if not path.is_file():
        raise SystemExit(f"{path} is missing: the benchmarks read WikiText-2 and SST-2 from {folder} "
                         f"(wikitext-2/valid.txt, wikitext-2/test.txt, sst2/train.tsv, sst2/validation.tsv). "
                         f"Pass --data DIR with a folder that holds them, or --hub to load them through "
                         f"`datasets` from the Hugging Face Hub (needs a network).")
    return path


def require(data: Path | None, hub: bool, wikitext=(), sst2=()) -> None:
    """Fail at once (``SystemExit``) when a local file that a run will read is missing; nothing to check with
    ``hub``. ``wikitext`` and ``sst2`` name the splits the run needs."""
    if hub:
        return
    for split in wikitext:
        _local(data, _split(_WIKITEXT, split, "WikiText-2")[0])
    for split in sst2:
        _local(data, _split(_SST2, split, "SST-2")[0])


def _hub(name: str, config: str, split: str):
    """A split of a Hub dataset, or a ``SystemExit`` that says what went wrong (no traceback)."""
    try:
        import datasets
    except ImportError:
        raise SystemExit("--hub loads the data sets through the `datasets` package, which is not installed: "
                         "pip install datasets, or read the local files with --data DIR") from None
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unreachable, renamed, ...: datasets raises many kinds
        flags = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                 if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
        offline = f" ({' and '.join(flags)} {'is' if len(flags) == 1 else 'are'} set: unset it)" if flags else ""
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise SystemExit(f"--hub: could not load {name}/{config} split {split!r} through `datasets` "
                         f"({type(e).__name__}: {reason}). --hub needs a network to reach the Hugging Face Hub"
                         f"{offline}, or a datasets cache that already holds the set; without one, read the local "
                         f"files with --data DIR (default {default_data_path()}).") from None


def wikitext_text(split: str, data: Path | None = None, hub: bool = False) -> str:
    """The whole WikiText-2 ``split`` (``"valid"`` or ``"test"``) as one string, laid out as the local file
    (see the module's docstring for the Hub's version)."""
    relative, hub_split = _split(_WIKITEXT, split, "WikiText-2")
    if not hub:
        return _local(data, relative).read_text(encoding="utf-8-sig")
    rows = _hub("wikitext", "wikitext-2-v1", hub_split)["text"]
    # blank lines are "" on the Hub and " \n" in the file; the others keep their "\n" (added if a copy lost it)
    return "".join((row if row.endswith("\n") else row + "\n") if row.strip() else " \n" for row in rows)


def sst2_rows(split: str, data: Path | None = None, hub: bool = False) -> tuple[list[str], list[int]]:
    """Sentences (as written: a trailing space stays) and labels (0 negative, 1 positive) of the SST-2 ``split``
    (``"train"`` or ``"validation"``), in the order of the file (or of the Hub's split)."""
    relative, hub_split = _split(_SST2, split, "SST-2")
    if hub:
        table = _hub("glue", "sst2", hub_split)
        rows = [(s, int(y)) for s, y in zip(table["sentence"], table["label"]) if int(y) in (0, 1)]
        return [s for s, _ in rows], [y for _, y in rows]
    rows = [line.split("\t") for line in _local(data, relative).read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if len(r) >= 2 and r[1].strip() in ("0", "1")]  # drops the header row
    return [r[0] for r in rows], [int(r[1]) for r in rows]
