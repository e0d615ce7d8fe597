"""LoRA recovery jobs that tests/test_fsdp_lora.py runs under Lightning's ModelParallelStrategy (FSDP2, gloo, CPU).

Run as a script with `--devices 2` (Lightning re-launches it for rank 1) or `--devices 1`. Each
rank writes, per phase, its mask and merged weight blocks, what the forward passes saw and how the
adapters were laid out to `<out>/<phase>-rank<r>.pt`. Phases:

- `masked`: masks attached before sharding (2:4, one kept weight of net.2 exactly zero, so that
  layer's forward gathers its mask blocks), masked-delta LoRA, merged; checkpoints after epoch 1.
- `resumed`: the same fit resumed from that checkpoint (`resharded`: from the other world size's).
- `zeros`: a one-shot-pruned model (masks baked in as zeros), every nn.Linear its own FSDP2 unit
  (lora_A and lora_B too), plain LoRA forward (`masked_delta=False`), merged.
- `llama`: a tiny Llama (2:4 masks on every projection) whose decoder layers and model FSDP2 shards.
- `unmerged`: the `masked` model with `merge=False`; `save_adapter` writes `<out>/adapter-<devices>`
  and every rank records the sharded network's output on a fixed batch (`unmerged-rank<r>.pt`).
- `refused` (one rank only): the masked-delta forward with lora_A/lora_B sharded as their own units.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from conftest import tiny_llama  # tests/, beside this script (run as `python tests/fsdp_lora_job.py`)
from fsdp_job import SaveAfterEpoch, ShardedMLP, job_parser, sharded_trainer
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import LoRARecovery, finalize, get_masks, update_masks
from lightning_prune.parallel.sharded import local_tensor
from lightning_prune.targets import find_targets


class LoRAMLP(ShardedMLP):
    """ShardedMLP whose `configure_model` shards peft's LoRA layers (no nn.Linear) as units too."""

    def configure_model(self) -> None:
        assert self.device_mesh is not None  # set by ModelParallelStrategy before configure_model
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, (nn.Linear, LoraLayer)):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class ChildLinearMLP(LoRAMLP):
    """Shards only the nn.Linear children (ShardedMLP's loop): the LoRA layers fall to the root unit."""

    configure_model = ShardedMLP.configure_model


class PerLinearMLP(LoRAMLP):
    """Shards every nn.Linear among `modules()`: after injection, base_layer, lora_A and lora_B are
    units of their own."""

    def configure_model(self) -> None:
        assert self.device_mesh is not None  # set by ModelParallelStrategy before configure_model
        mesh = self.device_mesh["data_parallel"]
        for module in [m for m in self.modules() if isinstance(m, nn.Linear)]:
            fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


class LlamaLM(pl.LightningModule):
    """A tiny Llama LM sharded as the README shows: each decoder layer (with its LoRA layers), then the model."""

    def __init__(self, global_batch: int) -> None:
        super().__init__()
        self.global_batch = global_batch
        self.model = tiny_llama(num_hidden_layers=2)
        targets = find_targets(self.model)  # every projection; lm_head stays dense
        update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.5, pattern="2:4")

    def configure_model(self) -> None:
        assert self.device_mesh is not None  # set by ModelParallelStrategy before configure_model
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.get_submodule("model.layers").children():
            fully_shard(block, mesh=mesh)
        fully_shard(
            self.model, mesh=mesh
        )  # its forward runs in `training_step`: it gathers the embeddings, norm and head

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.model(input_ids=batch[0], labels=batch[0]).loss
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        """32 fixed random sequences of 16 tokens; rank r of W takes sequences r, r+W, ..."""
        tokens = torch.randint(0, 48, (32, 16), generator=torch.Generator().manual_seed(0))
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return DataLoader(TensorDataset(tokens[rank::world]), batch_size=self.global_batch // world)


def pruned(kind: str, global_batch: int, cls: type[LoRAMLP] | None = None) -> LoRAMLP:
    """The seeded MLP pruned before sharding: 2:4 masks attached (`masked`), or 50% baked in as zeros."""
    pl.seed_everything(0, verbose=False)
    module = (cls or (LoRAMLP if kind == "masked" else PerLinearMLP))(global_batch)
    targets = find_targets(module)  # net.0 and net.2; the head stays dense
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.5, pattern="2:4" if kind == "masked" else None)
    with torch.no_grad():
        if kind == "masked":
            weight, mask = module.get_parameter("net.2.weight"), get_masks(module)["net.2.weight"]
            weight[tuple(mask.nonzero()[5])] = 0.0  # a kept weight that is exactly zero
        else:
            finalize(module)
    return module


