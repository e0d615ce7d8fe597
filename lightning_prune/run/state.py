"""`RunParts`: what `run(cfg)` has built so far, handed from step to step (run/pipeline.py).

A field is None (or empty) until the step that builds it ran: after a failure the partial outputs
are written from whatever is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_prune.run.harness import HarnessSettings
from lightning_prune.run.outputs import History


@dataclass
class RunParts:
    """The run's data module, model, history and callbacks, as far as they are built."""

    callbacks: list[Callback] = field(default_factory=list)
    """The callbacks of the stage running now (their warnings are collected on failure); empty outside a stage."""
    ordered: list[Callback] = field(default_factory=list)
    """Every stage's callbacks, the last stage's first: the first that sets a sparsity gives the target."""
    data: pl.LightningDataModule | None = None
    module: pl.LightningModule | None = None
    history: History | None = None
    harness: HarnessSettings | None = None
    """The checked `lm_eval` settings; None: the run scores no lm-evaluation-harness tasks."""
    keep_checkpoint: Path | None = None
    """Kept even with `stage_checkpoints=last`: the dense weights a later stage's teacher is rebuilt from."""
    writing: bool = False
    """Whether the run writes into its output directory yet: from the start in a new one; in one that
    holds an earlier run, from the first stage on (a run refused before then leaves it as it was)."""

    def built(self) -> tuple[pl.LightningModule, pl.LightningDataModule, History]:
        """The model, the data module and the history, once built (every stage runs after they are)."""
        assert self.module is not None and self.data is not None and self.history is not None
        return self.module, self.data, self.history
