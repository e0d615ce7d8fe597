"""report.py: exact per-layer and global numbers, the pattern column (enforced, fitted, dense), Markdown and CSV."""

import pytest
import torch
from torch import nn

from lightning_prune.masking import set_mask
from lightning_prune.report import max_nonzeros_per_group, sparsity_report
from lightning_prune.targets import PruneTarget


def two_layer_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(8, 2, bias=False), nn.Linear(2, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2, 0, 0, 3, 0, 4, 0], [0, 5, 6, 0, 7, 8, 0, 0]]))  # 2:4, 8 zeros
        model[1].weight.copy_(torch.tensor([[1.0, 0], [2, 3], [4, 5], [6, 7]]))  # 1 zero
    return model


def test_unmasked_model_reports_every_prunable_layer() -> None:
    report = sparsity_report(two_layer_model())  # not told what was enforced: what the zeros fit
    assert [(layer.name, layer.shape, layer.numel, layer.zeros, layer.pattern) for layer in report.layers] == [
        ("0.weight", (2, 8), 16, 8, "fits 2:4"),
        ("1.weight", (4, 2), 8, 1, "unstructured"),
    ]
    assert report.numel == 24
    assert report.global_sparsity == 9 / 24
    assert report.as_dict() == {"0.weight": 0.5, "1.weight": 0.125, "global": 0.375}


def test_masked_layers_only_when_masks_exist() -> None:
    model = two_layer_model()
    set_mask(model[1], torch.tensor([[1, 0], [0, 1], [1, 1], [1, 1]], dtype=torch.bool))
    report = sparsity_report(model)
    assert [(layer.name, layer.zeros) for layer in report.layers] == [("1.weight", 2)]
    assert report.global_sparsity == 0.25


def test_markdown_and_csv() -> None:
    report = sparsity_report(two_layer_model(), patterns={"0.weight": "2:4", "1.weight": None})
    assert report.to_markdown().splitlines() == [
        "| layer | shape | params | zeros | sparsity | pattern |",
        "|---|---|---|---|---|---|",
        "| 0.weight | 2×8 | 16 | 8 | 0.5000 | 2:4 |",
        "| 1.weight | 4×2 | 8 | 1 | 0.1250 | unstructured |",
        "| global |  | 24 | 9 | 0.3750 |  |",
    ]
    assert report.to_csv().splitlines() == [
        "layer,shape,params,zeros,sparsity,pattern",
        "0.weight,2×8,16,8,0.5000,2:4",
        "1.weight,4×2,8,1,0.1250,unstructured",
        "global,,24,9,0.3750,",
    ]


def test_str_is_the_rich_table() -> None:
    text = str(sparsity_report(two_layer_model()))
    lines = text.splitlines()
    assert "Sparsity report (global 37.50%)" in lines[0]
    assert lines[1].startswith("┏") and lines[-1].startswith("└")
    assert [cell.strip() for cell in lines[2].strip("┃").split("┃")] == [
        "layer",
        "shape",
        "params",
        "zeros",
        "sparsity",
        "pattern",
    ]
    assert [cell.strip() for cell in lines[-2].strip("│").split("│")] == ["global", "", "24", "9", "0.3750", ""]
    assert "\x1b[" not in text  # plain text, no terminal colour codes


def test_rich_renders_a_table() -> None:
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(sparsity_report(two_layer_model()))
    assert "global 37.50%" in console.export_text()


def test_max_nonzeros_per_group() -> None:
    matrix = torch.tensor([[1.0, 2, 0, 0, 3, 4, 5, 0]])
    assert max_nonzeros_per_group(matrix, 4) == 3
    assert max_nonzeros_per_group(matrix, 8) == 5
    assert max_nonzeros_per_group(torch.ones(1, 6), 4) == 4  # 4 does not divide 6: no valid groups


def test_the_report_is_the_same_with_masks_after_finalize_and_after_loading() -> None:
    import copy

    import lightning_prune as lp
    from tests.conftest import TinyRegressor, make_trainer

    module = TinyRegressor()
    make_trainer(max_steps=4, callbacks=[lp.GradualPruning(0.8, end_step=2, frequency=1)]).fit(module)
    with torch.no_grad():
        module.net[4].weight[0, 0] = 0.0  # one exact zero in the dense head must not pull it in
    masked = sparsity_report(module)
    assert [layer.name for layer in masked.layers] == ["net.0.weight", "net.2.weight"]
    finalized = copy.deepcopy(module)
    lp.finalize(finalized)
    assert sparsity_report(finalized).as_dict() == masked.as_dict()
    fresh = TinyRegressor(seed=1)  # what load_from_checkpoint builds: no masks, no record
    fresh.load_state_dict(module.state_dict())
    with torch.no_grad():
        fresh.net[4].weight[0, 0] = 0.5
    assert sparsity_report(fresh).as_dict() == masked.as_dict()
    assert masked.global_sparsity == pytest.approx(0.8, abs=1e-3)


