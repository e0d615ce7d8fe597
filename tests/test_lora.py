"""lightning_prune.lora: wrap, masked-delta forward, sparsity-preserving merge, unmerged save/load.

Contract checks run over one table of (tiny model, pattern), as peft's TEST_CASES do.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from lightning_prune.lora import adapter_parameters, attach_lora, base_name, load_lora, merge_lora, pruned_module_names
from lightning_prune.mask_updates import update_masks
from lightning_prune.masking import finalize, get_mask, get_masks
from lightning_prune.report import max_nonzeros_per_group, sparsity_report
from lightning_prune.targets import find_targets
from tests.conftest import tiny_llama

VOCAB = 64


def llama() -> nn.Module:  # built from the caller's random state (`pruned` seeds it)
    return tiny_llama(seed=None, num_attention_heads=4, vocab_size=VOCAB).eval()


def tiny_gpt2() -> nn.Module:  # Conv1D layers: weights stored (in, out), peft's fan_in_fan_out; eval: no dropout
    return AutoModelForCausalLM.from_config(
        GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, n_positions=32)
    ).eval()


CASES = [(llama, "2:4"), (llama, None), (tiny_gpt2, "2:4")]


def pruned(factory, pattern: str | None) -> nn.Module:
    torch.manual_seed(0)
    model = factory()
    targets = find_targets(model)
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.5, pattern=pattern)
    return model


def randomize_adapters(model: nn.Module) -> None:
    """Non-zero B (peft initialises B = 0), so merges have a delta to add."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in adapter_parameters(model):
            parameter.normal_(0.0, 0.2)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(24).reshape(2, 12) % VOCAB).logits


def zero_sets(model: nn.Module) -> dict[str, torch.Tensor]:
    return {t.name: (t.weight == 0).clone() for t in find_targets(model)}


@pytest.mark.parametrize(("factory", "pattern"), CASES)
@pytest.mark.parametrize("masked_delta", [True, False])
def test_merge_keeps_zero_set_pattern_and_positive_zeros(factory, pattern, masked_delta):
    model = pruned(factory, pattern)
    before = zero_sets(model)
    peft_model = attach_lora(model, r=4, masked_delta=masked_delta)
    randomize_adapters(peft_model)
    merged = merge_lora(peft_model)
    assert merged is model
    after = zero_sets(merged)
    assert after.keys() == before.keys()
    for name, zeros in before.items():
        assert torch.equal(after[name], zeros), name
        assert not torch.signbit(merged.get_parameter(name)[zeros]).any(), name
    for target in find_targets(merged):
        if pattern == "2:4":
            assert max_nonzeros_per_group(target.as_matrix(target.weight.detach()), 4) == 2
        assert 0.0 < float((target.weight != 0).float().mean()) < 1.0  # the merge changed the kept weights
    assert sparsity_report(merged).global_sparsity == pytest.approx(0.5)


@pytest.mark.parametrize(("factory", "pattern"), CASES)
def test_masked_delta_merged_outputs_equal_adapter_outputs(factory, pattern):
    peft_model = attach_lora(pruned(factory, pattern), r=4, masked_delta=True)
    randomize_adapters(peft_model)
    wrapped = logits(peft_model)
    torch.testing.assert_close(logits(merge_lora(peft_model)), wrapped, atol=1e-5, rtol=1e-5)


def test_merge_time_masking_drops_the_pruned_part_of_the_delta():
    """Plain LoRA forward sees the dense delta, so merging (masked) changes the outputs."""
    peft_model = attach_lora(pruned(llama, "2:4"), r=4, masked_delta=False)
    randomize_adapters(peft_model)
    wrapped = logits(peft_model)
    assert (logits(merge_lora(peft_model)) - wrapped).abs().max() > 1e-2


def test_zero_delta_changes_nothing_and_only_adapters_train():
    model = pruned(llama, "2:4")
    reference = logits(model)
    peft_model = attach_lora(model, r=2)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    torch.testing.assert_close(logits(peft_model), reference)  # peft initialises B = 0


