"""Group scores: how much each unit of a `GroupSet` matters (higher = keep). Registered by name.

Built-ins (DESIGN, "Structured groups"):
- "magnitude": the group's L1 (default, Li et al. 2016) or L2 norm over its weight entries.
- "wanda": Σ over the group's weights of Wanda's |W_ij|·‖X_j‖₂ (rows of the producers with their
  inputs' norms, columns of the consumer with the unit's own activation norm).
- "flap" (structured/flap.py): FLAP's fluctuation Σ_j Var(X_j)·‖W_:,j‖² over the unit's consumer
  columns, with its bias compensation.
- "taylor": first-order Taylor of the group, (Σ_s w_s·g_s)² averaged over steps (Molchanov et
  al. 2019), accumulated during training or over calibration batches.
- "block_influence": 1 − cos(x_in, x_out) of a whole block over calibration tokens (ShortGPT).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_prune.calibration.stats import FeatureNormStats, TokenStatistic
from lightning_prune.registry import register_structured_score
from lightning_prune.structured.groups import GroupSet, Part, input_dim
from lightning_prune.validation import check_choice


class StructuredScore:
    """Base of the group scores: `score(group, stats)` → (count,), higher = more important.

    `statistics` names the calibration statistic collected on the inputs of every layer of a group
    (keyed by module name in `stats`); `needs_gradients` scores accumulate through `accumulate`.
    `unit` is "group" for neuron/head/filter scores and "block" for whole-block scores.
    """

    name: str = ""
    statistics: tuple[type[TokenStatistic], ...] = ()
    needs_gradients: bool = False
    unit: str = "group"

    def score(self, group: GroupSet, stats: Mapping[str, TokenStatistic]) -> torch.Tensor:
        """Importance of each of the group's `count` units."""
        raise TypeError(f"{type(self).__name__} must define `score` (it does not score groups)")

    def check(self, group: GroupSet) -> None:
        """Raise a `ValueError` before pruning when this score cannot handle `group`."""
        if self.statistics:
            for part in group.parts:
                if part.is_weight and isinstance(part.module, nn.Conv2d):
                    raise ValueError(
                        f"`method`={self.name!r} scores linear layers from their input activations; "
                        f"{part.module_name} is a Conv2d: use 'magnitude' or 'taylor' for filters"
                    )

    def check_model(self, groups: Sequence[GroupSet], config: object) -> None:
        """Raise a `ValueError` before pruning when the model cannot take what this score will do."""

    def prepare(self, model: nn.Module, groups: Sequence[GroupSet]) -> bool:
        """Change the model before scoring (e.g. add parameters the method writes); True if it did."""
        return False

    def compensate(self, group: GroupSet, removed: torch.Tensor, stats: Mapping[str, TokenStatistic]) -> None:
        """Adjust the remaining weights for the removed units (no-op unless the method does)."""

    def accumulate(self, groups: Sequence[GroupSet]) -> None:
        """Feed one step's gradients (no-op unless the score needs them)."""

    def reset(self) -> None:
        """Forget accumulated state after a pruning step."""


def _weight_parts(group: GroupSet) -> list[Part]:
    return [p for p in group.parts if p.is_weight]


def along_inputs(part: Part, values: torch.Tensor) -> torch.Tensor:
    """`values` (one per input feature) broadcast over the part's weight storage."""
    shape = [1] * part.tensor.dim()
    shape[input_dim(part.module)] = -1
    return values.reshape(shape)


@register_structured_score("magnitude")
class GroupMagnitude(StructuredScore):
    """Group Lp norm of the weight entries of each unit (p = 1: Li et al. 2016's filter L1)."""

    def __init__(self, p: int = 1) -> None:
        self.p = check_choice(p, "p", (1, 2))

    @torch.no_grad()
    def score(self, group: GroupSet, stats: Mapping[str, TokenStatistic]) -> torch.Tensor:
        total = sum(p.per_unit(p.tensor.detach().float().abs() ** self.p) for p in _weight_parts(group))
        return torch.as_tensor(total) ** (1.0 / self.p)


@register_structured_score("wanda")
class GroupWanda(StructuredScore):
    """Σ over the unit's weights of |W_ij|·‖X_j‖₂, X_j the j-th input feature of W's layer."""

    statistics = (FeatureNormStats,)

    @torch.no_grad()
    def score(self, group: GroupSet, stats: Mapping[str, TokenStatistic]) -> torch.Tensor:
        total = torch.zeros(group.count, device=group.parts[0].tensor.device)
        for part in _weight_parts(group):
            norms = stats[part.module_name].feature_norms()  # type: ignore[attr-defined]
            total += part.per_unit(part.tensor.detach().float().abs() * along_inputs(part, norms))
        return total


class _Accumulator:
    """Per-group running sums kept by name (shared by the gradient-based scores)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps[name] = self.steps.get(name, 0) + 1


@register_structured_score("taylor")
class GroupTaylor(StructuredScore):
    """First-order Taylor of removing a unit: (Σ_s w_s·g_s)² over its weights, averaged over steps."""

    needs_gradients = True

    def __init__(self) -> None:
        self.accumulated = _Accumulator()

    @torch.no_grad()
    def accumulate(self, groups: Sequence[GroupSet]) -> None:
        for group in groups:
            first_order = torch.zeros(group.count, device=group.parts[0].tensor.device)
            seen = False
            for part in _weight_parts(group):
                grad = part.tensor.grad
                if grad is not None:
                    first_order += part.per_unit(part.tensor.detach().float() * grad.float())
                    seen = True
            if seen:
                self.accumulated.add(group.name, first_order.square())

    def score(self, group: GroupSet, stats: Mapping[str, TokenStatistic]) -> torch.Tensor:
        if group.name not in self.accumulated.sums:
            raise ValueError(
                f"`method`='taylor' has no gradients for {group.name}: "
                "it needs training steps (or calibration batches with labels) before pruning"
            )
        return self.accumulated.sums[group.name] / self.accumulated.steps[group.name]

    def reset(self) -> None:
        self.accumulated = _Accumulator()


@register_structured_score("block_influence")
class BlockInfluence(StructuredScore):
    """ShortGPT's block influence 1 − cos(x_in, x_out), averaged over calibration tokens."""

    unit = "block"

    @staticmethod
    def token_influence(block_input: torch.Tensor, block_output: torch.Tensor) -> torch.Tensor:
        """Σ over tokens of 1 − cos(x_in, x_out), and the token count, as a (2,) tensor."""
        cos = nn.functional.cosine_similarity(
            block_input.float().flatten(0, -2), block_output.float().flatten(0, -2), dim=-1
        )
        return torch.stack([(1.0 - cos).sum(), torch.tensor(float(cos.numel()), device=cos.device)])
