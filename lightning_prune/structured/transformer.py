"""Group sets of transformers blocks: MLP neurons and attention heads (DESIGN, "Structured groups").

MLP neurons of Llama/Mistral/Qwen2/Qwen3/Gemma (`gate_proj`/`up_proj` rows + `down_proj`
columns), GPT-2 (`c_fc`/`c_proj`, transposed `Conv1D`), OPT (`fc1`/`fc2`), BERT family and ViT
(`intermediate.dense`/`output.dense`); attention heads of Llama-style attention
(`q_proj`/`k_proj`/`v_proj`/`o_proj`; with GQA a unit is one key/value head together with all the
query heads that share it).
"""

from __future__ import annotations

from torch import nn

from lightning_prune.calibration.blocks import find_block_stack
from lightning_prune.structured.groups import GroupSet, layer_parts, out_features

# (producer names, consumer name, config key) of the MLP layouts we know; producers' rows are the neurons.
# The config key is the first of the candidates the model's config has.
MLP_LAYOUTS: tuple[tuple[tuple[str, ...], str, tuple[str, ...]], ...] = (
    (("gate_proj", "up_proj"), "down_proj", ("intermediate_size",)),  # Llama, Mistral, Qwen2/3, Gemma
    (("c_fc",), "c_proj", ("n_inner",)),  # GPT-2 (Conv1D, stored (in, out))
    (("fc1",), "fc2", ("ffn_dim", "intermediate_size")),  # OPT; ViT (transformers 5: `mlp.fc1`/`mlp.fc2`)
    (("intermediate.dense",), "output.dense", ("intermediate_size",)),  # BERT family
)
HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _mlp_group(block_name: str, block: nn.Module, index: int, config: object) -> GroupSet | None:
    modules = dict(block.named_modules())
    for producers, consumer, keys in MLP_LAYOUTS:
        key = next((k for k in keys if hasattr(config, k)), None)
        for name in modules:
            if name != consumer and not name.endswith("." + consumer):
                continue
            prefix = name[: -len(consumer)]  # "" or "mlp." / "" for OPT
            names = [prefix + p for p in producers]
            if not all(n in modules for n in names):
                continue
            owner = f"{block_name}.{prefix[:-1]}" if prefix else block_name
            group = GroupSet(owner, "neuron", out_features(modules[names[0]]), block=index, config_key=key)
            for n in names:
                group.parts += layer_parts(f"{block_name}.{n}", modules[n], "out")
            group.parts += layer_parts(f"{block_name}.{name}", modules[name], "in")
            return group
    return None


def _head_group(block_name: str, block: nn.Module, index: int, config: object) -> GroupSet | None:
    for name, module in block.named_modules():
        children = dict(module.named_children())
        if not all(isinstance(children.get(p), nn.Linear) for p in HEAD_PROJECTIONS):
            continue
        head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        if not isinstance(head_dim, int) or not isinstance(kv_heads, int):
            raise ValueError(
                f"cannot determine the heads of {block_name}.{name}: "
                "no `head_dim` / `num_key_value_heads` on the module or config"
            )
        q_rows = children["q_proj"].out_features
        if children["k_proj"].out_features != kv_heads * head_dim or q_rows % (kv_heads * head_dim):
            raise ValueError(
                f"cannot couple the heads of {block_name}.{name}: k_proj has {children['k_proj'].out_features} rows, "
                f"expected {kv_heads} heads × {head_dim}"
            )
        per_kv = q_rows // kv_heads  # the query rows of all query heads sharing one key/value head
        qualified = f"{block_name}.{name}" if name else block_name
        group = GroupSet(qualified, "head", kv_heads, block=index, config_key="num_key_value_heads")
        group.parts += layer_parts(f"{qualified}.q_proj", children["q_proj"], "out", per_kv)
        group.parts += layer_parts(f"{qualified}.k_proj", children["k_proj"], "out", head_dim)
        group.parts += layer_parts(f"{qualified}.v_proj", children["v_proj"], "out", head_dim)
        group.parts += layer_parts(f"{qualified}.o_proj", children["o_proj"], "in", per_kv)
        return group
    return None


def model_config(model: nn.Module) -> object | None:
    """The Hugging Face config of the model or of the first transformers model inside it (a LightningModule's)."""
    return next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")), None)


def find_block_groups(model: nn.Module, kind: str, blocks: str | None = None) -> list[GroupSet]:
    """The neuron or head group sets of every transformer block, in block order.

    Raises a `ValueError` naming the block whose coupling cannot be determined, and for heads
    where the model's config cannot state a head count with a fixed head size (BERT, GPT-2, OPT,
    ViT derive the head size from `hidden_size`).
    """
    blocks_name, block_list = find_block_stack(model, blocks)
    config = model_config(model)
    found = []
    for index, block in enumerate(block_list):
        name = f"{blocks_name}.{index}"
        group = _mlp_group(name, block, index, config) if kind == "neuron" else _head_group(name, block, index, config)
        if group is None:
            children = ", ".join(n for n, _ in block.named_children())
            if kind == "head":
                raise ValueError(
                    f"cannot prune attention heads of {name} ({type(block).__name__}: {children}): "
                    "heads are removable only in Llama-style attention "
                    "(q_proj/k_proj/v_proj/o_proj with a config `head_dim`); "
                    "this model's config derives the head size from hidden_size. "
                    "Prune MLP neurons (`mlp_sparsity`) or whole blocks (`drop_layers`) instead"
                )
            raise ValueError(
                f"cannot determine the MLP neurons of {name} ({type(block).__name__}: {children}); "
                f"known layouts: {[(p, c) for p, c, _ in MLP_LAYOUTS]}"
            )
        found.append(group)
    return found
