"""Each stage's Trainer (its callbacks, loggers and progress bar) and the validations a run makes."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from lightning_prune.run.checks import ConfigError, build, config_error
from lightning_prune.run.outputs import TrainStartSnapshot
from lightning_prune.run.stages import Stage


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar without the logger version (`v_num`: the phase name here)."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def make_loggers(cfg: DictConfig, out: Path, phase: str) -> list[Logger]:
    """CSV metrics under `logs/<phase>/` (and TensorBoard events when installed and enabled)."""
    loggers: list[Logger] = [CSVLogger(out, name="logs", version=phase)]
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(out, name="logs", version=phase, default_hp_metric=False))
    return loggers


def make_trainer(
    cfg: DictConfig, out: Path, phase: str, callbacks: list[Callback], settings: dict[str, Any] | None = None
) -> pl.Trainer:
    """The configured Trainer (or the stage's `settings`) with the phase's callbacks, loggers and
    (when enabled) rich progress bar."""
    node = cfg.trainer if settings is None else OmegaConf.create(settings)
    callbacks = list(callbacks)
    if node.get("enable_progress_bar", True):
        callbacks.append(ProgressBar())
    trainer: pl.Trainer = build(node, "trainer", callbacks=callbacks, logger=make_loggers(cfg, out, phase))
    return trainer


def evaluate(trainer: pl.Trainer, module: pl.LightningModule, data: pl.LightningDataModule) -> dict[str, float]:
    """Validation metrics as plain floats."""
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    return {name: float(value) for name, value in metrics.items()}


def evaluate_start(
    cfg: DictConfig,
    out: Path,
    stage: Stage,
    snapshot: TrainStartSnapshot,
    trainer: pl.Trainer,
    module: pl.LightningModule,
    data: Any,
) -> dict[str, float]:
    """Validation metrics of the model as the stage's training started (a plain Trainer, none of the
    stage's callbacks); with no training step at all, the model after the stage is that model."""
    plain = make_trainer(cfg, out, f"{stage.name}-start", [], stage.trainer)
    if snapshot.module is None:
        if trainer.global_step > 0:
            raise RuntimeError(
                f"stage `{stage.name}` trained but its start was not recorded: "
                "`evaluate_start` has no model to validate"
            )
        return evaluate(plain, module, data)
    return evaluate(plain, snapshot.module, data)


def preflight(
    built: list[list[Callback]],
    module: pl.LightningModule,
    trainers: list[pl.Trainer],
    nodes: list[list[tuple[str, DictConfig]]] | None = None,
) -> None:
    """Every check a callback can make before training, for every stage before any stage trains:
    `callback.preflight(module)`, given the stage's Trainer where it takes a `trainer` and, where it
    takes `callbacks`, its stage's callbacks (and `earlier`, those of the stages before, whose masks
    the model carries). With `nodes` (each callback's config key and node), a ValueError becomes a
    ConfigError naming the key (`export.dirpath`, not the callback's `dirpath`)."""
    earlier: list[Callback] = []
    for index, (callbacks, trainer) in enumerate(zip(built, trainers, strict=True)):
        for position, callback in enumerate(callbacks):
            check = getattr(callback, "preflight", None)
            if not callable(check):
                continue
            accepts = inspect.signature(check).parameters
            given = {"trainer": trainer, "callbacks": callbacks, "earlier": list(earlier)}
            try:
                check(module, **{name: value for name, value in given.items() if name in accepts})
            except ValueError as error:
                if nodes is None or isinstance(error, ConfigError):
                    raise
                raise config_error(nodes[index][position][1], nodes[index][position][0], error) from error
        earlier.extend(callbacks)
