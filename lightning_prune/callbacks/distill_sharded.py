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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_prune.parallel.checkpoint import load_sharded_state, save_sharded_state
from lightning_prune.parallel.sharded import is_sharded, local_tensor
from lightning_prune.recovery.sharded import copy_into_sharded, shard_teacher, sharded_frozen_copy, student_mesh


def sharded_teacher(
    trainer: pl.Trainer,
    student: nn.Module,
    source: nn.Module | str | Path | None,
    device: torch.device | None,
    dtype: torch.dtype | None,
    load: Callable[[nn.Module, Path], nn.Module],
) -> nn.Module:
    """The frozen teacher sharded on the student's mesh: a copy of the student (`source` None), or the
    given module, or the one `load(student, path)` reads from the path `source`."""
    if device is not None:
        raise ValueError(
            f"`teacher_device`={str(device)!r}: under ModelParallelStrategy the teacher is sharded on the "
            "student's device mesh, one block per rank; leave teacher_device=None (teacher_dtype='bfloat16' "
            "halves its memory)"
        )
    mesh = student_mesh(student)
    if mesh is None:
        raise ValueError(
            f"under ModelParallelStrategy the student {type(student).__name__} has no FSDP2-sharded parameter: "
            "`fully_shard` it in `configure_model`, or set `student_attr` to the sharded module"
        )
    if source is None:
        return sharded_frozen_copy(student, mesh, dtype, share=(trainer,))
    module = source if isinstance(source, nn.Module) else load(student, Path(source))
    return shard_teacher(module, student, mesh, dtype)  # a path is loaded whole on every rank's host, then sharded


def teacher_state(
    teacher: nn.Module | None, source: nn.Module | str | Path | None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """What a callback state keeps of the teacher (whole tensors: buffers, every tensor off FSDP2), and
    the names of its sharded tensors, which go to the distributed checkpoint; nothing of a teacher
    given as a path (it is reloaded from the path)."""
    if isinstance(source, (str, Path)) or teacher is None:
        return {}, []
    state = teacher.state_dict()
    whole = {name: value.detach().cpu().clone() for name, value in state.items() if not is_sharded(value)}
    return whole, sorted(name for name, value in state.items() if is_sharded(value))


class ShardedTeacherState:
    """Under FSDP2, the teacher's blocks of one distillation callback, in the distributed checkpoint.

    Made by the callback with its `state_key`; the callback's `on_load_checkpoint` sets
    `checkpoint_path`, and its state lists the names of the sharded tensors that `save` wrote.
    """

    def __init__(self, state_key: str) -> None:
        self.key = re.sub(r"\W+", "_", state_key).strip("_")  # the teacher's key in the distributed checkpoint
        self.checkpoint_path: str | None = None  # the checkpoint being restored

    def save(self, checkpoint: dict, teacher: nn.Module | None, source: nn.Module | str | Path | None) -> None:
        """Put this rank's blocks of `teacher` into the checkpoint's distributed `state_dict`."""
        names = teacher_state(teacher, source)[1]
        if names and teacher is not None:
            state = teacher.state_dict()
            save_sharded_state(checkpoint, self.key, {name: state[name] for name in names})

    def restore(self, teacher: nn.Module | None, whole: dict[str, Any], names: list[str], fsdp2: bool) -> None:
        """Load a saved teacher into the FSDP2 `teacher`: its shards (`names`) from the distributed checkpoint
        being restored (resharded to this world size), `whole` tensors cut into this rank's blocks."""
        if teacher is None or (names and (not fsdp2 or self.checkpoint_path is None)):
            raise ValueError(
                f"the checkpoint's distillation teacher is sharded ({names[:3]}...), saved under "
                "ModelParallelStrategy: resume it under ModelParallelStrategy from its distributed checkpoint, or "
                "pass `teacher=` the dense model"
            )
        copy_into_sharded(teacher, whole, every=False)
        if names:
            assert self.checkpoint_path is not None
            templates = {name: value for name, value in teacher.state_dict().items() if name in names}
            targets = dict(teacher.named_parameters()) | dict(teacher.named_buffers())
            with torch.no_grad():
                for name, block in load_sharded_state(self.checkpoint_path, self.key, templates).items():
                    local_tensor(targets[name]).copy_(block)
