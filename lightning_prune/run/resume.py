"""Stage checkpoints and `resume=true`: every finished stage leaves a Lightning checkpoint, and a
resumed run continues after the last one (README, "Stages and resume").

A stage checkpoint is what `Trainer.save_checkpoint` writes plus, under `lightning_prune_stage`
(`StageState.on_save_checkpoint`), the run's progress: the stage, the resolved configuration, the
results and warnings so far, and the model's masks. Masks are carried between stages, not
finalized: `StageState` keeps them applied in a stage without a pruning callback of its own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from lightning_prune.callbacks.inherited import STAGE_KEY
from lightning_prune.callbacks.structured import StructuredPruning
from lightning_prune.masking import get_masks, keep_masks_applied, load_masks
from lightning_prune.run.checks import ConfigError
from lightning_prune.run.stages import Stage
from lightning_prune.structured.replay import replay_compaction

CHECKPOINT_DIR = "checkpoints"
PAYLOAD_KEY = STAGE_KEY  # where a stage checkpoint holds the run's progress and masks
# Keys that may differ between the interrupted run and its resumption.
NOT_COMPARED = ("resume",)


def checkpoint_path(out: Path, stage: Stage) -> Path:
    """`<out>/checkpoints/stage-<index>-<name>.ckpt`."""
    return out / CHECKPOINT_DIR / f"stage-{stage.index}-{stage.name}.ckpt"


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved configuration a checkpoint is compared against on resume."""
    values: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    return {key: value for key, value in values.items() if key not in NOT_COMPARED}


def resume_overrides(out: Path, results: dict[str, Any]) -> str | None:
    """The overrides that continue an interrupted run in `out` (`resume=true output_dir=<out>`), None
    while none of the stages in `results` left its checkpoint there."""
    saved = [entry["checkpoint"] for entry in results.get("stages", []) if "checkpoint" in entry]
    return f"resume=true output_dir={out}" if any((out / path).is_file() for path in saved) else None


class StageState(Callback):
    """Keeps the model's masks applied in a stage without a pruning callback, and puts the run's
    progress and the masks into the stage's checkpoint (`on_save_checkpoint`).

    Lifecycle: the run sets `progress` before it saves the stage checkpoint; `on_train_start` hooks
    every optimizer (after callbacks such as `LoRARecovery` replaced them) when `keep_masks` and the
    model has masks; `on_fit_end` removes the hooks.
    """

    def __init__(self, keep_masks: bool) -> None:
        self.keep_masks = keep_masks
        self.progress: dict[str, Any] = {}
        self._hooks: list[Any] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.keep_masks and get_masks(pl_module):
            self._hooks = [keep_masks_applied(optimizer, pl_module) for optimizer in trainer.optimizers]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        masks = {name: mask.detach().cpu().clone() for name, mask in get_masks(pl_module).items()}
        checkpoint[PAYLOAD_KEY] = {**self.progress, "masks": masks}


def save_stage_checkpoint(trainer: pl.Trainer, path: Path, keep_earlier: bool = True, keep: Path | None = None) -> None:
    """`trainer.save_checkpoint` into a temporary file, renamed into place (rank 0 renames); without
    `keep_earlier`, the earlier stages' checkpoints are then removed (resume needs only the last),
    except `keep` (the dense weights a later distillation stage's teacher is rebuilt from)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(temporary)
    if trainer.is_global_zero:
        os.replace(temporary, path)
        for earlier in [] if keep_earlier else sorted(path.parent.glob("stage-*.ckpt")):
            if earlier in (path, keep):
                continue
            if earlier.is_dir():  # a distributed checkpoint (ModelParallelStrategy)
                shutil.rmtree(earlier)
            else:
                earlier.unlink()
    trainer.strategy.barrier("lightning_prune_stage_checkpoint")


def load_last_checkpoint(out: Path, stages: list[Stage], cfg: DictConfig) -> tuple[Stage, dict[str, Any]] | None:
    """The checkpoint of the last finished stage in `out` (None when no stage finished), checked
    to come from this configuration."""
    for stage in reversed(stages):
        path = checkpoint_path(out, stage)
        if path.is_file():
            # Our own file, written by this run's previous attempt: a full Lightning checkpoint
            # (optimizer states, hyperparameters) needs the unrestricted loader.
            checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
            if PAYLOAD_KEY not in checkpoint:
                raise ConfigError(
                    f"`resume`=True: {path} is not a lightning-prune stage checkpoint (no `{PAYLOAD_KEY}`)"
                )
            check_same_config(checkpoint[PAYLOAD_KEY]["config"], run_config(cfg), path)
            return stage, checkpoint
    return None


def check_resumable(cfg: DictConfig, stages: list[Stage]) -> None:
    """Refuse `resume` where a stage runs under ModelParallelStrategy (FSDP2): its stage checkpoint is a
    distributed checkpoint (a folder of every rank's blocks, the masks in it rank 0's only), which
    `load_last_checkpoint` cannot read into the unsharded model the run builds."""
    for stage in stages:
        strategy = stage.trainer.get("strategy")
        target = strategy.get("_target_", "") if isinstance(strategy, dict) else str(strategy)
        if cfg.resume and target.endswith("ModelParallelStrategy"):
            raise ConfigError(
                f"`resume`=True: stage `{stage.name}` runs under `trainer.strategy`={target}, "
                "whose stage checkpoints are distributed checkpoints (folders) that resume cannot load; "
                "run from the start (resume=false); "
                "resume reads the checkpoints of runs under strategy 'ddp' or in one process"
            )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {
            key: value for name, child in node.items() for key, value in _flatten(child, f"{prefix}{name}.").items()
        }
    if isinstance(node, list) and node:
        return {
            key: value
            for index, child in enumerate(node)
            for key, value in _flatten(child, f"{prefix}{index}.").items()
        }
    return {prefix.rstrip("."): node}


def check_same_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Raise `ConfigError` naming the first key whose value differs from the checkpointed run's."""
    before, now = _flatten(saved), _flatten(current)
    for key in sorted(set(before) | set(now)):
        if before.get(key, "<absent>") != now.get(key, "<absent>"):
            raise ConfigError(
                f"`resume`=True: `{key}`={now.get(key, '<absent>')!r} differs from the interrupted run's "
                f"{before.get(key, '<absent>')!r} ({path}); "
                "resume with the same configuration, or start a new output_dir"
            )


def restore_module(module: pl.LightningModule, checkpoint: dict[str, Any], path: Path) -> None:
    """Load the checkpoint's weights (strict) and re-attach its masks."""
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"`resume`=True: the weights in {path} do not fit the model built from the config and shaped as "
            f"the finished stages left it (added parameters, compactions): {error}"
        ) from error
    load_masks(module, checkpoint[PAYLOAD_KEY]["masks"])


def replay_stages(
    finished: list[list[Callback]], module: pl.LightningModule, compactions: dict[int, dict[str, Any]]
) -> bool:
    """Give the freshly built `module` the shape the finished stages left it in, so that the last one's
    checkpoint loads: the parameters their callbacks added in `setup` (`StructuredPruning`: FLAP's
    compensation biases), and their compactions (`replay_compaction`), in stage order. The weights do not
    matter (the checkpoint's replace them). True when the shape changed."""
    before = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    for index, callbacks in enumerate(finished):
        for callback in callbacks:
            if isinstance(callback, StructuredPruning):
                callback.add_parameters(module)
        if index in compactions:
            replay_compaction(module, compactions[index])
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()} != before
