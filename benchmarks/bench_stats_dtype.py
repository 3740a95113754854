"""Statistics summed in float32 against float64: does the cut change? (``stats_dtype="auto"`` sums in float32 for a
model that is not float64; until the nineteenth session it summed in float64 on the CPU.)

SmolLM2-135M pruned at each --sparsities from the same --num-samples x --seq-len WikiText-2 valid tokens, once with
each accumulator dtype (the products are float32 either way; with float32 sums the refit solves in float32 too):
per run, the sites whose kept set differs, the columns swapped, the largest relative difference of a site's
reconstruction error, the time, and the perplexity on WikiText-2 test (in the calibration's domain) and on the
pydoc held-out half (out of it).

    python benchmarks/bench_stats_dtype.py [--sparsities 0.2,0.5] [--threads 1]
    python benchmarks/bench_stats_dtype.py --model minilm [--sparsities 0.3,0.5] [--n 16,128]

``--model minilm``: all-MiniLM-L6-v2 pruned from n SST-2 train sentences (one per sample, seed 0): with 16 the
sites see fewer tokens than a quarter of their columns and the greedy chooses on the original columns' error
(``layer_greedy_fs``), with 128 on the refit's. Reported instead of perplexity: the mean cosine of the pruned model's
mean-pooled embeddings of the 872 SST-2 validation sentences to the dense model's.

Appends rows to benchmarks/results/stats_dtype.jsonl (each with its run) and rewrites stats_dtype.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from hf_subprune import prune  # noqa: E402
from hf_subprune.calibration import builtin_text, text_samples, token_blocks  # noqa: E402
from hf_subprune.evaluation import embedding_cosine, mean_pooled_embeddings, perplexity  # noqa: E402
from hf_subprune.loading import load_model  # noqa: E402

from data import add_data_arguments, require, sst2_rows, wikitext_text  # noqa: E402
from provenance import commit, run_label  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DTYPES = ("float64", "float32")


def compare(a, b) -> dict:
    """How far the float32 run's cut (``b``) is from the float64 one's (``a``), site by site."""
    swapped = [len(set(x.kept) ^ set(y.kept)) // 2 for x, y in zip(a.sites, b.sites)]
    return {"sites": len(a.sites), "sites_differing": sum(s > 0 for s in swapped), "columns_swapped": sum(swapped),
            "max_relative_error_difference": max(abs(x.error - y.error) / max(x.error, 1e-30)
                                                 for x, y in zip(a.sites, b.sites))}


def record(row: dict, results: dict, result, out: Path) -> None:
    """Keep ``result`` under its dtype, compare it with float64's cut when it is not float64's, append the row."""
    results[row["dtype"]] = result
    if row["dtype"] != DTYPES[0]:
        row["against_float64"] = compare(results[DTYPES[0]], result)
    print(json.dumps(row), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def against(row: dict) -> str:
    """The comparison columns of a table row (dashes for the float64 run itself)."""
    diff = row.get("against_float64")
    if not diff:
        return "- | - | -"
    return f"{diff['sites_differing']} / {diff['sites']} | {diff['columns_swapped']} | " \
           f"{diff['max_relative_error_difference']:.1e}"


def table(rows: list[dict]) -> str:
    lines = ["# Statistics summed in float32 against float64", "",
             "SmolLM2-135M, WikiText-2 valid calibration; perplexity on WikiText-2 test (in domain) and the pydoc "
             "held-out half (out of it). Sites differing: kept sets not equal to float64's; error difference: the "
             "largest relative difference of a site's reconstruction error.", "",
             "| run | commit | sparsity | tokens | dtype | seconds | WikiText-2 | pydoc | sites differing | columns "
             "swapped | error difference |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in [r for r in rows if r.get("model", "smollm2") == "smollm2"]:
        lines.append(f"| {r['run']} | {r['commit']} | {r['sparsity']:.0%} | {r['num_samples']} x {r['seq_len']} | "
                     f"{r['dtype']} | {r['seconds']:.0f} | {r['wikitext']:.3f} | {r['pydoc']:.3f} | {against(r)} |")
    minilm = [r for r in rows if r.get("model") == "minilm"]
    if minilm:
        lines += ["", "## all-MiniLM-L6-v2", "", "n SST-2 train sentences, one per sample (seed 0); cosine: mean "
                  "cosine of the pruned model's mean-pooled embeddings of the SST-2 validation sentences to the dense "
                  "model's. "
                  "Chosen on: the error the greedy minimised at the MLP sites (the original columns' below a token "
                  "per four columns).", "",
                  "| run | commit | sparsity | n (tokens) | chosen on | dtype | seconds | cosine | sites differing "
                  "| columns swapped | error difference |",
                  "| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in minilm:
            lines.append(f"| {r['run']} | {r['commit']} | {r['sparsity']:.0%} | {r['n']} ({r['tokens']}) | "
                         f"{r['chosen_on']} | {r['dtype']} | {r['seconds']:.0f} | {r['cosine']:.5f} | {against(r)} |")
    return "\n".join(lines) + "\n"


def run_minilm(args, out: Path, run: str, code: str) -> None:
    """Each (sparsity, n): the same calibration pruned once per accumulator dtype, compared with float64's cut."""
    pool = [s.strip() for s in sst2_rows("train", args.data, args.hub)[0][:5000]]
    val = [s.strip() for s in sst2_rows("validation", args.data, args.hub)[0]]
    model, tokenizer, _ = load_model("minilm")
    with torch.no_grad():
        reference = mean_pooled_embeddings(model, tokenizer, val)
    for sparsity in map(float, args.sparsities.split(",")):
        for n in map(int, args.n.split(",")):
            order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:n].tolist()
            ids, mask = text_samples([pool[i] for i in order], tokenizer, n, 128)
            results = {}
            for dtype in DTYPES:
                pruned = copy.deepcopy(model)
                start = time.perf_counter()
                result = prune(pruned, input_ids=ids, attention_mask=mask, sparsity=sparsity, num_samples=n,
                               seq_len=int(ids.shape[1]), stats_dtype=dtype, progress=False)
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    cosine = embedding_cosine(reference, mean_pooled_embeddings(pruned, tokenizer, val))
                chosen = sorted({s.diagnostics.get("selection_error", "-") for s in result.sites if s.kind == "mlp"})
                row = {"model": "minilm", "run": run, "commit": code, "sparsity": sparsity, "n": n,
                       "tokens": int(mask.sum()), "chosen_on": "/".join(chosen), "dtype": dtype, "seconds": seconds,
                       "threads": args.threads, "cosine": cosine}
                record(row, results, result, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    parser.add_argument("--sparsities", default=None, help="default: 0.2,0.5 (SmolLM2), 0.3,0.5 (MiniLM)")
    parser.add_argument("--n", default="16,128", help="MiniLM: calibration sentences per run")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    add_data_arguments(parser)
    args = parser.parse_args()
    args.sparsities = args.sparsities or ("0.3,0.5" if args.model == "minilm" else "0.2,0.5")
    torch.set_num_threads(args.threads)
    run, code = run_label(), commit()
    out = RESULTS / "stats_dtype.jsonl"
    if args.model == "minilm":
        require(args.data, args.hub, sst2=("train", "validation"))
        run_minilm(args, out, run, code)
    else:
        require(args.data, args.hub, wikitext=("valid", "test"))
        run_smollm2(args, out, run, code)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    (RESULTS / "stats_dtype.md").write_text(table(rows))
    print(table(rows))


def run_smollm2(args, out: Path, run: str, code: str) -> None:
    model, tokenizer, _ = load_model("smollm2")
    ids = token_blocks([wikitext_text("valid", args.data, args.hub)], tokenizer, args.num_samples, args.seq_len, seed=0)
    texts = {"wikitext": wikitext_text("test", args.data, args.hub), "pydoc": builtin_text("heldout")}
    for sparsity in map(float, args.sparsities.split(",")):
        results = {}
        for dtype in DTYPES:
            start = time.perf_counter()
            result = prune(copy.deepcopy(model), input_ids=ids, sparsity=sparsity, stats_dtype=dtype, progress=False)
            seconds = time.perf_counter() - start
            row = {"run": run, "commit": code, "sparsity": sparsity, "num_samples": args.num_samples,
                   "seq_len": args.seq_len, "dtype": dtype, "seconds": seconds, "threads": args.threads,
                   **{name: perplexity(result.model, tokenizer, text, max_tokens=args.eval_tokens)["perplexity"]
                      for name, text in texts.items()}}
            record(row, results, result, out)
        del results


if __name__ == "__main__":
    main()
