"""Lightning callbacks: they decide when to prune and delegate the math to the core modules."""

from lightning_prune.callbacks.base import MaskingCallback
from lightning_prune.callbacks.export import SparseExport
from lightning_prune.callbacks.gradual import GradualPruning
from lightning_prune.callbacks.iterative import IterativePruning

__all__ = ["GradualPruning", "IterativePruning", "MaskingCallback", "SparseExport"]
