"""Training jobs that tests/test_fsdp_hsdp.py runs: HSDP (`fully_shard` on a 2-D replicate × shard
mesh) under Lightning's ModelParallelStrategy, gloo, CPU.

Run as a script with `--devices 2` (meshes 2x1: two replicas of one block each, and 1x2: one
replica split into two row blocks) or `--devices 1` (mesh 1x1, the one-process reference). Each
phase writes `<out>/<mesh>-<phase>-rank<r>.pt` like tests/fsdp_job.py's `dump`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from fsdp_job import SCOPES, Probe, ShardedMLP, dump, gradual  # tests/, beside this script
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_prune.sharded import targets_shard_group


class HSDPMLP(ShardedMLP):
    """`ShardedMLP` sharded by HSDP: every Linear on a (replicate, shard) mesh of the given shape."""

    def __init__(self, global_batch: int, mesh_shape: tuple[int, int]) -> None:
        super().__init__(global_batch)
        self.mesh_shape = mesh_shape

    def configure_model(self) -> None:
        mesh = init_device_mesh("cpu", self.mesh_shape, mesh_dim_names=("replicate", "shard"))
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class GroupSize(pl.Callback):
    """The size of the process group the pruning callbacks select over (1: no collective)."""

    def __init__(self) -> None:
        self.size = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruning = next(c for c in trainer.callbacks if hasattr(c, "targets"))  # type: ignore[attr-defined]
        group = targets_shard_group(pruning.targets)
        self.size = 1 if group is None else torch.distributed.get_world_size(group)


def fit(callback: pl.Callback, args: argparse.Namespace, mesh: str, epochs: int, ckpt_in: str | None = None) -> tuple[pl.Trainer, Probe, int]:
    """Fit a freshly seeded HSDP model on `mesh` ("RxS") with `callback` and a probe."""
    pl.seed_everything(0, verbose=False)
    probe, group_size = Probe(), GroupSize()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
        max_epochs=epochs,
        callbacks=[callback, probe, group_size],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    replicate, shard = (int(n) for n in mesh.split("x"))
    trainer.fit(HSDPMLP(args.global_batch, (replicate, shard)), ckpt_path=ckpt_in)
    return trainer, probe, group_size.size


def main() -> None:
    """GMP per scope on every mesh of `--devices` ranks, then checkpoint → resume (also onto another mesh)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume-from", nargs="*", default=[], help="distributed checkpoints written on other meshes")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    meshes = ["2x1", "1x2"] if args.devices == 2 else ["1x1"]

    for mesh in meshes:
        for scope in SCOPES:
            callback = gradual(scope)
            trainer, probe, size = fit(callback, args, mesh, 3)
            dump(trainer, probe, f"{mesh}-{scope}", args.out, sparsity=callback.current_sparsity, group_size=size)

    half = str(args.out / f"half-{meshes[0]}")  # global scope: the Fisher sums travel through the checkpoint too
    fit(gradual("global"), args, meshes[0], 2)[0].save_checkpoint(half)
    for mesh in meshes:  # the same mesh, and (2 ranks) the other one
        trainer, probe, _ = fit(gradual("global"), args, mesh, 3, half)
        dump(trainer, probe, f"{mesh}-resumed", args.out)
    for index, path in enumerate(args.resume_from):
        trainer, probe, _ = fit(gradual("global"), args, meshes[0], 3, path)
        dump(trainer, probe, f"{meshes[0]}-resharded{index}", args.out)


if __name__ == "__main__":
    main()
