"""The run's optional lm-evaluation-harness scores (the `lm_eval` config group): its settings, lm-eval
and the tasks checked at start-up, the model and tokenizer in the preflight (before any training), scored on
the model in memory after the last stage (and, with `before`, right before the first stage with
callbacks), recorded in `results.json["lm_eval"]` and as rows of `stages.md`.

    lm_eval:                # lm_eval=harness; lm_eval=none (an empty mapping) or null: no lm-eval scores
      tasks: [hellaswag]    # lm-eval task, group or tag names, or `task:` names of YAML files in include_path
      limit: null           # documents per task (integer) or a fraction of each task; null = all
      num_fewshot: null     # few-shot examples; null = each task's default
      batch_size: 8         # requests per forward pass
      include_path: null    # a directory (or list) of your own task YAML files
      device: null          # where lm-eval runs the model; null = the stage Trainer's device
      bootstrap_iters: 100000   # bootstrap resamples for the stderr of non-mean metrics (0 = none)
      before: false         # also score the model before the first stage with callbacks
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_prune.evaluate.harness import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BOOTSTRAP_ITERS,
    check_include_path,
    check_limit,
    check_task_names,
    check_tasks,
    evaluate_lm_harness,
)
from lightning_prune.run.checks import ConfigError
from lightning_prune.run.stages import Stage
from lightning_prune.validation import check_bool, check_integer, check_optional_integer

KEY = "lm_eval"
HARNESS_KEYS = ("tasks", "limit", "num_fewshot", "batch_size", "include_path", "device", "bootstrap_iters", "before")


@dataclass(frozen=True)
class HarnessSettings:
    """The checked `lm_eval` settings of a run."""

    tasks: list[str]
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    include_path: list[str] | None = None
    device: str | None = None
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS
    before: bool = False


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _check_device(value: Any, argument: str) -> str | None:
    if value is None:
        return None
    refusal = f"`{argument}` must be null or a torch device name such as 'cpu' or 'cuda:0', got {value!r}"
    if not isinstance(value, str):
        raise ValueError(refusal)
    try:
        return str(torch.device(value))
    except RuntimeError as error:
        raise ValueError(refusal) from error


def harness_settings(cfg: DictConfig) -> HarnessSettings | None:
    """The run's `lm_eval` settings, checked (no import of lm-eval yet); None when the group is off.

    Raises `ConfigError` naming `lm_eval.<key>`, its value and what is valid.
    """
    node = cfg.get(KEY)
    if node is None or (isinstance(node, DictConfig) and len(node) == 0):
        return None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"`{KEY}`={node!r} is invalid: must be null or a mapping with keys {list(HARNESS_KEYS)}")
    unknown = [str(key) for key in node if key not in HARNESS_KEYS]
    if unknown:
        raise ConfigError(f"`{KEY}.{unknown[0]}` is not an lm_eval setting: valid keys are {list(HARNESS_KEYS)}")
    values = {str(key): _plain(node[key]) for key in node}
    where = {key: f"{KEY}.{key}" for key in HARNESS_KEYS}
    try:
        paths = check_include_path(values.get("include_path"), where["include_path"])
        return HarnessSettings(
            tasks=check_task_names(values.get("tasks"), where["tasks"]),
            limit=check_limit(values.get("limit"), where["limit"]),
            num_fewshot=check_optional_integer(values.get("num_fewshot"), where["num_fewshot"], low=0),
            batch_size=check_integer(values.get("batch_size", DEFAULT_BATCH_SIZE), where["batch_size"], low=1),
            include_path=paths or None,
            device=_check_device(values.get("device"), where["device"]),
            bootstrap_iters=check_integer(
                values.get("bootstrap_iters", DEFAULT_BOOTSTRAP_ITERS), where["bootstrap_iters"], low=0
            ),
            before=check_bool(values.get("before", False), where["before"]),
        )
    except ValueError as error:
        raise ConfigError(str(error)) from error


def check_harness(settings: HarnessSettings | None, stages: list[Stage]) -> None:
    """At start-up, before data and model are built: `lm_eval.before` has a stage with callbacks to
    score before, lm-eval is installed and knows every task (a `ConfigError` naming the key otherwise)."""
    if settings is None:
        return
    if settings.before and not any(stage.callback_keys for stage in stages):
        raise ConfigError(
            f"`{KEY}.before`=True has no effect: no stage of `stages` has callbacks (it scores the model right "
            "before the first stage with callbacks); set it to false, the scores after the last stage are kept"
        )
    try:
        check_tasks(settings.tasks, settings.include_path, f"{KEY}.tasks")
    except ImportError as error:
        raise ConfigError(f"`{KEY}.tasks`={settings.tasks} asks for lm-evaluation-harness scores: {error}") from error
    except ValueError as error:
        raise ConfigError(str(error)) from error


def preflight_harness(settings: HarnessSettings | None, module: pl.LightningModule, data: Any) -> None:
    """Before any training: the model is a Hugging Face model and the data module has its tokenizer
    (what lm-eval's HFLM wraps). `ConfigError` naming the keys otherwise."""
    if settings is None:
        return
    from transformers import PreTrainedModel

    network = getattr(module, "model", module)
    if not isinstance(network, PreTrainedModel):
        raise ConfigError(
            f"`{KEY}` scores a Hugging Face causal LM, but `model` ({type(module).__name__}) holds a "
            f"{type(network).__name__}: use a causal LM model (model=causal_lm, model=tiny_llama) or lm_eval=none"
        )
    if not callable(getattr(getattr(data, "tokenizer", None), "encode", None)):
        raise ConfigError(
            f"`{KEY}` needs the model's tokenizer, but `data` ({type(data).__name__}) has no `tokenizer`: "
            "use a text data module (data=text) or lm_eval=none"
        )


def score(settings: HarnessSettings, module: pl.LightningModule, data: Any, trainer: pl.Trainer) -> dict[str, Any]:
    """`evaluate_lm_harness` on the run's model as it is (masks applied), on `settings.device` or the
    Trainer's device."""
    device = settings.device if settings.device is not None else trainer.strategy.root_device
    return evaluate_lm_harness(
        getattr(module, "model", module),
        data.tokenizer,
        settings.tasks,
        limit=settings.limit,
        num_fewshot=settings.num_fewshot,
        batch_size=settings.batch_size,
        include_path=settings.include_path,
        device=device,
        bootstrap_iters=settings.bootstrap_iters,
    )
