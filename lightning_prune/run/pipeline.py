"""`run(cfg)`: the plain-Python job behind `lightning-prune` — the only code that reads a config.

Phases: optional dense training (`dense_epochs`), evaluation, the pruning phase (a fit with the
`pruning`, `lora`, `callbacks.*` and `export` callbacks; with `evaluate_pruned`, a validation once
they acted at fit start), evaluation, then the per-stage metrics, report, plots and the finalized
model written into the output directory.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from lightning_prune.masking import finalize as finalize_masks
from lightning_prune.report import sparsity_report
from lightning_prune.run.checks import ConfigError, build, check_run_settings, check_types
from lightning_prune.run.outputs import (
    History,
    plot_layer_sparsity,
    plot_schedule,
    save_model,
    write_results,
    write_stages,
    write_text,
)

# Config groups whose entry is one callback of the pruning phase, in the order they run.
PHASE_CALLBACK_GROUPS = ("pruning", "lora")


def output_dir(cfg: DictConfig) -> Path:
    """`cfg.output_dir` (Hydra's run directory by default), else the current directory."""
    return Path(cfg.output_dir) if cfg.get("output_dir") else Path.cwd()


def _is_set(node: Any) -> bool:
    return isinstance(node, DictConfig) and "_target_" in node


def phase_callbacks(cfg: DictConfig) -> list[Callback]:
    """`pruning`, `lora`, every `callbacks.<name>`, then `export`: instantiated, all Lightning callbacks."""
    entries = [(key, cfg.get(key)) for key in PHASE_CALLBACK_GROUPS]
    entries += [(f"callbacks.{name}", node) for name, node in (cfg.get("callbacks") or {}).items()]
    entries.append(("export", cfg.get("export")))
    callbacks = []
    for key, node in entries:
        if not _is_set(node):
            if node and key.startswith("callbacks."):
                raise ConfigError(f"`{key}` needs a `_target_` (a Lightning Callback class), got {OmegaConf.to_container(node)!r}")
            continue
        callback = build(node, key)
        if not isinstance(callback, Callback):
            raise ConfigError(f"`{key}._target_`={node._target_!r} is not a Lightning Callback")
        callbacks.append(callback)
    return callbacks


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


def make_trainer(cfg: DictConfig, out: Path, phase: str, callbacks: list[Callback], **overrides: Any) -> pl.Trainer:
    """The configured Trainer with the phase's callbacks, loggers and (when enabled) rich progress bar."""
    callbacks = list(callbacks)
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(ProgressBar())
    return build(cfg.trainer, "trainer", callbacks=callbacks, logger=make_loggers(cfg, out, phase), **overrides)


def evaluate(trainer: pl.Trainer, module: pl.LightningModule, data: pl.LightningDataModule) -> dict[str, float]:
    """Validation metrics as plain floats."""
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    return {name: float(value) for name, value in metrics.items()}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment from a composed config; returns the results also saved as `results.json`."""
    check_run_settings(cfg)
    for key in ("trainer", "data", "model", *PHASE_CALLBACK_GROUPS, "callbacks", "export"):
        check_types(cfg.get(key), key)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    callbacks = phase_callbacks(cfg)  # cheap, and where most argument errors are: before data and model
    data = build(cfg.data, "data")
    module = build(cfg.model, "model")
    history = History(metric=getattr(module, "val_metric", "val/loss"))
    results: dict[str, Any] = {"output_dir": str(out), "metric": history.metric}

    steps = 0
    if cfg.dense_epochs > 0:
        dense = make_trainer(cfg, out, "dense", [history], max_epochs=cfg.dense_epochs)
        dense.fit(module, datamodule=data)
        steps = dense.global_step
    # evaluate_pruned: a full-length sanity check runs after every callback's `on_fit_start`
    # (one-shot pruning done, adapters attached) and before the first training step.
    overrides = {"num_sanity_val_steps": -1} if cfg.evaluate_pruned else {}
    trainer = make_trainer(cfg, out, "prune", [*callbacks, history], **overrides)
    if cfg.evaluate_before:
        results["before"] = evaluate(trainer, module, data)
    history.start_phase("prune", steps)
    trainer.fit(module, datamodule=data)
    if cfg.evaluate_pruned:
        results["pruned"] = history.metrics_at_start("prune")
    if cfg.evaluate_after:
        results["after"] = evaluate(trainer, module, data)
    for callback in callbacks:  # structured pruning: parameters and forward time before/after compaction
        if callable(getattr(callback, "results", None)):
            results.update(callback.results())
        elif getattr(callback, "compaction", None):
            results["compaction"] = dict(callback.compaction)
    write_stages(results, history.metric, out, plots=cfg.plots)
    results.update(write_outputs(cfg, out, module, data, history))
    write_results(results, out / "results.json")
    return results


def write_outputs(cfg: DictConfig, out: Path, module: pl.LightningModule, data: Any, history: History) -> dict[str, Any]:
    """Report (printed and saved), history, plots, and the finalized model; returns what to record."""
    report = sparsity_report(module)
    # Full layer names when writing to a file or pipe (rich would otherwise assume 80 columns).
    Console(width=None if sys.stdout.isatty() else 160).print(report)
    write_text(out / "sparsity_report.md", report.to_markdown())
    write_text(out / "sparsity_report.csv", report.to_csv())
    write_text(out / "history.csv", history.to_csv())
    recorded: dict[str, Any] = {"global_sparsity": report.global_sparsity, "layer_sparsity": report.as_dict()}
    if cfg.plots:
        plot_layer_sparsity(report, out / "plots" / "layer_sparsity.png")
        plot_schedule(history, out / "plots" / "sparsity_vs_metric.png")
    if cfg.finalize:
        finalize_masks(module)
    if cfg.save_model:
        network = getattr(module, "model", module)
        recorded["model_path"] = str(save_model(network, out / "model", getattr(data, "tokenizer", None)))
    return recorded
