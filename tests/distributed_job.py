"""Training jobs that tests/test_distributed.py runs in one process or in two (Lightning DDP, gloo, CPU).

Run as a script: Lightning's DDP strategy re-launches this file for rank 1. Each rank writes its
masks and weights after every phase to `<out>/<phase>-rank<r>.pt`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from conftest import (
    digits_rank_loader,
    tiny_llama_config,
)  # tests/, beside this script (run as `python tests/distributed_job.py`)
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_prune import GradualPruning, IterativePruning, KnowledgeDistillation, get_masks
from lightning_prune.callbacks.oneshot import OneShotPruning
from lightning_prune.models import CausalLMModule

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
        return digits_rank_loader(SAMPLES, self.global_batch, self.trainer.world_size, self.trainer.global_rank)


LLAMA = tiny_llama_config(num_hidden_layers=2, vocab_size=64)


def token_batches(count: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """Fixed random token sequences (the same on every rank)."""
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 64, (batch, 16), generator=generator)} for _ in range(count)]


class TinyLlama(CausalLMModule):
    """A 2-block Llama from a config whose training data rank r of W shards with a DistributedSampler."""

    def __init__(self, global_batch: int) -> None:
        super().__init__(config=LLAMA, lr=1e-3)
        self.global_batch = global_batch

    def train_dataloader(self) -> DataLoader:
        """12 sequences of 16 tokens in a fixed order; rank r of W takes sequences r, r+W, ...

        Odd sequences draw from the upper half of the vocabulary: under DDP the two ranks see
        different activations, so only statistics summed over ranks give one process's masks.
        """
        ids = torch.cat([b["input_ids"] for b in token_batches(3, 4)]) % 32
        ids[1::2] += 32
        data = [{"input_ids": row} for row in ids]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=max(1, self.global_batch // world), sampler=sampler)


class PrunedGradientProbe(pl.Callback):
    """The largest |gradient| of a pruned weight the optimizer was handed (after DDP's all-reduce)."""

    def __init__(self) -> None:
        self.largest = 0.0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for name, mask in get_masks(pl_module).items():
            grad = pl_module.get_parameter(name).grad
            if grad is not None and (~mask).any():
                self.largest = max(self.largest, float(grad[~mask].abs().max()))


def fit(
    callback: pl.Callback,
    args: argparse.Namespace,
    epochs: int,
    ckpt_in: str | None = None,
    llama: bool = False,
    probe: pl.Callback | None = None,
) -> pl.Trainer:
    """Fit a freshly seeded model (digits MLP, or the tiny Llama) with `callback`; returns the trainer."""
    pl.seed_everything(0, verbose=False)
    model = TinyLlama(4) if llama else DigitsMLP(args.global_batch)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=epochs,
        callbacks=[callback] if probe is None else [callback, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, ckpt_path=ckpt_in)
    return trainer


def dump(trainer: pl.Trainer, phase: str, out: Path, probe: PrunedGradientProbe | None = None) -> None:
    """Save this rank's masks and weights (and the probe's largest pruned gradient) for the test."""
    module = trainer.lightning_module
    state = {
        "masks": {k: v.cpu().clone() for k, v in get_masks(module).items()},
        "weights": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "pruned_grad_max": None if probe is None else probe.largest,
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

    probe = PrunedGradientProbe()
    dump(fit(gradual(), args, epochs=3, probe=probe), "gradual", args.out, probe)

    trainer = fit(gradual(), args, epochs=2)
    trainer.save_checkpoint(str(args.out / f"half-{args.devices}.ckpt"))
    ckpt = args.resume_from or str(args.out / f"half-{args.devices}.ckpt")
    dump(fit(gradual(), args, epochs=3, ckpt_in=ckpt), "resumed", args.out)

    dump(
        fit(IterativePruning(0.75, cycles=2, epochs_per_cycle=1, rewind="init"), args, epochs=3), "iterative", args.out
    )

    # One-shot: calibration split across ranks, statistics all-reduced, then a masked fine-tune epoch.
    wanda = OneShotPruning("wanda", 0.5, pattern="2:4", num_samples=None, progress=False)  # the sharded train loader
    dump(fit(wanda, args, epochs=1, llama=True), "wanda", args.out)
    calibration = token_batches(4, 2)
    for index, batch in enumerate(calibration):  # batches 0, 2 go to rank 0 and 1, 3 to rank 1: make them differ
        batch["input_ids"] = batch["input_ids"] % 32 + 32 * (index % 2)
    sparsegpt = OneShotPruning("sparsegpt", 0.5, calibration=calibration, num_samples=None, progress=False)
    dump(fit(sparsegpt, args, epochs=0, llama=True), "sparsegpt", args.out)

    # Distillation beside gradual pruning: every rank copies its own teacher; masks must still agree.
    distill = KnowledgeDistillation(alpha=0.5, temperature=2.0)
    dump(
        fit(GradualPruning(0.5, start_step=0, end_step=4, frequency=2), args, epochs=2, llama=True, probe=distill),
        "distill",
        args.out,
    )


if __name__ == "__main__":
    main()
