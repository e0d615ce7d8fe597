"""What a run writes into its output directory: history, report, plots, results and the model.

All writes are atomic (a temporary file, then a rename) so an interrupted run leaves no half file.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from lightning_prune.evaluate.harness import flat_metrics
from lightning_prune.report import SparsityReport

SPARSITY_KEY = "prune/sparsity"


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (same-directory temporary file, then `os.replace`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


class History(Callback):
    """Records the logged `prune/sparsity` after every training batch and the validation metric
    after every validation, on one step axis across the run's stages (kept in stage checkpoints)."""

    def __init__(self, metric: str = "val/loss") -> None:
        self.metric = metric
        self.phase = "dense"
        self.step_offset = 0
        self.sparsity: list[tuple[str, int, float]] = []
        self.validation: list[tuple[str, int, float]] = []

    def start_phase(self, phase: str, steps_before: int) -> None:
        """Name the next phase; its step 0 is `steps_before` on the run's axis."""
        self.phase, self.step_offset = phase, steps_before

    def state_dict(self) -> dict[str, Any]:
        return {"sparsity": list(self.sparsity), "validation": list(self.validation)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sparsity = [tuple(row) for row in state_dict.get("sparsity", [])]
        self.validation = [tuple(row) for row in state_dict.get("validation", [])]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        value = trainer.callback_metrics.get(SPARSITY_KEY)
        self.sparsity.append(
            (self.phase, self.step_offset + trainer.global_step, float(value) if value is not None else 0.0)
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.state.fn == "fit" and not trainer.sanity_checking and value is not None:
            self.validation.append((self.phase, self.step_offset + trainer.global_step, float(value)))

    def to_csv(self) -> str:
        """Rows `phase,step,series,value` (series: sparsity or the metric name)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["phase", "step", "series", "value"])
        writer.writerows((p, s, "sparsity", v) for p, s, v in self.sparsity)
        writer.writerows((p, s, self.metric, v) for p, s, v in self.validation)
        return buffer.getvalue()


class TrainStartSnapshot(Callback):
    """A CPU copy of the LightningModule when training starts: after every callback's `on_fit_start`
    acted (one-shot pruning done, adapters attached), before the first training step.

    The run validates it after the phase (`evaluate_pruned`) with a plain `Trainer.validate`; the
    copy costs one model's size in host memory while the phase trains.
    """

    def __init__(self) -> None:
        self.module: pl.LightningModule | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.module = copy.deepcopy(pl_module).cpu()  # LightningModule pickles without its Trainer


def _save_figure(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())


def plot_layer_sparsity(report: SparsityReport, path: Path) -> None:
    """Horizontal bars: the fraction of zeros of every reported layer, and the global line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [layer.name for layer in report.layers]
    figure, axes = plt.subplots(figsize=(7, 1.5 + 0.3 * len(names)))
    axes.barh(names, [layer.sparsity for layer in report.layers], color="tab:blue")
    axes.axvline(report.global_sparsity, color="tab:red", linestyle="--", label=f"global {report.global_sparsity:.1%}")
    axes.set_xlim(0, 1)
    axes.invert_yaxis()
    axes.set_xlabel("sparsity (fraction of exact zeros)")
    axes.legend(loc="lower right")
    _save_figure(figure, path)
    plt.close(figure)


def plot_schedule(history: History, path: Path) -> None:
    """The logged sparsity (left axis) and the validation metric (right axis) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, left = plt.subplots(figsize=(7, 4))
    left.plot(
        [s for _, s, _ in history.sparsity], [v for _, _, v in history.sparsity], color="tab:blue", label="sparsity"
    )
    left.set_xlabel("optimizer step (all phases)")
    left.set_ylabel("sparsity", color="tab:blue")
    left.set_ylim(0, 1)
    right = left.twinx()
    right.plot(
        [s for _, s, _ in history.validation],
        [v for _, _, v in history.validation],
        "o-",
        color="tab:orange",
        label=history.metric,
    )
    right.set_ylabel(history.metric, color="tab:orange")
    starts: dict[str, int] = {}
    for phase, step, _ in history.sparsity:
        starts.setdefault(phase, step)
    for phase, step in list(starts.items())[1:]:  # a dotted line where each later stage starts
        left.axvline(step, color="grey", linestyle=":")
        left.text(step, 0.98, f" {phase}", rotation=90, va="top", fontsize=8, color="grey")
    figure.legend(loc="upper center", ncol=3)
    _save_figure(figure, path)
    plt.close(figure)


def gathered_state_dict(model: torch.nn.Module) -> dict[str, Any] | None:
    """The whole tensors of a model with FSDP2-sharded (DTensor) parameters, gathered on rank 0's CPU
    one at a time (every rank must call it; the other ranks get None)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None


def save_model(model: torch.nn.Module, directory: Path, tokenizer: Any = None) -> Path:
    """Save a Hugging Face model with `save_pretrained` (and its tokenizer) into `directory`,
    any other model as `directory/model.pt` (a `torch.save`d state dict); returns the path.
    Under FSDP2 every rank calls it and rank 0 writes the whole tensors (`gathered_state_dict`)."""
    save_pretrained = getattr(model, "save_pretrained", None)
    result = directory if callable(save_pretrained) else directory / "model.pt"
    sharded = any(isinstance(parameter, DTensor) for parameter in model.parameters())
    state = gathered_state_dict(model) if sharded else model.state_dict()
    if state is None:
        return result
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    if callable(save_pretrained):
        save_pretrained(staging, **({"state_dict": state} if sharded else {}))
        if callable(getattr(tokenizer, "save_pretrained", None)):
            tokenizer.save_pretrained(staging)
    else:
        torch.save(state, staging / "model.pt")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return result


def write_results(results: dict[str, Any], path: Path) -> None:
    """The run's numbers (metrics before/after, sparsity, paths) as JSON."""
    write_text(path, json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")


def stage_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, float], str]]:
    """(row label, metrics, what was measured) for every evaluation of `results["stages"]`, in run order."""
    rows: list[tuple[str, dict[str, float], str]] = []
    entries, harness = results.get("stages", []), results.get("lm_eval", {})
    for entry in entries:
        name, used = entry["name"], ", ".join(entry.get("callbacks", [])) or "training only"
        if entry["status"] == "skipped":
            rows.append((name, {}, "skipped: no callbacks and no epoch to train"))
        if "before_metrics" in entry:
            rows.append(("before", entry["before_metrics"], f"before stage `{name}`, the first with callbacks"))
        if harness.get("before_stage") == name and "before" in harness:
            rows.append(("lm-eval before", flat_metrics(harness["before"]), f"lm-eval, before stage `{name}`"))
        if "start_metrics" in entry:
            rows.append((f"{name} (start)", entry["start_metrics"], f"once {used} acted at fit start, before training"))
        if "metrics" in entry:
            rows.append((name, entry["metrics"], f"after the stage ({used})"))
    ran = [entry for entry in entries if entry["status"] == "completed"]
    if "after" in results and ran and "metrics" not in ran[-1]:
        rows.append(("after", results["after"], "after the last stage"))
    if "after" in harness:
        rows.append(("lm-eval after", flat_metrics(harness["after"]), "lm-eval, after the last stage"))
    return rows


