"""Recovery after one-shot pruning: a short fine-tune of the pruned model, merged back into plain weights.

Composition rather than a training loop of our own: peft's LoRA on every Linear layer (``full=True``: every
weight), a stock ``transformers.Trainer``, ``merge_and_unload``, and the export that wrote the input (stock or
heterogeneous, reload-checked, through a temporary folder). The loss is the model's own (next-token loss for a
causal LM, cross-entropy on the labels for a classifier) or, with ``distill``, the KL divergence from the base
model's output distribution, which needs no labels (Minitron's recovery). ``data="calibration"`` trains on the
very token blocks the cut was computed from (the paper's limited-data setting): the folder stores them and their
fingerprint is checked.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import auto_class_for, get_adapter
from ..api import Evaluator, PruneResult, _evaluation, _measure
from ..calibration import draw_samples, fingerprint, load_labelled, load_texts, token_blocks
from ..checks import check_device
from ..config import PruneConfig
from ..evaluation import BUILTIN_HELDOUT, AccuracyEvaluator, PerplexityEvaluator
from ..files import REPORT_FILE
from ..logs import get_logger
from ..outputs.export import check_output_folder, load_calibration, save_pruned

__all__ = ["RecoveryConfig", "RecoveryResult", "recover", "finetune", "lm_examples", "classification_examples",
           "training_device"]

logger = get_logger(__name__)

CALIBRATION = "calibration"
"""The ``data`` value that reuses the calibration blocks recorded with the pruned model."""


@dataclass
class RecoveryConfig:
    """How the pruned model is fine-tuned; recorded in the report's ``recovery`` section."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    full: bool = False  # every weight instead of LoRA adapters
    max_steps: int | None = None
    epochs: float | None = None  # one epoch when neither this nor max_steps is given
    lr: float | None = None  # default: see learning_rate
    warmup: float = 0.0  # share of the steps over which the rate rises linearly from 0, before its linear decay
    batch_size: int = 4
    seq_len: int | None = None  # data files: tokens per block (causal LM) or per text (classifier)
    num_samples: int | None = None  # data files: blocks or texts to train on (default: all)
    distill: bool = False
    teacher: str | None = None  # default: the report's base model
    distill_weight: float = 1.0  # the KL term's share of the loss; the rest is the model's own loss
    distill_hidden: float = 0.0  # with distill: weight of the residual-stream term (see hidden_state_loss)
    teacher_samples: int = 0  # with distill: sequences the teacher writes from prompts of the data, added to it
    bf16: bool = False  # bfloat16 mixed precision (autocast; weights, gradients and optimizer state stay fp32)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give max_steps (--max-steps) or epochs (--epochs), not both: they both say how long "
                             "to train")
        for name in ("lora_r", "batch_size", "max_steps", "num_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of 1 or more, got {value!r}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 tokens, got {self.seq_len}")
        for name in ("lora_alpha", "epochs", "lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a share of the training steps, in [0, 1); got {self.warmup}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if self.teacher is not None and not self.distill:
            raise ValueError("a teacher (--teacher) is only used with distill (--distill)")
        if not self.distill_hidden >= 0:
            raise ValueError(f"distill_hidden must be 0 or more, got {self.distill_hidden}")
        if self.distill_hidden and not self.distill:
            raise ValueError("distill_hidden (--distill-hidden) matches the teacher's hidden states: add distill "
                             "(--distill)")
        if not isinstance(self.teacher_samples, int) or self.teacher_samples < 0:
            raise ValueError(f"teacher_samples must be a whole number of 0 or more, got {self.teacher_samples!r}")
        if self.teacher_samples and not self.distill:
            raise ValueError("teacher_samples (--teacher-samples) are written by the teacher for distillation: "
                             "add distill (--distill)")

    @property
    def learning_rate(self) -> float:
        """The rate given, else 2e-4 with LoRA and 2e-5 for a full fine-tune; for distillation alone, whose KL
        gradients are smaller than a language-model loss's, 5x that with LoRA and 20x (4e-4) for a full fine-tune,
        the best of the sweep at 64 steps at 20% and 50% (benchmarks/bench_distill_lr.py)."""
        if self.lr is not None:
            return self.lr
        base = 2e-5 if self.full else 2e-4
        if self.distill and self.distill_weight == 1:
            return 20 * base if self.full else 5 * base
        return base

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- data -------------------------------------------------------------------------------------------------------

def lm_examples(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """Next-token examples from token blocks (the model shifts the labels itself); padding, where an attention
    mask marks some, is masked and never a label."""
    if attention_mask is None:
        return [{"input_ids": row.long(), "labels": row.long()} for row in input_ids]
    return [{"input_ids": row.long(), "attention_mask": mask.long(), "labels": row.long().masked_fill(mask == 0, -100)}
            for row, mask in zip(input_ids, attention_mask)]


def classification_examples(tokenizer, texts: list[str], labels: list[int] | None, max_length: int) -> list[dict]:
    """Tokenized texts (truncated, padded per batch by the collator), with their labels when there are some."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    rows = [{"input_ids": ids, "attention_mask": mask} for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    if labels is not None:
        for row, label in zip(rows, labels):
            row["labels"] = int(label)
    return rows


def _is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def _windows(texts: list[str], tokenizer, seq_len: int) -> int:
    """How many blocks of ``seq_len`` ``token_blocks`` can cut from ``texts`` (it adds an EOS between texts)."""
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    if tokenizer.eos_token_id is not None and len(texts) > 1:
        tokens += len(texts)
    return tokens // seq_len


def _calibration_blocks(source: PruneResult | Path, report: dict, tokenizer,
                        causal: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The calibration blocks of the cut and their attention mask (None: unpadded), checked against the report's
    fingerprint: stored with the model, or, for a folder saved without them, drawn again from a source that is
    still readable (built-in text, a file)."""
    recorded = report["calibration"]
    if isinstance(source, PruneResult):
        ids, mask = source.input_ids, source.attention_mask
    else:
        ids, mask = load_calibration(source)
    if ids is None:
        origin = str(recorded.get("source", ""))
        path = None if origin.startswith("builtin") else Path(origin)
        if path is not None and not path.is_file():
            raise ValueError(f"data 'calibration': the pruned model keeps no calibration tokens, and its calibration "
                             f"source {origin!r} cannot be read again here; give the data file instead (--data FILE)")
        cfg = report["config"]
        ids, mask = draw_samples(load_texts(path), tokenizer, cfg["num_samples"], cfg["seq_len"], seed=cfg["seed"],
                                 causal=causal)
    found = fingerprint(ids, mask)
    if found != recorded["fingerprint"]:
        raise ValueError(f"data 'calibration': the calibration tokens found have fingerprint {found}, the "
                         f"report records {recorded['fingerprint']}: they are not the samples the cut used")
    return ids, mask


def _blocks_info(source: str, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    return {"source": source, "fingerprint": fingerprint(ids, mask), "num_samples": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]), "tokens": int(ids.numel() if mask is None else mask.sum())}


def _training_data(data: Any, model: nn.Module, tokenizer, report: dict, source: PruneResult | Path,
                   config: RecoveryConfig, text_column: str | None, label_column: str | None) -> tuple[list, dict]:
    """Training examples and what the report says about them (source, size, fingerprint)."""
    classifier = _is_classifier(model)
    causal = get_adapter(model.config).causal_lm
    if not (classifier or causal):
        raise ValueError(f"{type(model).__name__} has no head to train: recovery fine-tunes causal LMs and sequence "
                         "classifiers")
    if isinstance(data, str) and data == CALIBRATION:
        if config.seq_len is not None or config.num_samples is not None:
            raise ValueError("seq_len and num_samples (--seq-len, --num-samples) apply to a data file: data "
                             "'calibration' reuses the recorded samples as they are")
        ids, mask = _calibration_blocks(source, report, tokenizer, causal)
        if classifier:
            if not config.distill:
                raise ValueError("data 'calibration' has no labels: a classifier recovers from it with distill "
                                 "(--distill) only, or give a labelled data file")
            if config.distill_weight < 1:
                raise ValueError(f"distill_weight {config.distill_weight} mixes in the classifier's own loss, which "
                                 "needs labels that data 'calibration' has not: use distill_weight 1, or give a "
                                 "labelled data file")
            lengths = [len(row) for row in ids] if mask is None else mask.sum(1).tolist()
            examples = [{"input_ids": row[:n].tolist(), "attention_mask": [1] * n} for row, n in zip(ids, lengths)]
        else:
            examples = lm_examples(ids, mask)
        return examples, _blocks_info(CALIBRATION, ids, mask)
    if classifier:
        if not isinstance(data, (str, Path)):
            raise ValueError("a classifier recovers from a labelled data file (text and label columns)")
        texts, labels = load_labelled(data, text_column=text_column, label_column=label_column,
                                      label2id=getattr(model.config, "label2id", None))
        if config.num_samples is not None:
            texts, labels = texts[: config.num_samples], labels[: config.num_samples]
        max_length = config.seq_len or 128
        digest = hashlib.sha256(json.dumps([texts, labels]).encode()).hexdigest()[:16]
        examples = classification_examples(tokenizer, texts, labels, max_length)
        return examples, {"source": str(data), "fingerprint": digest, "num_samples": len(texts),
                          "max_length": max_length, "tokens": sum(len(e["input_ids"]) for e in examples),
                          "labelled": True}
    if isinstance(data, torch.Tensor):
        ids, name = data, "token ids given by the caller"
    else:
        texts = load_texts(data, text_column=text_column)
        seq_len = config.seq_len or int(report.get("calibration", {}).get("seq_len", 512))
        num = config.num_samples or _windows(texts, tokenizer, seq_len)
        ids = token_blocks(texts, tokenizer, num, seq_len, seed=config.seed)
        name = str(data) if isinstance(data, (str, Path)) else type(data).__name__
    return lm_examples(ids), _blocks_info(name, ids)


def _teacher_written(teacher: nn.Module, examples: list[dict], config: RecoveryConfig) -> tuple[list, dict]:
    """``config.teacher_samples`` sequences the teacher writes, each continuing a short prompt cut from the
    training blocks (``synthetic.self_generated``: nucleus sampling, seeded), as next-token examples, and what the
    report says about them.

    Why: a few calibration blocks fit in a few epochs, and the student then matches the teacher there and not
    elsewhere. Text the teacher writes itself is its own distribution, where the KL is what matters, and costs no
    data: only the prompts come from the blocks. The prompts are the shortest (``MIN_PROMPT_TOKENS``), so the text
    wanders furthest from the blocks (measured with those: ``benchmarks/results/recovery_distill_lr_50.md``)."""
    from ..synthetic import MIN_PROMPT_TOKENS, TOP_P, SyntheticError, self_generated, synthetic_count

    padded = any("attention_mask" in e or not isinstance(e["input_ids"], torch.Tensor) for e in examples)
    start = time.perf_counter()
    try:
        synthetic_count(config.teacher_samples, len(examples), seq_len=len(examples[0]["input_ids"]),
                        generative=get_adapter(teacher.config).causal_lm and hasattr(teacher, "generate"),
                        lazy=False, padded=padded, option="teacher_samples", prompt=MIN_PROMPT_TOKENS)
        written = self_generated(teacher, torch.stack([e["input_ids"] for e in examples]), config.teacher_samples,
                                 seed=config.seed, prompt=MIN_PROMPT_TOKENS)
    except SyntheticError as e:
        raise ValueError(str(e)) from None
    info = {"num_samples": int(written.shape[0]), "seq_len": int(written.shape[1]), "tokens": int(written.numel()),
            "prompt_tokens": MIN_PROMPT_TOKENS, "top_p": TOP_P, "fingerprint": fingerprint(written),
            "seconds": time.perf_counter() - start}
    return lm_examples(written), info


# --- training -----------------------------------------------------------------------------------------------------

def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over blocks of the student's squared distance from the teacher's residual stream after that block,
    relative to the stream's own energy: ``sum_t |h_s - h_t|^2 / sum_t |h_t|^2`` (padding left out).

    Why: structured pruning keeps the hidden size, so every block's output can be matched as it is, with no
    projection; the KL alone gives one signal per token, this one a signal per block and token, which is what a
    few calibration blocks are short of. The embeddings' output (``hidden_states[0]``) is left out."""
    if len(student) != len(teacher):
        raise ValueError(f"distill_hidden: the model has {len(student) - 1} blocks and the teacher "
                         f"{len(teacher) - 1}: hidden states are matched block by block, so both need the same depth")
    terms = []
    for hs, ht in zip(student[1:], teacher[1:]):
        if hs.shape != ht.shape:
            raise ValueError(f"distill_hidden: hidden states {tuple(hs.shape)} against the teacher's "
                             f"{tuple(ht.shape)}: both need the same hidden size")
        error, energy = (hs.float() - ht.float()).square().sum(-1), ht.float().square().sum(-1)
        if mask is not None and error.dim() == 2:
            error, energy = error * mask, energy * mask
        terms.append(error.sum() / energy.sum().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack(terms).mean()


def _distillation_trainer():
    """A ``Trainer`` whose loss is the KL divergence from a teacher's output distribution (temperature 1),
    optionally mixed with the model's own loss and a hidden-state term (``hidden_state_loss``); the teacher runs
    in eval mode without gradients."""
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        loss_is_scaled_for_ga = False  # a per-batch mean

        def __init__(self, *args, teacher: nn.Module, weight: float, hidden: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(self.args.device).eval()
            self.weight = weight
            self.hidden = hidden

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.get("labels") if self.weight < 1 else None
            student_inputs = {k: v for k, v in inputs.items() if k != "labels" or labels is not None}
            states = {"output_hidden_states": True} if self.hidden else {}
            outputs = model(**student_inputs, **states)
            # The student runs under the Trainer's mixed precision; the teacher, not prepared by it, gets the same.
            with torch.no_grad(), self.accelerator.autocast():
                taught = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}, **states)
                target = taught.logits.float()
            logits = outputs.logits.float()
            if logits.shape != target.shape:
                raise ValueError(f"the teacher's outputs {tuple(target.shape)} do not match the model's "
                                 f"{tuple(logits.shape)}: the teacher must share the model's vocabulary or classes")
            kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True,
                          reduction="none").sum(-1)
            mask = inputs.get("attention_mask")
            if mask is not None and kl.dim() == 2:
                loss = (kl * mask).sum() / mask.sum()
            else:
                loss = kl.mean()
            if labels is not None:
                loss = self.weight * loss + (1 - self.weight) * outputs.loss
            if self.hidden:
                loss = loss + self.hidden * hidden_state_loss(outputs.hidden_states, taught.hidden_states, mask)
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer


