"""Export formats, file names and the `sparsity_config` metadata block (compressed-tensors' form).

compressed-tensors <= 0.14 (`config/base.py`, `SparsityCompressionConfig`) describes sparsity with
the keys `format`, `targets`, `ignore`, `global_sparsity` and `sparsity_structure`; its
`ModelCompressor.update_config` nests that block in config.json as
`quantization_config = {"quant_method": "compressed-tensors", "version": ..., "sparsity_config": {...}}`,
which is where vLLM < 0.19.1 (`CompressedTensorsConfig._parse_sparsity_config`) reads it.
The dense format puts the same block at the top level of config.json instead: a
`quantization_config` would make transformers demand the compressed-tensors package to load what is
an ordinary dense checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_prune.export.bitmask import is_2_4
from lightning_prune.targets import PruneTarget
from lightning_prune.validation import check_choice

FORMATS = ("dense", "sparse-24-bitmask", "sparse-bitmask")
TWO_FOUR_FORMATS = ("sparse-24-bitmask",)
MANIFEST_NAME = "lightning_prune_export.json"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
COMPRESSED_TENSORS_VERSION = "0.14.0"  # the last release that writes sparse-24-bitmask
MANIFEST_VERSION = 1

# Tensor names per compressed weight, after the module name (`<module>.shape`, ...).
PARAM_NAMES = {
    "sparse-24-bitmask": ("shape", "compressed", "bitmask"),
    "sparse-bitmask": ("shape", "compressed", "bitmask", "row_offsets"),
}


def check_format(format: str) -> str:
    """Validate an export format name."""
    return check_choice(format, "format", FORMATS)


def module_name_of(param_name: str) -> str:
    """`a.b.weight` → `a.b`: compressed-tensors names the packed tensors after the module."""
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name


def sparsity_structure(matrices: Sequence[torch.Tensor]) -> str:
    """ "2:4" when every matrix is 2:4 along its input dimension, else "unstructured"."""
    return "2:4" if matrices and all(is_2_4(m) for m in matrices) else "unstructured"


def build_sparsity_config(
    format: str,
    targets: Sequence[PruneTarget],
    matrices: Sequence[torch.Tensor],
    ignore: Sequence[str],
) -> dict[str, object]:
    """The `sparsity_config` block: format, structure, global sparsity, targeted and ignored layers.

    `targets` lists module names (compressed-tensors and vLLM match layer names or "re:" patterns),
    and the parameter names of fused experts weights (`...experts.gate_up_proj`);
    `global_sparsity` is the fraction of exact zeros over the targeted weights.
    """
    numel = sum(m.numel() for m in matrices)
    zeros = sum(int((m == 0).sum()) for m in matrices)
    return {
        "format": format,
        "global_sparsity": zeros / numel if numel else 0.0,
        "ignore": list(ignore),
        "sparsity_structure": sparsity_structure(matrices),
        "targets": [t.name if t.experts else t.module_name for t in targets],
    }


def quantization_config(sparsity_config: dict[str, object]) -> dict[str, object]:
    """config.json's `quantization_config` entry for a compressed (bitmask) checkpoint."""
    return {
        "quant_method": "compressed-tensors",
        "version": COMPRESSED_TENSORS_VERSION,
        "sparsity_config": sparsity_config,
        "transform_config": {},
    }
