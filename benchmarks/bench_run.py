"""Time and peak memory of one pruning run of SmolLM2-135M (greedy+refit, defaults but --variant), alone on the
machine, and the perplexity it reaches (WikiText-2 test, the first --eval-tokens tokens in windows of 512).

    python benchmarks/bench_run.py --sparsity 0.2 --num-samples 32 --seq-len 512
    python benchmarks/bench_run.py --sparsity 0.2 --num-samples 128 --seq-len 512   # the issue's calibration
    python benchmarks/bench_run.py --sparsity 0.2 --num-samples 128 --seq-len 512 --variant asymmetric

Rows accumulate in benchmarks/results/pruning_run_smollm2.json (one per variant, sparsity and calibration size; a
rerun replaces its row) and the table in pruning_run_smollm2.md is rewritten from them. WikiText-2 comes from
--data DIR (default ../shared/data), or with --hub through `datasets` from the Hugging Face Hub.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

if "--hub" not in sys.argv[1:]:  # --hub loads the data sets from the Hub: the network stays on
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # data.py, a sibling

import torch  # noqa: E402

from hf_subprune import PruneConfig, prune  # noqa: E402
from hf_subprune.config import VARIANTS  # noqa: E402
from hf_subprune.calibration import load_texts, token_blocks  # noqa: E402
from hf_subprune.evaluation import perplexity  # noqa: E402
from hf_subprune.loading import load_model  # noqa: E402

from data import add_data_arguments, require, wikitext_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _key(row: dict) -> tuple:
    return row["variant"], row["sparsity"], row["tokens"]


def _table(rows: list[dict]) -> str:
    lines = [f"# One pruning run, {os.cpu_count()} CPU cores, torch {torch.__version__}", "",
             "Greedy+refit, default settings except the variant; perplexity on the first tokens of WikiText-2 test "
             "in windows of 512 (dense: 29.60 on 8192 tokens).", "",
             "| model | variant | sparsity | calibration | total s | statistics s | selection s | peak RSS GiB | "
             "RSS after load GiB | perplexity |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["sparsity"], r["tokens"], r["variant"])):
        ppl = f"{r['perplexity']:.2f} ({r['eval_tokens']} tokens)" if r.get("perplexity") else "-"
        lines.append(f"| SmolLM2-135M | {r['variant']} | {r['sparsity']:.0%} | {r['num_samples']} x {r['seq_len']} "
                     f"= {r['tokens']} tokens | {r['seconds']:.1f} | {r['seconds_statistics']:.1f} | {r['seconds_selection']:.1f} | "
                     f"{r['peak_rss_gib']:.2f} | {r['rss_after_load_gib']:.2f} | {ppl} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    default = next(f.default for f in dataclasses.fields(PruneConfig) if f.name == "variant")
    parser.add_argument("--variant", choices=VARIANTS, default=default)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="0: skip the perplexity")
    add_data_arguments(parser)
    args = parser.parse_args()
    require(args.data, args.hub, wikitext=("valid", "test") if args.eval_tokens else ("valid",))
    model, tok, _ = load_model("smollm2", dtype="float32")
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ids = token_blocks(load_texts([wikitext_text("valid", args.data, args.hub)]), tok, args.num_samples, args.seq_len)
    start = time.perf_counter()
    result = prune(model, input_ids=ids, sparsity=args.sparsity, variant=args.variant, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row = {"model": "SmolLM2-135M", "variant": args.variant, "sparsity": args.sparsity,
           "num_samples": args.num_samples, "seq_len": args.seq_len, "tokens": int(ids.numel()), "seconds": seconds,
           "seconds_statistics": sum(s.seconds_statistics for s in result.sites),
           "seconds_selection": sum(s.seconds_selection for s in result.sites), "peak_rss_gib": peak,
           "rss_after_load_gib": rss_loaded, "cpus": os.cpu_count(), "torch": torch.__version__}
    if args.eval_tokens:
        text = wikitext_text("test", args.data, args.hub)
        out = perplexity(model, tok, text, window=512, max_tokens=args.eval_tokens)
        row.update(perplexity=out["perplexity"], eval_tokens=out["tokens"])
    path = RESULTS / "pruning_run_smollm2.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows = rows if isinstance(rows, list) else []  # an older single-row file is replaced
    rows = [r for r in rows if _key(r) != _key(row)] + [row]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    (RESULTS / "pruning_run_smollm2.md").write_text(_table(rows))
    print(_table(rows))


if __name__ == "__main__":
    main()
