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

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["accelerator", "bare"])
def test_two_processes_match_one(tmp_path, mode):
    """With an Accelerator in the script, and without one (prune() sets accelerate's process state up itself,
    on the CPU without being told: ACCELERATE_USE_CPU is unset)."""
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
    if mode == "accelerator":
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
    one = prune(model, input_ids=ids, sparsity=0.3, batch_size=2, progress=False, device="cpu", variant="asymmetric")
    assert two["kept"] == [s.kept for s in one.sites]
    # Each process saw half the tokens, but the reduced statistics cover all of them.
    assert two["tokens"] == [s.tokens for s in one.sites] == [ids.numel()] * len(one.sites)
    torch.testing.assert_close(torch.tensor(two["down_proj"]), model.model.layers[-1].mlp.down_proj.weight,
                               rtol=1e-4, atol=1e-5)
