"""Pruning on a schedule during training: the criterion, the scope and the mask updates.

`GradualPruning` and `IterativePruning` decide *when* (`prune_to(sparsity)` at their steps or
epochs); this layer scores the surviving weights with the criterion (feeding gradient-based ones
every optimizer step), selects the masks (`mask_updates.update_masks`, or whole units with `structure`)
and keeps the criterion's statistics in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor

from lightning_prune.callbacks.base import MaskingCallback
from lightning_prune.callbacks.sharding import Blocks
from lightning_prune.criteria import Criterion, make_criterion
from lightning_prune.mask_updates import update_masks
from lightning_prune.masking import apply_masks_, get_masks
from lightning_prune.parallel.collectives import broadcast_masks_
from lightning_prune.parallel.sharded import local_tensor, sum_over_shards
from lightning_prune.registry import CRITERIA
from lightning_prune.selection import SCOPES
from lightning_prune.structured.report import StructuredReport
from lightning_prune.structured.training import StructuredSelection, check_structure_arguments, describe
from lightning_prune.validation import check_choice, check_sparsity


class ScheduledPruning(MaskingCallback):
    """Base of the callbacks that prune during training: masks recomputed by `prune_to(sparsity)`.

    `criterion` scores the weights (gradient-based ones accumulate every optimizer step), `scope`
    and `pattern` say how scores become masks (`selection`); with `structure` ("neuron", "head" or
    "filter") whole units are removed instead (`structured.training.StructuredSelection`), which
    needs whole weights (refused under FSDP2), and `compact_on_end` removes them at fit end.

    Lifecycle (beyond `MaskingCallback`'s): `on_fit_start` also finds the structured groups;
    `on_before_optimizer_step` feeds gradient-based criteria; the first batch that stepped checks
    that every target got a gradient; the subclasses call `prune_to` on their schedule.
    """

    def __init__(
        self,
        sparsity: float,
        criterion: str | Criterion = "magnitude",
        scope: str = "layer",
        pattern: str | None = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        finalize_on_end: bool = False,
        seed: int = 0,
        structure: str | None = None,
        compact_on_end: bool = False,
    ) -> None:
        check_sparsity(sparsity)  # first, then the other arguments, in the order they were always checked
        check_structure_arguments(structure, pattern, scope, compact_on_end)
        # Structured pruning (neurons/heads/filters) lives in lightning_prune.structured; the callback only calls it.
        self.structured = StructuredSelection(structure, criterion, targets, ignore) if structure is not None else None
        if not isinstance(criterion, Criterion) and criterion not in CRITERIA:
            raise ValueError(f"`criterion` must be one of {CRITERIA} or a Criterion, got {criterion!r}")
        check_choice(scope, "scope", SCOPES)
        super().__init__(sparsity, pattern, targets, ignore, finalize_on_end, compact_on_end)
        self.criterion = make_criterion(criterion, seed)
        self.scope = scope
        self.sharded_ok = structure is None  # structured selection needs whole weights
        self._gradients_checked = False
        self._restored_sums: dict[str, torch.Tensor] = {}
        self.report: StructuredReport | None = None  # with `structure`: what was removed, made at fit end

    def on_before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self.structured is not None and self.structured.needs_gradients:
            self.structured.accumulate()
        elif self.criterion.needs_gradients:
            self.accumulate_gradients()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.criterion.needs_gradients and not self._gradients_checked and self.criterion.seen():
            self.check_every_target_has_gradients()

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """`MaskingCallback.attach`, then the structured groups (with `structure`)."""
        inherited = self._inherited is not None
        super().attach(trainer, pl_module)
        self._gradients_checked = False
        if self.structured is not None:
            self.structured.attach(pl_module)
            if inherited:  # another configuration's masks kept (`keep_inherited`): the units they removed
                self.current_sparsity = self.structured.removed_fraction()

    def detach(self, pl_module: pl.LightningModule, sample_batch: Any = None) -> None:
        """With `structure`, first the `report` of the units removed (compaction then slices them off),
        then `MaskingCallback.detach`."""
        if self.structured is not None and self.structured.groups:
            self.report = self.structured.report(pl_module)
        super().detach(pl_module, sample_batch)

    def results(self) -> dict[str, Any]:
        """What the run records: with `structure`, the units removed and the parameters before and after
        (`structured`, see `StructuredReport.as_dict`) and the compaction's measurements; else nothing."""
        if self.structured is None:
            return {}
        return {"structured": self.report.as_dict() if self.report else {}, "compaction": dict(self.compaction)}

    def check_every_target_has_gradients(self) -> None:
        """After the first batch that stepped: a target the loss does not reach cannot be scored by
        gradients (e.g. BERT's pooler when the head reads `last_hidden_state`); name it, before any pruning."""
        seen = self.criterion.seen()
        missing = [t.name for t in self._targets if t.name not in seen]
        self._gradients_checked = True
        if missing:
            raise ValueError(
                f"`criterion`={self.criterion.name!r} scores from gradients, but {missing} got no gradient in the "
                "first training step (the loss does not depend on them); leave them out with `ignore` "
                f"(e.g. ignore={[name.rsplit('.', 1)[0] for name in missing]}) or use criterion='magnitude'"
            )

    def accumulate_gradients(self) -> None:
        """Feed this step's (already reduced) gradients to the criterion."""
        for target in self._targets:
            if target.weight.grad is not None:
                self.criterion.accumulate(target.name, local_tensor(target.weight), local_tensor(target.weight.grad))

    def prune_to(self, sparsity: float) -> dict[str, torch.Tensor]:
        """Recompute masks at `sparsity` from the criterion's scores (monotone: pruned stays pruned)."""
        if self._pl_module is None:
            raise RuntimeError("prune_to needs the targets that `attach` (on_fit_start) finds; call it during fit")
        if self.structured is not None:
            self.current_sparsity = self.structured.prune_to(sparsity)
            self.reached_sparsity = sparsity
            apply_masks_(self._pl_module)
            self.layer_sparsity = describe(self.structured.groups)
            return self.masks()
        scores = {t.name: self.criterion.score(t.name, local_tensor(t.weight)) for t in self._targets}
        update_masks(self._targets, scores, sparsity, scope=self.scope, pattern=self.pattern)
        self.criterion.reset()
        self.reached_sparsity = sparsity
        masks = self.masks()
        if not self._sharded:
            broadcast_masks_(masks)  # every rank computed them from the same weights; rank 0's win ties
        apply_masks_(self._pl_module)
        kept, sizes = _kept_counts(masks), {name: mask.numel() for name, mask in masks.items()}
        if self._sharding is not None:  # blocks: count over the ranks that hold them
            kept = dict(zip(kept, sum_over_shards(list(kept.values()), self._sharding.group)))
            sizes = {name: self._pl_module.get_parameter(name).numel() for name in masks}
        self.layer_sparsity = {name: 1.0 - kept[name] / sizes[name] for name in masks}
        self.current_sparsity = 1.0 - sum(kept.values()) / sum(sizes.values())
        return masks

    @property
    def prunes_units(self) -> bool:
        """True with `structure`: `sparsity` is then a fraction of whole units, not of weights."""
        return self.structured is not None

    def masks(self) -> dict[str, torch.Tensor]:
        """This callback's current keep-masks by qualified parameter name."""
        if self.structured is not None and self._pl_module is not None:
            return get_masks(self._pl_module)  # a group's masks cover biases and BatchNorm entries too
        return super().masks()

    def sharded_blocks(self) -> Blocks:
        """The masks, and a gradient criterion's sums (`sums/<parameter>`)."""
        return {**super().sharded_blocks(), "sums": self.criterion.state_dict().get("sums", {})}

    def restore_blocks(self, kind: str, blocks: dict[str, DTensor]) -> None:
        """Take the criterion's sums (kept for `load_state_dict`), or hand the rest to the base class."""
        if kind == "sums":
            self._restored_sums.update({name: local_tensor(block).clone() for name, block in blocks.items()})
        else:
            super().restore_blocks(kind, blocks)

    def state_dict(self) -> dict[str, Any]:
        criterion = self.criterion.state_dict()
        if self._sharded and "sums" in criterion:  # blocks: in the distributed checkpoint (`sharded_blocks`)
            criterion = {**criterion, "sums": {}}
        return {**super().state_dict(), "criterion": criterion}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_sums = {}
        super().load_state_dict(state_dict)  # reads the sharded blocks: sums into `_restored_sums`
        criterion_state = dict(state_dict.get("criterion", {}))
        if state_dict.get("sharded"):
            criterion_state["sums"] = {**criterion_state.get("sums", {}), **self._restored_sums}
        self.criterion.load_state_dict(criterion_state)


def _kept_counts(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Kept weights per mask, read back in one host sync (not one per layer)."""
    if not masks:
        return {}
    device = next(iter(masks.values())).device
    counts = torch.stack([mask.sum().to(device) for mask in masks.values()]).tolist()
    return dict(zip(masks, counts))
