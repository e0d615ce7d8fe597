"""The inputs of fused experts' second layer, taken from the model's own forward instead of recomputed.

transformers 5's `use_experts_implementation` (checked on 5.24, `transformers/integrations/moe.py`)
dispatches an experts module's `forward` by `module.config._experts_implementation` through the
`experts_interface` its decorator closed over. Two of those implementations call
`module._apply_gate(gate_up)` exactly once, on every (token, top-k slot) pair at once, and their
rows are known:

- `grouped_mm_experts_forward`: the pairs sorted by expert (`torch.sort(top_k_index.reshape(-1))`),
  so expert e owns the e-th block of `bincount(top_k_index)` rows;
- `batched_mm_experts_forward`: the pairs in their own order (`hidden.repeat_interleave(top_k)`),
  so row i belongs to expert `top_k_index.reshape(-1)[i]`.

`_apply_gate`'s output is exactly what `down_proj` multiplies (biases included: they are added
before the gate). During the statistics pass `GateCapture` wraps the module's `_apply_gate` (an
instance attribute, removed afterwards) and records that output; `expert_rows` assigns its rows.
Any other case -- eager or a custom implementation, expert parallelism, an experts module without
the decorator (Llama 4), a `ModuleList` of Linears, a patched instance -- is not captured, and a
capture whose row counts differ from the routed token counts is dropped: `down_proj` is then fed
from the recompute in `experts.expert_inputs`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import cast

import torch
from torch import nn

GROUPED, BATCHED = "grouped_mm", "batched_mm"
KNOWN_FORWARDS: dict[object, str] = {}  # transformers' experts forwards whose rows are known -> layout
INTERFACE: type[Mapping[object, object]] | None = None
try:  # transformers >= 5: fused experts with selectable implementations
    from transformers.integrations.moe import ExpertsInterface, batched_mm_experts_forward, grouped_mm_experts_forward

    KNOWN_FORWARDS, INTERFACE = {grouped_mm_experts_forward: GROUPED, batched_mm_experts_forward: BATCHED}, ExpertsInterface
except ImportError:  # older transformers: nothing to capture, every experts module is recomputed
    pass


def own_layout(module: nn.Module) -> str | None:
    """GROUPED or BATCHED when `module`'s forward will run transformers' grouped_mm/batched_mm experts
    forward with a gate (rows known, see the module docstring); None when its rows are not known."""
    forward = type(module).forward
    if INTERFACE is None or not inspect.isfunction(forward) or "forward" in vars(module) or "_apply_gate" in vars(module):
        return None
    # The decorator's forward closes over `experts_interface` (transformers 5.24); a class without
    # the decorator (Llama 4) has no such variable.
    interface = inspect.getclosurevars(forward).nonlocals.get("experts_interface")
    config = getattr(module, "config", None)
    if not isinstance(interface, INTERFACE) or config is None or not callable(getattr(module, "_apply_gate", None)):
        return None
    if getattr(module, "_is_expert_parallel", True) or getattr(module, "has_gate", False) is not True:
        return None
    return KNOWN_FORWARDS.get(interface.get(getattr(config, "_experts_implementation", None)))


class GateCapture:
    """Records the gated activations of one experts module's forward calls while installed.

    Lifecycle: `GateCapture.install(module)` (None when `own_layout` does not know the rows), one
    `take(...)` per forward call (from the experts module's forward hook), `remove()`.
    """

    def __init__(self, module: nn.Module, layout: str) -> None:
        self.module, self.layout = module, layout
        self.outputs: list[torch.Tensor] = []
        gate = cast(Callable[[torch.Tensor], torch.Tensor], module._apply_gate)

        def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
            gated: torch.Tensor = gate(gate_up)
            self.outputs.append(gated)
            return gated

        module._apply_gate = apply_gate  # type: ignore[assignment]  # shadows the class's method on this instance only

    @classmethod
    def install(cls, module: nn.Module) -> GateCapture | None:
        """Wrap `module._apply_gate` if the rows of its forward are known, else None."""
        layout = own_layout(module)
        return None if layout is None else cls(module, layout)

    def remove(self) -> None:
        """Give the module its class's `_apply_gate` back."""
        del self.module._apply_gate

    def take(self, index: torch.Tensor | None, routed: list[int]) -> list[torch.Tensor] | None:
        """Per expert, the `down_proj` input rows of the forward call just finished (routing `index`,
        `routed` tokens per expert), or None when they cannot be vouched for (then recompute)."""
        outputs, self.outputs = self.outputs, []
        if index is None or len(outputs) != 1:
            return None
        return expert_rows(self.layout, outputs[0], index, routed)


def expert_rows(layout: str, gated: torch.Tensor, index: torch.Tensor, routed: list[int]) -> list[torch.Tensor] | None:
    """Split the (pairs, intermediate) `gated` rows by expert for `layout` (GROUPED: sorted by expert;
    BATCHED: in `index.reshape(-1)` order). None unless every expert has one row per routed token."""
    ids = index.reshape(-1)
    if gated.dim() != 2 or gated.shape[0] != ids.numel() or ids.numel() != sum(routed):
        return None
    counts = torch.bincount(ids, minlength=len(routed)) if ids.numel() and int(ids.min()) >= 0 else None
    if counts is None or counts.tolist() != routed:  # also false for an id >= the number of experts
        return None
    if layout == BATCHED:
        gated = gated[torch.argsort(ids, stable=True)]
    return list(gated.split(routed))
