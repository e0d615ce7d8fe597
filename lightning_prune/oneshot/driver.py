"""Sequential calibration, block by block, for any model with a `ModuleList` of blocks.

Both papers' drivers, generic (DESIGN, "Sequential calibration"): run the calibration batches up
to the first block and capture its positional and keyword arguments; then for each block, let the
caller collect statistics and prune (`process_block`), and run the pruned block again so that its
outputs feed the next block. Buffers are the captured batches themselves: nothing is sized by the
model's maximum context. With `offload=True` only the current block sits on the compute device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

Batch = Any
BlockInputs = list[tuple[tuple[Any, ...], dict[str, Any]]]


class BlockRunner:
    """The `run_block` a BlockProcessor gets: `run_block()` forwards every captured batch through
    the block so that the caller's hooks see its layers' inputs; `run_block(keep_outputs=True)` also
    returns the block's outputs, and `run_block.inputs` are the captured (args, kwargs) themselves
    (what block reconstruction tunes on)."""

    def __init__(self, block: nn.Module, inputs: BlockInputs, name: str = "block") -> None:
        self.block = block
        self.inputs = inputs
        self.name = name

    def __call__(self, keep_outputs: bool = False) -> list[torch.Tensor]:
        outputs = []
        for position, (args, kwargs) in enumerate(self.inputs):
            try:
                output = self.block(*args, **kwargs)
            except RuntimeError as error:
                shape = tuple(_hidden(args, kwargs).shape)
                raise ValueError(f"calibration batch {position} (hidden states {shape}) failed in block {self.name}: {error}") from error
            if keep_outputs:
                outputs.append(_block_output(output))
        return outputs


# process_block(index, block_name, block, run_block), run_block a BlockRunner.
BlockProcessor = Callable[[int, str, nn.Module, BlockRunner], None]


class _ReachedFirstBlock(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


def find_blocks(model: nn.Module, blocks: str | nn.ModuleList | None = None) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks, as (qualified name, ModuleList).

    `blocks` names it explicitly (e.g. "model.layers"); by default the `ModuleList` of same-class
    children holding the most parameters (Llama/Mistral/Qwen2 `model.layers`, OPT
    `model.decoder.layers`, GPT-2 `transformer.h`, BERT `encoder.layer`, ...).
    """
    if isinstance(blocks, nn.ModuleList):
        name = next((n for n, m in model.named_modules() if m is blocks), None)
        if name is None:
            raise ValueError("`blocks` is a ModuleList that is not part of the model")
        return name, blocks
    if isinstance(blocks, str):
        found = dict(model.named_modules()).get(blocks)
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ValueError(f"`blocks`={blocks!r} must name a non-empty nn.ModuleList of the model, got {type(found).__name__}")
        return blocks, found
    if blocks is not None:
        raise ValueError(f"`blocks` must be None, a module name or an nn.ModuleList, got {blocks!r}")
    candidates = [
        (sum(p.numel() for p in m.parameters()), -name.count("."), name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    if not candidates:
        raise ValueError(
            f"found no nn.ModuleList of transformer blocks in {type(model).__name__}; name the list of blocks "
            "with `blocks=` (e.g. blocks='model.layers'), or wrap your blocks in an nn.ModuleList"
        )
    _, _, name, found = max(candidates, key=lambda c: (c[0], c[1]))
    return name, found


def to_device(value: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def call_model(model: nn.Module, batch: Batch) -> Any:
    """Default forward of a calibration batch: dicts as keyword arguments (only the ones `forward`
    accepts unless it takes **kwargs), (inputs, targets) tuples by their first element, tensors as is."""
    if isinstance(batch, dict):
        parameters = inspect.signature(model.forward).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            batch = {k: v for k, v in batch.items() if k in parameters}
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def describe_batch(batch: Batch) -> str:
    """Shapes of a batch's tensors, for error messages."""
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k!r}: {describe_batch(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(describe_batch(v) for v in batch) + ")"
    return type(batch).__name__


def _drop_caches(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Key/value caches would grow on every re-run of a block: calibration runs without them."""
    out = {}
    for key, value in kwargs.items():
        is_cache = type(value).__name__.endswith("Cache") or key in ("past_key_value", "past_key_values", "layer_past")
        out[key] = None if is_cache else (False if key == "use_cache" else value)
    return out


def _check_finite(hiddens: list[torch.Tensor], where: str) -> None:
    """One host sync for all batches (a check per batch would stall the device after each one)."""
    finite = torch.stack([torch.isfinite(h).all().to(hiddens[0].device) for h in hiddens]).all()
    if not finite:
        raise ValueError(f"calibration activations {where} contain NaN or Inf; check the model's weights and the batches")


def capture_block_inputs(model: nn.Module, first_block: nn.Module, calibration: Iterable[Batch], device: torch.device, forward: Callable[[nn.Module, Batch], Any] = call_model) -> BlockInputs:
    """Run each batch up to `first_block` and keep the (args, kwargs) it would have received."""
    captured: BlockInputs = []

    def stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((tuple(args), _drop_caches(dict(kwargs))))
        raise _ReachedFirstBlock

    handle = first_block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for index, batch in enumerate(calibration):
            try:
                forward(model, to_device(batch, device))
            except _ReachedFirstBlock:
                pass
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"calibration batch {index} ({describe_batch(batch)}) failed before the first block: {error}") from error
    finally:
        handle.remove()
    if not captured:
        raise ValueError("`calibration` yielded no batches that reached the first block; give at least one calibration batch")
    _check_finite([_hidden(args, kwargs) for args, kwargs in captured], "entering the first block")
    return captured


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first element of a tuple/ModelOutput)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside `blocks` to `device`."""
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) not in inside:
            module._apply(lambda t: t.to(device), recurse=False)


@torch.no_grad()
def calibrate_sequentially(
    model: nn.Module,
    calibration: Iterable[Batch],
    process_block: BlockProcessor,
    blocks: str | nn.ModuleList | None = None,
    device: torch.device | str | None = None,
    offload: bool = False,
    forward: Callable[[nn.Module, Batch], Any] = call_model,
    progress: bool = True,
) -> None:
    """Capture the first block's inputs, then for each block: `process_block`, then re-run it.

    `device` is where blocks compute (default: where the model's first parameter is). With
    `offload`, the blocks stay where they are and each one visits `device` only while processed.
    """
    blocks_name, block_list = find_blocks(model, blocks)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    if offload:
        _move_outside_blocks(model, block_list, device)
    else:
        model.to(device)
    try:
        inputs = capture_block_inputs(model, block_list[0], calibration, device, forward)
        bar = tqdm(total=len(block_list), desc="one-shot pruning", unit="block", disable=not progress)
        for index, block in enumerate(block_list):
            bar.set_postfix_str(f"{blocks_name}.{index}")
            if offload:
                block.to(device)
            process_block(index, f"{blocks_name}.{index}", block, BlockRunner(block, inputs, f"{blocks_name}.{index}"))
            if index + 1 < len(block_list):  # the last block's outputs feed nothing
                for position, (args, kwargs) in enumerate(inputs):
                    inputs[position] = _with_hidden(args, kwargs, _block_output(block(*args, **kwargs)))
                _check_finite([_hidden(*pair) for pair in inputs], f"leaving block {blocks_name}.{index}")
            if offload:
                block.to(home)
            bar.update(1)
        bar.close()
    finally:
        if offload:
            _move_outside_blocks(model, block_list, home)
        model.train(was_training)
