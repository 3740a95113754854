"""Run by tests/test_distributed.py under `accelerate launch`: prune a saved model, write what was kept.

With "accelerator" the script creates an Accelerator as a training script would; with "bare" it only calls
prune(), as a user's script that knows nothing of accelerate would; with "lazy" it gives prune() the folder, whose
blocks stay on disk (each process writes the most blocks it held at once, the main one saves the model next to
the output file); with "padded" the samples are right-padded (``padding_mask``)."""

import json
import os
import sys

import torch
import transformers

from hf_subprune import prune


def padding_mask(ids: torch.Tensor) -> torch.Tensor:
    """Samples of 4 to 15 real tokens, then padding."""
    lengths = torch.tensor([4 + (3 * i) % 12 for i in range(len(ids))])
    return (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()


def main(model_dir: str, ids_json: str, out_json: str, mode: str) -> None:
    accelerator = None
    if mode == "accelerator":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    ids = torch.tensor(json.loads(open(ids_json).read()))
    rank = os.environ.get("RANK", "0")
    if mode == "lazy":
        from hf_subprune.pipeline.lazy import TALLY

        result = prune(model_dir, input_ids=ids, sparsity=0.3, batch_size=2, progress=False, device="cpu",
                       variant="asymmetric")
        if rank == "0":
            result.save(out_json + ".model")
        with open(f"{out_json}.peak-{rank}", "w") as f:
            f.write(str(TALLY.peak))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        mask = padding_mask(ids) if mode == "padded" else None
        result = prune(model, input_ids=ids, attention_mask=mask, sparsity=0.3, batch_size=2, progress=False,
                       device="cpu", variant="asymmetric")
    if rank == "0":
        down = [] if mode == "lazy" else result.model.model.layers[-1].mlp.down_proj.weight.tolist()
        with open(out_json, "w") as f:
            json.dump({"kept": [s.kept for s in result.sites], "tokens": [s.tokens for s in result.sites],
                       "processes": result.calibration["processes"], "down_proj": down}, f)
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()
    else:
        from hf_subprune.distributed import finish

        finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
