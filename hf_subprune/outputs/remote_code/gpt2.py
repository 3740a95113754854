"""GPT-2 model with per-layer widths, written by hf_subprune.

Structured pruning removed attention heads and MLP neurons, differently per layer. GPT-2 derives the head
size from n_embd / n_head, so fewer heads cannot be written into the stock config: ``config.json`` keeps the
original head count globally and records each layer's own ``n_head`` and ``n_inner`` as transformers'
``per_layer_config`` overrides. The classes below build the stock model from the global config and then
resize each block's fused q/k/v projection (``c_attn``: [q; k; v] outputs), its output projection and its
MLP to the block's widths, before the usual weight initialisation and loading.
"""

import contextlib
import logging

import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

STOCK_MODEL_TYPE = "gpt2"  # hf_subprune writes the pruned checkpoint's model_type here

StockConfig = transformers.CONFIG_MAPPING[STOCK_MODEL_TYPE]
_PREFIX = StockConfig.__name__[: -len("Config")]
_HETEROGENEITY_LOGGER = "transformers.integrations.heterogeneity.configuration_utils"


def _stock(suffix: str) -> type:
    """The stock class with that suffix (``LMHeadModel`` -> ``GPT2LMHeadModel``)."""
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


def _conv1d(old: Conv1D, in_features: int, out_features: int) -> Conv1D:
    """``old`` if it already has that shape, else a fresh Conv1D on its device and dtype."""
    if tuple(old.weight.shape) == (in_features, out_features):
        return old
    return Conv1D(out_features, in_features).to(device=old.weight.device, dtype=old.weight.dtype)


def resize_layer(block: nn.Module, layer_config) -> None:
    """Give one block the widths of its per-layer config (heads of the original size, MLP width)."""
    attention = block.attn
    hidden, head_dim = attention.embed_dim, attention.head_dim
    width = layer_config.n_head * head_dim
    attention.c_attn = _conv1d(attention.c_attn, hidden, 3 * width)
    attention.c_proj = _conv1d(attention.c_proj, width, hidden)
    attention.num_heads = layer_config.n_head
    attention.split_size = width
    inner = layer_config.n_inner if layer_config.n_inner is not None else 4 * hidden
    block.mlp.c_fc = _conv1d(block.mlp.c_fc, hidden, inner)
    block.mlp.c_proj = _conv1d(block.mlp.c_proj, inner, hidden)


class SubprunedConfig(StockConfig):
    """The stock config, as a class of its own: registering the classes below for it leaves the stock
    config's auto mapping alone."""


class PerLayerWidthsMixin:
    """Build the stock model, then resize every block to its per-layer widths in ``post_init`` (the last
    step of every stock ``__init__``, before weights are initialised or loaded)."""

    config_class = SubprunedConfig

    def __init__(self, config, *args, **kwargs):
        with _global_widths_readable(config):
            super().__init__(config, *args, **kwargs)

    def post_init(self):
        for index, block in enumerate(self.base_model.h):
            resize_layer(block, self.config.per_layer_config[index])
        super().post_init()


class SubprunedModel(PerLayerWidthsMixin, _stock("Model")):
    pass


class SubprunedLMHeadModel(PerLayerWidthsMixin, _stock("LMHeadModel")):
    pass


class SubprunedForSequenceClassification(PerLayerWidthsMixin, _stock("ForSequenceClassification")):
    pass


class SubprunedForTokenClassification(PerLayerWidthsMixin, _stock("ForTokenClassification")):
    pass


class SubprunedForQuestionAnswering(PerLayerWidthsMixin, _stock("ForQuestionAnswering")):
    pass
