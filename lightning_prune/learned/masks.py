"""`LearnedMasks`: the logits of every target, the masks they give, and the forward that uses them.

Each target weight W computes with `W ⊙ mask` in every forward: from `sample` to `clear_sample` (a
training step), the soft mask of that sample, differentiable in the logits (and in W when W requires
grad); at any other time, the hard argmax mask (exactly N:M; pruned entries +0.0). Which one is
decided by the sample, not by `module.training`: Lightning keeps the train/eval mode submodules come
with (a Hugging Face `from_pretrained` model is in eval mode), and a training step must still learn.
The product replaces the parameter for the duration of the module's own forward only (a forward
pre-hook puts it in, a forward hook that runs even when the forward raises puts the parameter back),
so `state_dict`, optimizers, DDP and checkpoints only ever see the unchanged dense parameter. Pure PyTorch.

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
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.learned.patterns import candidate_patterns, gumbel_noise, hard_mask, init_logits, soft_mask
from lightning_prune.parallel.collectives import all_reduce_sum_, is_distributed
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
    ) -> None:
        self.targets = list(targets)
        self.pattern = pattern
        self.dtype = dtype
        priors = priors or {}
        device = self.targets[0].weight.device
        init = torch.Generator(device="cpu").manual_seed(seed)
        self.logits: dict[str, torch.Tensor] = {}
        for target in self.targets:
            matrix = target.as_matrix(target.weight.detach())
            prior = priors.get(target.name)
            prior_matrix = None if prior is None else target.as_matrix(prior.to(torch.bool).cpu())
            logits = init_logits(matrix.shape, pattern, prior_matrix, prior_strength, init_std, init, dtype)
            self.logits[target.name] = logits.to(target.weight.device).requires_grad_(True)
        self.generator = torch.Generator(device=device).manual_seed(seed + 1)  # the Gumbel noise's own stream
        self._patterns: dict[torch.device, torch.Tensor] = {}
        self._soft: dict[str, torch.Tensor] = {}
        self._hard: dict[str, torch.Tensor] = {}
        self._hooks: list[RemovableHandle] = []
        self._swapped: dict[str, torch.Tensor] = {}
        self.regularizer = 0.0  # λ of MaskLLM's weight regulariser −λ‖W ⊙ M‖², applied through the soft masks

    def parameters(self) -> list[torch.Tensor]:
        """The logits, in target order: what the mask optimizer steps."""
        return [self.logits[t.name] for t in self.targets]

    @torch.no_grad()
    def average_gradients(self) -> None:
        """Average the logits' gradients over the ranks (a no-op in one process): every DDP rank then steps
        the same logits the same way (DDP averages only the module's own parameters)."""
        if not is_distributed():
            return
        grads = [x.grad for x in self.parameters() if x.grad is not None]
        all_reduce_sum_(grads)
        for grad in grads:
            grad.div_(torch.distributed.get_world_size())

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
            noise = gumbel_noise(logits, self.generator)
            with torch.enable_grad():  # also when the first forward runs under no_grad (reentrant checkpointing)
                mask = target.from_matrix(soft_mask(logits, self.patterns(logits.device), tau, scale, noise))
                if self.regularizer and mask.requires_grad:
                    mask.register_hook(self._regularizer_hook(target, mask.detach()))
            self._soft[target.name] = mask

    def _regularizer_hook(self, target: PruneTarget, mask: torch.Tensor) -> Any:
        """The gradient of −λ‖W ⊙ M‖² in M, −2λ·W²·M, added to M's own (MaskLLM's sparse weight
        regularisation: keeps the kept weights large). Added once per backward through M."""
        strength = self.regularizer

        def add(grad: torch.Tensor) -> torch.Tensor:
            return grad - 2.0 * strength * target.weight.detach().float().square() * mask

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
            return weight * soft.to(weight.dtype)
        return torch.where(self.hard_masks()[target.name], weight, torch.zeros((), dtype=weight.dtype))

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
            module._parameters[target.param_name] = masked  # type: ignore[assignment]

        return hook

    def _swap_back(self, target: PruneTarget) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            param = self._swapped.pop(target.name, None)
            if param is not None:
                module._parameters[target.param_name] = param  # type: ignore[assignment]

        return hook

    def memory(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Bytes per target weight of the logits and of `optimizer`'s state for them, and their total."""
        weights = sum(t.weight.numel() for t in self.targets)
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
