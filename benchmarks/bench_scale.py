"""Scale: time and peak memory of a prune as the model grows, and the README's demo before and after a change.

Two cases, each run as a separate process (``python -m hf_subprune prune ...``) whose resident memory, with its
children's, is sampled every 20 ms (psutil):

- ``synthetic``: Llama models with random bf16 weights written to disk (sharded above 1 GB) at about 0.1B,
  0.35B and 1.2B parameters (``SIZES``; 3B on request), the SmolLM2 tokenizer next to them; each pruned at 20%
  from 8 x 256 tokens of the built-in text. Reported: seconds, peak RSS above a bare ``import hf_subprune``
  (measured the same way), that peak as a fraction of the checkpoint's size on disk (goal < 0.3), and seconds per
  (parameter x token) relative to the smallest size (goal: not growing).
- ``demo``: the README's first command (SmolLM2-135M, 20%, 32 x 256 tokens, --evaluate) with the code at --before
  (a git ref, checked out in a temporary worktree and put first on PYTHONPATH) and with this checkout, one after
  the other on the same machine, once per --demo-dtypes value (goal: >= 2x faster end to end). bfloat16 is what the
  README runs: on a CPU with AMX its products are about 9x float32's.

    python benchmarks/bench_scale.py                        # both cases
    python benchmarks/bench_scale.py --cases synthetic --sizes 0.1b,0.35b
    python benchmarks/bench_scale.py --cases synthetic --sizes 3b    # Llama-3.2-3B's shape, ~20 min on one core

Rows accumulate in benchmarks/results/scale_cpu.jsonl (a rerun replaces rows with the same key) and the table
scale_cpu.md is rewritten from them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import ROOT, commit, run_label  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# name: (hidden, MLP width, layers, heads, kv heads); vocabulary 49152 (SmolLM2's tokenizer), tied embeddings
SIZES = {
    "0.1b": (768, 2048, 12, 12, 4),
    "0.35b": (1024, 2816, 24, 16, 4),
    "1.2b": (2048, 5632, 24, 32, 4),
    "3b": (3072, 8192, 28, 24, 8),  # Llama-3.2-3B's shape; not run by default (about 20 minutes on one core)
}
DEFAULT_SIZES = ["0.1b", "0.35b", "1.2b"]
FLOAT32_INIT = {"0.1b", "0.35b", "1.2b"}
"""Sizes initialised in float32 and cast to bfloat16 (the weights their earlier rows had); larger ones are drawn in
bfloat16 directly, since the float32 model and its bfloat16 cast would need 18 GB at 3B."""
WARM = "after, cache warm"
DEMO = ["prune", "smollm2", "--sparsity", "0.2", "--num-samples", "32", "--seq-len", "256", "--evaluate"]


def _tree_rss(process) -> int:
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd``; its wall time, exit code and peak resident memory (with children), and its output's tail."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    handle = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, _tree_rss(handle))
            except psutil.Error:
                pass
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    return {"seconds": time.perf_counter() - start, "returncode": proc.returncode, "peak_rss_bytes": peak,
            "output_tail": output[-3000:]}


def _python_env(pythonpath: Path | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def write_synthetic(name: str, folder: Path, seed: int = 0) -> tuple[int, int]:
    """A Llama model of size ``name`` with random bf16 weights and the SmolLM2 tokenizer, saved in ``folder``;
    returns (parameters, bytes on disk)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from hf_subprune.loading import load_model

    hidden, mlp, layers, heads, kv = SIZES[name]
    _, tokenizer, _ = load_model("smollm2")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        if name in FLOAT32_INIT:
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        else:
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            try:
                model = LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(default)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)
    del model
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return params, size


def bare_import_rss(python: str) -> int:
    return run_measured([python, "-c", "import hf_subprune, time; time.sleep(0.5)"], env=_python_env())[
        "peak_rss_bytes"]


def run_synthetic(args, python: str) -> list[dict]:
    rows = []
    code = commit()
    base = bare_import_rss(python)
    print(f"bare `import hf_subprune`: peak RSS {base / 2**30:.2f} GiB", flush=True)
    for name in args.sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench_scale-{name}-", dir=args.work_dir) as tmp:
            model_dir, out_dir = Path(tmp) / "model", Path(tmp) / "pruned"
            params, disk = write_synthetic(name, model_dir)
            cmd = [python, "-m", "hf_subprune", "prune", str(model_dir), "--sparsity", "0.2", "--num-samples", "8",
                   "--seq-len", "256", "--output", str(out_dir), "--quiet", *args.prune_args]
            env = _python_env()
            if args.mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            run = run_measured(cmd, env=env)
            if run["returncode"] != 0:
                print(run["output_tail"], flush=True)
            hidden, mlp, layers, heads, kv = SIZES[name]
            row = {"case": "synthetic", "size": name, "parameters": params, "disk_bytes": disk,
                   "shape": {"hidden": hidden, "mlp": mlp, "layers": layers, "heads": heads, "kv_heads": kv},
                   "tokens": 8 * 256, "seconds": run["seconds"], "returncode": run["returncode"],
                   "peak_rss_bytes": run["peak_rss_bytes"], "import_rss_bytes": base,
                   "peak_above_import_over_disk": (run["peak_rss_bytes"] - base) / disk,
                   "prune_args": args.prune_args, "mmap_threshold": args.mmap_threshold,
                   "threads": os.environ.get("OMP_NUM_THREADS"), "commit": code}
            rows.append(row)
            print(f"{name}: {params / 1e9:.2f}B parameters, {disk / 2**30:.2f} GiB on disk, {run['seconds']:.0f} s, "
                  f"peak {run['peak_rss_bytes'] / 2**30:.2f} GiB ({row['peak_above_import_over_disk']:.2f}x disk "
                  "above the import)", flush=True)
    return rows


