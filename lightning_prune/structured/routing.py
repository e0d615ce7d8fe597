"""Never route to a removed expert: the router's logits of removed experts are -inf before its top-k.

A router computes its logits with one linear layer (`F.linear(hidden, weight[, bias])`, checked on
transformers 5.25 for Mixtral, Qwen2/3-MoE, DeepSeek-V3, gpt-oss and Llama 4) and then applies its
own softmax/sigmoid, top-k and normalisation. While the router runs, a torch function mode
(`RouteAround`) sets the removed experts' columns of that linear output to -inf and their entries
of the router's per-expert buffers (DeepSeek-V3's `e_score_correction_bias`) to -inf, so the
router's own code picks the next-best surviving experts. Softmax and sigmoid give a removed expert
weight 0, so with `renormalize`=True the gate weights are exactly those of a router that has only
the surviving rows: what `compact` builds. With `renormalize`=False a softmax over all experts
keeps the removed experts' logits in its denominator (the dense model's probabilities of the
surviving experts); this differs only for routers that do not renormalise their top-k weights
(Qwen2/3-MoE with `norm_topk_prob`=False), and such a model cannot be compacted exactly.

The kept experts are a non-persistent bool buffer on the router (`expert_keep`); `finalize`
leaves it (it is not a weight mask) and `compact` removes the experts themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

KEEP = "_lightning_prune_expert_keep"  # router buffer: bool (E,), False for removed experts
RENORMALIZE = "_lightning_prune_expert_renormalize"  # router attribute: bool
_LINEAR = {F.linear, torch._C._nn.linear}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


class RouteAround(TorchFunctionMode):
    """Inside a router's forward: -inf for the removed experts' logits and per-expert buffers."""

    def __init__(self, router: nn.Module, keep: torch.Tensor, renormalize: bool) -> None:
        super().__init__()
        self.keep, self.renormalize = keep, renormalize
        self.buffers = [b for b in router.buffers(recurse=False) if b.dim() == 1 and b.shape[0] == keep.numel()]
        self.dense_logits: torch.Tensor | None = None

    def _masked(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.masked_fill(~self.keep.to(tensor.device), float("-inf"))

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.buffers:
            args = tuple(self._masked(a) if any(a is b for b in self.buffers) else a for a in args)
        if func in _SOFTMAX and not self.renormalize and self.dense_logits is not None:
            first = args[0]
            if isinstance(first, torch.Tensor) and first.shape == self.dense_logits.shape:
                # the dense probabilities, removed experts set to 0 (they are never chosen)
                dense = func(self.dense_logits.to(first.dtype), *args[1:], **kwargs)
                return dense.masked_fill(~self.keep.to(dense.device), 0.0)
        out = func(*args, **kwargs)
        if func in _LINEAR and isinstance(out, torch.Tensor) and out.shape[-1] == self.keep.numel():
            self.dense_logits = out
            return self._masked(out)
        return out


def _enter(router: nn.Module, args: tuple[Any, ...]) -> None:
    mode = RouteAround(router, getattr(router, KEEP), bool(getattr(router, RENORMALIZE, True)))
    router.__dict__.setdefault("_lightning_prune_modes", []).append(mode)
    mode.__enter__()


def _exit(router: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    modes = router.__dict__.get("_lightning_prune_modes", [])
    if modes:
        modes.pop().__exit__(None, None, None)


def _installed(router: nn.Module) -> bool:
    # nn.Module._forward_pre_hooks is internal (torch 2.13): the hooks are found by identity, so that a
    # deepcopy (which copies the hook dicts) can be cleaned up without handles tied to the original.
    return any(hook is _enter for hook in router._forward_pre_hooks.values())


def set_routing(router: nn.Module, keep: torch.Tensor, renormalize: bool = True) -> None:
    """Route around the experts where `keep` is False from now on (replaces an earlier choice)."""
    weight: torch.Tensor = router.weight  # type: ignore[assignment]
    keep = keep.to(device=weight.device, dtype=torch.bool)
    if KEEP in router._buffers:
        router._buffers[KEEP] = keep
    else:
        router.register_buffer(KEEP, keep, persistent=False)
    setattr(router, RENORMALIZE, renormalize)
    if not _installed(router):
        router.register_forward_pre_hook(_enter)
        router.register_forward_hook(_exit, always_call=True)


def remove_routing(router: nn.Module) -> None:
    """Forget the removed experts: the router routes over all of them again."""
    for hooks, hook in ((router._forward_pre_hooks, _enter), (router._forward_hooks, _exit)):
        for key in [k for k, v in hooks.items() if v is hook]:
            del hooks[key]
            router._forward_hooks_always_called.pop(key, None)
    router.__dict__.pop(RENORMALIZE, None)
    router._buffers.pop(KEEP, None)


def routing_keep(router: nn.Module) -> torch.Tensor | None:
    """Bool (E,): the experts the router may choose, or None when it routes over all of them."""
    return router._buffers.get(KEEP) if _installed(router) else None


def routing_renormalizes(router: nn.Module) -> bool:
    """The `renormalize` the router's removed experts were set with (True when none are removed)."""
    return bool(getattr(router, RENORMALIZE, True))
