"""`KnowledgeDistillation`: add a distillation loss from a frozen dense teacher to the training loss."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from transformers import AutoConfig

from lightning_prune.callbacks.distill_sharded import ShardedTeacherState, sharded_teacher, teacher_state
from lightning_prune.callbacks.distill_step import DistilledStep
from lightning_prune.callbacks.lora import wrapped_network
from lightning_prune.callbacks.strategy import is_fsdp2
from lightning_prune.masking import get_masks
from lightning_prune.recovery.compat import check_sizes, check_teacher_fits, resolve_layers
from lightning_prune.recovery.losses import DISTILL_LOSSES
from lightning_prune.recovery.teacher import (
    Call,
    freeze,
    frozen_copy,
    place_teacher,
    resolve_teacher_device,
    resolve_teacher_dtype,
)
from lightning_prune.validation import check_number


class KnowledgeDistillation(Callback):
    """Train with `α·task + (1−α)·KD`, KD measured against a frozen teacher (Hinton et al., 2015).

    KD compares the student (`pl_module.<student_attr>`, default `pl_module.model` or `pl_module`) with
    the teacher on the inputs of every call `training_step` makes to it: `loss="kl"` on logits, `"mse"` /
    `"cosine"` on the last hidden state or on `layers`; automatic optimization only. The teacher is
    `teacher` (a module or a local `from_pretrained` directory) or a frozen copy of the student taken
    before any pruning callback acts; left at None in a staged run, it is the dense model the run hands
    to a `DenseTeacherUser`. Why and how: README.md, "Recovery" and "Stages and resume".

    Lifecycle: `preflight` (before any training) and `setup(fit)` check `layers` and a given teacher's
    sizes; `setup(fit)` takes the teacher (under FSDP2 `on_fit_start`, sharded like the student:
    `callbacks/distill_sharded.py`); `on_train_start` hooks the student and wraps
    `pl_module.training_step` (`callbacks/distill_step.py`); `teardown(fit)` undoes both. `state_dict`
    keeps `alpha`, `temperature` and the teacher's weights: a resumed fit distills from the same teacher.

    Example (a config's `callbacks:` entry; every key is an argument, shown with its default)::

        distill:
          _target_: lightning_prune.KnowledgeDistillation
          alpha: 0.5            # weight of the task loss; 0 = pure distillation (no labels)
          temperature: 2.0      # softmax temperature of the KL on logits
          loss: kl              # kl | mse | cosine
          layers: null          # null = logits / last hidden state; or block indices / module names
          teacher: null         # null = frozen dense copy of the student; or a local model directory
          teacher_device: null  # null = the student's device; cpu saves accelerator memory
          teacher_dtype: null   # null = as loaded; bfloat16 halves the teacher's memory
          student_attr: null    # null = the LightningModule's `model`, else the module itself
    """

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 2.0,
        loss: str = "kl",
        layers: Sequence[int | str] | None = None,
        teacher: nn.Module | str | None = None,
        teacher_device: str | torch.device | None = None,
        teacher_dtype: str | torch.dtype | None = None,
        student_attr: str | None = None,
    ) -> None:
        self.alpha = check_number(alpha, "alpha", low=0.0, high=1.0)
        self.temperature = check_number(temperature, "temperature", low=0.0, low_open=True)
        if loss not in DISTILL_LOSSES:
            raise ValueError(f"`loss` must be one of {DISTILL_LOSSES}, got {loss!r}")
        if loss == "kl" and layers is not None:
            raise ValueError(f"`loss`='kl' compares logits; `layers`={layers!r} needs loss='mse' or 'cosine'")
        if teacher is not None and not isinstance(teacher, (nn.Module, str, Path)):
            raise ValueError(f"`teacher` must be None, an nn.Module or a model directory, got {type(teacher).__name__}")
        self.loss = loss
        self.layers = list(layers) if layers is not None else None
        self.teacher_source = teacher
        self.teacher_device = resolve_teacher_device(teacher_device)
        self.teacher_dtype = resolve_teacher_dtype(teacher_dtype)
        self.student_attr = student_attr
        self.teacher: nn.Module | None = None
        self.warnings_recorded: list[dict[str, Any]] = []
        self._restored_teacher: dict[str, torch.Tensor] = {}
        self._copied_from: str | None = None  # set when this fit copied the student: "dense" or "pruned"
        self._restored = False
        self._layer_names: list[str] = []
        self._step: DistilledStep | None = None
        self._fsdp2 = False  # set in `setup`: the strategy is ModelParallelStrategy
        self._sharded = ShardedTeacherState(self.state_key)  # under FSDP2, the teacher's blocks in checkpoints

    @property
    def state_key(self) -> str:
        return self._generate_state_key(loss=self.loss, layers=str(self.layers))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fsdp2 = is_fsdp2(trainer.strategy)
        if stage == "fit" and not self._fsdp2:
            self.prepare(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fsdp2:  # sharded and materialized now; masking callbacks prune from the first batch on
            self.prepare(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.warn_about_the_copy(resuming=trainer.ckpt_path is not None)
        self.attach(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.detach(pl_module)

    def student(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module distilled: `pl_module.<student_attr>`, else `pl_module.model` or `pl_module`."""
        if self.student_attr is None:
            return wrapped_network(pl_module)
        found = getattr(pl_module, self.student_attr, None)
        if not isinstance(found, nn.Module):
            raise ValueError(f"`student_attr`={self.student_attr!r} names no nn.Module of {type(pl_module).__name__}")
        return found

    def wants_dense_teacher(self) -> bool:
        """True when left at `teacher=None`: a staged run gives it the dense model (`DenseTeacherUser`)."""
        return self.teacher_source is None

    def shares_dense_teacher(self) -> bool:
        """False when `teacher_device` or `teacher_dtype` move or cast the teacher in place."""
        return self.teacher_device is None and self.teacher_dtype is None

    def use_dense_teacher(self, teacher: nn.Module) -> None:
        """Distill from `teacher`, the run's frozen dense copy of the student, as if given as `teacher=`."""
        self.teacher_source = teacher

    def preflight(self, pl_module: nn.Module, trainer: pl.Trainer | None = None) -> None:
        """Before any training: the student exists, `layers` name its modules, and a given teacher fits it."""
        student = self.student(pl_module)  # type: ignore[arg-type]
        self._layer_names = resolve_layers(student, self.layers)
        if isinstance(self.teacher_source, nn.Module):
            check_teacher_fits(student, self.teacher_source, self.loss, self._layer_names)
        elif self.teacher_source is not None:
            path = Path(self.teacher_source)
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"`teacher`={str(path)!r} must be a local model directory with config.json (from save_pretrained)"
                )
            check_sizes(
                student, AutoConfig.from_pretrained(str(path), local_files_only=True), str(path), self.loss
            )  # the config only: cheap

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Preflight, the teacher (taken once: a later fit with this callback keeps it), and its fit to the student."""
        self.preflight(pl_module)
        self._copied_from, self._restored = None, False
        if self.teacher is None:
            self.take_teacher(trainer, pl_module)
        assert self.teacher is not None
        check_teacher_fits(self.student(pl_module), self.teacher, self.loss, self._layer_names)

    def take_teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the frozen teacher: a copy of the student now, the given module, or one loaded from a path."""
        student = self.student(pl_module)
        if self._fsdp2:  # restored after this from the distributed checkpoint (`load_state_dict`), if any
            self.teacher = self.sharded_teacher(trainer, student)
            return
        if self.teacher_source is None:
            self._copied_from = "pruned" if get_masks(student) else "dense"
            teacher = frozen_copy(student, share=(trainer,))
        elif isinstance(self.teacher_source, nn.Module):
            teacher = freeze(self.teacher_source)
        else:
            teacher = freeze(self._load_teacher(student, Path(self.teacher_source)))
        if self._restored_teacher:
            teacher.load_state_dict(self._restored_teacher)
            self._restored_teacher, self._restored = {}, True
        self.teacher = place_teacher(teacher, self.teacher_device, self.teacher_dtype)

    def sharded_teacher(self, trainer: pl.Trainer, student: nn.Module) -> nn.Module:
        """Under FSDP2, the frozen teacher sharded on the student's mesh (`distill_sharded.sharded_teacher`)."""
        if self.teacher_source is None:
            self._copied_from = "pruned" if get_masks(student) else "dense"
        source, device, dtype = self.teacher_source, self.teacher_device, self.teacher_dtype
        return sharded_teacher(trainer, student, source, device, dtype, self._load_teacher)

    @staticmethod
    def _load_teacher(student: nn.Module, path: Path) -> nn.Module:
        loader = getattr(type(student), "from_pretrained", None)
        if loader is None:
            raise ValueError(
                f"`teacher`={str(path)!r} is a path, but the student {type(student).__name__} has no "
                "`from_pretrained` to load it; pass the module"
            )
        teacher: nn.Module = loader(str(path), local_files_only=True)
        return teacher

    def warn_about_the_copy(self, resuming: bool) -> None:
        """Say (and record) when the copied teacher is not the dense model the run expects."""
        if self._copied_from is None or self._restored:
            return
        if resuming:
            self.record_warning(
                "teacher_not_in_checkpoint",
                "KnowledgeDistillation: the checkpoint holds no teacher for this callback, so the teacher is a copy "
                "of the model as passed to fit, before the checkpoint's weights were loaded; pass `teacher=` to "
                "choose it",
            )
        elif self._copied_from == "pruned":
            self.record_warning(
                "pruned_teacher",
                "KnowledgeDistillation: the model already had pruning masks at fit start, so the teacher is a copy "
                "of the pruned model, not of the dense one; pass `teacher=` the dense model (or its directory)",
            )

    def record_warning(self, kind: str, message: str) -> None:
        """Warn (UserWarning) and keep the warning in `warnings_recorded` for the run's results."""
        warnings.warn(message, UserWarning, stacklevel=2)
        self.warnings_recorded.append({"kind": kind, "message": message})

    def attach(self, pl_module: pl.LightningModule) -> None:
        """Hook the student, move the teacher to its device, and wrap `pl_module.training_step`."""
        if self.teacher is None:
            raise ValueError(
                "KnowledgeDistillation has no teacher: it is taken in `setup(stage='fit')`; run it inside Trainer.fit"
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "KnowledgeDistillation adds its loss to what training_step returns, but "
                f"{type(pl_module).__name__} uses manual optimization (automatic_optimization=False), which ignores "
                "it; call `recovery.distill_loss` in your training_step instead"
            )
        if self.teacher_device is None and not self._fsdp2:
            self.teacher.to(pl_module.device)
        self._step = DistilledStep(self, pl_module, self.student(pl_module), self._layer_names)  # hooks the student
        # Lightning (2.6.6) has no hook that replaces the loss; its strategies, DDP's forward redirection
        # included, look `training_step` up on the instance, so an instance attribute wraps the class's method.
        original = type(pl_module).training_step.__get__(pl_module)
        step = functools.wraps(original)(functools.partial(self._step, original))
        pl_module.training_step = step  # type: ignore[method-assign]

    def detach(self, pl_module: pl.LightningModule) -> None:
        """Remove the hooks and the `training_step` wrapper; a teacher that follows the student goes to the
        CPU, as Lightning's strategies move the module there at teardown (the next fit moves it back)."""
        if self._step is not None:
            self._step.remove()
            self._step = None
        pl_module.__dict__.pop("training_step", None)
        if self.teacher is not None and self.teacher_device is None and not self._fsdp2:
            self.teacher.to(torch.device("cpu"))

    def kd_loss(self, calls: list[Call]) -> torch.Tensor:
        """The distillation loss averaged over the student calls of one training step (`DistilledStep.kd_loss`)."""
        assert self._step is not None, "KnowledgeDistillation computes its loss inside fit, once `on_train_start` ran"
        return self._step.kd_loss(calls)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._fsdp2:  # sharded blocks: into the distributed checkpoint
            self._sharded.save(checkpoint, self.teacher, self.teacher_source)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._sharded.checkpoint_path = getattr(trainer, "ckpt_path", None)

    def state_dict(self) -> dict[str, Any]:
        # sharded blocks go to the distributed checkpoint (`on_save_checkpoint`)
        teacher, sharded = teacher_state(self.teacher, self.teacher_source)
        state = {
            "alpha": self.alpha,
            "temperature": self.temperature,
            "loss": self.loss,
            "teacher_taken": self.teacher is not None,
        }
        return {**state, "teacher": teacher or dict(self._restored_teacher), "sharded_teacher": sharded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alpha = float(state_dict.get("alpha", self.alpha))
        self.temperature = float(state_dict.get("temperature", self.temperature))
        saved = dict(state_dict.get("teacher", {}))
        self._restored = bool(state_dict.get("teacher_taken", False))
        if self._fsdp2 or state_dict.get("sharded_teacher"):  # the teacher is taken (on_fit_start) before this
            self._sharded.restore(self.teacher, saved, list(state_dict.get("sharded_teacher", [])), self._fsdp2)
        elif saved and self.teacher is not None:  # restored after `setup`: the usual order
            self.teacher.load_state_dict(saved)
        else:
            self._restored_teacher = saved
