"""`save_sparse`: write a pruned model as a dense HF directory or a legacy compressed-tensors layout.

The directory is built in a temporary sibling and renamed into place (`export/atomic.py`), so a
crash never leaves a half-written checkpoint under `path`, nor no checkpoint at all. Pruned weights
are written as +0.0 (negative zeros broke vLLM's 2:4 kernels, vLLM #13198), and a 2:4 format
refuses any targeted weight that is not 2:4.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from lightning_prune.export.atomic import recover_directory, replace_directory, temporary_prefix
from lightning_prune.export.bitmask import compress_24, compress_bitmask, is_2_4, measured_pattern
from lightning_prune.export.checks import refuse_nothing_pruned, refuse_unmerged
from lightning_prune.export.config import (
    CONFIG_NAME,
    MANIFEST_NAME,
    TWO_FOUR_FORMATS,
    WEIGHTS_NAME,
    build_sparsity_config,
    check_format,
    module_name_of,
    quantization_config,
)
from lightning_prune.export.manifest import write_manifest
from lightning_prune.masking import finalized_parameters, get_masks, keep_only_
from lightning_prune.targets import DEFAULT_TYPES, PruneTarget, find_targets


@torch.no_grad()
def export_state_dict(model: nn.Module, targets: Sequence[PruneTarget]) -> dict[str, torch.Tensor]:
    """The model's state dict on CPU with attached masks baked in and targeted zeros as +0.0.

    The model itself is not modified: this equals `finalize(copy_of_model).state_dict()`.
    """
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    masks = get_masks(model)
    for name in {t.name for t in targets} | set(masks):
        weight = state[name]
        keep = weight != 0  # also turns -0.0 into +0.0
        if name in masks:
            keep &= masks[name].cpu()
        state[name] = keep_only_(weight.clone(), keep)  # a copy: on CPU `state` shares the model's storage
    return state


def export_targets(
    model: nn.Module,
    targets: str | Sequence[str] | None,
    ignore: str | Sequence[str] | None,
    will_prune: Collection[int] = (),
) -> list[PruneTarget]:
    """The weights an export writes as sparse: `targets` if given, else the pruned ones.

    Pruned means carrying a mask, or recorded by `finalize`, or (for a check made before training)
    held by a module whose `id` is in `will_prune` (a pruning callback will mask it first); a model
    with none of these (pruned by other means) falls back to the prunable layers that hold exact zeros.
    """
    if targets is not None:
        return find_targets(model, include=targets, ignore=ignore)
    pruned = set(get_masks(model)) | set(finalized_parameters(model))
    candidates = _all_targets(model, ignore)
    if pruned or will_prune:
        return [t for t in candidates if t.name in pruned or id(t.module) in will_prune]
    return [t for t in candidates if bool((t.weight == 0).any())]


def _all_targets(model: nn.Module, ignore: str | Sequence[str] | None) -> list[PruneTarget]:
    try:
        return find_targets(model, ignore=ignore, ignore_output_head=False)
    except ValueError:  # nothing prunable at all: nothing to write sparse
        return []


def _refuse_non_2_4(targets: Sequence[PruneTarget], matrices: Sequence[torch.Tensor], format: str) -> None:
    for target, matrix in zip(targets, matrices):
        if not is_2_4(matrix):
            raise ValueError(
                f"`format`={format!r} needs every targeted weight to be 2:4 along its input dimension, but "
                f"{target.name!r} (matrix {tuple(matrix.shape)}) measures {measured_pattern(matrix)}; prune it 2:4, "
                "leave it out with `ignore`, or use format='dense' or 'sparse-bitmask' (values are never dropped)"
            )


def _refuse_non_finite(state: dict[str, torch.Tensor]) -> None:
    """A NaN or Inf weight would be written silently and load as a broken model: name it instead."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{name!r} holds {bad} NaN or Inf value(s) of {tensor.numel()}; save_sparse refuses to write "
                "a non-finite model (check the training run that produced it)"
            )


def _aliases(state: dict[str, torch.Tensor], prefer: set[str]) -> dict[str, str]:
    """{alias: primary} for state-dict entries that share storage (tied weights)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        groups.setdefault(key, []).append(name)
    aliases = {}
    for names in groups.values():
        primary = next((n for n in names if n in prefer), names[0])
        aliases.update({n: primary for n in names if n != primary})
    return aliases


def _compressed_tensors(
    state: dict[str, torch.Tensor], pairs: Sequence[tuple[PruneTarget, torch.Tensor]], format: str
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Replace each targeted weight by its packed tensors; returns (tensors, layout of reshaped weights)."""
    tensors = dict(state)
    layout = {}
    for target, matrix in pairs:
        weight = tensors.pop(target.name)
        prefix = module_name_of(target.name)
        if format == "sparse-24-bitmask":
            # Packed along the input dimension: GPT-2 Conv1D and conv kernels are stored as (out, in) matrices.
            flat = matrix.contiguous()
            compressed, bitmask = compress_24(flat)
            packed = {
                "shape": torch.tensor(list(flat.shape)).reshape(-1, 1),
                "compressed": compressed,
                "bitmask": bitmask,
            }
            if tuple(flat.shape) != tuple(weight.shape) or target.transposed:
                layout[target.name] = {
                    "shape": list(weight.shape),
                    "transposed": target.transposed,
                    "experts": target.experts,
                }
        else:
            values, bitmask, row_offsets = compress_bitmask(weight)
            packed = {
                "shape": torch.tensor(list(weight.shape)),
                "compressed": values,
                "bitmask": bitmask,
                "row_offsets": row_offsets,
            }
        tensors.update({f"{prefix}.{key}": value.contiguous() for key, value in packed.items()})
    return tensors, layout


