"""The masks a Lightning checkpoint holds for pruning configurations the resuming Trainer does not have.

Lightning hands a callback only the state saved under its own `state_key`, so a pruning callback
resumed with other settings (`GradualPruning(0.5)` on a checkpoint of `GradualPruning(0.8)`, another
`pattern` or `targets`) used to start from no masks and revive every pruned weight. Every
`MaskingCallback` reads, in `on_load_checkpoint`, the states no callback of the resuming Trainer
claims and that hold masks (ours: `masks` and `reached_sparsity` keys), and the masks a
lightning-prune stage checkpoint carries (`STAGE_KEY`), and keeps their pruned entries.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

STAGE_KEY = "lightning_prune_stage"  # the run's progress and masks in a stage checkpoint (run/resume.py)


@dataclass
class InheritedMasks:
    """Pruned entries a checkpoint holds for configurations other than the resuming callback's.

    `sources` names each configuration (its state key, or the stage checkpoint); `masks` is their
    keep-masks ANDed by parameter (the union of their pruned entries); `states` are the callback
    states they came from (their schedule clocks); `global_step` is the checkpoint's; `has_own_state`
    says whether the checkpoint also holds the resuming callback's own state.
    """

    sources: list[str]
    masks: dict[str, torch.Tensor]
    states: list[dict[str, Any]] = field(default_factory=list)
    global_step: int = 0
    has_own_state: bool = False

    def kept_message(self, configuration: str, sparsity: float) -> str:
        """The warning of a callback (`configuration`, its state key) that kept these masks, its targets now
        at `sparsity`."""
        return (
            f"{configuration} resumes a checkpoint whose masks come from another pruning configuration: "
            f"{'; '.join(self.sources)}. Its pruned entries are kept (monotone: the stricter of the two wins, the "
            f"union of the pruned entries; {pruned_fractions(self.masks)[1]:.2%} of the masked weights are pruned "
            f"in the checkpoint, {sparsity:.2%} of this callback's targets now), and this callback prunes further "
            "on its own schedule; resume with the checkpoint's configuration to continue it exactly"
        )

    def clock(self, key: str) -> int | None:
        """The furthest value of a schedule counter (`step`, `cycles_done`) in the states, None if none has it."""
        values = [int(state[key]) for state in self.states if key in state]
        return max(values) if values else None


def pruned_fractions(masks: Mapping[str, torch.Tensor]) -> tuple[dict[str, float], float]:
    """The pruned fraction of each keep-mask, and of all of them together."""
    pruned = {name: int((~mask).sum()) for name, mask in masks.items()}
    total = sum(mask.numel() for mask in masks.values())
    return {name: pruned[name] / masks[name].numel() for name in masks}, sum(pruned.values()) / max(total, 1)


def is_mask_state(state: object) -> bool:
    """Whether a callback state is a `MaskingCallback`'s (it has `masks` and `reached_sparsity`)."""
    return isinstance(state, Mapping) and "masks" in state and "reached_sparsity" in state


def unclaimed_masks(checkpoint: Mapping[str, Any], claimed: Collection[str], own_key: str) -> InheritedMasks | None:
    """The masks with pruned entries that `checkpoint` holds under no key in `claimed` (the resuming
    Trainer's callbacks' state keys); None when there are none.

    A stage checkpoint's masks (`STAGE_KEY`) count unless the checkpoint has this callback's own state
    (`own_key`): they are then the masks it restores itself, and those of the other callbacks' states.
    Raises a ValueError for masks saved under FSDP2 (blocks in a distributed checkpoint that only the
    callback with the same key can read).
    """
    states: Mapping[str, Any] = checkpoint.get("callbacks") or {}
    foreign = {str(key): state for key, state in states.items() if key not in claimed and is_mask_state(state)}
    for key, state in foreign.items():
        if state.get("sharded"):
            raise ValueError(
                f"the checkpoint holds the masks of {key} as sharded blocks of a distributed checkpoint (FSDP2), "
                "which only a callback with that configuration reads: resume with that pruning callback "
                "(same class, `sparsity`, `pattern` and `targets`)"
            )
    sources = {key: dict(state["masks"]) for key, state in foreign.items()}
    payload = checkpoint.get(STAGE_KEY)
    if own_key not in states and isinstance(payload, Mapping) and payload.get("masks"):
        stage = payload.get("stage", "?")
        sources[f"the masks of lightning-prune stage {stage!r} ({STAGE_KEY})"] = dict(payload["masks"])
    combined: dict[str, torch.Tensor] = {}
    for masks in sources.values():
        for name, mask in masks.items():
            mask = mask.to(dtype=torch.bool, device="cpu")
            if name in combined and combined[name].shape != mask.shape:
                raise ValueError(
                    f"the checkpoint holds masks of two shapes for {name!r}: {tuple(combined[name].shape)} and "
                    f"{tuple(mask.shape)}"
                )
            combined[name] = combined[name] & mask if name in combined else mask.clone()
    if not any(bool((~mask).any()) for mask in combined.values()):
        return None
    pruning = [key for key, masks in sources.items() if any(bool((~m).any()) for m in masks.values())]
    return InheritedMasks(
        sources=pruning,
        masks={name: mask for name, mask in combined.items() if bool((~mask).any())},
        states=[dict(state) for key, state in foreign.items() if key in pruning],
        global_step=int(checkpoint.get("global_step", 0)),
        has_own_state=own_key in states,
    )
