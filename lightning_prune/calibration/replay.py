"""Blocks that compute nothing during a capture pass, and the equality that decides whether that is exact.

The driver runs every block itself, so a capture pass needs from the blocks after the first only
the arguments the model's forward gives them; in transformers' stacks those never depend on what
the blocks compute (masks and position embeddings are made before the loop; T5 hands block 0's
position bias on unchanged). `capture.Capture` therefore records blocks 1.. once block 0 is
pruned, with block 0 returning its pruned output objects and every later block the output object
of the block before it (`replacing`), and keeps that record only when batch 0's arguments equal
those of batch 0's real forward (`same`); otherwise every batch runs for real.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from lightning_prune.calibration.blocks import BlockList


@contextmanager
def replacing(blocks: BlockList, forwards: Mapping[int, Callable[..., Any]]) -> Iterator[None]:
    """Block j of `blocks` runs `forwards[j]` instead of its own forward (hooks still fire)."""
    # An instance `forward` already there (accelerate's hooks put one) is put back afterwards.
    saved = {j: blocks[j].__dict__.get("forward") for j in forwards}
    try:
        for j, forward in forwards.items():
            blocks[j].forward = forward
        yield
    finally:
        for j, previous in saved.items():
            if previous is None:
                blocks[j].__dict__.pop("forward", None)
            else:
                blocks[j].forward = previous


def same(a: Any, b: Any) -> bool:
    """Equal arguments: the same object, equal tensors (dtype, shape, device, values), equal containers or values."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if a is None or b is None:
        return False
    return type(a) is type(b) and isinstance(a, (bool, int, float, str)) and a == b  # other objects: not known equal
