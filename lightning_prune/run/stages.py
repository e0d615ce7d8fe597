"""The stages of a run: the `stages:` list of the config, checked, and each stage's callbacks.

A stage is one `Trainer.fit` with its own callbacks and Trainer settings. Its keys (every one but
`name` may be left out)::

    stages:
      - name: prune                 # unique; logs/<name>/, checkpoints/stage-<i>-<name>.ckpt, a row of stages.md
        use: [pruning, lora, callbacks, export]   # group-selected callbacks it runs ("callbacks.<name>" for one)
        callbacks: {}               # its own callbacks: {name: {_target_: ..., arg: value}}
        trainer: {}                 # Trainer settings over `trainer` for this stage only
        evaluate: true              # validate after the stage (its row in stages.md and results.json)
        evaluate_start: false       # also validate once its callbacks acted at fit start (one-shot pruned)

A stage with no callbacks and `trainer.max_epochs: 0` has nothing to do and is skipped (the default
`dense` stage when `dense_epochs: 0`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_prune.run.checks import ConfigError, build, check_types

# Config groups whose selected callback a stage can run, in the order `use` usually lists them.
GROUPS = ("pruning", "lora", "callbacks", "export")
STAGE_KEYS = ("name", "use", "callbacks", "trainer", "evaluate", "evaluate_start")
# The run sets these on every stage's Trainer itself.
RUN_OWNED_TRAINER_KEYS = ("callbacks", "logger")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Stage:
    """One checked stage: its place, name, the callback config keys it runs and its Trainer settings."""

    index: int
    name: str
    callback_keys: tuple[str, ...]  # dotted config keys of its callbacks, in the order they run
    trainer: dict[str, Any]  # the full Trainer config for this stage (`trainer` with the stage's settings over it)
    evaluate: bool
    evaluate_start: bool

    @property
    def is_empty(self) -> bool:
        """No callbacks and no epoch to train: nothing would happen."""
        return not self.callback_keys and self.trainer.get("max_epochs") == 0


def _is_callback_node(node: Any) -> bool:
    return isinstance(node, DictConfig) and "_target_" in node


def _bool(node: DictConfig, key: str, where: str, default: bool) -> bool:
    value = node.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"`{where}.{key}`={value!r} is invalid: must be true or false")
    return value


def _used_keys(cfg: DictConfig, node: DictConfig, where: str) -> list[str]:
    """`use` expanded to dotted callback keys; groups set to none (no `_target_`) contribute nothing."""
    use = node.get("use", ListConfig([]))
    if not isinstance(use, ListConfig) or not all(isinstance(entry, str) for entry in use):
        raise ConfigError(
            f"`{where}.use`={OmegaConf.to_container(use) if isinstance(use, ListConfig) else use!r} is invalid: "
            f"must be a list of {list(GROUPS)} or 'callbacks.<name>'"
        )
    extra = cfg.get("callbacks") or {}
    keys: list[str] = []
    for entry in use:
        if entry in ("pruning", "lora", "export"):
            found = [entry] if _is_callback_node(cfg.get(entry)) else []
        elif entry == "callbacks":
            found = [f"callbacks.{name}" for name in extra]
        elif entry.startswith("callbacks.") and entry.removeprefix("callbacks.") in extra:
            found = [entry]
        else:
            valid = [*GROUPS, *(f"callbacks.{name}" for name in extra)]
            raise ConfigError(f"`{where}.use` names {entry!r}, which is not a callback group: valid are {valid}")
        if entry in use[: use.index(entry)] or any(key in keys for key in found):
            raise ConfigError(f"`{where}.use` lists {entry!r} twice: a callback runs once per stage")
        keys += found
    return keys


def _own_keys(node: DictConfig, where: str) -> list[str]:
    own = node.get("callbacks", DictConfig({}))
    if not isinstance(own, DictConfig):
        raise ConfigError(f"`{where}.callbacks`={own!r} is invalid: must be a mapping {{name: {{_target_: ...}}}}")
    names = [str(name) for name in own]
    for name in names:
        child = own[name]
        if not _is_callback_node(child):
            shown = OmegaConf.to_container(child) if isinstance(child, (DictConfig, ListConfig)) else child
            raise ConfigError(
                f"`{where}.callbacks.{name}` needs a `_target_` (a Lightning Callback class), got {shown!r}"
            )
    return [f"{where}.callbacks.{name}" for name in names]


def _stage_trainer(cfg: DictConfig, node: DictConfig, where: str) -> dict[str, Any]:
    settings = node.get("trainer", DictConfig({}))
    if not isinstance(settings, DictConfig):
        raise ConfigError(f"`{where}.trainer`={settings!r} is invalid: must be a mapping of Trainer settings")
    owned = [key for key in RUN_OWNED_TRAINER_KEYS if key in settings]
    if owned:
        raise ConfigError(
            f"`{where}.trainer.{owned[0]}` is set by the run: give a stage its callbacks with `use` and `callbacks`"
        )
    # a DictConfig gives a dict
    values: dict[str, Any] = OmegaConf.to_container(settings, resolve=True)  # type: ignore[assignment]
    base: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    check_types(OmegaConf.create({"_target_": base["_target_"], **values}), f"{where}.trainer")
    return {**base, **values}


def check_stage_settings_used(cfg: DictConfig) -> None:
    """`dense_epochs` > 0 and `evaluate_pruned` act only through a stage that refers to them (the
    default list does); set with a stage list that does not, they would be ignored: an error."""
    raw = str(OmegaConf.to_container(cfg.stages, resolve=False))
    for key, active in (
        ("dense_epochs", cfg.get("dense_epochs", 0) > 0),
        ("evaluate_pruned", cfg.get("evaluate_pruned") is True),
    ):
        if active and f"${{{key}}}" not in raw:
            raise ConfigError(
                f"`{key}`={cfg.get(key)!r} has no effect: no stage of `stages` refers to it "
                "(the recipe's stages set their own settings; set the stage's value instead, "
                "e.g. `stages.0.trainer.max_epochs=...` or `stages.1.evaluate_start=true`)"
            )


def parse_stages(cfg: DictConfig) -> list[Stage]:
    """Check `cfg.stages` and return the stages in order; errors name the key, the value and what is valid."""
    nodes = cfg.get("stages")
    if not isinstance(nodes, ListConfig) or len(nodes) == 0:
        raise ConfigError(
            "`stages` must be a non-empty list of stages "
            f"({{name: ..., use: [...], callbacks: {{...}}, trainer: {{...}}}}), got {nodes!r}"
        )
    for name, child in (cfg.get("callbacks") or {}).items():
        if not _is_callback_node(child):
            shown = OmegaConf.to_container(child) if isinstance(child, (DictConfig, ListConfig)) else child
            raise ConfigError(f"`callbacks.{name}` needs a `_target_` (a Lightning Callback class), got {shown!r}")
    stages: list[Stage] = []
    for index, node in enumerate(nodes):
        where = f"stages.{index}"
        if not isinstance(node, DictConfig):
            raise ConfigError(f"`{where}`={node!r} is invalid: a stage is a mapping with keys {list(STAGE_KEYS)}")
        unknown = [str(key) for key in node if key not in STAGE_KEYS]
        if unknown:
            raise ConfigError(f"`{where}.{unknown[0]}` is not a stage key: valid keys are {list(STAGE_KEYS)}")
        name = node.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ConfigError(
                f"`{where}.name`={name!r} is invalid: must be a non-empty name of letters, digits, '_', '.' or '-'"
            )
        previous = [stage.index for stage in stages if stage.name == name]
        if previous:
            raise ConfigError(
                f"`{where}.name`={name!r} is already the name of `stages.{previous[0]}`: stage names must be unique"
            )
        keys = _used_keys(cfg, node, where) + _own_keys(node, where)
        trainer = _stage_trainer(cfg, node, where)
        stages.append(
            Stage(
                index,
                name,
                tuple(keys),
                trainer,
                _bool(node, "evaluate", where, True),
                _bool(node, "evaluate_start", where, False),
            )
        )
    check_stage_settings_used(cfg)
    return stages


def build_callbacks(cfg: DictConfig, stage: Stage) -> list[Callback]:
    """The stage's callbacks, instantiated (new instances for each stage), each a Lightning Callback."""
    callbacks = []
    for key in stage.callback_keys:
        node = OmegaConf.select(cfg, key)
        callback = build(node, key)
        if not isinstance(callback, Callback):
            raise ConfigError(f"`{key}._target_`={node._target_!r} is not a Lightning Callback")
        callbacks.append(callback)
    return callbacks
