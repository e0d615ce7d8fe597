"""Training-time structured selection: what `GradualPruning`/`IterativePruning(structure=...)` call.

The callbacks decide when; `StructuredSelection` scores the model's coupled groups with a
registered structured score (the callback's `criterion` name: "magnitude" or "taylor"), masks the
lowest units of every group set (monotone: removed units stay removed), and with `compact_on_end`
turns the masked model into the smaller one, measuring parameters and forward time (interleaved medians of
the model before and after compaction, `structured.timing`) around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_prune.registry import STRUCTURED_SCORES
from lightning_prune.structured.api import select_groups
from lightning_prune.structured.find import find_groups
from lightning_prune.structured.groups import KINDS, GroupSet, removed_units
from lightning_prune.structured.report import StructuredReport, structured_report
from lightning_prune.structured.scores import StructuredScore
from lightning_prune.structured.select import prune_group
from lightning_prune.structured.timing import compact_and_measure as compact_and_measure  # the callbacks' import
from lightning_prune.structured.timing import sample_forward as sample_forward
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

    def report(self, model: nn.Module) -> StructuredReport:
        """Units removed per group set and parameters before/after compaction, from the current masks."""
        return structured_report(model, self.groups, [], self.score.name, [])

    def removed_fraction(self) -> float:
        """Fraction of all units currently removed (from the weights' exact zeros)."""
        return sum(int(removed_units(g).sum()) for g in self.groups) / max(1, sum(g.count for g in self.groups))


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
