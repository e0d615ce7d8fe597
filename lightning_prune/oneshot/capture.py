"""Recording what the model's own forward gives every block of a stack (the driver's capture pass).

One forward of the model per calibration batch, with a pre-hook on each block that records its
positional and keyword arguments (with_kwargs); the forward is stopped after the stack's last block.
The hidden states of every block but the first are not kept (the driver feeds its own); every other
argument is kept by reference, so arguments the model shares between blocks (one mask per layer
type, the rotary embeddings, T5's position bias) are stored once. Caches are dropped.

Replay: the driver re-runs every block itself, so the capture pass needs from blocks 1.. only the
arguments the model gives them, which in transformers' stacks never depend on what those blocks
compute (masks and position embeddings are made before the loop; T5 hands block 0's position bias
on unchanged). Batch 0 runs for real, then once more with blocks 1.. returning the output object of
the block before them instead of computing; when every block's arguments are equal in both runs,
the other batches are captured that way (one block per batch instead of the whole stack); otherwise
every batch runs for real. The result is the same either way; only the time differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

Call = tuple[tuple[Any, ...], dict[str, Any]]
BlockInputs = list[Call]  # one (args, kwargs) per calibration batch
CACHE_KEYS = ("past_key_value", "past_key_values", "layer_past", "cache", "cache_params")


class _StackDone(Exception):
    """Raised after the captured stack's last block to stop the forward pass."""


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
        raise ValueError(f"a block was called without hidden states as first argument or `hidden_states=` (got {type(hidden).__name__}); name another ModuleList with `blocks=`")
    return hidden


def with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor | None) -> Call:
    """The same call with `hidden` in place of the hidden states."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _output_hidden(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


class _Recorder:
    """The hooks of one capture pass over the remaining stacks; see `capture_stack`."""

    def __init__(self, stacks: Sequence[tuple[str, nn.ModuleList]], device: torch.device, home: torch.device, offload: bool) -> None:
        self.stacks, self.device, self.home, self.offload = stacks, device, home, offload
        self.records: list[list[BlockInputs]] = [[[] for _ in blocks] for _, blocks in stacks]
        self.active: int | None = None
        self.first: int | None = None
        self.batch = 0
        self.previous: torch.Tensor | None = None
        self.last_output: Any = None
        self.replaying = False

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
                raise ValueError(f"calibration batch {self.batch} entered the block stack {name} at block {j}, not where batch 0 entered; name the stacks with `blocks=`")
            self.active = self.first = s
        elif self.active != s:
            raise ValueError(f"the model's forward ran {name}.{j} inside the block stack {self.stacks[self.active][0]}; stacks must run one after the other (name them with `blocks=`)")
        record = self.records[s][j]
        if len(record) > self.batch:
            raise ValueError(f"the model's forward ran block {name}.{j} twice in one pass (shared blocks); name another ModuleList with `blocks=`")
        args, kwargs = without_caches(tuple(args), dict(kwargs))
        hidden = hidden_of(args, kwargs)
        if j == 0:
            record.append(with_hidden(args, kwargs, hidden.clone()))
        else:
            previous = self.previous
            if previous is None or not (hidden is previous or (hidden.shape == previous.shape and torch.equal(hidden, previous))):
                raise ValueError(
                    f"block {name}.{j} does not take the output of {name}.{j - 1} as its hidden states, so its blocks cannot be calibrated one after the other; name another ModuleList with `blocks=`"
                )
            record.append(with_hidden(args, kwargs, None))
        if self.offload and not (self.replaying and j):
            module.to(self.device)

    def leave(self, s: int, j: int, module: nn.Module, output: Any) -> None:
        if self.offload and not (self.replaying and j):
            module.to(self.home)
        self.previous, self.last_output = _output_hidden(output), output
        if j == len(self.stacks[s][1]) - 1:
            self.previous = self.last_output = None
            raise _StackDone

    def replayed_output(self, *args: Any, **kwargs: Any) -> Any:
        """A replayed block's forward: the output object of the block before it."""
        return self.last_output


