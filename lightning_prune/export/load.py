"""`load_sparse`: read a `save_sparse` directory back, verified, optionally onto CUDA 2:4 kernels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lightning_prune.export.atomic import recover_directory
from lightning_prune.export.bitmask import decompress_24, decompress_bitmask, is_2_4
from lightning_prune.export.config import PARAM_NAMES, module_name_of
from lightning_prune.export.manifest import read_manifest

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _read_tensors(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(n for n in manifest["files"] if n.endswith(".safetensors")):
        try:
            tensors.update(load_file(str(directory / name)))
        except SafetensorError as error:
            raise ValueError(f"{name!r} in {directory} is not a readable safetensors file: {error}") from error
    return tensors


def _unpack(tensors: dict[str, torch.Tensor], param: str, format: str, layout: dict[str, Any] | None) -> torch.Tensor:
    """Rebuild one weight from its packed tensors, checking shapes, dtypes and bit counts."""
    prefix = module_name_of(param)
    parts = {}
    for key in PARAM_NAMES[format]:
        if f"{prefix}.{key}" not in tensors:
            raise ValueError(f"packed tensor {prefix}.{key!s} of {param!r} is missing from the checkpoint")
        parts[key] = tensors.pop(f"{prefix}.{key}")
    shape = [int(s) for s in parts["shape"].flatten().tolist()]
    try:
        if format == "sparse-24-bitmask":
            dense = decompress_24(parts["compressed"], parts["bitmask"], shape)
        else:
            dense = decompress_bitmask(parts["compressed"], parts["bitmask"], shape)
            counts = (dense != 0).sum(-1)
            if not torch.equal(parts["row_offsets"], torch.cumsum(counts, 0) - counts):
                raise ValueError("row_offsets do not match the bitmask's row counts")
    except ValueError as error:
        raise ValueError(f"packed weight {param!r} is inconsistent: {error}") from error
    if layout is not None and layout.get("experts"):  # fused experts packed as (E·out, in)
        dense = dense.reshape(int(layout["experts"]), -1, dense.shape[-1])
        dense = (dense.transpose(1, 2) if layout["transposed"] else dense).reshape(layout["shape"]).contiguous()
    elif layout is not None:
        dense = (dense.t() if layout["transposed"] else dense).reshape(layout["shape"]).contiguous()
    return dense


def load_sparse_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(dense state dict, manifest) of a `save_sparse` directory, every file verified first.

    Raises:
        ValueError: naming the file or tensor that is missing, truncated, modified or inconsistent.
    """
    directory = Path(path)
    recover_directory(directory)
    manifest = read_manifest(directory)
    tensors = _read_tensors(directory, manifest)
    format = manifest["format"]
    if format in PARAM_NAMES:
        for param in manifest["target_params"]:
            if param not in manifest["aliases"]:
                tensors[param] = _unpack(tensors, param, format, manifest["layout"].get(param))
    for alias, primary in manifest["aliases"].items():
        tensors[alias] = tensors[primary]
    return tensors, manifest


def _build_huggingface(directory: Path, manifest: dict[str, Any]) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    if manifest["format"] == "dense":
        return getattr(transformers, config.architectures[0]).from_pretrained(directory, dtype="auto")
    # The bitmask formats carry a compressed-tensors `quantization_config`; we decode it ourselves.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return getattr(transformers, config.architectures[0])._from_config(config)


def check_state_fits(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise before anything is copied when `state` does not fit `model` name for name, shape for shape.

    A key the checkpoint lacks passes only when the model ties it to a key the checkpoint has.
    """
    current = model.state_dict()
    unexpected = sorted(set(state) - set(current))
    if unexpected:
        raise ValueError(
            f"checkpoint has tensors the model does not: {unexpected[:10]}; "
            "is `model` the exported model's class and config?"
        )
    shapes = [
        f"{key}: checkpoint {tuple(state[key].shape)}, model {tuple(current[key].shape)}"
        for key in state
        if tuple(state[key].shape) != tuple(current[key].shape)
    ]
    if shapes:
        raise ValueError(f"checkpoint tensors do not fit the model's shapes: {shapes[:10]}")
    present = {current[key].data_ptr() for key in state}
    missing = [key for key in current if key not in state and current[key].data_ptr() not in present]
    if missing:
        raise ValueError(f"checkpoint lacks tensors the model needs: {missing[:10]}")


def _load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Assign the tensors (keeping their dtypes bit for bit) after checking that all of them fit."""
    check_state_fits(model, state)
    model.load_state_dict(state, strict=False, assign=True)
    tie_weights = getattr(model, "tie_weights", None)
    if callable(tie_weights):
        tie_weights()


def to_semi_structured_(model: nn.Module, params: list[str]) -> list[str]:
    """Move `model` to CUDA and swap each listed 2:4 `nn.Linear` weight for a semi-structured tensor.

    Returns the converted parameter names. Other layer types (GPT-2 Conv1D, convolutions) stay dense.
    """
    if not torch.cuda.is_available():
        raise ValueError(
            "`semi_structured`=True needs a CUDA GPU "
            "(torch.sparse.to_sparse_semi_structured runs only on CUDA); none is available"
        )
    from torch.sparse import to_sparse_semi_structured

    model.cuda()
    converted = []
    for param in params:
        module_name, _, param_name = param.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, param_name)
        if not isinstance(module, nn.Linear) or not is_2_4(weight.detach()):
            continue
        if weight.dtype not in SEMI_STRUCTURED_DTYPES:
            raise ValueError(
                f"`semi_structured`=True needs fp16 or bf16 weights, but {param!r} is {weight.dtype}; "
                "cast the model first"
            )
        setattr(module, param_name, nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False))
        converted.append(param)
    if not converted:
        raise ValueError(f"`semi_structured`=True found no 2:4 nn.Linear weight among {params[:10]}")
    return converted


def load_sparse(
    path: str | os.PathLike[str], model: nn.Module | None = None, semi_structured: bool = False
) -> nn.Module:
    """Load a `save_sparse` directory into a model, bitwise equal to the exported one.

    Args:
        path: the directory.
        model: the instance to load into; optional for Hugging Face exports (built from config.json),
            required for plain `nn.Module` exports. Its tensors are replaced by the loaded ones (CPU).
        semi_structured: move to CUDA and run each 2:4 linear layer with
            `torch.sparse.to_sparse_semi_structured` (fp16/bf16 only). Measured on an H100 with
            torch 2.11 (`benchmarks/export.py`): each eager call costs ~0.8 ms of host-side setup,
            so the kernels' 1.2-1.45x gain on large batches shows only under CUDA graphs
            (e.g. `torch.compile(mode="reduce-overhead")`).
    """
    directory = Path(path)
    state, manifest = load_sparse_state_dict(directory)
    if model is None:
        if not manifest["huggingface"]:
            raise ValueError(
                f"`model` is required: {directory} holds a plain {manifest['model_class']}; "
                "pass a fresh instance to load into"
            )
        model = _build_huggingface(directory, manifest)
        if manifest["format"] == "dense":
            state = {}  # from_pretrained has loaded the verified files already
    if state:
        _load_into(model, state)
    if semi_structured:
        to_semi_structured_(model, manifest["target_params"])
    return model
