"""Demo data modules: scikit-learn digits and causal-LM text (examples of users' data code)."""

from lightning_prune.data.digits import DigitsDataModule
from lightning_prune.data.text import TextDataModule

__all__ = ["DigitsDataModule", "TextDataModule"]
