"""FLAP (An et al., AAAI 2024): fluctuation-based structured scores with bias compensation.

Score of unit u: Σ_j Var(X_j)·‖W_:,j‖² over its consumer columns j. Removing u adds
Σ_j∈u W_:,j·E[X_j] to the consumer's bias (the removed channels' mean output is kept); where the
consumer has no bias, the config must be able to add one (`mlp_bias` / `attention_bias`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_prune.calibration.stats import TokenStatistic
from lightning_prune.registry import register_structured_score
from lightning_prune.structured.groups import GroupSet, input_dim
from lightning_prune.structured.scores import StructuredScore, along_inputs
from lightning_prune.structured.transformer import model_config
from lightning_prune.validation import check_bool


def _bias_flag(group: GroupSet) -> str:
    """The config flag that gives the group's consumers a bias."""
    return "mlp_bias" if group.kind == "neuron" else "attention_bias"


class FeatureMomentStats(TokenStatistic):
    """FLAP's statistic: Σx_j and Σx_j² over tokens for every input feature j (fp32), and the count."""

    def __init__(self, name: str, in_features: int, device: torch.device | str | None = None) -> None:
        super().__init__(name, torch.zeros(2, in_features, dtype=torch.float32, device=device))

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate a batch of layer inputs `(..., in_features)`."""
        rows = self._rows(inputs)
        self.sum[0] += rows.sum(0)
        self.sum[1] += rows.square().sum(0)

    def mean(self) -> torch.Tensor:
        """E[X_j] over the calibration tokens."""
        self.check_count()
        return self.sum[0] / float(self.count)

    def variance(self) -> torch.Tensor:
        """Var(X_j) over the calibration tokens (population variance, clamped at 0)."""
        mean = self.mean()
        return (self.sum[1] / float(self.count) - mean.square()).clamp_min(0.0)


@register_structured_score("flap")
class GroupFluctuation(StructuredScore):
    """FLAP (An et al. 2024): Σ over the unit's consumer columns of Var(X_j)·‖W_:,j‖².

    With `compensate` (the paper's bias compensation), pruning unit u adds Σ_j∈u W_:,j·E[X_j] to the
    consumer's bias, so that the removed channels' mean output is kept. Where the consumer has no
    bias the config must be able to add one (`mlp_bias` / `attention_bias`), checked before pruning.
    """

    statistics = (FeatureMomentStats,)

    def __init__(self, compensate: bool = True) -> None:
        self.compensate_bias = check_bool(compensate, "compensate")

    def check_model(self, groups: Sequence[GroupSet], config: object) -> None:
        """The compensation needs a consumer bias; where missing, the config must be able to add one."""
        if not self.compensate_bias:
            return
        for group in groups:
            for part in group.consumers():
                if getattr(part.module, "bias", None) is None and not hasattr(config, _bias_flag(group)):
                    raise ValueError(
                        f"`method`='flap' moves the removed {group.kind}s' mean output into the bias of "
                        f"{part.module_name}, which has none and whose config ({type(config).__name__}) cannot "
                        "add one; use method_options={'compensate': False} or method='wanda'"
                    )

    @torch.no_grad()
    def prepare(self, model: nn.Module, groups: Sequence[GroupSet]) -> bool:
        """Give every layer the config flag covers a zero bias, and set the flag (Llama-style models)."""
        if not self.compensate_bias:
            return False
        for group in groups:
            if all(getattr(p.module, "bias", None) is not None for p in group.consumers()):
                continue
            setattr(model_config(model), _bias_flag(group), True)
            for layer in model.get_submodule(group.name).modules():
                if isinstance(layer, nn.Linear) and layer.bias is None:
                    layer.bias = nn.Parameter(
                        torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device)
                    )
        return True

    @torch.no_grad()
    def score(self, group: GroupSet, stats: Mapping[str, TokenStatistic]) -> torch.Tensor:
        total = torch.zeros(group.count, device=group.parts[0].tensor.device)
        for part in group.consumers():
            variance = stats[part.module_name].variance()  # type: ignore[attr-defined]
            total += part.per_unit(part.tensor.detach().float().square() * along_inputs(part, variance))
        return total

    @torch.no_grad()
    def compensate(self, group: GroupSet, removed: torch.Tensor, stats: Mapping[str, TokenStatistic]) -> None:
        if not self.compensate_bias or not bool(removed.any()):
            return
        for part in group.consumers():
            mean = stats[part.module_name].mean()  # type: ignore[attr-defined]
            drop = removed.repeat_interleave(part.width).float()
            weight = part.tensor.detach().float()
            matrix = weight.t() if input_dim(part.module) == 0 else weight
            shift = matrix @ (mean * drop)
            bias: torch.Tensor = part.module.bias  # type: ignore[assignment]
            bias.add_(shift.to(bias.dtype))
