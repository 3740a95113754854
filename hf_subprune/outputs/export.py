"""Saving a pruned model: a temporary folder, a reload check against the in-memory model, then a rename. A lazy
model (``pipeline.lazy``) is written one block at a time (``shards.py``) and checked against a lazy reload, so
that neither step holds the whole model.

Nothing is lost: an existing non-empty folder is only replaced with ``overwrite=True``, and a failed save
or check leaves it as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..adapters import auto_class_for
from ..logs import get_logger
from ..pipeline.blocks import forwards_on
from ..pipeline.lazy import lazy_blocks, load_lazy
from .card import write_card
from ..files import CALIBRATION_FILE, REPORT_FILE
from .heterogeneous import needs_heterogeneous, write_heterogeneous
from .shards import DEFAULT_MAX_SHARD_SIZE, save_lazy

__all__ = ["ExportCheckError", "check_output_folder", "save_pruned", "check_reload", "save_calibration_ids",
           "load_calibration", "load_calibration_ids"]


class ExportCheckError(RuntimeError):
    """The folder written to disk does not reproduce the in-memory pruned model."""


def _probe_inputs(model) -> torch.Tensor:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, 32), generator=gen)


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids.to(model.device))
    tensor = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return tensor.float().cpu()


@torch.no_grad()
def check_reload(model, folder: Path, *, trust_remote_code: bool = False, device=None) -> float:
    """Reload ``folder`` with plain transformers (with its modeling file when ``trust_remote_code``) and
    compare outputs with ``model``. A lazy model is compared with a lazy reload (the same classes from the saved
    config, the weights streamed from the saved files): both run one block at a time. With ``device``, both run
    there (``forwards_on``: one block at a time on it).

    Returns the largest absolute difference relative to the largest output; raises ``ExportCheckError``
    when it passes float rounding of the model's dtype.
    """
    auto = auto_class_for(model)
    if lazy_blocks(model) is not None:
        reloaded = load_lazy(folder, auto, dtype=model.dtype, trust_remote_code=trust_remote_code)
    else:
        reloaded = auto.from_pretrained(folder, dtype=model.dtype, trust_remote_code=trust_remote_code)
        reloaded.to(model.device).eval()
    was_training = model.training
    model.eval()
    try:
        probe = _probe_inputs(model)
        logits = []
        for m in (model, reloaded):
            with forwards_on(m, device):
                logits.append(_logits(m, probe))
        expected, got = logits
    finally:
        model.train(was_training)
    if expected.shape != got.shape:
        raise ExportCheckError(f"reloaded model outputs {tuple(got.shape)}, in-memory model {tuple(expected.shape)}")
    rel = float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-12))
    tol = 1e-4 if model.dtype == torch.float32 else 2e-2
    if not rel <= tol:
        raise ExportCheckError(
            f"the saved folder does not reproduce the pruned model: relative output difference {rel:.2e} > {tol:.0e}"
        )
    return rel


def check_output_folder(path: str | Path, overwrite: bool, source: str | Path | None = None) -> None:
    """Refuse, before any work, an output the save would fail on or that would destroy something: a non-empty
    folder (unless ``overwrite``), a file, a parent that is a file or not writable, the current folder or one
    holding it, and the input model's folder (``source``: a model folder or a .gguf file) or one holding it."""
    path = Path(path)
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise FileExistsError(f"output folder {path} is the current folder or one holding it: the save replaces "
                              "the output folder whole; give a new folder, e.g. ./pruned")
    if source is not None and Path(source).exists():
        src = Path(source).resolve()
        src_folder = src.parent if src.is_file() else src
        if resolved == src_folder or resolved in src_folder.parents:
            raise FileExistsError(f"output folder {path} is the input model's folder or one holding it "
                                  f"({src_folder}); the save would replace the model being pruned: give another "
                                  "output folder")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; give a folder path for the output")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; choose another output folder or pass --overwrite "
                              "(overwrite=True in Python)")
    parent = resolved.parent
    while not parent.exists() and parent != parent.parent:  # the save creates missing parents
        parent = parent.parent
    if not parent.is_dir():
        raise FileExistsError(f"cannot create {path}: {parent} is a file, not a folder; choose an output path "
                              "inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write in {parent} (permission denied), where {path} and its temporary "
                              "folder go; choose an output folder you can write to")


