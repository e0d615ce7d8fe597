"""`DenseTeacherUser`: how a callback declares that it distills from the dense model.

In one fit a distillation callback can copy the student itself before any pruning callback acts.
In a staged run a stage after the first pruning stage sees an already pruned model, so the run
(`run/dense_teacher.py`) takes one frozen copy of the student as the first pruning stage starts and
hands it to every later callback that declares this protocol; it never needs the callback's class.
`KnowledgeDistillation` implements it; a callback of your own can too.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import lightning.pytorch as pl
from torch import nn


@runtime_checkable
class DenseTeacherUser(Protocol):
    """A callback that wants a frozen copy of the dense student as its teacher in a staged run."""

    def wants_dense_teacher(self) -> bool:
        """True when it has no teacher of its own and distills from the dense model (asked once, as the run starts)."""
        ...

    def student(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module of `pl_module` whose dense copy is the teacher."""
        ...

    def shares_dense_teacher(self) -> bool:
        """True when it uses the teacher as given, so that callbacks distilling the same student share one
        copy (and the module's own `dense_copy()`); False when it moves or casts its teacher in place."""
        ...

    def use_dense_teacher(self, teacher: nn.Module) -> None:
        """Take `teacher`, a frozen dense copy of `student(pl_module)`, as the teacher of its later fits."""
        ...
