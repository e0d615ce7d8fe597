"""`DistilledStep`: what `KnowledgeDistillation` puts around `training_step` during fit.

Hooks on the student record every call the step makes (`recovery.teacher.OutputCapture`); after the
step the teacher runs on each call's inputs, the KD loss of the pairs of outputs is averaged over the
calls and mixed with the task loss the step returned (`recovery.losses.mix_losses`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_prune.recovery.losses import distill_loss, mix_losses
from lightning_prune.recovery.teacher import Call, OutputCapture, main_output, run_teacher

if TYPE_CHECKING:
    from lightning_prune.callbacks.distill import KnowledgeDistillation


class DistilledStep:
    """Called as `step(original, *args, **kwargs)` in place of `training_step`: the step's output with
    its loss replaced by `α·task + (1−α)·KD`, KD from `distill.kd_loss` (settings read at every step)."""

    def __init__(
        self,
        distill: KnowledgeDistillation,
        pl_module: pl.LightningModule,
        student: nn.Module,
        layer_names: Sequence[str],
    ) -> None:
        self.distill, self.pl_module, self.student = distill, pl_module, student
        self.layer_names = list(layer_names)
        self.capture = OutputCapture(student, self.layer_names).attach()

    def remove(self) -> None:
        """Remove the hooks on the student."""
        self.capture.remove()

    def __call__(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.capture.start()
        try:
            output = original(*args, **kwargs)
        finally:
            calls = self.capture.stop()
        kd = self.distill.kd_loss(calls)  # the callback's method: a subclass may record or change the loss
        task = output.get("loss") if isinstance(output, dict) else output
        loss = mix_losses(task, kd, self.distill.alpha)
        self.pl_module.log("distill/kd_loss", kd.detach(), prog_bar=True)
        return {**output, "loss": loss} if isinstance(output, dict) else loss

    def kd_loss(self, calls: list[Call]) -> torch.Tensor:
        """The distillation loss averaged over the student calls of one training step."""
        if not calls:
            hint = "set `student_attr` to the attribute holding the module that training_step runs"
            raise ValueError(f"training_step did not call the student {type(self.student).__name__} ({hint})")
        assert self.distill.teacher is not None
        losses = [self.call_loss(call) for call in calls]
        return torch.stack(losses).mean()

    def call_loss(self, call: Call) -> torch.Tensor:
        """The KD loss of one call: the outputs of `layers`, else the main output, against the teacher's."""
        distill, teacher_model = self.distill, self.distill.teacher
        assert teacher_model is not None
        device = distill.teacher_device or next(teacher_model.parameters()).device
        taught = run_teacher(teacher_model, call, self.layer_names, device, distill.teacher_dtype)
        mask = call.kwargs.get("attention_mask")
        prefer = ("logits",) if distill.loss == "kl" else ("last_hidden_state", "logits")
        pairs = [(f"`{name}`", call.layers[name], taught.layers[name]) for name in self.layer_names]
        pairs = pairs or [("output", main_output(call.output, prefer), main_output(taught.output, prefer))]
        losses = []
        for what, student, teacher in pairs:
            if student.shape != teacher.shape:
                raise ValueError(
                    f"the student's {what} has shape {tuple(student.shape)} and the `teacher`'s "
                    f"{tuple(teacher.shape)}: `loss`={distill.loss!r} compares equal shapes (a compacted student's "
                    "narrower layers have no counterpart; use `layers` whose width did not change, such as block "
                    "outputs, or loss='kl' on logits)"
                )
            # Both sides go to the student's device; the losses compute in fp32 whatever the two dtypes are.
            losses.append(distill_loss(distill.loss, student, teacher.to(student.device), distill.temperature, mask))
        return torch.stack(losses).mean()
