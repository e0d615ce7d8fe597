"""LoRA on pruned layers that FSDP2 (`fully_shard`) splits into row blocks (`DTensor`, `Shard(0)`).

The adapters are injected before sharding (the user's `fully_shard` then covers `lora_A`/`lora_B`
like any other parameter); afterwards every rank holds the rows of the frozen base weight, of the
keep-mask and of `lora_B` that are its own, and the rows of `lora_A` (r × in) that are its own.

- Masks: a mask attached before sharding covers the whole weight; `shard_masks_` replaces it with
  the rank's row block (1/world of the bytes), the same layout as the training-time callbacks'.
- Forward (`masked_delta=True`): FSDP2 gathers the whole weight for the forward, and the masked
  delta needs the whole mask. Where no kept weight is exactly zero (checked once, one all-reduce
  for all layers) the keep-mask is the gathered weight's non-zeros, at no cost; a layer with kept
  exact zeros gathers its mask blocks for each forward (`GatheredMask`) instead.
- Unmerged (`merge=False`): `gathered_adapter_state` gathers the small adapter blocks into whole
  tensors, so peft saves an adapter that one process loads (`LoRARecovery.save_adapter`).
- Merge (`merge_lora_sharded`): each rank adds `s·B_rows·A` to its own rows (A is r × in and is
  gathered whole), then zeroes its pruned entries with its mask block: no weight leaves its rank,
  every zero and every N:M group stays, and the unwrapped model is a plain sharded model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.distributed as dist
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.hooks import RemovableHandle

from lightning_prune.lora.experts import keep_mask
from lightning_prune.lora.wrap import FORWARD_MASK, lora_layers, remove_derived_mask
from lightning_prune.masking import get_mask, keep_only_, masked_parameters, remove_mask, set_mask
from lightning_prune.parallel.sharded import is_sharded, local_tensor, shard_group, sum_over_shards


def check_before_sharding(network: nn.Module, module_names: Sequence[str], parameter_names: Sequence[str]) -> None:
    """Raise unless every module LoRA will adapt is a whole, real `nn.Linear` (call before injecting).

    `module_names` and `parameter_names` are `lora.lora_target_names(network, ...)`. Fused experts
    (3-D), GPT-2's transposed `Conv1D`, embeddings and convolutions cannot be merged row block by row
    block; a weight on the meta device (`empty_init`) has no zeros to keep; a weight already sharded
    would leave the adapters outside FSDP2.
    """
    if parameter_names:
        raise ValueError(
            f"LoRA on fused expert parameters {list(parameter_names)[:3]} is not supported under FSDP2 "
            "(a 3-D expert stack is not split by output rows); "
            "leave them out with `target_parameters`, or name `target_modules` explicitly"
        )
    for name in module_names:
        module = network.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"LoRA target {name!r} is a {type(module).__name__}; "
                "under FSDP2 LoRARecovery adapts (out, in) nn.Linear weights only "
                "(not transposed Conv1D, embeddings or convolutions): leave it out with `target_modules`"
            )
        if is_sharded(module.weight) or module.weight.is_meta:
            where = "already sharded" if is_sharded(module.weight) else "on the meta device"
            raise ValueError(
                f"the weight of {name!r} is {where} when LoRARecovery injects its adapters "
                "(callback `setup`, before `configure_model`): "
                "load the pruned weights before `trainer.fit` and call `fully_shard` in `configure_model`"
            )


def check_after_sharding(model: nn.Module, masked_delta: bool) -> dist.ProcessGroup | None:
    """Raise unless every adapted weight and its adapters are row-sharded over one group; return it.

    With `masked_delta` the forward reads `lora_A`, `lora_B` and the base weight directly, so they
    must be gathered by an enclosing FSDP2 unit, not be units of their own.
    """
    groups = []
    for name, layer in lora_layers(model):
        base = layer.get_base_layer()
        parts = [base, *layer.lora_A.values(), *layer.lora_B.values()]
        if masked_delta and any(isinstance(part, FSDPModule) for part in parts):
            raise ValueError(
                f"`configure_model` applied `fully_shard` to a part of the LoRA layer {name!r} "
                "(its base layer or lora_A/lora_B, e.g. by `isinstance(m, nn.Linear)` over `modules()`); "
                "the masked-delta forward reads them outside their own forward: "
                "shard the LoRA layer or its parent instead (skip modules whose name contains 'lora_' or "
                "'base_layer'), or use masked_delta=False"
            )
        for parameter in (part.get_parameter("weight") for part in parts):
            if not is_sharded(parameter):
                raise ValueError(
                    f"a parameter of the LoRA layer {name!r} is not sharded: "
                    "`fully_shard` every module (e.g. the root) in `configure_model`"
                )
        # The base weight is a DTensor, checked above.
        groups.append(shard_group(base.get_parameter("weight"), name))  # type: ignore[arg-type]
    if any(group is not groups[0] for group in groups):
        raise ValueError("every LoRA layer must be sharded over the same ranks (one FSDP2 mesh)")
    return groups[0] if groups else None


@torch.no_grad()
def shard_masks_(model: nn.Module) -> None:
    """Replace every whole mask of a row-sharded weight by the rank's block (FSDP2's `torch.chunk`
    rows)."""
    for name, module, param_name in list(masked_parameters(model)):
        weight = getattr(module, param_name)
        mask = get_mask(module, param_name)
        if not is_sharded(weight) or mask is None or mask.shape == local_tensor(weight).shape:
            continue
        if mask.shape != weight.shape:
            raise ValueError(
                f"the mask of {name!r} has shape {tuple(mask.shape)}, "
                f"neither the weight's {tuple(weight.shape)} nor its row block's"
            )
        shard_group(weight, name)  # refuses placements other than rows
        # src_data_rank=None: every rank cuts its block from its own copy (the same on all ranks), no
        # communication.
        block = distribute_tensor(mask, weight.device_mesh, weight.placements, src_data_rank=None).to_local().clone()
        remove_mask(module, param_name)
        set_mask(module, block, param_name)


class NonzeroMask:
    """Forward keep-mask of a layer without kept exact zeros: the gathered weight's non-zeros."""

    def __call__(self, base: nn.Module) -> torch.Tensor:
        weight = base.get_parameter("weight")
        if is_sharded(weight):
            raise ValueError(
                "the masked-delta forward got a sharded base weight: "
                "an enclosing FSDP2 unit must gather it (see `check_after_sharding`)"
            )
        return torch.ne(weight, 0)


