"""Recording what the model's own forward gives every block of a stack (the driver's capture pass).

A pre-hook on each block records its positional and keyword arguments (with_kwargs); the forward
is stopped after the stack's last block. The hidden states of every block but the first are not
kept (the driver feeds its own); every other argument is kept by reference, so arguments the model
shares between blocks (one mask per layer type, the rotary embeddings, T5's position bias) are
stored once. Caches are dropped.

Staged (several batches and blocks): batch 0 runs the whole stack for real; the other batches stop
after block 0's arguments are recorded; blocks 1.. are recorded once block 0 is pruned, without
computing them when that is exact (`replay.py`). The arguments are the same as from running every
batch through the stack; only the time differs (one block per batch instead of the whole stack).
A later stack (a decoder) is staged the same way; in its replayed pass the earlier, already pruned
stacks (the encoder) compute nothing either: their blocks hand on the output objects their last
block gave in this capture's real passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from lightning_prune.oneshot.replay import replacing, same

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
                raise ValueError(f"calibration batch {self.batch} entered the block stack {name} at block {j}, not where batch 0 entered; name the stacks with `blocks=`")
            self.active = self.first = s
        elif self.active != s:
            raise ValueError(f"the model's forward ran {name}.{j} inside the block stack {self.stacks[self.active][0]}; stacks must run one after the other (name them with `blocks=`)")
        if self.mode == "rest" and j == 0:
            return  # block 0 replays its pruned outputs; its arguments are already recorded
        record = self.records[s][j]
        if len(record) > self.batch:
            raise ValueError(f"the model's forward ran block {name}.{j} twice in one pass (shared blocks); name another ModuleList with `blocks=`")
        args, kwargs = without_caches(tuple(args), dict(kwargs))
        hidden = hidden_of(args, kwargs)
        if j == 0:
            record.append(with_hidden(args, kwargs, hidden.clone()))
            if self.mode == "first":
                raise _StackDone
        else:
            previous = self.previous
            if previous is None or not (hidden is previous or (hidden.shape == previous.shape and torch.equal(hidden, previous))):
                raise ValueError(
                    f"block {name}.{j} does not take the output of {name}.{j - 1} as its hidden states, so its blocks cannot be calibrated one after the other; name another ModuleList with `blocks=`"
                )
            record.append(with_hidden(args, kwargs, None))
        if self.offload and self.mode == "real":
            module.to(self.device)

    def leave(self, s: int, j: int, module: nn.Module, output: Any) -> None:
        if self.offload and self.mode == "real":
            module.to(self.home)
        self.previous, self.last_output = _output_hidden(output), output
        if j == len(self.stacks[s][1]) - 1:
            self.previous = self.last_output = None
            raise _StackDone

    def replayed_output(self, *args: Any, **kwargs: Any) -> Any:
        """A replayed block's forward: the output object of the block before it."""
        return self.last_output


Forward = Callable[[nn.Module, Any], Any]


