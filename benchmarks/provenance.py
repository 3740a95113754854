"""Which code a benchmark row was measured with: results files mix runs of several commits."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit(tree: Path = ROOT) -> str:
    """The short hash of ``tree``'s checked-out commit, or "unknown" outside a git checkout."""
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def run_label() -> str:
    """When this run started (UTC, to the minute): rows of one run compare with each other, not across runs, since
    the machine's speed differs from one day to the next."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")
