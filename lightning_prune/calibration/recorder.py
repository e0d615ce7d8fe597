"""The hooks of a capture pass: what the model's own forward gives every block of a stack.

A pre-hook on each block records its positional and keyword arguments (with_kwargs); the forward
is stopped after the stack's last block. The hidden states of every block but the first are not
kept (the driver feeds its own); every other argument is kept by reference, so arguments the model
shares between blocks (one mask per layer type, the rotary embeddings, T5's position bias) are
stored once. Caches are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.calibration.blocks import BlockList, block_name
from lightning_prune.calibration.calls import BlockInputs, block_output, hidden_of, with_hidden, without_caches


class StackDone(Exception):
    """Raised after the captured stack's last block to stop the forward pass."""


class NotChained(ValueError):
    """The model's forward does not run a stack's blocks once each, in order, each on the one before's
    output: the stack cannot be calibrated block by block (one-shot may fall back to a whole-model pass)."""


class Recorder:
    """The hooks of one capture pass over the remaining stacks; see `capture.Capture`."""

    def __init__(
        self, stacks: Sequence[tuple[str, BlockList]], device: torch.device, home: torch.device, offload: bool
    ) -> None:
        self.stacks, self.device, self.home, self.offload = stacks, device, home, offload
        self.records: list[list[BlockInputs]] = [[[] for _ in blocks] for _, blocks in stacks]
        self.active: int | None = None
        self.first: int | None = None
        self.batch = 0
        self.previous: torch.Tensor | None = None
        self.last_output: Any = None
        self.mode = "real"  # "real", "first" (stop after recording block 0), "rest" (see `replay.py`)

    def before(self, s: int, j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.enter(s, j, module, args, kwargs)

        return hook

    def after(self, s: int, j: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.leave(s, j, module, output)

        return hook

    def enter(self, s: int, j: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = self.stacks[s][0]
        if self.active is None:
            if j != 0 or (self.first is not None and s != self.first):
                raise NotChained(
                    f"calibration batch {self.batch} entered the block stack {name} at block {j}, "
                    "not where batch 0 entered; name the stacks with `blocks=`"
                )
            self.active = self.first = s
        elif self.active != s:
            raise NotChained(
                f"the model's forward ran {block_name(name, j)} inside the block stack {self.stacks[self.active][0]}; "
                "stacks must run one after the other (name them with `blocks=`)"
            )
        if self.mode == "rest" and j == 0:
            return  # block 0 replays its pruned outputs; its arguments are already recorded
        record = self.records[s][j]
        if len(record) > self.batch:
            raise NotChained(
                f"the model's forward ran block {block_name(name, j)} twice in one pass (shared blocks); "
                "name another block list with `blocks=`"
            )
        args, kwargs = without_caches(tuple(args), dict(kwargs))
        hidden = hidden_of(args, kwargs)
        if j == 0:
            record.append(with_hidden(args, kwargs, hidden.clone()))
            if self.mode == "first":
                raise StackDone
        else:
            previous = self.previous
            if previous is None or not (
                hidden is previous or (hidden.shape == previous.shape and torch.equal(hidden, previous))
            ):
                raise NotChained(
                    f"block {block_name(name, j)} does not take the output of {block_name(name, j - 1)} "
                    "as its hidden states, so its blocks cannot be calibrated one after the other; "
                    "name another block list with `blocks=`"
                )
            record.append(with_hidden(args, kwargs, None))
        if self.offload and self.mode == "real":
            module.to(self.device)

    def leave(self, s: int, j: int, module: nn.Module, output: Any) -> None:
        if self.offload and self.mode == "real":
            module.to(self.home)
        self.previous, self.last_output = block_output(output), output
        if j == len(self.stacks[s][1]) - 1:
            self.previous = self.last_output = None
            raise StackDone

    def replayed_output(self, *args: Any, **kwargs: Any) -> Any:
        """A replayed block's forward: the output object of the block before it."""
        return self.last_output
