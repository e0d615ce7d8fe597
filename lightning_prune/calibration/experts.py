"""Per-expert calibration inputs of a fused mixture-of-experts module, from the routed tokens.

transformers 5 experts modules (checked on 5.24) are called as `experts(hidden_states,
top_k_index, top_k_weights)`: expert e computes on the tokens whose `top_k_index` row holds e
(Mixtral, Qwen2/3-MoE, DeepSeek-V3, gpt-oss's `router_indices`). Llama 4's experts are called with
the hidden states already repeated per expert and scaled by the router score (zero for tokens
not routed there), viewed (E, tokens, hidden): its rows that are not all zero are its tokens.
The first layer (`gate_up_proj`, `up_proj`) sees those tokens; `down_proj` sees the gated
activations: those of the model's own forward where `gated.capture_for` knows their rows, else
recomputed from the tokens with the module's own weights and gate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lightning_prune.targets import PruneTarget


def routing_index(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The integer routing index (tokens, top-k) of one experts call, or None (Llama 4: pre-routed)."""
    values = [*args, *kwargs.values()]
    index = values[1] if len(values) > 1 else None
    return index if isinstance(index, torch.Tensor) and not index.is_floating_point() else None


def routing(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, masks) of one call of an experts `module`: `masks` (E, T) is True where row t goes
    to expert e, of `hidden` (T, hidden) or, for Llama 4's pre-routed rows, of `hidden[e]` (E, T, hidden)."""
    count: int = module.num_experts  # type: ignore[assignment]
    hidden = [*args, *kwargs.values()][0]
    index = routing_index(args, kwargs)
    if index is None:  # Llama 4: (E·tokens, hidden), already routed and scaled
        hidden = hidden.reshape(count, -1, hidden.shape[-1])
        return hidden, hidden.ne(0).any(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index = index.reshape(hidden.shape[0], 1, -1)
    return hidden, (index == torch.arange(count, device=index.device).unsqueeze(1)).any(-1).t()


def routed_tokens(hidden: torch.Tensor, masks: torch.Tensor) -> list[torch.Tensor]:
    """Each expert's input rows (tokens, hidden) for `routing`'s `hidden` and `masks`."""
    if hidden.dim() == 3:
        return [rows[mask] for rows, mask in zip(hidden.unbind(0), masks.unbind(0))]
    return [hidden[mask] for mask in masks.unbind(0)]


def _linear(module: nn.Module, name: str, expert: int, transposed: bool, rows: torch.Tensor) -> torch.Tensor:
    weight = getattr(module, name)[expert]
    bias = getattr(module, f"{name}_bias", None)
    bias = bias[expert] if isinstance(bias, torch.Tensor) and getattr(module, "has_bias", True) else None
    return F.linear(rows, weight.t() if transposed else weight, bias)


def expert_activations(module: nn.Module, expert: int, transposed: bool, rows: torch.Tensor) -> torch.Tensor:
    """The input of `down_proj` for `rows` routed to `expert`: the gated first-layer output."""
    names = {name for name, _ in module.named_parameters(recurse=False)}
    act: Callable[[torch.Tensor], torch.Tensor] = getattr(module, "act_fn", F.silu)
    if "gate_up_proj" in names:
        out = _linear(module, "gate_up_proj", expert, transposed, rows)
        if hasattr(module, "_apply_gate"):  # added by transformers' use_experts_implementation
            gated: torch.Tensor = module._apply_gate(out)  # type: ignore[operator]
            return gated
        gate, up = out.chunk(2, dim=-1)
        return act(gate) * up
    if "gate_proj" in names and "up_proj" in names:
        return act(_linear(module, "gate_proj", expert, transposed, rows)) * _linear(
            module, "up_proj", expert, transposed, rows
        )
    if "up_proj" in names:
        return act(_linear(module, "up_proj", expert, transposed, rows))
    raise ValueError(
        f"experts module {type(module).__name__} has no `gate_up_proj`, `gate_proj`/`up_proj` or `up_proj`, "
        "so the inputs of its second layer cannot be computed; leave its experts dense with `ignore=`"
    )


def expert_inputs(
    target: PruneTarget, tokens: list[torch.Tensor], gated: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Per expert, the input rows of the expert matrix `target` for the routed `tokens`; for the
    second layer, the `gated` activations of the model's own forward when given, else recomputed."""
    if "down" not in target.param_name:
        return tokens
    if gated is not None:
        return gated
    return [expert_activations(target.module, e, target.expert_transposed, rows) for e, rows in enumerate(tokens)]
