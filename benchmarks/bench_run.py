"""Time and peak memory of one pruning run of SmolLM2-135M (greedy+refit, defaults), alone on the machine.

    python benchmarks/bench_run.py --sparsity 0.2 --num-samples 16 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hf_subprune import prune  # noqa: E402
from hf_subprune.calibration import load_texts, token_blocks  # noqa: E402
from hf_subprune.loading import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    model, tok, _ = load_model("smollm2", dtype="float32")
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ids = token_blocks(load_texts(str(ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt")), tok,
                       args.num_samples, args.seq_len)
    start = time.perf_counter()
    result = prune(model, input_ids=ids, sparsity=args.sparsity, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    stats = sum(s.seconds_statistics for s in result.sites)
    select = sum(s.seconds_selection for s in result.sites)
    row = {"model": "SmolLM2-135M", "sparsity": args.sparsity, "tokens": int(ids.numel()), "seconds": seconds,
           "seconds_statistics": stats, "seconds_selection": select, "peak_rss_gib": peak,
           "rss_after_load_gib": rss_loaded, "cpus": os.cpu_count(), "torch": torch.__version__}
    table = ("| model | sparsity | calibration tokens | total s | statistics s | selection s | peak RSS GiB | RSS after load GiB |\n"
             "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
             f"| SmolLM2-135M | {args.sparsity:.0%} | {row['tokens']} | {seconds:.1f} | {stats:.1f} | {select:.1f} | "
             f"{peak:.2f} | {rss_loaded:.2f} |\n")
    out = ROOT / "benchmarks" / "results"
    (out / "pruning_run_smollm2.json").write_text(json.dumps(row, indent=2))
    (out / "pruning_run_smollm2.md").write_text(f"# One pruning run, {os.cpu_count()} CPU cores, torch {torch.__version__}\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
