"""What a stock config can describe: structured pruning refused before the first weight changes.

A block drop in a post-norm model (the residual sum is normalised, so a removed block is no
identity) and a head count the model's config class rejects are errors that say what to do instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

try:  # what transformers' strict configs raise on an invalid architecture (huggingface_hub 1.x)
    from huggingface_hub.errors import StrictDataclassClassValidationError as ConfigValidationError
except ImportError:  # pragma: no cover - older huggingface_hub raise ValueError
    ConfigValidationError = ValueError  # type: ignore[misc,assignment]

from lightning_prune.structured.groups import GroupSet
from lightning_prune.structured.select import units_to_remove
from lightning_prune.structured.transformer import model_config

# Post-norm families: the residual sum goes through a LayerNorm, so a zeroed block is no identity.
POST_NORM_TYPES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "electra",
    "distilbert",
    "albert",
    "camembert",
    "mpnet",
    "deberta",
    "deberta-v2",
)


def check_droppable(model: nn.Module, drop_layers: int, n_blocks: int) -> None:
    """Refuse a `drop_layers` the model does not have, or any in a post-norm model."""
    if not 0 <= drop_layers < n_blocks:  # an integer >= 0: checked by `prune_structured` before the model is read
        raise ValueError(
            f"`drop_layers` must be an integer in [0, {n_blocks}) "
            f"(the model has {n_blocks} blocks), got {drop_layers!r}"
        )
    config = model_config(model)
    post_norm = (
        getattr(config, "model_type", None) in POST_NORM_TYPES or getattr(config, "do_layer_norm_before", True) is False
    )
    if drop_layers and post_norm:
        raise ValueError(
            f"`drop_layers`={drop_layers}: "
            f"{getattr(config, 'model_type', '?')} normalises after the residual sum, "
            "so a block cannot be removed without changing the model; "
            "prune MLP neurons (`mlp_sparsity`) instead"
        )


def check_config_accepts_heads(model: nn.Module, groups: Sequence[GroupSet], head_sparsity: float) -> None:
    """Refuse before pruning a head count the config class rejects (Llama: hidden_size % num_attention_heads)."""
    heads = [g for g in groups if g.kind == "head"]
    config: Any = model_config(model)
    if not heads or config is None:
        return
    count = heads[0].count
    per_kv = heads[0].parts[0].width // heads[0].parts[2 if heads[0].parts[1].name == "bias" else 1].width

    def rejection(kept: int) -> str | None:
        values = {
            **config.to_dict(),
            "num_key_value_heads": kept,
            "num_attention_heads": kept * per_kv,
            "head_dim": getattr(config, "head_dim", None),
        }
        try:
            type(config).from_dict(values)
        except (ValueError, TypeError, ConfigValidationError) as error:
            return str(error).strip().splitlines()[-1].strip()
        return None

    kept = count - units_to_remove(count, head_sparsity)
    reason = rejection(kept)
    if reason is not None:
        valid = sorted(round(1 - k / count, 4) for k in range(1, count) if rejection(k) is None)
        raise ValueError(
            f"`head_sparsity`={head_sparsity} keeps {kept} of {count} key/value heads, "
            f"which {type(config).__name__} rejects ({reason}); "
            f"head sparsities it accepts: {valid}"
        )
