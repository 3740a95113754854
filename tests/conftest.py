"""Shared fixtures: tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "HF_SUBPRUNE_CACHE" not in os.environ:  # the GGUF conversion cache: once per session, never in the user's home
    os.environ["HF_SUBPRUNE_CACHE"] = tempfile.mkdtemp(prefix="hf_subprune-test-cache-")
    atexit.register(shutil.rmtree, os.environ["HF_SUBPRUNE_CACHE"], True)

import pytest
import torch
import transformers

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_config(model_type: str):
    """A small config of each supported family; Llama-like ones use grouped-query attention (6 heads, 2 kv)."""
    llama_like = dict(hidden_size=48, intermediate_size=40, num_attention_heads=6, num_key_value_heads=2,
                      head_dim=8, num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    if model_type == "llama":
        return transformers.LlamaConfig(**llama_like)
    if model_type == "mistral":
        return transformers.MistralConfig(**llama_like, sliding_window=None)
    if model_type == "qwen2":
        return transformers.Qwen2Config(**llama_like)
    if model_type == "qwen3":
        return transformers.Qwen3Config(**llama_like)
    encoder = dict(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_hidden_layers=2,
                   vocab_size=128, max_position_embeddings=64)
    if model_type == "bert":
        return transformers.BertConfig(**encoder)
    if model_type == "roberta":
        return transformers.RobertaConfig(**encoder, pad_token_id=1)
    if model_type == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_inner=40, n_head=4, n_layer=2, vocab_size=128, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)
    raise ValueError(model_type)


def tiny_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    auto = transformers.AutoModel if model_type in ("bert", "roberta") else transformers.AutoModelForCausalLM
    model = auto.from_config(config)
    model.eval()
    return model


def calibration_ids(n: int = 12, seq_len: int = 16, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"the shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="module")
def single_thread():
    """Tiny problems: one thread avoids BLAS/LAPACK threading overhead (100x on small lstsq calls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped where torch sees none (CI, this project's CPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