def test_rows_equal_counting_each_matrix_on_its_own() -> None:
    # The report measures all experts of a weight at once; the definition is per (out, in) matrix:
    # its exact zeros (-0.0 included, NaN not) and the first of 2:4, 4:8 it holds.
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(3, 8, 16, generator=generator)
    dense[0].view(-1, 4)[:, :2] = 0.0  # expert 0: 2:4
    dense[1].view(-1, 8)[:, :4] = -0.0  # expert 1: 4:8, not 2:4
    dense[2][dense[2] > 0.3] = 0.0  # expert 2: unstructured
    dense[2, 0, 0] = float("nan")
    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(dense.clone())
    experts.down_proj = nn.Parameter(dense.transpose(1, 2).clone())
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight.copy_(dense[1])
    targets = [
        PruneTarget("experts", experts, "gate_up_proj", experts=3),
        PruneTarget("experts", experts, "down_proj", experts=3, expert_transposed=True),
        PruneTarget("linear", linear),
    ]
    expected = []
    for target in targets:
        for name, matrix in zip(target.matrix_names(), target.matrices(target.weight.detach())):
            pattern = next(
                (f"fits {n}:{m}" for n, m in ((2, 4), (4, 8)) if max_nonzeros_per_group(matrix, m) <= n),
                "unstructured",
            )
            expected.append((name, tuple(matrix.shape), matrix.numel(), int((matrix == 0).sum()), pattern))
    got = [(r.name, r.shape, r.numel, r.zeros, r.pattern) for r in sparsity_report(nn.Module(), targets).layers]
    assert got == expected
    assert [r[4] for r in got] == ["fits 2:4", "fits 4:8", "unstructured"] * 2 + ["fits 4:8"]


def ninety_percent_unstructured_fitting_4_of_8() -> nn.Linear:
    """A 64×64 layer at exactly 90% zeros, chosen at random (unstructured), whose zeros also fit 4:8."""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 64, generator=generator).abs() + 0.1)
        keep = torch.zeros(64 * 64, dtype=torch.bool)
        keep[torch.randperm(64 * 64, generator=generator)[:410]] = True
        linear.weight.mul_(keep.view(64, 64))
    return linear


def test_an_unstructured_layer_whose_zeros_fit_4_of_8_is_unstructured_not_4_of_8() -> None:
    linear = ninety_percent_unstructured_fitting_4_of_8()
    assert max_nonzeros_per_group(linear.weight, 8) <= 4 and max_nonzeros_per_group(linear.weight, 4) > 2
    targets = [PruneTarget("", linear)]
    (row,) = sparsity_report(linear, targets, patterns={"weight": None}).layers
    assert (row.zeros, row.pattern) == (64 * 64 - 410, "unstructured (fits 4:8)")
    (unsaid,) = sparsity_report(linear, targets).layers  # not told: what it fits, never as if enforced
    assert unsaid.pattern == "fits 4:8"


def test_enforced_pattern_dense_layer_and_a_broken_pattern() -> None:
    model = two_layer_model()
    targets = [PruneTarget("0", model[0]), PruneTarget("1", model[1])]
    patterns = {"0.weight": "2:4", "1.weight": None}
    with torch.no_grad():
        model[1].weight.fill_(1.0)  # no zeros: dense, whatever was asked
    assert [r.pattern for r in sparsity_report(model, targets, patterns=patterns).layers] == ["2:4", "dense"]
    assert [r.pattern for r in sparsity_report(model, targets, patterns={"0.weight": "1:4"}).layers] == [
        "unstructured (1:4 not held)",
        "dense",
    ]
    with torch.no_grad():
        model[0].weight[0, 2:5] = torch.tensor([9.0, 0, 0])  # 1 2 9 0 | 0 0 4 0: 2:4 broken, 4:8 kept
    assert sparsity_report(model, targets, patterns=patterns).layers[0].pattern == "unstructured (2:4 not held)"
    assert sparsity_report(model, targets, patterns={"0.weight": "4:8"}).layers[0].pattern == "4:8"


def test_a_pattern_that_is_not_n_of_m_names_the_weight() -> None:
    with pytest.raises(ValueError, match=r"`patterns`\['0.weight'\] must be an N:M pattern .* got '2-4'"):
        sparsity_report(two_layer_model(), patterns={"0.weight": "2-4"})


def test_prune_oneshot_labels_what_it_enforced() -> None:
    import lightning_prune as lp
    from tests.conftest import tiny_llama

    torch.manual_seed(0)
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(2)]
    two_four = lp.prune_oneshot(tiny_llama(), batches, method="magnitude", pattern="2:4", progress=False)
    assert {r.pattern for r in two_four.layers} == {"2:4"}
    ninety = lp.prune_oneshot(tiny_llama(), batches, method="magnitude", sparsity=0.9, progress=False)
    assert {r.pattern for r in ninety.layers} <= {"unstructured", "unstructured (fits 4:8)", "unstructured (fits 2:4)"}
