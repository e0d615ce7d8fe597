"""Pruning once, when `fit` starts (`OneShotPruning`, `StructuredPruning`), and keeping those masks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import lightning.pytorch as pl

from lightning_prune.callbacks.base import MaskingCallback
from lightning_prune.callbacks.inherited import InheritedMasks


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
