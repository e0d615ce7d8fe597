"""What an export refuses before it writes anything: a model with adapters still attached, a sparse
format with nothing pruned.

An unmerged peft model is neither a Hugging Face checkpoint (a `PeftModel` is not a
`PreTrainedModel`) nor the plain model's state dict (its keys carry `base_layer` and `lora_A`), so
`load_sparse` could load it only into the same wrapped model. A "sparse" export with no pruned
weight lists no sparse layer: tools that read it get a dense model under a sparse name.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lightning_prune.targets import PruneTarget

MERGE_FIRST = (
    "merge the adapters first: `model = merge_lora(peft_model)` (keeps every pruned zero) and export the model it "
    "returns"
)


def unmerged_adapter_layers(model: nn.Module, merged_later: Collection[int] = ()) -> list[str]:
    """Names of the peft adapter layers (LoRA's and any other tuner's) still attached to `model`,
    leaving out the modules whose `id` is in `merged_later` (a callback merges them before the export)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and id(module) not in merged_later
    ]


def refuse_unmerged(
    model: nn.Module, what: str = "`model`", merged_later: Collection[int] = (), remedy: str = MERGE_FIRST
) -> None:
    """Raise a ValueError when `model` is a `PeftModel` or holds peft adapter layers (see the module docstring);
    `what` names the model in the message, `remedy` says what to do."""
    layers = unmerged_adapter_layers(model, merged_later)
    if layers:
        shown = f"{layers[:3]}{' ...' if len(layers) > 3 else ''}"
        raise ValueError(
            f"{what} ({type(model).__name__}) still has {len(layers)} unmerged adapter layer(s) {shown}: its "
            "export would hold the adapters' keys (`base_layer`, `lora_A`, ...) instead of the model's, no Hugging "
            f"Face checkpoint, loadable only into the same wrapped model; {remedy}"
        )
    if isinstance(model, PeftModel):
        raise ValueError(
            f"{what} is a peft {type(model).__name__} wrapper with no adapter layer left: export the model "
            "`merge_lora` returned (or `peft_model.get_base_model()`), not the wrapper"
        )


def refuse_nothing_pruned(
    format: str,
    model: nn.Module,
    chosen: Sequence[PruneTarget],
    matrices: Sequence[torch.Tensor],
    targets: str | Sequence[str] | None,
) -> None:
    """Raise a ValueError when a sparse `format` would write no weight with a pruned (exact zero) entry."""
    if format == "dense" or any(bool((matrix == 0).any()) for matrix in matrices):
        return
    if not chosen:
        found = (
            f"no layer of {type(model).__name__} is pruned: none carries a mask or was recorded by `finalize`, "
            "and no prunable layer holds an exact zero"
        )
    else:
        names = [t.name for t in chosen]
        which = "it would write sparse" if targets is None else f"`targets`={targets!r} selects"
        found = (
            f"none of the {len(names)} weight(s) {which} ({names[:5]}{' ...' if len(names) > 5 else ''}) "
            "holds a pruned (exact zero) entry"
        )
    select = "" if targets is None else ", select pruned layers with `targets`"
    raise ValueError(
        f"`format`={format!r} writes the pruned layers in a sparse layout, but {found}; prune the model first "
        f"(`prune_oneshot`, or a pruning callback before the export){select}, or use format='dense'"
    )
