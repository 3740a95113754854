"""A whole prune of a Llama-3-8B-shaped model with random weights on disk: time and peak GPU memory (issue 14).

The checkpoint is written shard by shard, never the whole model in memory: 32 layers, hidden 4096, MLP 14336, 32
heads, 8 kv heads, vocabulary 128256, untied head, bfloat16 (16 GB on disk; ``--shape tiny`` is a small model of
the same family for a check on any machine). Then ``prune(folder, ...)`` prunes it lazily (one block in memory)
at 20% from 128 x 2048 random token ids (seeded: the weights are random, so what the tokens say does not matter),
every block on ``--device`` in bfloat16, statistics summed in float32 (``stats_dtype``), and ``save`` writes the
sharded folder with its reload check. Reported: seconds of the prune and of the save, peak GPU memory
(``torch.cuda.max_memory_allocated``), peak resident memory, and one block's size for scale. Issue 14's target:
the prune in under 2 minutes on one GPU, peak GPU memory about one block plus the statistics and streams.

    python benchmarks/bench_gpu_prune.py                                    # on a GPU machine
    python benchmarks/bench_gpu_prune.py --shape tiny --device cpu --num-samples 4 --seq-len 64 --results /tmp/r

Rows are appended to gpu_prune.jsonl in --results (default benchmarks/results) and gpu_prune.md is rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import ROOT, commit, run_label  # noqa: E402

sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# name: (hidden, MLP width, layers, heads, kv heads, vocabulary)
SHAPES = {
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "tiny": (256, 704, 2, 4, 2, 1024),
}
SHARD_BYTES = 4 * 2**30


def write_random_checkpoint(shape: str, folder: Path, seed: int = 0, device: str = "cpu") -> tuple[int, int, int]:
    """A LlamaForCausalLM of ``shape`` with random bfloat16 weights (normal, std 0.02; norms at 1), drawn on
    ``device`` (a GPU draws 8B numbers in seconds) and written as safetensors shards of at most ``SHARD_BYTES``
    with their index, one shard in memory at a time; returns (parameters, bytes on disk, bytes of one block)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp, layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator(device).manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, s in shapes.items():
        nbytes = 2 * s.numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                drawn = torch.randn(shapes[name], generator=gen, device=device) * 0.02
                tensors[name] = drawn.to(torch.bfloat16).cpu()
            weight_map[name] = file
            total += 2 * shapes[name].numel()
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    block = sum(2 * s.numel() for name, s in shapes.items() if name.startswith("model.layers.0."))
    return (sum(s.numel() for s in shapes.values()), sum(f.stat().st_size for f in folder.glob("*.safetensors")),
            block)


def table(rows: list[dict]) -> str:
    lines = ["# A whole prune of a Llama-3-8B-shaped model (random weights on disk)", "",
             "`bench_gpu_prune.py`: lazy prune (one block in memory) at the given sparsity from random token ids, "
             "blocks in bfloat16 on the device, statistics in float32, then the sharded save with its reload check. "
             "Issue 14's target on one GPU: the prune in under 2 minutes, peak GPU memory about one block plus "
             "statistics and streams.", "",
             "| run | commit | shape | device | parameters | calibration | sparsity | prune s | save + check s | "
             "peak GPU GiB | one block GiB | peak RSS GiB |",
             "| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        gpu = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
        lines.append(f"| {r['run']} | {r['commit']} | {r['shape']} | {r['device_name']} | {r['parameters']:,} | "
                     f"{r['num_samples']} x {r['seq_len']} | {r['sparsity']:.0%} | {r['prune_seconds']:.0f} | "
                     f"{r['save_seconds']:.0f} | {gpu} | {r['block_gib']:.2f} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the checkpoint and the output go "
                        "(default: a temporary folder, removed after)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    from hf_subprune import prune

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device: run on a GPU machine, or pass --device cpu")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        folder, out = Path(tmp) / "model", Path(tmp) / "pruned"
        start = time.perf_counter()
        params, on_disk, block = write_random_checkpoint(args.shape, folder, device=args.device)
        print(f"wrote {params:,} parameters ({on_disk / 2**30:.1f} GiB) in {time.perf_counter() - start:.0f} s",
              flush=True)
        vocab = SHAPES[args.shape][-1]
        ids = torch.randint(0, vocab, (args.num_samples, args.seq_len), generator=torch.Generator().manual_seed(0))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = prune(str(folder), input_ids=ids, sparsity=args.sparsity, device=args.device, dtype="bfloat16",
                       stats_dtype="float32")
        if cuda:
            torch.cuda.synchronize()
        prune_seconds = time.perf_counter() - start
        start = time.perf_counter()
        result.save(out)
        save_seconds = time.perf_counter() - start
        row = {"run": run_label(), "commit": commit(), "shape": args.shape,
               "device_name": torch.cuda.get_device_name() if cuda else args.device, "parameters": params,
               "params_after": result.params_after, "num_samples": args.num_samples, "seq_len": args.seq_len,
               "sparsity": args.sparsity, "prune_seconds": prune_seconds, "save_seconds": save_seconds,
               "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
               "block_gib": block / 2**30,
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "reload_check": json.loads((out / "subprune_report.json").read_text()).get("reload_check")}
    args.results.mkdir(parents=True, exist_ok=True)
    jsonl = args.results / "gpu_prune.jsonl"
    with jsonl.open("a") as f:
        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line]
    (args.results / "gpu_prune.md").write_text(table(rows))
    print(table(rows[-1:]))


if __name__ == "__main__":
    main()
