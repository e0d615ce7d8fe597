"""`compact` equals the masked model (fp32, ≤1e-6) for every supported family; configs match weights;
the saved directory loads with stock transformers in a process that never imports lightning_prune."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_prune.masking import get_masks
from lightning_prune.models.classifier import build_digits_net
from lightning_prune.structured import compact, find_groups, mask_units, prune_structured
from lightning_prune.structured.groups import removed_units

VOCAB = 48


def _causal(config_class: str, **kwargs: object) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=VOCAB, max_position_embeddings=64, **kwargs)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _llama_like(name: str, heads: int = 4, kv: int = 2, **extra: object) -> nn.Module:
    return _causal(
        name,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=8,
        **extra,
    )


def _encoder(config_class: str, model_class: str, **kwargs: object) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)).eval()


FAMILIES = {
    "llama_gqa": (lambda: _llama_like("LlamaConfig"), True, 2),
    "qwen3": (lambda: _llama_like("Qwen3Config"), True, 2),
    "qwen2_bias": (lambda: _llama_like("Qwen2Config"), True, 2),
    "mistral": (lambda: _llama_like("MistralConfig", heads=4, kv=4), True, 1),
    "gemma3": (
        lambda: _llama_like(
            "Gemma3TextConfig", sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2
        ),
        True,
        2,
    ),
    "gpt2": (lambda: _causal("GPT2Config", n_embd=32, n_layer=4, n_head=2, n_positions=64), False, 2),
    "opt": (
        lambda: _causal(
            "OPTConfig", hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=2, word_embed_proj_dim=32
        ),
        False,
        2,
    ),
    "bert": (
        lambda: _encoder(
            "BertConfig",
            "BertModel",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        ),
        False,
        0,
    ),
    "vit": (
        lambda: _encoder(
            "ViTConfig",
            "ViTModel",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        False,
        1,
    ),
}


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if model.config.model_type == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    return {"input_ids": torch.randint(0, VOCAB, (2, 12), generator=generator)}


def _output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _calibration(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [_inputs(model)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compact_equals_masked_model(family: str) -> None:
    make, heads, drop = FAMILIES[family]
    model = make()
    report = prune_structured(
        model,
        _calibration(model),
        mlp_sparsity=0.5,
        head_sparsity=0.5 if heads else 0.0,
        drop_layers=drop,
        method="wanda",
    )
    inputs = _inputs(model)
    masked = _output(model, inputs)
    small = compact(model)
    assert (masked - _output(small, inputs)).abs().max() <= 1e-6
    assert sum(p.numel() for p in small.parameters()) == report.parameters_after < report.parameters_before
    _check_config_matches_weights(small, heads)
    assert not get_masks(small)


def _check_config_matches_weights(model: nn.Module, heads: bool) -> None:
    config = model.config
    neurons = find_groups(model, "neuron")
    assert len(neurons) == config.num_hidden_layers
    key = neurons[0].config_key
    assert all(g.count == getattr(config, key) for g in neurons)
    if heads:
        for group in find_groups(model, "head"):
            assert group.count == config.num_key_value_heads
            q_rows = group.parts[0].tensor.shape[0]
            assert q_rows == config.num_attention_heads * config.head_dim


def test_gqa_head_group_is_a_kv_head_with_its_query_heads() -> None:
    model = _llama_like("LlamaConfig", heads=4, kv=2)
    group = find_groups(model, "head")[0]
    mask_units(group, torch.tensor([True, False]))
    attention = model.model.layers[0].self_attn
    assert bool((attention.q_proj.weight[:16] == 0).all()) and bool((attention.q_proj.weight[16:] != 0).all())
    assert bool((attention.k_proj.weight[:8] == 0).all()) and bool((attention.v_proj.weight[8:] != 0).all())
    assert bool((attention.o_proj.weight[:, :16] == 0).all()) and bool((attention.o_proj.weight[:, 16:] != 0).all())
    assert removed_units(group).tolist() == [True, False]


def test_gemma_layer_types_follow_dropped_blocks() -> None:
    model = _llama_like(
        "Gemma3TextConfig",
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"],
    )
    report = prune_structured(model, _calibration(model), drop_layers=2)
    kept = [i for i in range(4) if i not in report.dropped_blocks]
    small = compact(model)
    assert small.config.num_hidden_layers == 2
    assert small.config.layer_types == [
        ["sliding_attention", "full_attention", "full_attention", "sliding_attention"][i] for i in kept
    ]


LOADER = """
import sys, torch, transformers
for path, kind in zip(sys.argv[1::2], sys.argv[2::2]):
    cls = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel
    model = cls.from_pretrained(path).eval()
    with torch.no_grad():
        out = model(**torch.load(path + "/inputs.pt"))
    torch.save(out.logits if hasattr(out, "logits") else out.last_hidden_state, path + "/outputs.pt")
