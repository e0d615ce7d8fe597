"""What every pruning callback shares: targets, masks kept applied, checkpoint state, logging, the end.

The callbacks decide *when* to prune; the math is in `criteria`, `selection`, `masking`, `oneshot` and
`structured`. Scheduled pruning during training (criterion, scope, gradients) is in `callbacks/scheduled.py`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_prune.callbacks.inherited import InheritedMasks, pruned_fractions, unclaimed_masks
from lightning_prune.callbacks.sharding import Blocks, ShardedMaskState
from lightning_prune.callbacks.strategy import check_materialized_before_setup, check_strategy
from lightning_prune.masking import (
    finalize,
    get_mask,
    get_masks,
    keep_masks_applied,
    load_masks,
    mask_sharded_gradients_,
    tighten_masks,
)
from lightning_prune.parallel.sharded import local_tensor
from lightning_prune.selection import check_pattern_fits, check_pattern_sparsity
from lightning_prune.structured.replay import compaction_record
from lightning_prune.structured.training import compact_and_measure, first_batch, sample_forward
from lightning_prune.targets import PruneTarget, find_targets
from lightning_prune.validation import check_materialized, check_sparsity


class MaskingCallback(Callback):
    """Base of the pruning callbacks: resolves targets, keeps masks applied, saves and restores them.

    It holds no criterion and selects nothing: subclasses set the masks (`OneShotPruning`,
    `StructuredPruning` once; `ScheduledPruning`'s `GradualPruning`, `IterativePruning` on schedule)
    and this class keeps them through training, checkpoints and the end of the fit.

    Lifecycle: `preflight(model)` raises for every mistake knowable before training (also run by
    `on_fit_start`); `on_fit_start` finds the targets, re-attaches masks restored from a checkpoint
    and registers a post-step hook on every optimizer that re-zeroes pruned weights (`on_train_start`
    moves the hooks to optimizers another callback swapped in); `on_fit_end` warns when the final
    sparsity is not the target (recorded in `warnings_recorded`), removes the hooks and, with
    `finalize_on_end`, bakes the masks in (with `compact_on_end`, removes the pruned units).

    Under FSDP2 (`ModelParallelStrategy`) each rank masks its own row block of every weight, and the
    blocks travel through the distributed checkpoint (`callbacks.sharding.ShardedMaskState`).
    """

    sharded_ok = True  # runs under FSDP2 (ModelParallelStrategy); callbacks that need whole weights say False

    def __init__(
        self,
        sparsity: float,
        pattern: str | None = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        finalize_on_end: bool = False,
        compact_on_end: bool = False,
    ) -> None:
        self.sparsity = check_sparsity(sparsity)
        check_pattern_sparsity(self.sparsity, pattern)
        self.pattern = pattern
        self.target_patterns = targets
        self.ignore = ignore
        self.finalize_on_end = finalize_on_end
        self.compact_on_end = compact_on_end
        self.compaction: dict[str, float] = {}
        self.compacted: dict[str, Any] = {}  # what compaction removed (`compaction_record`): a resume replays it
        self.current_sparsity = 0.0
        self.layer_sparsity: dict[str, float] = {}
        self.reached_sparsity = 0.0  # the target of the last mask update
        self.warnings_recorded: list[dict[str, Any]] = []
        self._targets: list[PruneTarget] = []
        self._restored_masks: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._hooked_optimizers: list[torch.optim.Optimizer] = []
        self._pl_module: pl.LightningModule | None = None
        self._sharded = False  # the strategy is FSDP2 (attach)
        self._sharding: ShardedMaskState | None = None  # under FSDP2, once the targets are known (attach)
        self._checkpoint_path: str | None = None  # the checkpoint being restored (on_load_checkpoint)
        self._inherited: InheritedMasks | None = None  # another configuration's masks in it (on_load_checkpoint)
        self._carried: list[str] = []  # kept masks of parameters outside the targets: saved with this state

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, pattern=self.pattern, targets=str(self.target_patterns))

    @property
    def targets(self) -> list[PruneTarget]:
        """The weights this callback prunes (known from `on_fit_start` on)."""
        return self._targets

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_materialized_before_setup(trainer.strategy, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.hook_optimizers(trainer)

    def on_before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        if self._sharded:
            mask_sharded_gradients_(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.warn_if_target_missed()
        self.detach(pl_module, first_batch(trainer) if self.compact_on_end else None)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._sharding is not None:
            self._sharding.save(checkpoint)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._checkpoint_path = getattr(trainer, "ckpt_path", None)
        # `trainer.callbacks` is public, but set by Lightning's CallbackConnector, not declared on the class (2.6).
        claimed = {callback.state_key for callback in getattr(trainer, "callbacks", [])}
        found = unclaimed_masks(checkpoint, claimed, self.state_key)
        if found is not None:
            self.inherit(found)

    def inherit(self, found: InheritedMasks) -> None:
        """Take the masks of a checkpoint's differently configured pruning (applied at `attach`): monotone,
        the stricter wins entry by entry (the union of the pruned entries), said in a warning naming both
        configurations. Subclasses also take the checkpoint's schedule clock, or refuse."""
        self._inherited = found
        self.reached_sparsity = max([self.reached_sparsity, *(float(s["reached_sparsity"]) for s in found.states)])

    def keep_inherited(self, pl_module: nn.Module, found: InheritedMasks) -> None:
        """AND the inherited masks into the model's (`tighten_masks`), measure, and say so (recorded)."""
        tighten_masks(pl_module, found.masks)
        self.carry(found.masks)
        masks = self.masks()
        if masks and not self._sharded:
            self.layer_sparsity, self.current_sparsity = pruned_fractions(masks)
        self.record_warning(
            "checkpoint_masks_kept",
            found.kept_message(self.state_key, self.current_sparsity),
            checkpoint=list(found.sources),
            configuration=self.state_key,
            sparsity=self.current_sparsity,
        )

    def resolve_targets(self, model: nn.Module) -> list[PruneTarget]:
        """The weights this callback prunes in `model` (a ValueError naming the model's layers if none)."""
        return find_targets(model, include=self.target_patterns, ignore=self.ignore)

    def preflight(self, pl_module: nn.Module, trainer: pl.Trainer | None = None) -> None:
        """Raise a ValueError for every mistake knowable before training: targets that match nothing,
        an N:M `pattern` that does not divide a target's input dimension (and, given the Trainer
        that will run this callback, schedules it cannot run: see the subclasses), a model on the meta device."""
        check_materialized(pl_module)
        targets = self.resolve_targets(pl_module)
        if self.pattern is not None:
            check_pattern_fits(targets, self.pattern)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check, resolve targets, restore saved masks, and keep masks applied after every optimizer step."""
        self._sharded = check_strategy(trainer.strategy, sharded_ok=self.sharded_ok)
        self.preflight(pl_module, trainer)
        self._pl_module = pl_module
        self._targets = self.resolve_targets(pl_module)
        self.warnings_recorded = []
        if self._sharded:  # refuses targets that FSDP2 pruning cannot handle
            blocks = (self.sharded_blocks, self.sharded_layout)
            self._sharding = ShardedMaskState(pl_module, self._targets, type(self).__name__, *blocks)
        if self._restored_masks:
            load_masks(pl_module, self._restored_masks)
            self.carry(self._restored_masks)
            self._restored_masks = {}
        if self._inherited is not None:
            self.keep_inherited(pl_module, self._inherited)
            self._inherited = None
        self.hook_optimizers(trainer)

    def carry(self, masks: dict[str, torch.Tensor]) -> None:
        """Save the masks of `masks` outside the targets with this callback's state too (kept from a checkpoint)."""
        self._carried = sorted({*self._carried, *masks} - {t.name for t in self._targets})

    def hook_optimizers(self, trainer: pl.Trainer) -> None:
        """Keep masks applied after every step of the Trainer's current optimizers (once each).

        A callback that replaces the optimizers in its `on_fit_start` (`LoRARecovery`) leaves hooks
        on optimizers that never step again; they are removed and the new ones hooked.
        """
        if [id(o) for o in trainer.optimizers] == [id(o) for o in self._hooked_optimizers]:
            return
        for hook in self._hooks:
            hook.remove()
        module = trainer.lightning_module
        self._hooks = [keep_masks_applied(optimizer, module) for optimizer in trainer.optimizers]
        self._hooked_optimizers = list(trainer.optimizers)

    def detach(self, pl_module: pl.LightningModule, sample_batch: Any = None) -> None:
        """Remove the optimizer hooks; bake the masks in when `finalize_on_end`; compact when `compact_on_end`
        (recording parameters and, given a `sample_batch`, forward time before and after in `compaction`)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._hooked_optimizers = [], []
        if self.finalize_on_end:
            finalize(pl_module)
        if self.compact_on_end:
            run = None if sample_batch is None else sample_forward(sample_batch)
            self.compacted, self.compaction = compaction_record(pl_module), compact_and_measure(pl_module, run)[1]

    def record_warning(self, kind: str, message: str, **details: Any) -> None:
        """Warn (UserWarning) and keep the warning in `warnings_recorded` for the run's results."""
        warnings.warn(message, UserWarning, stacklevel=2)
        self.warnings_recorded.append({"kind": kind, "message": message, **details})

    def warn_if_target_missed(self) -> None:
        """At fit end: a final sparsity below the target is said and recorded, never silent."""
        if self.reached_sparsity < self.sparsity - 1e-9:
            self.record_warning(
                "sparsity_shortfall",
                f"{type(self).__name__} ended at sparsity {self.current_sparsity:.4f}, below its target "
                f"{self.sparsity} (the last mask update aimed at {self.reached_sparsity:.4f}); the fit ended before "
                "the schedule did (early stopping, max_steps/max_epochs shorter than the schedule, or a start/end "
                "step past the end)",
                target=self.sparsity,
                achieved=self.current_sparsity,
            )

    def log_sparsity(self, pl_module: pl.LightningModule, layers: bool = False, on_step: bool = True) -> None:
        """Log the targets' global sparsity as `prune/sparsity` (and per layer as `prune/layer/<name>`)."""
        metrics = {"prune/sparsity": self.current_sparsity}
        metrics.update({f"prune/layer/{name}": value for name, value in self.layer_sparsity.items()} if layers else {})
        pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)

    @property
    def prunes_units(self) -> bool:
        """True when `sparsity` is a fraction of whole units (neurons, heads, filters), not of weights."""
        return False

    def masks(self) -> dict[str, torch.Tensor]:
        """This callback's current keep-masks by qualified parameter name."""
        found = {t.name: get_mask(t.module, t.param_name) for t in self._targets}
        return {name: mask for name, mask in found.items() if mask is not None}

    def sharded_blocks(self) -> Blocks:
        """Under FSDP2, this rank's blocks of the state by kind (here the masks; subclasses add theirs)."""
        return {"mask": self.masks()}

    def sharded_layout(self, kind: str, name: str) -> tuple[tuple[int, ...], torch.dtype] | None:
        """This rank's block shape and dtype of a saved kind not shaped like its parameter's block (None: as masks)."""
        return None

    def restore_blocks(self, kind: str, blocks: dict[str, DTensor]) -> None:
        """Take one kind of block read back from the distributed checkpoint (the masks here)."""
        if kind != "mask" or self._pl_module is None:
            raise ValueError(f"{type(self).__name__} saved no sharded {kind!r} state, got {sorted(blocks)[:3]}")
        load_masks(self._pl_module, {name: local_tensor(block) for name, block in blocks.items()})

    def state_dict(self) -> dict[str, Any]:
        model_masks = get_masks(self._pl_module) if self._carried and self._pl_module is not None else {}
        current = {**self.masks(), **{name: model_masks[name] for name in self._carried if name in model_masks}}
        masks = {} if self._sharded else {name: mask.detach().cpu().clone() for name, mask in current.items()}
        return {
            "masks": masks or dict(self._restored_masks),
            # Under FSDP2 the blocks are in the distributed checkpoint (on_save_checkpoint): their names.
            "sharded": sorted(self._sharding.tensors()) if self._sharding is not None else [],
            "current_sparsity": self.current_sparsity,
            "reached_sparsity": self.reached_sparsity,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_masks = dict(state_dict.get("masks", {}))
        if state_dict.get("sharded"):  # FSDP2 restores after `on_fit_start`: the targets are known
            for kind, blocks in self.read_sharded(list(state_dict["sharded"])).items():
                self.restore_blocks(kind, blocks)
        if self._pl_module is not None and self._targets and self._restored_masks:  # restored after `on_fit_start`
            load_masks(self._pl_module, self._restored_masks)
            self.carry(self._restored_masks)
            self._restored_masks = {}
        self.current_sparsity = float(state_dict.get("current_sparsity", 0.0))
        self.reached_sparsity = float(state_dict.get("reached_sparsity", self.current_sparsity))

    def read_sharded(self, names: list[str]) -> dict[str, dict[str, DTensor]]:
        """The blocks `names` from the distributed checkpoint being restored, by kind and parameter."""
        if self._sharding is None:
            raise ValueError(
                f"{type(self).__name__}'s state holds sharded tensors {names[:3]}..., saved under "
                "ModelParallelStrategy: resume it under ModelParallelStrategy from the distributed checkpoint "
                "it came with"
            )
        return self._sharding.load(self._checkpoint_path, names)
