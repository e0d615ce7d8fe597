"""benchmarks/gpu.py: skips cleanly without CUDA, its baselines compute what ours computes, and
`--cpu-smoke` runs every section end to end on the CPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_prune.oneshot.wanda import wanda_mask

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu() -> ModuleType:
    """benchmarks/gpu.py imported as `gpu`, the name its sibling gpu_model.py imports it by."""
    spec = importlib.util.spec_from_file_location("gpu", BENCHMARKS / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_why_and_exits_0(
    gpu: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 0
    assert "no CUDA device, nothing measured" in capsys.readouterr().out


def test_unknown_sections_are_refused(gpu: ModuleType) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu.parse_args(["--sections", "layers,speed"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_reference_wanda_baseline_prunes_what_ours_prunes(gpu: ModuleType, pattern: str | None) -> None:
    # Continuous random scores (no ties): the reference's sort/topk and our k-th value agree exactly.
    generator = torch.Generator().manual_seed(0)
    weight, norms = torch.randn(12, 16, generator=generator), torch.rand(16, generator=generator) + 0.1
    reference = gpu.reference_wanda(weight.clone(), norms, 0.5, pattern)
    ours = gpu.ours_wanda(weight.clone(), norms, 0.5, pattern)
    assert torch.equal(ours, reference)
    assert torch.equal(ours != 0, wanda_mask(weight, norms, 0.5, pattern))
    assert int((ours == 0).sum()) == 12 * 8


def test_the_reference_sparsegpt_is_found(gpu: ModuleType) -> None:
    reference = gpu.sibling(("reference_sparsegpt", "oneshot"), "reference_sparsegpt")
    assert callable(reference) and reference.__name__ == "reference_sparsegpt"
    with pytest.raises(ImportError, match="defines 'nothing'"):
        gpu.sibling(("oneshot",), "nothing")


def test_measure_reports_median_times_per_case(gpu: ModuleType) -> None:
    calls: list[str] = []
    result = gpu.measure(
        {"a": (lambda: 1, lambda s: calls.append(f"a{s}")), "b": (lambda: 2, lambda s: calls.append(f"b{s}"))},
        2,
        torch.device("cpu"),
    )
    assert calls == ["a1", "b2", "a1", "b2", "a1", "b2"]  # warm-up, then interleaved rounds
    assert set(result) == {"a", "b"} and all(seconds >= 0 and peak is None for seconds, peak in result.values())


@pytest.mark.slow
def test_cpu_smoke_runs_every_section(gpu: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    for title in (
        "Layers: ours vs the reference",
        "Selection alone",
        "One-shot, 50%",
        "GradualPruning step vs dense",
        "LoRA r=16",
    ):
        assert title in out
    assert "semi: skipped, torch.sparse.to_sparse_semi_structured runs only on CUDA" in out
    assert out.count("| 64×32 | 50% |") == 2 and out.count("| 48×96 | 2:4 |") == 2  # sparsegpt and wanda rows
    assert "| sparsegpt offload, 1 blocks |" in out and "| masked-delta LoRA step |" in out
