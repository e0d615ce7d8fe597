"""Argument checks shared by every layer: numbers, integers, sparsities, bools and names, named in the error.

A string that looks like a number ("1e-3" from a hand-written YAML), a bool where a number is
wanted, NaN or infinity is refused with a `ValueError` that names the argument, the value and what
is valid, instead of failing later inside torch with a `TypeError` or training to NaN weights.
Every check returns the value (as a float for the real-valued ones) so that a caller can write
`self.lr = check_number(lr, "lr", low=0.0, low_open=True)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeGuard, TypeVar

from torch import nn

T = TypeVar("T")


def _refuse(argument: str, wanted: str, value: object, wrong_type: bool = False) -> ValueError:
    """The one error message: "`argument` must be <wanted>, got <value>" (+ its type when that is wrong)."""
    kind = f" of type {type(value).__name__}" if wrong_type else ""
    return ValueError(f"`{argument}` must be {wanted}, got {value!r}{kind}")


def _is_real(value: object) -> TypeGuard[int | float]:
    """An int or float that is not a bool (bools are ints in Python, but never a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return "a finite number" + (" " + " and ".join(parts) if parts else "")


def check_number(
    value: object,
    argument: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` as a float when it is a finite real number within the bounds, else a ValueError.

    `low_open` / `high_open` exclude the bound itself (`low=0, low_open=True` means > 0).
    """
    wanted = _describe(low, high, low_open, high_open)
    if not _is_real(value):
        raise _refuse(argument, wanted, value, wrong_type=True)
    number = float(value)
    if not math.isfinite(number):
        raise _refuse(argument, wanted, value)
    if low is not None and (number < low or (low_open and number == low)):
        raise _refuse(argument, wanted, value)
    if high is not None and (number > high or (high_open and number == high)):
        raise _refuse(argument, wanted, value)
    return number


def check_integer(value: object, argument: str, low: int | None = None) -> int:
    """`value` when it is an int (not a bool, not a float, not a string) >= `low`, else a ValueError."""
    wanted = "an integer" + (f" >= {low}" if low is not None else "")
    if not _is_integer(value):
        raise _refuse(argument, wanted, value, wrong_type=True)
    if low is not None and value < low:
        raise _refuse(argument, wanted, value)
    return value


def check_optional_integer(value: object, argument: str, low: int | None = None) -> int | None:
    """`check_integer`, with None accepted (and returned) as "not set"."""
    if value is None:
        return None
    wanted = "None or an integer" + (f" >= {low}" if low is not None else "")
    if not _is_integer(value):
        raise _refuse(argument, wanted, value, wrong_type=True)
    if low is not None and value < low:
        raise _refuse(argument, wanted, value)
    return value


def check_sparsity(value: object, argument: str = "sparsity") -> float:
    """`value` as a float when it is a sparsity (a number in [0, 1)), else a ValueError."""
    wanted = "a number in [0, 1)"
    if not _is_real(value):
        raise _refuse(argument, wanted, value, wrong_type=True)
    number = float(value)
    if not 0.0 <= number < 1.0:  # NaN fails this too
        raise _refuse(argument, wanted, value)
    return number


def check_fraction(value: object, argument: str) -> float:
    """`value` as a float when it is strictly between 0 and 1 (a share held out), else a ValueError."""
    wanted = "in (0, 1)"
    if not _is_real(value):
        raise _refuse(argument, wanted, value, wrong_type=True)
    number = float(value)
    if not 0.0 < number < 1.0:  # NaN fails this too
        raise _refuse(argument, wanted, value)
    return number


def check_bool(value: object, argument: str) -> bool:
    """`value` when it is True or False (not 0/1, not the string "true"), else a ValueError."""
    if not isinstance(value, bool):
        raise _refuse(argument, "true or false", value, wrong_type=True)
    return value


def check_choice(value: object, argument: str, choices: Sequence[T]) -> T:
    """The entry of `choices` equal to `value` (a bool never equals 1 here), else a ValueError listing them."""
    for choice in choices:
        if isinstance(value, bool) == isinstance(choice, bool) and value == choice:
            return choice
    raise _refuse(argument, f"one of {tuple(choices)}", value)


def check_materialized(model: nn.Module, argument: str = "model") -> None:
    """Refuse a model whose parameters or buffers are on the `meta` device (shapes without values, e.g.
    built under `torch.device("meta")` or `init_empty_weights`): there is nothing to score, prune or bake in."""
    meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if meta:
        raise ValueError(
            f"`{argument}` ({type(model).__name__}) is on the meta device: {len(meta)} of its tensors "
            f"({', '.join(repr(name) for name in meta[:3])}{', ...' if len(meta) > 3 else ''}) have a shape but no "
            "values. Materialize it first: `model.to_empty(device='cpu')` (or 'cuda'), then load its weights "
            "(`model.load_state_dict(state_dict)`, or `from_pretrained` without a meta device / empty-weights init)"
        )
