"""What every training-time pruning callback shares: targets, masks kept applied, state, logging.

The callbacks decide *when* to prune; the math is in `criteria`, `selection` and `masking`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_prune.callbacks.sharding import ShardedState, check_strategy
from lightning_prune.criteria import Criterion, make_criterion
from lightning_prune.masking import apply_masks_, finalize, get_mask, get_masks, keep_masks_applied, load_masks, mask_sharded_gradients_, update_masks
from lightning_prune.parallel.collectives import broadcast_masks_
from lightning_prune.parallel.sharded import local_tensor, sum_over_shards, targets_shard_group
from lightning_prune.registry import CRITERIA
from lightning_prune.selection import SCOPES, check_pattern_fits, check_pattern_sparsity, check_sparsity
from lightning_prune.structured.training import StructuredSelection, check_structure_arguments, compact_and_measure, describe, first_batch, sample_forward
from lightning_prune.targets import PruneTarget, find_targets


class MaskingCallback(ShardedState, Callback):
    """Base of the pruning callbacks: resolves targets, keeps masks applied, saves and restores them.

    Lifecycle: `preflight(model)` raises for every mistake knowable before training (also run by
    `on_fit_start`); `on_fit_start` finds the targets, re-attaches masks restored from a checkpoint
    and registers a post-step hook on every optimizer that re-zeroes pruned weights (`on_train_start`
    moves the hooks to optimizers another callback swapped in); `on_before_optimizer_step` feeds
    gradient-based criteria, and the first batch that stepped checks that every target got a
    gradient; `on_fit_end` warns when the final sparsity is not the target (recorded in
    `warnings_recorded`), removes the hooks and, with `finalize_on_end`, bakes the masks in.

    Under FSDP2 (`ModelParallelStrategy`) each rank masks its own row block of every weight, selection
    agrees exactly with one process (`lightning_prune.parallel.sharded`), and mask blocks travel through the
    distributed checkpoint (`callbacks.sharding.ShardedState`).
    """

    sharded_ok = True  # runs under FSDP2 (ModelParallelStrategy); subclasses that need whole weights say False

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
        self.sparsity = check_sparsity(sparsity)
        check_structure_arguments(structure, pattern, scope, compact_on_end)
        # Structured pruning (neurons/heads/filters) lives in lightning_prune.structured; the callback only calls it.
        self.structured = StructuredSelection(structure, criterion, targets, ignore) if structure is not None else None
        self.compact_on_end = compact_on_end
        self.compaction: dict[str, float] = {}
        if not isinstance(criterion, Criterion) and criterion not in CRITERIA:
            raise ValueError(f"`criterion` must be one of {CRITERIA} or a Criterion, got {criterion!r}")
        if scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}")
        check_pattern_sparsity(self.sparsity, pattern)
        self.criterion = make_criterion(criterion, seed)
        self.scope = scope
        self.pattern = pattern
        self.target_patterns = targets
        self.ignore = ignore
        self.finalize_on_end = finalize_on_end
        self.current_sparsity = 0.0
        self.layer_sparsity: dict[str, float] = {}
        self._targets: list[PruneTarget] = []
        self._restored_masks: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._hooked_optimizers: list[torch.optim.Optimizer] = []
        self._pl_module: pl.LightningModule | None = None
        self.reached_sparsity = 0.0  # the target of the last mask update
        self.warnings_recorded: list[dict[str, Any]] = []
        self._gradients_checked = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, pattern=self.pattern, targets=str(self.target_patterns))

    @property
    def targets(self) -> list[PruneTarget]:
        """The weights this callback prunes (known from `on_fit_start` on)."""
        return self._targets

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.hook_optimizers(trainer)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._sharded:
            mask_sharded_gradients_(pl_module)
        if self.structured is not None and self.structured.needs_gradients:
            self.structured.accumulate()
        elif self.criterion.needs_gradients:
            self.accumulate_gradients()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.criterion.needs_gradients and not self._gradients_checked and self.criterion.seen():
            self.check_every_target_has_gradients()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.warn_if_target_missed()
        self.detach(pl_module, first_batch(trainer) if self.compact_on_end else None)

    def resolve_targets(self, model: nn.Module) -> list[PruneTarget]:
        """The weights this callback prunes in `model` (a ValueError naming the model's layers if none)."""
        return find_targets(model, include=self.target_patterns, ignore=self.ignore)

    def preflight(self, pl_module: nn.Module, trainer: pl.Trainer | None = None) -> None:
        """Raise a ValueError for every mistake knowable before training: targets that match nothing,
        an N:M `pattern` that does not divide a target's input dimension (and, given the Trainer
        that will run this callback, schedules it cannot run: see the subclasses)."""
        targets = self.resolve_targets(pl_module)
        if self.pattern is not None:
            check_pattern_fits(targets, self.pattern)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check, resolve targets, restore saved masks, and keep masks applied after every optimizer step."""
        self._sharded = check_strategy(trainer.strategy, sharded_ok=self.sharded_ok and self.structured is None)
        self.preflight(pl_module, trainer)
        self._pl_module = pl_module
        self._targets = self.resolve_targets(pl_module)
        self.warnings_recorded = []
        self._gradients_checked = False
        self._shard_group = targets_shard_group(self._targets) if self._sharded else None  # refuses what FSDP2 pruning cannot do
        if self._restored_masks:
            load_masks(pl_module, self._restored_masks)
            self._restored_masks = {}
        if self.structured is not None:
            self.structured.attach(pl_module)
        self.hook_optimizers(trainer)

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
        """Remove the optimizer hooks; bake the masks in when `finalize_on_end`; compact when `compact_on_end`.

        Compaction records parameters (and, given a `sample_batch`, forward time) before and after in `compaction`.
        """
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._hooked_optimizers = [], []
        if self.finalize_on_end:
            finalize(pl_module)
        if self.compact_on_end:
            self.compaction = compact_and_measure(pl_module, sample_forward(sample_batch) if sample_batch is not None else None)[1]

    def record_warning(self, kind: str, message: str, **details: Any) -> None:
        """Warn (UserWarning) and keep the warning in `warnings_recorded` for the run's results."""
        warnings.warn(message, UserWarning, stacklevel=2)
        self.warnings_recorded.append({"kind": kind, "message": message, **details})

    def warn_if_target_missed(self) -> None:
        """At fit end: a final sparsity below the target is said and recorded, never silent."""
        if self.reached_sparsity < self.sparsity - 1e-9:
            self.record_warning(
                "sparsity_shortfall",
                f"{type(self).__name__} ended at sparsity {self.current_sparsity:.4f}, below its target {self.sparsity} "
                f"(the last mask update aimed at {self.reached_sparsity:.4f}); the fit ended before the schedule did "
                "(early stopping, max_steps/max_epochs shorter than the schedule, or a start/end step past the end)",
                target=self.sparsity,
                achieved=self.current_sparsity,
            )

    def check_every_target_has_gradients(self) -> None:
        """After the first batch that stepped: a target the loss does not reach cannot be scored by
        gradients (e.g. BERT's pooler when the head reads `last_hidden_state`); name it, before any pruning."""
        seen = self.criterion.seen()
        missing = [t.name for t in self._targets if t.name not in seen]
        self._gradients_checked = True
        if missing:
            raise ValueError(
                f"`criterion`={self.criterion.name!r} scores from gradients, but {missing} got no gradient in the first "
                "training step (the loss does not depend on them); leave them out with `ignore` "
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
        if self._sharded:  # blocks: count over the ranks that hold them
            kept = dict(zip(kept, sum_over_shards(list(kept.values()), self._shard_group)))
            sizes = {name: self._pl_module.get_parameter(name).numel() for name in masks}
        self.layer_sparsity = {name: 1.0 - kept[name] / sizes[name] for name in masks}
        self.current_sparsity = 1.0 - sum(kept.values()) / sum(sizes.values())
        return masks

    def log_sparsity(self, pl_module: pl.LightningModule, layers: bool = False, on_step: bool = True) -> None:
        """Log the targets' global sparsity as `prune/sparsity` (and per layer as `prune/layer/<name>`)."""
        metrics = {"prune/sparsity": self.current_sparsity}
        if layers:
            metrics.update({f"prune/layer/{name}": value for name, value in self.layer_sparsity.items()})
        pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)

    @property
    def prunes_units(self) -> bool:
        """True when `sparsity` is a fraction of whole units (neurons, heads, filters), not of
        weights: the model's zero fraction then says nothing about the target."""
        return self.structured is not None

    def masks(self) -> dict[str, torch.Tensor]:
        """This callback's current keep-masks by qualified parameter name."""
        if self.structured is not None and self._pl_module is not None:
            return get_masks(self._pl_module)  # a group's masks cover biases and BatchNorm entries too
        found = {t.name: get_mask(t.module, t.param_name) for t in self._targets}
        return {name: mask for name, mask in found.items() if mask is not None}

    def state_dict(self) -> dict[str, Any]:
        masks = {} if self._sharded else {name: mask.detach().cpu().clone() for name, mask in self.masks().items()}
        criterion = self.criterion.state_dict()
        return {
            "masks": masks or dict(self._restored_masks),
            "sharded": sorted(self.sharded_tensors()) if self._sharded else [],  # blocks in the distributed checkpoint
            "criterion": {**criterion, "sums": {}} if self._sharded and "sums" in criterion else criterion,
            "current_sparsity": self.current_sparsity,
            "reached_sparsity": self.reached_sparsity,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_masks = dict(state_dict.get("masks", {}))
        criterion_state = dict(state_dict.get("criterion", {}))
        if state_dict.get("sharded"):  # FSDP2 restores after `on_fit_start`: the targets are known
            self._restored_sums: dict[str, torch.Tensor] = {}
            self.load_sharded(list(state_dict["sharded"]))
            criterion_state["sums"] = {**criterion_state.get("sums", {}), **self._restored_sums}
        if self._pl_module is not None and self._targets and self._restored_masks:  # strategies that restore after `on_fit_start`
            load_masks(self._pl_module, self._restored_masks)
            self._restored_masks = {}
        self.criterion.load_state_dict(criterion_state)
        self.current_sparsity = float(state_dict.get("current_sparsity", 0.0))
        self.reached_sparsity = float(state_dict.get("reached_sparsity", self.current_sparsity))

    def restore_sharded(self, name: str, tensor: torch.Tensor) -> None:
        """Take one tensor read back from a distributed checkpoint (`ShardedState.load_sharded`)."""
        kind, _, param_name = name.partition("/")
        if kind == "sums":
            self._restored_sums[param_name] = tensor.clone()
        elif kind == "mask":
            load_masks(self._pl_module, {param_name: tensor})  # type: ignore[arg-type]  # set by attach
        else:
            raise ValueError(f"{type(self).__name__} saved no sharded {kind!r} state, got {name!r}")


def _kept_counts(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Kept weights per mask, read back in one host sync (not one per layer)."""
    if not masks:
        return {}
    device = next(iter(masks.values())).device
    counts = torch.stack([mask.sum().to(device) for mask in masks.values()]).tolist()
    return dict(zip(masks, counts))