def test_finalized_model_derives_masks_from_zeros_and_ends_plain():
    model = finalize(pruned(llama, "2:4"))
    keys = set(model.state_dict())
    before = zero_sets(model)
    assert pruned_module_names(model) == [t.module_name for t in find_targets(model)]
    peft_model = attach_lora(model, r=4)
    assert len(get_masks(peft_model)) == len(before)  # derived masks: the wrapped model reports sparsity
    assert sparsity_report(peft_model).global_sparsity == pytest.approx(0.5)
    randomize_adapters(peft_model)
    merged = merge_lora(peft_model)
    assert get_masks(merged) == {} and set(merged.state_dict()) == keys
    assert all(torch.equal(zero_sets(merged)[name], zeros) for name, zeros in before.items())


def test_wrapped_names_map_back_and_finalize_works_on_wrapped_model():
    model = pruned(llama, "2:4")
    names = set(get_masks(model))
    peft_model = attach_lora(model, r=2, target_modules=r"mlp\.")
    wrapped_names = set(get_masks(peft_model))
    assert {base_name(name) for name in wrapped_names} == names
    assert "base_model.model.model.layers.0.mlp.up_proj.base_layer.weight" in wrapped_names
    lora_modules = {name for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert {base_name(name).rsplit(".", 1)[-1] for name in lora_modules} == {"gate_proj", "up_proj", "down_proj"}
    assert [base_name(t.name) for t in find_targets(peft_model)] == [t.name for t in find_targets(llama())]
    finalize(peft_model)  # bakes the base masks in under the wrapper; adapters untouched
    assert get_masks(peft_model) == {}
    assert sparsity_report(peft_model, find_targets(peft_model)).global_sparsity == pytest.approx(0.5)
    randomize_adapters(peft_model)
    merged = merge_lora(peft_model)  # masks derived from the zeros at merge time
    assert sparsity_report(merged, find_targets(merged)).global_sparsity == pytest.approx(0.5)


@pytest.mark.parametrize("masked_delta", [True, False])
def test_unmerged_adapters_save_and_load_on_the_sparse_base(tmp_path, masked_delta):
    model = pruned(llama, "2:4")
    peft_model = attach_lora(model, r=4, masked_delta=masked_delta)
    randomize_adapters(peft_model)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    fresh = finalize(pruned(llama, "2:4"))  # the same sparse base (same seed), saved elsewhere
    loaded = load_lora(fresh, str(tmp_path), masked_delta=masked_delta)
    torch.testing.assert_close(logits(loaded), expected)
    assert get_mask(loaded.base_model.model.model.layers[0].mlp.up_proj.base_layer) is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "`r`"),
        ({"alpha": 0}, "`alpha`"),
        ({"dropout": 1.0}, "`dropout`"),
        ({"target_modules": "nothing"}, "targets"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attach_lora(pruned(llama, "2:4"), **kwargs)


def test_dense_model_without_targets_is_refused():
    with pytest.raises(ValueError, match="found no pruned layer"):
        attach_lora(llama())


def test_set_mask_on_frozen_weight_is_supported():
    model = llama()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.weight[:, ::2] = 0.0
    peft_model = attach_lora(model, r=2, target_modules=r"up_proj")
    assert torch.equal(get_mask(layer), layer.weight != 0)
    assert not layer.weight.requires_grad
    assert all(p.requires_grad for p in adapter_parameters(peft_model))


@pytest.mark.parametrize(("factory", "pattern"), CASES)
def test_peft_merge_and_unload_keeps_zeros_in_masked_delta_mode(factory, pattern):
    """peft's own merge goes through the MaskedDelta variant: same zero set, same outputs."""
    model = pruned(factory, pattern)
    before = zero_sets(model)
    peft_model = attach_lora(model, r=4, masked_delta=True)
    randomize_adapters(peft_model)
    wrapped = logits(peft_model)
    peft_model.merge_adapter()
    peft_model.unmerge_adapter()  # W back up to rounding; the pruned entries exactly +0.0 throughout
    assert {base_name(name): zeros for name, zeros in zero_sets(peft_model).items()}.keys() == before.keys()
    assert all(torch.equal(zeros, before[base_name(name)]) for name, zeros in zero_sets(peft_model).items())
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(logits(merged), wrapped, atol=1e-5, rtol=1e-5)
    for name, zeros in zero_sets(merged).items():
        assert torch.equal(zeros, before[name]), name
        assert not torch.signbit(merged.get_parameter(name)[zeros]).any(), name