assert "lightning_prune" not in sys.modules
"""


@pytest.mark.slow
def test_saved_compacted_models_load_with_stock_transformers(tmp_path: Path) -> None:
    expected, arguments = {}, []
    for family in ("llama_gqa", "gemma3", "gpt2", "bert"):
        make, heads, drop = FAMILIES[family]
        model = make()
        prune_structured(
            model, _calibration(model), mlp_sparsity=0.25, head_sparsity=0.5 if heads else 0.0, drop_layers=drop
        )
        small = compact(model)
        small.save_pretrained(tmp_path / family)
        inputs = _inputs(small)
        torch.save(inputs, tmp_path / family / "inputs.pt")
        expected[family] = _output(small, inputs)
        arguments += [str(tmp_path / family), "encoder" if family == "bert" else "causal"]
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["n_layer" if family == "gpt2" else "num_hidden_layers"] == small.config.num_hidden_layers
    # A clean environment: no PYTHONPATH, so lightning_prune cannot even be found.
    subprocess.run(
        [sys.executable, "-c", LOADER, *arguments],
        check=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    for family, output in expected.items():
        assert (torch.load(tmp_path / family / "outputs.pt") - output).abs().max() <= 1e-6, family


def _cnn(batchnorm: bool) -> nn.Module:
    torch.manual_seed(0)
    if not batchnorm:
        return build_digits_net("cnn", hidden=32).eval()
    layers = [
        ("conv1", nn.Conv2d(3, 8, 3, padding=1)),
        ("bn1", nn.BatchNorm2d(8)),
        ("act1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 16, 3, padding=1)),
        ("bn2", nn.BatchNorm2d(16)),
        ("act2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(64, 10)),
    ]
    net = nn.Sequential(OrderedDict(layers))
    for bn in (net.bn1, net.bn2):  # non-trivial statistics, as after training
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return net.eval()


@pytest.mark.parametrize("batchnorm", [False, True])
def test_cnn_filters_compact_equals_masked(batchnorm: bool) -> None:
    from lightning_prune.structured.scores import GroupMagnitude
    from lightning_prune.structured.select import prune_group

    net = _cnn(batchnorm)
    for group in find_groups(net, "filter"):
        prune_group(group, GroupMagnitude(), 0.5)
    inputs = torch.randn(4, 64) if not batchnorm else torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        masked = net(inputs)
        small = compact(net)
        assert (masked - small(inputs)).abs().max() <= 1e-6
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == ([16, 32] if not batchnorm else [4, 8])
    assert [c.weight.shape[0] for c in convs] == [c.out_channels for c in convs]


@pytest.mark.parametrize("method", ["flap", "taylor", "magnitude"])
def test_every_score_compacts_exactly_on_llama(method: str) -> None:
    model = _llama_like("LlamaConfig")
    prune_structured(model, _calibration(model), mlp_sparsity=0.5, head_sparsity=0.5, method=method)
    inputs = _inputs(model)
    masked = _output(model, inputs)
    small = compact(model)
    assert (masked - _output(small, inputs)).abs().max() <= 1e-6
    if method == "flap":  # the compensation biases are part of the config the result states
        assert small.config.mlp_bias and small.config.attention_bias
        assert small.model.layers[0].mlp.down_proj.bias is not None