def run_demo(args, python: str) -> list[dict]:
    rows = []
    run = run_label()
    with tempfile.TemporaryDirectory(prefix="bench_scale-demo-", dir=args.work_dir) as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before], check=True,
                       capture_output=True)
        try:
            # "after" starts from an empty conversion cache (the first run converts the GGUF file), "after, cache
            # warm" runs again on the cache it left; the code before has no cache.
            codes = [("before", tree, commit(tree)), ("after", ROOT, commit()), (WARM, ROOT, commit())]
            runs = [(dtype, code) for dtype in args.demo_dtypes for code in codes]
            if args.demo_runs:  # the README's command as it was against the one it gives now, and nothing else
                runs = [(dtype, code) for dtype, code in runs if f"{code[0]}:{dtype}" in args.demo_runs]
            for dtype, (label, path, ref) in runs:
                out = Path(tmp) / f"out-{label}-{dtype}".replace(", ", "-").replace(" ", "-")
                env = _python_env(path)
                env["HF_SUBPRUNE_CACHE"] = str(Path(tmp) / f"cache-{dtype}")
                if args.threads:
                    env["OMP_NUM_THREADS"] = str(args.threads)
                measured = run_measured([python, "-m", "hf_subprune", *DEMO, "--dtype", dtype, "--output", str(out)],
                                        env=env, cwd=tmp)
                if measured["returncode"] != 0:
                    print(measured["output_tail"], flush=True)
                report = out / "subprune_report.json"
                quality = json.loads(report.read_text()).get("evaluation", {}) if report.exists() else {}
                rows.append({"case": "demo", "run": run, "size": label, "dtype": dtype,
                             "threads": args.threads or None,
                             "ref": ref, "seconds": measured["seconds"], "returncode": measured["returncode"],
                             "peak_rss_bytes": measured["peak_rss_bytes"], "evaluation": quality})
                print(f"demo {label} ({ref}, --dtype {dtype}): {measured['seconds']:.0f} s, peak "
                      f"{measured['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    return rows


def _key(row: dict) -> tuple:
    return (row["case"], row.get("run", ""), row["size"], row.get("mmap_threshold", 0), row.get("commit", ""),
            row.get("dtype", "auto"), " ".join(row.get("prune_args") or []))


def table(rows: list[dict], env: dict) -> str:
    lines = ["# Scale: time and peak memory of a prune", "",
             f"{env['cpu_count']} CPU cores, torch {env['torch']}, {env['date']}. Peak: resident memory of the "
             "prune process and its children, sampled every 20 ms.", "",
             "## Synthetic Llama models (random bf16 weights on disk), 20%, 8 x 256 tokens", "",
             "Malloc: `MALLOC_MMAP_THRESHOLD_` given to the prune process (glibc; `-` = its default, dynamic up to "
             "32 MB). Commit: the code measured. Threads: OMP_NUM_THREADS of the run (`-`: torch's default, or not "
             "recorded before the twelfth session). Flags: --prune-args given to the prune beyond the defaults. "
             "3b (Llama-3.2-3B's shape, run on request) draws its random weights in bfloat16; the others draw them "
             "in float32 and round.", "",
             "| size | parameters | shape (hidden / MLP / layers / heads / kv) | on disk GiB | commit | malloc "
             "| threads | flags | seconds | s per (B params x 1k tokens) | peak RSS GiB | peak above import / on disk "
             "(goal < 0.3) |",
             "| --- | ---: | --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in [r for r in rows if r["case"] == "synthetic"]:
        s = r["shape"]
        rate = r["seconds"] / (r["parameters"] / 1e9 * r["tokens"] / 1e3)
        ok = "pass" if r["peak_above_import_over_disk"] < 0.3 and r["returncode"] == 0 else "fail"
        lines.append(f"| {r['size']} | {r['parameters']:,} | {s['hidden']} / {s['mlp']} / {s['layers']} / "
                     f"{s['heads']} / {s['kv_heads']} | {r['disk_bytes'] / 2**30:.2f} | {r.get('commit', '-')} "
                     f"| {r.get('mmap_threshold') or '-'} | {r.get('threads') or '-'} "
                     f"| {'`' + ' '.join(r['prune_args']) + '`' if r.get('prune_args') else '-'} | {r['seconds']:.0f} "
                     f"| {rate:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['peak_above_import_over_disk']:.2f} "
                     f"({ok}) |")
    runs: dict[str, dict] = {}  # run -> (dtype, code) -> row: speed-ups compare rows of one run only
    for r in rows:
        if r["case"] == "demo":
            runs.setdefault(r.get("run", "earlier"), {})[(r.get("dtype", "auto"), r["size"])] = r
    if runs:
        lines += ["", "## The README's demo command, before and after (same machine, one run)", "",
                  "`hf-subprune " + " ".join(DEMO) + " --dtype DTYPE --output OUT`; threads: OMP_NUM_THREADS "
                  "(`-` = torch's default). Speed-up: against the code before in the same run, same dtype (`-`: "
                  "not run then). \"after\" starts with an empty GGUF conversion cache (it converts and writes it), "
                  "\"after, cache warm\" is the same command run again (rows before the thirteenth session: no cache). "
                  "The machine's speed differs from day to day, so only rows of one run compare.", "",
                  "| run | code | commit | --dtype | threads | seconds | peak RSS GiB | perplexity before -> after "
                  "| speed-up |",
                  "| --- | --- | --- | --- | --- | ---: | ---: | --- | ---: |"]
        order = {"before": 0, "after": 1, WARM: 2}
        for run, demo in runs.items():
            for dtype, label in sorted(demo, key=lambda key: (key[0] != "auto", key[0], order.get(key[1], 3))):
                r, before = demo[(dtype, label)], demo.get((dtype, "before"))
                ppl = r.get("evaluation", {}).get("perplexity") or {}
                quality = f"{ppl['before']:.2f} -> {ppl['after']:.2f}" if ppl else "-"
                speed = f"{before['seconds'] / r['seconds']:.2f}x" if before else "-"
                lines.append(f"| {run} | {label} | {r['ref']} | {dtype} | {r.get('threads') or '-'} "
                             f"| {r['seconds']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} | {quality} | {speed} |")
        lines.append("")
        for run, demo in runs.items():
            old, new, warm = (demo.get(key) for key in (("auto", "before"), ("bfloat16", "after"),
                                                         ("bfloat16", WARM)))
            if old and new:
                again = f"; run again, {warm['seconds']:.0f} s, {old['seconds'] / warm['seconds']:.2f}x" if warm else ""
                lines.append(f"Run {run}: the README's command as it was (float32, the code before) against the "
                             f"command it gives now (`--dtype bfloat16`, {new['ref']}): {old['seconds']:.0f} s -> "
                             f"{new['seconds']:.0f} s, {old['seconds'] / new['seconds']:.2f}x, first run{again}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="synthetic,demo", help="comma-separated: synthetic, demo")
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                        help=f"comma-separated of {', '.join(SIZES)} (default: {', '.join(DEFAULT_SIZES)})")
    parser.add_argument("--before", default="7c33c50", help="git ref of the 'before' demo run (default: %(default)s, "
                        "the code when the scale issue was filed)")
    parser.add_argument("--demo-dtypes", default="auto,bfloat16",
                        help="comma-separated --dtype values the demo runs with, before and after (default: "
                        "%(default)s)")
    parser.add_argument("--demo-runs", default="",
                        help="CODE:DTYPE pairs separated by ';' to run, out of before, after and 'after, cache warm' "
                        "times --demo-dtypes (default: all); e.g. 'before:auto;after:bfloat16;after, cache "
                        "warm:bfloat16' times only the README's command as it was against the one it gives now")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS for the demo runs (0: torch's default)")
    parser.add_argument("--prune-args", nargs=argparse.REMAINDER, default=[],
                        help="further flags for the synthetic prunes (after everything else)")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="bytes: set MALLOC_MMAP_THRESHOLD_ for the synthetic prunes (0: glibc's default)")
    parser.add_argument("--work-dir", default=None, help="where the temporary models go (default: the system's)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.demo_dtypes = [d for d in args.demo_dtypes.split(",") if d]
    args.demo_runs = [r.strip() for r in args.demo_runs.split(";") if r.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    import torch

    python = sys.executable
    rows = []
    cases = args.cases.split(",")
    if "synthetic" in cases:
        rows += run_synthetic(args, python)
    if "demo" in cases:
        rows += run_demo(args, python)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "scale_cpu.jsonl"
    old = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    keys = {_key(r) for r in rows}
    rows = [r for r in old if _key(r) not in keys] + rows
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {"cpu_count": os.cpu_count(), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    text = table(rows, env)
    (args.results / "scale_cpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
