"""Masks kept applied in the forward pass, and `finalize` (README "Architecture": how masks work).

A keep-mask is a non-persistent bool buffer `<param>_mask` on the owning module; a gradient hook
zeroes the pruned gradients and `apply_masks_` re-zeroes the pruned weights after every optimizer
step. Loading a state dict into a masked module re-applies its masks too. Everything on the module
(mask buffers, the list of masked names, the load hook) survives `copy.deepcopy` and pickling;
gradient hooks live with the parameter objects and are re-made for new ones (`ensure_gradient_masking`,
run by `keep_masks_applied`, `apply_masks_` and every load, also with `assign=True`). Masks come
from scores through `mask_updates.update_masks`.

Lifecycle::

    targets = find_targets(model)
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, sparsity=0.5)
    handle = keep_masks_applied(optimizer, model)   # plain loops; the callbacks do this for you
    ...train...
    finalize(model)                                 # exact zeros, no hooks, dense state_dict keys
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from lightning_prune.parallel.sharded import is_sharded, local_tensor
from lightning_prune.validation import check_materialized

_MASKED = "_lightning_prune_masked"  # module attribute: [param_name, ...] of its masked parameters
_LOAD_HOOK = "_lightning_prune_load_hook"  # module attribute: the load_state_dict post hook's handle
_FINALIZED = "_lightning_prune_finalized"  # module attribute kept by finalize: [param_name, ...] it baked in
# Gradient hooks by parameter object, outside the module: a deepcopy, a pickle round trip or
# `load_state_dict(assign=True)` makes new parameters, which are not in here and get their own hook
# (`ensure_gradient_masking`), while the original's hooks stay the original's.
_GRADIENT_HOOKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _mask_name(param_name: str) -> str:
    return f"{param_name}_mask"


# The module attributes the mask bookkeeping adds (a copy that leaves masks behind drops these).
MASK_ATTRIBUTES = frozenset({_MASKED, _LOAD_HOOK})


def mask_buffer_names(module: nn.Module) -> set[str]:
    """Names of the mask buffers attached to `module`'s own parameters (`<param>_mask`)."""
    return {_mask_name(name) for name in getattr(module, _MASKED, ())}


