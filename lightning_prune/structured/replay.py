"""What `compact` reads from a model, kept so that another process can compact a fresh copy the same way.

`compact` removes the units that the model's masks prune whole (neurons, heads, filters, dropped
blocks) and the experts its routers route around (`structured/routing.py`). `compaction_record`
takes both before compacting; `replay_compaction` puts them on a freshly built model of the same
configuration and compacts it, which gives the compacted model's shapes and configuration (a resumed
run then loads the checkpoint's weights into it). Pure PyTorch.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_prune.masking import get_masks, load_masks
from lightning_prune.structured.compact import compact
from lightning_prune.structured.routing import routing_keep, routing_renormalizes, set_routing


def compaction_record(model: nn.Module) -> dict[str, Any]:
    """The masks and the routers' kept experts of `model` (CPU copies): what `compact` is about to remove."""
    routing = {}
    for name, module in model.named_modules():
        keep = routing_keep(module)
        if keep is not None:
            routing[name] = (keep.cpu().clone(), routing_renormalizes(module))
    masks = {name: mask.detach().cpu().clone() for name, mask in get_masks(model).items()}
    return {"masks": masks, "routing": routing}


def replay_compaction(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Compact `model` (built like the one `record` was taken from) as that one was compacted."""
    load_masks(model, record["masks"])
    for name, (keep, renormalize) in record["routing"].items():
        set_routing(model.get_submodule(name), keep, renormalize)
    return compact(model)