def stage_table(results: dict[str, Any]) -> str:
    """Markdown table of the metrics after every stage (a column per metric), in run order."""
    rows = stage_rows(results)
    names = sorted({name for _, metrics, _ in rows for name in metrics})
    lines = ["| stage | " + " | ".join(names) + " | measured |", "|---|" + "---:|" * len(names) + "---|"]
    for label, metrics, measured in rows:
        values = " | ".join(f"{metrics[name]:.4f}" if name in metrics else "" for name in names)
        lines.append(f"| {label} | {values} | {measured} |")
    return "\n".join(lines) + "\n"


def plot_stages(results: dict[str, Any], metric: str, path: Path) -> None:
    """Bars: `metric` after every evaluated stage, in run order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, metrics[metric]) for label, metrics, _ in stage_rows(results) if metric in metrics]
    figure, axes = plt.subplots(figsize=(1.5 + 1.4 * len(rows), 3.5))
    colors = [plt.get_cmap("tab10")(index % 10) for index in range(len(rows))]
    bars = axes.bar([label for label, _ in rows], [value for _, value in rows], color=colors)
    axes.bar_label(bars, fmt="%.4g")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} by stage")
    axes.tick_params(axis="x", labelrotation=30 if len(rows) > 4 else 0)
    _save_figure(figure, path)
    plt.close(figure)


def write_stages(results: dict[str, Any], metric: str, out: Path, plots: bool = True) -> None:
    """`stages.md` (every stage's metrics) and `plots/stage_metrics.png`, when any stage was evaluated."""
    rows = stage_rows(results)
    if not any(metrics for _, metrics, _ in rows):
        return
    write_text(out / "stages.md", stage_table(results))
    if plots and any(metric in metrics for _, metrics, _ in rows):
        plot_stages(results, metric, out / "plots" / "stage_metrics.png")
