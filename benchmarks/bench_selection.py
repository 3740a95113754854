"""Speed of greedy selection (greedy_select: greedy steps + refit) on one site's statistics, before and after, in
float64 and float32.

Cases:
- neurons: single-neuron groups of an MLP down projection, d in --sizes with the output width m of a real model
  of that width (``MODEL_WIDTHS``; ``DxM`` in --sizes sets it), keeping 70% (k = round(0.7 d); --keep);
- heads-9x64: the attention site of SmolLM2-135M, 9 heads of 64 columns in 3 kv groups (d = m = 576), keeping 2
  heads per kv group (6);
- heads-32x128: 32 heads of 128 columns (d = m = 4096), keeping 24.

Variants, timed in turn within each repeat (so that a busy machine slows them alike), median reported:
- after / float32: ``greedy_select`` as it is called by the pipeline (dtype=None): the greedy in float32 with its
  float64 check and fallback, the refit in the statistics' dtype; the row says which dtype the picks came from;
- after / float64: ``greedy_select(dtype=torch.float64)``;
- before / float64 and before / float32: the previous implementation (``reference_greedy_select`` below, kept
  verbatim: per-step gemv greedy with two host syncs per step, the refit by ``cholesky_solve``), in the
  statistics' dtype (float64, its default) and with ``dtype=torch.float32``.

Statistics are float64 (``PruneConfig.stats_dtype``'s default), built directly (no tokens), cheaply, as a
correlated low-rank-plus-diagonal gram ``G = F F^T + diag(D)`` (F: d x d/16, D with spread-out scales) of
n = 2 d tokens with a non-zero mean, ``C = G W^T`` plus the mean terms, and a target energy with 10% unexplained
noise: an O(d^2 d/16) build instead of the O(n d^2) of summing tokens.

    python benchmarks/bench_selection.py --device cpu --sizes 1536,4096 --threads 1
    python benchmarks/bench_selection.py --device cuda --sizes 1536,4096,8192,14336

Writes benchmarks/results/selection_<device>.json and .md (``--merge`` keeps rows of earlier runs for cases not
re-run).
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
from hf_subprune.maths.selection import (  # noqa: E402
    GroupLayout,
    Selection,
    SiteStatistics,
    _dependence_tol,
    _jittered_cholesky,
    check_budget,
    greedy_select,
)

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SIZES = {"cpu": "1536,4096", "cuda": "1536,4096,8192,14336"}
# Output width m of a model whose MLP has d neurons: SmolLM2-135M, a square site, Llama-3.2-1B, Llama-3-8B.
MODEL_WIDTHS = {1536: 576, 4096: 4096, 8192: 2048, 14336: 4096}
# Targets (seconds) of the default path (after / float32), keyed by (case, d, device).
TARGETS = {("neurons", 14336, "cuda"): 5.0}
VARIANTS = [("after", "float32"), ("after", "float64"), ("before", "float64"), ("before", "float32")]


# --------------------------------------------------------------------------------------------------
# The previous implementation, to time against (unchanged but for names)
# --------------------------------------------------------------------------------------------------


def _reference_problem(stats: SiteStatistics, bias_shift: bool, dtype: torch.dtype, damping: float):
    stats = stats.to(dtype=dtype)
    gram, cross, target_sq = stats.centred() if bias_shift else (stats.gram, stats.cross, stats.target_sq)
    own = gram.diagonal().clone()
    diag = gram.diagonal()
    lam = (float(damping * diag.mean().clamp_min(0)) if diag.numel() else 0.0) + 0.0 * own.clamp_min(0)
    gram = gram + torch.diag(lam)
    return stats, gram, cross, float(target_sq), lam, own


class _ReferencePicker:
    def __init__(self, num_groups: int, partition, per_class, device, rtol: float = 1e-4) -> None:
        self.available = torch.ones(num_groups, dtype=torch.bool, device=device)
        self.partition = partition.to(device) if partition is not None else None
        self.per_class = per_class
        self.rtol = rtol
        self.counts = (torch.zeros(int(partition.max()) + 1, dtype=torch.long, device=device)
                       if partition is not None else None)

    def pick(self, gain: torch.Tensor) -> int:
        candidates = self.available
        if self.partition is not None:
            candidates = candidates & (self.counts[self.partition] < self.per_class)
        masked = torch.where(candidates, gain, torch.full_like(gain, -1.0))
        best = masked.max()
        near = candidates & (masked >= best - self.rtol * best.abs())
        g = int(torch.argmax(near.to(torch.uint8)))
        self.available[g] = False
        if self.partition is not None:
            self.counts[self.partition[g]] += 1
        return g


def _reference_neurons(gram, cross, lam, own, k, picker, tol):
    d, m = cross.shape
    dtype, device = cross.dtype, cross.device
    tiny = torch.finfo(dtype).tiny
    own = own.clamp_min(tiny)
    resid = gram.diagonal().clone()
    norms = cross.square().sum(1)
    factor_t = torch.zeros(k, d, dtype=dtype, device=device)
    whitened = torch.zeros(k, m, dtype=dtype, device=device)
    kept, gains, dependent, s = [], torch.zeros(k, dtype=dtype), 0, 0
    for step in range(k):
        live = resid - lam > tol * own
        gain = torch.where(live, norms.clamp_min(0) / resid.clamp_min(tiny), torch.zeros_like(norms))
        j = picker.pick(gain)
        kept.append(j)
        if not bool(live[j]):
            dependent += 1
            continue
        pivot = resid[j].sqrt()
        f_j = factor_t[:s, j]
        u = (cross[j] - f_j @ whitened[:s]) / pivot
        both = torch.stack([f_j, whitened[:s] @ u]) @ factor_t[:s]
        q = (gram[j] - both[0]) / pivot
        c_r_u = cross @ u - both[1]
        u_sq = u.dot(u)
        norms += q * (q * u_sq - 2 * c_r_u)
        resid -= q.square()
        factor_t[s], whitened[s] = q, u
        gains[step] = u_sq
        s += 1
    return kept, gains, dependent


def _reference_groups(gram, cross, lam, own, k, r, picker, tol):
    d, m = cross.shape
    dtype, device = cross.dtype, cross.device
    ng = d // r
    c_r = cross.clone()
    blocks = gram.view(ng, r, ng, r).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()
    own = own.view(ng, r).sum(-1).clamp_min(torch.finfo(dtype).tiny)
    lam_groups = lam.view(ng, r).sum(-1)
    eye_r = torch.eye(r, dtype=dtype, device=device)
    factor = torch.zeros(d, k * r, dtype=dtype, device=device)
    kept, gains, dependent, used = [], torch.zeros(k, dtype=dtype), 0, 0
    for step in range(k):
        live = blocks.diagonal(dim1=-2, dim2=-1).sum(-1) - lam_groups > tol * own
        chol = _jittered_cholesky(torch.where((live & picker.available)[:, None, None], blocks, eye_r))
        gain = torch.linalg.solve_triangular(chol, c_r.view(ng, r, m), upper=False).square().sum((-2, -1))
        g = picker.pick(torch.where(live, gain, torch.zeros_like(gain)))
        kept.append(g)
        if not bool(live[g]):
            dependent += 1
            continue
        gains[step] = gain[g].cpu()
        rows = slice(g * r, (g + 1) * r)
        v = gram[rows].T.clone()
        v -= factor[:, :used] @ factor[rows, :used].T
        l_g = _jittered_cholesky(blocks[g])
        q = torch.linalg.solve_triangular(l_g, v.T, upper=False).T
        u = torch.linalg.solve_triangular(l_g, c_r[rows], upper=False)
        factor[:, used : used + r] = q
        used += r
        c_r.addmm_(q, u, alpha=-1)
        qg = q.reshape(ng, r, r)
        blocks -= qg @ qg.transpose(-1, -2)
    return kept, gains, dependent


@torch.no_grad()
def reference_greedy_select(stats: SiteStatistics, k, group_size=1, groups=None, *, damping=1e-3,
                            partition=None, per_class=None, dtype=None) -> Selection:
    """The previous ``greedy_select`` (no prior, no shrinkage, with the intercept)."""
    stats.check_finite()
    dtype = dtype or stats.gram.dtype
    stats_d, gram, cross, target_sq, lam, own = _reference_problem(stats, True, dtype, damping)
    d, m = cross.shape
    layout = GroupLayout.build(d, group_size, groups)
    k, partition = check_budget(k, layout, partition, per_class)
    device = gram.device
    r, ng = layout.group_size, layout.num_groups
    order = layout.columns.to(device).flatten()
    identity = bool(torch.equal(order, torch.arange(d, device=device)))
    gram_p = gram if identity else gram.index_select(0, order).index_select(1, order)
    cross_p = cross if identity else cross.index_select(0, order)
    own_p = own if identity else own[order]
    lam_p = lam if identity else lam[order]
    picker = _ReferencePicker(ng, partition, per_class, device)
    run = _reference_neurons if r == 1 else _reference_groups
    args = (gram_p, cross_p, lam_p, own_p, k) + (() if r == 1 else (r,)) + (picker, _dependence_tol(dtype))
    kept, gains, dependent = run(*args)
    curve = target_sq - torch.cumsum(gains, 0)
    cols = layout.kept_columns(kept).to(device)
    # The previous refit: one Cholesky of G_SS in ascending order, cholesky_solve.
    factor = _jittered_cholesky(gram[cols][:, cols])
    c_s = cross[cols]
    w_t = torch.cholesky_solve(c_s, factor)
    error = target_sq - float((w_t * c_s).sum())
    n = stats_d.count.clamp_min(1)
    shift = stats_d.target_sum / n - w_t.T @ (stats_d.input_sum[cols] / n)
    return Selection(kept, cols.cpu(), w_t.T.contiguous(), shift, curve, float(stats_d.target_sq), error,
                     {"dependent_picks": dependent, "solve_dtype": str(dtype).removeprefix("torch.")})


# --------------------------------------------------------------------------------------------------
# Problems and timing
# --------------------------------------------------------------------------------------------------


def synthetic_statistics(d: int, m: int, *, seed: int, device: str, dtype=torch.float64) -> SiteStatistics:
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
    return SiteStatistics(gram, cross, scalar(target_sq), scalar(n), n * mean, n * wm, scalar(n))


def cases(sizes: list[tuple[int, int]], heads: bool, keep: float = 0.7):
    for d, m in sizes:
        yield {"case": "neurons", "d": d, "m": m, "k": round(keep * d), "group_size": 1}
    if heads:
        yield {"case": "heads-9x64", "d": 576, "m": 576, "k": 6, "group_size": 64, "kv_groups": 3}
        yield {"case": "heads-32x128", "d": 4096, "m": 4096, "k": 24, "group_size": 128}


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        d, _, m = item.partition("x")
        sizes.append((int(d), int(m) if m else MODEL_WIDTHS.get(int(d), round(int(d) / 3.5))))
    return sizes


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(stats: SiteStatistics, case: dict, implementation: str, dtype: str) -> Selection:
    kwargs = {"group_size": case["group_size"]}
    if "kv_groups" in case:
        heads = case["d"] // case["group_size"]
        per_kv = heads // case["kv_groups"]
        kwargs.update(partition=torch.arange(heads) // per_kv, per_class=case["k"] // case["kv_groups"])
    if implementation == "after":
        return greedy_select(stats, case["k"], dtype=None if dtype == "float32" else torch.float64, **kwargs)
    return reference_greedy_select(stats, case["k"], dtype=getattr(torch, dtype), **kwargs)


def agreement(sel: Selection, ref: Selection) -> dict:
    """How the picks of ``sel`` compare with those of ``ref``."""
    first = next((i for i, (a, b) in enumerate(zip(sel.kept, ref.kept)) if a != b), None)
    return {
        "first_different_pick": first,
        "same_set": sorted(sel.kept) == sorted(ref.kept),
        "error_vs_reference": None if ref.error in (None, 0) else round((sel.error - ref.error) / abs(ref.error), 9),
    }


def time_case(case: dict, variants: list[tuple[str, str]], *, device: str, repeat: int, seed: int) -> list[dict]:
    stats = synthetic_statistics(case["d"], case["m"], seed=seed, device=device)
    sync(device)
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    selections: dict[tuple[str, str], Selection] = {}
    peak: dict[tuple[str, str], float] = {}
    for _ in range(repeat):
        for variant in variants:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            selections[variant] = run_variant(stats, case, *variant)
            sync(device)
            times[variant].append(time.perf_counter() - start)
            if device == "cuda":
                peak[variant] = torch.cuda.max_memory_allocated() / 2**30
    reference = selections.get(("after", "float64")) or next(iter(selections.values()))
    rows = []
    for variant in variants:
        sel, seconds = selections[variant], statistics.median(times[variant])
        target = TARGETS.get((case["case"], case["d"], device)) if variant == ("after", "float32") else None
        row = dict(case, implementation=variant[0], dtype=variant[1], device=device, seconds=round(seconds, 4),
                   all_seconds=[round(t, 4) for t in times[variant]], target=target,
                   passed=None if target is None else seconds < target,
                   solve_dtype=sel.diagnostics.get("solve_dtype"),
                   solve_dtype_reason=sel.diagnostics.get("solve_dtype_reason"),
                   final_relative_error=round(float(sel.error) / sel.target_sq, 6),
                   dependent_picks=sel.diagnostics.get("dependent_picks"),
                   **{f"vs_after_float64_{key}": value for key, value in agreement(sel, reference).items()})
        if device == "cuda":
            row["peak_memory_gib"] = round(peak[variant], 2)
        rows.append(row)
    del stats, selections
    return rows


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
        f"({env['cpu_count']} CPUs, shared with other jobs; load average {env['load_average_1_5_15min'][0]} at the "
        f"end), {env['date']}.",
        "Time of `greedy_select` (greedy steps + refit) on float64 statistics, median over repeats, the variants of",
        "a case timed in turn. *before*: the previous implementation; *after / float32*: the default call (float32",
        "greedy, checked, refit in float64; `solve` says where the picks came from); *after / float64*:",
        "`dtype=torch.float64`. *picks vs after/float64*: the first pick that differs (`-`: none) and whether the",
        "kept sets are equal.",
        "",
        "| case | d | m | k | r | implementation | dtype | solve | seconds | speed-up vs before/float64 "
        "| picks vs after/float64 | target |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | --- | ---: |",
    ]
    base = {(r["case"], r["d"], r["k"]): r["seconds"] for r in rows
            if (r["implementation"], r["dtype"]) == ("before", "float64")}
    for r in rows:
        target = "-" if r["target"] is None else f"< {r['target']:g} s ({'pass' if r['passed'] else 'fail'})"
        b = base.get((r["case"], r["d"], r["k"]))
        speedup = "-" if b is None else f"{b / r['seconds']:.1f}x"
        first = r["vs_after_float64_first_different_pick"]
        picks = f"{'-' if first is None else first}, {'same set' if r['vs_after_float64_same_set'] else 'other set'}"
        lines.append(
            f"| {r['case']} | {r['d']} | {r['m']} | {r['k']} | {r['group_size']} | {r['implementation']} "
            f"| {r['dtype']} | {r['solve_dtype']} | {r['seconds']:.3f} | {speedup} | {picks} | {target} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", default=None, help="comma-separated d (or DxM) for the neuron case "
                        "(default: 1536,4096 on cpu; 1536,4096,8192,14336 on cuda)")
    parser.add_argument("--dtype", default="float32,float64",
                        help="comma-separated solve dtypes to time: float32 (the default path) and/or float64")
    parser.add_argument("--keep", type=float, default=0.7, help="fraction of the neurons kept (k = round(keep d))")
    parser.add_argument("--before-max-d", type=int, default=4096,
                        help="time the previous implementation only up to this d (it is O(k d m) gemv-bound)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant (the median is reported)")
    parser.add_argument("--no-heads", action="store_true", help="skip the attention cases")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", action="store_true", help="keep earlier rows of the results file for other cases")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    dtypes = [t.strip() for t in args.dtype.split(",") if t.strip()]
    if not dtypes or set(dtypes) - {"float32", "float64"}:
        parser.error("--dtype takes float32 and/or float64")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = parse_sizes(args.sizes or DEFAULT_SIZES[args.device])

    # Warm up kernels and libraries on small problems (not timed).
    warm = {"d": 256, "m": 64, "k": 128, "group_size": 1}
    for variant in [(impl, dt) for impl in ("after", "before") for dt in dtypes]:
        run_variant(synthetic_statistics(256, 64, seed=args.seed, device=args.device), warm, *variant)
        run_variant(synthetic_statistics(512, 64, seed=args.seed, device=args.device),
                    {"d": 512, "m": 64, "k": 2, "group_size": 128}, *variant)
    sync(args.device)

    rows = []
    for case in cases(sizes, heads=not args.no_heads, keep=args.keep):
        variants = [(impl, dt) for impl, dt in VARIANTS
                    if dt in dtypes and (impl == "after" or case["d"] <= args.before_max_d)]
        for row in time_case(case, variants, device=args.device, repeat=args.repeat, seed=args.seed):
            rows.append(row)
            print(f"{row['case']:12s} d={row['d']:6d} m={row['m']:5d} k={row['k']:6d} r={row['group_size']:4d} "
                  f"{row['implementation']:6s} {row['dtype']}: {row['seconds']:.3f} s {row['all_seconds']} "
                  f"(solve {row['solve_dtype']}; first pick differing from after/float64: "
                  f"{row['vs_after_float64_first_different_pick']})", flush=True)

    env = environment(args.device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"selection_{args.device}.json"
    if args.merge and json_path.exists():
        def key(r: dict) -> tuple:
            return r["case"], r["d"], r["k"], r["group_size"], r.get("implementation"), r.get("dtype")

        new_keys = {key(r) for r in rows}
        old = [r for r in json.loads(json_path.read_text())["results"]
               if "implementation" in r and key(r) not in new_keys]
        rows = sorted(old + rows, key=lambda r: (r["case"] != "neurons", r["case"], r["d"], r["k"]))
    json_path.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    table = markdown(rows, env)
    (args.out_dir / f"selection_{args.device}.md").write_text(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
