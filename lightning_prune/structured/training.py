"""Training-time structured selection: what `GradualPruning`/`IterativePruning(structure=...)` call.

The callbacks decide when; `StructuredSelection` scores the model's coupled groups with a
registered structured score (the callback's `criterion` name: "magnitude" or "taylor"), masks the
lowest units of every group set (monotone: removed units stay removed), and with `compact_on_end`
turns the masked model into the smaller one, measuring parameters and forward time around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.calibration.calls import to_device
from lightning_prune.calibration.driver import call_model
from lightning_prune.registry import STRUCTURED_SCORES
from lightning_prune.structured.api import select_groups
from lightning_prune.structured.compact import compact, outermost_hf_models
from lightning_prune.structured.find import find_groups
from lightning_prune.structured.groups import KINDS, GroupSet, removed_units
from lightning_prune.structured.scores import StructuredScore
from lightning_prune.structured.select import prune_group
from lightning_prune.validation import check_bool

STRUCTURES = KINDS


class StructuredSelection:
    """Groups of one `structure` in a model, scored by a registered structured score, masked uniformly."""

    def __init__(self, structure: str, score: object = "magnitude", targets: Any = None, ignore: Any = None) -> None:
        if structure not in STRUCTURES:
            raise ValueError(f"`structure` must be None or one of {STRUCTURES}, got {structure!r}")
        if not isinstance(score, (str, StructuredScore)):
            raise ValueError(
                "`criterion` must be a registered structured score name "
                f"or a StructuredScore with `structure`, got {score!r}"
            )
        if isinstance(score, str) and score not in STRUCTURED_SCORES:
            raise ValueError(
                f"`criterion`={score!r} has no structured score; "
                f"with `structure` use one of "
                f"{[n for n in STRUCTURED_SCORES if getattr(STRUCTURED_SCORES.get(n), 'unit', 'group') == 'group']}"
            )
        self.score: StructuredScore = STRUCTURED_SCORES.create(score)
        if self.score.statistics or self.score.unit != "group":
            raise ValueError(
                f"`criterion`={score!r} needs calibration statistics; "
                "training-time structured pruning takes 'magnitude' or 'taylor'"
            )
        self.structure = structure
        self.targets = targets
        self.ignore = ignore
        self.groups: list[GroupSet] = []

    @property
    def needs_gradients(self) -> bool:
        """Whether the score accumulates gradients every step."""
        return self.score.needs_gradients

    def attach(self, model: nn.Module) -> None:
        """Find the model's group sets (raises naming a module whose coupling is unknown)."""
        self.groups = select_groups(find_groups(model, self.structure), self.targets, self.ignore)
        if not self.groups:
            raise ValueError(
                f"`targets`={self.targets!r} / `ignore`={self.ignore!r} leave no {self.structure} groups to prune"
            )

    def accumulate(self) -> None:
        """Feed this step's gradients to a gradient-based score."""
        self.score.accumulate(self.groups)

    def prune_to(self, sparsity: float) -> float:
        """Remove round(sparsity·count) units of every group set; returns the removed fraction of all units."""
        removed = [prune_group(group, self.score, sparsity) for group in self.groups]
        self.score.reset()
        return sum(int(r.sum()) for r in removed) / sum(g.count for g in self.groups)

    def removed_fraction(self) -> float:
        """Fraction of all units currently removed (from the weights' exact zeros)."""
        return sum(int(removed_units(g).sum()) for g in self.groups) / max(1, sum(g.count for g in self.groups))


def forward_seconds(model: nn.Module, run: Callable[[nn.Module], Any], repeats: int = 5) -> float:
    """Median wall time of `run(model)` under `no_grad` in eval mode (one warm-up call first)."""
    was_training = model.training
    model.eval()
    times = []
    with torch.no_grad():
        run(model)
        for _ in range(repeats):
            start = time.perf_counter()
            run(model)
            times.append(time.perf_counter() - start)
    model.train(was_training)
    return sorted(times)[len(times) // 2]


def compact_and_measure(
    model: nn.Module, run: Callable[[nn.Module], Any] | None, repeats: int = 5
) -> tuple[nn.Module, dict[str, float]]:
    """`compact(model)` with parameters (and forward time of `run`, when given) before and after."""
    record: dict[str, float] = {"parameters_before": float(sum(p.numel() for p in model.parameters()))}
    if run is not None:
        record["forward_seconds_before"] = forward_seconds(model, run, repeats)
    small = compact(model)
    record["parameters_after"] = float(sum(p.numel() for p in small.parameters()))
    if run is not None:
        record["forward_seconds_after"] = forward_seconds(small, run, repeats)
        record["speedup"] = record["forward_seconds_before"] / record["forward_seconds_after"]
    return small, record


def sample_forward(batch: Any) -> Callable[[nn.Module], Any]:
    """A `run(model)` that forwards one batch the way the calibration driver does."""

    def run(model: nn.Module) -> Any:
        return call_model(_forward_owner(model), to_device(batch, next(model.parameters()).device))

    return run


def _forward_owner(model: nn.Module) -> nn.Module:
    """The module to time: the model itself when it defines `forward`, else the transformers model inside it."""
    if (
        type(model).forward is not nn.Module.forward
        and getattr(type(model).forward, "__qualname__", "").split(".")[0] != "LightningModule"
    ):
        return model
    inner = outermost_hf_models(model)
    if not inner:
        raise ValueError(f"cannot time {type(model).__name__}: it defines no `forward` and holds no transformers model")
    return inner[0][1]


def check_structure_arguments(structure: str | None, pattern: str | None, scope: str, compact_on_end: bool) -> None:
    """Arguments that do not combine with structured pruning, refused when the callback is made."""
    if structure is None:
        if check_bool(compact_on_end, "compact_on_end"):
            raise ValueError(
                "`compact_on_end`=True needs a `structure` ('neuron', 'head' or 'filter'): "
                "unstructured zeros cannot be removed"
            )
        return
    if pattern is not None:
        raise ValueError(
            f"`pattern`={pattern!r} is an N:M weight pattern; it does not combine with `structure`={structure!r}"
        )
    if scope != "layer":
        raise ValueError(
            f"`scope`={scope!r}: with `structure` every group set keeps the same share of its units (scope='layer')"
        )


def describe(groups: Sequence[GroupSet]) -> dict[str, float]:
    """Removed fraction of each group set, by name (what the callbacks log as layer sparsity)."""
    return {g.name: float(removed_units(g).float().mean()) for g in groups}


def first_batch(trainer: Any) -> Any:
    """The first batch of the fit's training dataloader (None when there is none), for timing forwards."""
    loader = getattr(trainer, "train_dataloader", None)
    if loader is None:
        return None
    return next(iter(loader), None)
