"""Logging and progress bars that obey transformers' switches: ``transformers.logging.set_verbosity_*`` sets
how much hf_subprune says, and ``transformers.logging.disable_progress_bar()`` silences its bars too."""

from __future__ import annotations

import logging
import sys
from typing import Iterable, TypeVar

from transformers.utils import logging as hf_logging

__all__ = ["get_logger", "progress"]

T = TypeVar("T")
_ROOT = "hf_subprune"


class _FollowTransformers(logging.Filter):
    """Let a record through when transformers' verbosity would (read at emit time, so later changes apply)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= hf_logging.get_verbosity()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (as transformers' own handler does not,
    but redirections made after import, e.g. by a notebook or a test, then see the messages)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _root() -> logging.Logger:
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[hf_subprune] %(message)s"))
        handler.addFilter(_FollowTransformers())
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)  # the handler's filter decides
        root.propagate = False
    return root


def get_logger(name: str) -> logging.Logger:
    """A logger under ``hf_subprune`` (pass ``__name__``)."""
    _root()
    return logging.getLogger(name)


def progress(iterable: Iterable[T], desc: str, enabled: bool = True) -> Iterable[T]:
    """A progress bar (transformers' tqdm: ``disable_progress_bar()`` turns it off)."""
    return hf_logging.tqdm(iterable, desc=desc, disable=not enabled)
