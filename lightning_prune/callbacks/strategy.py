"""Which Lightning strategies the callbacks run under: one isinstance check for FSDP2, and the refusals.

Lightning's `ModelParallelStrategy` is its strategy for FSDP2 (`fully_shard`): parameters are
row-sharded DTensors, which the masks follow block by block. FSDP1 (`FSDPStrategy`) and DeepSpeed
(`DeepSpeedStrategy`, importable without deepspeed installed: lightning 2.6.6 checks for it only
when the strategy is built) shard parameters in ways the masks cannot follow, and are refused.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_prune.validation import check_materialized

# Why FSDP1 is refused (torch 2.13, lightning 2.6.6). Lightning refuses FSDPStrategy with
# accelerator="cpu" (and passes FSDP1 no CPU device_id); in a CPU probe that bypassed both (a
# subclass, modules wrapped in `configure_model` with device_id=cpu, use_orig_params=True, 2 gloo
# ranks), outside the forward pass each rank's parameters and gradients were 1-D views of its equal
# slice of the wrapped module's flat buffer, cut mid-row (rank 0: 1560 of a 48x64 weight's 3072
# entries); its sharded state dict re-chunks whole parameters by rows, a third layout.
_FSDP1 = (
    "FSDP1 (FullyShardedDataParallel) flattens each wrapped module's parameters into one 1-D buffer and gives "
    "every rank an equal range of its elements, so a rank's parameters are 1-D views that cut rows and N:M groups "
    "at arbitrary offsets (with use_orig_params=True too), and its sharded checkpoints lay the same parameters out "
    "by rows instead; "
)
_FSDP2 = (
    " or ModelParallelStrategy (FSDP2, Lightning's strategy for `fully_shard`, which PyTorch recommends over FSDP1: "
    "`fully_shard` in `configure_model`, parameters as row-sharded DTensors; HSDP: a 2-D (replicate, shard) mesh)"
)


def is_fsdp2(strategy: object) -> bool:
    """True under Lightning's `ModelParallelStrategy` (FSDP2), subclasses included."""
    return isinstance(strategy, ModelParallelStrategy)


def check_strategy(strategy: object, sharded_ok: bool, ddp_ok: bool = True) -> bool:
    """Raise for strategies the masks cannot follow; return True under FSDP2 (`ModelParallelStrategy`).

    `sharded_ok` is False for callbacks that need whole weights (structured pruning); `ddp_ok` is False
    for callbacks that do not run under DDP either (LoRARecovery), so the message does not offer it.
    """
    if is_fsdp2(strategy) and sharded_ok:
        return True
    if not isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        return False
    reason = _FSDP1 if isinstance(strategy, FSDPStrategy) else ""
    ddp = "strategy='ddp' (masks are identical on every rank)" if ddp_ok else "one process"
    raise ValueError(
        f"`strategy`={type(strategy).__name__} shards parameters in a way this callback does not support: "
        f"{reason}use {ddp}{_FSDP2 if sharded_ok else ''}. One-shot and structured pruning need whole weights: "
        "prune before sharding (one-shot runs block by block with `offload`), then train the pruned model sharded"
    )


def check_materialized_before_setup(strategy: object, module: pl.LightningModule) -> None:
    """At the callbacks' `setup` (before Lightning moves the module to its device): refuse a module on the
    meta device (`validation.check_materialized`) where nothing will materialize it; sharding strategies
    (FSDP, FSDP2, DeepSpeed) and a module's own `configure_model` may, so they are left to `preflight`."""
    # `is_overridden` is Lightning's public helper (lightning.pytorch.utilities.model_helpers, 2.6.6).
    sharding = isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy))
    if not sharding and not is_overridden("configure_model", module):
        check_materialized(module)
