"""Run by tests/test_distributed.py under `accelerate launch`: prune a saved model, write what was kept."""

import json
import sys

import torch
import transformers
from accelerate import Accelerator

from hf_subprune import prune


def main(model_dir: str, ids_json: str, out_json: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor(json.loads(open(ids_json).read()))
    result = prune(model, input_ids=ids, sparsity=0.3, batch_size=2, progress=False, device="cpu", variant="asymmetric")
    if accelerator.is_main_process:
        down = model.model.layers[-1].mlp.down_proj.weight
        with open(out_json, "w") as f:
            json.dump({"kept": [s.kept for s in result.sites], "tokens": [s.tokens for s in result.sites],
                       "processes": result.calibration["processes"], "down_proj": down.tolist()}, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
