"""Command-line overrides that name no key of the config: the valid keys of that group and the nearest one.

Hydra refuses `pruning.sparsty=0.5` with "Key 'sparsty' is not in struct" and nothing more; after
its message the CLI prints, for each such override, the keys the group does have and the nearest
match (`difflib`), with a `_target_`'s other arguments (added with `+key=value`) counted as keys.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf


def group_names(config_dir: str) -> set[str]:
    """The config groups (sub-folders of `config_dir`, e.g. pruning, recipe)."""
    return {path.name for path in Path(config_dir).iterdir() if path.is_dir() and not path.name.startswith("_")}


def _target_arguments(node: DictConfig) -> list[str]:
    """The arguments of the node's `_target_` (none when it has none or cannot be imported)."""
    target = node.get("_target_")
    if not isinstance(target, str):
        return []
    try:
        obj = get_object(target)
    except (ImportError, ValueError, AttributeError):  # Hydra's own error names a bad target; this is a hint
        return []
    function = obj.__init__ if inspect.isclass(obj) else obj
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [n for n, p in inspect.signature(function).parameters.items() if n != "self" and p.kind not in skip]


def unknown_key_hint(cfg: DictConfig, key: str) -> str | None:
    """For `key` (dotted) absent from `cfg`: a line naming the group, its valid keys and the nearest match."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        index: str | int = int(part) if isinstance(node, ListConfig) and part.isdigit() else part
        if (isinstance(node, DictConfig) and part in node) or (isinstance(index, int) and index < len(node)):
            if OmegaConf.is_interpolation(node, index):  # e.g. `${hydra:...}`: not resolvable here, not a group
                return None
            node = node[index]
            continue
        if not isinstance(node, DictConfig):
            return None
        group = ".".join(parts[:depth])
        keys = [str(k) for k in node if not str(k).startswith("_")]
        extra = [name for name in _target_arguments(node) if name not in keys]
        where = f"a key of `{group}`" if group else "a top-level key"
        target = f" ({node.get('_target_')})" if node.get("_target_") else ""
        line = f"`{key}` is not {where}{target}; valid keys: {', '.join(keys)}"
        if extra:
            line += f" (and, added with `+{group}.NAME=value`, {', '.join(extra)})"
        nearest = difflib.get_close_matches(part, keys + extra, n=1)
        if nearest:
            prefix = "+" if nearest[0] in extra else ""
            dotted = ".".join([*parts[:depth], nearest[0], *parts[depth + 1 :]])
            line += f"; did you mean `{prefix}{dotted}`?"
        return line
    return None


def unknown_key_hints(config_dir: str, overrides: Sequence[str]) -> list[str]:
    """One hint line for each `key=value` in `overrides` whose key is not in the config composed with
    the overrides' group choices (`pruning=wanda`, `recipe=...`); [] when every key exists."""
    plain = [o for o in overrides if "=" in o and not o.startswith(("+", "~", "-", "hydra."))]
    groups = group_names(config_dir)
    choices = [o for o in plain if o.split("=", 1)[0] in groups]
    keys = [o.split("=", 1)[0] for o in plain if o not in choices]
    if not keys:
        return []
    GlobalHydra.instance().clear()  # the failed run's Hydra instance, if any: compose starts its own
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose("config", overrides=choices)
    except HydraException:  # a group choice that does not exist (`recipe=nope`): Hydra already said which
        return []
    return [hint for key in keys if (hint := unknown_key_hint(cfg, key)) is not None]
