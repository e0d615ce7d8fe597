"""Pruning once, when `fit` starts (`OneShotPruning`, `StructuredPruning`, `ExpertPruning`), and keeping those masks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_prune.callbacks.base import MaskingCallback
from lightning_prune.callbacks.inherited import InheritedMasks
from lightning_prune.masking import get_masks
from lightning_prune.structured.report import StructuredReport


class PruneOnFitStart(MaskingCallback, ABC):
    """A `MaskingCallback` that prunes once, when `fit` starts, and keeps those masks afterwards.

    `prune(trainer, pl_module)` sets the masks; `pruned` is in the checkpoint, so a resumed run
    restores the masks and does not prune again. Needs whole weights: refused under FSDP2.

    Resuming a checkpoint whose masks another pruning configuration made (and that holds no state of
    this one) is refused in `on_load_checkpoint` with a ValueError naming both: this callback would
    prune the already pruned, fine-tuned model again from its own scores and replace those masks,
    reviving pruned weights. A scheduled callback (`GradualPruning`, `IterativePruning`) keeps them.
    """

    sharded_ok = False  # calibration and group scores need whole weights: prune before FSDP2 shards the model

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pruned = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(trainer, pl_module)
        if not self.pruned:
            self.prune(trainer, pl_module)

    def inherit(self, found: InheritedMasks) -> None:
        """Refuse another configuration's masks unless the checkpoint also holds this callback's state
        (it then does not prune again: the union is kept, see `MaskingCallback.inherit`)."""
        if found.has_own_state:
            super().inherit(found)
            return
        raise ValueError(
            f"`ckpt_path`: {self.state_key} resumes a checkpoint whose masks come from another pruning "
            f"configuration ({'; '.join(found.sources)}) and that holds no state of this one: "
            f"{type(self).__name__} prunes once at fit start and would replace those masks, reviving pruned "
            "weights. Resume with the checkpoint's pruning callback (same class, `sparsity`, `pattern` and "
            "`targets`), or prune further with GradualPruning / IterativePruning, which keep the checkpoint's zeros"
        )

    @abstractmethod
    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> object:
        """Set the masks on `pl_module` (once); returns the pruning's report."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pruned": self.pruned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.pruned = bool(state_dict.get("pruned", False))


class PruneUnitsOnFitStart(PruneOnFitStart):
    """A `PruneOnFitStart` that removes whole units (neurons, heads, layers, experts) from calibration batches:
    `sparsity` is a fraction of units, its masks are whatever the model holds, and `results()` records the
    `StructuredReport` under `results_key` beside the compaction's parameters and forward times."""

    results_key = "structured"

    def __init__(
        self,
        sparsity: float,
        targets: Any,
        ignore: Any,
        *,
        calibration: Iterable[Any] | None,
        num_samples: int | None,
        compact_on_end: bool,
        progress: bool,
    ) -> None:
        super().__init__(sparsity, None, targets, ignore, compact_on_end=compact_on_end)
        self.calibration = calibration
        self.num_samples = num_samples
        self.progress = progress
        self.report: StructuredReport | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.log_sparsity(pl_module, layers=False)

    def took(self, report: StructuredReport) -> StructuredReport:
        """Keep the pruning's report; the unit fractions were met (rounding is in the report's notes)."""
        self.report = report
        self.current_sparsity = 1.0 - report.parameter_ratio
        self.reached_sparsity = self.sparsity
        self.pruned = True
        return report

    @property
    def prunes_units(self) -> bool:
        """Always: `sparsity` is a fraction of whole units."""
        return True

    def masks(self) -> dict[str, torch.Tensor]:
        return get_masks(self._pl_module) if self._pl_module is not None else {}

    def results(self) -> dict[str, Any]:
        """What the run records: the pruning's report and the compaction's parameters and forward times."""
        return {self.results_key: self.report.as_dict() if self.report else {}, "compaction": dict(self.compaction)}
