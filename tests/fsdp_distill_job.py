"""Distillation jobs that tests/test_fsdp_distill.py runs under Lightning's ModelParallelStrategy (FSDP2, gloo, CPU).

Run as a script with `--devices 2` (Lightning re-launches it for rank 1) or `--devices 1`. Each rank
writes, per phase, what tests/fsdp_job.py's `dump` writes plus the teacher's blocks, its bytes on
the rank, the student's blocks as fit started and the KD loss of every step, to `<out>/<phase>-rank<r>.pt`.
Each launch also runs the `gmp_chain` recipe through the run pipeline under ModelParallelStrategy
on its ranks (`<out>/staged`): its last stage distills from the dense stage's model, copied
after earlier stages sharded it.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from conftest import compose_config, perturbed  # tests/, beside this script (run as `python tests/fsdp_distill_job.py`)
from fsdp_job import Probe, SaveAfterEpoch, ShardedMLP, dump, gradual, job_parser, sharded_trainer
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard

from lightning_prune import KnowledgeDistillation
from lightning_prune.models import ClassifierModule
from lightning_prune.parallel.sharded import local_tensor
from lightning_prune.recovery.sharded import local_bytes
from lightning_prune.run import run


class RecordingKD(KnowledgeDistillation):
    """KnowledgeDistillation that keeps the KD loss of every step (this rank's share of the batch)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(alpha=0.5, temperature=2.0, student_attr="net", **kwargs)
        self.losses: list[float] = []

    def kd_loss(self, calls: list) -> torch.Tensor:
        loss = super().kd_loss(calls)
        self.losses.append(float(loss))
        return loss


class AtFitStart(pl.Callback):
    """The student's blocks once every callback's `on_fit_start` ran (materialized, sharded, not yet pruned)."""

    def __init__(self) -> None:
        self.blocks: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.blocks = {
            name: local_tensor(p).detach().cpu().clone()
            for name, p in pl_module.get_submodule("net").named_parameters()
        }


class ShardedClassifier(ClassifierModule):
    """The run pipeline's digits MLP, every Linear and the network sharded by FSDP2
    (once: every stage's fit calls this)."""

    def configure_model(self) -> None:
        if isinstance(self.model, FSDPModule):
            return
        assert self.device_mesh is not None  # set by ModelParallelStrategy before configure_model
        mesh = self.device_mesh["data_parallel"]
        for module in self.model.modules():
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


STAGED = [  # gmp_chain, one short epoch per stage, the model above on ModelParallelStrategy
    "dense_epochs=1",
    *(f"stages.{index}.trainer.max_epochs=1" for index in (1, 2, 3)),
    "stages.1.callbacks.gmp.frequency=2",
    "stages.3.callbacks.gmp.frequency=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "plots=false",
    "stage_checkpoints=last",  # keeps the dense stage's (the teacher's source) and the last stage's
    "model._target_=fsdp_distill_job.ShardedClassifier",
    "model.hidden=32",
    "+trainer.strategy._target_=lightning.pytorch.strategies.ModelParallelStrategy",
    "+trainer.strategy.tensor_parallel_size=1",
]


def fit(
    args: argparse.Namespace,
    callbacks: list[pl.Callback],
    epochs: int,
    ckpt_in: str | None = None,
    seed: int = 0,
    empty_init: bool = False,
) -> tuple[pl.Trainer, Probe]:
    """Fit a ShardedMLP seeded with `seed` (built on the meta device with `empty_init`) with `callbacks`,
    then a probe."""
    pl.seed_everything(seed, verbose=False)
    probe = Probe()
    trainer = sharded_trainer(args.devices, epochs, [*callbacks, probe])
    with trainer.init_module(
        empty_init=empty_init
    ):  # Lightning's big-model init: meta device, materialized after sharding
        module = ShardedMLP(args.global_batch)
    trainer.fit(module, ckpt_path=ckpt_in)
    return trainer, probe


def teacher_facts(trainer: pl.Trainer, kd: RecordingKD, start: AtFitStart) -> dict[str, Any]:
    """The teacher's blocks and bytes on this rank, its layout, and what the step saw of it."""
    teacher = kd.teacher
    assert teacher is not None
    optimized = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]}
    params = list(teacher.parameters())
    return {
        "teacher": {name: local_tensor(value).detach().cpu().clone() for name, value in teacher.state_dict().items()},
        "teacher_bytes": local_bytes(teacher),
        "teacher_full_bytes": sum(p.numel() * p.element_size() for p in params),  # global shapes: a whole copy
        "teacher_row_sharded": all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params),
        "teacher_trainable": any(p.requires_grad for p in params) or any(id(p) in optimized for p in params),
        "kd_losses": kd.losses,
        "at_fit_start": start.blocks,
        "kd_warnings": [w["kind"] for w in kd.warnings_recorded],
    }


def phase(args: argparse.Namespace, name: str, epochs: int, *extra: pl.Callback, **options: Any) -> None:
    """Fit with GradualPruning (layer scope, Taylor), a recording KD and `extra`; dump as `name`."""
    kd = RecordingKD(**{key: options.pop(key) for key in ("teacher", "teacher_dtype") if key in options})
    start = AtFitStart()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer, probe = fit(args, [gradual("layer"), kd, start, *extra], epochs, **options)
    dump(trainer, probe, name, args.out, **teacher_facts(trainer, kd, start))


def main() -> None:
    """Every phase: the copied teacher (and a checkpoint mid-ramp), its resume, empty init, a given teacher."""
    parser = job_parser()
    parser.add_argument("--resume-from", default=None, help="a distributed checkpoint written by another world size")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = str(args.out / f"kd-epoch1-{args.devices}")

    phase(args, "copy", 3, SaveAfterEpoch(1, checkpoint))  # the checkpoint: step 16 of a ramp to step 20
    phase(
        args, "resumed", 3, ckpt_in=checkpoint, seed=1
    )  # another seed: the copy taken at fit start is not the dense model
    if args.resume_from:
        phase(args, "resharded", 3, ckpt_in=args.resume_from, seed=1)
    phase(args, "empty-init", 1, empty_init=True, teacher_dtype="bfloat16")
    torch.manual_seed(7)  # the same dense teacher on every rank, as from_pretrained would load it
    given = perturbed(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10)))
    whole = {name: value.detach().clone() for name, value in given.state_dict().items()}
    phase(args, "given", 1, teacher=given)
    torch.save(whole, args.out / "given-whole.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sharded = [f"trainer.devices={args.devices}", f"+trainer.strategy.data_parallel_size={args.devices}"]
        run(compose_config("gmp_chain", args.out / "staged", *STAGED, *sharded))


if __name__ == "__main__":
    main()
