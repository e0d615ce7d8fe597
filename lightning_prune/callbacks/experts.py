"""One-shot expert removal (mixture-of-experts) at the start of `fit`, compacted at its end."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl

from lightning_prune.callbacks.once import PruneUnitsOnFitStart
from lightning_prune.callbacks.oneshot import calibration_batches
from lightning_prune.structured.api import resolve_score
from lightning_prune.structured.compact_experts import check_representable
from lightning_prune.structured.experts import prune_experts, restore_routing
from lightning_prune.structured.moe import find_expert_layers
from lightning_prune.structured.report import StructuredReport
from lightning_prune.validation import check_integer, check_optional_integer, check_sparsity


class ExpertPruning(PruneUnitsOnFitStart):
    """Run `prune_experts` on calibration batches when `fit` starts; keep the experts removed while recovering.

    Calibration batches come from `calibration`, else the fit's training dataloader (first
    `num_samples` sequences). The removed experts' weights stay masked and the router keeps routing
    around them through the fit (with `KnowledgeDistillation`, the teacher is the dense MoE copied
    at setup, before the removal). With `compact_on_end` the module's model is replaced at fit end
    by the one without the removed experts (`compact`: stock config, `save_pretrained` loads
    anywhere); `compaction` records parameters and forward time before and after. A resumed run
    restores the masks and the routing from them, and does not prune again.

    Lifecycle: `on_fit_start` attaches optimizer hooks, restores saved masks (and routing) and
    (once) prunes; `on_train_batch_start` logs `prune/sparsity`; `on_fit_end` removes hooks and compacts.

    Example YAML (`lightning_prune/conf/pruning/experts.yaml`)::

        _target_: lightning_prune.ExpertPruning
        expert_sparsity: 0.5   # fraction of routed experts removed from every MoE layer
        method: reap           # reap | frequency | routing_weight | random | yours
    """

    results_key = "experts"

    def __init__(
        self,
        expert_sparsity: float | None = None,
        experts_per_layer: int | None = None,
        method: str = "reap",
        method_options: dict[str, Any] | None = None,
        renormalize: bool = True,
        calibration: Iterable[Any] | None = None,
        num_samples: int | None = 128,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        compact_on_end: bool = True,
        progress: bool = False,
    ) -> None:
        if (expert_sparsity is None) == (experts_per_layer is None):
            raise ValueError(
                "give exactly one of `expert_sparsity` and `experts_per_layer`, "
                f"got expert_sparsity={expert_sparsity!r}, experts_per_layer={experts_per_layer!r}"
            )
        if experts_per_layer is not None:
            check_integer(experts_per_layer, "experts_per_layer", low=1)
        if not isinstance(renormalize, bool):
            raise ValueError(f"`renormalize` must be True or False, got {renormalize!r}")
        resolve_score(method, method_options, unit="expert")  # a bad name or option fails here, before any fit
        check_optional_integer(num_samples, "num_samples", low=1)
        sparsity = check_sparsity(expert_sparsity, "expert_sparsity") if expert_sparsity is not None else 0.0
        super().__init__(
            sparsity,
            targets,
            ignore,
            calibration=calibration,
            num_samples=num_samples,
            compact_on_end=compact_on_end,
            progress=progress,
        )
        self.options: dict[str, Any] = dict(
            expert_sparsity=expert_sparsity,
            experts_per_layer=experts_per_layer,
            method=method,
            method_options=method_options,
            renormalize=renormalize,
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        restore_routing(pl_module, self.options["renormalize"])

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> StructuredReport:
        """Run `prune_experts` on the module with this rank's calibration batches."""
        batches = calibration_batches(self.calibration, self.num_samples, trainer, type(self).__name__)
        report = prune_experts(
            pl_module,
            batches,
            targets=self.target_patterns,
            ignore=self.ignore,
            device=pl_module.device,
            progress=self.progress,
            **self.options,
        )
        if self.compact_on_end:  # refuse now what `compact` would refuse at the end of the fit
            for layer in find_expert_layers(pl_module):
                check_representable(layer)
        return self.took(report)
