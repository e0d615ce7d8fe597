"""LoRA on fused experts (peft `target_parameters`): adapters per expert, masks kept in the forward and the merge.

Tolerance: the adapted forward adds the delta with one `baddbmm` per expert stack, the merge with
peft's einsum; both round in fp32, so merged and adapted logits agree to 1e-5 (not bitwise).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from architectures import BY_NAME
from conftest import TinyCausalLM, make_trainer
from torch import nn

from lightning_prune import LoRARecovery, get_masks, update_masks
from lightning_prune.lora import adapter_parameters, attach_lora, load_lora, merge_lora, unwrapped_state_dict
from lightning_prune.lora.experts import MaskedParamWrapper
from lightning_prune.report import max_nonzeros_per_group
from lightning_prune.targets import find_targets

NAMES = ["mixtral", "qwen3_moe", "gpt_oss"]


def pruned(name: str) -> nn.Module:
    """The architecture's tiny model with every target, experts included, pruned 2:4 by magnitude."""
    model = BY_NAME[name].build()
    targets = find_targets(model)
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.5, pattern="2:4")
    return model


def expert_targets(model: nn.Module) -> list:
    return [t for t in find_targets(model) if t.experts]


def randomize(model: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in adapter_parameters(model):
            parameter.normal_(0.0, 0.2)


def tokens(model: nn.Module) -> torch.Tensor:
    return torch.arange(24).reshape(2, 12) % model.config.vocab_size


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens(model)).logits


@pytest.mark.parametrize("name", NAMES)
def test_experts_get_adapters_and_the_forward_sees_no_pruned_value(name: str) -> None:
    model = pruned(name)
    experts = {t.name: t for t in expert_targets(model)}
    masks = get_masks(model)  # by the plain model's names
    peft_model = attach_lora(model, r=2)
    wrappers = [m for m in peft_model.modules() if isinstance(m, MaskedParamWrapper)]
    assert sorted(w.parameter_name for w in wrappers) == sorted(t.param_name for t in experts.values())
    assert all(w.lora_A["default"].weight.shape[0] == 2 * w.num_experts for w in wrappers)  # rank 2 per expert
    randomize(peft_model)
    seen: dict[str, torch.Tensor] = {}
    for target in experts.values():  # the parameter as the experts' forward reads it (parametrized)
        target.module.register_forward_pre_hook(
            lambda m, a, t=target: seen.__setitem__(t.name, getattr(m, t.param_name).detach().clone())
        )
    logits(peft_model)
    for key, weight in seen.items():
        assert torch.equal(weight == 0, ~masks[key]) and not torch.signbit(weight[~masks[key]]).any(), key


@pytest.mark.parametrize("name", NAMES)
def test_training_steps_move_only_adapters_and_no_gradient_reaches_a_pruned_entry(name: str) -> None:
    model = pruned(name)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = attach_lora(model, r=2)
    randomize(peft_model)
    target = expert_targets(model)[0]
    pruned_entries = ~get_masks(model)[target.name]  # to read the gradient a pruned entry would get
    target.weight.requires_grad_(True)  # to read the gradient a pruned entry would get
    adapters = adapter_parameters(peft_model)
    before = [p.detach().clone() for p in adapters]
    optimizer = torch.optim.SGD(adapters, lr=0.1)
    peft_model.train()
    for _ in range(2):
        optimizer.zero_grad()
        target.weight.grad = None
        peft_model(input_ids=tokens(model), labels=tokens(model)).loss.backward()
        optimizer.step()
    assert target.weight.grad[pruned_entries].eq(0).all() and target.weight.grad[~pruned_entries].ne(0).any()
    assert all(not torch.equal(p, b) for p, b in zip(adapters, before) if p.grad is not None and p.grad.abs().sum() > 0)
    assert any(not torch.equal(p, b) for p, b in zip(adapters, before))
    for key, value in unwrapped_state_dict(peft_model.base_model.model.state_dict()).items():
        assert torch.equal(value, base[key]), key  # the base weights did not move


