"""The supported families. Each entry only names modules and config fields."""

from dataclasses import replace

from .base import Adapter, AttentionSpec, MlpSpec, register_adapter

_LLAMA_LIKE = Adapter(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    mlp=MlpSpec(producers=("mlp.gate_proj", "mlp.up_proj"), consumer="mlp.down_proj",
               width_field="intermediate_size", residual="post_attention_layernorm"),
    attention=AttentionSpec(
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        output="self_attn.o_proj",
        module="self_attn",
        heads_field="num_attention_heads",
        kv_heads_field="num_key_value_heads",
        head_dim_field="head_dim",
        module_attrs=(("num_key_value_groups", "groups"),),  # transformers repeats each kv head this often
    ),
    remote_code="llama_family",
)

# The families differ only in which config flags add biases to o_proj / down_proj (what FLAP's bias compensation
# needs): Llama has both, Qwen3 only attention_bias, Mistral and Qwen2 neither (their o_proj/down_proj are built
# without a bias whatever the config says).
LLAMA = register_adapter(replace(
    _LLAMA_LIKE, model_types=("llama",), mlp=replace(_LLAMA_LIKE.mlp, bias_field="mlp_bias"),
    attention=replace(_LLAMA_LIKE.attention, bias_field="attention_bias")))
QWEN3 = register_adapter(replace(
    _LLAMA_LIKE, model_types=("qwen3",), attention=replace(_LLAMA_LIKE.attention, bias_field="attention_bias")))
MISTRAL_QWEN2 = register_adapter(replace(_LLAMA_LIKE, model_types=("mistral", "qwen2")))

# BERT-style configs derive the head size from the hidden size, so fewer heads cannot be written into a stock
# config: pruned heads are exported as per-layer overrides with remote code (stock_export=False).
BERT = register_adapter(
    Adapter(
        model_types=("bert",),
        mlp=MlpSpec(producers=("intermediate.dense",), consumer="output.dense", width_field="intermediate_size",
                   residual="intermediate.dense"),
        attention=AttentionSpec(
            query="attention.self.query",
            key="attention.self.key",
            value="attention.self.value",
            output="attention.output.dense",
            module="attention.self",
            heads_field="num_attention_heads",
            head_dim_field=None,
            head_dim_attr="attention_head_size",
            module_attrs=(("num_attention_heads", "heads"), ("all_head_size", "width")),
            stock_export=False,
        ),
        remote_code="bert_family",
        causal_lm=False,
        pipeline_tag="feature-extraction",
    )
)
ROBERTA = register_adapter(replace(BERT, model_types=("roberta",), positions_after_padding=True))

# GPT-2 fuses q, k, v into c_attn (outputs [q; k; v]) and derives the head size from n_embd.
GPT2 = register_adapter(
    Adapter(
        model_types=("gpt2",),
        mlp=MlpSpec(producers=("mlp.c_fc",), consumer="mlp.c_proj", width_field="n_inner", residual="ln_2"),
        attention=AttentionSpec(
            query="attn.c_attn",
            key="attn.c_attn",
            value="attn.c_attn",
            output="attn.c_proj",
            module="attn",
            heads_field="n_head",
            head_dim_field=None,
            head_dim_attr="head_dim",
            module_attrs=(("num_heads", "heads"), ("split_size", "width")),
            stock_export=False,
        ),
        transposed=True,
        remote_code="gpt2",
    )
)
