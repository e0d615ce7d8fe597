"""The inputs of fused experts' second layer, taken from the model's own forward instead of recomputed.

Only where the rows of that input are known to belong to one expert each (checked on transformers
5.24):

- `use_experts_implementation` (`transformers/integrations/moe.py`) dispatches an experts module's
  `forward` by `module.config._experts_implementation` through the `experts_interface` its
  decorator closed over. Its `grouped_mm_experts_forward` and `batched_mm_experts_forward` call
  `module._apply_gate(gate_up)` once, on every (token, top-k slot) pair, biases already added, and
  multiply its output by `down_proj`. grouped_mm sorts the pairs by expert
  (`torch.sort(top_k_index.reshape(-1))`): expert e owns the e-th block of `bincount(top_k_index)`
  rows. batched_mm keeps the pairs in order (`hidden.repeat_interleave(top_k)`): row i is expert
  `top_k_index.reshape(-1)[i]`'s. `GateCapture` wraps the instance's `_apply_gate` to record it.
- Llama 4's `Llama4TextExperts.forward` views its pre-routed input (E, T, hidden) and computes
  `torch.bmm(up * act_fn(gate), self.down_proj)`: row (e, t) of that first operand is expert e's
  output for input row (e, t). `BmmCapture` records it (a torch function mode around the
  instance's forward).

Anything else -- eager or a custom implementation, expert parallelism, a subclass with its own
forward, a `ModuleList` of Linears, a patched instance -- is not captured, and a capture whose
rows do not match the routed token counts is dropped: `down_proj` is then fed from the recompute
in `experts.expert_inputs`.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_prune.calibration.experts import routing_index

GROUPED, BATCHED, PRE_ROUTED = "grouped_mm", "batched_mm", "pre_routed"
KNOWN_FORWARDS: dict[object, str] = {}  # transformers' experts forwards whose rows are known -> layout
INTERFACE: type[Mapping[object, object]] | None = None
try:  # transformers >= 5: fused experts with selectable implementations
    from transformers.integrations.moe import ExpertsInterface, batched_mm_experts_forward, grouped_mm_experts_forward

    KNOWN_FORWARDS, INTERFACE = (
        {grouped_mm_experts_forward: GROUPED, batched_mm_experts_forward: BATCHED},
        ExpertsInterface,
    )
except ImportError:  # older transformers: nothing to capture, every experts module is recomputed
    pass
LLAMA4 = "transformers.models.llama4.modeling_llama4"


def own_layout(module: nn.Module) -> str | None:
    """GROUPED, BATCHED or PRE_ROUTED when the rows of `module`'s own `down_proj` input are known
    (see the module docstring); None otherwise."""
    forward = type(module).forward
    if not inspect.isfunction(forward) or "forward" in vars(module) or "_apply_gate" in vars(module):
        return None
    llama4 = sys.modules.get(LLAMA4)  # imported whenever one of its modules exists
    if llama4 is not None and forward is getattr(getattr(llama4, "Llama4TextExperts", None), "forward", None):
        return PRE_ROUTED
    # The decorator's forward closes over `experts_interface` (transformers 5.24).
    interface = inspect.getclosurevars(forward).nonlocals.get("experts_interface")
    config = getattr(module, "config", None)
    if (
        INTERFACE is None
        or not isinstance(interface, INTERFACE)
        or config is None
        or not callable(getattr(module, "_apply_gate", None))
    ):
        return None
    if getattr(module, "_is_expert_parallel", True) or getattr(module, "has_gate", False) is not True:
        return None
    return KNOWN_FORWARDS.get(interface.get(getattr(config, "_experts_implementation", None)))


class GateCapture:
    """Records `module._apply_gate`'s outputs (grouped_mm, batched_mm) while installed.

    Lifecycle: made by `capture_for`, one `take` per forward call (from the experts module's forward
    hook), `remove()`.
    """

    def __init__(self, module: nn.Module, layout: str) -> None:
        self.module, self.layout = module, layout
        self.outputs: list[torch.Tensor] = []
        gate = cast(Callable[[torch.Tensor], torch.Tensor], module._apply_gate)

        def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
            gated = gate(gate_up)
            self.outputs.append(gated)
            return gated

        module._apply_gate = apply_gate  # type: ignore[assignment]  # shadows the class's method on this instance only

    def remove(self) -> None:
        """Give the module its class's `_apply_gate` back."""
        del self.module._apply_gate

    def take(self, args: tuple[Any, ...], kwargs: dict[str, Any], masks: torch.Tensor) -> list[torch.Tensor] | None:
        """Per expert, the `down_proj` input rows of the call (`args`, `kwargs`) just finished, whose
        routing `masks` (E, T) come from `experts.routing`; None when they cannot be vouched for."""
        outputs, self.outputs = self.outputs, []
        index = routing_index(args, kwargs)
        if index is None or len(outputs) != 1:
            return None
        return expert_rows(self.layout, outputs[0], index, masks.sum(1).tolist())


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


class _DownOperand(TorchFunctionMode):
    """Records the first operand of `torch.bmm(x, module.down_proj)`; every call runs unchanged."""

    def __init__(self, module: nn.Module, found: list[torch.Tensor]) -> None:
        super().__init__()
        self.module, self.found = module, found

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func is torch.bmm and len(args) == 2 and args[1] is self.module.down_proj:
            self.found.append(args[0])
        return func(*args, **(kwargs or {}))


class BmmCapture:
    """Records the `down_proj` operand of Llama 4's experts forward while installed (same lifecycle
    as `GateCapture`)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.outputs: list[torch.Tensor] = []
        forward = module.forward

        def capture_forward(*args: Any, **kwargs: Any) -> Any:
            with _DownOperand(module, self.outputs):
                return forward(*args, **kwargs)

        module.forward = capture_forward  # this instance only

    def remove(self) -> None:
        """Give the module its class's `forward` back."""
        del self.module.forward

    def take(self, args: tuple[Any, ...], kwargs: dict[str, Any], masks: torch.Tensor) -> list[torch.Tensor] | None:
        """Per expert e, the rows (e, t) of the recorded (E, T, intermediate) operand with `masks[e, t]`."""
        outputs, self.outputs = self.outputs, []
        if len(outputs) != 1 or outputs[0].dim() != 3 or outputs[0].shape[:2] != masks.shape:
            return None
        return [rows[mask] for rows, mask in zip(outputs[0].unbind(0), masks.unbind(0))]


def capture_for(module: nn.Module) -> GateCapture | BmmCapture | None:
    """Install the capture of `module`'s own `down_proj` input, or None where its rows are not known."""
    layout = own_layout(module)
    if layout is None:
        return None
    return BmmCapture(module) if layout == PRE_ROUTED else GateCapture(module, layout)
