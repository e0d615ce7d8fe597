"""Configuration checks for `run(cfg)`: required values, types against the targets' signatures,
and instantiation errors turned into one message that names the key and the value."""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import re
import types
import typing
from typing import Any, Literal, Union

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A bad configuration; the message names the config key, its value and what is valid."""


# Top-level run settings: key -> (type, check, what is valid).
RUN_SETTINGS: dict[str, tuple[type | tuple[type, ...], Any, str]] = {
    "seed": (int, lambda v: True, "an integer"),
    "dense_epochs": (int, lambda v: v >= 0, "an integer >= 0"),
    "evaluate_before": (bool, lambda v: True, "true or false"),
    "evaluate_after": (bool, lambda v: True, "true or false"),
    "evaluate_pruned": (bool, lambda v: True, "true or false"),
    "finalize": (bool, lambda v: True, "true or false"),
    "save_model": (bool, lambda v: True, "true or false"),
    "plots": (bool, lambda v: True, "true or false"),
    "tensorboard": (bool, lambda v: True, "true or false"),
    "output_dir": ((str, type(None)), lambda v: True, "a directory path or null"),
    "resume": (bool, lambda v: True, "true or false"),
    "stage_checkpoints": (str, lambda v: v in ("all", "last"), "'all' or 'last'"),
}


def check_run_settings(cfg: DictConfig) -> None:
    """Required values are set and the top-level run settings have valid types and values."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"required value `{missing[0]}` is not set (it is `???`): add `{missing[0]}=...` to the command line"
        )
    for key, (kind, valid, allowed) in RUN_SETTINGS.items():
        value = cfg.get(key)
        wrong_type = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if wrong_type or not valid(value):
            raise ConfigError(f"`{key}`={value!r} is invalid: must be {allowed}")
    extra = cfg.get("callbacks")
    if extra is not None and not isinstance(extra, DictConfig):
        raise ConfigError(f"`callbacks` must be a mapping {{name: {{_target_: ...}}}}, got {extra!r}")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a config value can be passed where `hint` is expected (unknown hints accept)."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if isinstance(value, DictConfig) and "_target_" in value:
        return True  # a nested object: checked on its own
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        numeric = (int,) if hint is int else (int, float)
        return isinstance(value, numeric) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, set, collections.abc.Sequence, collections.abc.Iterable):
        return isinstance(value, (ListConfig, list, tuple)) or (
            container is collections.abc.Sequence and isinstance(value, str)
        )
    if container in (dict, collections.abc.Mapping):
        return isinstance(value, (DictConfig, dict))
    return True


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_types(node: Any, key: str) -> None:
    """Check every `_target_` node under `key` against its target's annotated signature."""
    if isinstance(node, ListConfig):
        for index, item in enumerate(node):
            check_types(item, f"{key}[{index}]")
        return
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_")
    if target is not None:
        _check_target(node, key, target)
    for name, child in node.items_ex(resolve=False):
        check_types(child, f"{key}.{name!s}")


def _check_target(node: DictConfig, key: str, target: str) -> None:
    try:
        obj = get_object(target)
    except Exception as error:  # get_object raises ImportError or ValueError, depending on where it fails
        raise ConfigError(f"`{key}._target_`={target!r} cannot be imported: {error}") from error
    function = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(function)
    except NameError:  # annotations that name types imported only for type checkers: check names only
        hints = {}
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(function).parameters.values())
    for raw_name, value in node.items():
        name = str(raw_name)  # YAML keys: strings
        if name.startswith("_"):
            continue
        if name not in inspect.signature(function).parameters and not accepts_any:
            valid = [n for n in inspect.signature(function).parameters if n != "self"]
            nearest = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean `{key}.{nearest[0]}`?" if nearest else ""
            raise ConfigError(
                f"`{key}.{name}` is not an argument of {target} (its arguments: {', '.join(valid)}){hint}"
            )
        hint = hints.get(name, Any)
        if not _matches(value, hint):
            shown = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
            raise ConfigError(f"`{key}.{name}`={shown!r} has the wrong type: {target} expects {_type_name(hint)}")


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(node)(**kwargs)`, with errors naming `key` (and the argument when known).

    `kwargs` (live objects such as callbacks) go to the target directly, not through OmegaConf.
    Every config value reaches the target as a plain `dict`/`list` (`_convert_="all"`), never as an
    OmegaConf container.
    """
    check_types(node, key)
    try:
        factory = instantiate(node, _partial_=True, _convert_="all")
        return factory(**kwargs)
    except InstantiationException as error:
        raise config_error(node, key, error.__cause__ or error) from error
    except ValueError as error:
        raise config_error(node, key, error) from error


def config_error(node: DictConfig, key: str, error: BaseException) -> ConfigError:
    """`error` (raised by the object built from `node`) as a ConfigError that names its config key:
    `key.argument=value` when the message names one of the node's arguments in backticks, else `key`."""
    return ConfigError(f"{_offending(node, key, str(error))}: {error}")


def _offending(node: DictConfig, key: str, message: str) -> str:
    """`key.argument=value` when the message names one of the node's arguments in backticks."""
    for name in re.findall(r"`(\w+)`", message):
        if name in node and not name.startswith("_"):
            return f"`{key}.{name}`={node[name]!r} ({node.get('_target_')})"
    return f"`{key}` ({node.get('_target_')})"
