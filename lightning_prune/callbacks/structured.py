"""One-shot structured pruning (neurons, heads, blocks) at the start of `fit`, compacted at its end."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl

from lightning_prune.callbacks.once import PruneUnitsOnFitStart
from lightning_prune.callbacks.oneshot import calibration_batches
from lightning_prune.structured.api import add_structured_parameters, prune_structured, resolve_score
from lightning_prune.structured.default import check_automatic_options
from lightning_prune.structured.report import StructuredReport
from lightning_prune.validation import check_integer, check_optional_integer, check_sparsity


class StructuredPruning(PruneUnitsOnFitStart):
    """Run `prune_structured` on calibration batches when `fit` starts; keep the masks while recovering.

    Calibration batches come from `calibration`, else the fit's training dataloader (first
    `num_samples` sequences), so `method`=None (the default) is FLAP wherever it applies, see
    `prune_structured`; the report says which score and why. A method that adds parameters (FLAP's
    compensation biases where the model has none, as on Llama-style models; explicit or the automatic
    choice) adds them in `setup`, before the optimizer is built and a checkpoint is restored, so they
    train and a resumed fit loads them. With
    `compact_on_end` the module's model is replaced at fit end by the physically smaller one
    (`compact`), and `compaction` records parameters and forward time before and after; `report`
    holds the pruning's `StructuredReport`. A resumed run restores the masks and does not prune again.

    Lifecycle: `setup` adds the method's new parameters; `on_fit_start` attaches optimizer
    hooks, restores saved masks and (once) prunes; `on_train_batch_start` logs `prune/sparsity`;
    `on_fit_end` removes hooks and compacts.

    Example YAML (`lightning_prune/conf/pruning/structured.yaml`)::

        _target_: lightning_prune.StructuredPruning
        mlp_sparsity: 0.5     # fraction of MLP neurons removed in every block
        head_sparsity: 0.25   # fraction of key/value heads (with their query heads) removed
        drop_layers: 0        # whole blocks removed (lowest ShortGPT block influence)
        method: null          # null: flap where it applies, else wanda or magnitude (warned);
                              # or magnitude | wanda | flap | taylor | yours
    """

    def __init__(
        self,
        mlp_sparsity: float = 0.0,
        head_sparsity: float = 0.0,
        drop_layers: int = 0,
        method: str | None = None,
        method_options: dict[str, Any] | None = None,
        calibration: Iterable[Any] | None = None,
        num_samples: int | None = 128,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        blocks: str | None = None,
        compact_on_end: bool = True,
        progress: bool = False,
    ) -> None:
        check_sparsity(head_sparsity, "head_sparsity")
        check_automatic_options(method, method_options)
        if method is not None:
            resolve_score(method, method_options)  # a bad name or option fails here, before any fit
        check_integer(drop_layers, "drop_layers", low=0)
        check_optional_integer(num_samples, "num_samples", low=1)
        super().__init__(
            check_sparsity(mlp_sparsity, "mlp_sparsity"),
            targets,
            ignore,
            calibration=calibration,
            num_samples=num_samples,
            compact_on_end=compact_on_end,
            progress=progress,
        )
        self.options: dict[str, Any] = dict(
            mlp_sparsity=mlp_sparsity,
            head_sparsity=head_sparsity,
            drop_layers=drop_layers,
            method=method,
            method_options=method_options,
        )
        self.blocks = blocks
        self.added: tuple[dict[str, int], list[str]] = ({}, [])  # what `setup` added (FLAP's biases), see report

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # a meta-device model is refused before anything is added
        if stage == "fit":
            self.add_parameters(pl_module)

    def add_parameters(self, pl_module: pl.LightningModule) -> None:
        """Add what the `method` (or the automatic choice: FLAP where it applies) will add, its compensation
        biases, before `configure_optimizers` builds the optimizer and before a checkpoint is restored: they
        train, and the checkpoint loads."""
        options = {key: value for key, value in self.options.items() if key != "drop_layers"}
        self.added = add_structured_parameters(
            pl_module, targets=self.target_patterns, ignore=self.ignore, blocks=self.blocks, **options
        )

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> StructuredReport:
        """Run `prune_structured` on the module with this rank's calibration batches."""
        batches = calibration_batches(self.calibration, self.num_samples, trainer, type(self).__name__)
        report = prune_structured(
            pl_module,
            batches,
            targets=self.target_patterns,
            ignore=self.ignore,
            blocks=self.blocks,
            device=pl_module.device,
            progress=self.progress,
            new_parameters=False,  # the fit's optimizer is built: what FLAP adds was added in `setup`
            **self.options,
        )
        if self.added[0]:  # added in `setup`: `prune_structured` found them in place
            report.added_parameters, report.added_for_config = self.added[0], list(self.added[1])
        return self.took(report)
