"""Lightning's FSDPStrategy (FSDP1, `FullyShardedDataParallel`) is refused at fit start with the reason.

FSDP1 is not supported (see `callbacks.sharding._FSDP1`): a rank's parameters are 1-D views of an
equal element range of a flat buffer, cutting rows, and Lightning 2.6.6 does not run FSDPStrategy on
CPU. The message must say so and point to ModelParallelStrategy (FSDP2, HSDP) and DDP.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Literal

import pytest
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lightning_prune import GradualPruning, IterativePruning, LoRARecovery
from lightning_prune.callbacks.strategy import check_strategy

REASON = r"FSDP1 \(FullyShardedDataParallel\) flattens.*1-D views that cut rows and N:M groups"


@pytest.mark.parametrize("sharding", ["FULL_SHARD", "HYBRID_SHARD"])
def test_fsdp1_is_refused_with_the_reason_and_the_fsdp2_alternative(
    sharding: Literal["FULL_SHARD", "HYBRID_SHARD"],
) -> None:
    strategy = FSDPStrategy(sharding_strategy=sharding, auto_wrap_policy={nn.Linear})
    with pytest.raises(
        ValueError,
        match=rf"`strategy`=FSDPStrategy .*{REASON}.*strategy='ddp'.*ModelParallelStrategy "
        r"\(FSDP2.*PyTorch recommends over FSDP1.*HSDP",
    ):
        check_strategy(strategy, sharded_ok=True)
    with pytest.raises(ValueError, match=rf"{REASON}.*strategy='ddp'.*need whole weights") as refused:
        check_strategy(strategy, sharded_ok=False)
    assert "ModelParallelStrategy" not in str(refused.value)  # whole-weight callbacks are refused there too


@pytest.mark.parametrize("callback", ["gradual", "iterative"])
def test_pruning_callbacks_refuse_fsdp1_at_fit_start(callback: str) -> None:
    made = {
        "gradual": lambda: GradualPruning(0.5, end_step=4, frequency=2),
        "iterative": lambda: IterativePruning(0.5, cycles=2, epochs_per_cycle=1),
    }[callback]()
    trainer = SimpleNamespace(strategy=FSDPStrategy(), optimizers=[], lightning_module=None)
    with pytest.raises(ValueError, match=REASON):
        made.attach(trainer, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))  # type: ignore[arg-type]


def test_lora_recovery_refuses_fsdp1_with_the_reason() -> None:
    trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=2, optimizers=[], lr_scheduler_configs=[])
    with pytest.raises(ValueError, match=rf"{REASON}.*need whole weights"):
        LoRARecovery().attach(trainer, nn.Linear(4, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"{REASON}.*; use one process or ModelParallelStrategy") as refused:
        LoRARecovery().setup(trainer, nn.Linear(4, 4), "fit")  # type: ignore[arg-type]
    assert "ddp" not in str(refused.value)  # LoRARecovery does not run under DDP either


def test_lightning_runs_fsdp1_on_cuda_only() -> None:
    """Why no FSDP1 run is tested on CPU: Lightning 2.6.6 refuses it (revisit the refusal if this changes)."""
    from conftest import make_trainer

    with pytest.raises(ValueError, match=r"strategy `fsdp` requires a GPU accelerator"):
        make_trainer(strategy=FSDPStrategy(), devices=2)
