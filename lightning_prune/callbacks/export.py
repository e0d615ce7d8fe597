"""`SparseExport`: write the pruned model with `save_sparse` when `fit` ends."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_prune.callbacks.base import MaskingCallback
from lightning_prune.callbacks.lora import LoRARecovery, wrapped_network
from lightning_prune.export.bitmask import is_2_4
from lightning_prune.export.checks import refuse_unmerged
from lightning_prune.export.config import TWO_FOUR_FORMATS, check_format
from lightning_prune.export.save import check_destination, export_targets, save_sparse
from lightning_prune.selection import parse_pattern
from lightning_prune.targets import find_targets


def gives_two_four(callback: MaskingCallback) -> bool:
    """True when `callback` leaves what it prunes 2:4: pattern '2:4' on single weights."""
    return not callback.prunes_units and callback.pattern is not None and parse_pattern(callback.pattern) == (2, 4)


EXPORT_AFTER_MERGE = (
    "attach the adapters with a LoRARecovery(merge=True) placed before SparseExport, or leave SparseExport out "
    "and export after fit: `save_sparse(merge_lora(peft_model), ...)`"
)


class SparseExport(Callback):
    """Export the model at the end of `fit` in a format other tools load.

    Masks still attached are baked in on the way out (the model itself is not modified), so it can
    follow a pruning callback with or without `finalize_on_end`. Only global rank 0 writes.

    Lifecycle: `preflight(pl_module)` (also run by `on_fit_start`, with the Trainer's callbacks)
    checks before training what can be known then: the `attribute`, the targets, the destination (a
    file or a non-empty directory save_sparse did not write is refused), that no adapter will be
    left unmerged when fit ends (`check_adapters_merged`) and, for a 2:4 format, that every target's
    input dimension divides by 4 and that no pruning callback of its run (this stage's or, through
    `earlier`, an earlier stage's) prunes an exported layer in a pattern that is not 2:4;
    `on_fit_start` also checks that a pruning callback of the same Trainer prunes the targets 2:4
    (or that they already are); `on_fit_end` → `export(pl_module)` → `save_sparse(model, dirpath,
    format, ...)`. Put it after a `LoRARecovery` in the callbacks: hooks
    run in list order, and the adapters must be merged before the export writes.

    Example (YAML)::

        _target_: lightning_prune.SparseExport
        dirpath: ${hydra:runtime.output_dir}/export   # directory to (re)write
        format: sparse-24-bitmask                     # dense | sparse-24-bitmask | sparse-bitmask
        attribute: null                               # submodule to export; null = auto

    Args:
        dirpath: the export directory (replaced atomically if it exists).
        format: see `save_sparse`.
        attribute: name of the LightningModule attribute holding the model to export; None exports
            `pl_module.model` when it is a Hugging Face `PreTrainedModel`, else the LightningModule.
        targets, ignore: module-name regular expressions, as in `find_targets`.
        tokenizer: saved beside a Hugging Face model when given.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        format: str = "dense",
        attribute: str | None = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        if not str(dirpath):
            raise ValueError(f"`dirpath` must be a non-empty path, got {dirpath!r}")
        self.dirpath = Path(dirpath)
        self.format = check_format(format)
        self.attribute = attribute
        self.targets = targets
        self.ignore = ignore
        self.tokenizer = tokenizer
        self.last_export: Path | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=str(self.dirpath), format=self.format)

    def preflight(self, pl_module: nn.Module, callbacks: Sequence[Any] = (), earlier: Sequence[Any] = ()) -> None:
        """Raise a ValueError for every export mistake knowable before training; `callbacks`: the
        Trainer's, when known (see `check_adapters_merged`); `earlier`: the callbacks of a run's earlier
        stages, whose masks the model carries into this one (see `check_two_four_pruning`)."""
        model = self.model_to_export(pl_module)
        check_destination(self.dirpath, argument="dirpath")
        self.check_adapters_merged(callbacks, pl_module)
        targets = find_targets(model, include=self.targets, ignore=self.ignore)
        if self.format in TWO_FOUR_FORMATS:
            self.check_two_four_pruning([*earlier, *callbacks], pl_module)
            for target in targets:
                columns = target.as_matrix(target.weight).shape[1]
                if columns % 4:
                    raise ValueError(
                        f"`format`={self.format!r} can never hold {target.name!r}: its input dimension {columns} "
                        "does not divide by 4; leave it out with `ignore` or use format='dense' or 'sparse-bitmask'"
                    )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Trainer.callbacks is public, set by its connector (lightning 2.6.6); its stubs do not declare it
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        self.preflight(pl_module, callbacks)
        if self.format in TWO_FOUR_FORMATS:
            self.check_two_four_source(callbacks, pl_module)

    def check_adapters_merged(self, callbacks: Sequence[Any], pl_module: nn.Module) -> None:
        """Raise unless the exported model will hold no adapter layer when fit ends: a `LoRARecovery` of
        `callbacks` on it must merge (`merge=True`) and come before this callback, and adapters already
        attached must be that callback's."""
        model = self.model_to_export(pl_module)
        network = wrapped_network(pl_module)
        if not any(m is network for m in model.modules()) and not any(m is model for m in network.modules()):
            callbacks = [c for c in callbacks if not isinstance(c, LoRARecovery)]  # it wraps another module
        position = next((i for i, c in enumerate(callbacks) if c is self), len(callbacks))
        merged_later: set[int] = set()
        for index, callback in enumerate(callbacks):
            if isinstance(callback, LoRARecovery):
                self._check_recovery(callback, index > position)
                if callback.peft_model is not None:
                    merged_later |= {id(m) for m in callback.peft_model.modules()}
        refuse_unmerged(
            model, f"the model SparseExport writes (`attribute`={self.attribute!r})", merged_later, EXPORT_AFTER_MERGE
        )

    def _check_recovery(self, recovery: LoRARecovery, after_export: bool) -> None:
        if not recovery.merge:
            raise ValueError(
                f"SparseExport(dirpath={str(self.dirpath)!r}) writes when fit ends, but the Trainer's "
                "LoRARecovery has `merge`=False and leaves its adapters unmerged then; set merge=True, or export "
                "after fit with `save_sparse(merge_lora(recovery.peft_model), ...)` (without SparseExport)"
            )
        if after_export:
            raise ValueError(
                "SparseExport comes before LoRARecovery in the Trainer's callbacks: hooks run in list order, so "
                "the export would write before the adapters are merged; put SparseExport after LoRARecovery"
            )

    def check_two_four_pruning(self, callbacks: Sequence[Any], pl_module: nn.Module) -> None:
        """Raise when a layer the export will write sparse is pruned only by callbacks of `callbacks`
        that cannot leave it 2:4 (no `pattern`, another N:M pattern, or whole units: `prunes_units`).
        Layers no pruning callback of ours prunes are left to `check_two_four_source` at fit start
        (a user's own pruner may make them 2:4)."""
        pruning = [c for c in callbacks if isinstance(c, MaskingCallback)]
        if not pruning:
            return
        owners: dict[int, list[MaskingCallback]] = {}
        for callback in pruning:
            for target in callback.resolve_targets(pl_module):
                owners.setdefault(id(target.module), []).append(callback)
        exported = export_targets(self.model_to_export(pl_module), self.targets, self.ignore, will_prune=set(owners))
        for target in exported:
            found = owners.get(id(target.module), [])
            if found and not any(gives_two_four(c) for c in found):
                culprit = found[-1]
                detail = "whole units (`structure`)" if culprit.prunes_units else f"`pattern`={culprit.pattern!r}"
                raise ValueError(
                    f"SparseExport(format={self.format!r}) needs every exported target to be 2:4, but "
                    f"{type(culprit).__name__} prunes {target.name!r} with {detail}, which does not leave it 2:4; "
                    "give that callback pattern='2:4', leave the layer out of the export with `targets`/`ignore`, "
                    "or use format='dense' or 'sparse-bitmask'"
                )

    def check_two_four_source(self, callbacks: Sequence[Any], pl_module: nn.Module) -> None:
        """Raise unless every layer the export will write sparse (`targets`, else the pruned ones:
        masked now, as after an earlier stage, or masked by one of `callbacks`) is already 2:4 or
        pruned 2:4 by one of `callbacks`."""
        model = self.model_to_export(pl_module)
        pruned, pruned_2_4 = set[int](), set[int]()
        for callback in callbacks:
            if isinstance(callback, MaskingCallback):
                modules = {id(t.module) for t in callback.resolve_targets(pl_module)}
                pruned |= modules
                if gives_two_four(callback):
                    pruned_2_4 |= modules
        exported = export_targets(model, self.targets, self.ignore, will_prune=pruned)
        never = [
            t.name for t in exported if id(t.module) not in pruned_2_4 and not is_2_4(t.as_matrix(t.weight.detach()))
        ]
        if never:
            raise ValueError(
                f"`format`={self.format!r} needs every exported target to be 2:4, but no pruning callback of this "
                f"Trainer prunes {never[:5]}{' ...' if len(never) > 5 else ''} with pattern '2:4' and they are not 2:4 "
                "now; add pattern='2:4' to the pruning callback, narrow the export with `targets`/`ignore`, or use "
                "format='dense'"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.export(pl_module)
        trainer.strategy.barrier("lightning_prune.SparseExport")

    def model_to_export(self, pl_module: nn.Module) -> nn.Module:
        """The module `export` writes (see `attribute`)."""
        if self.attribute is not None:
            model = getattr(pl_module, self.attribute, None)
            if not isinstance(model, nn.Module):
                raise ValueError(f"`attribute`={self.attribute!r} names no nn.Module of {type(pl_module).__name__}")
            return model
        from transformers import PreTrainedModel

        inner = getattr(pl_module, "model", None)
        return inner if isinstance(inner, PreTrainedModel) else pl_module

    def export(self, pl_module: pl.LightningModule) -> Path:
        """Write the export now and return its directory."""
        model = self.model_to_export(pl_module)
        check_destination(self.dirpath, argument="dirpath")  # save_sparse's own error would name `path`
        self.last_export = save_sparse(model, self.dirpath, self.format, self.tokenizer, self.targets, self.ignore)
        return self.last_export

    def state_dict(self) -> dict[str, Any]:
        return {"last_export": None if self.last_export is None else str(self.last_export)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        last = state_dict.get("last_export")
        self.last_export = None if last is None else Path(last)
