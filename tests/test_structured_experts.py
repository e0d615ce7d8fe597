"""`prune_experts`: hand-computed expert scores on a fixed router, routing around removed experts,
`compact` equal to the masked model for every MoE family, stock reload, refusals, all-or-nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from architectures import BY_NAME, CASES
from torch import nn
from torch.nn import functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from lightning_prune import compact, finalize, get_masks, prune_experts
from lightning_prune.registry import STRUCTURED_SCORES, register_structured_score
from lightning_prune.structured.expert_scores import ExpertScore, RoutingStats
from lightning_prune.structured.groups import GroupSet
from lightning_prune.structured.moe import find_expert_layers
from lightning_prune.structured.routing import routing_keep

HIDDEN, EXPERTS = 4, 4
MOE = [pytest.param(c.name, marks=pytest.mark.slow) if c.slow else c.name for c in CASES if c.experts]
# Router rows: expert e's logit is 4·x_e, so a token's two largest coordinates are its two experts.
TOKENS = torch.tensor(
    [
        [3.0, 2.0, 0.0, 0.0],  # → {0, 1}
        [2.0, 3.0, 0.0, 0.0],  # → {1, 0}
        [3.0, 2.0, 0.5, 0.0],  # → {0, 1}
        [3.0, 0.0, 2.0, 0.0],  # → {0, 2}
        [2.0, 0.0, 3.0, 0.0],  # → {2, 0}
        [-1.0, -2.0, 3.0, 2.0],  # → {2, 3}; without expert 3: {2, 0}
    ]
)


class Block(nn.Module):
    """A residual block around transformers' Mixtral sparse MoE with a fixed router."""

    def __init__(self) -> None:
        super().__init__()
        config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=8, num_local_experts=EXPERTS)
        config.num_experts_per_tok = 2
        config._experts_implementation = "eager"
        self.mlp = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            self.mlp.gate.weight.copy_(4.0 * torch.eye(EXPERTS, HIDDEN))
            nn.init.normal_(self.mlp.experts.gate_up_proj, std=0.5)
            nn.init.normal_(self.mlp.experts.down_proj, std=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.0 * self.mlp(x)  # the next block sees the same tokens: its routing is hand-known too


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _by_hand(block: Block) -> dict[str, torch.Tensor]:
    """REAP, frequency and summed gate weight of every expert, one token at a time."""
    experts = block.mlp.experts
    reap, freq, gate = torch.zeros(EXPERTS), torch.zeros(EXPERTS), torch.zeros(EXPERTS)
    for x in TOKENS:
        probs = torch.softmax(4.0 * x, dim=-1)
        top = torch.topk(probs, 2)
        weights = top.values / top.values.sum()
        for e, g in zip(top.indices.tolist(), weights, strict=True):
            a, b = F.linear(x, experts.gate_up_proj[e]).chunk(2)
            out = F.linear(F.silu(a) * b, experts.down_proj[e])
            reap[e] += g * out.norm()
            freq[e] += 1
            gate[e] += g
    return {"reap": reap / freq.clamp_min(1), "frequency": freq, "routing_weight": gate}


def _scores_of(method: str, net: Net) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    class Spy(ExpertScore):
        def expert_scores(self, stats: RoutingStats, group: GroupSet) -> torch.Tensor:
            value = STRUCTURED_SCORES.create(method).expert_scores(stats, group)
            found.append(value.float())
            return value

    prune_experts(net, [TOKENS.unsqueeze(0)], experts_per_layer=2, method=Spy())
    return found


@pytest.mark.parametrize("method", ["reap", "frequency", "routing_weight"])
def test_expert_scores_equal_the_hand_computed_ones(method: str) -> None:
    net = Net()
    expected = [_by_hand(block)[method] for block in net.layers]
    got = _scores_of(method, net)
    assert len(got) == 2
    for value, want in zip(got, expected, strict=True):
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
    if method == "frequency":
        assert got[0].tolist() == [5.0, 3.0, 3.0, 1.0]


def test_frequency_removes_the_least_routed_and_tokens_go_to_the_next_best_survivor() -> None:
    net = Net()
    report = prune_experts(net, [TOKENS.unsqueeze(0)], experts_per_layer=3, method="frequency")
    assert report.kept == {f"layers.{i}.mlp.experts": (3, 4) for i in range(2)}
    routed: list[torch.Tensor] = []
    net.layers[0].mlp.experts.register_forward_hook(lambda m, args, out: routed.append(args[1].sort(-1).values))
    net(TOKENS.unsqueeze(0))
    # expert 3 (one token) is gone: token 5 ({2, 3}) goes to its next best surviving expert, 0
    assert routed[0].tolist() == [[0, 1], [0, 1], [0, 1], [0, 2], [0, 2], [0, 2]]
    masks = get_masks(net)
    assert not masks["layers.0.mlp.experts.down_proj"][3].any() and masks["layers.0.mlp.experts.down_proj"][:3].all()
    assert masks["layers.0.mlp.gate.weight"].all(1).tolist() == [True, True, True, False]


@pytest.mark.parametrize("name", MOE)
def test_no_token_reaches_a_removed_expert_and_compact_equals_the_masked_model(name: str) -> None:
    case = BY_NAME[name]
    model, batches = case.build(), case.batches()
    kept = 3 if name == "llama4_text" else 2
    report = prune_experts(model, batches, experts_per_layer=kept, method="reap")
    layers = find_expert_layers(model)
    seen: dict[str, torch.Tensor] = {}
    for layer in layers:
        keep = routing_keep(layer.router)
        assert keep is not None and int(keep.sum()) == kept
        bias = getattr(layer.router, "e_score_correction_bias", None)
        if bias is not None:  # DeepSeek-V3 adds it after the sigmoid: a removed expert must lose whatever it is
            bias[~keep] = 10.0

        def spy(module: nn.Module, args: tuple[Any, ...], output: Any, name: str = layer.name) -> None:
            if len(args) > 1:  # routed by index
                seen[name] = torch.zeros(module.num_experts, dtype=torch.bool).index_fill_(0, args[1].flatten(), True)
            else:  # Llama 4: pre-routed rows, zero where a token does not go
                seen[name] = args[0].reshape(module.num_experts, -1, args[0].shape[-1]).ne(0).any(-1).any(-1)

        layer.experts.register_forward_hook(spy)
    with torch.no_grad():
        masked = [model(**batch).logits for batch in batches]
    for layer in layers:
        assert not (seen[layer.name] & ~routing_keep(layer.router)).any(), layer.name
    small = compact(model)
    assert not get_masks(small)
    assert sum(p.numel() for p in small.parameters()) == report.parameters_after
    config = small.config.to_dict()
    assert kept in [config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")]
    assert all(layer.count == kept for layer in find_expert_layers(small))
    with torch.no_grad():
        for batch, expected in zip(batches, masked, strict=True):
            assert (small(**batch).logits - expected).abs().max() <= 1e-6


def test_finalize_bakes_the_masks_in_and_still_routes_around_the_removed_experts() -> None:
    case = BY_NAME["qwen3_moe"]
    model, batches = case.build(), case.batches()
    prune_experts(model, batches, expert_sparsity=0.5, method="frequency")
    with torch.no_grad():
        before = model(**batches[0]).logits
        finalize(model)
        assert not get_masks(model)
        torch.testing.assert_close(model(**batches[0]).logits, before, rtol=0, atol=0)
        torch.testing.assert_close(compact(model)(**batches[0]).logits, before, rtol=0, atol=1e-6)


def _qwen3(norm_topk_prob: bool) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    kwargs = {**BY_NAME["qwen3_moe"].kwargs, "norm_topk_prob": norm_topk_prob}
    config = transformers.Qwen3MoeConfig(**kwargs)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_renormalize_false_keeps_the_dense_probabilities_where_the_router_does_not_renormalise(
    norm_topk_prob: bool,
) -> None:
    batches = BY_NAME["qwen3_moe"].batches()
    outputs = {}
    for renormalize in (True, False):
        model = _qwen3(norm_topk_prob)
        prune_experts(model, batches, experts_per_layer=2, method="frequency", renormalize=renormalize)
        with torch.no_grad():
            outputs[renormalize] = model(**batches[0]).logits
        if not renormalize and not norm_topk_prob:
            with pytest.raises(ValueError, match=r"renormalize=False.*prune with renormalize=True"):
                compact(model)
        else:
            with torch.no_grad():
                assert (compact(model)(**batches[0]).logits - outputs[renormalize]).abs().max() <= 1e-6
    differ = not torch.allclose(outputs[True], outputs[False], atol=1e-6)
    assert differ is not norm_topk_prob  # the top-k renormalisation makes the two the same


def test_refusals_name_the_argument_and_what_would_be_valid() -> None:
    case = BY_NAME["qwen2_moe"]
    model, batches = case.build(), case.batches(count=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"top_k=2 experts, more than the 1 kept"):
        prune_experts(model, batches, experts_per_layer=1)
    with pytest.raises(ValueError, match=r"shared experts.*never removed"):
        prune_experts(model, batches, expert_sparsity=0.5, targets="shared_expert")
    with pytest.raises(ValueError, match="exactly one of `expert_sparsity`"):
        prune_experts(model, batches, expert_sparsity=0.5, experts_per_layer=2)
    with pytest.raises(ValueError, match=r"`experts_per_layer` must be in \[1, 4\]"):
        prune_experts(model, batches, experts_per_layer=5)
    with pytest.raises(ValueError, match=r"registered expert score \[.*'reap'.*\]"):
        prune_experts(model, batches, expert_sparsity=0.5, method="wanda")
    with pytest.raises(ValueError, match="`calibration` has no batches"):
        prune_experts(model, [], expert_sparsity=0.5)
    with pytest.raises(ValueError, match=r"leave .* at full width"):
        prune_experts(model, batches, expert_sparsity=0.5, ignore=r"layers\.0\.")
    with pytest.raises(ValueError, match="no mixture-of-experts layers"):
        prune_experts(BY_NAME["llama"].build(), batches, expert_sparsity=0.5)
    assert not get_masks(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_failure_in_the_second_layer_leaves_the_model_untouched() -> None:
    @register_structured_score("fails_on_block_1")
    class FailsLater(ExpertScore):
        def expert_scores(self, stats: RoutingStats, group: GroupSet) -> torch.Tensor:
            if group.block == 1:
                raise RuntimeError("scoring failed")
            return stats.tokens

    try:
        case = BY_NAME["gpt_oss"]
        model, batches = case.build(), case.batches(count=1)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            before = model(**batches[0]).logits
        with pytest.raises(RuntimeError, match="scoring failed"):
            prune_experts(model, batches, experts_per_layer=2, method="fails_on_block_1")
        assert not get_masks(model)
        assert all(routing_keep(layer.router) is None for layer in find_expert_layers(model))
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        with torch.no_grad():
            torch.testing.assert_close(model(**batches[0]).logits, before, rtol=0, atol=0)
    finally:
        STRUCTURED_SCORES.unregister("fails_on_block_1")


LOADER = """
import sys, torch, transformers
for path in sys.argv[1:]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.save(model(**torch.load(path + "/inputs.pt")).logits, path + "/outputs.pt")
assert "lightning_prune" not in sys.modules
"""


@pytest.mark.slow
def test_compacted_moe_models_load_with_stock_transformers(tmp_path: Path) -> None:
    expected = {}
    for name in ("qwen3_moe", "deepseek_v3"):
        case = BY_NAME[name]
        model, batches = case.build(), case.batches(count=1)
        prune_experts(model, batches, expert_sparsity=0.5)
        small = compact(model)
        small.save_pretrained(tmp_path / name)
        torch.save(batches[0], tmp_path / name / "inputs.pt")
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert [config[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in config] == [2]
        with torch.no_grad():
            expected[name] = small(**batches[0]).logits
    # A clean environment: no PYTHONPATH, so lightning_prune cannot even be found.
    subprocess.run(
        [sys.executable, "-c", LOADER, *(str(tmp_path / name) for name in expected)],
        check=True,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    for name, output in expected.items():
        assert (torch.load(tmp_path / name / "outputs.pt") - output).abs().max() <= 1e-6, name


def test_random_needs_no_calibration_and_follows_its_seed() -> None:
    case = BY_NAME["mixtral"]
    chosen = []
    for seed in (0, 0, 1):
        model = case.build()
        prune_experts(model, None, experts_per_layer=2, method="random", method_options={"seed": seed})
        chosen.append([routing_keep(layer.router).tolist() for layer in find_expert_layers(model)])
    assert chosen[0] == chosen[1] != chosen[2]
    assert all(sum(keep) == 2 for keep in chosen[0])


def test_expert_masks_survive_lora_recovery_and_its_merge() -> None:
    """LoRA on an expert-pruned MoE (peft `target_parameters` for the fused experts, the masked router
    rows included): training and `merge_lora` keep the removed experts at zero, tokens still avoid them,
    and `compact` of the merged model equals it."""
    from lightning_prune import attach_lora, merge_lora

    model = _qwen3(norm_topk_prob=True)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (2, 16), generator=generator)} for _ in range(2)]
    prune_experts(model, batches, expert_sparsity=0.5, method="reap")
    removed = {name: ~mask.flatten(1).any(1) for name, mask in get_masks(model).items() if "experts" in name}
    assert removed and all(int(gone.sum()) == gone.numel() // 2 for gone in removed.values())
    peft_model = attach_lora(model, r=4, alpha=8)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for batch in batches * 2:
        peft_model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = merge_lora(peft_model).eval()
    for name, gone in removed.items():
        weight = merged.get_parameter(name)
        assert not bool(weight[gone].any()) and not bool(torch.signbit(weight[gone]).any()), name
        assert bool(weight[~gone].flatten(1).any(1).all()), name  # the kept experts were trained, not zeroed
    with torch.no_grad():
        expected = merged(input_ids=batches[0]["input_ids"]).logits
        small = compact(merged)
        assert small.config.num_experts == 2  # of 4: the compacted model has no removed expert to route to
        torch.testing.assert_close(small(input_ids=batches[0]["input_ids"]).logits, expected, atol=1e-5, rtol=1e-5)
