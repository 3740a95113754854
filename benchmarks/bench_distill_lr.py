"""Distillation recovery against its learning rate and steps: SmolLM2-135M pruned by the default at 20% (or
--sparsity) from 32 x 512 WikiText-2 valid tokens (seed 0), then a full fine-tune on the KL from the dense model
over those same calibration sequences (batches of 4), as ``bench_recovery.py`` runs its "full, calibration,
distillation" row.
The reference is the dense model itself (distilled from itself it stays where it is).

    python benchmarks/bench_distill_lr.py --runs 2e-5:16,1e-4:16,5e-4:16,2e-4:48,2e-4:64
    python benchmarks/bench_distill_lr.py --sparsity 0.5 --runs 4e-4:64:96   # + 96 sequences the teacher writes

A third field (lr:steps:N) adds N sequences the dense teacher writes from 8-token prompts of the calibration
blocks (``recover(teacher_samples=N)``) to the 32 it distils on.

Each finished run is appended to benchmarks/results/recovery_distill_lr.jsonl (rerunning skips those there) and the
table rewritten to recovery_distill_lr.md; another sparsity than 20% writes recovery_distill_lr_<percent>.{jsonl,md}.
--name picks another stem (e.g. to keep runs of a newer pruning default apart); each row records the pruned
model it started from (`reference`) and the commit.
--data points at the shared data folder (default ../shared/data).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_recovery import RESULTS, Task  # noqa: E402
from data import add_data_arguments, require  # noqa: E402
from provenance import commit  # noqa: E402
from hf_subprune import prune  # noqa: E402
from hf_subprune.integrations.recovery import RecoveryConfig, _teacher_written, finetune, lm_examples  # noqa: E402

STEM = "recovery_distill_lr"


def table(records: list[dict], reference: dict, sparsity: float = 0.2) -> str:
    lines = [f"# SmolLM2-135M at {sparsity:.0%}: full distillation recovery against learning rate and steps", "",
             "Pruned by the default from 32 x 512 WikiText-2 valid tokens (seed 0), then a full fine-tune on the KL "
             "from the dense model over the same 32 sequences, batches of 4, linear decay, seed 0. Perplexity on the "
             f"first {reference['tokens']} tokens of WikiText-2 test and of the held-out built-in text, windows of "
             "512. x dense: against the dense model (distilling it from itself leaves it in place).", "",
             f"Dense: {reference['wikitext']:.2f} / {reference['heldout']:.2f}; pruned, no recovery: "
             f"{reference['pruned_wikitext']:.2f} / {reference['pruned_heldout']:.2f}.", "",
             "Teacher-written: sequences the dense model wrote from 8-token prompts of the calibration blocks, "
             "distilled on with them (`recover(teacher_samples=N)`).", "",
             "| lr | steps | teacher-written | WikiText-2 test | x dense | held-out built-in | KL first -> last | "
             "train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(records, key=lambda r: (r.get("teacher_samples", 0), r["steps"], r["lr"])):
        ratio = r["wikitext"] / r.get("reference", reference)["wikitext"]
        lines.append(f"| {r['lr']:g} | {r['steps']} | {r.get('teacher_samples', 0)} | {r['wikitext']:.2f} | "
                     f"{ratio:.3f}x | {r['heldout']:.2f} | "
                     f"{r['loss']['first']:.3f} -> {r['loss']['last']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="2e-5:16,1e-4:16,5e-4:16",
                        help="lr:steps or lr:steps:teacher_samples, comma-separated")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default=None,
                        help="results file stem (default: recovery_distill_lr, _<percent> for another sparsity)")
    add_data_arguments(parser)
    args = parser.parse_args()
    require(args.data, args.hub, wikitext=("valid", "test"))
    if args.threads:
        torch.set_num_threads(args.threads)
    stem = args.name or (STEM if args.sparsity == 0.2 else f"{STEM}_{round(100 * args.sparsity)}")
    jsonl = RESULTS / f"{stem}.jsonl"
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line] if jsonl.exists() else []
    runs = [(float(lr), int(steps), int(rest[0]) if rest else 0)
            for lr, steps, *rest in (item.split(":") for item in args.runs.split(","))]
    todo = [run for run in runs if not any((r["lr"], r["steps"], r.get("teacher_samples", 0)) == run
                                           for r in records)]
    settings = argparse.Namespace(data=args.data, hub=args.hub, device="cpu", num_samples=32, seq_len=512,
                                  eval_window=512, eval_tokens=args.eval_tokens, steps=16, batch_size=4, lora_r=8,
                                  quiet=True, lr=None)
    task = Task(settings)
    dense_q = task.quality(task.model)
    pruned = copy.deepcopy(task.model)
    prune(pruned, input_ids=task.calibration, progress=False, sparsity=args.sparsity, num_samples=32, seq_len=512)
    pruned_q = task.quality(pruned)
    reference = {"wikitext": dense_q["wikitext2_test"]["perplexity"], "heldout": dense_q["heldout"]["perplexity"],
                 "tokens": dense_q["wikitext2_test"]["tokens"],
                 "pruned_wikitext": pruned_q["wikitext2_test"]["perplexity"],
                 "pruned_heldout": pruned_q["heldout"]["perplexity"]}
    for lr, steps, written in todo:
        settings.lr, settings.steps = lr, steps
        examples, extra = lm_examples(task.calibration), {}
        if written:
            more, extra["teacher_written"] = _teacher_written(task.model, examples,
                                                              RecoveryConfig(distill=True, teacher_samples=written))
            examples = examples + more
        model, stats = finetune(copy.deepcopy(pruned), task.tokenizer, examples, task.recovery_config("full", True),
                                teacher=task.model, device="cpu", progress=False)
        q = task.quality(model)
        row = {"lr": lr, "steps": steps, "teacher_samples": written, **extra, "reference": reference,
               "commit": commit(),
               "wikitext": q["wikitext2_test"]["perplexity"],
               "heldout": q["heldout"]["perplexity"], "loss": stats.get("loss"), "seconds": stats.get("seconds")}
        records.append(row)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        (RESULTS / f"{stem}.md").write_text(table(records, reference, args.sparsity))
        print(json.dumps(row), flush=True)
    text = table(records, reference, args.sparsity)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
