"""The supported families. Each entry only names modules and config fields."""

from .base import Adapter, AttentionSpec, MlpSpec, register_adapter

LLAMA_LIKE = register_adapter(
    Adapter(
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        mlp=MlpSpec(producers=("mlp.gate_proj", "mlp.up_proj"), consumer="mlp.down_proj", width_field="intermediate_size"),
        attention=AttentionSpec(
            query="self_attn.q_proj",
            key="self_attn.k_proj",
            value="self_attn.v_proj",
            output="self_attn.o_proj",
            module="self_attn",
            heads_field="num_attention_heads",
            kv_heads_field="num_key_value_heads",
            head_dim_field="head_dim",
        ),
    )
)

BERT_LIKE = register_adapter(
    Adapter(
        model_types=("bert", "roberta"),
        mlp=MlpSpec(producers=("intermediate.dense",), consumer="output.dense", width_field="intermediate_size"),
        notes="BERT-style configs derive the head size from the hidden size, so pruned heads need the "
        "heterogeneous export (not available yet): only MLP neurons are pruned.",
    )
)

GPT2 = register_adapter(
    Adapter(
        model_types=("gpt2",),
        mlp=MlpSpec(producers=("mlp.c_fc",), consumer="mlp.c_proj", width_field="n_inner"),
        transposed=True,
        notes="GPT-2 derives the head size from n_embd and fuses q, k, v, so pruned heads need the "
        "heterogeneous export (not available yet): only MLP neurons are pruned.",
    )
)
