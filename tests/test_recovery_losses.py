"""Distillation losses on hand-made logits and hidden states."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_prune.recovery import distill_loss, hidden_cosine_loss, hidden_mse_loss, kd_kl_loss, mix_losses


def test_kl_on_hand_made_logits() -> None:
    student = torch.tensor([[0.0, 0.0]])  # p_s = [1/2, 1/2]
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # p_t = [3/4, 1/4]
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(kd_kl_loss(student, teacher, temperature=1.0)) == pytest.approx(expected)
    # T² · KL of logits divided by T: doubling the logits and T = 2 gives 4 × the same KL.
    assert float(kd_kl_loss(2 * student, 2 * teacher, temperature=2.0)) == pytest.approx(4 * expected)
    assert float(kd_kl_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)


def test_kl_averages_over_tokens_and_skips_padding() -> None:
    teacher = torch.tensor([[[math.log(3.0), 0.0], [5.0, -5.0]]])  # (B=1, T=2, V=2)
    student = torch.tensor([[[0.0, 0.0], [-5.0, 5.0]]])
    first = kd_kl_loss(student[:, 0], teacher[:, 0], 1.0)
    second = kd_kl_loss(student[:, 1], teacher[:, 1], 1.0)
    assert float(kd_kl_loss(student, teacher, 1.0)) == pytest.approx(float(first + second) / 2)
    assert float(kd_kl_loss(student, teacher, 1.0, attention_mask=torch.tensor([[1, 0]]))) == pytest.approx(
        float(first)
    )


def test_hidden_state_losses_on_hand_made_vectors() -> None:
    assert float(hidden_mse_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 4.0]]))) == pytest.approx(2.0)
    student = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [3.0, 3.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [-1.0, 0.0]]])
    # 1 − cos: orthogonal 1, parallel 0; the third (padding) position would add 1 + 1/√2.
    assert float(hidden_cosine_loss(student, teacher, torch.tensor([[1, 1, 0]]))) == pytest.approx(0.5)
    assert float(hidden_mse_loss(student, teacher, torch.tensor([[1, 1, 0]]))) == pytest.approx((1 + 1 + 1 + 0) / 4)


def test_alpha_mixes_task_and_distillation() -> None:
    task, kd = torch.tensor(2.0), torch.tensor(6.0)
    assert float(mix_losses(task, kd, 0.25)) == pytest.approx(0.25 * 2 + 0.75 * 6)
    assert float(mix_losses(None, kd, 0.0)) == 6.0  # pure distillation: no task loss needed
    assert float(mix_losses(task, kd, 1.0)) == 2.0
    with pytest.raises(ValueError, match="alpha"):
        mix_losses(None, kd, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        mix_losses(task, kd, 1.5)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="temperature"):
        kd_kl_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0.0)
    with pytest.raises(ValueError, match="loss"):
        distill_loss("l1", torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="differ"):
        hidden_mse_loss(torch.zeros(1, 2), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        hidden_mse_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.ones(1, 3))
