"""One-shot Wanda / SparseGPT / magnitude pruning at the start of `fit`, masks fixed afterwards."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
from torch.utils.data import DistributedSampler

from lightning_prune.calibration.driver import call_model
from lightning_prune.calibration.samples import check_num_samples, take_samples
from lightning_prune.callbacks.once import PruneOnFitStart
from lightning_prune.oneshot.api import (
    check_oneshot_arguments,
    needs_calibration,
    prune_oneshot,
    resolve_method,
    resolve_refiner,
)
from lightning_prune.oneshot.method import MaskRefiner, OneShotMethod
from lightning_prune.oneshot.plan import plan_oneshot
from lightning_prune.parallel.collectives import all_reduce_sum_, is_distributed
from lightning_prune.report import SparsityReport
from lightning_prune.targets import PruneTarget


def resolve_forward(
    forward: Callable[[torch.nn.Module, Any], Any] | str | None,
) -> Callable[[torch.nn.Module, Any], Any]:
    """The calibration forward `(model, batch) -> output`: a callable, a dotted path to one, or None (`call_model`)."""
    if forward is None:
        return call_model
    if callable(forward):
        return forward
    if not isinstance(forward, str) or "." not in forward:
        raise ValueError(
            "`forward` must be None, a callable (model, batch) -> output or a dotted path "
            f"'package.module.function', got {forward!r}"
        )
    module_name, _, attribute = forward.rpartition(".")
    try:
        resolved = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"`forward`={forward!r} cannot be imported: {error}") from error
    if not callable(resolved):
        raise ValueError(
            f"`forward`={forward!r} names a {type(resolved).__name__}, not a callable (model, batch) -> output"
        )
    return cast(Callable[[torch.nn.Module, Any], Any], resolved)


def fit_train_dataloader(trainer: pl.Trainer, caller: str = "OneShotPruning") -> Iterable[Any]:
    """The fit's training dataloader, available already in `on_fit_start`.

    `trainer.train_dataloader` is set once the fit loop has set up its data, which it does after
    `on_fit_start`; `fit_loop.setup_data()` (public, lightning 2.6.6) does it now, and the loop's
    own call then returns early without rebuilding the loader.
    """
    trainer.fit_loop.setup_data()
    source = trainer.train_dataloader
    if source is None:
        raise ValueError(f"{caller} found no training dataloader to calibrate on; pass `calibration=` batches")
    if isinstance(source, (list, tuple, dict)):
        raise ValueError(
            f"{caller} cannot choose among {len(source)} training dataloaders; pass `calibration=` batches"
        )
    return cast(Iterable[Any], source)


def calibration_batches(
    calibration: Iterable[Any] | None, num_samples: int | None, trainer: pl.Trainer, caller: str
) -> list[Any]:
    """The batches a prune-at-fit-start callback (`caller`, named in errors) calibrates on: `calibration` when
    given, else the fit's training dataloader, cut to `num_samples` samples (`take_samples`)."""
    source = calibration if calibration is not None else fit_train_dataloader(trainer, caller)
    return take_samples(source, num_samples)


