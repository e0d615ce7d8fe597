"""The end of a run: `after`, the sparsity report, plots, the finalized model and `results.json` —
or, after a failure, the partial outputs of what was built."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from rich.console import Console
from torch import nn

from lightning_prune.callbacks.base import MaskingCallback
from lightning_prune.masking import finalize as finalize_masks
from lightning_prune.report import SparsityReport, sparsity_report
from lightning_prune.run.harness import score
from lightning_prune.run.outputs import (
    History,
    plot_layer_sparsity,
    plot_schedule,
    save_model,
    write_results,
    write_stages,
    write_text,
)
from lightning_prune.run.record import RunRecord, check_final_sparsity, target_sparsity
from lightning_prune.run.stages import Stage
from lightning_prune.run.state import RunParts
from lightning_prune.run.structured import plot_parameters, structured_console, structured_markdown
from lightning_prune.run.trainers import evaluate


def finish(
    cfg: DictConfig,
    out: Path,
    record: RunRecord,
    parts: RunParts,
    stages: list[Stage],
    built: list[list[Callback]],
    trainers: list[pl.Trainer],
) -> None:
    """`after` (the last stage's metrics, or a validation) and the lm-eval scores, then the report, plots,
    model and results."""
    (module, data, history), results = parts.built(), record.results
    parts.callbacks = []
    ran = [entry for entry in results["stages"] if entry["status"] == "completed"]
    last = trainers[[stage.name for stage in stages].index(ran[-1]["name"])] if ran else None
    if cfg.evaluate_after and last is not None:
        record.phase = "evaluate_after"
        results["after"] = ran[-1]["metrics"] if "metrics" in ran[-1] else evaluate(last, module, data)
    if parts.harness is not None and last is not None:
        record.phase = "lm_eval_after"
        results.setdefault("lm_eval", {})["after"] = score(parts.harness, module, data, last)
    record.phase = "outputs"
    write_stages(results, history.metric, out, plots=cfg.plots)
    results.update(write_outputs(cfg, out, module, data, history, parts.ordered, results))
    record.collect_warnings([])
    target, key = final_target(stages, built)
    sparsity_warning = check_final_sparsity(target, results["global_sparsity"], key)
    if sparsity_warning is not None:
        results["warnings"].append(sparsity_warning)
    results["status"] = "completed"
    write_results(results, out / "results.json")


def run_summary(results: Mapping[str, Any]) -> str:
    """What the console says at the end of a run: where it was written, each metric before → after
    (the run's metric first; "-" where it was not evaluated), the sparsity reached and its target,
    the model's path, the stage a resumed run continued after, and how many warnings were recorded."""
    before, after = results.get("before") or {}, results.get("after") or {}
    metric = results.get("metric")
    names = [name for name in [metric, *sorted({*before, *after} - {metric})] if name in before or name in after]
    lines = [f"lightning-prune: run written to {results['output_dir']} (results.json, sparsity_report.md)"]
    lines += [f"  {name}: {_number(before.get(name))} → {_number(after.get(name))}" for name in names]
    if "global_sparsity" in results:
        target = results.get("target_sparsity")
        aimed = "" if target is None else f" (target {target:.2%})"
        lines.append(f"  sparsity: {results['global_sparsity']:.2%}{aimed}")
    if results.get("model_path"):
        lines.append(f"  model: {results['model_path']}")
    if results.get("resumed_after"):
        lines.append(f"  resumed after stage {results['resumed_after']!r}")
    if results.get("warnings"):
        lines.append(f"  {len(results['warnings'])} warning(s): see `warnings` in results.json")
    return "\n".join(lines)


def _number(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


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
    report = sparsity_report(module, patterns=enforced_patterns(parts.ordered, module))
    write_report(out, report, history, plots=cfg.plots, results=results)
    write_stages(results, history.metric, out, plots=cfg.plots)
    results.update(sparsity_results(report, parts.ordered))
    write_results(results, out / "results.json")


def sparsity_results(report: SparsityReport, callbacks: list[Callback]) -> dict[str, Any]:
    """The achieved sparsity (global and per layer), each layer's pattern label and the target the
    callbacks were asked for."""
    return {
        "global_sparsity": report.global_sparsity,
        "target_sparsity": target_sparsity(callbacks),
        "layer_sparsity": report.as_dict(),
        "layer_pattern": {layer.name: layer.pattern for layer in report.layers},
    }


def enforced_patterns(callbacks: Sequence[Callback], model: nn.Module) -> dict[str, str | None]:
    """{weight name: the N:M pattern its pruning callback enforced, None for unstructured} for the
    report's pattern column. `callbacks` come last stage first (`RunParts.ordered`): the first that
    prunes a weight names its pattern. Targets are resolved on `model` from the callbacks' settings,
    so a resumed run labels as the uninterrupted one; structured pruning, and a callback whose
    targets no longer resolve, leave their weights labelled by their zeros alone."""
    patterns: dict[str, str | None] = {}
    for callback in callbacks:
        if not isinstance(callback, MaskingCallback) or callback.prunes_units:
            continue
        try:
            targets = callback.resolve_targets(model)
        except ValueError:
            continue
        for target in targets:
            patterns.setdefault(target.name, callback.pattern)
    return patterns


def write_report(
    out: Path, report: SparsityReport, history: History, plots: bool, results: dict[str, Any] | None = None
) -> None:
    """`sparsity_report.md/.csv`, `history.csv` and (with `plots`) the layer and schedule plots; after
    structured pruning (`results["structured"]`) the report's structured section and the parameters plot,
    which replaces the layer sparsity plot when no layer holds a zero (a compacted model)."""
    structured, compaction = _structured(results)
    section = "\n" + structured_markdown(structured, compaction) if structured else ""
    write_text(out / "sparsity_report.md", report.to_markdown() + section)
    write_text(out / "sparsity_report.csv", report.to_csv())
    write_text(out / "history.csv", history.to_csv())
    if plots:
        if not structured or report.global_sparsity > 0:
            plot_layer_sparsity(report, out / "plots" / "layer_sparsity.png")
        if structured:
            plot_parameters(structured, out / "plots" / "structured_parameters.png")
        plot_schedule(history, out / "plots" / "sparsity_vs_metric.png")


def _structured(results: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """`results`' structured report and compaction record ({} each when there are none)."""
    results = results or {}
    return dict(results.get("structured") or {}), dict(results.get("compaction") or {})


def write_outputs(
    cfg: DictConfig,
    out: Path,
    module: pl.LightningModule,
    data: Any,
    history: History,
    callbacks: list[Callback],
    results: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Report (printed and saved; with `results`' structured pruning, its units and parameters too),
    history, plots, and the finalized model; returns what to record."""
    report = sparsity_report(module, patterns=enforced_patterns(callbacks, module))
    # Full layer names when writing to a file or pipe (rich would otherwise assume 80 columns).
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(report)
    structured, compaction = _structured(results)
    for item in structured_console(structured, compaction) if structured else []:
        console.print(item)
    write_report(out, report, history, plots=cfg.plots, results=results)
    recorded = sparsity_results(report, callbacks)
    if cfg.finalize:
        finalize_masks(module)
    if cfg.save_model:
        network = getattr(module, "model", module)
        recorded["model_path"] = str(save_model(network, out / "model", getattr(data, "tokenizer", None)))
    return recorded
