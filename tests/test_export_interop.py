"""Interop with compressed-tensors' own (de)compressors (version 0.14, the last with sparse support).

compressed-tensors 0.14 pins `transformers<5`, which its compressors do not need, so CI (`.ci/run`)
installs it with `pip install --no-deps "compressed-tensors==0.14.*"`; its other dependencies
(pydantic, loguru) are in the `test` extra. CI sets `LIGHTNING_PRUNE_REQUIRE_INTEROP=1`, which turns
a missing compressed-tensors into a failure instead of a skip.
"""

import copy
import importlib
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightning_prune import finalize, find_targets, update_masks
from lightning_prune.export import save_sparse
from tests.conftest import tiny_llama

REQUIRED = os.environ.get("LIGHTNING_PRUNE_REQUIRE_INTEROP") == "1"


def _compressors():
    """compressed_tensors.compressors with the sparse-24-bitmask compressor, or a skip (a failure in CI)."""
    try:
        module = importlib.import_module("compressed_tensors.compressors")
    except ImportError as error:
        if REQUIRED:
            raise
        pytest.skip(f"compressed-tensors is not installed ({error}); CI installs it", allow_module_level=True)
    if not hasattr(module, "Sparse24BitMaskCompressor"):
        message = (
            f"compressed-tensors {importlib.import_module('compressed_tensors').__version__} "
            "has no sparse-24-bitmask compressor (0.14 has)"
        )
        if REQUIRED:
            raise ImportError(message)
        pytest.skip(message, allow_module_level=True)
    return module


compressors = _compressors()


def pruned_llama() -> torch.nn.Module:
    model = tiny_llama().to(torch.bfloat16)
    targets = find_targets(model)
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.5, pattern="2:4")
    return model


@pytest.mark.parametrize("format", ["sparse-24-bitmask", "sparse-bitmask"])
def test_compressed_tensors_reads_our_files(tmp_path, format):
    model = pruned_llama()
    expected = finalize(copy.deepcopy(model)).state_dict()
    path = save_sparse(model, tmp_path / "m", format=format)
    compressor = compressors.ModelCompressor.from_pretrained(str(path))
    assert compressor.sparsity_config.format == format
    fresh = AutoModelForCausalLM.from_config(model.config).to(torch.bfloat16)
    compressor.decompress(str(path), fresh)
    for name, tensor in expected.items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_our_24_file_equals_what_compressed_tensors_writes(tmp_path):
    from compressed_tensors.config import Sparse24BitMaskConfig

    model = pruned_llama()
    state = finalize(copy.deepcopy(model)).state_dict()
    targets = {t.module_name for t in find_targets(model)}
    theirs = compressors.Sparse24BitMaskCompressor(Sparse24BitMaskConfig()).compress(state, compression_targets=targets)
    ours = load_file(save_sparse(model, tmp_path / "m", format="sparse-24-bitmask") / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
