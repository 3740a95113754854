"""Two real processes (accelerate launch on CPU, gloo) give the same pruned model as one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_subprune import prune

from conftest import calibration_ids, tiny_model
from distributed_prune import padding_mask

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["accelerator", "bare", "lazy", "padded"])
def test_two_processes_match_one(tmp_path, mode):
    """With an Accelerator in the script, and without one (prune() sets accelerate's process state up itself,
    on the CPU without being told: ACCELERATE_USE_CPU is unset); and given the folder, whose blocks every process
    reads from disk one at a time (only the main process saves); and with padded samples, whose masks are shared
    out with them."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    ids = calibration_ids(10, 16)
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    out = tmp_path / "out.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("ACCELERATE_USE_CPU", None)
    if mode in ("accelerator", "lazy", "padded"):
        env["ACCELERATE_USE_CPU"] = "true"
    run = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29517", str(Path(__file__).with_name("distributed_prune.py")),
         str(model_dir), str(tmp_path / "ids.json"), str(out), mode],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["processes"] == 2

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    mask = padding_mask(ids) if mode == "padded" else None
    # A lazily loaded model writes no calibration sequences itself; in memory both write the same 8 (seeded).
    one = prune(model, input_ids=ids, attention_mask=mask, sparsity=0.3, batch_size=2, progress=False, device="cpu",
                variant="asymmetric", synthetic_samples=0 if mode == "lazy" else None)
    assert two["kept"] == [s.kept for s in one.sites]
    # Each process saw half the tokens, but the reduced statistics cover all of them (the real ones, and written).
    tokens = (ids.numel() if mask is None else int(mask.sum())) + one.calibration["synthetic_samples"] * ids.shape[1]
    assert two["tokens"] == [s.tokens for s in one.sites] == [tokens] * len(one.sites)
    down = model.model.layers[-1].mlp.down_proj.weight
    if mode == "lazy":
        assert [(tmp_path / f"out.json.peak-{rank}").read_text() for rank in "01"] == ["1", "1"]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.json")) == [
            "out.json", "out.json.model", "out.json.peak-0", "out.json.peak-1"]  # one saved model
        saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out.json.model",
                                                                  trust_remote_code=True)  # per-layer widths
        two["down_proj"] = saved.model.layers[-1].mlp.down_proj.weight.tolist()
    torch.testing.assert_close(torch.tensor(two["down_proj"]), down, rtol=1e-4, atol=1e-5)
