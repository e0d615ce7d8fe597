"""benchmarks/llm.py on a tiny Llama: its tables run end to end, and its plain block-by-block
reference loop prunes what `prune_oneshot` prunes (so the time table compares like with like)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from lightning_prune import prune_oneshot
from tests.conftest import tiny_llama

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def llm() -> ModuleType:
    """benchmarks/llm.py, with benchmarks/ on the path for its sibling reference_sparsegpt."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("llm_benchmark", BENCHMARKS / "llm.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def data(llm: ModuleType) -> tuple[nn.Module, list, list]:
    model = tiny_llama(num_hidden_layers=2).eval()
    generator = torch.Generator().manual_seed(0)
    calibration = llm.calibration_batches(torch.randint(0, 48, (8, 16), generator=generator), 4)
    evaluation = llm.eval_batches(torch.randint(0, 48, (100,), generator=generator).tolist(), 16, 4, 5)
    return model, calibration, evaluation


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_reference_loop_prunes_what_ours_prunes(llm: ModuleType, data: tuple, method: str) -> None:
    model, calibration, _ = data
    ours, reference = copy.deepcopy(model), copy.deepcopy(model)
    prune_oneshot(ours, calibration, method, 0.5, "2:4", progress=False)
    llm.reference_prune(reference, calibration, method)
    ours_w, reference_w = weights(ours), weights(reference)
    assert len(ours_w) == 14  # 2 blocks × 7 Linears, all pruned by both
    for name, weight in ours_w.items():
        assert torch.equal(weight != 0, reference_w[name] != 0), name
        assert torch.allclose(weight, reference_w[name], atol=1e-4), name
        assert int((weight == 0).sum()) == weight.numel() // 2


@pytest.mark.slow
def test_oneshot_table_scores_every_cell_on_the_same_windows(llm: ModuleType, data: tuple) -> None:
    model, calibration, evaluation = data
    lines: list[str] = []
    variants = [v for v in llm.VARIANTS if v[0] in ("magnitude", "wanda+dsnot", "sparsegpt+reconstruct")]
    text = llm.oneshot_table(model, calibration, evaluation, variants, llm.COLUMNS, 2, 1, lines.append)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0][2:] for row in rows] == ["dense", "magnitude", "wanda+dsnot", "sparsegpt+reconstruct"]
    dense = float(rows[0].split(" | ")[1])
    cells = [float(cell) for row in rows[1:] for cell in row.strip("| ").split(" | ")[1::2]]
    assert len(cells) == 9 and all(c > 0 and c == c for c in cells)
    assert any(c != dense for c in cells)
    assert lines[-1] == rows[-1]  # rows are emitted as they finish
    assert (
        all(p.requires_grad for p in model.parameters())
        and float(next(iter(weights(model).values())).ne(0).float().mean()) == 1.0
    )


@pytest.mark.slow
def test_time_table_alternates_and_gives_ratios(llm: ModuleType, data: tuple) -> None:
    model, calibration, _ = data
    lines: list[str] = []
    text = llm.time_table(model, calibration, 2, lines.append)
    assert len(lines) == 2 and lines[0].startswith("  round 1: ours wanda 2:4")
    assert text.count("×") == 2 and "| wanda 2:4 |" in text and "| sparsegpt 2:4 |" in text


def test_unknown_sections_and_rows_are_refused(llm: ModuleType) -> None:
    with pytest.raises(SystemExit):
        llm.parse_args(["--sections", "oneshot,speed"])
    with pytest.raises(SystemExit, match="wandaa"):
        llm.chosen(llm.VARIANTS, "wanda,wandaa", "rows")


@pytest.fixture(scope="module")
def llm_recovery(llm: ModuleType) -> ModuleType:
    """benchmarks/llm_recovery.py, which imports its sibling llm.py as `llm`."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("llm_recovery_benchmark", BENCHMARKS / "llm_recovery.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.mark.slow
def test_recovery_table_trains_each_recovery_and_keeps_two_of_four(llm_recovery: ModuleType, data: tuple) -> None:
    model, calibration, evaluation = data
    lines: list[str] = []
    text = llm_recovery.recovery_table(
        model, calibration, calibration, evaluation, 2, 1e-2, 5e-2, 4, ("wanda",), lines.append
    )
    steps = [line.split(" | ")[1] for line in text.splitlines() if line.startswith("| wanda 2:4")]
    assert steps == ["one-shot", "+ kd", "+ lora", "+ kd+lora"]
    assert "2 steps × 64 tokens = 128 training tokens" in text
    ppls = [float(line.split(" | ")[2]) for line in lines]
    assert len(set(ppls)) == 4  # each recovery changed the one-shot model, each differently
    assert all(p.ne(0).all() for n, p in model.named_parameters() if n.endswith("proj.weight"))  # dense untouched


@pytest.mark.slow
def test_structured_table_compacts_times_and_distills(llm_recovery: ModuleType, llm: ModuleType) -> None:
    model = tiny_llama(num_hidden_layers=3).eval()
    generator = torch.Generator().manual_seed(1)
    calibration = llm.calibration_batches(torch.randint(0, 48, (8, 16), generator=generator), 4)
    evaluation = llm.eval_batches(torch.randint(0, 48, (80,), generator=generator).tolist(), 16, 4, None)
    variants = {"flap 25%": dict(mlp_sparsity=0.25, method="flap"), "1 dropped": dict(drop_layers=1)}
    text = llm_recovery.structured_table(model, calibration, calibration, evaluation, 2, 1e-3, 2, variants, print)
    cells = [line.strip("| ").split(" | ") for line in text.splitlines()[4:]]
    rows = {row[0]: row[1:] for row in cells}
    assert list(rows) == ["dense", "flap 25%", "1 dropped"]
    params = {name: int(row[0].replace(",", "")) for name, row in rows.items()}
    assert params["flap 25%"] < params["dense"] and params["1 dropped"] < params["dense"]
    assert rows["dense"][3] == "—" and all(float(rows[n][3]) > 0 for n in ("flap 25%", "1 dropped"))
    assert all(row[1].endswith("×") for row in rows.values())
