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
