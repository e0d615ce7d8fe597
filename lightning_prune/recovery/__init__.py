"""Recovery after pruning: distillation losses from the dense model, and block reconstruction."""

from lightning_prune.recovery.losses import (
    DISTILL_LOSSES,
    distill_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    kd_kl_loss,
    mix_losses,
)
from lightning_prune.recovery.reconstruct import ReconstructionResult, block_error, reconstruct_block

__all__ = [
    "DISTILL_LOSSES",
    "ReconstructionResult",
    "block_error",
    "distill_loss",
    "hidden_cosine_loss",
    "hidden_mse_loss",
    "kd_kl_loss",
    "mix_losses",
    "reconstruct_block",
]
