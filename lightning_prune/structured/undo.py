"""All-or-nothing for unit removal: what masking changed, kept so that a failure can restore it.

Only the entries a new mask zeroes are copied (not whole tensors), with the mask each parameter had.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_prune.masking import get_mask, remove_mask, set_mask
from lightning_prune.structured.groups import Part
from lightning_prune.structured.routing import RENORMALIZE, remove_routing, routing_keep, set_routing


class MaskUndo:
    """Record masks and routing before they change; `restore()` puts every recorded thing back.

    Lifecycle: `mask(parts, removed)` / `route(router)` while pruning; `restore()` on failure.
    """

    def __init__(self) -> None:
        self.masks: list[tuple[nn.Module, str, torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
        self.routes: list[tuple[nn.Module, torch.Tensor | None, bool]] = []

    @torch.no_grad()
    def mask(self, parts: Sequence[Part], removed: torch.Tensor) -> None:
        """Mask the `removed` units' entries of every parameter part (AND with existing masks), recorded."""
        keep = ~removed
        for part in parts:
            if not part.is_parameter:
                continue
            current = get_mask(part.module, part.name)
            entries = part.entry_mask(keep)
            zeroed = ~entries if current is None else current & ~entries
            self.masks.append(
                (
                    part.module,
                    part.name,
                    None if current is None else current.clone(),
                    zeroed,
                    part.tensor.detach()[zeroed].clone(),
                )
            )
            set_mask(part.module, entries if current is None else entries & current, part.name)

    def route(self, router: nn.Module) -> None:
        """Record the router's routing before it changes."""
        keep = routing_keep(router)
        self.routes.append((router, None if keep is None else keep.clone(), bool(getattr(router, RENORMALIZE, True))))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the recorded masks, weights and routing back, latest first."""
        for module, name, previous, zeroed, values in reversed(self.masks):
            remove_mask(module, name)
            if previous is not None:
                set_mask(module, previous, name)
            getattr(module, name).data[zeroed] = values
        for router, keep, renormalize in reversed(self.routes):
            if keep is None:
                remove_routing(router)
            else:
                set_routing(router, keep, renormalize)
        self.masks, self.routes = [], []
