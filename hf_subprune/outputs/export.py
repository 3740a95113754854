"""Saving a pruned model: a temporary folder, a reload check against the in-memory model, then a rename.

Nothing is lost: an existing non-empty folder is only replaced with ``overwrite=True``, and a failed save
or check leaves it as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..adapters import auto_class_for

__all__ = ["ExportCheckError", "check_output_folder", "save_pruned", "check_reload"]

REPORT_FILE = "subprune_report.json"


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
def check_reload(model, folder: Path, *, trust_remote_code: bool = False) -> float:
    """Reload ``folder`` with plain transformers (with its modeling file when ``trust_remote_code``) and
    compare outputs with ``model``.

    Returns the largest absolute difference relative to the largest output; raises ``ExportCheckError``
    when it passes float rounding of the model's dtype.
    """
    auto = auto_class_for(model)
    reloaded = auto.from_pretrained(folder, dtype=model.dtype, trust_remote_code=trust_remote_code).to(model.device)
    reloaded.eval()
    was_training = model.training
    model.eval()
    try:
        probe = _probe_inputs(model)
        expected, got = _logits(model, probe), _logits(reloaded, probe)
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


def check_output_folder(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing non-empty folder (or a file) unless asked to."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; choose another output folder or pass --overwrite")


def save_pruned(result, path: Path, *, overwrite: bool = False, check: bool = True) -> Path:
    """Write weights (safetensors), config, tokenizer, generation config, ``subprune_report.json`` and a
    model card into ``path``, via a temporary folder that is renamed into place once the reload check passed.

    Widths that the stock config cannot express (they differ per block, or BERT/GPT-2 heads were pruned) are
    written as the heterogeneous export (``heterogeneous.py``): it loads with ``trust_remote_code=True``, and
    the reload check loads it that way. ``report["export"]`` says which one was written."""
    from .card import write_card
    from .heterogeneous import needs_heterogeneous, write_heterogeneous

    path = Path(path)
    check_output_folder(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result.model.save_pretrained(tmp, safe_serialization=True)
        heterogeneous = needs_heterogeneous(result.model)
        if heterogeneous:  # per-layer widths: overrides in config.json, modeling file wired with auto_map
            write_heterogeneous(result.model, tmp)
        if result.tokenizer is not None:
            result.tokenizer.save_pretrained(tmp)
        report = result.report()
        report["export"] = "heterogeneous" if heterogeneous else "stock"
        if check:
            report["reload_check"] = {
                "relative_max_difference": check_reload(result.model, tmp, trust_remote_code=heterogeneous)}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
        write_card(tmp, report)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
