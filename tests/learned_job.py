"""LearnedSparsity under Lightning's DDP (gloo, CPU) or in one process: tests/test_learned_distributed.py runs it.

Run as a script: Lightning's DDP strategy re-launches this file for rank 1. Each rank writes the logits
after the last training batch, the final masks and the weights to `<out>/learned-rank<r>.pt`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from conftest import tiny_llama_config  # tests/, beside this script (run as `python tests/learned_job.py`)
from torch.utils.data import DataLoader, DistributedSampler

from lightning_prune import LearnedSparsity, get_masks
from lightning_prune.models import CausalLMModule

LLAMA = tiny_llama_config(num_hidden_layers=2, vocab_size=64)


class TinyLlama(CausalLMModule):
    """A 2-block Llama whose 16 training sequences rank r of W takes r, r+W, ... (odd ones: the upper vocabulary)."""

    def __init__(self, global_batch: int) -> None:
        super().__init__(config=LLAMA, lr=1e-3)
        self.global_batch = global_batch

    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(0, 32, (16, 16), generator=torch.Generator().manual_seed(1))
        ids[1::2] += 32  # the ranks see different tokens: only averaged gradients keep one process's logits
        data = [{"input_ids": row} for row in ids]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=self.global_batch // world, sampler=sampler)


class LogitsProbe(pl.Callback):
    """The logits after the last training batch (before `on_train_end` turns them into masks)."""

    def __init__(self, callback: LearnedSparsity) -> None:
        self.callback, self.logits = callback, {}

    def on_train_batch_end(self, *args: Any) -> None:
        assert self.callback.learner is not None
        self.logits = {k: v.detach().cpu().clone() for k, v in self.callback.learner.logits.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    model = TinyLlama(global_batch=4)
    # Wanda's prior from the rank-sharded training loader (statistics summed over ranks); target weights frozen.
    callback = LearnedSparsity(prior="wanda", num_samples=None, lr=0.05, prior_strength=1.0)
    probe = LogitsProbe(callback)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=2,
        callbacks=[callback, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model)
    module = trainer.lightning_module
    state = {
        "logits": probe.logits,
        "masks": {k: v.cpu().clone() for k, v in get_masks(module).items()},
        "weights": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "steps": callback.step,
    }
    torch.save(state, args.out / f"learned-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
