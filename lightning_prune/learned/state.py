"""The learned masks' training state (logits, AdamW's state, the noise generator) as checkpoint parts.

In one process or under DDP (every rank holds the same logits) it is one dict, saved whole with the
callback's state. Under FSDP2 every rank holds only its row block of the logits and of AdamW's two
moments: those go out as row blocks (`(rows, groups·C)`, one per target and kind) for the distributed
checkpoint, and the callback's dict keeps what every rank shares (the generator, the learning rate,
Adam's step counts). `load_learning_state` takes either form back. Pure PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_prune.learned.masks import LearnedMasks

BLOCK_KINDS = ("logits", "exp_avg", "exp_avg_sq")  # the per-rank row blocks of a sharded learning state


def learning_state(
    learner: LearnedMasks, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(the callback-state part, the row blocks by kind and target name); not sharded: no blocks."""
    if not learner.sharded:
        return {"learner": learner.state_dict(), "optimizer": optimizer.state_dict()}, {}
    blocks: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in BLOCK_KINDS}
    steps: dict[str, float] = {}
    for name, logits in learner.logits.items():
        rows = logits.shape[-3]
        blocks["logits"][name] = logits.detach().reshape(rows, -1)
        state = optimizer.state.get(logits, {})
        for kind in BLOCK_KINDS[1:]:
            if kind in state:
                blocks[kind][name] = state[kind].reshape(rows, -1)
        if "step" in state:
            steps[name] = float(state["step"])
    shared = {"generator": learner.generator.get_state(), "groups": optimizer.state_dict()["param_groups"]}
    return {"sharded": {**shared, "steps": steps}}, {kind: found for kind, found in blocks.items() if found}


def block_layout(learner: LearnedMasks, name: str) -> tuple[tuple[int, int], torch.dtype]:
    """The shape and dtype of this rank's row block of target `name`'s logits (and of each Adam moment)."""
    logits = learner.logits[name]
    return (logits.shape[-3], logits.shape[-2] * logits.shape[-1]), logits.dtype


@torch.no_grad()
def load_learning_state(
    learner: LearnedMasks,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    blocks: Mapping[str, Mapping[str, torch.Tensor]],
) -> None:
    """Restore what `learning_state` gave (`blocks`: this rank's row blocks, read back from the checkpoint)."""
    if "sharded" not in state:
        learner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        return
    shared = state["sharded"]
    if "logits" not in blocks:
        raise ValueError("a sharded learning state needs its logits' row blocks from the distributed checkpoint")
    logits = {name: blocks["logits"][name].reshape(x.shape) for name, x in learner.logits.items()}
    learner.load_state_dict({"logits": logits, "generator": shared["generator"]})
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for index, (name, x) in enumerate(learner.logits.items()):
        if name in shared["steps"]:
            moments[index] = {"step": torch.tensor(shared["steps"][name], dtype=torch.float32)}
            moments[index].update({kind: blocks[kind][name].reshape(x.shape) for kind in BLOCK_KINDS[1:]})
    optimizer.load_state_dict({"state": moments, "param_groups": shared["groups"]})
