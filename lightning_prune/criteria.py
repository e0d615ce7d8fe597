"""Importance scores: higher means more important, the lowest are pruned.

A criterion scores one weight tensor (in the weight's own shape). Gradient-based criteria
accumulate statistics from the gradients the training step already computed (`accumulate`),
so they need no extra pass; their statistics live in `state_dict` for exact resume.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from lightning_prune.registry import CRITERIA, register_criterion
from lightning_prune.validation import check_integer


class Criterion:
    """Base class: stateless magnitude-style criteria override `score` only.

    Subclasses registered with `register_criterion(name)` are found by name by the callbacks
    (`criterion="name"`); `seed` is given to every criterion (random ones use it).
    """

    name: str = ""
    needs_gradients = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def accumulate(self, name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        """Add one step's gradient of weight `name` to the statistics (no-op by default)."""

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Importance of every entry of `weight` (same shape, fp32)."""
        return weight.detach().abs().float()

    def reset(self) -> None:
        """Forget the accumulated statistics (after they were used to prune)."""

    def seen(self) -> set[str]:
        """Names of the weights with accumulated gradients (empty for criteria without any)."""
        return set()

    def state_dict(self) -> dict[str, Any]:
        """Accumulated statistics, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


@register_criterion("magnitude")
class Magnitude(Criterion):
    """|w| (Han et al., 2015; Zhu & Gupta, 2017)."""


@register_criterion("random")
class RandomScore(Criterion):
    """Uniform random scores, the baseline every criterion must beat; seeded and reproducible.

    The scores depend only on (`seed`, layer name, call count), so every process of a
    distributed run draws the same ones.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.calls = 0

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls * 7919 + zlib.crc32(name.encode()))
        return torch.rand(weight.shape, generator=generator).to(weight.device)

    def reset(self) -> None:
        self.calls += 1

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))


class _GradientCriterion(Criterion):
    """Keeps one fp32 accumulator per weight plus the number of steps seen."""

    needs_gradients = True

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def statistic(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """What is summed over steps for one gradient."""
        raise TypeError(f"{type(self).__name__} must define `statistic`")

    def accumulate(self, name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        value = self.statistic(weight.detach().float(), grad.detach().float())
        if name in self.sums:
            self.sums[name].add_(value)
        else:
            self.sums[name] = value.clone()
        self.counts[name] = self.counts.get(name, 0) + 1

    def accumulated(self, name: str) -> torch.Tensor:
        """The summed statistic of `name`; an error if no gradient was seen for it."""
        if name not in self.sums:
            raise RuntimeError(
                f"{type(self).__name__.lower()} criterion has no gradients accumulated for {name!r}: "
                "either no training step ran before this prune, "
                "or the loss does not reach it (leave it out with `ignore`)"
            )
        return self.sums[name]

    def seen(self) -> set[str]:
        return set(self.sums)

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.clone() for k, v in self.sums.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {k: v.clone() for k, v in state.get("sums", {}).items()}
        self.counts = dict(state.get("counts", {}))


@register_criterion("taylor")
class Taylor(_GradientCriterion):
    """First-order Taylor saliency |w·g|, summed over steps (Molchanov et al., 2016)."""

    def statistic(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return (weight * grad).abs_()

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.accumulated(name).to(weight.device)


@register_criterion("fisher")
class Fisher(_GradientCriterion):
    """OBD saliency ½·w²·H_ii with the empirical Fisher H_ii ≈ mean g² (LeCun et al., 1989)."""

    def statistic(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad.square()

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        mean_sq = self.accumulated(name).to(weight.device) / self.counts[name]
        return 0.5 * weight.detach().float().square() * mean_sq


def make_criterion(name: str | Criterion, seed: int = 0) -> Criterion:
    """A registered criterion by name (see `CRITERIA`), or the given instance unchanged."""
    if isinstance(name, Criterion):
        return name
    criterion: Criterion = CRITERIA.create(name, seed=check_integer(seed, "seed"))
    return criterion