@contextmanager
def _replaying(recorder: _Recorder, blocks: nn.ModuleList) -> Iterator[None]:
    """Blocks 1.. of `blocks` compute nothing: their forward returns the previous block's output."""
    # An instance `forward` (accelerate's hooks put one there) is put back afterwards.
    saved = [block.__dict__.get("forward") for block in blocks]
    recorder.replaying = True
    try:
        for block in list(blocks)[1:]:
            block.forward = recorder.replayed_output
        yield
    finally:
        recorder.replaying = False
        for block, forward in zip(blocks, saved):
            if forward is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = forward


def _same(a: Any, b: Any) -> bool:
    """Equal arguments: the same object, equal tensors (shape, dtype, values), or equal containers/values."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or b is None:
        return False
    return type(a) is type(b) and isinstance(a, (bool, int, float, str)) and a == b  # other objects: not known equal


def capture_stack(
    model: nn.Module,
    stacks: Sequence[tuple[str, nn.ModuleList]],
    batches: Sequence[Any],
    device: torch.device,
    forward: Callable[[nn.Module, Any], Any],
    offload: bool,
    home: torch.device,
) -> tuple[int, list[BlockInputs]] | None:
    """Run the model on every batch up to the end of the first of `stacks` its forward enters.

    Returns (that stack's position in `stacks`, its inputs: per block, one (args, kwargs) per batch,
    the hidden states kept only for block 0), or None when the forward enters none of them.
    """
    recorder = _Recorder(stacks, device, home, offload)
    handles = []
    for s, (_, blocks) in enumerate(stacks):
        for j, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(recorder.before(s, j), with_kwargs=True))
            handles.append(block.register_forward_hook(recorder.after(s, j)))
    replay = False
    try:
        for batch_index, batch in enumerate(batches):
            if not _capture_batch(recorder, model, forward, batch, batch_index, replay):
                return None
            if batch_index == 0 and len(batches) > 1:
                replay = _replay_matches(recorder, model, forward, batch)
    finally:
        for handle in handles:
            handle.remove()
        if offload:
            for _, blocks in stacks:
                blocks.to(home)
    assert recorder.first is not None
    return recorder.first, recorder.records[recorder.first]


def _capture_batch(recorder: _Recorder, model: nn.Module, forward: Callable[[nn.Module, Any], Any], batch: Any, batch_index: int, replay: bool) -> bool:
    """Record one batch (blocks 1.. of the captured stack replayed when `replay`); False when the forward entered no stack."""
    recorder.batch, recorder.active = batch_index, None
    try:
        if replay:
            assert recorder.first is not None
            with _replaying(recorder, recorder.stacks[recorder.first][1]):
                forward(model, to_device(batch, recorder.device))
        else:
            forward(model, to_device(batch, recorder.device))
    except _StackDone:
        return True
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"calibration batch {batch_index} ({describe_batch(batch)}) failed in the model's forward: {error}") from error
    if recorder.first is not None or recorder.active is not None:
        raise ValueError(f"calibration batch {batch_index} did not run the block stack {recorder.stacks[recorder.first or 0][0]} that batch 0 ran")
    return False


def _replay_matches(recorder: _Recorder, model: nn.Module, forward: Callable[[nn.Module, Any], Any], batch: Any) -> bool:
    """Capture batch 0 again with blocks 1.. replayed; True when every block got the same arguments."""
    assert recorder.first is not None
    real = recorder.records[recorder.first]
    recorder.records[recorder.first] = [[] for _ in real]
    try:
        _capture_batch(recorder, model, forward, batch, 0, replay=True)
        replayed = recorder.records[recorder.first]
        return all(len(r) == 1 and _same(r[0], p[0]) for r, p in zip(real, replayed))
    except ValueError:
        # The model's loop needs what its blocks compute (it failed without it); batch 0 was
        # captured for real, and so will every other batch be: same result, only slower.
        return False
    finally:
        recorder.records[recorder.first] = real
