"""Gradual magnitude pruning during fine-tuning (Zhu & Gupta, 2017)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_prune.callbacks.inherited import InheritedMasks
from lightning_prune.callbacks.scheduled import ScheduledPruning
from lightning_prune.criteria import Criterion
from lightning_prune.schedules import RAMPS, make_schedule
from lightning_prune.validation import check_integer, check_optional_integer, check_sparsity


class GradualPruning(ScheduledPruning):
    """Raise sparsity from `initial_sparsity` to `sparsity` between `start_step` and `end_step`.

    Every `frequency` steps (and at `end_step`) the masks are recomputed from the criterion's
    scores of the surviving weights at the schedule's sparsity; in between, the masks stay applied.
    `end_step=None` means the last step of training as the Trainer estimates it.

    With `structure` ("neuron", "head" or "filter") the sparsity is the fraction of whole units
    (coupled groups, `lightning_prune.structured`) removed from every group set, scored by the
    criterion's structured score ("magnitude" or "taylor"); `compact_on_end` makes the model
    physically smaller at fit end and records parameters and forward time in `compaction`.

    Steps are the callback's own count of training batches that ran an optimizer step (`step`,
    saved in checkpoints): `trainer.global_step` with one optimizer, but also right when manual
    optimization steps several optimizers per batch (each advances `global_step`), so the schedule
    reaches its target at `end_step` however many optimizers there are.

    Lifecycle: `on_fit_start` resolves targets and the schedule, and warns (recorded in
    `warnings_recorded`) when the Trainer's estimated length ends before the ramp does;
    `on_train_batch_start` prunes on schedule and logs `prune/sparsity`; `on_train_batch_end`
    counts the step; `on_fit_end` warns if the target was missed, removes hooks (and finalizes if asked).

    Resuming (`ckpt_path`) a checkpoint of another configuration (a different `sparsity`, `pattern` or
    `targets`) keeps the checkpoint's pruned entries: the stricter of the two wins entry by entry, the
    schedule continues from the checkpoint's step, and a warning names both (`MaskingCallback.inherit`).

    Example YAML (`lightning_prune/conf/pruning/gmp.yaml`)::

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
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise ValueError(f"`initial_sparsity` ({initial_sparsity}) must not exceed `sparsity` ({sparsity})")
        check_integer(start_step, "start_step", low=0)
        check_optional_integer(end_step, "end_step")
        if end_step is not None and end_step <= start_step:
            raise ValueError(f"`end_step` must be None or an integer > `start_step` ({start_step}), got {end_step!r}")
        check_integer(frequency, "frequency", low=1)
        if not callable(schedule) and schedule not in RAMPS:
            raise ValueError(f"`schedule` must be one of {RAMPS} or a callable step -> sparsity, got {schedule!r}")
        if self.criterion.needs_gradients and start_step == 0 and self.initial_sparsity > 0:
            raise ValueError(
                f"`criterion`={criterion!r} scores from gradients, so it cannot prune at step 0: "
                f"use `start_step` >= 1 or `initial_sparsity`=0, got start_step={start_step}, "
                f"initial_sparsity={initial_sparsity}"
            )
        self.start_step = start_step
        self.end_step = end_step
        self.frequency = frequency
        self.schedule = schedule
        self.sparsity_at: Callable[[int], float] = lambda step: self.sparsity
        self.last_update_step = -1
        self.step = 0  # training batches that ran an optimizer step, this callback's schedule clock
        self.global_steps_per_step = 0  # measured on the first such batch (manual optimization: one per optimizer)
        self._global_step_at_batch_start = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The schedule reads `estimated_stepping_batches`, which sets up the train loader: here Lightning
        # has restored its loops and the loader's state; in `on_fit_start` the loader would be set up first
        # and a mid-epoch checkpoint's loader state never loaded (Lightning 2.6, issue #20550).
        super().on_train_start(trainer, pl_module)
        self.resolve_schedule(trainer)
        self.warn_if_schedule_cannot_finish(trainer)

    def preflight(self, pl_module: nn.Module, trainer: pl.Trainer | None = None) -> None:
        """Targets and pattern (see `MaskingCallback.preflight`) and, given the Trainer that will run
        this callback, that `end_step`=None has a finite Trainer length to end the ramp at."""
        super().preflight(pl_module, trainer)
        if trainer is not None and self.end_step is None and trainer.max_steps == -1 and trainer.max_epochs == -1:
            raise ValueError(
                "GradualPruning's `end_step`=None ends the ramp at the Trainer's last step, but "
                f"`trainer.max_epochs`={trainer.max_epochs} with `trainer.max_steps`={trainer.max_steps} trains "
                "without end; set `trainer.max_epochs` >= 1 or `trainer.max_steps` >= 1, or give `end_step`"
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._global_step_at_batch_start = trainer.global_step
        updated = self.is_update_step(self.step)
        if updated:
            self.update(self.step)
        self.log_sparsity(pl_module, layers=updated)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        advanced = trainer.global_step - self._global_step_at_batch_start
        if advanced > 0:
            self.count_step(trainer, advanced)

    def count_step(self, trainer: pl.Trainer, advanced: int) -> None:
        """One more optimizer-step batch; the first one tells how far each moves `global_step`."""
        self.step += 1
        if self.global_steps_per_step == 0:
            self.global_steps_per_step = advanced
            if advanced > 1 and self.end_step is None:
                self.resolve_schedule(trainer)

    def estimated_steps(self, trainer: pl.Trainer) -> float:
        """Optimizer-step batches this fit will run, from the Trainer's estimate (inf when unbounded).

        `estimated_stepping_batches` counts batches, capped by `max_steps`, which counts `global_step`:
        with k optimizers stepping per batch, `max_steps` ends the fit after ceil(max_steps / k) batches.
        """
        total = trainer.estimated_stepping_batches
        per_step = max(self.global_steps_per_step, 1)
        if per_step > 1 and trainer.max_steps != -1:
            total = min(total, math.ceil(trainer.max_steps / per_step))
        return total

    def warn_if_schedule_cannot_finish(self, trainer: pl.Trainer) -> None:
        """Warn and record when the Trainer ends before `start_step` or `end_step` (the target would be missed)."""
        total = self.estimated_steps(trainer)
        if not math.isfinite(total) or self.resolved_end_step < total:
            return
        self.record_warning(
            "schedule_too_long",
            f"GradualPruning's ramp from step {self.start_step} to `end_step`={self.resolved_end_step} cannot finish: "
            f"the Trainer runs an estimated {int(total)} optimizer steps (last step {int(total) - 1}); the sparsity "
            f"will stay below the target {self.sparsity}. Shorten the schedule or train longer",
            target=self.sparsity,
            estimated_steps=int(total),
        )

    def resolve_schedule(self, trainer: pl.Trainer) -> None:
        """Fix `end_step` (from the Trainer when None) and build `sparsity_at(step)`."""
        end = self.end_step
        if end is None:
            total = self.estimated_steps(trainer)
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
        return {
            **super().state_dict(),
            "last_update_step": self.last_update_step,
            "step": self.step,
            "global_steps_per_step": self.global_steps_per_step,
        }

    def inherit(self, found: InheritedMasks) -> None:
        """Keep another configuration's masks (`MaskingCallback.inherit`) and continue its clock: its
        `step` (a GradualPruning's), else the checkpoint's `global_step`; the ramp is this callback's."""
        super().inherit(found)
        step = found.clock("step")
        self.step = found.global_step if step is None else step
        self.last_update_step = found.clock("last_update_step") or -1
        self.global_steps_per_step = found.clock("global_steps_per_step") or 0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.last_update_step = int(state_dict.get("last_update_step", -1))
        # Checkpoints from before the step count: one optimizer, so the step is the update step's clock.
        self.step = int(state_dict.get("step", max(self.last_update_step, 0)))
        self.global_steps_per_step = int(state_dict.get("global_steps_per_step", 0))
