"""LearnedSparsity under Lightning's ModelParallelStrategy (FSDP2, gloo, CPU): tests/test_learned_fsdp.py runs it.

Run as a script with `--devices 2` (Lightning re-launches it for rank 1) or `--devices 1`. Each rank
writes, per phase, its row blocks of the logits after the last training batch, its mask and weight
blocks and the callback's step and memory to `<out>/<phase>-rank<r>.pt`. Phases: `learned` (two
epochs, a checkpoint after the first), `resumed` (the second epoch again from that checkpoint) and,
given `--resume-from`, `resharded` (from a checkpoint another number of ranks wrote); on two ranks also
`hsdp-2x1` and `hsdp-1x2` (HSDP meshes: two replicas, one replica in two row blocks).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from fsdp_hsdp_job import HSDPMLP
from fsdp_job import SaveAfterEpoch, ShardedMLP, job_parser, sharded_trainer  # tests/, beside this script
from torch import nn

from lightning_prune import LearnedSparsity, get_masks
from lightning_prune.parallel.sharded import local_tensor


def learned_net() -> nn.Sequential:
    """The digits MLP with layers of 48, 36 and 9 rows (9: blocks of 5 and 4 rows on two ranks)."""
    return nn.Sequential(
        nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 36), nn.ReLU(), nn.Linear(36, 9), nn.ReLU(), nn.Linear(9, 10)
    )


class LearnedMLP(ShardedMLP):
    """The FSDP2 digits MLP (`ShardedMLP`) with `learned_net`'s layers."""

    def __init__(self, global_batch: int) -> None:
        super().__init__(global_batch)
        self.net = learned_net()


class HSDPLearnedMLP(HSDPMLP):
    """`learned_net` sharded by HSDP on a (replicate, shard) mesh of the given shape (2x1: two whole replicas)."""

    def __init__(self, global_batch: int, mesh_shape: tuple[int, int]) -> None:
        super().__init__(global_batch, mesh_shape)
        self.net = learned_net()


class LogitsProbe(pl.Callback):
    """This rank's logits blocks after the last training batch (before `on_train_end` makes them masks)."""

    def __init__(self, callback: LearnedSparsity) -> None:
        self.callback, self.logits = callback, {}

    def on_train_batch_end(self, *args: Any) -> None:
        assert self.callback.learner is not None
        self.logits = {k: v.detach().cpu().clone() for k, v in self.callback.learner.logits.items()}


def fit(
    devices: int,
    global_batch: int,
    ckpt_in: str | None = None,
    *others: pl.Callback,
    mesh: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Two epochs of a learned 2:4 mask (magnitude prior, weights frozen, MaskLLM's regularizer) on a freshly
    seeded model (on an
    HSDP `mesh` of that shape, else FSDP2 on every rank)."""
    pl.seed_everything(0, verbose=False)
    callback = LearnedSparsity(prior="magnitude", prior_strength=1.0, lr=0.05, regularizer=1.0, ignore="net.6")
    probe = LogitsProbe(callback)
    trainer = sharded_trainer(devices, 2, [callback, probe, *others])
    trainer.fit(LearnedMLP(global_batch) if mesh is None else HSDPLearnedMLP(global_batch, mesh), ckpt_path=ckpt_in)
    module = trainer.lightning_module
    return {
        "rank": trainer.global_rank,
        "logits": probe.logits,
        "masks": {k: v.cpu().clone() for k, v in get_masks(module).items()},
        "weights": {k: local_tensor(v).detach().cpu().clone() for k, v in module.state_dict().items()},
        "step": callback.step,
        "memory": dict(callback.memory),
    }


def main() -> None:
    """Learn, resume on the same ranks, and (`--resume-from`) resume another world size's checkpoint."""
    parser = job_parser()
    parser.add_argument("--resume-from", default=None, help="a distributed checkpoint written by another world size")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    half = str(args.out / f"learned-half-{args.devices}")

    def dump(phase: str, state: dict[str, Any]) -> None:
        torch.save(state, args.out / f"{phase}-rank{state['rank']}.pt")

    dump("learned", fit(args.devices, args.global_batch, None, SaveAfterEpoch(0, half)))
    dump("resumed", fit(args.devices, args.global_batch, half))
    if args.resume_from:
        dump("resharded", fit(args.devices, args.global_batch, args.resume_from))
    if args.devices == 2:  # HSDP: two whole replicas (their gradients summed across), one replica in two blocks
        for shape in ((2, 1), (1, 2)):
            dump("hsdp-{}x{}".format(*shape), fit(args.devices, args.global_batch, None, mesh=shape))


if __name__ == "__main__":
    main()
