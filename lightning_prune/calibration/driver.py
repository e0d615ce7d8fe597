"""Sequential calibration, block by block, over every stack of blocks the model's forward runs.

Both papers' drivers, generic (DESIGN, "Sequential calibration"; README, "Architectures"): each
stack, in execution order, is captured from the model's own forward (every block's exact
arguments, `capture.py`); each block then goes to `process_block` (statistics, pruning) and runs
pruned on its recorded arguments to feed the next. Later stacks are captured after the earlier ones
are pruned. What is kept grows with the calibration batches, never with the model's maximum
context; the model builds no key/value caches while the driver runs (`calls.caches_off`).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_prune.calibration.blocks import BlocksArgument, Stack, block_name, find_blocks
from lightning_prune.calibration.calls import (
    BlockInputs,
    block_output,
    caches_off,
    hidden_of,
    move_outside,
    with_hidden,
)
from lightning_prune.calibration.capture import Capture

Batch = Any


class BlockRunner:
    """The `run_block` a BlockProcessor gets: `run_block()` forwards every captured batch through
    the block so that the caller's hooks see its layers' inputs; `run_block(keep_outputs=True)` also
    returns the block's outputs, and `run_block.inputs` are the (args, kwargs) themselves (what
    block reconstruction tunes on). A batch the block cannot run is named in the error."""

    def __init__(self, block: nn.Module, inputs: BlockInputs, name: str = "block") -> None:
        self.block = block
        self.inputs = inputs
        self.name = name

    def __call__(self, keep_outputs: bool = False, whole: bool = False) -> list[Any]:
        """Run every batch; with `keep_outputs` return the hidden states (with `whole`, the output objects)."""
        outputs = []
        for position, (args, kwargs) in enumerate(self.inputs):
            try:
                output = self.block(*args, **kwargs)
            except RuntimeError as error:
                shape = tuple(hidden_of(args, kwargs).shape)
                raise ValueError(
                    f"calibration batch {position} (hidden states {shape}) failed in block {self.name}: {error}"
                ) from error
            if keep_outputs:
                outputs.append(output if whole else block_output(output))
        return outputs


# process_block(index, block_name, block, run_block), run_block a BlockRunner. `index` counts
# blocks over all stacks, in execution order.
BlockProcessor = Callable[[int, str, nn.Module, BlockRunner], None]

__all__ = ["Batch", "BlockInputs", "BlockProcessor", "BlockRunner", "calibrate_sequentially", "call_model"]


_KEYWORDS: weakref.WeakKeyDictionary[Callable[..., Any], frozenset[str] | None] = weakref.WeakKeyDictionary()


def _accepted_keywords(forward: Callable[..., Any]) -> frozenset[str] | None:
    """The parameter names of a bound `forward`, or None when it takes **kwargs; cached per
    function (inspect.signature costs ~0.1 ms per calibration batch on a transformers model)."""
    function = getattr(forward, "__func__", None)
    if function is not None and function in _KEYWORDS:
        return _KEYWORDS[function]
    parameters = inspect.signature(forward).parameters
    accepted = (
        None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()) else frozenset(parameters)
    )
    if function is not None:
        _KEYWORDS[function] = accepted
    return accepted


def call_model(model: nn.Module, batch: Batch) -> Any:
    """Default forward of a calibration batch: dicts as keyword arguments (only the ones `forward`
    accepts unless it takes **kwargs), (inputs, targets) tuples by their first element, tensors as is."""
    if isinstance(batch, dict):
        accepted = _accepted_keywords(model.forward)
        if accepted is not None:
            batch = {k: v for k, v in batch.items() if k in accepted}
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def check_finite(hiddens: list[torch.Tensor], where: str) -> None:
    """Raise when calibration activations hold NaN or Inf (nothing can be calibrated on them).

    One host sync for all batches (a check per batch would stall the device after each one).
    """
    if hiddens and not torch.stack([torch.isfinite(h).all().to(hiddens[0].device) for h in hiddens]).all():
        raise ValueError(
            f"calibration activations {where} contain NaN or Inf; check the model's weights and the batches"
        )


def _run_stack(
    stack: Stack,
    inputs: list[BlockInputs],
    capture: Capture,
    start: int,
    process_block: BlockProcessor,
    bar: Any,
    device: torch.device,
    home: torch.device,
    offload: bool,
    keep_last: bool,
) -> list[Any] | None:
    """Process the blocks of one captured stack in order; `inputs[j]` are block j's (args, kwargs),
    blocks 1.. recorded after block 0 when the capture is staged. With `keep_last`, returns the
    pruned last block's output objects per batch (what a later stack's capture hands on)."""
    name, block_list = stack
    hidden = [hidden_of(args, kwargs) for args, kwargs in inputs[0]]
    last: list[Any] | None = None
    for index, block in enumerate(block_list):
        bar.set_postfix_str(block_name(name, index))
        if offload:
            block.to(device)
        runner = BlockRunner(
            block,
            [with_hidden(args, kwargs, h) for (args, kwargs), h in zip(inputs[index], hidden)],
            block_name(name, index),
        )
        process_block(start + index, block_name(name, index), block, runner)
        if index == 0 and capture.staged:
            outputs = runner(keep_outputs=True, whole=True)
            hidden = [block_output(output) for output in outputs]
            check_finite(hidden, f"leaving block {block_name(name, index)}")
            inputs = [inputs[0], *capture.rest(outputs)]
        elif index + 1 < len(block_list):  # the last block's outputs feed nothing we keep
            hidden = runner(keep_outputs=True)
            check_finite(hidden, f"leaving block {block_name(name, index)}")
        if keep_last and index + 1 == len(block_list):
            last = outputs if index == 0 and capture.staged else runner(keep_outputs=True, whole=True)
        if offload:
            block.to(home)
        bar.update(1)
    return last


@torch.no_grad()
def calibrate_sequentially(
    model: nn.Module,
    calibration: Iterable[Batch],
    process_block: BlockProcessor,
    blocks: BlocksArgument = None,
    device: torch.device | str | None = None,
    offload: bool = False,
    forward: Callable[[nn.Module, Batch], Any] = call_model,
    progress: bool = True,
) -> list[str]:
    """For each block stack in execution order: capture every block's inputs, then for each block
    `process_block` and re-run it. Returns the names of the stacks calibrated, in that order.

    `device` is where blocks compute (default: where the model's first parameter is). With
    `offload`, the blocks stay where they are and each one visits `device` only while it runs.
    A stack the forward never reaches is left alone with a warning (an error when named in `blocks`).
    """
    stacks = find_blocks(model, blocks)
    batches = list(calibration)
    if not batches:
        raise ValueError("`calibration` yielded no batches; give at least one calibration batch")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    modes = [
        (module, module.training) for module in model.modules()
    ]  # each module's own: a pretrained submodule in eval stays in eval
    model.eval()
    all_blocks = [block for _, block_list in stacks for block in block_list]
    if offload:
        move_outside(model, all_blocks, device)
    else:
        model.to(device)
    done: list[str] = []
    bar = tqdm(total=len(all_blocks), desc="one-shot pruning", unit="block", disable=not progress)
    last_outputs: list[Any | None] = []  # per stack done: its pruned last block's output objects per batch
    try:
        remaining = list(stacks)
        start = 0
        with caches_off(model):  # the model builds no key/value caches for the calibration passes
            while remaining:
                capture = Capture(
                    model,
                    remaining,
                    batches,
                    device,
                    forward,
                    offload,
                    home,
                    earlier=list(zip([dict(stacks)[name] for name in done], last_outputs, strict=True)),
                )
                found = capture.run()
                if found is None:
                    break
                position, inputs = found
                stack = remaining.pop(position)
                check_finite([hidden_of(a, k) for a, k in inputs[0]], f"entering the first block of {stack[0]}")
                last_outputs.append(
                    _run_stack(
                        stack,
                        inputs,
                        capture,
                        start,
                        process_block,
                        bar,
                        device,
                        home,
                        offload,
                        keep_last=bool(remaining) and len(batches) > 1,
                    )
                )
                start += len(stack[1])
                done.append(stack[0])
        if remaining:
            names = [name for name, _ in remaining]
            if blocks is not None:
                raise ValueError(
                    f"`blocks`={blocks!r}: the model's forward never ran {names} on the calibration batches"
                )
            warnings.warn(
                f"the model's forward never ran the block stacks {names} "
                "on the calibration batches; they are left as they are",
                stacklevel=2,
            )
    finally:
        bar.close()
        if offload:
            move_outside(model, all_blocks, home)
        for module, training in modes:
            module.train(training)
    return done