class GatheredMask:
    """Forward keep-mask of a layer with kept exact zeros: its row blocks gathered from every rank."""

    def __init__(self, weight: DTensor) -> None:
        self.mesh, self.placements, self.shape, self.stride = (
            weight.device_mesh,
            weight.placements,
            weight.shape,
            weight.stride(),
        )

    def __call__(self, base: nn.Module) -> torch.Tensor:
        block = keep_mask(base).view(torch.uint8)  # bytes: gloo all-gathers no bool
        whole = DTensor.from_local(
            block, self.mesh, self.placements, shape=self.shape, stride=self.stride, run_check=False
        ).full_tensor()
        return whole.view(torch.bool)


@torch.no_grad()
def install_forward_masks(model: nn.Module, group: dist.ProcessGroup | None) -> dict[str, str]:
    """Give every LoRA layer's base its forward keep-mask; returns 'nonzero' or 'gathered' by layer name.

    Every rank calls this with the same layers: one all-reduce counts each layer's kept exact zeros.
    """
    layers = lora_layers(model)
    kept_zeros = [
        int(
            (
                keep_mask(layer.get_base_layer()) & (local_tensor(layer.get_base_layer().get_parameter("weight")) == 0)
            ).sum()
        )
        for _, layer in layers
    ]
    kinds = {}
    for (name, layer), count in zip(layers, sum_over_shards(kept_zeros, group)):
        base = layer.get_base_layer()
        # The base weight is a DTensor (check_after_sharding).
        source = NonzeroMask() if count == 0 else GatheredMask(base.get_parameter("weight"))  # type: ignore[arg-type]
        object.__setattr__(base, FORWARD_MASK, source)
        kinds[name] = "nonzero" if count == 0 else "gathered"
    return kinds


