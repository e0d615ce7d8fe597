"""lm-evaluation-harness (`lm-eval` 0.4.x, optional) on a model in memory: a pruned model is scored on
the harness's tasks as it is, masks applied, with no save and reload.

The model goes to lm-eval's Hugging Face wrapper (`lm_eval.models.huggingface.HFLM(pretrained=<model>,
tokenizer=<tokenizer>)`), the tasks come from a `lm_eval.tasks.TaskManager` (the harness's own tasks
and/or YAML task files under `include_path`), and `lm_eval.simple_evaluate` runs them. Checked
against lm-eval 0.4.13 (its source): `simple_evaluate(model=HFLM, tasks=..., task_manager=...,
num_fewshot=..., limit=..., bootstrap_iters=..., log_samples=...)`, `TaskManager(include_path=...,
include_defaults=...)` with its `all_tasks` (tasks, groups, tags) and `all_subtasks` (plain tasks).

Indexing the harness's ~15,000 built-in task files takes about 10 s on 2 CPU cores, so when every
requested name is a plain task found under `include_path` only those files are indexed (the same
tasks: `include_path` takes precedence over built-in names either way), and an index is kept for the
next call with the same task folders (a run checks its tasks at start-up, then scores them).
"""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from lightning_prune.validation import check_integer, check_optional_integer

INSTALL_HINT = "pip install 'lm-eval>=0.4,<0.5'"
SUPPORTED_SERIES = "0.4."
DEFAULT_BATCH_SIZE = 8
DEFAULT_BOOTSTRAP_ITERS = 100_000  # lm-eval's own default (stderr of non-mean metrics by bootstrap)
FILTERLESS = "none"  # lm-eval's filter name for a metric computed on the raw output


def import_lm_eval() -> ModuleType:
    """The installed `lm_eval` package (0.4.x); an ImportError saying how to install it when absent,
    or which version is supported when another series is installed."""
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(
            "the lm-evaluation-harness evaluation needs the optional `lm-eval` package, which is not installed: "
            f"{INSTALL_HINT} (or `pip install 'lightning-prune[eval]'`)"
        ) from error
    version = str(getattr(lm_eval, "__version__", "unknown"))
    if not version.startswith(SUPPORTED_SERIES):
        raise ImportError(
            f"lm-eval {version} is installed, but lightning_prune drives the API of lm-eval "
            f"{SUPPORTED_SERIES}x: {INSTALL_HINT}"
        )
    return lm_eval


def check_task_names(tasks: object, argument: str = "tasks") -> list[str]:
    """`tasks` as a list of task names when it is a non-empty list of non-empty strings (or one name),
    else a ValueError."""
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, Sequence) or len(tasks) == 0:
        raise ValueError(f"`{argument}` must be a non-empty list of lm-eval task names, got {tasks!r}")
    bad = [task for task in tasks if not isinstance(task, str) or not task.strip()]
    if bad:
        raise ValueError(f"`{argument}` must list task names (non-empty strings), got {bad[0]!r} in {list(tasks)!r}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"`{argument}`={list(tasks)!r} names a task twice")
    return list(tasks)


def check_include_path(include_path: object, argument: str = "include_path") -> list[str]:
    """`include_path` (None, a directory, or a list of them) as a list of existing directories, else a ValueError."""
    if include_path is None:
        return []
    paths = [include_path] if isinstance(include_path, (str, Path)) else include_path
    if not isinstance(paths, Sequence) or not all(isinstance(path, (str, Path)) for path in paths):
        raise ValueError(
            f"`{argument}` must be a directory of lm-eval task YAML files, a list of them, or None, "
            f"got {include_path!r}"
        )
    missing = [str(path) for path in paths if not Path(path).expanduser().is_dir()]
    if missing:
        raise ValueError(f"`{argument}` names {missing[0]!r}, which is not a directory (of lm-eval task YAML files)")
    return [str(Path(path).expanduser()) for path in paths]


def check_limit(limit: object, argument: str = "limit") -> int | float | None:
    """lm-eval's `limit`: None (every document), an integer >= 1 (documents per task) or a fraction in (0, 1)."""
    if limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1):
        return limit
    if isinstance(limit, float) and 0.0 < limit < 1.0:
        return limit
    raise ValueError(
        f"`{argument}` must be None, an integer >= 1 (documents per task) or a fraction in (0, 1), got {limit!r}"
    )


