"""One-shot pruning: Wanda/SparseGPT/magnitude solvers, the block-by-block driver, the callback."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig, BertModel, GPT2Config

from benchmarks.reference_sparsegpt import reference_sparsegpt
from lightning_prune.callbacks.oneshot import OneShotPruning
from lightning_prune.masking import get_masks, set_mask
from lightning_prune.oneshot import (
    FeatureNormStats,
    HessianStats,
    calibrate_sequentially,
    find_blocks,
    inverse_hessian_factor,
    magnitude_mask,
    owl_sparsities,
    prune_oneshot,
    sparsegpt_prune,
    wanda_mask,
)
from lightning_prune.oneshot.api import ONESHOT_TYPES, take_samples
from lightning_prune.report import max_nonzeros_per_group
from lightning_prune.targets import find_targets
from tests.conftest import tiny_llama

VOCAB = 64


def llama(hidden: int = 32, layers: int = 2, seed: int = 0) -> nn.Module:
    return tiny_llama(
        seed,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=VOCAB,
    ).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return BertModel(config).eval()


def batches(count: int = 3, size: int = 2, length: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (size, length), generator=generator)} for _ in range(count)]


def block_targets(model: nn.Module) -> list:
    ((name, _),) = find_blocks(model)
    return [t for t in find_targets(model, types=ONESHOT_TYPES) if t.module_name.startswith(name + ".")]


# --- solvers on hand-computable inputs ---------------------------------------------------------


def test_wanda_compares_within_rows_and_magnitude_across_the_layer() -> None:
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([4.0, 1.0, 1.0, 1.0])  # scores row 0: [4, 2, 3, 4]; row 1: [16, 3, 2, 1]
    assert wanda_mask(weight, norms, 0.5).tolist() == [[True, False, False, True], [True, True, False, False]]
    assert magnitude_mask(weight, 0.5).tolist() == [[False, False, True, True], [True, True, False, False]]
    # 2:4 on the same scores: the same two per row here.
    assert wanda_mask(weight, norms, 0.5, "2:4").tolist() == [[True, False, False, True], [True, True, False, False]]


def test_wanda_prunes_the_same_count_in_every_row() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 40) * torch.logspace(-2, 2, 16).unsqueeze(1)  # rows of very different scale
    keep = wanda_mask(weight, torch.rand(40), 0.3)
    assert (~keep).sum(1).tolist() == [12] * 16  # round(0.3 · 40) in each row


def test_sparsegpt_with_identity_hessian_is_blockwise_magnitude_without_update() -> None:
    weight = torch.tensor([[1.0, -5.0, 2.0, 6.0], [-3.0, 4.0, 7.0, -8.0]])
    pruned, keep = sparsegpt_prune(weight, torch.eye(4), 0.5, blocksize=2)
    # Blocks of 2 columns, each pruning its 2 smallest |w| of 4 (|1|, |−3|; then |2|, |6|);
    # no error reaches other columns (H⁻¹ diagonal), so the kept weights are unchanged.
    assert keep.tolist() == [[False, True, False, False], [False, True, True, True]]
    assert pruned.tolist() == [[0.0, -5.0, 0.0, 0.0], [0.0, 4.0, 7.0, -8.0]]
    assert not torch.signbit(pruned[~keep]).any()


@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
def test_sparsegpt_matches_the_reference_math(pattern: str | None) -> None:
    torch.manual_seed(0)
    W, X = torch.randn(24, 48), torch.randn(200, 48) * torch.rand(48)
    X[:, 5] = 0  # a dead input
    stats = HessianStats("layer", 48)
    stats.add(X)
    n, m = (0, 0) if pattern is None else map(int, pattern.split(":"))
    # exact_count: the reference's own threshold prunes k + 1 per block; ours prunes exactly k.
    expected = reference_sparsegpt(W, stats.hessian(), 0.5, m - n if m else 0, m, blocksize=16, exact_count=True)
    pruned, keep = sparsegpt_prune(W, stats.hessian(), 0.5, pattern, blocksize=16)
    torch.testing.assert_close(pruned, expected, rtol=1e-4, atol=1e-5)
    assert (pruned[:, 5] == 0).all() and float((~keep).float().mean()) == 0.5


def test_hessian_redamps_then_raises() -> None:
    indefinite = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues 4 and −2
    upper = inverse_hessian_factor(indefinite, 0.01)  # fails at λ = 0.01, 0.1, 1; succeeds at 10
    torch.testing.assert_close(upper.t() @ upper, torch.linalg.inv(indefinite + 10 * torch.eye(2)))
    assert torch.equal(upper, upper.triu())
    with pytest.raises(ValueError, match="percdamp"):
        inverse_hessian_factor(indefinite, 0.01, attempts=3)


def test_statistics_are_fp32_sums_with_token_counts() -> None:
    inputs = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]], dtype=torch.bfloat16)
    norms, hessian = FeatureNormStats("x", 2), HessianStats("x", 2)
    norms.add(inputs)
    hessian.add(inputs)
    assert norms.sum.dtype == torch.float32 and int(norms.count) == 2
    assert norms.feature_norms().tolist() == pytest.approx([10**0.5, 2.0])
    assert hessian.hessian().tolist() == [[10.0, 2.0], [2.0, 4.0]]  # (2/2)·Σ x xᵀ
    norms.add(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        norms.feature_norms()
    hessian.add(torch.tensor([[float("inf"), 0.0]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        hessian.hessian()


def test_owl_sparsities_by_hand() -> None:
    # Ratios rescaled to [0, 2λ] = [0, 0.08, 0.16], centred on density 0.5: sparsities 0.58, 0.5, 0.42.
    assert owl_sparsities([0.0, 0.5, 1.0], 0.5, 0.08) == pytest.approx([0.58, 0.5, 0.42])
    assert owl_sparsities([0.2, 0.2], 0.5) == [0.5, 0.5]


# --- prune_oneshot on Hugging Face models -------------------------------------------------------


@pytest.mark.parametrize("build", [llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_2_of_4_on_every_targeted_weight(build, method: str) -> None:
    model = build()
    report = prune_oneshot(model, batches(), method=method, pattern="2:4", progress=False)
    targets = block_targets(model)
    assert len(report.layers) == len(targets) > 0
    masks = get_masks(model)
    for target in targets:
        keep = target.as_matrix(masks[target.name])
        assert keep.reshape(keep.shape[0], -1, 4).sum(-1).eq(2).all(), target.name  # exactly 2 of every 4
        weight = target.as_matrix(target.weight)
        assert max_nonzeros_per_group(weight, 4) <= 2 and (weight[~keep] == 0).all()
        assert not torch.signbit(weight[~keep]).any()


def test_report_and_unstructured_counts_per_row() -> None:
    model = llama()
    report = prune_oneshot(model, batches(), method="wanda", sparsity=0.25, progress=False)
    assert report.global_sparsity == pytest.approx(0.25)
    for target in block_targets(model):
        keep = target.as_matrix(get_masks(model)[target.name])
        assert (~keep).sum(1).eq(round(0.25 * keep.shape[1])).all()
    assert "lm_head.weight" not in get_masks(model)


def _prune_by_hand(model: nn.Module, data: list[dict[str, torch.Tensor]], method: str) -> None:
    """Block by block: run the whole model (earlier blocks already pruned), collect, prune."""
    ((_, blocks),) = find_blocks(model)
    for block in blocks:
        targets = find_targets(block, types=ONESHOT_TYPES, ignore_output_head=False)
        stats = {
            t.name: (HessianStats if method == "sparsegpt" else FeatureNormStats)(t.name, t.weight.shape[1])
            for t in targets
        }
        handles = [t.module.register_forward_hook(lambda m, a, o, s=stats[t.name]: s.add(a[0])) for t in targets]
        with torch.no_grad():
            for batch in data:
                model(**batch)
        for handle in handles:
            handle.remove()
        for t in targets:
            if method == "sparsegpt":
                new, keep = sparsegpt_prune(t.weight.data, stats[t.name].hessian(), 0.5)
                t.weight.data.copy_(new)
            else:
                keep = wanda_mask(t.weight, stats[t.name].feature_norms(), 0.5)
            set_mask(t.module, keep)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_driver_equals_pruning_the_layers_by_hand_in_order(method: str) -> None:
    data = batches()
    for batch in data:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch["attention_mask"][0, -4:] = 0  # padding reaches the blocks through the captured kwargs
    driven, by_hand = llama(), llama()
    prune_oneshot(driven, data, method=method, progress=False)
    _prune_by_hand(by_hand, data, method)
    hand_masks = {f"{name}": mask for name, mask in get_masks(by_hand).items()}
    assert get_masks(driven).keys() == hand_masks.keys()
    for name, mask in get_masks(driven).items():
        assert torch.equal(mask, hand_masks[name]), name
    for (name, a), b in zip(driven.named_parameters(), by_hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_driver_outputs_of_unpruned_blocks_equal_the_model() -> None:
    model, data = llama(), batches(count=2)
    seen: list[torch.Tensor] = []
    final = model.model.norm
    handle = final.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        for batch in data:
            model(**batch)
    handle.remove()
    last_inputs: list[torch.Tensor] = []

    def record(index, name, block, run_block) -> None:
        if index == 1:
            h = block.register_forward_hook(lambda m, a, o: last_inputs.append(o if torch.is_tensor(o) else o[0]))
            run_block()
            h.remove()

    calibrate_sequentially(model, data, record, progress=False)
    for expected, got in zip(seen, last_inputs):
        torch.testing.assert_close(got, expected)


def test_offload_on_and_off_give_equal_masks() -> None:
    on, off = llama(), llama()
    prune_oneshot(on, batches(), method="sparsegpt", offload=True, progress=False)
    prune_oneshot(off, batches(), method="sparsegpt", offload=False, progress=False)
    for name, mask in get_masks(off).items():
        assert torch.equal(get_masks(on)[name], mask), name
    assert all(p.device.type == "cpu" for p in on.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_to_cuda_keeps_one_block_on_the_device() -> None:
    on, off = llama(layers=4), llama(layers=4)
    peak_blocks = []
    data = batches()
    calibrate_sequentially(
        on,
        data,
        lambda i, n, b, run: peak_blocks.append(sum(p.is_cuda for p in on.parameters() if p.dim() > 1)),
        device="cuda",
        offload=True,
        progress=False,
    )
    per_block = sum(p.dim() > 1 for p in on.model.layers[0].parameters())
    outside = sum(p.dim() > 1 for n, p in on.named_parameters() if ".layers." not in n)
    assert peak_blocks == [per_block + outside] * 4
    prune_oneshot(on, data, method="wanda", offload=True, device="cuda", progress=False)
    prune_oneshot(off, data, method="wanda", progress=False)
    assert all(p.device.type == "cpu" for p in on.parameters())
    for name, mask in get_masks(off).items():
        assert torch.equal(get_masks(on)[name].cpu(), mask), name


def test_owl_profile_spreads_sparsity_over_blocks_with_the_target_mean() -> None:
    model = llama(layers=3)
    report = prune_oneshot(
        model, batches(), method="wanda", sparsity=0.5, sparsity_profile="owl", owl_lambda=0.1, progress=False
    )
    per_block = [report.as_dict()[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(3)]
    assert sum(per_block) / 3 == pytest.approx(0.5, abs=0.01)
    assert max(per_block) - min(per_block) == pytest.approx(0.2, abs=0.02)


def test_bf16_model_gets_fp32_statistics_and_exact_counts() -> None:
    model = llama().to(torch.bfloat16)
    seen = []
    prune_oneshot(
        model,
        batches(),
        method="sparsegpt",
        pattern="2:4",
        reduce_stats=lambda stats: seen.extend(stats),
        progress=False,
    )
    assert seen and all(s.sum.dtype == torch.float32 and int(s.count) == 3 * 2 * 16 for s in seen)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert max_nonzeros_per_group(model.model.layers[0].mlp.up_proj.weight, 4) <= 2


def test_take_samples_cuts_the_last_batch() -> None:
    taken = take_samples(batches(count=3, size=4), 6)
    assert [b["input_ids"].shape[0] for b in taken] == [4, 2]


def test_bad_inputs_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="`calibration` has no batches"):
        prune_oneshot(llama(), [], method="wanda", progress=False)
    with pytest.raises(ValueError, match="`calibration` has no batches"):
        prune_oneshot(llama(), None, method="sparsegpt", progress=False)
    with pytest.raises(ValueError, match="divide by 16"):
        prune_oneshot(llama(hidden=40), batches(), method="wanda", sparsity=0.75, pattern="4:16", progress=False)
    with pytest.raises(ValueError, match=r"one whole-model pass .*blocks="):  # a plain MLP has no block list
        mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        prune_oneshot(mlp, [torch.randn(2, 4)], reconstruct=True, progress=False)
    with pytest.raises(ValueError, match="`blocks`='nope'"):
        prune_oneshot(llama(), batches(), blocks="nope", progress=False)
    nan_model = llama()
    nan_model.model.embed_tokens.weight.data[:] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        prune_oneshot(nan_model, batches(), method="wanda", progress=False)
    with pytest.raises(ValueError, match="`method`"):
        prune_oneshot(llama(), batches(), method="obs", progress=False)
    with pytest.raises(ValueError, match=r"`sparsity` must be 0.5"):
        prune_oneshot(llama(), batches(), sparsity=0.6, pattern="2:4", progress=False)
    with pytest.raises(ValueError, match="`num_samples`"):
        OneShotPruning(num_samples=0)


class _Stages(nn.Module):
    def __init__(self, between: bool) -> None:
        super().__init__()
        self.between = between
        self.stages = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x) * 2 if self.between else stage(x)
        return self.head(x)


def test_explicit_blocks_name_works_on_a_plain_module() -> None:
    torch.manual_seed(0)
    report = prune_oneshot(
        _Stages(between=False), [torch.randn(4, 8)], method="wanda", pattern="2:4", blocks="stages", progress=False
    )
    assert [layer.name for layer in report.layers] == ["stages.0.0.weight", "stages.1.0.weight"]


def test_blocks_with_computation_between_them_are_refused_and_left_unchanged() -> None:
    torch.manual_seed(0)
    net = _Stages(between=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not take the output of stages\.0"):
        prune_oneshot(net, [torch.randn(4, 8)], method="wanda", blocks="stages", progress=False)
    assert not get_masks(net)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("num_samples", [-3, 0, 2.5, "8", True])
def test_prune_oneshot_refuses_bad_num_samples(num_samples) -> None:
    with pytest.raises(ValueError, match=r"`num_samples` must be None or an integer >= 1, got"):
        prune_oneshot(tiny_llama(), [torch.zeros(1, 4, dtype=torch.long)], num_samples=num_samples, progress=False)


def test_mismatched_calibration_shapes_name_the_batch() -> None:
    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    batches = [torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 9)]
    # Batches after the first stop at block 0's arguments in the capture pass, so block 0 meets it.
    with pytest.raises(
        ValueError, match=r"calibration batch 2 \(hidden states \(2, 9\)\) failed in block layers\.0: .*"
    ):
        prune_oneshot(Blocks(), batches, method="wanda", blocks="layers", progress=False)


def test_prune_oneshot_gives_every_submodule_its_own_train_or_eval_mode_back() -> None:
    class Wrapper(nn.Module):  # a LightningModule in train mode around a pretrained model loaded in eval mode
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama().eval()

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids).logits

    wrapper = Wrapper()
    wrapper.model.model.layers[0].mlp.train()  # one submodule in train mode inside the eval model
    before = {name: module.training for name, module in wrapper.named_modules()}
    assert before[""] and not before["model"]
    prune_oneshot(
        wrapper,
        [torch.randint(0, 16, (2, 8))],
        method="wanda",
        sparsity=0.5,
        progress=False,
        reconstruct=True,
        reconstruct_steps=1,
    )
    assert {
        name: module.training for name, module in wrapper.named_modules()
    } == before  # dropout stays off where it was off