class GatheredCheck:
    """Forward pre-hook of a LoRA layer: raise if a part that is no FSDP2 unit of its own comes in sharded.

    Lightning 2.6.6 calls `training_step` directly, not the LightningModule's forward, so the root
    unit gathers its own parameters only when `training_step` calls `self(...)`; a LoRA layer left to
    the root (peft's LoRA layers are no `nn.Linear`, so a loop sharding `nn.Linear` children skips
    them) would otherwise fail inside torch with "mixed torch.Tensor and DTensor".
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, layer: nn.Module, args: object) -> None:
        # `layer` is a LoraLayer, annotated as the hook's nn.Module.
        parts = [layer.get_base_layer(), *layer.lora_A.values(), *layer.lora_B.values()]  # type: ignore[operator]
        if any(is_sharded(part.weight) and not isinstance(part, FSDPModule) for part in parts):
            raise ValueError(
                f"the LoRA layer {self.name!r} runs its forward with sharded weights: no FSDP2 unit gathered them. "
                "Apply `fully_shard` in `configure_model` to the LoRA layers or to modules around them "
                "whose forward runs (peft's LoRA layers are no nn.Linear: "
                "a loop sharding `isinstance(m, nn.Linear)` skips them; "
                "the root unit gathers only when `training_step` calls `self(...)`)"
            )


def guard_gathered_forward(model: nn.Module) -> list[RemovableHandle]:
    """Give every LoRA layer of `model` a `GatheredCheck` forward pre-hook; returns the handles."""
    return [cast(nn.Module, layer).register_forward_pre_hook(GatheredCheck(name)) for name, layer in lora_layers(model)]


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of `model` back into its sharded state (a forward without backward leaves
    the root gathered)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def gathered_adapter_state(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter entries (`lora_`) of `peft_model.state_dict()` as whole CPU tensors, keys unchanged.

    Row-sharded adapters are gathered (A is r × in, B is out × r: small); the base weights stay where
    they are. Every rank must call it, in the same order (one all-gather per adapter tensor).
    """
    # A unit left gathered by a forward without backward would hand out its whole plain tensors.
    reshard(peft_model)
    state = {}
    for name, value in peft_model.state_dict().items():
        if "lora_" in name:
            state[name] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu().clone()
    return state


def _local_delta(layer: LoraLayer, adapter: str, weight: DTensor) -> torch.Tensor:
    """`s·B·A` for the rows of `weight` this rank holds: B's row block (laid out like the weight) times
    the whole A."""
    lora_a, lora_b = layer.lora_A[adapter].get_parameter("weight"), layer.lora_B[adapter].get_parameter("weight")
    if (
        not isinstance(lora_b, DTensor)
        or lora_b.placements != weight.placements
        or lora_b.device_mesh != weight.device_mesh
    ):
        raise ValueError(
            f"lora_B of adapter {adapter!r} is not row-sharded like its base weight ({weight.placements}); "
            "shard both with one FSDP2 mesh"
        )
    whole_a = lora_a.full_tensor() if isinstance(lora_a, DTensor) else lora_a  # r × in: small
    return (local_tensor(lora_b) @ whole_a) * layer.scaling[adapter]  # peft's get_delta_weight order


@torch.no_grad()
def merge_lora_sharded(peft_model: PeftModel) -> nn.Module:
    """`merge_lora` for FSDP2 row blocks: `W_rows ← keep_only(W_rows + s·B_rows·A, M_rows)` on every rank.

    Every rank calls it (A is gathered, one collective per adapter). Returns the unwrapped model,
    still sharded; masks attached before `attach_lora` stay, the ones derived from zeros go.
    """
    reshard(peft_model)
    for name, layer in lora_layers(peft_model):
        base = layer.get_base_layer()
        weight = base.get_parameter("weight")
        if not isinstance(weight, DTensor):
            raise ValueError(
                f"merge_lora_sharded needs FSDP2-sharded base weights; {name!r} is a plain tensor (use merge_lora)"
            )
        rows = local_tensor(weight)
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                rows.add_(_local_delta(layer, adapter, weight).to(rows.dtype))
        keep_only_(rows, keep_mask(base))  # pruned entries: +0.0 + delta → +0.0, never -0.0
        if hasattr(base, FORWARD_MASK):
            object.__delattr__(base, FORWARD_MASK)
        remove_derived_mask(base, "weight")
    return peft_model.unload()
