"""`run(cfg)`: the plain-Python job behind `lightning-prune` — the only code that reads a config.

The run is the config's `stages:` in order (run/stages.py), each a `Trainer.fit` with its own
callbacks and Trainer settings; the default list is an optional `dense` stage (`dense_epochs`) and a
`prune` stage with the `pruning`, `lora`, `callbacks.*` and `export` callbacks. Before the first
stage with callbacks the model is validated (`evaluate_before`); each stage is validated after it
(`evaluate`) and, with `evaluate_start`, once its callbacks acted at fit start. Each finished stage
leaves a checkpoint; `resume=true` continues after the last one (run/resume.py). Then the per-stage
metrics, report, plots and the finalized model are written into the output directory.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from lightning_prune.callbacks.base import MaskingCallback
from lightning_prune.masking import finalize as finalize_masks
from lightning_prune.report import SparsityReport, sparsity_report
from lightning_prune.run.checks import build, check_run_settings, check_types
from lightning_prune.run.dense_teacher import DenseTeacher
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
from lightning_prune.run.resume import (
    StageState,
    check_resumable,
    checkpoint_path,
    load_last_checkpoint,
    restore_module,
    run_config,
    save_stage_checkpoint,
)
from lightning_prune.run.stages import GROUPS, Stage, build_callbacks, parse_stages
from lightning_prune.run.state import RunParts


def output_dir(cfg: DictConfig) -> Path:
    """`cfg.output_dir` (Hydra's run directory by default), else the current directory."""
    return Path(cfg.output_dir) if cfg.get("output_dir") else Path.cwd()


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
                f"stage `{stage.name}` trained but its start was not recorded: `evaluate_start` has no model to validate"
            )
        return evaluate(plain, module, data)
    return evaluate(plain, snapshot.module, data)


