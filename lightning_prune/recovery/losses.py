"""Distillation losses in plain PyTorch: KL on logits with a temperature, MSE and cosine on hidden states.

All losses average over the *tokens* of a batch: an output of shape (B, T, D) with an attention
mask (B, T) counts only the positions where the mask is non-zero; an output of shape (B, D) counts
B items. Hinton et al. (2015) scale the softened KL by T² so that its gradients keep the size of
the hard-label loss's as T changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_prune.validation import check_number

DISTILL_LOSSES = ("kl", "mse", "cosine")


def _valid_rows(values: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`values` (..., D) flattened to rows (N, D), keeping only positions the mask marks valid."""
    rows = values.reshape(-1, values.shape[-1])
    if attention_mask is None or values.dim() < 3:
        return rows
    if attention_mask.shape != values.shape[:-1]:
        raise ValueError(
            f"`attention_mask` of shape {tuple(attention_mask.shape)} "
            f"does not fit outputs of shape {tuple(values.shape)}"
        )
    return rows[attention_mask.reshape(-1).bool()]


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student output of shape {tuple(student.shape)} and teacher output of shape {tuple(teacher.shape)} differ"
        )


def kd_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), summed over classes and averaged over tokens (fp32)."""
    check_number(temperature, "temperature", low=0.0, low_open=True)
    _check_pair(student_logits, teacher_logits)
    student = _valid_rows(student_logits, attention_mask).float() / temperature
    teacher = _valid_rows(teacher_logits, attention_mask).float() / temperature
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    per_row = F.kl_div(
        F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="none", log_target=True
    ).sum(-1)
    return per_row.mean() * temperature**2


def _valid_pair(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid tokens' (student, teacher) feature rows in fp32, after checking the shapes match."""
    _check_pair(student_hidden, teacher_hidden)
    return _valid_rows(student_hidden, attention_mask).float(), _valid_rows(teacher_hidden, attention_mask).float()


def hidden_mse_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error over the valid tokens' features (fp32)."""
    student, teacher = _valid_pair(student_hidden, teacher_hidden, attention_mask)
    if student.shape[0] == 0:
        return student_hidden.sum() * 0.0
    return F.mse_loss(student, teacher)


def hidden_cosine_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the valid tokens of 1 − cos(student, teacher) along the feature dimension (fp32)."""
    student, teacher = _valid_pair(student_hidden, teacher_hidden, attention_mask)
    if student.shape[0] == 0:
        return student_hidden.sum() * 0.0
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def distill_loss(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 2.0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distillation loss `kind` ("kl" on logits, "mse" or "cosine" on hidden states)."""
    if kind == "kl":
        return kd_kl_loss(student, teacher, temperature, attention_mask)
    if kind == "mse":
        return hidden_mse_loss(student, teacher, attention_mask)
    if kind == "cosine":
        return hidden_cosine_loss(student, teacher, attention_mask)
    raise ValueError(f"`loss` must be one of {DISTILL_LOSSES}, got {kind!r}")


def mix_losses(task_loss: torch.Tensor | None, kd_loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·task + (1−α)·KD; with α = 0 the task loss is ignored (it may be None: no labels needed)."""
    check_number(alpha, "alpha", low=0.0, high=1.0)
    if alpha == 0.0:
        return kd_loss
    if task_loss is None:
        raise ValueError(
            f"`alpha`={alpha} mixes in the task loss, but the training step returned none; "
            "use alpha=0 for pure distillation"
        )
    return alpha * task_loss + (1.0 - alpha) * kd_loss
