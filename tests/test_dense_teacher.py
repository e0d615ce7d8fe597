"""The dense-teacher declaration (`DenseTeacherUser`): the run hands the dense copy to any callback that
declares it, and `KnowledgeDistillation`'s docstring example is its real constructor."""

from __future__ import annotations

import inspect
import re

import lightning.pytorch as pl
import torch
import yaml
from hydra.utils import instantiate
from torch import nn

from lightning_prune import KnowledgeDistillation, OneShotPruning
from lightning_prune.callbacks import DenseTeacherUser
from lightning_prune.run.dense_teacher import DenseTeacher
from tests.conftest import TinyCausalLM, tiny_llama


class MyDistiller(pl.Callback):
    """A user's own callback (no KnowledgeDistillation) that wants the dense model as its teacher."""

    def __init__(self) -> None:
        self.teacher: nn.Module | None = None

    def wants_dense_teacher(self) -> bool:
        return self.teacher is None

    def student(self, pl_module: pl.LightningModule) -> nn.Module:
        return pl_module.model  # type: ignore[no-any-return]

    def shares_dense_teacher(self) -> bool:
        return True

    def use_dense_teacher(self, teacher: nn.Module) -> None:
        self.teacher = teacher


def test_a_users_callback_that_declares_it_gets_the_frozen_dense_copy_shared_with_distillation() -> None:
    module = TinyCausalLM(tiny_llama())
    dense = {name: tensor.clone() for name, tensor in module.model.state_dict().items()}
    mine, kd, cast = MyDistiller(), KnowledgeDistillation(), KnowledgeDistillation(teacher_dtype="bfloat16")
    given = KnowledgeDistillation(teacher=tiny_llama(seed=1))
    early = MyDistiller()  # in the first pruning stage: it copies the model itself, before pruning acts
    assert isinstance(mine, DenseTeacherUser) and isinstance(kd, DenseTeacherUser) and not given.wants_dense_teacher()
    teachers = DenseTeacher([[OneShotPruning(method="wanda"), early], [mine, kd, cast, given]])
    assert [callback for _, callback in teachers.waiting] == [mine, kd, cast]
    teachers.take(module, 0)
    assert mine.teacher is not None and mine.teacher is kd.teacher_source and cast.teacher_source is not mine.teacher
    assert mine.teacher is not module.model and early.teacher is None
    assert all(not p.requires_grad for p in mine.teacher.parameters())
    teacher_state = mine.teacher.state_dict()
    assert teacher_state.keys() == dense.keys() and all(torch.equal(teacher_state[name], dense[name]) for name in dense)
    with torch.no_grad():
        module.model.lm_head.weight.zero_()  # the student changes; its teacher does not
    assert torch.equal(mine.teacher.state_dict()["lm_head.weight"], dense["lm_head.weight"])


def test_the_docstring_example_is_every_constructor_argument_with_its_default() -> None:
    doc = inspect.getdoc(KnowledgeDistillation)
    assert doc is not None
    example = yaml.safe_load(re.search(r"::\n\n(.*)", doc, re.S).group(1))["distill"]  # type: ignore[union-attr]
    parameters = inspect.signature(KnowledgeDistillation.__init__).parameters
    assert [key for key in example if key != "_target_"] == [name for name in parameters if name != "self"]
    assert all(example[name] == parameters[name].default for name in parameters if name != "self")
    built = instantiate(example)
    assert isinstance(built, KnowledgeDistillation) and (built.alpha, built.temperature, built.loss) == (0.5, 2.0, "kl")
