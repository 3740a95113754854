"""Peak resident memory of one greedy selection at an MLP site of a 1B Llama (d = 5632 inputs, m = 2048 outputs),
above the statistics it starts from: the selection's own working set. 2048 tokens (fewer than the 4505 columns
kept: the float64 path before 4aa7fd9, float32 with shrinkage since) by default.

    python benchmarks/bench_selection_memory.py [--tokens 2048] [--threads 1]

Appends a row to benchmarks/results/selection_memory.jsonl and rewrites selection_memory.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_subprune.maths.selection import SiteStatistics, greedy_select  # noqa: E402
from provenance import ROOT, commit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    d, m, keep = 5632, 2048, int(0.8 * 5632)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, 512) @ torch.randn(512, d) * 0.1 + torch.randn(args.tokens, d) * 0.3
    gram_stats = SiteStatistics.zeros(d, 0)
    gram_stats.update(x, x[:, :0])
    del x
    gc.collect()
    w = (torch.randn(m, d) * 0.02).double()
    stats = SiteStatistics.from_inputs_only(gram_stats, w)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    sel = greedy_select(stats, keep, damping=1e-3, bias_shift=True, shrinkage=1.0, prior=w)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    row = {"commit": commit(), "d": d, "m": m, "kept": keep, "tokens": args.tokens, "threads": args.threads,
           "solve_dtype": sel.diagnostics["solve_dtype"], "seconds": seconds,
           "peak_above_statistics_mib": (peak[0] - base) / 2**20}
    jsonl = RESULTS / "selection_memory.jsonl"
    with jsonl.open("a") as f:
        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line]
    lines = ["# Memory of one greedy selection (d = 5632, m = 2048, 80% kept)", "",
             "Peak resident memory above the statistics (float64 gram 254 MB, cross 88 MB), sampled every 10 ms.", "",
             "| commit | tokens | threads | solve dtype | seconds | peak above statistics MiB |",
             "| --- | ---: | ---: | --- | ---: | ---: |"]
    label = lambda r: r["commit"] + (f" ({r['note']})" if r.get("note") else "")  # noqa: E731
    lines += [f"| {label(r)} | {r['tokens']} | {r['threads']} | {r['solve_dtype']} | {r['seconds']:.1f} | "
              f"{r['peak_above_statistics_mib']:.0f} |" for r in rows]
    (RESULTS / "selection_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
