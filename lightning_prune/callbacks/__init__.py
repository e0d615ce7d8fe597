"""Lightning callbacks: they decide when to prune and delegate the math to the core modules."""

from lightning_prune.callbacks.base import MaskingCallback
from lightning_prune.callbacks.dense_teacher import DenseTeacherUser
from lightning_prune.callbacks.distill import KnowledgeDistillation
from lightning_prune.callbacks.experts import ExpertPruning
from lightning_prune.callbacks.export import SparseExport
from lightning_prune.callbacks.gradual import GradualPruning
from lightning_prune.callbacks.iterative import IterativePruning
from lightning_prune.callbacks.keep import KeepMasks
from lightning_prune.callbacks.lora import LoRARecovery
from lightning_prune.callbacks.once import PruneOnFitStart
from lightning_prune.callbacks.oneshot import OneShotPruning
from lightning_prune.callbacks.scheduled import ScheduledPruning
from lightning_prune.callbacks.structured import StructuredPruning

__all__ = [
    "DenseTeacherUser",
    "ExpertPruning",
    "GradualPruning",
    "IterativePruning",
    "KeepMasks",
    "KnowledgeDistillation",
    "LoRARecovery",
    "MaskingCallback",
    "OneShotPruning",
    "PruneOnFitStart",
    "ScheduledPruning",
    "SparseExport",
    "StructuredPruning",
]
