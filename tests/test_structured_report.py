"""lightning_prune.structured.report: units removed per kind and group set, parameters per layer, counted by hand."""

from __future__ import annotations

from lightning_prune.structured import prune_structured
from lightning_prune.structured.report import StructuredReport
from tests.conftest import tiny_llama


def test_neurons_and_heads_report_units_and_the_parameters_of_each_changed_layer() -> None:
    model = tiny_llama(num_attention_heads=4, num_key_value_heads=4)  # hidden 32: 4 heads of 8, MLP 64
    report = prune_structured(model, None, mlp_sparsity=0.25, head_sparsity=0.5, method="magnitude")
    attention, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    assert report.kept == {mlp: (48, 64), attention: (2, 4)}
    assert report.removed() == {mlp: 16, attention: 2}
    assert report.units() == {"neurons": {"removed": 16, "total": 64}, "heads": {"removed": 2, "total": 4}}
    # q, k, v lose 2 heads × 8 rows of 32 inputs, o_proj 16 of its 32 input columns; gate/up 16 rows, down 16 columns.
    assert report.layer_parameters == {
        **{f"{attention}.{p}": (32 * 32, 16 * 32) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
        **{f"{mlp}.{p}": (64 * 32, 48 * 32) for p in ("gate_proj", "up_proj", "down_proj")},
    }
    removed = 4 * 16 * 32 + 3 * 16 * 32
    assert report.parameters_before - report.parameters_after == removed
    recorded = report.as_dict()
    assert recorded["units"] == report.units() and recorded["removed"] == {mlp: 16, attention: 2}
    assert recorded["kinds"] == {mlp: "neuron", attention: "head"}
    assert recorded["layer_parameters"][f"{mlp}.down_proj"] == [2048, 1536]
    assert "neurons removed: 16/64" in str(report) and f"{mlp}: 16 of 64 neurons removed, 48 kept" in str(report)


def test_dropped_blocks_count_as_layers_removed() -> None:
    report = StructuredReport(
        "magnitude", 100, 60, kept={"a": (3, 4)}, kinds={"a": "filter"}, dropped_blocks=[1, 3], blocks=4
    )
    assert report.units() == {"filters": {"removed": 1, "total": 4}, "layers": {"removed": 2, "total": 4}}
    assert "dropped blocks: [1, 3] of 4" in str(report)
