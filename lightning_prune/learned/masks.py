"""`LearnedMasks`: the logits of every target, the masks they give, and the forward that uses them.

Each target weight W computes with `W ⊙ mask` in every forward: from `sample` to `clear_sample` (a
training step), the soft mask of that sample, differentiable in the logits (and in W when W requires
grad); at any other time, the hard argmax mask (exactly N:M; pruned entries +0.0). Which one is
decided by the sample, not by `module.training`: Lightning keeps the train/eval mode submodules come
with (a Hugging Face `from_pretrained` model is in eval mode), and a training step must still learn.
The product replaces the parameter for the duration of the module's own forward only (a forward
pre-hook puts it in, a forward hook that runs even when the forward raises puts the parameter back),
so `state_dict`, optimizers, DDP and checkpoints only ever see the unchanged dense parameter. Pure PyTorch.

Under FSDP2 (`sharded=True`, row-sharded DTensor weights) each rank holds the logits of its own row
block only (1/world of them, `parallel.rows.row_block`), drawn and initialised as one process would
draw those rows; a forward, which sees the unsharded weight, gathers the whole mask from the blocks
(`gather_rows`, whose backward sums every rank's gradient into each block's logits).

Lifecycle::

    masks = LearnedMasks(targets, "2:4", priors=one_shot_masks, seed=0)
    masks.attach()                                  # forwards use W ⊙ mask from now on
    masks.sample(tau=4.0, scale=100.0)              # before each training forward; then backward
    masks.clear_sample()                            # after it: other forwards (validation) use the hard mask
    optimizer.step()                                # over `masks.parameters()`; then masks.step_done()
    keep = masks.hard_masks()                       # bool masks by target name, for `set_mask`
    masks.detach()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from lightning_prune.learned.patterns import candidate_patterns, gumbel_noise, hard_mask, init_logits, soft_mask
from lightning_prune.parallel.checkpoint import as_dtensor
from lightning_prune.parallel.collectives import all_reduce_sum_, is_distributed
from lightning_prune.parallel.rows import gather_rows, replica_group, row_block, sum_over_
from lightning_prune.parallel.sharded import is_sharded, local_tensor, shard_group
from lightning_prune.targets import PruneTarget


class LearnedMasks:
    """Logits over the candidate N:M patterns of each target, and the masked forward (module docstring)."""

    def __init__(
        self,
        targets: Sequence[PruneTarget],
        pattern: str,
        priors: Mapping[str, torch.Tensor] | None = None,
        prior_strength: float = 3.0,
        init_std: float = 0.02,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        sharded: bool = False,
    ) -> None:
        self.targets = list(targets)
        self.sharded = sharded
        self.pattern = pattern
        self.dtype = dtype
        priors = priors or {}
        device = self.targets[0].weight.device
        init = torch.Generator(device="cpu").manual_seed(seed)
        self.logits: dict[str, torch.Tensor] = {}
        self.blocks: dict[str, tuple[int, int, int, dist.ProcessGroup | None]] = {}  # start, count, rows, group
        self.replicas: dist.ProcessGroup | None = None  # HSDP: the ranks that hold the same blocks
        self.ranks = 1  # sharded: the ranks of the mesh (blocks × replicas) whose losses the gradients sum
        for target in self.targets:
            weight = target.weight
            group = shard_group(weight, target.name) if sharded and isinstance(weight, DTensor) else None
            matrix = target.as_matrix(local_tensor(weight).detach())
            start, count = row_block(weight.shape[0], group)
            self.blocks[target.name] = (start, count, weight.shape[0], group)
            if sharded and isinstance(weight, DTensor):
                self.replicas, self.ranks = replica_group(weight), weight.device_mesh.size()
            whole = (*matrix.shape[:-2], weight.shape[0], matrix.shape[-1])
            prior = priors.get(target.name)
            prior_matrix = None if prior is None else target.as_matrix(prior.to(torch.bool).cpu())
            rows = None if group is None else (start, count)
            logits = init_logits(whole, pattern, prior_matrix, prior_strength, init_std, init, dtype, rows=rows)
            self.logits[target.name] = logits.to(weight.device).requires_grad_(True)
        self.generator = torch.Generator(device=device).manual_seed(seed + 1)  # the Gumbel noise's own stream
        self._patterns: dict[torch.device, torch.Tensor] = {}
        self._soft: dict[str, torch.Tensor] = {}
        self._hard: dict[str, torch.Tensor] = {}
        self._hooks: list[RemovableHandle] = []
        self._swapped: dict[str, torch.Tensor] = {}
        self._inserted: dict[str, torch.Tensor] = {}
        self.regularizer = 0.0  # λ of MaskLLM's weight regulariser −λ‖W ⊙ M‖², applied through the soft masks

    def parameters(self) -> list[torch.Tensor]:
        """The logits, in target order: what the mask optimizer steps."""
        return [self.logits[t.name] for t in self.targets]

    @torch.no_grad()
    def average_gradients(self) -> None:
        """Average the logits' gradients over the ranks (a no-op in one process): every DDP rank then steps
        the same logits the same way (DDP averages only the module's own parameters). Sharded, the gathers'
        backward already summed the gradients of the ranks that share the blocks: HSDP's replicas add theirs."""
        if not is_distributed():
            return
        grads = [x.grad for x in self.parameters() if x.grad is not None]
        if not self.sharded:
            all_reduce_sum_(grads)
        elif self.replicas is not None:
            sum_over_(grads, self.replicas)
        for grad in grads:
            grad.div_(self.ranks if self.sharded else torch.distributed.get_world_size())

    def patterns(self, device: torch.device) -> torch.Tensor:
        """The candidate patterns on `device` (made once per device)."""
        if device not in self._patterns:
            self._patterns[device] = candidate_patterns(self.pattern, device)
        return self._patterns[device]

    def sample(self, tau: float, scale: float) -> None:
        """Draw Gumbel noise for every target (in target order) and keep the soft masks for the training forwards."""
        self._soft = {}
        for target in self.targets:
            logits = self.logits[target.name]
            start, count, rows, group = self.blocks[target.name]
            noise = gumbel_noise(logits, self.generator, None if group is None else (start, count, rows))
            with torch.enable_grad():  # also when the first forward runs under no_grad (reentrant checkpointing)
                mask = target.from_matrix(soft_mask(logits, self.patterns(logits.device), tau, scale, noise))
                if self.regularizer and mask.requires_grad and group is None:  # sharded: on the gathered mask
                    mask.register_hook(self._regularizer_hook(local_tensor(target.weight).detach(), mask.detach()))
            self._soft[target.name] = mask

    def _regularizer_hook(self, weight: torch.Tensor, mask: torch.Tensor) -> Any:
        """The gradient of −λ‖W ⊙ M‖² in M, −2λ·W²·M, added to M's own (MaskLLM's sparse weight
        regularisation: keeps the kept weights large). Added once per backward through M; sharded, once per
        forward through the gathered mask, on every rank (the gather's backward sums them, the average
        divides by the ranks again)."""
        strength = self.regularizer

        def add(grad: torch.Tensor) -> torch.Tensor:
            return grad - 2.0 * strength * weight.float().square() * mask

        return add

    def clear_sample(self) -> None:
        """Forget the current soft masks (after the step): forwards use the hard masks until the next sample."""
        self._soft = {}

    def step_done(self) -> None:
        """The logits changed: the hard masks are recomputed at their next use."""
        self._hard = {}
        self._soft = {}

    @torch.no_grad()
    def hard_masks(self) -> dict[str, torch.Tensor]:
        """The argmax pattern of every group, as bool masks of each weight's shape, by target name."""
        if not self._hard:
            self._hard = {
                t.name: t.from_matrix(hard_mask(self.logits[t.name], self.patterns(self.logits[t.name].device)))
                for t in self.targets
            }
        return self._hard

    def masked_weight(self, target: PruneTarget, weight: torch.Tensor) -> torch.Tensor:
        """W ⊙ the current sample's soft mask; without one, W where the hard mask keeps it, +0.0 elsewhere."""
        soft = self._soft.get(target.name)
        if soft is not None:
            mask = self.whole(target.name, soft, weight)
            if self.regularizer and mask.requires_grad and mask is not soft:  # FSDP2 holds W whole in backward
                mask.register_hook(self._regularizer_hook(weight.detach(), mask.detach()))
            return weight * mask.to(weight.dtype)
        keep = self.whole(target.name, self.hard_masks()[target.name], weight)
        return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype))

    def whole(self, name: str, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The mask for the `weight` a forward sees: sharded, the rank's block gathered into the whole
        (FSDP2 unsharded the weight) or as a DTensor (a forward outside FSDP2's); else `mask` itself."""
        group = self.blocks[name][3]
        if group is None:
            return mask
        if is_sharded(weight):
            return as_dtensor(mask, weight)  # type: ignore[arg-type]  # a DTensor, checked
        return gather_rows(mask, weight.shape[0], group)

    def attach(self) -> None:
        """Make every target's forward use its masked weight (idempotent)."""
        if self._hooks:
            return
        for target in self.targets:
            module = target.module
            self._hooks.append(module.register_forward_pre_hook(self._swap_in(target)))
            self._hooks.append(module.register_forward_hook(self._swap_back(target), always_call=True))

    def detach(self) -> None:
        """Remove the hooks: forwards use the plain parameters again."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # The swap writes the module's `_parameters` dict directly, as torch.func.functional_call does
    # (torch.nn.utils._named_member_accessor.swap_tensor, torch 2.13): `setattr` refuses a non-leaf
    # tensor for a registered parameter. The parameter object itself is never replaced or modified.
    def _swap_in(self, target: PruneTarget) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            # A forward re-entered before its hook put the parameter back still finds it in `_swapped`.
            param = self._swapped.get(target.name, module._parameters[target.param_name])
            assert param is not None
            self._swapped[target.name] = param
            masked = self.masked_weight(target, param)
            module._parameters[target.param_name] = self._inserted[target.name] = masked  # type: ignore[assignment]

        return hook

    def _swap_back(self, target: PruneTarget) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            param, inserted = self._swapped.pop(target.name, None), self._inserted.pop(target.name, None)
            # FSDP2's own forward hook on this module (`fully_shard` on the layer) runs first and puts its
            # sharded parameter in place of ours: that one stays (torch 2.13's FSDPParam.to_sharded).
            if param is not None and module._parameters[target.param_name] is inserted:
                module._parameters[target.param_name] = param  # type: ignore[assignment]

        return hook

    def memory(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Bytes per target weight of the logits and of `optimizer`'s state for them, and their total (sharded:
        of this rank's blocks, the same ratio on 1/world of the weights)."""
        weights = sum(local_tensor(t.weight).numel() for t in self.targets)  # sharded: this rank's block
        logits = sum(x.numel() * x.element_size() for x in self.logits.values())
        state = 0
        if optimizer is not None:
            for x in self.logits.values():
                for value in optimizer.state.get(x, {}).values():
                    if torch.is_tensor(value) and value.dim() > 0:
                        state += value.numel() * value.element_size()
        return {"logits": logits / weights, "optimizer": state / weights, "total": (logits + state) / weights}

    def state_dict(self) -> dict[str, Any]:
        """The logits (CPU copies) and the Gumbel noise generator's state."""
        return {
            "logits": {name: x.detach().cpu().clone() for name, x in self.logits.items()},
            "generator": self.generator.get_state(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` saved (same targets and pattern), in place."""
        saved = state["logits"]
        if set(saved) != set(self.logits):
            raise ValueError(
                f"saved logits are for {sorted(saved)[:3]}..., this model's targets are {sorted(self.logits)[:3]}..."
            )
        for name, logits in self.logits.items():
            if saved[name].shape != logits.shape:
                shapes = f"{tuple(saved[name].shape)}, need {tuple(logits.shape)}"
                raise ValueError(f"saved logits of {name!r} have shape {shapes}")
            logits.copy_(saved[name])
        self.generator.set_state(state["generator"])
        self.step_done()


def freeze_parameters(
    model: nn.Module, weights: Sequence[nn.Parameter], freeze_weights: bool, freeze_others: bool
) -> list[nn.Parameter]:
    """Set `requires_grad=False` on `weights` (with `freeze_weights`) and on every other parameter of `model`
    (with `freeze_others`); returns the parameters it froze (those that required grad), to unfreeze later."""
    chosen = {id(weight) for weight in weights}
    frozen = []
    for param in model.parameters():
        freeze = freeze_weights if id(param) in chosen else freeze_others
        if freeze and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(param)
    return frozen