class Capture:
    """One capture of the first of `stacks` the model's forward enters (see the module docstring).

    `run()` records batch 0 for real and, from the other batches, block 0's arguments only (the
    forward stops there); `rest(outputs)` records blocks 1.. once block 0 is pruned.
    """

    def __init__(
        self,
        model: nn.Module,
        stacks: Sequence[tuple[str, nn.ModuleList]],
        batches: Sequence[Any],
        device: torch.device,
        forward: Forward,
        offload: bool,
        home: torch.device,
        stage: bool = True,
        earlier: Sequence[nn.ModuleList] = (),
    ) -> None:
        self.model, self.batches, self.forward, self.stage = model, batches, forward, stage
        self.recorder = _Recorder(list(stacks), device, home, offload)  # the driver pops from `stacks`
        self.earlier = list(earlier)
        self.earlier_outputs: list[dict[int, Any]] = [{} for _ in self.earlier]  # per earlier stack: its last block's output object by batch

    @contextmanager
    def hooked(self) -> Iterator[_Recorder]:
        """The recorder's hooks on every block of every stack, removed afterwards (blocks sent home)."""
        recorder, handles = self.recorder, []
        for s, (_, blocks) in enumerate(recorder.stacks):
            for j, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(recorder.before(s, j), with_kwargs=True))
                handles.append(block.register_forward_hook(recorder.after(s, j)))
        for blocks, outputs in zip(self.earlier, self.earlier_outputs, strict=True):
            handles.append(blocks[len(blocks) - 1].register_forward_hook(lambda m, a, o, outputs=outputs: outputs.__setitem__(recorder.batch, o)))
        try:
            yield recorder
        finally:
            for handle in handles:
                handle.remove()
            if recorder.offload:
                for _, blocks in recorder.stacks:
                    blocks.to(recorder.home)

    def batch(self, batch_index: int, mode: str, replaced: dict[int, Callable[..., Any]] | None = None) -> bool:
        """Record one batch in `mode`, with the blocks in `replaced` computing nothing (in "rest" mode
        also every block of the earlier stacks); False when the forward entered no stack."""
        recorder = self.recorder
        recorder.batch, recorder.active, recorder.mode = batch_index, None, mode
        batch = self.batches[batch_index]
        try:
            with ExitStack() as stack:
                stack.enter_context(replacing(recorder.stacks[recorder.first][1] if recorder.first is not None else nn.ModuleList(), replaced or {}))
                if mode == "rest":
                    for blocks, outputs in zip(self.earlier, self.earlier_outputs, strict=True):
                        if len(outputs) < len(self.batches):
                            continue  # the forward did not run that stack on every batch: it computes
                        stack.enter_context(replacing(blocks, dict.fromkeys(range(len(blocks)), lambda *a, outputs=outputs, **k: outputs[recorder.batch])))
                self.forward(self.model, to_device(batch, recorder.device))
        except _StackDone:
            return True
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"calibration batch {batch_index} ({describe_batch(batch)}) failed in the model's forward: {error}") from error
        finally:
            recorder.mode = "real"
        if recorder.first is not None or recorder.active is not None:
            raise ValueError(f"calibration batch {batch_index} did not run the block stack {recorder.stacks[recorder.first or 0][0]} that batch 0 ran")
        return False

    def run(self) -> tuple[int, list[BlockInputs]] | None:
        """(the captured stack's position, its inputs), or None when the forward enters no stack.

        Blocks 1.. hold batch 0 only when `complete` is False: `rest` records the other batches.
        """
        with self.hooked() as recorder:
            if not self.batch(0, "real"):
                return None
            assert recorder.first is not None
            for batch_index in range(1, len(self.batches)):
                self.batch(batch_index, "first" if self.staged else "real")
        return recorder.first, recorder.records[recorder.first]

    @property
    def staged(self) -> bool:
        """Whether blocks 1.. are recorded after block 0 is pruned (allowed, several batches and blocks)."""
        first = self.recorder.first
        return self.stage and first is not None and len(self.batches) > 1 and len(self.recorder.stacks[first][1]) > 1

    def rest(self, outputs: Sequence[Any]) -> list[BlockInputs]:
        """The inputs of blocks 1.. for every batch, given block 0's (pruned) output objects.

        Replayed (see the module docstring) when batch 0's replayed arguments equal its real ones;
        otherwise every batch runs for real through the pruned block 0.
        """
        recorder = self.recorder
        assert recorder.first is not None
        s = recorder.first
        reference = recorder.records[s]
        blocks = recorder.stacks[s][1]
        recorder.records[s] = [reference[0]] + [[] for _ in reference[1:]]
        replaced: dict[int, Callable[..., Any]] = {0: lambda *a, **k: outputs[recorder.batch]}
        replaced.update(dict.fromkeys(range(1, len(blocks)), recorder.replayed_output))
        with self.hooked():
            try:
                for batch_index in range(len(self.batches)):
                    self.batch(batch_index, "rest", replaced)
                if all(same(real[0], replayed[0]) for real, replayed in zip(reference[1:], recorder.records[s][1:])):
                    return recorder.records[s][1:]
            except ValueError:
                pass  # the model's loop needs what its blocks compute: run every batch for real below
            recorder.records[s] = [[] for _ in reference]
            for batch_index in range(len(self.batches)):
                self.batch(batch_index, "real")
        return recorder.records[s][1:]


def capture_stack(
    model: nn.Module,
    stacks: Sequence[tuple[str, nn.ModuleList]],
    batches: Sequence[Any],
    device: torch.device,
    forward: Forward,
    offload: bool,
    home: torch.device,
    stage: bool = True,
    earlier: Sequence[nn.ModuleList] = (),
) -> tuple[int, list[BlockInputs], Capture] | None:
    """Run the model on every batch up to the first of `stacks` its forward enters.

    Returns (that stack's position in `stacks`, its inputs: per block, one (args, kwargs) per batch,
    the hidden states kept only for block 0, the capture), or None when the forward enters none of
    them. When `capture.staged`, blocks 1.. hold batch 0 only until `capture.rest(...)`. Without
    `stage` every batch runs the whole stack. `earlier` are the stacks the forward runs before
    these (already pruned): the replayed pass hands on their last block's outputs from this capture
    instead of computing them again.
    """
    capture = Capture(model, stacks, batches, device, forward, offload, home, stage, earlier)
    found = capture.run()
    return None if found is None else (*found, capture)
