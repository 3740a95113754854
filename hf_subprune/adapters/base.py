"""Declarative description of where the prunable sites of an architecture family are.

An adapter names modules and config fields, nothing more: the calibration runner, selection and surgery
read it. Adding a family is adding a small module that registers an ``Adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from torch import nn

__all__ = ["MlpSpec", "AttentionSpec", "Adapter", "ADAPTERS", "register_adapter", "get_adapter", "UnsupportedModelError",
           "auto_class_for"]


class UnsupportedModelError(ValueError):
    """The model's ``model_type`` has no adapter."""


@dataclass(frozen=True)
class MlpSpec:
    """An MLP site: the producers' output rows and the consumer's input columns are the neurons.

    Attributes:
        producers: module paths, relative to the block, whose output features are the neurons.
        consumer: module path of the projection back to the hidden size.
        width_field: config field holding the neuron count (e.g. ``intermediate_size``).
        residual: module path whose input is the residual stream the MLP's output is added to (the norm before
            the MLP in pre-norm blocks, the MLP's first layer in BERT's post-norm blocks). The asymmetric variant
            reads it to carry the attention's pruning error into the MLP's target. Attention writes into the
            block input.
        bias_field: config flag that gives the MLP's projections (producers and consumer) a bias where the
            stock consumer has none (Llama's ``mlp_bias``); None where the family has no such flag or the
            consumer always has a bias. Bias compensation (FLAP) needs a consumer bias.
    """

    producers: tuple[str, ...]
    consumer: str
    width_field: str
    residual: str
    bias_field: str | None = None

    @property
    def biased_modules(self) -> tuple[str, ...]:
        """The modules ``bias_field`` gives a bias."""
        return (*self.producers, self.consumer)


HEAD_QUANTITIES = ("heads", "kv_heads", "groups", "width")


@dataclass(frozen=True)
class AttentionSpec:
    """A multi-head (possibly grouped-query) attention site.

    Attributes:
        query, key, value: module paths of the projections (output features are heads x head_dim). One path
            named three times is a fused projection whose outputs are the [q; k; v] segments (GPT-2's c_attn).
        output: the output projection; its input columns are grouped per query head.
        module: path of the attention module holding the head counts its forward reads.
        heads_field / kv_heads_field / head_dim_field: config fields (kv and head_dim may be absent).
        head_dim_attr: attribute of ``module`` holding the head size (pruning never changes it).
        module_attrs: ``(attribute, quantity)`` pairs of ``module`` to set after a cut, the quantity one of
            ``heads``, ``kv_heads``, ``groups`` (query heads per kv head) or ``width`` (heads x head_dim):
            what the module's forward reads instead of the weight shapes.
        stock_export: whether a stock config can express fewer heads (it cannot where the head size is
            derived from the hidden size, as in BERT and GPT-2: those go through the heterogeneous export).
        bias_field: config flag that gives q, k, v and the output projection a bias where the stock output
            projection has none (``attention_bias`` of Llama and Qwen3); None where there is no such flag or
            the output projection always has a bias.
    """

    query: str
    key: str
    value: str
    output: str
    module: str
    heads_field: str
    kv_heads_field: str | None = None
    head_dim_field: str | None = "head_dim"
    head_dim_attr: str = "head_dim"
    module_attrs: tuple[tuple[str, str], ...] = (("num_key_value_groups", "groups"),)
    stock_export: bool = True
    bias_field: str | None = None

    def __post_init__(self) -> None:
        unknown = [q for _, q in self.module_attrs if q not in HEAD_QUANTITIES]
        if unknown:
            raise ValueError(f"module_attrs quantities must be among {HEAD_QUANTITIES}, got {unknown}")

    @property
    def consumer(self) -> str:
        """The output projection: the consumer of the attention site (as ``MlpSpec.consumer``)."""
        return self.output

    @property
    def biased_modules(self) -> tuple[str, ...]:
        """The modules ``bias_field`` gives a bias (a fused q/k/v projection counted once)."""
        return tuple(dict.fromkeys((self.query, self.key, self.value, self.output)))

    @property
    def fused(self) -> bool:
        """q, k and v come out of one module (rows in three segments)."""
        return self.query == self.key == self.value


@dataclass(frozen=True)
class Adapter:
    """One architecture family.

    Attributes:
        model_types: ``config.model_type`` values served.
        mlp: the MLP site.
        attention: the attention site, when heads can be pruned.
        transposed: projections are GPT-2 ``Conv1D`` (weight stored in x out).
        remote_code: template module under ``hf_subprune/outputs/remote_code`` that the heterogeneous export
            writes next to the weights (per-layer widths), or None where the family has none.
        causal_lm: a decoder: loaded as a causal LM, calibrated on raw text, judged by perplexity. Encoders
            (False) are calibrated with their special tokens, as they are used.
        positions_after_padding: position ids start after the padding index (RoBERTa), so the longest input is
            ``max_position_embeddings - pad_token_id - 1``.
        pipeline_tag: the Hub task of the family's base checkpoints (the card's metadata).
        notes: shown when a request cannot be served (e.g. why heads are not pruned).
    """

    model_types: tuple[str, ...]
    mlp: MlpSpec
    attention: AttentionSpec | None = None
    transposed: bool = False
    remote_code: str | None = None
    causal_lm: bool = True
    positions_after_padding: bool = False
    pipeline_tag: str = "text-generation"
    notes: str = ""

    # --- weights in nn.Linear layout (out x in), whatever the storage ---
    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.T if self.transposed else module.weight

    def spec(self, kind: str) -> MlpSpec | AttentionSpec:
        """The site spec of ``kind`` (``"mlp"`` or ``"attention"``)."""
        return self.mlp if kind == "mlp" else self.attention

    def heads(self, config) -> int:
        return int(getattr(config, self.attention.heads_field))

    def kv_heads(self, config) -> int:
        spec = self.attention
        value = getattr(config, spec.kv_heads_field, None) if spec.kv_heads_field else None
        return int(value) if value else self.heads(config)

    def head_dim(self, config) -> int:
        value = getattr(config, self.attention.head_dim_field, None) if self.attention.head_dim_field else None
        return int(value) if value else config.hidden_size // self.heads(config)


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter
    return adapter


def get_adapter(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by hf_subprune. Supported model types: "
            f"{', '.join(sorted(ADAPTERS))}. New families are added as a small adapter in hf_subprune/adapters/."
        )
    return ADAPTERS[model_type]


_AUTO_SUFFIXES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("LMHeadModel", "AutoModelForCausalLM"),
)


def auto_class_for(model) -> type:
    """The ``AutoModel...`` class that loads this model's kind (by its class name's head)."""
    name = type(model).__name__
    for suffix, auto in _AUTO_SUFFIXES:
        if name.endswith(suffix):
            return getattr(transformers, auto)
    return transformers.AutoModel
