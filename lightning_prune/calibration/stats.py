"""Calibration statistics as plain sums: easy to all-reduce across ranks before pruning.

Each statistic keeps an un-normalised fp32 `sum` and an int64 token `count` (0-d tensor), whatever
the model's dtype. Summing both over ranks (e.g. `parallel.collectives.all_reduce_sum_(stat.tensors())`)
gives exactly the statistic of the union of the ranks' batches.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class TokenStatistic:
    """Shared bookkeeping: `sum`, `count`, `tensors()` and the NaN/Inf guard.

    A statistic whose `add` is `accumulate(increments(inputs))` can share one batch's increments
    between layers that receive the same input tensor (q/k/v, gate/up): `collect_statistics` then
    computes them once; the sums are bitwise those of adding the batch to each layer.
    """

    shareable: ClassVar[bool] = False  # True: `increments` and `accumulate` are defined, `add` is their composition

    def __init__(self, name: str, sum_: torch.Tensor) -> None:
        self.name = name
        self.sum = sum_
        self.count = torch.zeros((), dtype=torch.int64, device=sum_.device)

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate a batch of layer inputs `(..., in_features)`."""
        raise TypeError(f"{type(self).__name__} must define `add`")

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to sum across ranks (in place), in a fixed order."""
        return [self.sum, self.count]

    def increments(self, inputs: torch.Tensor) -> tuple[torch.Tensor | int, ...]:
        """What one batch of layer inputs adds (shareable statistics only)."""
        raise TypeError(f"{type(self).__name__} is not shareable: it defines no `increments`")

    def accumulate(self, increments: tuple[torch.Tensor | int, ...]) -> None:
        """Add one batch's `increments` (shareable statistics only)."""
        raise TypeError(f"{type(self).__name__} is not shareable: it defines no `accumulate`")

    def _rows(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        self.count += rows.shape[0]
        return rows

    def check_count(self) -> None:
        """Raise when no token reached this layer, or when its inputs held NaN or Inf.

        A NaN or Inf input makes its sum non-finite, so one check of the sum finds it; checking every
        batch's inputs instead cost as much as the statistics themselves.
        """
        if int(self.count) == 0:
            raise ValueError(
                f"no calibration tokens reached {self.name!r}; it cannot be pruned one-shot (add it to `ignore`)"
            )
        if not torch.isfinite(self.sum).all():
            raise ValueError(
                f"calibration activations entering {self.name!r} contain NaN or Inf; check the model and the batches"
            )


class FeatureNormStats(TokenStatistic):
    """Per input feature j: Σ x_j² (Wanda's statistic, `sum`), Σ x_j (`first`) and the token count.

    The first moment gives DSnoT its mean and variance of each input feature; both sums are in
    `tensors()`, so summing them over ranks still gives the statistic of all ranks' batches.
    """

    def __init__(self, name: str, in_features: int, device: torch.device | str | None = None) -> None:
        super().__init__(name, torch.zeros(in_features, dtype=torch.float32, device=device))
        self.first = torch.zeros(in_features, dtype=torch.float32, device=device)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to sum across ranks (in place), in a fixed order."""
        return [self.sum, self.first, self.count]

    shareable: ClassVar[bool] = True

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate a batch of layer inputs `(..., in_features)`."""
        self.accumulate(self.increments(inputs))

    def increments(self, inputs: torch.Tensor) -> tuple[torch.Tensor | int, ...]:
        """(Σ x_j², Σ x_j, tokens) of one batch of layer inputs `(..., in_features)`, in fp32."""
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        return rows.square().sum(0), rows.sum(0), rows.shape[0]

    def accumulate(self, increments: tuple[torch.Tensor | int, ...]) -> None:
        """Add one batch's (Σ x_j², Σ x_j, tokens)."""
        square, first, tokens = increments
        self.count += tokens
        self.sum += square
        self.first += first

    def feature_norms(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens (Wanda's activation norm)."""
        self.check_count()
        return self.sum.sqrt()

    def mean(self) -> torch.Tensor:
        """E[X_j] over all calibration tokens."""
        self.check_count()
        return self.first / float(self.count)

    def variance(self) -> torch.Tensor:
        """Var[X_j] = E[X_j²] − E[X_j]² over all calibration tokens (population variance, ≥ 0)."""
        mean = self.mean()
        return (self.sum / float(self.count) - mean.square()).clamp_min(0.0)


class HessianStats(TokenStatistic):
    """SparseGPT's statistic: Σ over tokens of x xᵀ (fp32), and the token count."""

    def __init__(self, name: str, in_features: int, device: torch.device | str | None = None) -> None:
        super().__init__(name, torch.zeros(in_features, in_features, dtype=torch.float32, device=device))

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate a batch of layer inputs `(..., in_features)`."""
        rows = self._rows(inputs)
        self.sum.addmm_(rows.t(), rows)

    def hessian(self) -> torch.Tensor:
        """H = (2/n)·Σ x xᵀ over the n calibration tokens (SparseGPT, section 3)."""
        self.check_count()
        return self.sum * (2.0 / float(self.count))
