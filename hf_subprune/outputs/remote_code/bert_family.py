"""BERT-family model (bert, roberta) with per-layer widths, written by hf_subprune.

Structured pruning removed attention heads and MLP neurons, differently per layer. A BERT config derives the
head size from hidden_size / num_attention_heads, so fewer heads cannot be written into the stock config:
``config.json`` keeps the original head count globally and records each layer's own counts as transformers'
``per_layer_config`` overrides. The classes below build the stock model from the global config and then
resize each layer's projections to its widths, before the usual weight initialisation and loading.
"""

import contextlib
import logging

import transformers
from torch import nn

STOCK_MODEL_TYPE = "bert"  # hf_subprune writes the pruned checkpoint's model_type here

StockConfig = transformers.CONFIG_MAPPING[STOCK_MODEL_TYPE]
_PREFIX = StockConfig.__name__[: -len("Config")]
_HETEROGENEITY_LOGGER = "transformers.integrations.heterogeneity.configuration_utils"


def _stock(suffix: str) -> type:
    """The stock class of this family with that suffix (``ForMaskedLM`` -> ``RobertaForMaskedLM``)."""
    return getattr(transformers, _PREFIX + suffix)


@contextlib.contextmanager
def _global_widths_readable(config):
    """Let the stock ``__init__`` read the global widths, which a heterogeneous config refuses to give (the
    layers it builds with them are resized right after), without the warning each read logs."""
    had_flag = "allow_global_per_layer_attribute_access" in config.__dict__
    previous = config.allow_global_per_layer_attribute_access
    log = logging.getLogger(_HETEROGENEITY_LOGGER)
    level = log.level
    config.allow_global_per_layer_attribute_access = True
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
        if had_flag:
            config.allow_global_per_layer_attribute_access = previous
        else:
            config.__dict__.pop("allow_global_per_layer_attribute_access", None)


def _linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """``old`` if it already has that shape, else a fresh Linear like it (bias, device, dtype)."""
    if (old.in_features, old.out_features) == (in_features, out_features):
        return old
    return nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device,
                     dtype=old.weight.dtype)


def resize_layer(layer: nn.Module, layer_config) -> None:
    """Give one encoder layer the widths of its per-layer config (self-attention heads of the original
    size, and the intermediate width)."""
    attention = layer.attention.self
    hidden, head_dim = attention.query.in_features, attention.attention_head_size
    width = layer_config.num_attention_heads * head_dim
    attention.query = _linear(attention.query, hidden, width)
    attention.key = _linear(attention.key, hidden, width)
    attention.value = _linear(attention.value, hidden, width)
    layer.attention.output.dense = _linear(layer.attention.output.dense, width, hidden)
    attention.num_attention_heads = layer_config.num_attention_heads
    attention.all_head_size = width
    intermediate = layer_config.intermediate_size
    layer.intermediate.dense = _linear(layer.intermediate.dense, hidden, intermediate)
    layer.output.dense = _linear(layer.output.dense, intermediate, hidden)


class SubprunedConfig(StockConfig):
    """The stock config, as a class of its own: registering the classes below for it leaves the stock
    config's auto mapping alone."""


class PerLayerWidthsMixin:
    """Build the stock model, then resize every encoder layer to its per-layer widths in ``post_init`` (the
    last step of every stock ``__init__``, before weights are initialised or loaded)."""

    config_class = SubprunedConfig

    def __init__(self, config, *args, **kwargs):
        with _global_widths_readable(config):
            super().__init__(config, *args, **kwargs)

    def post_init(self):
        for index, layer in enumerate(self.base_model.encoder.layer):
            resize_layer(layer, self.config.per_layer_config[index])
        super().post_init()


class SubprunedModel(PerLayerWidthsMixin, _stock("Model")):
    pass


class SubprunedForMaskedLM(PerLayerWidthsMixin, _stock("ForMaskedLM")):
    pass


class SubprunedForSequenceClassification(PerLayerWidthsMixin, _stock("ForSequenceClassification")):
    pass


class SubprunedForTokenClassification(PerLayerWidthsMixin, _stock("ForTokenClassification")):
    pass


class SubprunedForQuestionAnswering(PerLayerWidthsMixin, _stock("ForQuestionAnswering")):
    pass


class SubprunedForMultipleChoice(PerLayerWidthsMixin, _stock("ForMultipleChoice")):
    pass
