"""hf_subprune obeys transformers' logging switches: its progress bars and its messages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from transformers.utils import logging as hf_logging

from hf_subprune import prune

from conftest import calibration_ids, tiny_model


@pytest.fixture
def restore_logging():
    verbosity = hf_logging.get_verbosity()
    yield
    hf_logging.set_verbosity(verbosity)
    hf_logging.enable_progress_bar()


def _run(capfd) -> str:
    prune(tiny_model("llama"), input_ids=calibration_ids(4, 16), sparsity=0.3, batch_size=2, budget="uniform",
          device="cpu", progress=True)
    return capfd.readouterr().err


def test_progress_bars_follow_transformers_switch(capfd, restore_logging):
    hf_logging.enable_progress_bar()
    assert "pruning blocks" in _run(capfd)
    hf_logging.disable_progress_bar()
    assert "pruning blocks" not in _run(capfd)


def test_messages_follow_transformers_verbosity(capfd, restore_logging):
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_info()
    assert "kept widths remove" in _run(capfd)  # the budget's note, logged at info level
    hf_logging.set_verbosity_warning()
    assert "kept widths remove" not in _run(capfd)


def test_quiet_switches_datasets_bars_off_without_importing_it():
    """The CLI's --quiet must not import datasets (80 MB of pyarrow for a run that may load none), yet datasets,
    once a run imports it, starts with its bars off."""
    code = ("import sys; from hf_subprune.cli import _quiet; _quiet(); imported = 'datasets' in sys.modules; "
            "import datasets; print(imported, datasets.is_progress_bar_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout.split()
    assert out == ["False", "False"]
