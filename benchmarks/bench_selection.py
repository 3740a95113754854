"""Speed of greedy selection (greedy_select: greedy steps + refit) on one site's statistics, in float32.

Cases:
- neurons: single-neuron groups of an MLP down projection, d in --sizes, m = round(d / 3.5) (Llama's ratio:
  d = 14336 gives m = 4096), keeping 70% (k = round(0.7 d));
- heads: 32 heads of 128 columns (d = 4096, m = 4096), keeping 24.

The statistics are built directly (no tokens), cheaply, as a correlated low-rank-plus-diagonal gram
``G = F F^T + diag(D)`` (F: d x d/16, D with spread-out scales) of n = 2 d tokens with a non-zero mean,
``C = G W^T`` plus the mean terms, and a target energy with 10% unexplained noise: an O(d^2 d/16) build
instead of the O(n d^2) of summing tokens.

    python benchmarks/bench_selection.py --device cpu --sizes 1536,4096
    python benchmarks/bench_selection.py --device cuda --sizes 1536,4096,8192,14336

Writes benchmarks/results/selection_<device>.json and .md (``--merge`` keeps rows of earlier runs
for cases not re-run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_subprune.maths.selection import SiteStatistics, greedy_select  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SIZES = {"cpu": "1536,4096", "cuda": "1536,4096,8192,14336"}
# Targets (seconds), keyed by (case, d, device).
TARGETS = {("neurons", 1536, "cpu"): 1.0, ("neurons", 14336, "cuda"): 5.0}


def synthetic_statistics(d: int, m: int, *, seed: int, device: str, dtype=torch.float32) -> SiteStatistics:
    """Correlated low-rank-plus-diagonal statistics of n = 2 d tokens with non-zero means (see module doc)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
    n = 2 * d
    p = max(8, d // 16)
    factor = randn(d, p) * (n / p) ** 0.5
    diag = n * torch.exp(randn(d))  # own variance, log-normal scales
    weight = randn(m, d) / d**0.5
    mean = 0.1 * randn(d)

    gram = factor @ factor.T
    gram.diagonal().add_(diag)
    wf = weight @ factor  # m x p
    cross = factor @ wf.T + diag[:, None] * weight.T  # G W^T without forming it as d x d x m
    target_sq = wf.square().sum() + (diag * weight.square().sum(0)).sum()
    target_sq = 1.1 * target_sq  # 10% of the target energy no input explains

    # Non-zero means: the raw sums carry n * mean terms; centring recovers the problem above.
    wm = weight @ mean
    gram += n * torch.outer(mean, mean)
    cross += n * torch.outer(mean, wm)
    target_sq = target_sq + n * wm.square().sum()
    scalar = lambda x: torch.as_tensor(x, device=device, dtype=dtype)  # noqa: E731
    return SiteStatistics(gram, cross, scalar(target_sq), scalar(n), n * mean, n * wm)


def cases(sizes: list[int], heads: bool):
    for d in sizes:
        yield {"case": "neurons", "d": d, "m": round(d / 3.5), "k": round(0.7 * d), "group_size": 1}
    if heads:
        yield {"case": "heads", "d": 4096, "m": 4096, "k": 24, "group_size": 128}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_case(case: dict, *, device: str, repeat: int, seed: int) -> dict:
    stats = synthetic_statistics(case["d"], case["m"], seed=seed, device=device)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        sel = greedy_select(stats, case["k"], group_size=case["group_size"])
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    target = TARGETS.get((case["case"], case["d"], device))
    row = dict(case)
    row.update(
        device=device,
        dtype="float32",
        seconds=round(seconds, 4),
        all_seconds=[round(t, 4) for t in times],
        target=target,
        passed=None if target is None else seconds < target,
        final_relative_error=round(float(sel.relative_curve[-1]), 6),
        rank=sel.diagnostics.get("rank"),
        dependent_picks=sel.diagnostics.get("dependent_picks"),
    )
    if device == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del stats, sel
    return row


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# greedy_select speed",
        "",
        f"torch {env['torch']}, {env.get('gpu') or env['cpu']}, {env['threads']} CPU threads "
        f"({env['cpu_count']} CPUs, load average {env['load_average_1_5_15min'][0]} at the end), {env['date']}.",
        "Time of `greedy_select` (greedy steps + refit), float32, median over repeats.",
        "",
        "| case | d | m | k | group_size | device | dtype | seconds | target | pass/fail |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        target = "-" if r["target"] is None else f"< {r['target']:g} s"
        verdict = "-" if r["passed"] is None else ("pass" if r["passed"] else "fail")
        lines.append(
            f"| {r['case']} | {r['d']} | {r['m']} | {r['k']} | {r['group_size']} | {r['device']} | {r['dtype']} "
            f"| {r['seconds']:.3f} | {target} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", default=None, help="comma-separated d for the neuron case "
                        "(default: 1536,4096 on cpu; 1536,4096,8192,14336 on cuda)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case (the median is reported)")
    parser.add_argument("--no-heads", action="store_true", help="skip the 32 x 128 heads case")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", action="store_true", help="keep earlier rows of the results file for other cases")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = [int(s) for s in (args.sizes or DEFAULT_SIZES[args.device]).split(",") if s.strip()]

    # Warm up kernels and libraries on a small problem (not timed).
    greedy_select(synthetic_statistics(256, 64, seed=args.seed, device=args.device), 128)
    greedy_select(synthetic_statistics(512, 64, seed=args.seed, device=args.device), 2, group_size=128)
    sync(args.device)

    rows = []
    for case in cases(sizes, heads=not args.no_heads):
        row = time_case(case, device=args.device, repeat=args.repeat, seed=args.seed)
        rows.append(row)
        print(f"{row['case']:8s} d={row['d']:6d} m={row['m']:5d} k={row['k']:6d} r={row['group_size']:4d}: "
              f"{row['seconds']:.3f} s  {row['all_seconds']}", flush=True)

    env = environment(args.device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"selection_{args.device}.json"
    if args.merge and json_path.exists():
        key = lambda r: (r["case"], r["d"], r["group_size"])  # noqa: E731
        new_keys = {key(r) for r in rows}
        old = [r for r in json.loads(json_path.read_text())["results"] if key(r) not in new_keys]
        rows = sorted(old + rows, key=lambda r: (r["case"] != "neurons", r["d"], r["group_size"]))
    json_path.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    table = markdown(rows, env)
    (args.out_dir / f"selection_{args.device}.md").write_text(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
