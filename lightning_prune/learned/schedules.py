"""Annealing of MaskLLM's temperature τ, logit scale κ and regulariser weight λ over the optimizer steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_prune.validation import check_choice, check_integer, check_number

ANNEAL_SHAPES = ("linear", "exponential")


@dataclass(frozen=True)
class Anneal:
    """`start` at step 0, `end` from step `steps` on; linear (MaskLLM's scripts) or exponential (geometric) in between.

    Exponential needs `start` and `end` of the same sign and non-zero (τ 4 → 0.05 falls by the same
    factor every step); linear takes any two numbers (λ 1e-5 → 0).
    """

    start: float
    end: float
    steps: int
    shape: str = "linear"

    def __post_init__(self) -> None:
        check_number(self.start, "start")
        check_number(self.end, "end")
        check_integer(self.steps, "steps", low=1)
        check_choice(self.shape, "shape", ANNEAL_SHAPES)
        if self.shape == "exponential" and not self.start * self.end > 0:
            raise ValueError(
                f"an exponential anneal needs non-zero `start` and `end` of one sign, got {self.start} → {self.end}"
            )

    def __call__(self, step: int) -> float:
        progress = min(max(step / self.steps, 0.0), 1.0)
        if self.shape == "exponential":
            return float(self.start * math.exp(progress * math.log(self.end / self.start)))
        return float(self.start * (1.0 - progress) + self.end * progress)  # exact at both ends