@pytest.mark.parametrize("masked_delta", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_merge_keeps_every_zero_and_2_4_group_per_expert(name: str, masked_delta: bool) -> None:
    model = pruned(name)
    masks = {k: v.clone() for k, v in get_masks(model).items()}
    peft_model = attach_lora(model, r=2, masked_delta=masked_delta)
    randomize(peft_model)
    adapted = logits(peft_model)
    merged = merge_lora(peft_model)
    assert merged is model and get_masks(merged).keys() == masks.keys()
    for target in expert_targets(merged):
        weight = target.weight.detach()
        assert torch.equal(weight == 0, ~masks[target.name]), target.name
        assert not torch.signbit(weight[weight == 0]).any(), target.name
        for slice_name, matrix in zip(target.matrix_names(), target.matrices(weight)):
            assert max_nonzeros_per_group(matrix, 4) == 2, slice_name
    if masked_delta:  # the merged model is the adapted one
        torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=1e-5)
    else:  # the forward saw the pruned part of the delta; the merge dropped it
        assert (logits(merged) - adapted).abs().max() > 1e-3


def test_peft_merge_and_unload_keeps_expert_zeros_in_masked_delta_mode() -> None:
    model = pruned("mixtral")
    masks = {k: v.clone() for k, v in get_masks(model).items()}
    peft_model = attach_lora(model, r=2)
    randomize(peft_model)
    merged = peft_model.merge_and_unload()
    assert any(True for _ in expert_targets(merged))
    for target in expert_targets(merged):
        assert (
            torch.equal(target.weight == 0, ~masks[target.name])
            and not torch.signbit(target.weight[target.weight == 0]).any()
        )


def test_unmerged_expert_adapters_save_and_load_on_the_sparse_base(tmp_path: Path) -> None:
    peft_model = attach_lora(pruned("qwen3_moe"), r=2)
    randomize(peft_model)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapters")
    loaded = load_lora(pruned("qwen3_moe"), str(tmp_path / "adapters"))
    assert any(isinstance(m, MaskedParamWrapper) for m in loaded.modules())
    torch.testing.assert_close(logits(loaded), expected)


def test_only_the_named_expert_parameters_are_adapted_and_a_name_that_matches_nothing_is_refused() -> None:
    peft_model = attach_lora(pruned("mixtral"), r=2, target_modules=r"q_proj", target_parameters=r"experts\.down_proj")
    assert {w.parameter_name for w in peft_model.modules() if isinstance(w, MaskedParamWrapper)} == {"down_proj"}
    with pytest.raises(
        ValueError, match=r"`target_parameters`='nothing' matched no fused expert parameter.*gate_up_proj"
    ):
        attach_lora(pruned("mixtral"), target_parameters="nothing")
    with pytest.raises(ValueError, match=r"`target_parameters` has an invalid regular expression"):
        attach_lora(pruned("mixtral"), target_parameters="(")
    with pytest.raises(ValueError, match=r"`dropout`=0.1 cannot apply to `target_parameters`"):
        attach_lora(pruned("mixtral"), dropout=0.1)  # the pruned experts are adapted by default
    with pytest.raises(ValueError, match=r"`dropout`=0.1 cannot apply"):
        LoRARecovery(dropout=0.1, target_parameters="experts")


def test_callback_preflight_names_target_parameters_before_training() -> None:
    module = TinyCausalLM(pruned("mixtral"))
    with pytest.raises(ValueError, match=r"`target_parameters`='nothing'"):
        make_trainer(max_steps=1, callbacks=[LoRARecovery(target_parameters="nothing")]).fit(module)
    assert module.tokens.numel()  # nothing trained: the refusal came at fit start


def test_callback_trains_expert_adapters_merges_and_checkpoints_plain_keys(tmp_path: Path) -> None:
    model = pruned("gpt_oss")
    masks = {k: v.clone() for k, v in get_masks(model).items()}
    keys = set(model.state_dict())
    before = {t.name: t.weight.detach().clone() for t in expert_targets(model)}
    callback = LoRARecovery(r=2, lr=1e-2)
    trainer = make_trainer(max_steps=2, callbacks=[callback], enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(TinyCausalLM(model))
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert {k.removeprefix("model.") for k in checkpoint["state_dict"]} == keys
    assert any(
        "experts.lora_A" in k
        for k in next(v for k, v in checkpoint["callbacks"].items() if "LoRARecovery" in k)["adapters"]
    )
    assert callback.merged
    for target in expert_targets(model):
        assert (
            torch.equal(target.weight == 0, ~masks[target.name])
            and not torch.signbit(target.weight[target.weight == 0]).any()
        )
        assert not torch.equal(target.weight, before[target.name])  # the adapters trained and merged
