"""Llama-family model (llama, mistral, qwen2, qwen3) with per-layer widths, written by hf_subprune.

Structured pruning left the layers with different MLP widths and head counts. ``config.json`` records them as
transformers' ``per_layer_config`` overrides; until the stock modeling code builds layers from those, the
classes below build the stock model from the global config and then resize each layer's projections to its
own widths, before the usual weight initialisation and loading. The head size is the original one.
"""

import contextlib
import logging

import transformers
from torch import nn

STOCK_MODEL_TYPE = "llama"  # hf_subprune writes the pruned checkpoint's model_type here

StockConfig = transformers.CONFIG_MAPPING[STOCK_MODEL_TYPE]
_PREFIX = StockConfig.__name__[: -len("Config")]
_HETEROGENEITY_LOGGER = "transformers.integrations.heterogeneity.configuration_utils"


def _stock(suffix: str) -> type:
    """The stock class of this family with that suffix (``ForCausalLM`` -> ``Qwen3ForCausalLM``)."""
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
    """Give one decoder layer the widths of its per-layer config (head size and hidden size unchanged)."""
    attention, mlp = layer.self_attn, layer.mlp
    hidden, head_dim = attention.q_proj.in_features, attention.head_dim
    heads, kv_heads = layer_config.num_attention_heads, layer_config.num_key_value_heads
    attention.q_proj = _linear(attention.q_proj, hidden, heads * head_dim)
    attention.k_proj = _linear(attention.k_proj, hidden, kv_heads * head_dim)
    attention.v_proj = _linear(attention.v_proj, hidden, kv_heads * head_dim)
    attention.o_proj = _linear(attention.o_proj, heads * head_dim, hidden)
    attention.num_key_value_groups = heads // kv_heads
    width = layer_config.intermediate_size
    mlp.gate_proj = _linear(mlp.gate_proj, hidden, width)
    mlp.up_proj = _linear(mlp.up_proj, hidden, width)
    mlp.down_proj = _linear(mlp.down_proj, width, hidden)
    mlp.intermediate_size = width


class SubprunedConfig(StockConfig):
    """The stock config, as a class of its own: registering the classes below for it leaves the stock
    config's auto mapping alone. Validation checks each layer's head counts (the stock check reads the
    global head count, which is per-layer here, and asks hidden_size % heads == 0, which an explicit
    ``head_dim`` makes unnecessary)."""

    def validate_architecture(self):
        for index, layer in enumerate(self.per_layer_config):
            if layer.num_attention_heads % layer.num_key_value_heads:
                raise ValueError(f"layer {index}: {layer.num_attention_heads} attention heads cannot share "
                                 f"{layer.num_key_value_heads} kv heads evenly")

    def validate(self):
        for validator in getattr(StockConfig, "__class_validators__", ()):
            if validator.__name__ != "validate_architecture":
                validator(self)
        self.validate_architecture()


class PerLayerWidthsMixin:
    """Build the stock model, then resize every decoder layer to its per-layer widths in ``post_init`` (the
    last step of every stock ``__init__``, before weights are initialised or loaded)."""

    config_class = SubprunedConfig

    def __init__(self, config, *args, **kwargs):
        with _global_widths_readable(config):
            super().__init__(config, *args, **kwargs)

    def post_init(self):
        for index, layer in enumerate(self.base_model.layers):
            resize_layer(layer, self.config.per_layer_config[index])
        super().post_init()


class SubprunedModel(PerLayerWidthsMixin, _stock("Model")):
    pass


class SubprunedForCausalLM(PerLayerWidthsMixin, _stock("ForCausalLM")):
    pass


class SubprunedForSequenceClassification(PerLayerWidthsMixin, _stock("ForSequenceClassification")):
    pass


class SubprunedForTokenClassification(PerLayerWidthsMixin, _stock("ForTokenClassification")):
    pass


class SubprunedForQuestionAnswering(PerLayerWidthsMixin, _stock("ForQuestionAnswering")):
    pass
