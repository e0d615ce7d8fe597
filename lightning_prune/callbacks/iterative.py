"""Iterative pruning: train → prune → fine-tune → re-prune, with optional lottery-ticket rewind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor

from lightning_prune.callbacks.inherited import InheritedMasks
from lightning_prune.callbacks.scheduled import ScheduledPruning
from lightning_prune.callbacks.sharding import Blocks
from lightning_prune.criteria import Criterion
from lightning_prune.masking import apply_masks_
from lightning_prune.validation import check_integer


class IterativePruning(ScheduledPruning):
    """Prune a fraction of the remaining weights after every `epochs_per_cycle` epochs, `cycles` times.

    Cycle c of C reaches sparsity 1 − (1 − s)^(c/C), i.e. each cycle prunes the same fraction
    p = 1 − (1 − s)^(1/C) of what is left (Han et al., 2015). With `rewind="init"` (or an integer
    step k) the surviving weights go back to their values at the start of training (or at step k)
    and the optimizer state is cleared after every pruning: the lottery-ticket procedure of
    Frankle & Carbin (2019). The snapshot holds the target tensors only; learning-rate schedulers
    are not rewound. With `structure` ("neuron", "head", "filter") whole units are pruned instead
    (see `GradualPruning`), and `compact_on_end` removes them at fit end.

    The Trainer needs at least `cycles · epochs_per_cycle` epochs (more fine-tune the final sparse
    model); with `rewind`, `(cycles + 1) · epochs_per_cycle`, since the last cycle's rewind leaves an
    untrained ticket that must train as long as every cycle did.

    Lifecycle: `preflight` (and `on_fit_start`) refuses shorter Trainers, then `on_fit_start`
    resolves targets and restores masks; `on_train_start` (or the batch at step k) takes the rewind
    snapshot; `on_train_epoch_end` prunes at the end of every cycle, rewinds if asked, and logs
    `prune/sparsity`; `on_fit_end` warns if the target was missed, removes hooks (and finalizes if asked).

    Example YAML (`lightning_prune/conf/pruning/iterative.yaml`)::

        _target_: lightning_prune.IterativePruning
        sparsity: 0.8          # final fraction of zeros
        cycles: 3              # prune events
        epochs_per_cycle: 2    # training epochs before each prune
        rewind: init           # null | init | <step>
    """

    def __init__(
        self,
        sparsity: float,
        cycles: int,
        epochs_per_cycle: int,
        rewind: str | int | None = None,
        criterion: str | Criterion = "magnitude",
        scope: str = "layer",
        pattern: str | None = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        finalize_on_end: bool = False,
        structure: str | None = None,
        compact_on_end: bool = False,
    ) -> None:
        super().__init__(
            sparsity,
            criterion,
            scope,
            pattern,
            targets,
            ignore,
            finalize_on_end,
            structure=structure,
            compact_on_end=compact_on_end,
        )
        check_integer(cycles, "cycles", low=1)
        check_integer(epochs_per_cycle, "epochs_per_cycle", low=1)
        if (
            rewind is not None
            and rewind != "init"
            and (isinstance(rewind, bool) or not isinstance(rewind, int) or rewind < 0)
        ):
            raise ValueError(f"`rewind` must be None, 'init' or a step >= 0, got {rewind!r}")
        self.cycles = cycles
        self.epochs_per_cycle = epochs_per_cycle
        self.rewind = rewind
        self.cycles_done = 0
        self.snapshot: dict[str, torch.Tensor] = {}

    def sparsity_after(self, cycle: int) -> float:
        """Target sparsity after `cycle` prunings (0 before the first)."""
        return 1.0 - (1.0 - self.sparsity) ** (cycle / self.cycles)

    def preflight(self, pl_module: torch.nn.Module, trainer: pl.Trainer | None = None) -> None:
        """Targets and pattern (see `MaskingCallback.preflight`), and with a Trainer its `max_epochs`."""
        super().preflight(pl_module, trainer)
        if trainer is not None:
            self.check_epochs(trainer.max_epochs)

    def check_epochs(self, max_epochs: int | None) -> None:
        """Raise unless `max_epochs` runs every cycle (and, with `rewind`, trains the final ticket)."""
        needed = self.cycles * self.epochs_per_cycle
        if max_epochs is None or 0 <= max_epochs < needed:
            raise ValueError(
                f"`cycles`={self.cycles} × `epochs_per_cycle`={self.epochs_per_cycle} needs "
                f"Trainer(max_epochs>={needed}), got max_epochs={max_epochs}"
            )
        if self.rewind is not None and 0 <= max_epochs < needed + self.epochs_per_cycle:
            raise ValueError(
                f"`rewind`={self.rewind!r} rewinds after the last of `cycles`={self.cycles} prunings, so the final "
                f"ticket needs `epochs_per_cycle`={self.epochs_per_cycle} more epochs of training: "
                f"Trainer(max_epochs>={needed + self.epochs_per_cycle}), got max_epochs={max_epochs} (the model "
                "would end untrained at its rewind point)"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.rewind == "init" and not self.snapshot:
            self.take_snapshot()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(self.rewind, int) and trainer.global_step == self.rewind and not self.snapshot:
            self.take_snapshot()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.epochs_per_cycle == 0 and self.cycles_done < self.cycles:
            self.prune_cycle(trainer)
            self.log_sparsity(pl_module, layers=True, on_step=False)

    def take_snapshot(self) -> None:
        """Copy the target tensors (only those) for a later rewind."""
        self.snapshot = {t.name: t.weight.detach().clone() for t in self.targets}

    def prune_cycle(self, trainer: pl.Trainer) -> None:
        """Prune to the next cycle's sparsity, then rewind survivors and reset optimizers if asked."""
        self.prune_to(self.sparsity_after(self.cycles_done + 1))
        self.cycles_done += 1
        if self.rewind is not None:
            self.rewind_weights(trainer)

    @torch.no_grad()
    def rewind_weights(self, trainer: pl.Trainer) -> None:
        """Surviving weights back to the snapshot; optimizer state cleared (momenta belong to the old
        weights; zeroed under FSDP2)."""
        if not self.snapshot:
            raise RuntimeError(f"`rewind`={self.rewind!r}: no snapshot was taken before the first pruning")
        for target in self.targets:
            target.weight.copy_(self.snapshot[target.name].to(target.weight.device))
        apply_masks_(trainer.lightning_module)
        for optimizer in trainer.optimizers:
            if self._sharded:
                _zero_state_(optimizer)
            else:
                optimizer.state.clear()

    def state_dict(self) -> dict[str, Any]:
        # Under FSDP2 the snapshot holds DTensors: their blocks go to the distributed checkpoint (`sharded_blocks`).
        snapshot = {} if self._sharded else {name: value.cpu().clone() for name, value in self.snapshot.items()}
        return {**super().state_dict(), "cycles_done": self.cycles_done, "snapshot": snapshot}

    def inherit(self, found: InheritedMasks) -> None:
        """Keep another configuration's masks (`MaskingCallback.inherit`) and its count of cycles done
        (an IterativePruning's, at most `cycles`); a cycle whose target the kept masks already meet prunes nothing."""
        super().inherit(found)
        self.cycles_done = min(found.clock("cycles_done") or 0, self.cycles)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapshot = dict(state_dict.get("snapshot", {}))  # before the base class reads sharded blocks into it
        super().load_state_dict(state_dict)
        self.cycles_done = int(state_dict.get("cycles_done", 0))

    def sharded_blocks(self) -> Blocks:
        """The base class's blocks and the rewind snapshot's (`snapshot/<name>`, DTensors already)."""
        return {**super().sharded_blocks(), "snapshot": self.snapshot}

    def restore_blocks(self, kind: str, blocks: dict[str, DTensor]) -> None:
        """Take the snapshot's tensors (DTensors laid out like their parameters), or hand the rest to the base class."""
        if kind == "snapshot":
            self.snapshot.update(blocks)
        else:
            super().restore_blocks(kind, blocks)


@torch.no_grad()
def _zero_state_(optimizer: torch.optim.Optimizer) -> None:
    """Every state tensor (moments, step counts) back to zero, in place.

    Under FSDP2 instead of `state.clear()`: a distributed checkpoint of an optimizer without state
    cannot be loaded (torch.distributed.checkpoint builds the template with state for every
    parameter and finds no keys; torch 2.13, lightning 2.6.6). For Adam/AdamW zeros are exactly a
    fresh state; for SGD with momentum too unless `dampening` > 0.
    """
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.zero_()
