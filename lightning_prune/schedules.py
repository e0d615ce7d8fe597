"""Sparsity as a function of the optimizer step: `sparsity_at(step) -> float`, absolute targets.

Every schedule holds `initial` before `start` and `final` from `end` on; in between it moves
monotonically from one to the other.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lightning_prune.validation import check_choice, check_integer, check_number, check_sparsity

RAMPS = ("constant", "linear", "cubic", "exponential")  # from `initial` to `final` between two steps
SCHEDULES = (*RAMPS, "steps")  # `steps` takes explicit `milestones` and `values` instead


@dataclass(frozen=True)
class _Ramp(ABC):
    """Shared validation and clamping for the ramps between `start` and `end`."""

    final: float
    initial: float = 0.0
    start: int = 0
    end: int = 1

    def __post_init__(self) -> None:
        check_sparsity(self.final, "sparsity")
        check_sparsity(self.initial, "initial_sparsity")
        check_integer(self.start, "start_step")
        check_integer(self.end, "end_step")
        if self.initial > self.final:
            raise ValueError(f"`initial_sparsity` ({self.initial}) must not exceed `sparsity` ({self.final})")
        if self.start < 0 or self.end <= self.start:
            raise ValueError(f"need 0 <= `start_step` < `end_step`, got start_step={self.start}, end_step={self.end}")

    def progress(self, step: int) -> float:
        """Fraction of the ramp done at `step`, clamped to [0, 1]."""
        return min(max((step - self.start) / (self.end - self.start), 0.0), 1.0)

    def __call__(self, step: int) -> float:
        return self.initial + (self.final - self.initial) * self.shape(self.progress(step))

    @abstractmethod
    def shape(self, progress: float) -> float:
        """The curve from 0 (at `start`) to 1 (at `end`) as a function of progress."""


class Constant(_Ramp):
    """`final` sparsity from `start` on (one-shot magnitude pruning at a step); `initial` before."""

    def shape(self, progress: float) -> float:
        return 1.0

    def __call__(self, step: int) -> float:
        return float(self.final if step >= self.start else self.initial)


class Linear(_Ramp):
    """Sparsity grows linearly from `initial` at `start` to `final` at `end`."""

    def shape(self, progress: float) -> float:
        return progress


class Cubic(_Ramp):
    """Zhu & Gupta (2017), eq. 1: s(t) = s_f + (s_i − s_f)·(1 − (t − t0)/(t1 − t0))³."""

    def shape(self, progress: float) -> float:
        return 1.0 - (1.0 - progress) ** 3


@dataclass(frozen=True)
class Exponential(_Ramp):
    """Fast early pruning that levels off: 1 − exp(−rate·p), rescaled to reach `final` at `end`."""

    rate: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if check_number(self.rate, "rate") <= 0:
            raise ValueError(f"`rate` must be > 0, got {self.rate}")

    def shape(self, progress: float) -> float:
        return (1.0 - math.exp(-self.rate * progress)) / (1.0 - math.exp(-self.rate))


@dataclass(frozen=True)
class Steps:
    """Explicit milestones: sparsity `values[i]` from step `milestones[i]` on, 0 before the first."""

    milestones: Sequence[int]
    values: Sequence[float]

    def __post_init__(self) -> None:
        if len(self.milestones) != len(self.values) or not self.milestones:
            raise ValueError(
                "`milestones` and `values` must be non-empty and of equal length, "
                f"got {list(self.milestones)} and {list(self.values)}"
            )
        for milestone in self.milestones:
            check_integer(milestone, "milestones")
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"`milestones` must be strictly increasing, got {list(self.milestones)}")
        for value in self.values:
            check_sparsity(value, "values")
        if list(self.values) != sorted(self.values):
            raise ValueError(f"`values` must be non-decreasing (masks are monotone), got {list(self.values)}")

    @property
    def final(self) -> float:
        """The last sparsity the schedule reaches."""
        return float(self.values[-1])

    @property
    def end(self) -> int:
        """The step at which the final sparsity is reached."""
        return int(self.milestones[-1])

    def __call__(self, step: int) -> float:
        index = bisect.bisect_right(list(self.milestones), step)
        return 0.0 if index == 0 else float(self.values[index - 1])


def make_schedule(
    name: str,
    sparsity: float,
    initial_sparsity: float = 0.0,
    start_step: int = 0,
    end_step: int = 1,
    **kwargs: object,
) -> _Ramp | Steps:
    """Build a schedule by name (one of `SCHEDULES`); `steps` takes `milestones` and `values`."""
    ramps: dict[str, Callable[..., _Ramp]] = {
        "constant": Constant,
        "linear": Linear,
        "cubic": Cubic,
        "exponential": Exponential,
    }
    if name == "steps":
        return Steps(**kwargs)  # type: ignore[arg-type]
    check_choice(name, "schedule", SCHEDULES)
    if name == "constant":  # a step at `start_step`: any end after it
        end_step = max(check_integer(end_step, "end_step"), check_integer(start_step, "start_step") + 1)
    return ramps[name](sparsity, initial_sparsity, start_step, end_step, **kwargs)
