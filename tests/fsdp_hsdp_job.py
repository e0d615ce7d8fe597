"""Training jobs that tests/test_fsdp_hsdp.py runs: HSDP (`fully_shard` on a 2-D replicate × shard
mesh) under Lightning's ModelParallelStrategy, gloo, CPU.

Run as a script with `--devices 2` (meshes 2x1: two replicas of one block each, and 1x2: one
replica split into two row blocks) or `--devices 1` (mesh 1x1, the one-process reference). Each
phase writes `<out>/<mesh>-<phase>-rank<r>.pt` like tests/fsdp_job.py's `dump`; row-wise GMP also
distills (the teacher's blocks, bytes and placements and the KD losses are added), and `lora` is
tests/fsdp_lora_job.py's `masked` phase on the mesh (written by that job's `dump`). With
`--mesh-selection` it forks 4 ranks (the imports are done once) that select masks on a 2x2 mesh
(two replicas of two row blocks) without Lightning: `<out>/mesh-rank<r>.pt`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from fsdp_distill_job import RecordingKD
from fsdp_job import (
    SCOPES,
    Probe,
    SaveAfterEpoch,
    ShardedMLP,
    dump,
    gradual,
    iterative,
    job_parser,
    sharded_trainer,
)  # tests/, beside this script
from fsdp_lora_job import LoRAMLP, LoRAProbe, lora, pruned
from fsdp_lora_job import dump as dump_lora
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_prune import find_targets, get_masks, update_masks
from lightning_prune.parallel.sharded import local_tensor, targets_shard_group
from lightning_prune.recovery.sharded import local_bytes

SELECTIONS: dict[str, dict[str, Any]] = {
    "layer": {},
    "row": {"scope": "row"},
    "global": {"scope": "global"},
    "nm": {"pattern": "2:4"},
}


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


class HSDPLoRAMLP(HSDPMLP, LoRAMLP):
    """`HSDPMLP` that shards peft's LoRA layers (no nn.Linear) as units too, as tests/fsdp_lora_job.py's LoRAMLP."""

    def __init__(self, global_batch: int, mesh_shape: tuple[int, int] = (1, 1)) -> None:
        super().__init__(global_batch, mesh_shape)

    def configure_model(self) -> None:
        mesh = init_device_mesh("cpu", self.mesh_shape, mesh_dim_names=("replicate", "shard"))
        for layer in self.net:
            if isinstance(layer, (nn.Linear, LoraLayer)):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class GroupSize(pl.Callback):
    """The size of the process group the pruning callbacks select over (1: no collective)."""

    def __init__(self) -> None:
        self.size = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruning = next((c for c in trainer.callbacks if hasattr(c, "targets")), None)  # type: ignore[attr-defined]
        if pruning is None:  # LoRARecovery alone
            return
        group = targets_shard_group(pruning.targets)
        self.size = 1 if group is None else torch.distributed.get_world_size(group)


def mesh_shape(mesh: str) -> tuple[int, int]:
    """The mesh name `RxS` as (replicas, shards)."""
    replicate, shard = (int(n) for n in mesh.split("x"))
    return replicate, shard


def fit(
    callback: pl.Callback,
    args: argparse.Namespace,
    mesh: str,
    epochs: int,
    ckpt_in: str | None = None,
    *others: pl.Callback,
) -> tuple[pl.Trainer, Probe, int]:
    """Fit a freshly seeded HSDP model on `mesh` ("RxS") with `callback`, `others` and a probe."""
    pl.seed_everything(0, verbose=False)
    probe, group_size = Probe(), GroupSize()
    trainer = sharded_trainer(args.devices, epochs, [callback, *others, probe, group_size])
    trainer.fit(HSDPMLP(args.global_batch, mesh_shape(mesh)), ckpt_path=ckpt_in)
    return trainer, probe, group_size.size


def teacher_facts(kd: RecordingKD) -> dict[str, Any]:
    """The HSDP teacher on this rank: its blocks, bytes and placements, and the KD loss of every step."""
    assert kd.teacher is not None
    return {
        "teacher": {
            name: local_tensor(value).detach().cpu().clone() for name, value in kd.teacher.state_dict().items()
        },
        "teacher_bytes": local_bytes(kd.teacher),
        "teacher_placements": sorted({str(getattr(p, "placements", "whole")) for p in kd.teacher.parameters()}),
        "teacher_trainable": any(p.requires_grad for p in kd.teacher.parameters()),
        "kd_losses": kd.losses,
    }


def lora_phase(args: argparse.Namespace, mesh: str) -> None:
    """tests/fsdp_lora_job.py's `masked` phase (2:4 masks, a kept exact zero in net.2, masked-delta
    LoRA, merged) with every LoRA layer on the HSDP mesh; dumped as `<mesh>-lora`."""
    module = pruned("masked", args.global_batch, HSDPLoRAMLP)
    assert isinstance(module, HSDPLoRAMLP)
    module.mesh_shape = mesh_shape(mesh)
    before = {name: value.detach().clone() for name, value in module.state_dict().items()}
    recovery, probe = lora(), LoRAProbe()
    trainer = sharded_trainer(args.devices, 2, [recovery, probe])
    trainer.fit(module)
    dump_lora(trainer, probe, recovery, f"{mesh}-lora", args, before)


def mesh_selection(rank: int, out: Path) -> None:
    """Magnitude masks of every scope on a 2x2 (replicate, shard) mesh, from integer weights (many
    ties): each replica's blocks must be the unsharded masks, with collectives over the shard group."""
    store = dist.FileStore(str(out / "rendezvous"), 4)  # no port to pick (and race other jobs for)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=4)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 48), nn.Linear(48, 10))
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(
                torch.randint(-3, 4, parameter.shape, generator=torch.Generator().manual_seed(parameter.numel()))
            )
    whole = {name: value.clone() for name, value in net.state_dict().items()}
    for layer in net:
        fully_shard(layer, mesh=mesh)
    targets = find_targets(net)
    blocks = {t.name: local_tensor(t.weight).detach().clone() for t in targets}
    masks = {}
    for phase, options in SELECTIONS.items():
        update_masks(targets, {name: block.abs() for name, block in blocks.items()}, 0.5, monotone=False, **options)
        masks[phase] = {name: mask.clone() for name, mask in get_masks(net).items()}
    state = {
        "whole": whole,
        "masks": masks,
        "coordinate": mesh.get_coordinate(),
        "group_size": dist.get_world_size(targets_shard_group(targets)),
    }
    torch.save(state, out / f"mesh-rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


def main() -> None:
    """GMP per scope on every mesh of `--devices` ranks, checkpoint → resume (also onto another mesh),
    and IterativePruning's rewind resumed between cycles on the other mesh."""
    parser = job_parser()
    parser.add_argument("--resume-from", nargs="*", default=[], help="distributed checkpoints written on other meshes")
    parser.add_argument("--mesh-selection", action="store_true", help="only the 2x2 mesh selection (4 forked ranks)")
    parser.add_argument(
        "--resume-iterative", default=None, help="IterativePruning's checkpoint written on another mesh"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mesh_selection:
        torch.multiprocessing.start_processes(mesh_selection, args=(args.out,), nprocs=4, start_method="fork")
        return
    meshes = ["2x1", "1x2"] if args.devices == 2 else ["1x1"]

    for mesh in meshes:
        for scope in SCOPES:  # row-wise GMP also distills from a teacher sharded like the student (HSDP)
            callback, kd = gradual(scope), RecordingKD()
            trainer, probe, size = fit(callback, args, mesh, 3, None, *([kd] if scope == "row" else []))
            facts = teacher_facts(kd) if scope == "row" else {}
            dump(
                trainer,
                probe,
                f"{mesh}-{scope}",
                args.out,
                sparsity=callback.current_sparsity,
                group_size=size,
                **facts,
            )
        lora_phase(args, mesh)

    half = str(args.out / f"half-{meshes[0]}")  # global scope: the Fisher sums travel through the checkpoint too
    fit(gradual("global"), args, meshes[0], 2)[0].save_checkpoint(half)
    for mesh in meshes:  # the same mesh, and (2 ranks) the other one
        trainer, probe, _ = fit(gradual("global"), args, mesh, 3, half)
        dump(trainer, probe, f"{mesh}-resumed", args.out)
    for index, path in enumerate(args.resume_from):
        trainer, probe, _ = fit(gradual("global"), args, meshes[0], 3, path)
        dump(trainer, probe, f"{meshes[0]}-resharded{index}", args.out)

    saver = SaveAfterEpoch(
        0, str(args.out / f"cycle1-{meshes[0]}")
    )  # after the first prune + rewind (a sharded snapshot)
    dump(*fit(iterative(), args, meshes[0], 3, None, saver)[:2], f"{meshes[0]}-iterative", args.out)
    trainer, probe, _ = fit(iterative(), args, meshes[-1], 3, args.resume_iterative or saver.path)
    dump(trainer, probe, f"{meshes[-1]}-iterative-resumed", args.out)


if __name__ == "__main__":
    main()
