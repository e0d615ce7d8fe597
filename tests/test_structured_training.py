"""Training-time structured pruning: GradualPruning / IterativePruning with `structure`, compacted at fit end."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_prune import GradualPruning, IterativePruning
from lightning_prune.data import DigitsDataModule
from lightning_prune.masking import get_masks
from lightning_prune.models import ClassifierModule
from lightning_prune.structured import timing
from lightning_prune.structured.find import find_groups
from lightning_prune.structured.scores import GroupMagnitude
from lightning_prune.structured.select import prune_group
from tests.conftest import TinyCausalLM, TinyRegressor, make_trainer, tiny_llama


def test_gradual_neurons_compacted_at_fit_end() -> None:
    module = TinyRegressor()
    pruning = GradualPruning(0.5, start_step=0, end_step=6, frequency=2, structure="neuron", compact_on_end=True)
    make_trainer(max_epochs=2, callbacks=[pruning]).fit(module)
    linears = [m for m in module.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 2)]
    assert pruning.current_sparsity == 0.5
    assert pruning.compaction["parameters_after"] == 8 * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2
    assert pruning.compaction["forward_seconds_after"] > 0 and pruning.compaction["timing_rounds"] == 7
    assert not get_masks(module)
    structured = pruning.results()["structured"]  # what the run writes into results.json
    assert structured["units"] == {"neurons": {"removed": 32, "total": 64}}
    assert structured["removed"] == {"net.0": 16, "net.2": 16}
    assert structured["layer_parameters"] == {
        "net.0": [8 * 32 + 32, 8 * 16 + 16],
        "net.2": [32 * 32 + 32, 16 * 16 + 16],
        "net.4": [32 * 2 + 2, 16 * 2 + 2],
    }
    assert structured["parameters_before"] == 1410 and structured["parameters_after"] == 450
    assert structured["parameter_ratio"] == 450 / 1410


def test_unstructured_pruning_records_no_structured_results() -> None:
    pruning = GradualPruning(0.5, start_step=0, end_step=2, frequency=1)
    make_trainer(max_epochs=1, callbacks=[pruning]).fit(TinyRegressor())
    assert pruning.results() == {} and pruning.report is None


class Clock:
    """A fake `time.perf_counter` that each timed call advances by its next cost."""

    def __init__(self) -> None:
        self.now, self.calls = 0.0, []

    def __call__(self) -> float:
        return self.now

    def call(self, name: str, costs: list[float]) -> None:
        self.calls.append(name)
        self.now += costs.pop(0)


def test_timings_are_medians_of_interleaved_rounds(monkeypatch) -> None:
    clock = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    dense, small = [100.0, 5.0, 9.0, 4.0], [100.0, 1.0, 3.0, 2.0]  # warm-up, then rounds 1-3
    installed = []
    variants = [
        (lambda: installed.append("dense"), lambda: clock.call("dense", dense)),
        (lambda: installed.append("small"), lambda: clock.call("small", small)),
    ]
    assert timing.interleaved_seconds(variants, rounds=3) == [5.0, 2.0]
    assert clock.calls == installed == ["dense", "small", "dense", "small", "small", "dense", "dense", "small"]


def test_compaction_times_the_parts_before_and_after_in_place_and_keeps_training_flags() -> None:
    module = ClassifierModule(arch="cnn", hidden=16)
    for group in find_groups(module, "filter"):
        prune_group(group, GroupMagnitude(), 0.5)
    module.train()
    module.model.conv1.eval()  # e.g. a frozen part: its flag comes back as it was
    shapes = []
    small, record = timing.compact_and_measure(module, lambda m: shapes.append(tuple(m.model.conv2.weight.shape)), 3)
    assert small is module and module.model.conv2.weight.shape == (32, 16, 3, 3)
    assert set(shapes) == {(64, 32, 3, 3), (32, 16, 3, 3)} and len(shapes) == 2 * (1 + 3)
    assert record["timing_rounds"] == 3 and record["speedup"] > 0
    assert module.training and not module.model.conv1.training and module.model.conv2.training


def test_gradual_heads_with_taylor_keep_the_model_running() -> None:
    module = TinyCausalLM(tiny_llama())
    pruning = GradualPruning(
        0.5, start_step=1, end_step=3, frequency=1, criterion="taylor", structure="head", compact_on_end=True
    )
    make_trainer(max_epochs=1, callbacks=[pruning]).fit(module)
    config = module.model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (1, 1)
    assert module.model.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    assert torch.isfinite(module.model(input_ids=module.tokens[:2]).logits).all()


def test_structured_masks_survive_a_checkpoint_round_trip() -> None:
    module = TinyRegressor()
    pruning = IterativePruning(0.5, cycles=1, epochs_per_cycle=1, structure="neuron")
    make_trainer(max_epochs=1, callbacks=[pruning]).fit(module)
    state = pruning.state_dict()
    assert "net.0.bias" in state["masks"]  # a neuron's bias goes with it
    fresh = IterativePruning(0.5, cycles=1, epochs_per_cycle=1, structure="neuron")
    fresh.load_state_dict(state)
    restored = TinyRegressor()
    make_trainer(max_epochs=1, callbacks=[fresh]).fit(restored)
    assert all(torch.equal(get_masks(restored)[k], v) for k, v in state["masks"].items())


def test_structure_argument_errors() -> None:
    with pytest.raises(ValueError, match="`structure` must be"):
        GradualPruning(0.5, structure="row")
    with pytest.raises(ValueError, match="`pattern`"):
        GradualPruning(0.5, structure="neuron", pattern="2:4")
    with pytest.raises(ValueError, match="`compact_on_end`"):
        GradualPruning(0.5, compact_on_end=True)
    with pytest.raises(ValueError, match="criterion"):
        GradualPruning(0.5, structure="neuron", criterion="fisher")


@pytest.mark.slow
def test_digits_cnn_keeps_accuracy_at_half_the_filters() -> None:
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    module = ClassifierModule(arch="cnn", hidden=64, lr=3e-3)
    make_trainer(max_epochs=6).fit(module, datamodule=data)
    dense = float(make_trainer().validate(module, datamodule=data, verbose=False)[0]["val/acc"])
    pruning = IterativePruning(0.5, cycles=2, epochs_per_cycle=2, structure="filter", compact_on_end=True)
    make_trainer(max_epochs=6, callbacks=[pruning]).fit(module, datamodule=data)
    pruned = float(make_trainer().validate(module, datamodule=data, verbose=False)[0]["val/acc"])
    assert [module.model.conv1.out_channels, module.model.conv2.out_channels] == [16, 32]
    assert module.model.fc1.in_features == 32 * 16
    assert pruned >= dense - 0.02, (pruned, dense)
