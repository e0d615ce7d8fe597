"""`KeepMasks`: train a pruned model further without pruning it further, and without reviving a zero."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_prune.callbacks.inherited import unclaimed_masks
from lightning_prune.masking import get_masks, keep_masks_applied, tighten_masks


class KeepMasks(Callback):
    """Keep every pruned weight at +0.0 while training, pruning nothing new.

    Without a pruning callback, Lightning trains every weight: resuming a pruned checkpoint with
    `fit(ckpt_path=...)` and no callback of ours revives its zeros (the optimizer's momenta, weight
    decay and gradients move them), and nothing of ours runs to stop it. Add `KeepMasks()` to keep
    them: it takes the masks already on the model and those of the checkpoint (every pruning
    callback's state, and a lightning-prune stage checkpoint's masks; the union of their pruned
    entries), re-applies them after every optimizer step, and saves them in its own state.

    Lifecycle: `on_load_checkpoint` reads the checkpoint's masks; `on_fit_start` attaches them (ANDed
    with the model's); `on_train_start` hooks every optimizer (after callbacks that replace them);
    `on_fit_end` removes the hooks, leaving the masks on the model. A fit with no mask anywhere warns.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[KeepMasks()])
        trainer.fit(model, ckpt_path="pruned.ckpt")   # the checkpoint's zeros stay exactly 0
    """

    def __init__(self) -> None:
        self._loaded: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._module: pl.LightningModule | None = None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # `trainer.callbacks` is public, but set by Lightning's CallbackConnector, not declared on the class (2.6).
        claimed = {callback.state_key for callback in getattr(trainer, "callbacks", [])}
        found = unclaimed_masks(checkpoint, claimed, own_key=self.state_key)
        if found is not None:
            self._loaded = {**self._loaded, **found.masks}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.remove_hooks()
        self._hooks = [keep_masks_applied(optimizer, pl_module) for optimizer in trainer.optimizers]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.remove_hooks()

    def attach(self, pl_module: pl.LightningModule) -> None:
        """Attach the loaded masks (ANDed with the model's own); warn when the model then has none."""
        self._module = pl_module
        if self._loaded:
            tighten_masks(pl_module, self._loaded)
            self._loaded = {}
        if not get_masks(pl_module):
            warnings.warn(
                "KeepMasks found no masks on the model nor in the checkpoint: nothing is kept at zero",
                UserWarning,
                stacklevel=2,
            )

    def remove_hooks(self) -> None:
        """Stop re-applying the masks after optimizer steps (the masks stay on the model)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def state_dict(self) -> dict[str, Any]:
        masks = get_masks(self._module) if self._module is not None else self._loaded
        saved = {name: mask.detach().cpu().clone() for name, mask in masks.items()}
        pruned = sum(int((~mask).sum()) for mask in saved.values())
        # `reached_sparsity` makes this a mask state that a pruning callback resuming without KeepMasks keeps too.
        return {"masks": saved, "reached_sparsity": pruned / max(sum(m.numel() for m in saved.values()), 1)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        masks = {name: mask.to(dtype=torch.bool) for name, mask in dict(state_dict.get("masks", {})).items()}
        self._loaded = {
            name: self._loaded[name] & mask if name in self._loaded else mask for name, mask in masks.items()
        }
