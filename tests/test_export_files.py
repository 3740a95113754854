"""The files of a saved folder: readable modes, no temporary folders left by dead saves, the previous output kept
when a save fails, and the settings as ``subprune_config.json``."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_subprune import PruneConfig, prune
from hf_subprune.config import CONFIG_FILE
from hf_subprune.outputs import export

from conftest import calibration_ids, tiny_model

DEAD_PID = 4 * 1024 * 1024 + 1  # above Linux's largest possible pid_max (2**22): never a live process
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def result():
    return prune(tiny_model("llama"), budget="uniform", input_ids=calibration_ids(), sparsity=0.3, progress=False)


@pytest.fixture
def hf_subprune_log(caplog):
    """hf_subprune's logger does not propagate to the root logger, where caplog listens."""
    logger = logging.getLogger("hf_subprune")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_saved_files_are_readable_as_the_umask_allows(result, tmp_path, umask):
    previous = os.umask(umask)
    try:
        folder = result.save(tmp_path / "out")
    finally:
        os.umask(previous)
    entries = [folder, *folder.rglob("*")]
    assert any(p.name == "model.safetensors" for p in entries)  # the one safetensors writes 0o600
    for p in entries:
        expected = (0o755 if p.is_dir() else 0o644) & ~umask
        assert p.stat().st_mode & 0o7777 == expected, f"{p.name}: {oct(p.stat().st_mode & 0o7777)}"


def test_dead_saves_temporary_folders_are_removed_live_ones_kept(result, tmp_path, hf_subprune_log):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        dead = [tmp_path / f".out.tmp-{DEAD_PID}", tmp_path / f".out.old-{DEAD_PID}"]
        kept = [tmp_path / f".out.tmp-{sleeper.pid}", tmp_path / f".other.tmp-{DEAD_PID}"]
        for folder in dead + kept:
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"partial")
        (tmp_path / "out").mkdir()  # the output exists: the dead .old folder is a leftover, not the only copy
        (tmp_path / "out" / "previous.txt").write_text("previous")
        result.save(tmp_path / "out", overwrite=True)
        assert not any(p.exists() for p in dead)
        assert all((p / "model.safetensors").exists() for p in kept)
        for p in dead:
            assert any(p.name in r.getMessage() and str(DEAD_PID) in r.getMessage() for r in hf_subprune_log.records)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_dead_save_that_had_moved_the_output_aside_gives_it_back(result, tmp_path, hf_subprune_log):
    """Killed between moving the previous output aside and renaming the new one in: the output is restored, and
    is then protected like any existing output."""
    aside = tmp_path / f".out.old-{DEAD_PID}"
    aside.mkdir()
    (aside / "previous.txt").write_text("previous")
    with pytest.raises(FileExistsError, match="overwrite"):
        result.save(tmp_path / "out")
    assert (tmp_path / "out" / "previous.txt").read_text() == "previous" and not aside.exists()
    assert any("restored" in r.getMessage() for r in hf_subprune_log.records)


def test_failed_save_leaves_the_previous_output_intact(result, tmp_path, monkeypatch):
    out = result.save(tmp_path / "out")
    before = _snapshot(out)

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(export, "check_reload", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        result.save(out, overwrite=True)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_killed_save_keeps_the_output_and_the_next_save_cleans_up(result, tmp_path):
    out = result.save(tmp_path / "out")
    before = _snapshot(out)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(TESTS)!r})
        from conftest import calibration_ids, tiny_model
        from hf_subprune import prune
        from hf_subprune.outputs import export
        export.check_reload = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        result = prune(tiny_model("llama"), budget="uniform", input_ids=calibration_ids(), sparsity=0.5,
                       progress=False)
        result.save({str(out)!r}, overwrite=True)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert _snapshot(out) == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.tmp-")
    result.save(out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- subprune_config.json ---

def test_config_round_trip(tmp_path):
    config = PruneConfig(sparsity=0.25, budget="global", mlp_multiple=8, damping=0.05, shrinkage=0.0, seed=3,
                         device="cpu", refit=False)
    path = config.save_pretrained(tmp_path / "new")
    assert path == tmp_path / "new" / CONFIG_FILE
    assert PruneConfig.from_pretrained(tmp_path / "new") == config
    assert PruneConfig.from_pretrained(path) == config
    recipe = TESTS.parent / "recipes" / "llama_uniform_20.yaml"
    assert PruneConfig.from_pretrained(recipe) == PruneConfig.from_file(recipe)


def test_config_from_a_saved_pruned_folder(result, tmp_path):
    folder = result.save(tmp_path / "out")
    assert (folder / CONFIG_FILE).is_file()
    assert PruneConfig.from_pretrained(folder) == result.config
    assert PruneConfig.from_pretrained(str(folder / CONFIG_FILE)) == result.config
    (folder / CONFIG_FILE).unlink()  # a folder saved before the file existed: the report's copy
    assert PruneConfig.from_pretrained(folder) == result.config
    assert PruneConfig.from_pretrained(folder / "subprune_report.json") == result.config


def test_config_from_a_folder_without_settings_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"neither {CONFIG_FILE} nor subprune_report.json"):
        PruneConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such"):
        PruneConfig.from_pretrained(tmp_path / "missing")


def test_config_from_pretrained_refuses_unknown_keys(tmp_path):
    data = PruneConfig(sparsity=0.2).to_dict() | {"sparsty": 0.3}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown PruneConfig keys: sparsty"):
        PruneConfig.from_pretrained(tmp_path)


def test_half_precision_on_a_cpu_that_emulates_it_is_warned(hf_subprune_log, monkeypatch):
    """bfloat16 without AVX512-BF16 or AMX runs several times slower than float32: the load says so; float32 and a
    CPU with native bfloat16 stay silent."""
    from hf_subprune import loading

    model = tiny_model("llama").to(torch.bfloat16)
    native = loading.cpu_has_native(torch.bfloat16)
    loading._warn_slow_half_precision(model, None)
    assert ("no native bfloat16" in hf_subprune_log.text) == (not native)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    hf_subprune_log.clear()
    loading._warn_slow_half_precision(model.float(), "cpu")
    assert "no native" not in hf_subprune_log.text
    loading._warn_slow_half_precision(model.to(torch.bfloat16), "cpu")
    assert "no native bfloat16 arithmetic" in hf_subprune_log.text and "--dtype float32" in hf_subprune_log.text
