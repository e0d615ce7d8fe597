"""The dense model as the teacher of a later stage's distillation callback.

In one fit, `KnowledgeDistillation` copies the student in `setup`, before any pruning callback acts:
the teacher is the dense model. In a staged run a distillation stage that comes after the first
pruning stage would copy an already pruned model. For every such callback that wants the dense model
(`DenseTeacherUser.wants_dense_teacher()`: `KnowledgeDistillation` left at `teacher=None`) the run
takes one frozen copy of the student as the first pruning stage starts and hands it to them
(`use_dense_teacher`): the module's own frozen dense copy when it keeps one of exactly
those weights (`offered_dense_copy`: SentenceEncoder's reference model), so that one copy serves
both; under ModelParallelStrategy, a student an earlier stage's fit sharded is copied sharded (FSDP2
refuses deepcopy). On `resume`, that copy is rebuilt from the model as built (the first pruning
stage is the first stage) or from the checkpoint of the stage before it, which is kept for that
purpose even with `stage_checkpoints=last`.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_prune.callbacks.base import MaskingCallback
from lightning_prune.callbacks.dense_teacher import DenseTeacherUser
from lightning_prune.masking import get_masks, load_masks, remove_masks
from lightning_prune.recovery.sharded import sharded_frozen_copy, student_mesh
from lightning_prune.recovery.teacher import frozen_copy
from lightning_prune.run.checks import ConfigError
from lightning_prune.run.stages import Stage


def offered_dense_copy(module: pl.LightningModule, student: torch.nn.Module) -> torch.nn.Module | None:
    """The frozen dense copy of `student` that `module` already keeps (`module.dense_copy()`, e.g.
    SentenceEncoder's reference for its metric) when `student` is `module.model` and the copy holds
    exactly the student's weights now; else None (the caller copies the student)."""
    offer = getattr(module, "dense_copy", None)
    if not callable(offer) or getattr(module, "model", None) is not student:
        return None
    dense = offer()
    if not isinstance(dense, torch.nn.Module):
        return None
    mine, theirs = student.state_dict(), dense.state_dict()
    same = mine.keys() == theirs.keys() and all(torch.equal(mine[name], theirs[name]) for name in mine)
    return dense if same else None


class DenseTeacher:
    """Which stage is the first to prune, which later callbacks want the dense model (`DenseTeacherUser`),
    and the frozen copy once taken (`take`) or rebuilt (`rebuild`)."""

    def __init__(self, built: list[list[Callback]]) -> None:
        pruning = [
            index for index, callbacks in enumerate(built) if any(isinstance(c, MaskingCallback) for c in callbacks)
        ]
        self.first_pruning: int | None = pruning[0] if pruning else None
        self.waiting: list[tuple[int, DenseTeacherUser]] = [
            (index, callback)
            for index, callbacks in enumerate(built)
            if self.first_pruning is not None and index > self.first_pruning
            for callback in callbacks
            if isinstance(callback, DenseTeacherUser) and callback.wants_dense_teacher()
        ]

    @property
    def needed(self) -> bool:
        """True when a later stage distills with the default teacher."""
        return bool(self.waiting)

    def source_stage(self, stages: list[Stage]) -> Stage | None:
        """The last stage that runs before the first pruning stage: its checkpoint holds the dense
        weights a resumed run rebuilds the teacher from (None: the model as built is dense)."""
        if not self.needed or not self.first_pruning:
            return None
        before = [stage for stage in stages[: self.first_pruning] if not stage.is_empty]
        return before[-1] if before else None

    def take(self, module: pl.LightningModule, start: int) -> None:
        """At the first pruning stage's start: copy the (dense) student for the callbacks of stages from `start` on."""
        copies: dict[tuple[int, bool], torch.nn.Module] = {}  # callbacks distilling the same student share one copy
        for index, callback in self.waiting:
            if index >= start:
                student = callback.student(module)
                as_is = callback.shares_dense_teacher()  # False: the callback moves or casts its copy in place
                key = (id(student), as_is)
                if key not in copies:
                    mesh = student_mesh(student)
                    if (
                        mesh is not None
                    ):  # FSDP2 refuses deepcopy: a student sharded by an earlier stage is copied sharded
                        copies[key] = sharded_frozen_copy(student, mesh)
                    else:
                        offered = offered_dense_copy(module, student) if as_is else None
                        copies[key] = offered if offered is not None else frozen_copy(student)
                callback.use_dense_teacher(copies[key])

    def rebuild(self, module: pl.LightningModule, start: int, dense_state: dict[str, torch.Tensor] | Path) -> None:
        """On resume after the first pruning stage: the dense student from `dense_state` (the model's
        weights as built, or the checkpoint of the stage before the first pruning one), for the
        callbacks still to run; the module's own weights are put back afterwards."""
        if not any(index >= start for index, _ in self.waiting):
            return
        if isinstance(dense_state, Path):
            if not dense_state.is_file():
                raise ConfigError(
                    f"`resume`=True: a later stage distills from the dense model, whose weights are in {dense_state}, "
                    "but that file is gone; pass the distillation's `teacher=` a model directory, "
                    "or start a new output_dir"
                )
            # Our own stage checkpoint (a full Lightning checkpoint needs the unrestricted loader).
            dense_state = torch.load(dense_state, map_location="cpu", weights_only=False)["state_dict"]
        assert not isinstance(dense_state, Path)
        current = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        masks = {name: mask.clone() for name, mask in get_masks(module).items()}
        remove_masks(module)  # a masked module re-zeros its pruned weights after every load_state_dict
        module.load_state_dict(dense_state, strict=True)
        try:
            self.take(module, start)
        finally:
            module.load_state_dict(current, strict=True)
            load_masks(module, masks)