def get_mask(module: nn.Module, param_name: str = "weight") -> torch.Tensor | None:
    """The keep-mask attached to `module.<param_name>`, or None."""
    if param_name not in getattr(module, _MASKED, ()):
        return None
    mask: torch.Tensor = getattr(module, _mask_name(param_name))
    return mask


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def keep_only_(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Set `tensor` to exact +0.0 where the bool `keep` is False, in place; returns `tensor`.

    The one way the package writes pruned entries (out of place: `keep_only_(t.clone(), keep)`;
    inside autograd, where a bit-level write cannot go, `masked_fill(~keep, 0.0)` gives the same
    values). Used when a mask is set or loaded, after every optimizer step, in `finalize`, and on
    export and LoRA merges. On CPU, masked_fill_ and where run a branchy scalar loop (~7x a fused
    AdamW step at 50% random sparsity, benchmarks/mask_overhead.py); a float multiply by the mask
    is vectorised but writes -0.0 for negative weights (and keeps NaN). Multiplying the bit pattern
    as an integer of the same width by the 0/1 mask bytes writes all-zero bits, +0.0, and keeps
    every other value's bits: one pass, no temporaries, ~25% faster than multiply-then-add-0.0.
    """
    if keep.dtype != torch.bool:
        raise ValueError(f"`keep` must be a bool tensor, got {keep.dtype}")
    bits = tensor.view(_SAME_WIDTH_INT[tensor.element_size()])
    bits.mul_(keep.view(torch.uint8))
    return tensor


def _zero_pruned(module: nn.Module, param_name: str) -> None:
    keep_only_(local_tensor(getattr(module, param_name)), getattr(module, _mask_name(param_name)))


class _MaskGradient:
    """Post-accumulate-grad hook: zero the pruned entries of `param.grad` in place.

    After accumulation and in place: a hook returning `grad * mask` allocates a new gradient every
    backward, and on CPU that allocation (fresh pages) cost ~10x the multiply itself
    (benchmarks/mask_overhead.py). It runs inside the accumulation node, before DDP's reducer reads
    the gradient, so every rank reduces masked gradients.
    """

    def __init__(self, module: nn.Module, param_name: str) -> None:
        # A weak reference: the hook lives in the parameter's C++ side, which the garbage collector cannot
        # see, so a strong one (parameter -> hook -> module -> parameter) kept every masked model alive.
        self.module, self.param_name = weakref.ref(module), param_name

    def __call__(self, param: torch.Tensor) -> None:
        module = self.module()
        if param.grad is not None and module is not None and self.param_name in getattr(module, _MASKED, ()):
            keep_only_(param.grad, getattr(module, _mask_name(self.param_name)))


def _hook_gradient(module: nn.Module, param_name: str) -> None:
    """Give the current `module.<param_name>` its gradient hook, once; frozen weights get it later.

    A weight with `requires_grad=False` gets no gradient to mask; it is hooked by the next
    `ensure_gradient_masking` (every `apply_masks_`, `keep_masks_applied` and load) after it is unfrozen.
    FSDP2's sharded parameters get no hook: their gradient is assigned after the reduce-scatter, not
    accumulated, so `mask_sharded_gradients_` masks it before the optimizer step.
    """
    param = getattr(module, param_name)
    if param in _GRADIENT_HOOKS or not param.requires_grad or param.grad_fn is not None or is_sharded(param):
        return
    _GRADIENT_HOOKS[param] = param.register_post_accumulate_grad_hook(_MaskGradient(module, param_name))


def _unhook_gradient(module: nn.Module, param_name: str) -> None:
    param = getattr(module, param_name)
    if param in _GRADIENT_HOOKS:
        _GRADIENT_HOOKS[param].remove()
        del _GRADIENT_HOOKS[param]


def _reapply_after_load(module: nn.Module, incompatible: object) -> None:
    """load_state_dict post hook: re-zero pruned weights, hook parameters `assign=True` replaced."""
    for param_name in getattr(module, _MASKED, ()):
        _hook_gradient(module, param_name)
        _zero_pruned(module, param_name)


def ensure_gradient_masking(model: nn.Module) -> None:
    """Hook every masked parameter of `model` that has no gradient hook yet (copies, unfrozen weights)."""
    for _, module, param_name in masked_parameters(model):
        _hook_gradient(module, param_name)


def set_mask(module: nn.Module, mask: torch.Tensor, param_name: str = "weight") -> None:
    """Attach (or replace) the keep-mask of `module.<param_name>` and zero its pruned entries now.

    Works on frozen weights too (their gradient is masked once they require grad again). For an
    FSDP2-sharded weight (a DTensor), `mask` covers the rank's own block (`weight.to_local()`).
    """
    weight = local_tensor(getattr(module, param_name))
    if mask.shape != weight.shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit `{param_name}` of shape {tuple(weight.shape)}"
        )
    mask = mask.to(device=weight.device, dtype=torch.bool)
    masked = getattr(module, _MASKED, None)
    if masked is None:
        masked = []
        object.__setattr__(module, _MASKED, masked)
        # register_load_state_dict_post_hook is unannotated in torch 2.13.
        hook = module.register_load_state_dict_post_hook(_reapply_after_load)  # type: ignore[no-untyped-call]
        object.__setattr__(module, _LOAD_HOOK, hook)
    if param_name in masked:
        getattr(module, _mask_name(param_name)).copy_(mask)
    else:
        module.register_buffer(_mask_name(param_name), mask.clone(), persistent=False)
        masked.append(param_name)
    _hook_gradient(module, param_name)
    _zero_pruned(module, param_name)


def masked_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(qualified parameter name, owning module, parameter name) of every masked parameter."""
    for module_name, module in model.named_modules():
        for param_name in getattr(module, _MASKED, ()):
            yield (f"{module_name}.{param_name}" if module_name else param_name), module, param_name


def finalized_parameters(model: nn.Module) -> list[str]:
    """Qualified names of the parameters whose masks `finalize` baked in (plain attributes: they
    survive deepcopy and pickling, not a fresh instance loaded from a state dict)."""
    return [
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules()
        for param_name in getattr(module, _FINALIZED, ())
    ]


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """All keep-masks of `model` by qualified parameter name (the tensors themselves, not copies)."""
    return {name: getattr(module, _mask_name(p)) for name, module, p in masked_parameters(model)}


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, param_name = name.rpartition(".")
    try:
        return model.get_submodule(module_name), param_name
    except AttributeError as error:
        raise ValueError(f"saved mask {name!r} names no module of this model") from error


def load_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Attach masks saved by `get_masks` (e.g. from a checkpoint) to the same-named parameters."""
    for name, mask in masks.items():
        module, param_name = _owner(model, name)
        set_mask(module, mask, param_name)


def tighten_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Attach `masks` ANDed with the masks already there: the union of the pruned entries, never a revival.

    All or nothing: every name and shape is checked before any mask changes.
    """
    owners = {name: _owner(model, name) for name in masks}
    for name, (module, param_name) in owners.items():
        shape = tuple(local_tensor(getattr(module, param_name)).shape)
        if tuple(masks[name].shape) != shape:
            raise ValueError(f"saved mask {name!r} of shape {tuple(masks[name].shape)} does not fit its weight {shape}")
    for name, (module, param_name) in owners.items():
        current = get_mask(module, param_name)
        mask = masks[name].to(dtype=torch.bool)
        set_mask(module, mask if current is None else current & mask.to(current.device), param_name)


@torch.no_grad()
def mask_sharded_gradients_(model: nn.Module) -> None:
    """Zero the pruned entries of FSDP2-sharded parameters' gradients (each rank its own block).

    Call after backward, before the optimizer step (the callbacks do it in `on_before_optimizer_step`):
    FSDP2 assigns the reduce-scattered gradient, which no accumulation hook sees.
    """
    for _, module, param_name in masked_parameters(model):
        grad = getattr(module, param_name).grad
        if grad is not None and is_sharded(grad):
            keep_only_(local_tensor(grad), getattr(module, _mask_name(param_name)))


@torch.no_grad()
def apply_masks_(model: nn.Module) -> None:
    """Re-zero every pruned weight of `model` (call after each optimizer step in a plain loop)."""
    for _, module, param_name in masked_parameters(model):
        _hook_gradient(module, param_name)
        _zero_pruned(module, param_name)


def keep_masks_applied(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """Re-apply `model`'s masks after every `optimizer.step()`; returns the hook's handle.

    Also hooks the gradients of masked parameters that have no hook yet (a deepcopy, unfrozen weights).
    """
    ensure_gradient_masking(model)
    return optimizer.register_step_post_hook(lambda *_: apply_masks_(model))


def remove_mask(module: nn.Module, param_name: str = "weight") -> None:
    """Detach the mask of `module.<param_name>` and its hooks without touching the weight."""
    _unhook_gradient(module, param_name)
    getattr(module, _MASKED).remove(param_name)
    delattr(module, _mask_name(param_name))
    if not getattr(module, _MASKED):
        getattr(module, _LOAD_HOOK).remove()
        object.__delattr__(module, _MASKED)
        object.__delattr__(module, _LOAD_HOOK)


def remove_masks(model: nn.Module) -> None:
    """Detach every mask and hook without touching the weights."""
    for _, module, param_name in list(masked_parameters(model)):
        remove_mask(module, param_name)


@torch.no_grad()
def finalize(model: nn.Module) -> nn.Module:
    """Bake the masks in as exact +0.0, remove every mask and hook, and return the plain model.

    Afterwards `model.state_dict()` has exactly the dense model's keys. Each module keeps the names
    of its parameters that were pruned (`finalized_parameters`), so reports count the same layers.
    A model on the meta device (no values to bake in) is a ValueError.
    """
    check_materialized(model)
    for _, module, param_name in masked_parameters(model):
        finalized = getattr(module, _FINALIZED, [])
        object.__setattr__(module, _FINALIZED, [*finalized, *([] if param_name in finalized else [param_name])])
        weight = local_tensor(getattr(module, param_name))
        keep_only_(weight, getattr(module, _mask_name(param_name)) & (weight != 0))  # also turns -0.0 into +0.0
    remove_masks(model)
    return model
