"""`KnowledgeDistillation` under FSDP2 (Lightning's `ModelParallelStrategy`): a teacher sharded like the
student, taken after the strategy sharded and materialized it, and saved as shards.

Lightning 2.6.6 runs callbacks' `setup` before `configure_model` (where the user calls `fully_shard`,
possibly on the meta device) and materializes the model in the strategy's setup, before
`on_fit_start`. So under FSDP2 the teacher is taken in `on_fit_start` (no pruning callback has
pruned yet: they prune from the first training batch), as a sharded copy of the student
(`recovery.sharded`). Its blocks differ on every rank, so, like mask blocks
(`callbacks/sharding.py`), they are written into the distributed checkpoint as DTensors
(`parallel/checkpoint.py`) and read back on resume, also on another number of ranks; Lightning
restores a distributed checkpoint after `on_fit_start`, so the restored teacher replaces the copy
of the freshly built model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_prune.masking import get_masks
from lightning_prune.parallel.checkpoint import load_sharded_state, save_sharded_state
from lightning_prune.parallel.sharded import is_sharded, local_tensor
from lightning_prune.recovery.sharded import copy_into_sharded, shard_teacher, sharded_frozen_copy, student_mesh


class ShardedTeacher(Callback):
    """Base of `KnowledgeDistillation`: the FSDP2 teacher, and its shards in distributed checkpoints.

    It reads the distillation settings declared below, which `KnowledgeDistillation.__init__` sets,
    and `_load_teacher`, which it defines.
    """

    teacher: nn.Module | None = None  # the frozen teacher, once taken
    teacher_source: nn.Module | str | Path | None = None  # the `teacher` argument
    teacher_device: torch.device | None = None
    teacher_dtype: torch.dtype | None = None
    _fsdp2 = False  # set in `setup`: the strategy is ModelParallelStrategy
    _checkpoint_path: str | None = None
    _copied_from: str | None = None

    @staticmethod
    def _load_teacher(student: nn.Module, path: Path) -> nn.Module:
        """The teacher saved at `path`, loaded like `student` (defined by `KnowledgeDistillation`)."""
        raise NotImplementedError

    def sharded_teacher(self, trainer: pl.Trainer, student: nn.Module) -> nn.Module:
        """The frozen teacher sharded on the student's mesh: a copy of the student, or the given module or path."""
        if self.teacher_device is not None:
            raise ValueError(
                f"`teacher_device`={str(self.teacher_device)!r}: under ModelParallelStrategy the teacher is sharded on the student's "
                "device mesh, one block per rank; leave teacher_device=None (teacher_dtype='bfloat16' halves its memory)"
            )
        mesh = student_mesh(student)
        if mesh is None:
            raise ValueError(
                f"under ModelParallelStrategy the student {type(student).__name__} has no FSDP2-sharded parameter: `fully_shard` it in `configure_model`, or set `student_attr` to the sharded module"
            )
        dtype = self.teacher_dtype
        if self.teacher_source is None:
            self._copied_from = "pruned" if get_masks(student) else "dense"
            return sharded_frozen_copy(student, mesh, dtype, share=(trainer,))
        source = self.teacher_source
        module = source if isinstance(source, nn.Module) else self._load_teacher(student, Path(source))
        return shard_teacher(module, student, mesh, dtype)  # a path is loaded whole on every rank's host, then sharded

    @property
    def teacher_key(self) -> str:
        """The teacher's key in the distributed checkpoint (one per distillation callback)."""
        return re.sub(r"\W+", "_", self.state_key).strip("_")

    def teacher_state(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """What the callback state keeps of the teacher (whole tensors: buffers, every tensor off FSDP2),
        and the names of its sharded tensors, which go to the distributed checkpoint."""
        if isinstance(self.teacher_source, (str, Path)) or self.teacher is None:
            return {}, []
        state = self.teacher.state_dict()
        whole = {name: value.detach().cpu().clone() for name, value in state.items() if not is_sharded(value)}
        return whole, sorted(name for name, value in state.items() if is_sharded(value))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        names = self.teacher_state()[1] if self._fsdp2 else []
        if names and self.teacher is not None:  # sharded blocks: into the distributed checkpoint
            state = self.teacher.state_dict()
            save_sharded_state(checkpoint, self.teacher_key, {name: state[name] for name in names})

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._checkpoint_path = getattr(trainer, "ckpt_path", None)

    def restore_sharded_teacher(self, whole: dict[str, Any], names: list[str]) -> None:
        """Load a saved teacher into the FSDP2 teacher: its shards from the distributed checkpoint being
        restored (resharded to this world size), whole tensors cut into this rank's blocks."""
        if self.teacher is None or (names and (not self._fsdp2 or self._checkpoint_path is None)):
            raise ValueError(
                f"the checkpoint's distillation teacher is sharded ({names[:3]}...), saved under ModelParallelStrategy: resume it under "
                "ModelParallelStrategy from its distributed checkpoint, or pass `teacher=` the dense model"
            )
        teacher: nn.Module = self.teacher
        copy_into_sharded(teacher, whole, every=False)
        if names:
            assert self._checkpoint_path is not None
            templates = {name: value for name, value in teacher.state_dict().items() if name in names}
            targets = dict(teacher.named_parameters()) | dict(teacher.named_buffers())
            with torch.no_grad():
                for name, block in load_sharded_state(self._checkpoint_path, self.teacher_key, templates).items():
                    local_tensor(targets[name]).copy_(block)
