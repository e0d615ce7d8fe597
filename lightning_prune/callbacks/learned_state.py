"""The checkpoint state of `LearnedSparsity`: its schedule clock, and the logits with their AdamW state
(`learned.state`), whole in the callback's state, or under FSDP2 as row blocks in the distributed checkpoint."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lightning_prune.callbacks.base import MaskingCallback
from lightning_prune.callbacks.sharding import Blocks
from lightning_prune.learned import LearnedMasks
from lightning_prune.learned.state import BLOCK_KINDS, block_layout, learning_state, load_learning_state
from lightning_prune.parallel.sharded import local_tensor


class LearnedState(MaskingCallback):
    """`MaskingCallback` whose state adds a learned mask's: `step` (the schedules' clock), `converted` (the
    argmax became the masks) and, while learning, the logits and their optimizer (`learner`, `optimizer`).
    A checkpoint restored before the learner exists waits in `_restored_learning` for `start_learning`."""

    step: int
    converted: bool
    memory: dict[str, float]
    learner: LearnedMasks | None
    optimizer: torch.optim.Optimizer | None
    _restored_learning: dict[str, Any]
    _learning_blocks: dict[str, dict[str, torch.Tensor]]  # FSDP2: this rank's row blocks from the checkpoint

    def sharded_blocks(self) -> Blocks:
        """Under FSDP2: the masks, and while learning this rank's row blocks of the logits and Adam's moments."""
        blocks = super().sharded_blocks()
        if self.learner is not None and self.optimizer is not None:
            blocks = {**blocks, **learning_state(self.learner, self.optimizer)[1]}
        return blocks

    def sharded_layout(self, kind: str, name: str) -> tuple[tuple[int, ...], torch.dtype] | None:
        """Row blocks of the logits and Adam's moments: (rows, groups·C) in the logits' dtype."""
        if kind in BLOCK_KINDS and self.learner is not None:
            return block_layout(self.learner, name)
        return super().sharded_layout(kind, name)

    def restore_blocks(self, kind: str, blocks: dict[str, DTensor]) -> None:
        """The masks (`MaskingCallback`), or row blocks of the learning state, kept for `load_state_dict`."""
        if kind not in BLOCK_KINDS:
            return super().restore_blocks(kind, blocks)
        self._learning_blocks[kind] = {name: local_tensor(block) for name, block in blocks.items()}

    def state_dict(self) -> dict[str, Any]:
        learning: dict[str, Any] = dict(self._restored_learning)
        if self.learner is not None and self.optimizer is not None:
            learning = learning_state(self.learner, self.optimizer)[0]
        return {**super().state_dict(), "step": self.step, "converted": self.converted, "learning": learning}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._learning_blocks = {}
        super().load_state_dict(state_dict)  # FSDP2: this rank's row blocks come back through `restore_blocks`
        self.step = int(state_dict.get("step", 0))
        self.converted = bool(state_dict.get("converted", False))
        learning = dict(state_dict.get("learning", {}))
        if learning and self.learner is not None and self.optimizer is not None:  # restored after `on_fit_start`
            load_learning_state(self.learner, self.optimizer, learning, self._learning_blocks)
            self.memory = self.learner.memory(self.optimizer)
        else:
            self._restored_learning = learning
