"""masking.py: the forward never sees pruned values, zero gradients, +0.0 after AdamW, finalize."""

import pytest
import torch
from torch import nn

from lightning_prune.mask_updates import update_masks
from lightning_prune.masking import (
    apply_masks_,
    finalize,
    get_mask,
    get_masks,
    keep_masks_applied,
    load_masks,
    remove_masks,
    set_mask,
    tighten_masks,
)
from lightning_prune.targets import find_targets
from tests.conftest import tiny_gpt2, tiny_llama


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def half_pruned(model: nn.Module) -> list:
    targets = find_targets(model, ignore_output_head=False)
    # Prune the positive half of each weight: the rest of the model keeps negative values, so a
    # multiply-by-mask implementation would write -0.0 where a masked_fill writes +0.0.
    update_masks(targets, {t.name: -t.weight.detach() for t in targets}, sparsity=0.5)
    return targets


def test_set_mask_zeroes_with_positive_zero_and_stores_bool() -> None:
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-1.0, 2.0, -3.0, 4.0], [5.0, -6.0, 7.0, -8.0]]))
    mask = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    set_mask(layer, mask)
    assert layer.weight.tolist() == [[0.0, 2.0, 0.0, 4.0], [5.0, 0.0, 7.0, 0.0]]
    assert not torch.signbit(layer.weight).logical_and(layer.weight == 0).any()
    stored = get_mask(layer)
    assert stored.dtype == torch.bool and stored.element_size() == 1
    assert "weight_mask" not in layer.state_dict()
    with pytest.raises(ValueError, match=r"mask of shape \(4, 2\) does not fit `weight` of shape \(2, 4\)"):
        set_mask(layer, mask.t())


def test_forward_ignores_pruned_values() -> None:
    model = mlp()
    targets = half_pruned(model)
    x = torch.randn(5, 8)
    reference = model(x)
    with torch.no_grad():  # write garbage into pruned slots, as a stray optimizer update would
        for target in targets:
            target.weight.add_(torch.where(get_mask(target.module), 0.0, 100.0))
    apply_masks_(model)
    assert torch.equal(model(x), reference)


def test_pruned_weights_get_zero_grad_and_stay_positive_zero_under_adamw() -> None:
    model = mlp()
    targets = half_pruned(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    keep_masks_applied(optimizer, model)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).square().sum().backward()
        for target in targets:
            pruned = ~get_mask(target.module)
            assert torch.equal(target.weight.grad[pruned], torch.zeros(int(pruned.sum())))
        optimizer.step()
    for target in targets:
        pruned = ~get_mask(target.module)
        assert int(pruned.sum()) == target.weight.numel() // 2
        assert torch.equal(target.weight[pruned], torch.zeros(int(pruned.sum())))
        assert not torch.signbit(target.weight[pruned]).any()
        assert (target.weight[~pruned] != 0).all()


def test_gradients_are_masked_in_place_through_accumulation_and_set_to_none() -> None:
    model = mlp()
    targets = half_pruned(model)
    weights = [t.weight for t in targets]
    inputs = [torch.randn(4, 8), torch.randn(4, 8)]
    # torch.autograd.grad does not accumulate, so it returns the unmasked gradients to compare with.
    unmasked = [sum(pair) for pair in zip(*(torch.autograd.grad(model(x).square().sum(), weights) for x in inputs))]
    for zero_to_none in (True, False):
        model.zero_grad(set_to_none=zero_to_none)
        for x in inputs:  # gradient accumulation: the second backward adds into the same .grad
            model(x).square().sum().backward()
        for target, expected in zip(targets, unmasked):
            keep = get_mask(target.module)
            assert torch.equal(target.weight.grad, expected * keep)


def test_finalize_leaves_dense_keys_that_load_strict() -> None:
    model = tiny_llama()
    dense_keys = list(model.state_dict())
    update_masks(find_targets(model), {t.name: t.weight.abs() for t in find_targets(model)}, 0.5, pattern="2:4")
    assert list(model.state_dict()) == dense_keys  # masks are non-persistent all along
    finalize(model)
    assert get_masks(model) == {}
    assert not any(hasattr(m, "_lightning_prune_handles") for m in model.modules())
    fresh = tiny_llama()
    fresh.load_state_dict(model.state_dict(), strict=True)
    for target in find_targets(fresh):
        weight = target.weight
        assert (weight == 0).float().mean().item() == 0.5
        assert not torch.signbit(weight[weight == 0]).any()