@functools.lru_cache(maxsize=8)
def _indexed(paths: tuple[str, ...], defaults: bool, files: tuple[tuple[str, int], ...]) -> Any:
    """A TaskManager over `paths` (and lm-eval's own tasks with `defaults`), kept for the next call (a
    run checks its tasks at start-up and scores them once or twice). `files`, the task files under
    `paths` with their modification times, only keys the cache: an edited task file is indexed again."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def _task_files(paths: Sequence[str]) -> tuple[tuple[str, int], ...]:
    found = (file for path in paths for pattern in ("*.yaml", "*.yml", "*.py") for file in Path(path).rglob(pattern))
    return tuple(sorted((str(file), file.stat().st_mtime_ns) for file in found))


def task_manager(tasks: Sequence[str], include_path: object = None, argument: str = "tasks") -> Any:
    """A `lm_eval.tasks.TaskManager` that knows every name of `tasks` (indexing the built-in tasks only
    when `include_path` does not hold them all as plain tasks); a ValueError names the missing ones."""
    import_lm_eval()
    names = check_task_names(tasks, argument)
    paths = tuple(check_include_path(include_path))
    files = _task_files(paths)
    if paths:
        local = _indexed(paths, False, files)
        if set(names) <= set(local.all_subtasks):  # plain tasks (YAML or Python), not groups or tags
            return local
    manager = _indexed(paths, True, files)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = (
            f"lm-eval's tasks or the task files under {list(paths)}" if paths else "lm-eval's tasks (no `include_path`)"
        )
        raise ValueError(
            f"`{argument}` names {unknown}, not found among {where}: use a task, group or tag name that "
            "`lm-eval ls tasks` lists, or the `task:` name of a YAML file in `include_path`"
        )
    return manager


def check_tasks(tasks: Sequence[str], include_path: object = None, argument: str = "tasks") -> None:
    """Whether lm-eval is installed and knows every task of `tasks` (no dataset is loaded): the check a
    run makes before any training. ImportError or ValueError otherwise."""
    task_manager(tasks, include_path, argument)


@contextmanager
def kept_random_state(device: torch.device) -> Iterator[None]:
    """Run the block with the caller's Python, NumPy and torch random states restored afterwards
    (`simple_evaluate` seeds all three globally)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def task_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """One task's numeric metrics from lm-eval's `results[task]` ("acc,none" -> "acc"; "acc,<filter>"
    kept for other filters; a stderr that lm-eval did not compute, "N/A", is left out)."""
    metrics: dict[str, float] = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # alias, name, sample_len; "N/A" stderrs
        metric, selected = key.split(",", 1)
        metrics[metric if selected == FILTERLESS else key] = float(value)
    return metrics


def evaluate_lm_harness(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    include_path: str | Path | Sequence[str | Path] | None = None,
    device: str | torch.device | None = None,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
) -> dict[str, Any]:
    """Score a Hugging Face causal LM (as it is in memory: pruned, masks applied) on lm-eval tasks.

    `tasks`: task, group or tag names (the harness's, or the `task:` names of YAML files under
    `include_path`); `limit`: documents per task (an integer, or a fraction of each task); `num_fewshot`:
    few-shot examples (None: each task's own default); `device`: where to run (the model is moved
    there and back; None: where it is). The model's weights, training mode and device, the tokenizer
    (lm-eval sets a pad token) and the caller's random state are left as they were.

    Returns `{"tasks": the names asked for, "results": {task or group: {metric: value}} (every subtask of
    a group too), "samples": {task: {"original", "effective"}},
    "num_fewshot": {task: k}, "higher_is_better": {task: {metric: bool}}, "limit", "lm_eval_version"}`,
    metrics named as lm-eval names them ("acc", "acc_stderr", "word_perplexity", "exact_match,strict-match").
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"`model` must be a transformers PreTrainedModel (what lm-eval's HFLM wraps), got {type(model).__name__}"
        )
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"`tokenizer` must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    limit = check_limit(limit)
    num_fewshot = check_optional_integer(num_fewshot, "num_fewshot", low=0)
    batch_size = check_integer(batch_size, "batch_size", low=1)
    bootstrap_iters = check_integer(bootstrap_iters, "bootstrap_iters", low=0)
    names, paths = check_task_names(tasks), check_include_path(include_path)
    lm_eval = import_lm_eval()
    manager = task_manager(names, paths)
    from lm_eval.models.huggingface import HFLM

    network = cast(nn.Module, model)  # PreTrainedModel.to, typed by transformers as a wrapper mypy cannot call
    original = next(network.parameters()).device
    target = torch.device(device) if device is not None else original
    was_training = network.training
    try:
        if target != original:
            network.to(target)
        with kept_random_state(target):
            wrapped = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
            output = lm_eval.simple_evaluate(
                model=wrapped,
                tasks=names,
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
            )
    finally:
        network.train(was_training)
        if target != original:
            network.to(original)
    if output is None:  # lm-eval returns results on rank 0 only; HFLM around a model object is rank 0
        raise RuntimeError("lm-eval returned no results (not rank 0)")
    return {
        "tasks": names,
        "results": {task: task_metrics(entry) for task, entry in output["results"].items()},
        "samples": {task: dict(counts) for task, counts in output.get("n-samples", {}).items()},
        "num_fewshot": dict(output.get("n-shot", {})),
        "higher_is_better": {task: dict(flags) for task, flags in output.get("higher_is_better", {}).items()},
        "limit": limit,
        "lm_eval_version": lm_eval.__version__,
    }


def flat_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """`{"<task>/<metric>": value}` of an `evaluate_lm_harness` result for a table row: the requested
    tasks and groups (every task when none of them has an entry of its own, as a tag), no stderrs."""
    results = evaluation["results"]
    shown = [name for name in evaluation.get("tasks", []) if name in results] or list(results)
    return {
        f"{task}/{metric}": value
        for task in shown
        for metric, value in results[task].items()
        if "_stderr" not in metric
    }
