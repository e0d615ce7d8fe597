"""Calibration samples: the first `num_samples` sequences of a stream of batches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lightning_prune.validation import check_optional_integer

Batch = Any


def take_samples(batches: Iterable[Batch], num_samples: int | None) -> list[Batch]:
    """The first `num_samples` sequences of `batches` (the last batch cut), as a list of batches."""
    if num_samples is None:
        return list(batches)
    taken, count = [], 0
    for batch in batches:
        size = _batch_size(batch)
        if count + size > num_samples:
            batch = _slice(batch, num_samples - count)
            size = num_samples - count
        taken.append(batch)
        count += size
        if count >= num_samples:
            break
    return taken


def check_num_samples(num_samples: int | None) -> None:
    """`num_samples` is None (all batches) or an integer >= 1."""
    check_optional_integer(num_samples, "num_samples", low=1)


def _batch_size(batch: Batch) -> int:
    first = (
        next(iter(batch.values()))
        if isinstance(batch, dict)
        else batch[0]
        if isinstance(batch, (tuple, list))
        else batch
    )
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else 1


def _slice(batch: Batch, size: int) -> Batch:
    if isinstance(batch, dict):
        return {k: _slice(v, size) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, size) for v in batch)
    return batch[:size] if isinstance(batch, torch.Tensor) else batch
