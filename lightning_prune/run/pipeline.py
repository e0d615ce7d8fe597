"""`run(cfg)`: the plain-Python job behind `lightning-prune` — the only code that reads a config.

The run is the config's `stages:` in order (run/stages.py), each a `Trainer.fit` with its own
callbacks and Trainer settings; the default list is an optional `dense` stage (`dense_epochs`) and a
`prune` stage with the `pruning`, `lora`, `callbacks.*` and `export` callbacks. Before the first
stage with callbacks the model is validated (`evaluate_before`); each stage is validated after it
(`evaluate`) and, with `evaluate_start`, once its callbacks acted at fit start. Each finished stage
leaves a checkpoint; `resume=true` continues after the last one (run/resume.py). Then the per-stage
metrics, report, plots and the finalized model are written into the output directory (run/finish.py).
With `lm_eval=harness`, lm-evaluation-harness tasks score the model in memory after the last stage
(and, with `lm_eval.before`, before the first stage with callbacks); lm-eval and its tasks are
checked at start-up, before data and model are built (run/harness.py).
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from lightning_prune.callbacks.base import MaskingCallback
from lightning_prune.run.checks import build, check_run_settings, check_types
from lightning_prune.run.dense_teacher import DenseTeacher
from lightning_prune.run.directory import earlier_run, make_output_dir, note_untouched
from lightning_prune.run.finish import finish, write_partial_outputs
from lightning_prune.run.harness import check_harness, harness_settings, preflight_harness, score
from lightning_prune.run.outputs import History, TrainStartSnapshot, write_text
from lightning_prune.run.pairing import check_vocabulary, use_model_tokenizer
from lightning_prune.run.record import RunRecord
from lightning_prune.run.resume import (
    StageState,
    check_resumable,
    checkpoint_path,
    load_last_checkpoint,
    replay_stages,
    restore_module,
    resume_overrides,
    run_config,
    save_stage_checkpoint,
)
from lightning_prune.run.stages import GROUPS, Stage, build_callbacks, parse_stages
from lightning_prune.run.state import RunParts
from lightning_prune.run.trainers import evaluate, evaluate_start, make_trainer, preflight


def output_dir(cfg: DictConfig) -> Path:
    """`cfg.output_dir` (Hydra's run directory by default), else the current directory."""
    return Path(cfg.output_dir) if cfg.get("output_dir") else Path.cwd()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment from a composed config; returns the results also saved as `results.json`.

    `results.json` is written even when a stage fails: `status` "failed", `failed_phase` (the
    stage's name, or setup, preflight, evaluate_before, lm_eval_before, evaluate_after, lm_eval_after,
    outputs), `error`, the
    warnings so far, and whatever report, history and plots exist; the error is then re-raised.
    An interrupted run (Ctrl-C, SIGTERM) writes the same with `status` "interrupted",
    `interrupted_phase`, `interrupted_by` and, once a stage left its checkpoint, `resume` (the
    overrides that continue it, also printed), then re-raises the KeyboardInterrupt or SystemExit.
    In a directory that holds an earlier run, nothing is written until the first stage starts: a
    run refused before it (a `resume` whose config differs, a failed preflight) leaves it as it was.
    """
    check_run_settings(cfg)
    for key in ("trainer", "data", "model", *GROUPS):
        check_types(cfg.get(key), key)
    stages = parse_stages(cfg)
    harness = harness_settings(cfg)
    check_resumable(cfg, stages)
    check_harness(harness, stages)  # lm-eval installed, its tasks known: before data and model are built
    use_model_tokenizer(cfg)
    out = output_dir(cfg)
    make_output_dir(out)
    earlier = earlier_run(out)
    parts = RunParts(harness=harness)
    if earlier is None:
        start_writing(cfg, out, parts)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    record = RunRecord({"output_dir": str(out), "status": "running"})
    with record.capture():
        try:
            run_stages(cfg, stages, out, record, parts)
        except (Exception, KeyboardInterrupt, SystemExit) as error:
            # Ctrl-C reaches here as KeyboardInterrupt, or as the SystemExit Lightning's graceful shutdown
            # ends with (SIGTERMException, a SystemExit, for SIGTERM).
            if earlier is not None and not parts.writing:
                note_untouched(error, out, earlier)
                raise
            if isinstance(error, Exception):
                record.fail(error)
            else:
                record.interrupt(error, resume_overrides(out, record.results))
            record.collect_warnings(parts.callbacks)
            write_partial_outputs(cfg, out, record.results, parts)
            if "resume" in record.results:
                print(f"interrupted in {record.phase}; to continue: {record.results['resume']}", file=sys.stderr)
            raise
    return record.results


def start_writing(cfg: DictConfig, out: Path, parts: RunParts) -> None:
    """From here on the run writes into `out` (results.json too when it fails): its config first."""
    write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    parts.writing = True


def run_stages(cfg: DictConfig, stages: list[Stage], out: Path, record: RunRecord, parts: RunParts) -> None:
    """Setup and preflight of every stage, the stages (after the last finished one with `resume`), then the outputs."""
    results = record.results
    # Cheap, and where most argument errors are: before data and model.
    built = [build_callbacks(cfg, stage) for stage in stages]
    # The last stage's target first.
    parts.ordered = [callback for callbacks in reversed(built) for callback in callbacks]
    data = parts.data = build(cfg.data, "data")
    module = parts.module = build(cfg.model, "model")
    check_vocabulary(data, module)
    history = parts.history = History(metric=getattr(module, "val_metric", "val/loss"))
    results["metric"] = history.metric
    results["stages"] = []
    record.phase = "preflight"
    # Every stage's Trainer is built before any stage trains (its settings are checked there).
    states = [StageState(keep_masks=not any(isinstance(c, MaskingCallback) for c in callbacks)) for callbacks in built]
    snapshots = [TrainStartSnapshot() if stage.evaluate_start else None for stage in stages]
    trainers = [
        make_trainer(
            cfg, out, stage.name, [*callbacks, history, state, *([snapshot] if snapshot else [])], stage.trainer
        )
        for stage, callbacks, state, snapshot in zip(stages, built, states, snapshots)
    ]
    nodes = [[(key, OmegaConf.select(cfg, key)) for key in stage.callback_keys] for stage in stages]
    preflight(built, module, trainers, nodes)
    preflight_harness(parts.harness, module, data)
    dense = DenseTeacher(built)
    source = dense.source_stage(stages)
    dense_path = None if source is None else checkpoint_path(out, source)
    as_built = (
        {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        if cfg.resume and dense.needed and source is None
        else None
    )
    start, changed = resume(cfg, stages, out, record, module, history, built) if cfg.resume else (0, False)
    # None: no later stage distills from the dense model.
    dense_state = dense_path if dense_path is not None else as_built
    if dense_state is not None and dense.first_pruning is not None and start > dense.first_pruning:
        # A model the finished stages changed in shape (FLAP's biases, compaction): the dense one built anew.
        dense.rebuild(build(cfg.model, "model") if changed else module, start, dense_state)
    parts.keep_checkpoint = dense_path
    if not parts.writing:  # an earlier run's directory: its files change from the first stage on
        start_writing(cfg, out, parts)
    for stage in stages[start:]:
        parts.callbacks = built[stage.index]
        if stage.index == dense.first_pruning:
            dense.take(module, start)  # the dense student, for later stages' distillation (no copy when none needs it)
        run_stage(cfg, out, record, parts, stage, trainers[stage.index], states[stage.index], snapshots[stage.index])
    finish(cfg, out, record, parts, stages, built, trainers)


def resume(
    cfg: DictConfig,
    stages: list[Stage],
    out: Path,
    record: RunRecord,
    module: pl.LightningModule,
    history: History,
    built: list[list[pl.Callback]],
) -> tuple[int, bool]:
    """Restore the model (shaped as its finished stages left it: `replay_stages`), masks, history, results and
    warnings of the last finished stage; returns the next stage's index and whether the model's shape changed."""
    found = load_last_checkpoint(out, stages, cfg)
    if found is None:
        warnings.warn(
            f"`resume`=True but {out / 'checkpoints'} holds no finished stage of this run: every stage runs",
            UserWarning,
            stacklevel=2,
        )
        record.results["resumed_after"] = None
        return 0, False
    stage, checkpoint = found
    progress = checkpoint["lightning_prune_stage"]
    record.compactions = dict(progress.get("compactions", {}))
    changed = replay_stages(built[: stage.index + 1], module, record.compactions)
    restore_module(module, checkpoint, checkpoint_path(out, stage))
    history.load_state_dict(checkpoint["callbacks"][history.state_key])
    record.results.update(progress["results"])
    record.carried = list(progress["warnings"])
    record.results["resumed_after"] = stage.name
    return stage.index + 1, changed


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
    """One stage: (the dense baseline before the first stage with callbacks), the fit, its evaluations,
    its checkpoint."""
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
    harness = parts.harness
    if harness is not None and harness.before and callbacks and "before" not in results.get("lm_eval", {}):
        record.phase = "lm_eval_before"
        results.setdefault("lm_eval", {}).update(before=score(harness, module, data, trainer), before_stage=stage.name)
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
        if isinstance(callback, MaskingCallback) and callback.compacted:  # what a resume replays
            record.compactions[stage.index] = callback.compacted
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
        "compactions": dict(record.compactions),
    }
    save_stage_checkpoint(trainer, path, keep_earlier=cfg.stage_checkpoints == "all", keep=parts.keep_checkpoint)
