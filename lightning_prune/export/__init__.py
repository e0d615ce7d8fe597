"""Export pruned models: dense Hugging Face directories, legacy compressed-tensors bitmask layouts."""

from lightning_prune.export.config import FORMATS
from lightning_prune.export.load import load_sparse, load_sparse_state_dict, to_semi_structured_
from lightning_prune.export.save import export_state_dict, save_sparse

__all__ = [
    "FORMATS",
    "export_state_dict",
    "load_sparse",
    "load_sparse_state_dict",
    "save_sparse",
    "to_semi_structured_",
]
