"""Argument checks shared by every layer: finite numbers and integers, named in the error.

A string that looks like a number ("1e-3" from a hand-written YAML), a bool, NaN or infinity is
refused with a `ValueError` that names the argument, the value and what is valid, instead of
failing later inside torch with a `TypeError` or training to NaN weights.
"""

from __future__ import annotations

import math


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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{argument}` must be {wanted}, got {value!r} of type {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"`{argument}` must be {wanted}, got {value!r}")
    if low is not None and (number < low or (low_open and number == low)):
        raise ValueError(f"`{argument}` must be {wanted}, got {value!r}")
    if high is not None and (number > high or (high_open and number == high)):
        raise ValueError(f"`{argument}` must be {wanted}, got {value!r}")
    return number


def check_integer(value: object, argument: str, low: int | None = None) -> int:
    """`value` when it is an int (not a bool, not a string) >= `low`, else a ValueError."""
    bound = f" >= {low}" if low is not None else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{argument}` must be an integer{bound}, got {value!r} of type {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"`{argument}` must be an integer{bound}, got {value!r}")
    return value
