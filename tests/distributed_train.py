"""Run by tests/test_trainer_callback.py under `accelerate launch`: a Trainer run with a two-cut schedule; each
rank writes its cuts, kept indices, final weights and losses, and rank 0 saves the model."""

import sys
from pathlib import Path

import torch

from hf_subprune import PruneConfig, SubpruneCallback

from conftest import tiny_model
from test_trainer_callback import make_trainer


def main(folder: str) -> None:
    folder = Path(folder)
    torch.set_num_threads(1)
    callback = SubpruneCallback(PruneConfig(sparsity=0.5, num_samples=8, seq_len=16), schedule={2: 0.2, 4: 0.45})
    trainer = make_trainer(folder, tiny_model("llama"), [callback], steps=6)
    trainer.train()
    trainer.save_model(str(folder / "saved"))
    model = trainer.model
    kept = {name: k for c in callback.cuts for name, (_, k) in c.kept.items() if k is not None}
    torch.save({"cuts": [c.step for c in callback.cuts], "kept": kept, "steps": trainer.state.global_step,
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]},
               folder / f"rank{trainer.args.process_index}.pt")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
