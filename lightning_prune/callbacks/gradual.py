"""Gradual magnitude pruning during fine-tuning (Zhu & Gupta, 2017)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl

from lightning_prune.callbacks.base import MaskingCallback
from lightning_prune.criteria import Criterion
from lightning_prune.schedules import SCHEDULES, make_schedule
from lightning_prune.selection import check_sparsity


class GradualPruning(MaskingCallback):
    """Raise sparsity from `initial_sparsity` to `sparsity` between `start_step` and `end_step`.

    Every `frequency` optimizer steps (and at `end_step`) the masks are recomputed from the
    criterion's scores of the surviving weights at the schedule's sparsity; in between, the masks
    stay applied. `end_step=None` means the last step of training as the Trainer estimates it.

    With `structure` ("neuron", "head" or "filter") the sparsity is the fraction of whole units
    (coupled groups, `lightning_prune.structured`) removed from every group set, scored by the
    criterion's structured score ("magnitude" or "taylor"); `compact_on_end` makes the model
    physically smaller at fit end and records parameters and forward time in `compaction`.

    Lifecycle: `on_fit_start` resolves targets and the schedule; `on_train_batch_start` prunes on
    schedule and logs `prune/sparsity`; `on_fit_end` removes hooks (and finalizes if asked).

    Example YAML (`conf/pruning/gmp.yaml`)::

        _target_: lightning_prune.GradualPruning
        sparsity: 0.9        # final fraction of zeros in each targeted layer
        frequency: 50        # optimizer steps between mask updates
        schedule: cubic      # constant | linear | cubic | exponential
    """

    def __init__(
        self,
        sparsity: float,
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        end_step: int | None = None,
        frequency: int = 100,
        schedule: str | Callable[[int], float] = "cubic",
        criterion: str | Criterion = "magnitude",
        scope: str = "layer",
        pattern: str | None = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        finalize_on_end: bool = False,
        structure: str | None = None,
        compact_on_end: bool = False,
    ) -> None:
        super().__init__(sparsity, criterion, scope, pattern, targets, ignore, finalize_on_end, structure=structure, compact_on_end=compact_on_end)
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise ValueError(f"`initial_sparsity` ({initial_sparsity}) must not exceed `sparsity` ({sparsity})")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"`start_step` must be an integer >= 0, got {start_step!r}")
        if end_step is not None and (not isinstance(end_step, int) or end_step <= start_step):
            raise ValueError(f"`end_step` must be None or an integer > `start_step` ({start_step}), got {end_step!r}")
        if not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"`frequency` must be an integer >= 1, got {frequency!r}")
        if not callable(schedule) and schedule not in SCHEDULES[:-1]:
            raise ValueError(f"`schedule` must be one of {SCHEDULES[:-1]} or a callable step -> sparsity, got {schedule!r}")
        if self.criterion.needs_gradients and start_step == 0 and self.initial_sparsity > 0:
            raise ValueError(
                f"`criterion`={criterion!r} scores from gradients, so it cannot prune at step 0: "
                f"use `start_step` >= 1 or `initial_sparsity`=0, got start_step={start_step}, initial_sparsity={initial_sparsity}"
            )
        self.start_step = start_step
        self.end_step = end_step
        self.frequency = frequency
        self.schedule = schedule
        self.sparsity_at: Callable[[int], float] = lambda step: self.sparsity
        self.last_update_step = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resolve_schedule(trainer)
        self.attach(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        updated = self.is_update_step(trainer.global_step)
        if updated:
            self.update(trainer.global_step)
        self.log_sparsity(pl_module, layers=updated)

    def resolve_schedule(self, trainer: pl.Trainer) -> None:
        """Fix `end_step` (from the Trainer when None) and build `sparsity_at(step)`."""
        end = self.end_step
        if end is None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("`end_step`=None needs a Trainer with a finite length (max_steps or max_epochs)")
            end = max(int(total) - 1, self.start_step + 1)
        self.resolved_end_step = end
        if callable(self.schedule):
            self.sparsity_at = self.schedule
        else:
            self.sparsity_at = make_schedule(self.schedule, self.sparsity, self.initial_sparsity, self.start_step, end)

    def is_update_step(self, step: int) -> bool:
        """True at `start_step`, every `frequency` steps after it, and at the end step."""
        if step == self.last_update_step or not self.start_step <= step <= self.resolved_end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.resolved_end_step

    def update(self, step: int) -> None:
        """Prune to the schedule's sparsity at `step` (nothing to do while it is 0)."""
        target = self.sparsity_at(step)
        if target > 0.0:
            self.prune_to(target)
        self.last_update_step = step

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_update_step": self.last_update_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.last_update_step = int(state_dict.get("last_update_step", -1))
