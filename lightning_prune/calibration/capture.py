"""The driver's capture pass over a stack, staged (the hooks are `recorder.py`'s).

Staged (several batches and blocks): batch 0 runs the whole stack for real; the other batches stop
after block 0's arguments are recorded; blocks 1.. are recorded once block 0 is pruned, without
computing them when that is exact (`replay.py`). The arguments are the same as from running every
batch through the stack; only the time differs (one block per batch instead of the whole stack).
A later stack (a decoder) is staged the same way, and the earlier, already pruned stacks (the
encoder) compute nothing after batch 0: their blocks hand on the output objects of their last
block, as the driver computed them, where batch 0 gives the later stack's block 0 the same
arguments that way as for real (else they compute, and the replayed pass hands on what their last
block gave in this capture's passes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from lightning_prune.calibration.blocks import BlockList
from lightning_prune.calibration.calls import BlockInputs, describe_batch, to_device
from lightning_prune.calibration.recorder import Recorder, StackDone
from lightning_prune.calibration.replay import replacing, same

Forward = Callable[[nn.Module, Any], Any]
# an earlier stack, and its last block's output objects per batch from the driver (or None)
Earlier = tuple[BlockList, Sequence[Any] | None]
# stacks that compute nothing in a pass, and the output objects (by batch) they hand on
Replayed = list[tuple[BlockList, Any]]


class Capture:
    """One capture of the first of `stacks` the model's forward enters (see the module docstring).

    `run()` records batch 0 for real and, from the other batches, block 0's arguments only (the
    forward stops there); `rest(outputs)` records blocks 1.. once block 0 is pruned. Without
    `stage` every batch runs the whole stack. `earlier` are the stacks the forward runs before
    these (already pruned), each with its last block's outputs per batch as the driver computed
    them (or None): where batch 0 shows that is exact, the other batches hand those on instead of
    computing the stacks again, and the replayed pass hands on their outputs from this capture.
    """

    def __init__(
        self,
        model: nn.Module,
        stacks: Sequence[tuple[str, BlockList]],
        batches: Sequence[Any],
        device: torch.device,
        forward: Forward,
        offload: bool,
        home: torch.device,
        stage: bool = True,
        earlier: Sequence[Earlier] = (),
    ) -> None:
        self.model, self.batches, self.forward, self.stage = model, batches, forward, stage
        self.recorder = Recorder(list(stacks), device, home, offload)  # the driver pops from `stacks`
        self.earlier = [blocks for blocks, _ in earlier]
        self.kept = [outputs for _, outputs in earlier]
        # per earlier stack: its last block's output object by batch
        self.earlier_outputs: list[dict[int, Any]] = [{} for _ in self.earlier]
        # the earlier stacks that batches 1.. replay from the driver's outputs (`_replayable`)
        self.replayed: Replayed = []

    @contextmanager
    def hooked(self) -> Iterator[Recorder]:
        """The recorder's hooks on every block of every stack, removed afterwards (blocks sent home)."""
        recorder, handles = self.recorder, []
        for s, (_, blocks) in enumerate(recorder.stacks):
            for j, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(recorder.before(s, j), with_kwargs=True))
                handles.append(block.register_forward_hook(recorder.after(s, j)))
        for blocks, outputs in zip(self.earlier, self.earlier_outputs, strict=True):
            handles.append(
                blocks[len(blocks) - 1].register_forward_hook(
                    lambda m, a, o, outputs=outputs: outputs.__setitem__(recorder.batch, o)
                )
            )
        try:
            yield recorder
        finally:
            for handle in handles:
                handle.remove()
            if recorder.offload:
                for _, blocks in recorder.stacks:
                    blocks.to(recorder.home)

    def batch(
        self,
        batch_index: int,
        mode: str,
        replaced: dict[int, Callable[..., Any]] | None = None,
        earlier: Sequence[tuple[BlockList, Any]] = (),
    ) -> bool:
        """Record one batch in `mode`, with the blocks in `replaced` and every block of the `earlier`
        stacks computing nothing (those hand on their outputs for this batch); False when the
        forward entered no stack."""
        recorder = self.recorder
        recorder.batch, recorder.active, recorder.mode = batch_index, None, mode
        batch = self.batches[batch_index]
        try:
            with ExitStack() as stack:
                stack.enter_context(
                    replacing(
                        recorder.stacks[recorder.first][1] if recorder.first is not None else nn.ModuleList(),
                        replaced or {},
                    )
                )
                for blocks, outputs in earlier:
                    stack.enter_context(
                        replacing(
                            blocks,
                            dict.fromkeys(range(len(blocks)), lambda *a, outputs=outputs, **k: outputs[recorder.batch]),
                        )
                    )
                self.forward(self.model, to_device(batch, recorder.device))
        except StackDone:
            return True
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"calibration batch {batch_index} ({describe_batch(batch)}) failed in the model's forward: {error}"
            ) from error
        finally:
            recorder.mode = "real"
        if recorder.first is not None or recorder.active is not None:
            raise ValueError(
                f"calibration batch {batch_index} did not run the block stack "
                f"{recorder.stacks[recorder.first or 0][0]} that batch 0 ran"
            )
        return False

    def run(self) -> tuple[int, list[BlockInputs]] | None:
        """Run the model on every batch up to the first of the stacks its forward enters: (that
        stack's position in `stacks`, its inputs: per block, one (args, kwargs) per batch, the
        hidden states kept only for block 0), or None when the forward enters no stack.

        Blocks 1.. hold batch 0 only when the capture is `staged`: `rest` records the other batches.
        """
        with self.hooked() as recorder:
            if not self.batch(0, "real"):
                return None
            assert recorder.first is not None
            self.replayed = self._replayable()
            for batch_index in range(1, len(self.batches)):
                self.batch(batch_index, "first" if self.staged else "real", earlier=self.replayed)
        return recorder.first, recorder.records[recorder.first]

    def _replayable(self) -> Replayed:
        """The earlier stacks with the driver's outputs for every batch, when batch 0 gives block 0
        of this stack the same arguments with those stacks replayed as for real; else none."""
        kept = [
            (blocks, outputs)
            for blocks, outputs in zip(self.earlier, self.kept, strict=True)
            if outputs is not None and len(outputs) == len(self.batches)
        ]
        recorder = self.recorder
        if not kept or len(self.batches) == 1 or recorder.first is None:
            return []
        first = recorder.records[recorder.first]
        real, seen = first[0], [dict(outputs) for outputs in self.earlier_outputs]
        first[0] = []
        try:
            self.batch(0, "first", earlier=kept)
            return kept if same(real[0], first[0][0]) else []
        except ValueError:
            return []  # the model's forward needs more of the earlier stacks than their outputs: compute them
        finally:
            first[0] = real
            for outputs, before in zip(self.earlier_outputs, seen, strict=True):
                outputs.clear()
                outputs.update(before)

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
        earlier = [
            (b, o) for b, o in zip(self.earlier, self.earlier_outputs, strict=True) if len(o) == len(self.batches)
        ]  # stacks the forward ran on every batch
        with self.hooked():
            try:
                for batch_index in range(len(self.batches)):
                    self.batch(batch_index, "rest", replaced, earlier)
                if all(same(real[0], replayed[0]) for real, replayed in zip(reference[1:], recorder.records[s][1:])):
                    return recorder.records[s][1:]
            except ValueError:
                pass  # the model's loop needs what its blocks compute: run every batch for real below
            recorder.records[s] = [[] for _ in reference]
            for batch_index in range(len(self.batches)):
                self.batch(batch_index, "real", earlier=self.replayed)
        return recorder.records[s][1:]