def _write_weights(
    model: nn.Module,
    work: Path,
    state: dict[str, torch.Tensor],
    pairs: list[tuple[PruneTarget, torch.Tensor]],
    format: str,
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Write the weights file(s); returns (tied-weight aliases, layout of reshaped packed weights)."""
    if isinstance(model, PreTrainedModel) and format == "dense":
        model.save_pretrained(work, state_dict=state)  # transformers handles tied weights and sharding
        return {}, {}
    aliases = _aliases(state, prefer={t.name for t, _ in pairs})
    unique = {name: tensor for name, tensor in state.items() if name not in aliases}
    kept = [(t, m) for t, m in pairs if t.name not in aliases]
    tensors, layout = _compressed_tensors(unique, kept, format) if format != "dense" else (unique, {})
    save_file(tensors, str(work / WEIGHTS_NAME), metadata={"format": "pt"})
    return aliases, layout


def _write_hf_config(
    model: PreTrainedModel, directory: Path, sparsity_config: dict[str, Any], compressed: bool
) -> None:
    config_path = directory / CONFIG_NAME
    if not config_path.exists():
        model.config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(directory)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    if compressed:
        config["quantization_config"] = quantization_config(sparsity_config)
    else:
        config["sparsity_config"] = sparsity_config
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_destination(destination: Path, argument: str = "path") -> None:
    """Only an empty directory or an earlier export may be replaced: never delete someone's files.

    `argument` is the caller's name for the directory (`SparseExport` passes "dirpath")."""
    recover_directory(destination)
    if not destination.exists():
        return
    if not destination.is_dir():
        raise ValueError(f"`{argument}`={str(destination)!r} is an existing file, not a directory")
    if any(destination.iterdir()) and not (destination / MANIFEST_NAME).is_file():
        raise ValueError(
            f"`{argument}`={str(destination)!r} is a non-empty directory that save_sparse did not write; "
            "choose a new path"
        )


def save_sparse(
    model: nn.Module,
    path: str | os.PathLike[str],
    format: str = "dense",
    tokenizer: Any | None = None,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
) -> Path:
    """Export `model` to the directory `path` and return it.

    Args:
        model: a Hugging Face `PreTrainedModel` (written as a `save_pretrained` directory) or any
            `nn.Module` (written as `model.safetensors` of its state dict plus the manifest).
        format: "dense" (exact zeros, loads anywhere), "sparse-24-bitmask" (legacy
            compressed-tensors 2:4 layout) or "sparse-bitmask" (values + bitmask, any sparsity).
        tokenizer: saved beside the model when given (`save_pretrained`).
        targets, ignore: regular expressions over module names, as in `find_targets`; default:
            the weights that were pruned — those carrying masks, or after `finalize` those it
            recorded (`finalized_parameters`) — all other layers are written dense and are not
            listed in `sparsity_config.targets`.

    Raises:
        ValueError: bad `format`; `model` is a peft model or holds adapter layers (merge first:
            `merge_lora`); `path` is a file or a non-empty directory not written by save_sparse; a
            sparse format with no pruned weight to write; for a 2:4 format, a targeted weight that
            is not 2:4 (names the first one and its measured pattern); a NaN or Inf in any floating
            tensor (names it). Each before anything is written.
    """
    check_format(format)
    refuse_unmerged(model)
    destination = Path(path)
    check_destination(destination)
    chosen = export_targets(model, targets, ignore)
    state = export_state_dict(model, chosen)
    _refuse_non_finite(state)
    # Fused experts (E, out, in) are measured and packed as one (E·out, in) matrix.
    matrices = [target.as_matrix(state[target.name]).flatten(0, -2) for target in chosen]
    refuse_nothing_pruned(format, model, chosen, matrices, targets)
    if format in TWO_FOUR_FORMATS:
        _refuse_non_2_4(chosen, matrices, format)
    target_modules = {t.module_name for t in chosen if not t.experts}
    ignored = [
        name
        for name, module in model.named_modules()
        if isinstance(module, DEFAULT_TYPES) and name not in target_modules
    ]
    sparsity_config = build_sparsity_config(format, chosen, matrices, ignored)
    huggingface = isinstance(model, PreTrainedModel)
    destination.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=temporary_prefix(destination), dir=destination.parent))
    try:
        aliases, layout = _write_weights(model, work, state, list(zip(chosen, matrices)), format)
        if isinstance(model, PreTrainedModel):
            _write_hf_config(model, work, sparsity_config, compressed=format != "dense")
        if tokenizer is not None:
            tokenizer.save_pretrained(work)
        write_manifest(
            work,
            {
                "format": format,
                "huggingface": huggingface,
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                "sparsity_config": sparsity_config,
                "target_params": [t.name for t in chosen],
                "layout": layout,
                "aliases": aliases,
            },
        )
        replace_directory(work, destination)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return destination
