"""Training jobs that tests/test_distributed.py runs in one process or in two (Lightning DDP, gloo, CPU).

Run as a script: Lightning's DDP strategy re-launches this file for rank 1. Each rank writes its
masks and weights after every phase to `<out>/<phase>-rank<r>.pt`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_prune import GradualPruning, IterativePruning, get_masks

SAMPLES = 512  # divisible by every global batch used, so DistributedSampler pads nothing


class DigitsMLP(pl.LightningModule):
    """A small classifier: the kind of LightningModule a user brings."""

    def __init__(self, global_batch: int) -> None:
        super().__init__()
        self.global_batch = global_batch
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        """The first SAMPLES digits in a fixed order; rank r of W takes samples r, r+W, ..."""
        x, y = load_digits(return_X_y=True)
        data = TensorDataset(torch.tensor(x[:SAMPLES], dtype=torch.float32) / 16.0, torch.tensor(y[:SAMPLES]))
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=self.global_batch // world, sampler=sampler)


def fit(callback: pl.Callback, args: argparse.Namespace, epochs: int, ckpt_in: str | None = None) -> pl.Trainer:
    """Fit a freshly seeded model with `callback`; returns the trainer."""
    pl.seed_everything(0, verbose=False)
    model = DigitsMLP(args.global_batch)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, ckpt_path=ckpt_in)
    return trainer


def dump(trainer: pl.Trainer, phase: str, out: Path) -> None:
    """Save this rank's masks and weights for the test to compare."""
    module = trainer.lightning_module
    state = {
        "masks": {k: v.cpu().clone() for k, v in get_masks(module).items()},
        "weights": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
    }
    torch.save(state, out / f"{phase}-rank{trainer.global_rank}.pt")


def gradual() -> GradualPruning:
    """Taylor scores come from gradients: the case where unsynchronised ranks would diverge."""
    return GradualPruning(0.75, start_step=1, end_step=40, frequency=8, criterion="taylor")


def main() -> None:
    """Run the phases named on the command line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume-from", default=None, help="a checkpoint written by another world size")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    dump(fit(gradual(), args, epochs=3), "gradual", args.out)

    trainer = fit(gradual(), args, epochs=2)
    trainer.save_checkpoint(str(args.out / f"half-{args.devices}.ckpt"))
    ckpt = args.resume_from or str(args.out / f"half-{args.devices}.ckpt")
    dump(fit(gradual(), args, epochs=3, ckpt_in=ckpt), "resumed", args.out)

    dump(fit(IterativePruning(0.75, cycles=2, epochs_per_cycle=1, rewind="init"), args, epochs=3), "iterative", args.out)


if __name__ == "__main__":
    main()