def preflight(callbacks: list[Callback], module: pl.LightningModule) -> None:
    """Every check a callback can make before training (`callback.preflight(module)`), before any phase trains."""
    for callback in callbacks:
        check = getattr(callback, "preflight", None)
        if callable(check):
            check(module)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment from a composed config; returns the results also saved as `results.json`.

    `results.json` is written even when a stage fails: `status` "failed", `failed_phase` (the
    stage's name, or setup, preflight, evaluate_before, evaluate_after, outputs), `error`, the
    warnings so far, and whatever report, history and plots exist; the error is then re-raised.
    """
    check_run_settings(cfg)
    for key in ("trainer", "data", "model", *GROUPS):
        check_types(cfg.get(key), key)
    stages = parse_stages(cfg)
    check_resumable(cfg, stages)
    use_model_tokenizer(cfg)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    record = RunRecord({"output_dir": str(out), "status": "running"})
    parts = RunParts()
    with record.capture():
        try:
            run_stages(cfg, stages, out, record, parts)
        except Exception as error:
            record.fail(error)
            record.collect_warnings(parts.callbacks)
            write_partial_outputs(cfg, out, record.results, parts)
            raise
    return record.results


def run_stages(cfg: DictConfig, stages: list[Stage], out: Path, record: RunRecord, parts: RunParts) -> None:
    """Setup and preflight of every stage, the stages (after the last finished one with `resume`), then the outputs."""
    results = record.results
    built = [
        build_callbacks(cfg, stage) for stage in stages
    ]  # cheap, and where most argument errors are: before data and model
    parts.ordered = [
        callback for callbacks in reversed(built) for callback in callbacks
    ]  # the last stage's target first
    data = parts.data = build(cfg.data, "data")
    module = parts.module = build(cfg.model, "model")
    check_vocabulary(data, module)
    history = parts.history = History(metric=getattr(module, "val_metric", "val/loss"))
    results["metric"] = history.metric
    results["stages"] = []
    record.phase = "preflight"
    preflight([callback for callbacks in built for callback in callbacks], module)
    dense = DenseTeacher(built)
    source = dense.source_stage(stages)
    dense_path = None if source is None else checkpoint_path(out, source)
    as_built = (
        {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        if cfg.resume and dense.needed and source is None
        else None
    )
    start = resume(cfg, stages, out, record, module, history) if cfg.resume else 0
    dense_state = (
        dense_path if dense_path is not None else as_built
    )  # None: no later stage distills from the dense model
    if dense_state is not None and dense.first_pruning is not None and start > dense.first_pruning:
        dense.rebuild(module, start, dense_state)
    parts.keep_checkpoint = dense_path
    # Every stage's Trainer is built before any stage trains (its settings are checked there).
    states = [StageState(keep_masks=not any(isinstance(c, MaskingCallback) for c in callbacks)) for callbacks in built]
    snapshots = [TrainStartSnapshot() if stage.evaluate_start else None for stage in stages]
    trainers = [
        make_trainer(
            cfg, out, stage.name, [*callbacks, history, state, *([snapshot] if snapshot else [])], stage.trainer
        )
        for stage, callbacks, state, snapshot in zip(stages, built, states, snapshots)
    ]
    for stage in stages[start:]:
        parts.callbacks = built[stage.index]
        if stage.index == dense.first_pruning:
            dense.take(module, start)  # the dense student, for later stages' distillation (no copy when none needs it)
        run_stage(cfg, out, record, parts, stage, trainers[stage.index], states[stage.index], snapshots[stage.index])
    finish(cfg, out, record, parts, stages, built, trainers)


def resume(
    cfg: DictConfig, stages: list[Stage], out: Path, record: RunRecord, module: pl.LightningModule, history: History
) -> int:
    """Restore the model, masks, history, results and warnings of the last finished stage; returns the next stage's index."""
    found = load_last_checkpoint(out, stages, cfg)
    if found is None:
        warnings.warn(
            f"`resume`=True but {out / 'checkpoints'} holds no finished stage of this run: every stage runs",
            UserWarning,
            stacklevel=2,
        )
        record.results["resumed_after"] = None
        return 0
    stage, checkpoint = found
    restore_module(module, checkpoint, checkpoint_path(out, stage))
    history.load_state_dict(checkpoint["callbacks"][history.state_key])
    progress = checkpoint["lightning_prune_stage"]
    record.results.update(progress["results"])
    record.carried = list(progress["warnings"])
    record.results["resumed_after"] = stage.name
    return stage.index + 1


def run_stage(
    cfg: DictConfig,
    out: Path,
    record: RunRecord,
    parts: RunParts,
    stage: Stage,
    trainer: pl.Trainer,
    state: StageState,
    snapshot: TrainStartSnapshot | None,
) -> None:
    """One stage: (the dense baseline before the first stage with callbacks), the fit, its evaluations, its checkpoint."""
    (module, data, history), results, callbacks = parts.built(), record.results, parts.callbacks
    entry: dict[str, Any] = {
        "name": stage.name,
        "status": "skipped",
        "callbacks": [type(c).__name__ for c in callbacks],
    }
    if stage.is_empty:
        results["stages"].append(entry)
        return
    if cfg.evaluate_before and callbacks and "before" not in results:
        record.phase = "evaluate_before"
        ran = [e for e in results["stages"] if e["status"] == "completed"]
        results["before"] = (
            ran[-1]["metrics"]
            if ran and "metrics" in ran[-1]
            else entry.setdefault("before_metrics", evaluate(trainer, module, data))
        )
    record.phase = stage.name
    history.start_phase(stage.name, sum(e.get("steps", 0) for e in results["stages"]))
    pl.seed_everything(cfg.seed + stage.index, workers=True, verbose=False)  # a resumed stage draws the same numbers
    trainer.fit(module, datamodule=data)
    entry.update(status="completed", steps=trainer.global_step)
    if snapshot is not None:
        entry["start_metrics"] = evaluate_start(cfg, out, stage, snapshot, trainer, module, data)
        snapshot.module = None
        results.setdefault("pruned", entry["start_metrics"])
    if stage.evaluate:
        entry["metrics"] = evaluate(trainer, module, data)
    for callback in callbacks:  # structured pruning: parameters and forward time before/after compaction
        callback_results, compaction = getattr(callback, "results", None), getattr(callback, "compaction", None)
        if callable(callback_results):
            results.update(callback_results())
        elif compaction:
            results["compaction"] = dict(compaction)
    path = checkpoint_path(out, stage)
    entry["checkpoint"] = str(path.relative_to(out))
    results["stages"].append(entry)
    state.progress = {
        "stage": stage.name,
        "config": run_config(cfg),
        "results": copy.deepcopy(results),
        "warnings": record.close_stage(callbacks),
    }
    save_stage_checkpoint(trainer, path, keep_earlier=cfg.stage_checkpoints == "all", keep=parts.keep_checkpoint)


def finish(
    cfg: DictConfig,
    out: Path,
    record: RunRecord,
    parts: RunParts,
    stages: list[Stage],
    built: list[list[Callback]],
    trainers: list[pl.Trainer],
) -> None:
    """`after` (the last stage's metrics, or a validation), then the report, plots, model and results."""
    (module, data, history), results = parts.built(), record.results
    parts.callbacks = []
    ran = [entry for entry in results["stages"] if entry["status"] == "completed"]
    if cfg.evaluate_after and ran:
        record.phase = "evaluate_after"
        last = trainers[[stage.name for stage in stages].index(ran[-1]["name"])]
        results["after"] = ran[-1]["metrics"] if "metrics" in ran[-1] else evaluate(last, module, data)
    record.phase = "outputs"
    write_stages(results, history.metric, out, plots=cfg.plots)
    results.update(write_outputs(cfg, out, module, data, history, parts.ordered))
    record.collect_warnings([])
    target, key = final_target(stages, built)
    sparsity_warning = check_final_sparsity(target, results["global_sparsity"], key)
    if sparsity_warning is not None:
        results["warnings"].append(sparsity_warning)
    results["status"] = "completed"
    write_results(results, out / "results.json")


def final_target(stages: list[Stage], built: list[list[Callback]]) -> tuple[float | None, str]:
    """The weight sparsity the last stage that sets one asked for, and its config key."""
    for stage, callbacks in zip(reversed(stages), reversed(built)):
        for key, callback in zip(stage.callback_keys, callbacks):
            value = target_sparsity([callback])
            if value is not None:
                return value, f"{key}.sparsity"
    return None, "pruning.sparsity"


def write_partial_outputs(cfg: DictConfig, out: Path, results: dict[str, Any], parts: RunParts) -> None:
    """After a failure: `results.json` first, then the report, history and plots of what was built."""
    write_results(results, out / "results.json")
    module, history = parts.module, parts.history
    if module is None or history is None:
        return
    report = sparsity_report(module)
    write_report(out, report, history, plots=cfg.plots)
    write_stages(results, history.metric, out, plots=cfg.plots)
    results.update(sparsity_results(report, parts.ordered))
    write_results(results, out / "results.json")


def sparsity_results(report: SparsityReport, callbacks: list[Callback]) -> dict[str, Any]:
    """The achieved sparsity (global and per layer) and the target the callbacks were asked for."""
    return {
        "global_sparsity": report.global_sparsity,
        "target_sparsity": target_sparsity(callbacks),
        "layer_sparsity": report.as_dict(),
    }


def write_report(out: Path, report: SparsityReport, history: History, plots: bool) -> None:
    """`sparsity_report.md/.csv`, `history.csv` and (with `plots`) the layer and schedule plots."""
    write_text(out / "sparsity_report.md", report.to_markdown())
    write_text(out / "sparsity_report.csv", report.to_csv())
    write_text(out / "history.csv", history.to_csv())
    if plots:
        plot_layer_sparsity(report, out / "plots" / "layer_sparsity.png")
        plot_schedule(history, out / "plots" / "sparsity_vs_metric.png")


def write_outputs(
    cfg: DictConfig, out: Path, module: pl.LightningModule, data: Any, history: History, callbacks: list[Callback]
) -> dict[str, Any]:
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