def _quiet_progress():
    """transformers' progress bar without its printing of every step's logs (the loss is logged every step)."""
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    return QuietProgress()


def training_device(device: str | None) -> torch.device:
    """Where the Trainer will train: ``device``, or cuda when there is one; a GPU other than the first visible
    one is refused (the Trainer picks the device itself)."""
    check_device(device)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parsed = torch.device(device)
    if parsed.type == "cuda" and (parsed.index or 0) != 0:
        raise ValueError(f"device {device}: the Trainer trains on the first visible GPU; select it with "
                         f"CUDA_VISIBLE_DEVICES={parsed.index} and device cuda")
    return parsed


@torch.no_grad()
def _outputs(model: nn.Module, probe: dict) -> torch.Tensor:
    return model(**probe).logits.float().cpu()


def _wrap(model: nn.Module, config: RecoveryConfig) -> nn.Module:
    """LoRA adapters on every Linear layer but the output head (a classifier's head is trained whole), or the
    model itself with every weight trainable."""
    if config.full:
        return model.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    task = "SEQ_CLS" if _is_classifier(model) else "CAUSAL_LM"
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules="all-linear", task_type=task)
    with torch.random.fork_rng(devices=[]):  # seeded adapter init without touching the caller's generator
        torch.manual_seed(config.seed)
        return get_peft_model(model, lora)


