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
from lightning_prune.report import SparsityReport, sparsity_report
from lightning_prune.run.checks import ConfigError, build, check_run_settings, check_types
from lightning_prune.run.outputs import (
    History,
    TrainStartSnapshot,
    plot_layer_sparsity,
    plot_schedule,
    save_model,
    write_results,
    write_stages,
    write_text,
)
from lightning_prune.run.pairing import check_vocabulary, use_model_tokenizer
from lightning_prune.run.record import RunRecord, check_final_sparsity, target_sparsity

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
    trainer: pl.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=make_loggers(cfg, out, phase), **overrides)
    return trainer


def evaluate(trainer: pl.Trainer, module: pl.LightningModule, data: pl.LightningDataModule) -> dict[str, float]:
    """Validation metrics as plain floats."""
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    return {name: float(value) for name, value in metrics.items()}


def evaluate_pruned(cfg: DictConfig, out: Path, snapshot: TrainStartSnapshot, trainer: pl.Trainer, module: pl.LightningModule, data: Any) -> dict[str, float]:
    """Validation metrics of the model as the pruning phase's training started (a plain Trainer,
    none of the phase's callbacks); with no training step at all, the model after the phase is that model."""
    if snapshot.module is None:
        if trainer.global_step > 0:
            raise RuntimeError("the pruning phase trained but its start was not recorded: `evaluate_pruned` has no model to validate")
        return evaluate(make_trainer(cfg, out, "pruned", []), module, data)
    return evaluate(make_trainer(cfg, out, "pruned", []), snapshot.module, data)


def preflight(callbacks: list[Callback], module: pl.LightningModule) -> None:
    """Every check a callback can make before training (`callback.preflight(module)`), before any phase trains."""
    for callback in callbacks:
        check = getattr(callback, "preflight", None)
        if callable(check):
            check(module)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment from a composed config; returns the results also saved as `results.json`.

    `results.json` is written even when a phase fails: `status` "failed", `failed_phase`, `error`,
    the warnings so far, and whatever report, history and plots exist; the error is then re-raised.
    """
    check_run_settings(cfg)
    for key in ("trainer", "data", "model", *PHASE_CALLBACK_GROUPS, "callbacks", "export"):
        check_types(cfg.get(key), key)
    use_model_tokenizer(cfg)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    record = RunRecord({"output_dir": str(out), "status": "running"})
    parts: dict[str, Any] = {"callbacks": []}
    with record.capture():
        try:
            run_phases(cfg, out, record, parts)
        except Exception as error:
            record.fail(error)
            record.collect_warnings(parts["callbacks"])
            write_partial_outputs(cfg, out, record.results, parts)
            raise
    return record.results


def run_phases(cfg: DictConfig, out: Path, record: RunRecord, parts: dict[str, Any]) -> None:
    """Setup and preflight, the dense phase, the pruning phase with its evaluations, then the outputs."""
    results = record.results
    callbacks = parts["callbacks"] = phase_callbacks(cfg)  # cheap, and where most argument errors are: before data and model
    data = parts["data"] = build(cfg.data, "data")
    module = parts["module"] = build(cfg.model, "model")
    check_vocabulary(data, module)
    history = parts["history"] = History(metric=getattr(module, "val_metric", "val/loss"))
    results["metric"] = history.metric
    record.phase = "preflight"
    preflight(callbacks, module)
    # evaluate_pruned: the model as training starts (every callback's `on_fit_start` acted) is
    # copied, and validated once the phase is over.
    snapshot = TrainStartSnapshot()
    extra: list[Callback] = [snapshot] if cfg.evaluate_pruned else []
    trainer = make_trainer(cfg, out, "prune", [*callbacks, history, *extra])  # built before the dense phase trains
    steps = 0
    if cfg.dense_epochs > 0:
        record.phase = "dense"
        dense = make_trainer(cfg, out, "dense", [history], max_epochs=cfg.dense_epochs)
        dense.fit(module, datamodule=data)
        steps = dense.global_step
    if cfg.evaluate_before:
        record.phase = "evaluate_before"
        results["before"] = evaluate(trainer, module, data)
    record.phase = "prune"
    history.start_phase("prune", steps)
    trainer.fit(module, datamodule=data)
    if cfg.evaluate_pruned:
        record.phase = "evaluate_pruned"
        results["pruned"] = evaluate_pruned(cfg, out, snapshot, trainer, module, data)
    if cfg.evaluate_after:
        record.phase = "evaluate_after"
        results["after"] = evaluate(trainer, module, data)
    for callback in callbacks:  # structured pruning: parameters and forward time before/after compaction
        callback_results, compaction = getattr(callback, "results", None), getattr(callback, "compaction", None)
        if callable(callback_results):
            results.update(callback_results())
        elif compaction:
            results["compaction"] = dict(compaction)
    record.phase = "outputs"
    write_stages(results, history.metric, out, plots=cfg.plots)
    results.update(write_outputs(cfg, out, module, data, history, callbacks))
    record.collect_warnings(callbacks)
    sparsity_warning = check_final_sparsity(results["target_sparsity"], results["global_sparsity"])
    if sparsity_warning is not None:
        results["warnings"].append(sparsity_warning)
    results["status"] = "completed"
    write_results(results, out / "results.json")


def write_partial_outputs(cfg: DictConfig, out: Path, results: dict[str, Any], parts: dict[str, Any]) -> None:
    """After a failure: `results.json` first, then the report, history and plots of what was built."""
    write_results(results, out / "results.json")
    module, history = parts.get("module"), parts.get("history")
    if module is None or history is None:
        return
    report = sparsity_report(module)
    write_report(out, report, history, plots=cfg.plots)
    write_stages(results, history.metric, out, plots=cfg.plots)
    results.update(sparsity_results(report, parts["callbacks"]))
    write_results(results, out / "results.json")


def sparsity_results(report: SparsityReport, callbacks: list[Callback]) -> dict[str, Any]:
    """The achieved sparsity (global and per layer) and the target the callbacks were asked for."""
    return {"global_sparsity": report.global_sparsity, "target_sparsity": target_sparsity(callbacks), "layer_sparsity": report.as_dict()}


def write_report(out: Path, report: SparsityReport, history: History, plots: bool) -> None:
    """`sparsity_report.md/.csv`, `history.csv` and (with `plots`) the layer and schedule plots."""
    write_text(out / "sparsity_report.md", report.to_markdown())
    write_text(out / "sparsity_report.csv", report.to_csv())
    write_text(out / "history.csv", history.to_csv())
    if plots:
        plot_layer_sparsity(report, out / "plots" / "layer_sparsity.png")
        plot_schedule(history, out / "plots" / "sparsity_vs_metric.png")


def write_outputs(cfg: DictConfig, out: Path, module: pl.LightningModule, data: Any, history: History, callbacks: list[Callback]) -> dict[str, Any]:
    """Report (printed and saved), history, plots, and the finalized model; returns what to record."""
    report = sparsity_report(module)
    # Full layer names when writing to a file or pipe (rich would otherwise assume 80 columns).
    Console(width=None if sys.stdout.isatty() else 160).print(report)
    write_report(out, report, history, plots=cfg.plots)
    recorded = sparsity_results(report, callbacks)
    if cfg.finalize:
        finalize_masks(module)
    if cfg.save_model:
        network = getattr(module, "model", module)
        recorded["model_path"] = str(save_model(network, out / "model", getattr(data, "tokenizer", None)))
    return recorded