class OneShotPruning(PruneOnFitStart):
    """Prune one-shot on calibration batches when `fit` starts, then keep the masks applied.

    Calibration batches come from `calibration` (any iterable of batches) or else from the fit's
    training dataloader (the datamodule's `train_dataloader()`); the first `num_samples` sequences
    are used. The fine-tuning that follows never moves a pruned weight (masks re-applied after
    every optimizer step); a resumed run restores the masks and does not prune again.

    Lifecycle: `on_fit_start` attaches optimizer hooks, restores saved masks, and (once) runs
    `prune_oneshot` on the module; `on_train_batch_start` logs `prune/sparsity`; `on_fit_end`
    removes the hooks (and finalizes if asked).

    Example YAML (`lightning_prune/conf/pruning/wanda.yaml`, with a 2:4 pattern)::

        _target_: lightning_prune.OneShotPruning
        method: wanda              # any registered method: wanda | sparsegpt | ria | magnitude | yours
        sparsity: 0.5              # fraction of zeros per layer ((M-N)/M with a pattern)
        pattern: "2:4"             # N:M, or null for unstructured
        num_samples: 128           # calibration sequences
        forward: null              # dotted path of a function (model, batch) -> output; null: see below
        reconstruct: false         # tune each pruned block to reproduce the dense block's outputs (masks fixed)
        reconstruct_steps: 100     # Adam steps per block
        reconstruct_lr: 0.0001     # Adam learning rate of the reconstruction
        reconstruct_target: block  # block: dense block outputs on the pruned inputs | model: dense hidden states

    `forward` is how a calibration batch runs through the module, as in `prune_oneshot`: null
    passes a dict as keywords and an `(inputs, targets)` tuple by its first element; e.g.
    `lambda model, batch: model(batch[0], batch[1])` for an `(ids, mask, labels)` loader whose
    module takes `forward(ids, mask)`.
    """

    def __init__(
        self,
        method: str | OneShotMethod = "wanda",
        sparsity: float = 0.5,
        pattern: str | None = None,
        method_options: dict[str, Any] | None = None,
        refine: str | MaskRefiner | None = None,
        refine_options: dict[str, Any] | None = None,
        calibration: Iterable[Any] | None = None,
        num_samples: int | None = 128,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        blocks: str | None = None,
        offload: bool = False,
        sparsity_profile: str = "uniform",
        finalize_on_end: bool = False,
        progress: bool = True,
        forward: Callable[[torch.nn.Module, Any], Any] | str | None = None,
        reconstruct: bool = False,
        reconstruct_steps: int = 100,
        reconstruct_lr: float = 1e-4,
        reconstruct_target: str = "block",
    ) -> None:
        reconstruction = (reconstruct, reconstruct_steps, reconstruct_lr, reconstruct_target)
        check_oneshot_arguments(sparsity, pattern, sparsity_profile, *reconstruction)
        # Built here so that a bad name or option fails when the callback is made, before any fit.
        self.solver = resolve_method(method, method_options)
        self.refiner = resolve_refiner(refine, refine_options)
        check_num_samples(num_samples)
        super().__init__(sparsity, pattern, targets, ignore, finalize_on_end)
        self.method = method
        self.calibration = calibration
        self.num_samples = num_samples
        self.blocks = blocks
        self.offload = offload
        self.sparsity_profile = sparsity_profile
        self.progress = progress
        self.forward = resolve_forward(forward)
        self.reconstruct, self.reconstruct_steps, self.reconstruct_lr = reconstruct, reconstruct_steps, reconstruct_lr
        self.reconstruct_target = reconstruct_target
        self.report: SparsityReport | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.log_sparsity(pl_module, layers=batch_idx == 0)

    def resolve_targets(self, model: torch.nn.Module) -> list[PruneTarget]:
        """The layers `prune_oneshot` prunes: those `targets`/`ignore` select inside the model's blocks (or in
        the whole model when it has no chained block list)."""
        return plan_oneshot(model, self.blocks, self.target_patterns, self.ignore).targets

    def calibration_batches(self, trainer: pl.Trainer) -> list[Any]:
        """This rank's calibration batches: the first `num_samples` sequences over all ranks.

        From `calibration`, else the fit's training dataloader. Under DDP, rank r of W takes batches
        r, r+W, r+2W, ... of them; a dataloader that already shards with a `DistributedSampler`
        keeps its own batches on each rank, and each rank takes its share of `num_samples`.
        """
        if self.calibration is not None:
            source = self.calibration
        # `trainer.datamodule` is set at run time by Lightning's data connector, not declared on
        # `Trainer` (lightning 2.6.6), hence getattr.
        elif (datamodule := getattr(trainer, "datamodule", None)) is not None:
            source = datamodule.train_dataloader()
        else:
            source = fit_train_dataloader(trainer)
        world, rank = trainer.world_size, trainer.global_rank
        if isinstance(getattr(source, "sampler", None), DistributedSampler):
            share = (
                None if self.num_samples is None else self.num_samples // world + int(rank < self.num_samples % world)
            )
            return take_samples(source, share)
        return take_samples(source, self.num_samples)[rank::world]

    def _check_every_rank_has_batches(self, trainer: pl.Trainer, batches: list[Any]) -> None:
        """One rank without batches would leave the others waiting in the statistics' all-reduce."""
        counts = torch.zeros(trainer.world_size, dtype=torch.int64)
        counts[trainer.global_rank] = len(batches)
        all_reduce_sum_([counts])
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"`num_samples`={self.num_samples} leaves ranks {empty} of {trainer.world_size} without calibration "
                f"batches (batches per rank: {counts.tolist()}); give at least one batch per rank"
            )

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> SparsityReport:
        """Run `prune_oneshot` on the module and record the resulting sparsities."""
        if self.reconstruct and trainer.world_size > 1:
            # Each rank would tune its blocks on its own batches and the weights would diverge.
            raise ValueError(
                f"`reconstruct`=True runs in one process; got world_size={trainer.world_size} "
                "(prune one-shot before DDP)"
            )
        needs_data = needs_calibration(self.solver, self.refiner, self.sparsity_profile) or self.reconstruct
        batches = self.calibration_batches(trainer) if needs_data else None
        if batches is not None and is_distributed():
            self._check_every_rank_has_batches(trainer, batches)
        self.report = prune_oneshot(
            pl_module,
            batches,
            method=self.solver,
            sparsity=self.sparsity,
            pattern=self.pattern,
            refine=self.refiner,
            targets=self.target_patterns,
            ignore=self.ignore,
            offload=self.offload,
            device=pl_module.device,
            blocks=self.blocks,
            sparsity_profile=self.sparsity_profile,
            # Summed statistics over all ranks: the masks of one process that saw every batch.
            reduce_stats=lambda stats: all_reduce_sum_([t for stat in stats for t in stat.tensors()]),
            progress=self.progress,
            forward=self.forward,
            reconstruct=self.reconstruct,
            reconstruct_steps=self.reconstruct_steps,
            reconstruct_lr=self.reconstruct_lr,
            reconstruct_target=self.reconstruct_target,
        )
        self.layer_sparsity = {layer.name: layer.sparsity for layer in self.report.layers}
        self.current_sparsity = self.report.global_sparsity
        self.reached_sparsity = self.sparsity
        self.pruned = True
        return self.report
