"""`KnowledgeDistillation`: add a distillation loss from a frozen dense teacher to the training loss."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_prune.callbacks.lora import wrapped_network
from lightning_prune.recovery.losses import DISTILL_LOSSES, distill_loss, mix_losses
from lightning_prune.recovery.teacher import Call, OutputCapture, freeze, frozen_copy, main_output, resolve_layers, run_teacher

TEACHER_DTYPES = (None, "float32", "bfloat16", "float16")


class KnowledgeDistillation(Callback):
    """Train with `α·task + (1−α)·KD`, KD measured against a frozen teacher (Hinton et al., 2015).

    The teacher is, by default, a frozen copy of the student taken in `setup(stage="fit")`, which
    Lightning runs before any callback's `on_fit_start` — so before OneShotPruning, GradualPruning
    or LoRARecovery change the model, whatever the order of the callbacks. It can also be a module
    or a local `from_pretrained` directory. It is a plain attribute of this callback, outside the
    LightningModule's module tree: pruning callbacks never see it, the optimizer never updates it,
    it has no masks, and under DDP every rank holds its own copy.

    The student is `pl_module.<student_attr>` (default: `pl_module.model` when it is a module, else
    `pl_module`). Hooks on it capture the inputs and outputs of every call that `training_step`
    makes; the teacher runs on the same inputs (inside the same autocast, so AMP applies to both)
    and the KD loss is mixed into what `training_step` returns. KD is `loss="kl"` on logits with
    `temperature`, or `"mse"` / `"cosine"` on hidden states: the last hidden state (or logits) when
    `layers` is None, else the outputs of `layers` (block indices of the model's block list, or
    module names). Padding positions (attention_mask == 0) are ignored. With `alpha=0` the task
    loss is ignored, so `training_step` may return None (no labels needed).

    How the loss is changed: Lightning 2.6 has no public hook that replaces the training loss, so
    on `on_train_start` this callback sets an instance attribute `pl_module.training_step` that
    wraps the class's method (the strategies, DDP's forward redirection included, look it up on the
    instance; checked with lightning 2.6.6), and deletes it again on `teardown`.

    Checkpoints: `alpha`, `temperature`, `loss` and the teacher's weights (when it is a copy or a
    given module; a teacher given as a path is reloaded from the path), so a resumed fit distills
    from the same dense teacher even after the model was pruned.

    Example YAML (`conf/distill/kd.yaml`)::

        _target_: lightning_prune.KnowledgeDistillation
        alpha: 0.5            # weight of the task loss; 0 = pure distillation (no labels)
        temperature: 2.0      # softmax temperature of the KL on logits
        loss: kl              # kl | mse | cosine
        layers: null          # null = logits / last hidden state; or block indices / module names
        teacher: null         # null = frozen copy of the model at setup; or a local model directory
        teacher_device: null  # null = the student's device; "cpu" saves accelerator memory
        teacher_dtype: null   # null = as loaded; "bfloat16" halves the teacher's memory
        student_attr: null    # attribute of the LightningModule that is the student; null = `model` or the module
    """

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 2.0,
        loss: str = "kl",
        layers: Sequence[int | str] | None = None,
        teacher: nn.Module | str | None = None,
        teacher_device: str | None = None,
        teacher_dtype: str | None = None,
        student_attr: str | None = None,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}")
        if loss not in DISTILL_LOSSES:
            raise ValueError(f"`loss` must be one of {DISTILL_LOSSES}, got {loss!r}")
        if loss == "kl" and layers is not None:
            raise ValueError(f"`loss`='kl' compares logits; `layers`={layers!r} needs loss='mse' or 'cosine'")
        if teacher is not None and not isinstance(teacher, (nn.Module, str, Path)):
            raise ValueError(f"`teacher` must be None, an nn.Module or a model directory, got {type(teacher).__name__}")
        if teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"`teacher_dtype` must be one of {TEACHER_DTYPES}, got {teacher_dtype!r}")
        self.alpha, self.temperature, self.loss = float(alpha), float(temperature), loss
        self.layers = list(layers) if layers is not None else None
        self.teacher_source = teacher
        self.teacher_device = torch.device(teacher_device) if teacher_device else None
        self.teacher_dtype = getattr(torch, teacher_dtype) if teacher_dtype else None
        self.student_attr = student_attr
        self.teacher: nn.Module | None = None
        self._restored_teacher: dict[str, torch.Tensor] = {}
        self._capture: OutputCapture | None = None
        self._layer_names: list[str] = []
        self._pl_module: pl.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(loss=self.loss, layers=str(self.layers))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.teacher is None:
            self.take_teacher(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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

    def take_teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the frozen teacher: a copy of the student now, the given module, or one loaded from a path."""
        student = self.student(pl_module)
        if self.teacher_source is None:
            self.teacher = frozen_copy(student, share=(trainer,))
        elif isinstance(self.teacher_source, nn.Module):
            self.teacher = freeze(self.teacher_source)
        else:
            self.teacher = freeze(self._load_teacher(student, Path(self.teacher_source)))
        if self._restored_teacher:
            self.teacher.load_state_dict(self._restored_teacher)
            self._restored_teacher = {}
        if self.teacher_dtype is not None:
            self.teacher.to(self.teacher_dtype)

    @staticmethod
    def _load_teacher(student: nn.Module, path: Path) -> nn.Module:
        loader = getattr(type(student), "from_pretrained", None)
        if loader is None or not (path / "config.json").is_file():
            raise ValueError(f"`teacher`={str(path)!r} must be a local model directory (with config.json) for {type(student).__name__}.from_pretrained")
        teacher: nn.Module = loader(str(path), local_files_only=True)
        return teacher

    def attach(self, pl_module: pl.LightningModule) -> None:
        """Hook the student, move the teacher to its device, and wrap `pl_module.training_step`."""
        if self.teacher is None:
            raise ValueError("KnowledgeDistillation has no teacher: it is taken in `setup(stage='fit')`; run it inside Trainer.fit")
        student = self.student(pl_module)
        self._layer_names = resolve_layers(student, self.layers)
        missing = [name for name in self._layer_names if name not in dict(self.teacher.named_modules())]
        if missing:
            raise ValueError(f"`layers` {missing} exist in the student but not in the teacher {type(self.teacher).__name__}")
        self.teacher.to(self.teacher_device or pl_module.device)
        self._capture = OutputCapture(student, self._layer_names).attach()
        self._pl_module = pl_module
        original = type(pl_module).training_step.__get__(pl_module)
        pl_module.training_step = functools.wraps(original)(functools.partial(self._distilled_step, original))  # type: ignore[method-assign]

    def detach(self, pl_module: pl.LightningModule) -> None:
        """Remove the hooks and the `training_step` wrapper."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        pl_module.__dict__.pop("training_step", None)

    def _distilled_step(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        assert self._capture is not None and self._pl_module is not None
        self._capture.start()
        try:
            output = original(*args, **kwargs)
        finally:
            calls = self._capture.stop()
        kd = self.kd_loss(calls)
        task = output.get("loss") if isinstance(output, dict) else output
        loss = mix_losses(task, kd, self.alpha)
        self._pl_module.log("distill/kd_loss", kd.detach(), prog_bar=True)
        return {**output, "loss": loss} if isinstance(output, dict) else loss

    def kd_loss(self, calls: list[Call]) -> torch.Tensor:
        """The distillation loss averaged over the student calls of one training step."""
        if not calls:
            raise ValueError(
                f"training_step did not call the student {type(self.student(self._pl_module)).__name__} "  # type: ignore[arg-type]
                "(set `student_attr` to the attribute holding the module that training_step runs)"
            )
        assert self.teacher is not None
        losses = [self._call_loss(call) for call in calls]
        return torch.stack(losses).mean()

    def _call_loss(self, call: Call) -> torch.Tensor:
        assert self.teacher is not None
        device = self.teacher_device or next(self.teacher.parameters()).device
        taught = run_teacher(self.teacher, call, self._layer_names, device, self.teacher_dtype)
        mask = call.kwargs.get("attention_mask")
        prefer = ("logits",) if self.loss == "kl" else ("last_hidden_state", "logits")
        pairs = [(call.layers[name], taught.layers[name]) for name in self._layer_names] or [(main_output(call.output, prefer), main_output(taught.output, prefer))]
        losses = [distill_loss(self.loss, s, t.to(s.device), self.temperature, mask) for s, t in pairs]
        return torch.stack(losses).mean()

    def state_dict(self) -> dict[str, Any]:
        from_path = isinstance(self.teacher_source, (str, Path))
        teacher = {} if from_path or self.teacher is None else {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}
        return {"alpha": self.alpha, "temperature": self.temperature, "loss": self.loss, "teacher_taken": self.teacher is not None, "teacher": teacher or dict(self._restored_teacher)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alpha = float(state_dict.get("alpha", self.alpha))
        self.temperature = float(state_dict.get("temperature", self.temperature))
        saved = dict(state_dict.get("teacher", {}))
        if saved and self.teacher is not None:  # restored after `setup`: the usual order
            self.teacher.load_state_dict(saved)
        else:
            self._restored_teacher = saved