def test_finalize_turns_negative_zeros_positive() -> None:
    layer = nn.Linear(2, 1, bias=False)
    set_mask(layer, torch.tensor([[True, False]]))
    with torch.no_grad():
        layer.weight[0, 0] = -0.0
    finalize(layer)
    assert not torch.signbit(layer.weight).any()


def test_load_state_dict_re_zeroes_pruned_weights() -> None:
    model = mlp()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    targets = half_pruned(model)
    model.load_state_dict(dense_state)  # a dense checkpoint must not bring pruned weights back
    for target in targets:
        assert torch.equal(target.weight[~get_mask(target.module)], torch.zeros(target.weight.numel() // 2))


def test_get_and_load_masks_round_trip() -> None:
    model = tiny_gpt2()
    targets = find_targets(model)
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.25)
    saved = {name: mask.clone() for name, mask in get_masks(model).items()}
    assert sorted(saved) == sorted(t.name for t in targets)
    other = tiny_gpt2()
    load_masks(other, saved)
    assert all(torch.equal(get_masks(other)[name], saved[name]) for name in saved)
    with pytest.raises(ValueError, match=r"saved mask 'nope.weight' names no module"):
        load_masks(other, {"nope.weight": torch.ones(1, dtype=torch.bool)})


def test_monotone_update_keeps_pruned_weights_pruned() -> None:
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    targets = find_targets(nn.Sequential(layer), ignore_output_head=False)
    update_masks(targets, {"0.weight": torch.tensor([[1.0, 2.0, 3.0, 4.0]])}, 0.25)
    # New scores would rank the pruned entry highest: it stays pruned, the next lowest goes too.
    update_masks(targets, {"0.weight": torch.tensor([[9.0, 2.0, 3.0, 4.0]])}, 0.5)
    assert get_mask(layer).int().tolist() == [[0, 0, 1, 1]]


def test_remove_masks_keeps_weights_and_drops_hooks() -> None:
    model = mlp()
    half_pruned(model)
    before = [p.clone() for p in model.parameters()]
    remove_masks(model)
    assert get_masks(model) == {}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model(torch.randn(2, 8)).sum().backward()
    assert (model[0].weight.grad != 0).float().mean() > 0.5  # gradients no longer masked


def test_re_zeroing_after_the_step_writes_positive_zeros_where_momentum_moves_weights() -> None:
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):  # build up momentum before pruning
        optimizer.zero_grad()
        model(torch.randn(4, 8)).square().sum().backward()
        optimizer.step()
    targets = half_pruned(model)
    optimizer.zero_grad()
    model(torch.randn(4, 8)).square().sum().backward()
    optimizer.step()  # no re-masking hook yet: Adam's momentum moves pruned weights off zero
    moved = torch.cat([t.weight[~get_mask(t.module)] for t in targets])
    assert (moved < 0).any() and (moved > 0).any()
    apply_masks_(model)  # the per-step path
    for target in targets:
        pruned = target.weight[~get_mask(target.module)]
        assert pruned.eq(0).all() and not torch.signbit(pruned).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_re_zeroing_writes_positive_zeros_over_negatives_nan_and_inf_in_every_dtype(dtype: torch.dtype) -> None:
    layer = nn.Linear(4, 2).to(dtype)
    keep = torch.tensor([[True, False, True, False], [False, True, False, True]])
    set_mask(layer, keep)
    kept = layer.weight[keep].clone()
    with torch.no_grad():  # what a diverging optimizer could leave in pruned entries
        layer.weight[~keep] = torch.tensor([-1.5, float("nan"), float("-inf"), -0.0], dtype=dtype)
    apply_masks_(layer)
    pruned = layer.weight[~keep]
    assert pruned.eq(0).all() and not torch.signbit(pruned).any()
    assert torch.equal(layer.weight[keep], kept)  # kept values bit for bit