def _merge(wrapped: nn.Module, probe: dict) -> tuple[nn.Module, float]:
    """``merge_and_unload``, checked: the merged model's outputs match the adapters' within float rounding."""
    wrapped.eval()
    expected = _outputs(wrapped, probe)
    merged = wrapped.merge_and_unload()
    got = _outputs(merged, probe)
    rel = float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-12))
    tol = 1e-4 if merged.dtype == torch.float32 else 2e-2
    if not rel <= tol:
        raise RuntimeError(f"merging the LoRA adapters changed the outputs by {rel:.2e} (relative) > {tol:.0e}")
    return merged, rel


def finetune(model: nn.Module, tokenizer, examples: list[dict], config: RecoveryConfig, *,
             teacher: nn.Module | None = None, device: str | None = None, progress: bool = True,
             callbacks: list | None = None) -> tuple[nn.Module, dict]:
    """Fine-tune ``model`` on ``examples`` (see ``lm_examples``, ``classification_examples``) with a stock
    ``Trainer``: LoRA adapters merged afterwards, or every weight with ``config.full``; with ``config.distill``
    the loss is the KL divergence from ``teacher``. ``callbacks`` go to the Trainer (a ``SubpruneCallback`` makes
    the run a gradual prune, with ``full``). Returns the trained model (the same weights as ``model``, changed in
    place) and what the run did: steps, tokens, seconds, first and last loss, the merge check."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if config.distill and teacher is None:
        raise ValueError("distill needs a teacher model")
    target = training_device(device)
    model.to(target)
    padded = "attention_mask" in examples[0] and not isinstance(examples[0]["input_ids"], torch.Tensor)
    collator = DataCollatorWithPadding(tokenizer) if padded else default_data_collator
    probe = {k: v.to(target) for k, v in collator(examples[:2]).items() if k != "labels"}
    wrapped = _wrap(model, config)
    steps = config.max_steps or -1
    epochs = config.epochs or 1.0
    with tempfile.TemporaryDirectory(prefix="hf_subprune-recovery-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
            max_steps=steps, num_train_epochs=epochs, weight_decay=0.0, warmup_steps=float(config.warmup),
            logging_steps=1,
            save_strategy="no", report_to="none", seed=config.seed, data_seed=config.seed,
            use_cpu=target.type == "cpu", bf16=config.bf16, remove_unused_columns=False, dataloader_pin_memory=False,
            include_num_input_tokens_seen="non_padding" if padded else "all", disable_tqdm=not progress)
        kwargs = dict(model=wrapped, args=args, train_dataset=examples, data_collator=collator,
                      processing_class=tokenizer, callbacks=callbacks)
        trainer = (_distillation_trainer()(**kwargs, teacher=teacher, weight=config.distill_weight,
                                           hidden=config.distill_hidden)
                   if config.distill else Trainer(**kwargs))
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        if progress:
            trainer.add_callback(_quiet_progress())
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        # Under mixed precision the Trainer leaves an autocast wrapper on the model's forward: it goes back plain.
        trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        state = trainer.state
        del trainer
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    stats = {"steps": state.global_step, "epochs": float(state.epoch or 0.0),
             "tokens": int(state.num_input_tokens_seen),
             "seconds": seconds, "learning_rate": config.learning_rate, "batch_size": config.batch_size,
             "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None}}
    if config.full:
        trained = wrapped
    else:
        trained, rel = _merge(wrapped, probe)
        stats["merge_check"] = {"relative_max_difference": rel}
    trained.eval()
    return trained, stats


# --- the pruned model, its teacher, its evaluation ---------------------------------------------------------------

def _read_report(folder: Path) -> dict:
    path = folder / REPORT_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give the folder written by hf-subprune prune")
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {REPORT_FILE}: it was not written by hf_subprune. Recovery "
                                "continues a pruned folder (hf-subprune prune --output DIR), whose report says how "
                                "it was cut, which calibration samples it used and how to save it again")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({e}): prune again to rewrite it") from None


def _load_pruned(folder: Path, report: dict, dtype: str | None):
    """The pruned model (with its modeling file where the export is heterogeneous) and its tokenizer."""
    import transformers

    from ..loading import DTYPES

    auto = getattr(transformers, report.get("auto_class", "AutoModel"))
    kwargs = {"dtype": DTYPES[dtype]} if dtype not in (None, "auto") else {}
    # The tokenizer reads the config too: a heterogeneous one (per-layer head counts) needs the modeling file's.
    remote = {"trust_remote_code": report.get("export") == "heterogeneous"}
    try:
        model = auto.from_pretrained(folder, **remote, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **remote)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{folder} could not be loaded ({type(e).__name__}: {e}); prune again to rewrite it") from None
    return model, tokenizer


def _load_teacher(name: str, student: nn.Module, dtype: str | None) -> nn.Module:
    """The teacher, with the student's head: a causal LM through ``load_model`` (aliases, .gguf files, folders,
    hub ids); the Hub name of a bundled alias falls back to the bundled weights when it cannot be fetched."""
    from ..loading import ALIAS_BASES, load_model

    if not get_adapter(student.config).causal_lm:
        return auto_class_for(student).from_pretrained(name, **({"dtype": student.dtype}))
    try:
        return load_model(name, dtype=dtype or "auto")[0]
    except FileNotFoundError:
        alias = next((a for a, base in ALIAS_BASES.items() if base == name), None)
        if alias is None:
            raise
        logger.info(f"teacher {name}: not reachable, using the bundled copy ('{alias}')")
        return load_model(alias, dtype=dtype or "auto")[0]


def _evaluator(model: nn.Module, tokenizer, report: dict, eval_text: str | Path | None,
               eval_data: str | Path | None, text_column: str | None = None,
               label_column: str | None = None) -> Evaluator | None:
    """The measure before and after recovery: ``eval_data`` (labelled, read with the training data's column names)
    or ``eval_text``, else the protocol of the prune report's own evaluation, when its text can be read again
    here."""
    if _is_classifier(model):
        protocol = (report.get("evaluation") or {}).get("accuracy_protocol") or {}
        source = eval_data or (protocol.get("data") if Path(str(protocol.get("data", ""))).is_file() else None)
        if source is None:
            return None
        columns = {"text_column": text_column, "label_column": label_column} if eval_data is not None else {}
        texts, labels = load_labelled(source, label2id=getattr(model.config, "label2id", None), **columns)
        return AccuracyEvaluator(tokenizer, texts, labels, str(source), max_length=protocol.get("max_length", 128))
    if not get_adapter(model.config).causal_lm:
        return None
    if eval_text is not None:
        path = Path(eval_text)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation text {eval_text} does not exist")
        return PerplexityEvaluator(tokenizer, path.read_text(encoding="utf-8"), str(eval_text))
    protocol = (report.get("evaluation") or {}).get("perplexity_protocol")
    if not protocol:
        return None
    name = str(protocol["text"])
    if name == BUILTIN_HELDOUT:
        from ..calibration import builtin_text

        text = builtin_text("heldout")
    elif Path(name).is_file():
        text = Path(name).read_text(encoding="utf-8")
    else:
        logger.warning(f"the prune report's evaluation text {name!r} cannot be read here: no quality measure "
                       "before and after recovery (give eval_text, CLI --eval-text)")
        return None
    return PerplexityEvaluator(tokenizer, text, name, window=protocol["window"], max_tokens=protocol["tokens"])


# --- the verb ----------------------------------------------------------------------------------------------------

@dataclass
class RecoveryResult:
    """The recovered model and its report: ``save`` writes it as the pruned folder was written (the same export,
    the pruning report with a ``recovery`` section, the calibration tokens), reload-checked."""

    model: nn.Module
    tokenizer: Any
    config: PruneConfig  # the pruning's settings, saved again as subprune_config.json
    recovery: dict
    pruned: PruneResult | dict = field(repr=False)  # the in-memory result, or the folder's report
    input_ids: torch.Tensor | None = field(default=None, repr=False)
    attention_mask: torch.Tensor | None = field(default=None, repr=False)

    def report(self, *, export: str | None = None, reload_check: dict | None = None) -> dict:
        if isinstance(self.pruned, PruneResult):
            report = self.pruned.report(export=export, reload_check=reload_check)
        else:
            report = {k: v for k, v in self.pruned.items() if k not in ("export", "reload_check")}
            if export is not None:
                report["export"] = export
            if reload_check is not None:
                report["reload_check"] = reload_check
        report["recovery"] = self.recovery
        return report

    def save(self, path: str | Path, *, overwrite: bool = False, check: bool = True) -> Path:
        """Write the folder (see ``outputs.export.save_pruned``)."""
        return save_pruned(self, Path(path), overwrite=overwrite, check=check)

    def summary(self) -> str:
        r = self.recovery
        how = "full fine-tune" if r["lora"] is None else f"LoRA r={r['lora']['r']} alpha={r['lora']['alpha']}, merged"
        loss = "distillation from " + r["distill"]["teacher"] if r["distill"] else "the model's own loss"
        lines = [f"recovery: {how}, {loss}; {r['steps']} steps, {r['tokens']:,} tokens, {r['seconds']:.1f} s on "
                 f"{r['data']['source']} ({r['data']['num_samples']} samples)"]
        if r["loss"]["first"] is not None:
            lines.append(f"training loss: {r['loss']['first']:.4g} first step, {r['loss']['last']:.4g} last step")
        for name, value in r["evaluation"].items():
            if isinstance(value, dict) and "before" in value:
                lines.append(f"{name}: {value['before']:.4g} pruned, {value['after']:.4g} recovered")
        return "\n".join(lines)


def recover(
    folder_or_result: str | Path | PruneResult,
    data: Any = CALIBRATION,
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    lora_r: int = 8,
    lora_alpha: int = 16,
    full: bool = False,
    max_steps: int | None = None,
    epochs: float | None = None,
    lr: float | None = None,
    warmup: float = 0.0,
    seq_len: int | None = None,
    num_samples: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    distill: bool = False,
    teacher: str | nn.Module | None = None,
    batch_size: int = 4,
    lora_dropout: float = 0.0,
    distill_weight: float = 1.0,
    distill_hidden: float = 0.0,
    teacher_samples: int = 0,
    bf16: bool = False,
    seed: int = 0,
    evaluate: Evaluator | None = None,
    eval_text: str | Path | None = None,
    eval_data: str | Path | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    progress: bool = True,
    check: bool = True,
) -> RecoveryResult:
    """Fine-tune a pruned model to recover quality, and (with ``output``) save it as it was saved.

    Args:
        folder_or_result: a folder written by ``hf-subprune prune`` / ``PruneResult.save``, or a ``PruneResult``
            (its model is trained in place).
        data: ``"calibration"`` (the blocks the cut used, checked against the report's fingerprint), a text
            source as ``prune`` takes it (``calibration.load_texts``), or a tensor of token blocks; a classifier
            takes a labelled .tsv/.csv/.jsonl file (text and label columns, found by name).
        output / overwrite: the folder to write; an existing non-empty one only with ``overwrite``.
        lora_r / lora_alpha / lora_dropout / full: LoRA on every Linear layer, or a full fine-tune.
        max_steps / epochs / lr / batch_size / seed: the Trainer's schedule (one epoch by default): the rate
            decays linearly to 0, after rising linearly from 0 over the first ``warmup`` share of the steps.
        seq_len / num_samples: how a data file is cut (default: the calibration's block length, all blocks).
        distill / teacher / distill_weight: KL divergence from the teacher's distribution (a name or path for
            ``load_model``, or a model; default the report's base model), mixed with the model's own loss with
            weight ``1 - distill_weight``.
        distill_hidden: with ``distill``, the weight of a second term that matches the teacher's residual stream
            after every block (``hidden_state_loss``): more signal per calibration token; needs the same depth.
        teacher_samples: with ``distill``, this many more sequences for a causal LM, written by the teacher from
            8-token prompts of the data (``_teacher_written``): label-free text beyond the few samples.
        bf16: bfloat16 mixed precision (the Trainer's autocast; weights and optimizer state stay float32): about
            3x faster steps on CPUs with AMX (SmolLM2, 4 x 512 tokens: 9 s against 26 s on one core) and on GPUs.
        evaluate / eval_text / eval_data: the quality measure before and after (default: the prune report's own
            perplexity protocol, when its text can be read again).
    """
    config = RecoveryConfig(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, full=full,
                            max_steps=max_steps, epochs=epochs, lr=lr, warmup=warmup, batch_size=batch_size,
                            seq_len=seq_len, num_samples=num_samples, distill=distill,
                            teacher=teacher if isinstance(teacher, str) or teacher is None else type(teacher).__name__,
                            distill_weight=distill_weight, distill_hidden=distill_hidden,
                            teacher_samples=teacher_samples, bf16=bf16, seed=seed)
    training_device(device)  # every check that needs no model comes before loading one
    in_memory = isinstance(folder_or_result, PruneResult)
    source: PruneResult | Path = folder_or_result if in_memory else Path(folder_or_result)
    report = folder_or_result.report() if in_memory else _read_report(source)
    if output is not None:
        check_output_folder(output, overwrite, source=None if in_memory else source)
    if isinstance(data, (str, Path)) and str(data) != CALIBRATION and Path(data).suffix and not Path(data).exists():
        raise FileNotFoundError(f"data file {data} does not exist; give a text file, a .json/.jsonl/.csv/.tsv/"
                                f".parquet file, or '{CALIBRATION}'")
    if in_memory:
        model, tokenizer = folder_or_result.model, folder_or_result.tokenizer
        prune_config, input_ids = folder_or_result.config, folder_or_result.input_ids
        attention_mask = folder_or_result.attention_mask
    else:
        model, tokenizer = _load_pruned(source, report, dtype)
        prune_config = PruneConfig.from_pretrained(source)
        input_ids, attention_mask = load_calibration(source)
    if tokenizer is None:
        raise ValueError("recovery needs the pruned model's tokenizer")
    examples, data_info = _training_data(data, model, tokenizer, report, source, config, text_column, label_column)
    teacher_name = None
    teacher_model = None
    if distill:
        if isinstance(teacher, nn.Module):
            teacher_model, teacher_name = teacher, getattr(teacher.config, "_name_or_path", None) or "given model"
        else:
            teacher_name = teacher or report.get("base_model")
            if not teacher_name:
                raise ValueError("distill: the report records no base model; name the teacher (--teacher)")
            teacher_model = _load_teacher(teacher_name, model, dtype)
    if config.teacher_samples:
        written, data_info["teacher_written"] = _teacher_written(teacher_model, examples, config)
        examples = examples + written
    measure = evaluate or _evaluator(model, tokenizer, report, eval_text, eval_data, text_column, label_column)
    model.to(training_device(device))
    before = _measure(measure, model)
    model, stats = finetune(model, tokenizer, examples, config, teacher=teacher_model, device=device,
                            progress=progress)
    after = _measure(measure, model)
    import peft

    recovery = {
        "data": data_info,
        "lora": None if full else {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout,
                                   "target_modules": "all-linear"},
        "distill": ({"teacher": teacher_name, "temperature": 1.0, "kl_weight": distill_weight,
                     **({"hidden_weight": distill_hidden} if distill_hidden else {})} if distill else None),
        **stats,
        "evaluation": _evaluation(before, after) if measure is not None else {},
        "config": config.to_dict(),
        "versions": {"peft": peft.__version__},
    }
    if "recovery" in report:
        recovery["previous"] = report["recovery"]
    result = RecoveryResult(model=model, tokenizer=tokenizer, config=prune_config, recovery=recovery,
                            pruned=source if isinstance(source, PruneResult) else report, input_ids=input_ids,
                            attention_mask=attention_mask)
    if output is not None:
        result.save(output, overwrite=overwrite, check=check)
    return result