class LoRAProbe(pl.Callback):
    """What each LoRA layer's forward saw: the (gathered) frozen base weight in every step, and the
    input and output of a forward after the last step; the adapters' layout; the mask blocks."""

    def __init__(self) -> None:
        self.base_seen: dict[str, torch.Tensor] = {}
        self.io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.batch: torch.Tensor | None = None
        self.layout: dict[str, Any] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, module in pl_module.named_modules():
            if isinstance(module, LoraLayer) and isinstance(
                module, nn.Module
            ):  # registered after FSDP2's hooks: they see gathered weights
                module.get_base_layer().register_forward_pre_hook(
                    lambda m, args, name=name: self.base_seen.__setitem__(
                        f"{name}.weight", local_tensor(m.weight).detach().clone()
                    )
                )
                module.register_forward_hook(
                    lambda m, args, out, name=name: self.io.__setitem__(
                        f"{name}.weight", (args[0].detach().clone(), out.detach().clone())
                    )
                )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.batch is None:
            self.batch = batch[0]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        parameters = dict(pl_module.named_parameters())
        self.layout = {
            "adapters": {
                n: (type(p).__name__, tuple(local_tensor(p).shape)) for n, p in parameters.items() if ".lora_" in n
            },
            "trainable": sorted(n for n, p in parameters.items() if p.requires_grad),
            "mask_shapes": {n: tuple(m.shape) for n, m in get_masks(pl_module).items()},
        }
        with torch.no_grad():
            if isinstance(pl_module, LoRAMLP):
                pl_module.net(
                    self.batch
                )  # the trained adapters' forward, before the merge (`io`), as `training_step` calls it


def fit(
    module: pl.LightningModule,
    recovery: LoRARecovery,
    args: argparse.Namespace,
    epochs: int,
    ckpt_in: str | None = None,
    *others: pl.Callback,
) -> tuple[pl.Trainer, LoRAProbe]:
    """Fit `module` with `recovery`, `others` and a probe under ModelParallelStrategy."""
    probe = LoRAProbe()
    trainer = sharded_trainer(args.devices, epochs, [recovery, *others, probe])
    trainer.fit(module, ckpt_path=ckpt_in)
    return trainer, probe


def dump(
    trainer: pl.Trainer,
    probe: LoRAProbe,
    recovery: LoRARecovery,
    phase: str,
    args: argparse.Namespace,
    before: dict[str, torch.Tensor],
) -> None:
    """Save this rank's mask and (merged) weight blocks and the probe's findings for the test."""
    module = trainer.lightning_module
    state = {
        "masks": {k: v.cpu().clone() for k, v in get_masks(module).items()},
        "weights": {k: local_tensor(v).detach().cpu().clone() for k, v in module.state_dict().items()},
        "before": before,
        "base_seen": probe.base_seen,
        "io": probe.io,
        **probe.layout,
        "forward_masks": recovery.forward_masks,
        "merged": recovery.merged,
        "wrapped": any(isinstance(m, LoraLayer) for m in module.modules()),
    }
    torch.save(state, args.out / f"{phase}-rank{trainer.global_rank}.pt")


def lora(**kwargs: Any) -> LoRARecovery:
    return LoRARecovery(**{"r": 4, "alpha": 8, **kwargs})


def run_phase(phase: str, args: argparse.Namespace, epochs: int, ckpt_in: str | None = None, **kwargs: Any) -> None:
    """Prune a fresh model before fit, recover it with LoRA under FSDP2, merge, and dump."""
    if phase == "llama":
        pl.seed_everything(0, verbose=False)
    module = (
        LlamaLM(args.global_batch // 2)
        if phase == "llama"
        else pruned("zeros" if phase == "zeros" else "masked", args.global_batch)
    )
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    recovery = lora(**kwargs)
    others = [SaveAfterEpoch(0, str(args.out / f"epoch1-{args.devices}"))] if phase == "masked" else []
    trainer, probe = fit(module, recovery, args, epochs, ckpt_in, *others)
    dump(trainer, probe, recovery, phase, args, before)


def unmerged(args: argparse.Namespace) -> None:
    """Masked-delta LoRA kept unmerged: the adapter saved with peft, and the trained sharded network's output."""
    recovery = lora(merge=False)
    trainer, _ = fit(pruned("masked", args.global_batch), recovery, args, 1)
    recovery.save_adapter(args.out / f"adapter-{args.devices}")
    batch = torch.rand(8, 64, generator=torch.Generator().manual_seed(5))
    module = trainer.lightning_module
    assert isinstance(module, LoRAMLP)
    with torch.no_grad():  # every rank: the LoRA units all-gather their weights
        output = module.net(batch)
    state = {"batch": batch, "output": output, "wrapped": any(isinstance(m, LoraLayer) for m in module.modules())}
    torch.save(state, args.out / f"unmerged-rank{trainer.global_rank}.pt")


def refused(args: argparse.Namespace) -> None:
    """The masked-delta forward with lora_A/lora_B as FSDP2 units of their own, and LoRA layers left
    to a root unit that `training_step` never calls: each message, saved."""
    for case, cls in (("units", PerLinearMLP), ("root", ChildLinearMLP)):
        try:
            fit(pruned("masked", args.global_batch, cls), lora(), args, 1)
        except ValueError as error:
            (args.out / f"refused-{case}.txt").write_text(str(error))


def main() -> None:
    """Run every phase on `--devices` ranks (see the module docstring)."""
    parser = job_parser()
    parser.add_argument(
        "--resume-from", default=None, help="the `masked` phase's checkpoint written by another world size"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    run_phase("masked", args, 3)
    run_phase("resumed", args, 3, str(args.out / f"epoch1-{args.devices}"))
    if args.resume_from:
        run_phase("resharded", args, 3, args.resume_from)
    run_phase("zeros", args, 2, masked_delta=False)
    run_phase("llama", args, 2)
    unmerged(args)
    if args.devices == 1:
        refused(args)


if __name__ == "__main__":
    main()
