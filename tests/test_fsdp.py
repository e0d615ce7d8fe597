"""Pruning under FSDP2 (Lightning's ModelParallelStrategy): two gloo CPU processes against one.

Both launches run every phase of tests/fsdp_job.py; the one-process run also resumes from the
two-process run's distributed checkpoint (a different number of ranks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import joined_ranks, load_rank, run_job

from lightning_prune.selection import lowest_k

pytestmark = pytest.mark.slow  # two process launches, ~1 min each on 2 shared cores

JOB = Path(__file__).with_name("fsdp_job.py")
PHASES = [
    "layer",
    "row",
    "global",
    "nm",
    "iterative",
]  # "row" distills from the dense model too; "iterative" rewinds, channel scope


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One FSDP2 run on 2 ranks and one on 1 rank with the same global batch."""
    two, one = tmp_path_factory.mktemp("fsdp2"), tmp_path_factory.mktemp("fsdp1")
    run_job(JOB, two, 2)
    run_job(JOB, one, 1, "--resume-from", str(two / "half-2"), "--resume-iterative", str(two / "cycle1-2"))
    return {"two": two, "one": one}


@pytest.mark.parametrize("phase", PHASES)
def test_two_sharded_ranks_select_the_masks_of_one_process(runs: dict[str, Path], phase: str) -> None:
    rank0, single = load_rank(runs["two"], phase), load_rank(runs["one"], phase)
    assert sorted(single["masks"]) == ["net.0.weight", "net.2.weight"]  # the head stays dense
    assert [tuple(m.shape) for m in rank0["masks"].values()] == [(24, 64), (24, 48)]  # each rank: its half of the rows
    masks = joined_ranks(runs["two"], phase, "masks")
    for name, mask in single["masks"].items():
        assert torch.equal(masks[name], mask), name
    weights = joined_ranks(runs["two"], phase, "weights")
    for name, value in single["weights"].items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("phase", ["layer", "row", "nm"])
def test_exact_sparsity_per_layer(runs: dict[str, Path], phase: str) -> None:
    masks = joined_ranks(runs["two"], phase, "masks")
    kept = [int(m.sum()) for m in masks.values()]
    assert kept == ([1536, 1152] if phase == "nm" else [768, 576])  # round(s·n) pruned of 48·64 and 48·48
    if phase == "nm":
        assert all(bool((m.reshape(48, -1, 4).sum(-1) == 2).all()) for m in masks.values())
    if phase == "row":
        assert all(bool((m.sum(1) == m.shape[1] // 4).all()) for m in masks.values())


def test_global_scope_reaches_its_total_and_reports_it(runs: dict[str, Path]) -> None:
    masks = joined_ranks(runs["two"], "global", "masks")
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.75 * (48 * 64 + 48 * 48))
    assert load_rank(runs["two"], "global", 0)["sparsity"] == load_rank(runs["two"], "global", 1)["sparsity"] == 0.75


@pytest.mark.parametrize("phase", PHASES)
def test_no_pruned_value_reaches_the_forward_and_no_pruned_gradient_the_optimizer(
    runs: dict[str, Path], phase: str
) -> None:
    masks = joined_ranks(runs["two"], phase, "masks")
    for rank in (0, 1):
        state = load_rank(runs["two"], phase, rank)
        assert state["pruned_grad_max"] == 0.0
        for name, mask in masks.items():
            seen = state["forward_weights"][name]  # the whole weight FSDP2 gathered for the last forward
            assert seen.shape == mask.shape
            assert not seen[~mask].any() and not torch.signbit(seen[~mask]).any(), name


@pytest.mark.parametrize(("run", "phase"), [("two", "resumed"), ("one", "resumed"), ("one", "resharded")])
def test_distributed_checkpoint_resumes_exactly(runs: dict[str, Path], run: str, phase: str) -> None:
    """Resumed from epoch 2 of 3 (masks, Taylor sums, weights, optimizer): bitwise the uninterrupted
    run on the same ranks; from the 2-rank checkpoint on 1 rank, the same masks."""
    uninterrupted, resumed = load_rank(runs[run], "layer"), load_rank(runs[run], phase)
    for name, mask in uninterrupted["masks"].items():
        assert torch.equal(mask, resumed["masks"][name]), name
    for name, value in uninterrupted["weights"].items():
        if phase == "resharded":  # gradients were reduced over 2 ranks for the first two epochs
            torch.testing.assert_close(value, resumed["weights"][name], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(value, resumed["weights"][name]), name
    if run == "two":
        assert torch.equal(
            load_rank(runs[run], phase, 1)["masks"]["net.0.weight"],
            load_rank(runs[run], "layer", 1)["masks"]["net.0.weight"],
        )


def test_exact_k_lowest_over_uneven_blocks_with_ties(runs: dict[str, Path]) -> None:
    rank0, rank1 = load_rank(runs["two"], "uneven", 0), load_rank(runs["two"], "uneven", 1)
    full = rank0["full"]
    expected = [lowest_k(f, k) for f, k in zip(full, [3, 1, 0, 20])] + list(
        lowest_k(torch.cat(full), 9).split([7, 1, 0, 11])
    )
    for index, mask in enumerate(expected):
        assert torch.equal(torch.cat([rank0["dropped"][index], rank1["dropped"][index]]), mask), index


@pytest.mark.parametrize("run", ["two", "one"])
def test_iterative_rewind_resumes_from_between_cycles(runs: dict[str, Path], run: str) -> None:
    """Resumed after cycle 1 (masks and the sharded rewind snapshot from the 2-rank checkpoint): the
    uninterrupted masks, bitwise weights on the same ranks."""
    uninterrupted, resumed = load_rank(runs[run], "iterative"), load_rank(runs[run], "iterative-resumed")
    for name, mask in uninterrupted["masks"].items():
        assert torch.equal(mask, resumed["masks"][name]), name
    for name, value in uninterrupted["weights"].items():
        if run == "one":  # resharded: the first cycle's gradients were reduced over 2 ranks
            torch.testing.assert_close(value, resumed["weights"][name], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(value, resumed["weights"][name]), name
