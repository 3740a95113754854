"""Inference speed of the pruned model against the dense one: what people prune for.

SmolLM2-135M pruned at each --sparsities (fraction of the prunable MLP + attention parameters) with each --budgets
(uniform: the stock config, any serving stack; fluctuation: the default's per-layer widths; global: per-layer
widths from the error curves), calibrated on a few WikiText-2 valid sequences (speed does not depend on them).
Measured on --device, in --dtype: every model is pruned first, then --rounds rounds time each model in turn (one
warm-up, then the median of --repeats timed runs), so that a slow spell of the machine falls on all of them; a
row holds the median over the rounds, and its spread (min, max) is kept in the jsonl:

- prefill: one forward over 512 tokens, batch 1 and 8, with the logits of the last position only, as a server's
  prefill computes them (tokens/s = batch x 512 / time);
- decode: 64 new tokens generated greedily (KV cache) after a 16-token prompt, batch 1 and 8
  (tokens/s = batch x 64 / time of the generation less the time of its prefill).

    python benchmarks/bench_speed.py                       # CPU, 20/30/50%, uniform and global widths
    python benchmarks/bench_speed.py --device cuda --dtype bfloat16

Rows accumulate in benchmarks/results/speed_<device>.jsonl, each with its run (the time it started), and the table
speed_<device>.md is rewritten from them: a row's speed-up is against the dense row of its own run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--hub" not in sys.argv[1:]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from hf_subprune import count_parameters, prune  # noqa: E402
from hf_subprune.calibration import load_texts, token_blocks  # noqa: E402
from hf_subprune.loading import load_model  # noqa: E402

from data import add_data_arguments, require, wikitext_text  # noqa: E402
from provenance import run_label  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PREFILL_TOKENS, PROMPT_TOKENS, NEW_TOKENS = 512, 16, 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(model, device: torch.device, batches: list[int], repeats: int, vocab: int) -> dict:
    """Prefill and decode tokens/s at each batch size."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, PREFILL_TOKENS), generator=gen).to(device)
        prefill = _timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), device, repeats)
        prompt = ids[:, :PROMPT_TOKENS]
        mask = torch.ones_like(prompt)

        def generate():
            model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

        prompt_time = _timed(lambda: model(input_ids=prompt, attention_mask=mask, logits_to_keep=1), device, repeats)
        decode = max(_timed(generate, device, repeats) - prompt_time, 1e-9)
        out[f"prefill_b{batch}"] = batch * PREFILL_TOKENS / prefill
        out[f"decode_b{batch}"] = batch * NEW_TOKENS / decode
    return out


def _key(row: dict) -> tuple:
    return row.get("run", ""), row["budget"], row["sparsity"], row["dtype"], row["threads"]


def table(rows: list[dict], device: str) -> str:
    metrics = [k for k in rows[0]["tokens_per_s"]] if rows else []
    head = " | ".join(f"{m.replace('_b', ' b')} tok/s (x dense)" for m in metrics)
    lines = [f"# Inference speed, {device}", "",
             f"SmolLM2-135M; prefill of {PREFILL_TOKENS} tokens, decode of {NEW_TOKENS} new tokens after a "
             f"{PROMPT_TOKENS}-token prompt (KV cache), median over rounds that time every model in turn; x dense: "
             "speed-up over the dense row of the same run, dtype and threads (the machine's speed differs from "
             "one run to the next: only rows of one run compare).", "",
             f"| run | budget | sparsity | parameters | {head} |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in metrics) + " |"]

    def group(r: dict) -> tuple:  # rows before runs were recorded form one run, "earlier"
        return r.get("run", "earlier"), r["dtype"], r["threads"]

    dense = {group(r): r for r in rows if r["budget"] == "dense"}
    for r in sorted(rows, key=lambda r: (group(r), r["budget"] != "dense", r["budget"], r["sparsity"])):
        ref = dense.get(group(r))
        cells = []
        for m in metrics:
            value = r["tokens_per_s"][m]
            ratio = f" ({value / ref['tokens_per_s'][m]:.2f}x)" if ref and r is not ref else ""
            cells.append(f"{value:.0f}{ratio}")
        lines.append(f"| {group(r)[0]} | {r['budget']} | {r['sparsity']:.0%} | {r['params']:,} | "
                     + " | ".join(cells) + " |")
    meta = rows[0] if rows else {}
    lines += ["", f"dtype {meta.get('dtype')}, {meta.get('threads')} threads, torch {torch.__version__}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", default="0.2,0.3,0.5")
    parser.add_argument("--budgets", default="uniform,global", help="comma-separated: uniform, fluctuation, global")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per round (their median)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all models (the median of the rounds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--num-samples", type=int, default=8, help="calibration sequences (speed does not depend on them)")
    parser.add_argument("--seq-len", type=int, default=256)
    add_data_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    require(args.data, args.hub, wikitext=("valid",))
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    base, tokenizer, _ = load_model("smollm2", dtype="float32")
    ids = token_blocks(load_texts([wikitext_text("valid", args.data, args.hub)]), tokenizer, args.num_samples,
                       args.seq_len)
    run = run_label()
    path = RESULTS / f"speed_{device.type}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    batches = [int(b) for b in args.batches.split(",")]
    plan = [("dense", 0.0)] + [(b, float(s)) for b in args.budgets.split(",") for s in args.sparsities.split(",")]
    models = {}
    for budget, sparsity in plan:
        model = copy.deepcopy(base)
        if budget != "dense":
            prune(model, input_ids=ids, sparsity=sparsity, budget=budget, progress=False, device=args.device)
        models[budget, sparsity] = model.to(device=device, dtype=dtype).eval()
        print(f"pruned: {budget} {sparsity:.0%}", flush=True)
    # Rounds over every model in turn, so that a slow spell of the machine hits all of them alike; per model
    # and metric, the median over the rounds (each round: one warm-up run, then --repeats timed runs' median).
    samples: dict[tuple, list[dict]] = {key: [] for key in models}
    for r in range(args.rounds):
        for key, model in models.items():
            samples[key].append(measure(model, device, batches, args.repeats, model.config.vocab_size))
        print(f"round {r + 1}/{args.rounds}: dense {samples['dense', 0.0][-1]}", flush=True)
    for (budget, sparsity), model in models.items():
        runs = samples[budget, sparsity]
        row = {"run": run, "budget": budget, "sparsity": sparsity, "dtype": args.dtype, "threads": torch.get_num_threads(),
               "device": str(device), "params": count_parameters(model), "rounds": args.rounds,
               "tokens_per_s": {m: statistics.median(run[m] for run in runs) for m in runs[0]},
               "spread": {m: [min(run[m] for run in runs), max(run[m] for run in runs)] for m in runs[0]}}
        rows = [r for r in rows if _key(r) != _key(row)] + [row]
        print(budget, f"{sparsity:.0%}", {k: round(v) for k, v in row["tokens_per_s"].items()}, flush=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = table(rows, str(device))
    (RESULTS / f"speed_{device.type}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
