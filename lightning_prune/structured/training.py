"""Training-time structured selection: what `GradualPruning`/`IterativePruning(structure=...)` call.

The callbacks decide when; `StructuredSelection` scores the model's coupled groups with a
registered structured score (the callback's `criterion` name: "magnitude" or "taylor"), masks the
lowest units of every group set (monotone: removed units stay removed), and with `compact_on_end`
turns the masked model into the smaller one, measuring parameters and forward time (interleaved medians of
the model before and after compaction) around it.
"""

from __future__ import annotations

import copy
import statistics
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
from lightning_prune.structured.report import StructuredReport, structured_report
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
                f"with `structure` use one of {[n for n in STRUCTURED_SCORES if n != 'block_influence']}"
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

    def report(self, model: nn.Module) -> StructuredReport:
        """Units removed per group set and parameters before/after compaction, from the current masks."""
        return structured_report(model, self.groups, [], self.score.name, [])

    def removed_fraction(self) -> float:
        """Fraction of all units currently removed (from the weights' exact zeros)."""
        return sum(int(removed_units(g).sum()) for g in self.groups) / max(1, sum(g.count for g in self.groups))


def interleaved_seconds(models: Sequence[nn.Module], run: Callable[[nn.Module], Any], rounds: int = 7) -> list[float]:
    """Median wall time of `run(model)` for each of `models` (eval mode, `no_grad`): one warm-up call each,
    then `rounds` rounds that call every model once, in alternating order, so load on the machine and
    clock changes fall on all of them alike (timing one model's repeats, then the other's, does not)."""
    modes = [model.training for model in models]
    times: list[list[float]] = [[] for _ in models]
    try:
        with torch.no_grad():
            for model in models:
                model.eval()
                run(model)
            for index in range(rounds):
                order = range(len(models)) if index % 2 == 0 else reversed(range(len(models)))
                for position in order:
                    start = time.perf_counter()
                    run(models[position])
                    times[position].append(time.perf_counter() - start)
    finally:
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)
    return [statistics.median(values) for values in times]


def compact_and_measure(
    model: nn.Module, run: Callable[[nn.Module], Any] | None, rounds: int = 7
) -> tuple[nn.Module, dict[str, float]]:
    """`compact(model)` with parameters before and after and, when `run` is given, the forward times of the
    model before and after compaction: medians of `rounds` interleaved rounds (`interleaved_seconds`) on a
    copy of the model as it was (held only while timing)."""
    record: dict[str, float] = {"parameters_before": float(sum(p.numel() for p in model.parameters()))}
    before = copy.deepcopy(model) if run is not None else None  # a LightningModule copies without its Trainer
    small = compact(model)
    record["parameters_after"] = float(sum(p.numel() for p in small.parameters()))
    if before is not None and run is not None:
        seconds_before, seconds_after = interleaved_seconds([before, small], run, rounds)
        record.update(
            forward_seconds_before=seconds_before,
            forward_seconds_after=seconds_after,
            speedup=seconds_before / seconds_after,
            timing_rounds=float(rounds),
        )
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
