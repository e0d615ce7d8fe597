"""Demo data modules: scikit-learn digits, causal-LM text and paragraphs for sentence encoders
(examples of users' data code)."""

from lightning_prune.data.digits import DigitsDataModule
from lightning_prune.data.sentences import SentenceDataModule
from lightning_prune.data.text import TextDataModule

__all__ = ["DigitsDataModule", "SentenceDataModule", "TextDataModule"]