def test_set_mask_on_a_frozen_weight_masks_its_gradient_once_unfrozen() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    keep = torch.rand(16, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    set_mask(model[0], keep)  # torch refuses gradient hooks on frozen tensors: must not raise
    assert torch.equal(model[0].weight == 0, ~keep)
    model[0].weight.requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    keep_masks_applied(optimizer, model)
    model(torch.randn(4, 8)).square().sum().backward()
    assert model[0].weight.grad[~keep].eq(0).all() and model[0].weight.grad[keep].ne(0).any()


def test_load_state_dict_with_assign_keeps_the_gradient_masking() -> None:
    model = mlp()
    targets = half_pruned(model)
    state = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new Parameter objects replace the hooked ones
    model(torch.randn(4, 8)).square().sum().backward()
    for target in targets:
        pruned = ~get_mask(target.module)
        assert target.weight[pruned].eq(0).all()
        assert target.weight.grad[pruned].eq(0).all() and target.weight.grad[~pruned].ne(0).any()


def _masked_gradients_are_zero(model: nn.Module) -> bool:
    return all(p.grad[~m].eq(0).all() for p, m in ((model.get_parameter(n), m) for n, m in get_masks(model).items()))


def test_deepcopy_gets_its_own_masks_and_hooks_and_leaves_the_original_alone() -> None:
    import copy

    model = mlp()
    half_pruned(model)
    clone = copy.deepcopy(model)
    assert sorted(get_masks(clone)) == sorted(get_masks(model))
    assert all(get_masks(clone)[n] is not get_masks(model)[n] for n in get_masks(model))
    with torch.no_grad():
        for param in clone.parameters():
            param.fill_(1.0)  # pruned slots of the copy now hold 1.0
    optimizer = torch.optim.SGD(clone.parameters(), lr=0.1)
    keep_masks_applied(optimizer, clone)
    clone(torch.randn(4, 8)).square().sum().backward()
    assert _masked_gradients_are_zero(clone)
    optimizer.step()
    for name, mask in get_masks(clone).items():
        assert clone.get_parameter(name)[~mask].eq(0).all()  # the copy's masks act on the copy's weights
    finalize(clone)
    model(torch.randn(4, 8)).square().sum().backward()  # the original keeps its own gradient hooks
    assert get_masks(model) and _masked_gradients_are_zero(model)


def test_pickled_model_keeps_masks_and_reapplies_them_after_loading() -> None:
    import io

    model = mlp()
    half_pruned(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert all(torch.equal(restored.get_buffer(f"{n}_mask"), m) for n, m in get_masks(model).items())
    restored.load_state_dict({k: torch.ones_like(v) for k, v in restored.state_dict().items()})
    for name, mask in get_masks(restored).items():
        assert restored.get_parameter(name)[~mask].eq(0).all()
    restored(torch.randn(4, 8)).square().sum().backward()
    assert _masked_gradients_are_zero(restored)


def test_nan_weights_under_magnitude_selection_name_the_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    targets = find_targets(model, ignore_output_head=False)
    with pytest.raises(ValueError, match=r"the scores of '0.weight' contain NaN \(1 of its 16 weights are NaN\)"):
        update_masks(targets, {t.name: t.weight.detach().abs() for t in targets}, 0.5)


def test_tighten_masks_keeps_the_union_of_pruned_entries_all_or_nothing() -> None:
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -4.0], [5.0, -6.0, 7.0, -8.0]]))
    set_mask(layer, torch.tensor([[True, False, True, True], [True, True, True, False]]))
    tighten_masks(layer, {"weight": torch.tensor([[False, True, True, True], [True, False, True, True]])})
    expected = torch.tensor([[False, False, True, True], [True, False, True, False]])
    assert torch.equal(get_mask(layer), expected)
    assert torch.equal(layer.weight, torch.tensor([[0.0, 0.0, 3.0, -4.0], [5.0, 0.0, 7.0, 0.0]]))
    assert not torch.signbit(layer.weight[~expected]).any()
    with pytest.raises(ValueError, match=r"'weight' of shape \(2, 2\) does not fit its weight \(2, 4\)"):
        tighten_masks(layer, {"weight": torch.zeros(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"'nope\.weight' names no module"):
        tighten_masks(layer, {"nope.weight": torch.zeros(1, dtype=torch.bool)})
    assert torch.equal(get_mask(layer), expected)  # refused calls changed nothing


def test_a_masked_model_is_freed_when_dropped() -> None:
    # The gradient hook sits in the weight's C++ side, out of the garbage collector's sight: a hook holding
    # its module strongly (weight -> hook -> module -> weight) kept every masked model alive for good.
    import gc
    import weakref

    model = tiny_llama()
    set_mask(model.model.layers[0].mlp.down_proj, torch.rand(32, 64) > 0.5)
    gone = weakref.ref(model.model.layers[0].mlp.down_proj)
    del model
    gc.collect()
    assert gone() is None
