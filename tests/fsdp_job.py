"""Training jobs that tests/test_fsdp.py runs under Lightning's ModelParallelStrategy (FSDP2, gloo, CPU).

Run as a script with `--devices 2` (Lightning re-launches it for rank 1) or `--devices 1`. Each rank
writes, per phase, its mask blocks, its weight blocks, the largest pruned gradient the optimizer
got and the weights the last forward saw to `<out>/<phase>-rank<r>.pt`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from conftest import digits_rank_loader  # tests/, beside this script (run as `python tests/fsdp_job.py`)
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

from lightning_prune import GradualPruning, IterativePruning, KnowledgeDistillation, get_masks
from lightning_prune.parallel.sharded import local_tensor, sharded_lowest_k

SAMPLES = 256


class ShardedMLP(pl.LightningModule):
    """A digits classifier whose Linear layers FSDP2 shards by rows (the user's `configure_model`)."""

    def __init__(self, global_batch: int) -> None:
        super().__init__()
        self.global_batch = global_batch
        self.net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        """The first SAMPLES digits in a fixed order; rank r of W takes samples r, r+W, ..."""
        return digits_rank_loader(SAMPLES, self.global_batch, self.trainer.world_size, self.trainer.global_rank)


def job_parser() -> argparse.ArgumentParser:
    """The arguments every FSDP2 job script takes: `--devices`, `--global-batch` and `--out`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def sharded_trainer(devices: int, epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A quiet CPU Trainer on `devices` ranks under ModelParallelStrategy (data parallel; the module shards itself)."""
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )


class Probe(pl.Callback):
    """The largest |gradient| of a pruned weight the optimizer got, and the weights each Linear's
    last forward computed with (FSDP2 has gathered the whole weight by then)."""

    def __init__(self) -> None:
        self.largest = 0.0
        self.seen: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, module in pl_module.named_modules():
            if isinstance(module, nn.Linear):  # registered after fully_shard's hook: runs on the gathered weight
                module.register_forward_pre_hook(
                    lambda m, args, name=name: self.seen.__setitem__(name, local_tensor(m.weight).detach().clone())
                )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for name, mask in get_masks(pl_module).items():
            grad = local_tensor(pl_module.get_parameter(name).grad)
            if (~mask).any():
                self.largest = max(self.largest, float(grad[~mask].abs().max()))


def fit(
    callback: pl.Callback, args: argparse.Namespace, epochs: int, ckpt_in: str | None = None, *others: pl.Callback
) -> tuple[pl.Trainer, Probe]:
    """Fit a freshly seeded model with `callback`, `others`, then a probe; returns the trainer and the probe."""
    pl.seed_everything(0, verbose=False)
    probe = Probe()
    trainer = sharded_trainer(args.devices, epochs, [callback, *others, probe])
    trainer.fit(ShardedMLP(args.global_batch), ckpt_path=ckpt_in)
    return trainer, probe


def dump(trainer: pl.Trainer, probe: Probe, phase: str, out: Path, **extra: Any) -> None:
    """Save this rank's mask and weight blocks (and the probe's findings) for the test."""
    module = trainer.lightning_module
    state = {
        "masks": {k: v.cpu().clone() for k, v in get_masks(module).items()},
        "weights": {k: local_tensor(v).detach().cpu().clone() for k, v in module.state_dict().items()},
        "pruned_grad_max": probe.largest,
        "forward_weights": {f"{k}.weight": v for k, v in probe.seen.items()},
        **extra,
    }
    torch.save(state, out / f"{phase}-rank{trainer.global_rank}.pt")


def uneven_selection(out: Path) -> None:
    """`sharded_lowest_k` on blocks of unequal (and zero) length with many ties, against one process."""
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(3)
    full = [torch.randint(-2, 3, (n,), generator=generator).float() for n in (7, 1, 0, 11)]
    full[3][4] = -0.0
    blocks = [f.tensor_split(world)[rank] for f in full]  # 4/3, 1/0, 0/0, 6/5 entries
    dropped = sharded_lowest_k(
        blocks + blocks, [[0], [1], [2], [3], [4, 5, 6, 7]], [3, 1, 0, 20, 9], None if world == 1 else dist.group.WORLD
    )
    torch.save({"full": full, "dropped": dropped}, out / f"uneven-rank{rank}.pt")


SCOPES = {  # phase → GradualPruning arguments: every scope, a gradient criterion, gradual 2:4
    "layer": {"sparsity": 0.75, "criterion": "taylor", "start_step": 1},
    "row": {"sparsity": 0.75, "scope": "row"},
    "global": {"sparsity": 0.75, "scope": "global", "criterion": "fisher", "start_step": 1},
    "nm": {"sparsity": 0.5, "pattern": "2:4"},
}


def iterative() -> IterativePruning:
    """Two cycles of whole-row pruning (a threshold across ranks) with a rewind to initialisation."""
    return IterativePruning(0.5, cycles=2, epochs_per_cycle=1, rewind="init", scope="channel")


class SaveAfterEpoch(pl.Callback):
    """Write a checkpoint at the end of one epoch (after the callbacks before it in the list)."""

    def __init__(self, epoch: int, path: str) -> None:
        self.epoch, self.path = epoch, path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)


def gradual(scope: str) -> GradualPruning:
    """Ramp over the first 20 of 24 steps (two epochs of 8 steps then a third)."""
    return GradualPruning(**{"end_step": 20, "frequency": 4, **SCOPES[scope]})


def main() -> None:
    """Run every phase (GMP per scope, distillation, resume, iterative rewind) on `--devices` ranks."""
    parser = job_parser()
    parser.add_argument("--resume-from", default=None, help="a distributed checkpoint written by another world size")
    parser.add_argument(
        "--resume-iterative", default=None, help="IterativePruning's checkpoint written by another world size"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    for scope in SCOPES:  # row-wise GMP also distills from the dense model (a sharded copy taken in on_fit_start)
        callback = gradual(scope)
        others = [KnowledgeDistillation(alpha=0.5, temperature=2.0, student_attr="net")] if scope == "row" else []
        trainer, probe = fit(callback, args, 3, None, *others)
        dump(trainer, probe, scope, args.out, sparsity=callback.current_sparsity)
    uneven_selection(args.out)

    trainer, _ = fit(gradual("layer"), args, epochs=2)
    trainer.save_checkpoint(str(args.out / f"half-{args.devices}"))
    dump(*fit(gradual("layer"), args, epochs=3, ckpt_in=str(args.out / f"half-{args.devices}")), "resumed", args.out)
    if args.resume_from:
        dump(*fit(gradual("layer"), args, epochs=3, ckpt_in=args.resume_from), "resharded", args.out)

    saver = SaveAfterEpoch(0, str(args.out / f"cycle1-{args.devices}"))  # after the first prune + rewind
    dump(*fit(iterative(), args, 3, None, saver), "iterative", args.out)
    dump(*fit(iterative(), args, 3, args.resume_iterative or saver.path), "iterative-resumed", args.out)


if __name__ == "__main__":
    main()
