"""The calls the driver records and replays: a block's (args, kwargs), its hidden states, and no caches.

A block's hidden states are its first positional argument or `hidden_states=`. Key/value caches
would carry state from one run of a block to the next, so they are dropped wherever they are
passed, and while the driver calibrates the model builds none (`caches_off`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

Call = tuple[tuple[Any, ...], dict[str, Any]]
BlockInputs = list[Call]  # one (args, kwargs) per calibration batch
CACHE_KEYS = ("past_key_value", "past_key_values", "layer_past", "cache", "cache_params")


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first element of a tuple/ModelOutput)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def to_device(value: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def describe_batch(batch: Any) -> str:
    """Shapes of a batch's tensors, for error messages."""
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k!r}: {describe_batch(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(describe_batch(v) for v in batch) + ")"
    return type(batch).__name__


def move_outside(model: nn.Module, blocks: Sequence[nn.Module], device: torch.device) -> None:
    """Move every parameter and buffer that is not inside one of `blocks` to `device`."""
    inside = {id(m) for block in blocks for m in block.modules()}
    for module in model.modules():
        if id(module) not in inside:
            module._apply(lambda t: t.to(device), recurse=False)


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache")


def without_caches(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    """Key/value caches would carry state from one run of a block to the next: pass None instead,
    wherever they are passed (GPT-2 passes its cache positionally), and `use_cache=False`."""
    args = tuple(None if _is_cache(a) else a for a in args)
    out = {}
    for key, value in kwargs.items():
        out[key] = None if (_is_cache(value) or key in CACHE_KEYS) else (False if key == "use_cache" else value)
    return args, out


def hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a block is called with: its first positional argument or `hidden_states`."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(
            "a block was called without hidden states as first argument or `hidden_states=` "
            f"(got {type(hidden).__name__}); name another block list with `blocks=`"
        )
    return hidden


def with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor | None) -> Call:
    """The same call with `hidden` in place of the hidden states."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextmanager
def caches_off(model: nn.Module) -> Iterator[None]:
    """`use_cache=False` on every configuration of `model` while the driver calibrates, then as before.

    transformers models default `use_cache` from their config (`merge_with_config_defaults`,
    checked on 5.24), so the calibration forward builds no cache that `without_caches` would drop
    (an encoder-decoder builds two per call, each deep-copying the config). An argument a batch
    passes explicitly still wins; its cache is dropped like any other.
    """
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(getattr(config, "use_cache", None), bool):
            configs[id(config)] = config
    saved = {key: config.use_cache for key, config in configs.items()}
    try:
        for config in configs.values():
            config.use_cache = False
        yield
    finally:
        for key, config in configs.items():
            config.use_cache = saved[key]
