"""lightning_prune.lora.conv: LoRA on pruned convolutions keeps every zero; grouped convolutions are refused."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from peft.tuners.lora import Conv2d as LoraConv2d
from torch import nn

from lightning_prune.callbacks.lora import LoRARecovery
from lightning_prune.data import DigitsDataModule
from lightning_prune.lora import adapter_parameters, attach_lora, lora_layers, merge_lora
from lightning_prune.mask_updates import update_masks
from lightning_prune.masking import get_masks
from lightning_prune.models import ClassifierModule
from lightning_prune.run import run
from lightning_prune.targets import find_targets
from tests.conftest import compose_config

QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "accelerator": "cpu",
}


def prune_half(model: nn.Module) -> dict[str, torch.Tensor]:
    """Magnitude masks at 50% on every prunable layer but the head; returns each layer's zero set."""
    targets = find_targets(model)
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.5)
    return {t.name: (t.weight == 0).clone() for t in targets}


def assert_zeros_kept(model: nn.Module, zeros: dict[str, torch.Tensor]) -> None:
    for name, zero in zeros.items():
        weight = model.get_parameter(name).detach()
        assert torch.equal(weight == 0, zero), name
        assert not torch.signbit(weight[zero]).any(), name


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64)


def test_lora_recovery_on_a_pruned_digits_cnn_trains_and_merges_every_zero(digits):
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(arch="cnn", hidden=32, lr=1e-2)
    zeros = prune_half(module)
    assert {"model.conv1.weight", "model.conv2.weight"} <= zeros.keys()
    recovery = LoRARecovery(r=4, lr=1e-2, merge=False)
    pl.Trainer(max_steps=5, limit_val_batches=0, callbacks=[recovery], **QUIET).fit(module, datamodule=digits)
    adapted = dict(lora_layers(module))
    assert isinstance(adapted["model.conv1"], LoraConv2d) and isinstance(adapted["model.conv2"], LoraConv2d)
    assert all(p.abs().sum() > 0 for n, p in module.named_parameters() if "lora_B" in n)  # they trained
    assert_zeros_kept(module, {name.replace(".weight", ".base_layer.weight"): zero for name, zero in zeros.items()})
    inputs = next(iter(digits.val_dataloader()))[0]
    module.eval()
    with torch.no_grad():
        before = module.model.conv2.base_layer.weight.clone()
        unmerged = module(inputs)
        recovery.merge_adapters(module)
        merged = module(inputs)
    assert not lora_layers(module)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.equal(module.model.conv2.weight, before)  # the delta reached the kept weights
    assert_zeros_kept(module, zeros)
    assert get_masks(module).keys() == zeros.keys()  # the masks set before LoRA stay attached


def conv_net(**conv2: object) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv1d(4, 8, 3, padding=1),
            unsqueeze=nn.Unflatten(1, (8, 1)),
            conv2=nn.Conv2d(8, 8, 3, **conv2),  # type: ignore[arg-type]
            pool=nn.AdaptiveAvgPool2d((1, 2)),
            flatten=nn.Flatten(),
            head=nn.Linear(16, 3),  # the output head stays dense: both convolutions are pruned
        )
    )


@pytest.mark.parametrize(
    "conv2",
    [{"padding": 1}, {"padding": 2, "dilation": 2, "stride": 2}, {"padding": 1, "padding_mode": "circular"}],
)
def test_masked_delta_on_conv1d_and_conv2d_merges_to_the_trained_forward(conv2):
    torch.manual_seed(0)
    model = conv_net(**conv2).eval()
    zeros = prune_half(model)
    assert zeros.keys() == {"conv1.weight", "conv2.weight"}
    peft_model = attach_lora(model, r=2)
    with torch.no_grad():
        for parameter in adapter_parameters(model):
            parameter.normal_(0.0, 0.3)
        inputs = torch.randn(2, 4, 6)
        unmerged = peft_model(inputs)
        merged = merge_lora(peft_model)(inputs)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert_zeros_kept(model, zeros)


def test_unmasked_delta_merge_keeps_the_zeros_of_a_conv():
    torch.manual_seed(0)
    model = conv_net(padding=1)
    zeros = prune_half(model)
    peft_model = attach_lora(model, r=2, masked_delta=False)
    with torch.no_grad():
        for parameter in adapter_parameters(model):
            parameter.normal_(0.0, 0.3)
    assert_zeros_kept(merge_lora(peft_model), zeros)


def grouped_cnn() -> ClassifierModule:
    network = nn.Sequential(
        OrderedDict(
            unflatten=nn.Unflatten(1, (1, 8, 8)),
            conv1=nn.Conv2d(1, 8, 3, padding=1),
            depthwise=nn.Conv2d(8, 8, 3, padding=1, groups=8),
            flatten=nn.Flatten(),
            classifier=nn.Linear(512, 10),
        )
    )
    return ClassifierModule(model=network)


def test_grouped_convolution_is_refused_at_preflight_naming_it_and_target_modules():
    torch.manual_seed(0)
    module = grouped_cnn()
    prune_half(module)
    with pytest.raises(ValueError, match=r"depthwise \(groups=8\).*`target_modules`.*\[.conv1.\]"):
        LoRARecovery().preflight(module)  # target_modules=None: the pruned layers
    with pytest.raises(ValueError, match=r"depthwise \(groups=8\)"):
        LoRARecovery(target_modules="depthwise").preflight(module)
    LoRARecovery(target_modules="conv1").preflight(module)  # what the message suggests passes
    untouched = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=r"depthwise \(groups=8\)"):
        attach_lora(module.model)
    assert not lora_layers(module)
    assert all(torch.equal(value, untouched[key]) for key, value in module.state_dict().items())


def test_dilated_convolution_without_masked_delta_is_refused():
    model = conv_net(padding=2, dilation=2)
    prune_half(model)
    with pytest.raises(ValueError, match=r"conv2 \(dilation=\(2, 2\) with masked_delta=False\)"):
        LoRARecovery(masked_delta=False).preflight(model)
    LoRARecovery(masked_delta=True).preflight(model)


def test_lora_in_the_stage_of_a_pruning_during_training_is_refused_before_the_dense_stage(tmp_path: Path) -> None:
    # filters_cnn prunes at epoch ends; its LoRA would attach at fit start, to nothing pruned yet.
    cfg = compose_config("filters_cnn", tmp_path, "lora=lora", "dense_epochs=1", "trainer.limit_train_batches=2")
    with pytest.raises(ValueError, match=r"none will be: the model holds no pruned weight and IterativePruning prunes"):
        run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["failed_phase"] == "preflight" and results["stages"] == []


@pytest.mark.slow
def test_lora_stage_after_gmp_on_the_digits_cnn_keeps_the_zeros(tmp_path: Path) -> None:
    stages = "[{name: gmp, use: [pruning]}, {name: recover, use: [lora], trainer: {max_epochs: 1}}]"
    tiny = ["trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "plots=false", "pruning.frequency=1"]
    cfg = compose_config(
        "quickstart",
        tmp_path,
        "model=digits_cnn",
        "lora=lora",
        "pruning.sparsity=0.5",
        "dense_epochs=0",
        "trainer.max_epochs=1",
        f"stages={stages}",
        *tiny,
    )
    results = run(cfg)
    assert [(e["name"], e["callbacks"]) for e in results["stages"]] == [
        ("gmp", ["GradualPruning"]),
        ("recover", ["LoRARecovery"]),
    ]
    assert results["layer_sparsity"]["model.conv1.weight"] == results["layer_sparsity"]["model.conv2.weight"] == 0.5
    assert results["global_sparsity"] == pytest.approx(0.5)