def save_pruned(result, path: Path, *, overwrite: bool = False, check: bool = True,
                max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, device=None) -> Path:
    """Write weights (safetensors), config, tokenizer, generation config, ``subprune_report.json``,
    ``subprune_config.json`` and a model card into ``path``, via a temporary folder that is renamed into place
    once the reload check passed. Files come out 0o644 and folders 0o755 (less the umask), whatever their
    writers chose, so that whoever may read the folder can load the model. Temporary folders that a dead save
    to the same output left behind are cleared first.

    Widths that the stock config cannot express (they differ per block, or BERT/GPT-2 heads were pruned) are
    written as the heterogeneous export (``heterogeneous.py``): it loads with ``trust_remote_code=True``, and
    the reload check loads it that way. ``report["export"]`` says which one was written. Weights above
    ``max_shard_size`` bytes are split into files of at most that size, listed by an index. The reload check
    runs on ``device`` (default: where the model is)."""
    path = Path(path)
    _clear_dead_saves(path)
    check_output_folder(path, overwrite, source=getattr(result, "base_model", None))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if lazy_blocks(result.model) is not None:
            save_lazy(result.model, tmp, max_shard_size=max_shard_size)
        else:
            result.model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        heterogeneous = needs_heterogeneous(result.model)
        if heterogeneous:  # per-layer widths: overrides in config.json, modeling file wired with auto_map
            write_heterogeneous(result.model, tmp)
        if result.tokenizer is not None:
            result.tokenizer.save_pretrained(tmp)
        reload_check = None
        if check:
            reload_check = {
                "relative_max_difference": check_reload(result.model, tmp, trust_remote_code=heterogeneous,
                                                        device=device)}
        report = result.report(export="heterogeneous" if heterogeneous else "stock", reload_check=reload_check)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
        result.config.save_pretrained(tmp)
        if getattr(result, "input_ids", None) is not None:
            save_calibration_ids(result.input_ids, tmp, getattr(result, "attention_mask", None))
        write_card(tmp, report)
        _make_readable(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                old.rename(path)  # the previous output goes back where it was
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_calibration_ids(input_ids: torch.Tensor, folder: Path, attention_mask: torch.Tensor | None = None) -> Path:
    """The calibration tokens in their own dtype, so that their fingerprint (of the raw bytes) can be checked, and
    their attention mask when they are padded."""
    from safetensors.torch import save_file

    path = Path(folder) / CALIBRATION_FILE
    tensors = {"input_ids": input_ids.detach().cpu().contiguous()}
    if attention_mask is not None:
        tensors["attention_mask"] = attention_mask.detach().cpu().contiguous()
    save_file(tensors, str(path))
    return path


def load_calibration(folder: Path) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The calibration tokens a save stored and their attention mask (None when unpadded); (None, None) when the
    folder has none."""
    from safetensors.torch import load_file

    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None, None
    stored = load_file(str(path))
    return stored["input_ids"], stored.get("attention_mask")


def load_calibration_ids(folder: Path) -> torch.Tensor | None:
    """The calibration tokens a save stored, or None when the folder has none."""
    return load_calibration(folder)[0]


_log = get_logger(__name__)


def _umask() -> int:
    """The process umask: from /proc where there is one (reading it with os.umask means setting it for a moment,
    which other threads would see)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _make_readable(folder: Path) -> None:
    """Files 0o644 and folders 0o755, less the umask: some writers (safetensors) create their file 0o600."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name, mode in [(d, 0o755) for d in dirs] + [(f, 0o644) for f in files]:
            entry = os.path.join(root, name)
            if not os.path.islink(entry):
                os.chmod(entry, mode & ~mask)
    os.chmod(folder, 0o755 & ~mask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _clear_dead_saves(path: Path) -> None:
    """Remove the ``.NAME.tmp-PID`` and ``.NAME.old-PID`` folders of saves to ``path`` whose process is gone
    (killed mid-way), so that they do not pile up next to the output. A dead save's ``.old`` folder is the
    previous output, moved aside just before the new one was renamed in: when ``path`` is missing it is put
    back instead."""
    try:
        siblings = sorted(path.parent.iterdir())
    except OSError:  # no parent yet, or unreadable: check_output_folder says what is wrong
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(\d+)")
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if not match or not sibling.is_dir() or sibling.is_symlink():
            continue
        kind, pid = match.group(1), int(match.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if kind == "old" and not path.exists():
            sibling.rename(path)
            _log.warning(f"restored {path} from {sibling.name}, left by a save (process {pid}) that did not finish")
            continue
        shutil.rmtree(sibling, ignore_errors=True)
        _log.warning(f"removed {sibling}, left by a save to {path.name} (process {pid}) that did not finish")
