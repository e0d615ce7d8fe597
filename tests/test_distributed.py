"""Pruning under Lightning's DDP strategy: two real CPU processes (gloo) against one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_rank, run_job

JOB = Path(__file__).with_name("distributed_job.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One DDP run (2 ranks) and one single-process run with the same global batch.

    The single-process run resumes its `resumed` phase from the DDP run's checkpoint.
    """
    ddp = tmp_path_factory.mktemp("ddp")
    single = tmp_path_factory.mktemp("single")
    run_job(JOB, ddp, 2)
    run_job(JOB, single, 1, "--resume-from", str(ddp / "half-2.ckpt"))
    return {"ddp": ddp, "single": single}


def assert_same_masks(a: dict, b: dict) -> None:
    assert a["masks"].keys() == b["masks"].keys() and a["masks"]
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name


@pytest.mark.parametrize("phase", ["gradual", "resumed", "iterative", "distill"])
def test_ranks_hold_identical_masks_and_weights(runs: dict[str, Path], phase: str) -> None:
    rank0, rank1 = load_rank(runs["ddp"], phase, 0), load_rank(runs["ddp"], phase, 1)
    assert_same_masks(rank0, rank1)
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name


@pytest.mark.parametrize("run", ["ddp", "single"])
def test_pruned_weights_get_zero_gradient_after_the_all_reduce(runs: dict[str, Path], run: str) -> None:
    # Gradients are masked inside gradient accumulation, before DDP's reducer reads them: the
    # optimizer never sees a non-zero gradient of a pruned weight, on any rank.
    for rank in (0, 1) if run == "ddp" else (0,):
        assert load_rank(runs[run], "gradual", rank)["pruned_grad_max"] == 0.0


@pytest.mark.parametrize("phase", ["gradual", "iterative"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(runs: dict[str, Path], phase: str) -> None:
    ddp, single = load_rank(runs["ddp"], phase), load_rank(runs["single"], phase)
    assert_same_masks(ddp, single)
    for name, value in ddp["weights"].items():
        torch.testing.assert_close(value, single["weights"][name], rtol=1e-4, atol=1e-5)


def test_gradual_reaches_its_target_under_ddp(runs: dict[str, Path]) -> None:
    masks = load_rank(runs["ddp"], "gradual")["masks"]
    assert sorted(masks) == ["net.0.weight", "net.2.weight"]  # the head stays dense
    assert [int(m.sum()) for m in masks.values()] == [1024, 1024]  # 4096 − round(0.75·4096) each


def test_ddp_checkpoint_resumes_on_two_ranks_and_on_one(runs: dict[str, Path]) -> None:
    uninterrupted = load_rank(runs["ddp"], "gradual")
    resumed_ddp = load_rank(runs["ddp"], "resumed")
    resumed_single = load_rank(runs["single"], "resumed")
    assert_same_masks(uninterrupted, resumed_ddp)
    assert_same_masks(uninterrupted, resumed_single)
    for name, value in uninterrupted["weights"].items():
        assert torch.equal(value, resumed_ddp["weights"][name]), name
        torch.testing.assert_close(value, resumed_single["weights"][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("phase", ["wanda", "sparsegpt"])
def test_oneshot_on_two_ranks_equals_one_rank_on_all_batches(runs: dict[str, Path], phase: str) -> None:
    """Each rank calibrates on half the batches; all-reduced statistics give one process's masks."""
    rank0, rank1, single = (
        load_rank(runs["ddp"], phase, 0),
        load_rank(runs["ddp"], phase, 1),
        load_rank(runs["single"], phase),
    )
    assert len(rank0["masks"]) == 14  # 7 projections in each of the 2 blocks; lm_head stays dense
    assert_same_masks(rank0, rank1)
    assert_same_masks(rank0, single)
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
        torch.testing.assert_close(value, single["weights"][name], rtol=1e-4, atol=1e-5)


def test_wanda_2_4_masks_hold_through_ddp_fine_tuning(runs: dict[str, Path]) -> None:
    state = load_rank(runs["ddp"], "wanda")
    for name, mask in state["masks"].items():
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all(), name
        assert not state["weights"][name][~mask].any(), name


def test_calibration_is_split_by_batch_index_or_kept_when_already_sharded() -> None:
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, DistributedSampler

    from lightning_prune.callbacks.oneshot import OneShotPruning

    batches = [torch.full((2, 3), i) for i in range(5)]
    callback = OneShotPruning("wanda", 0.5, calibration=batches, num_samples=8)  # 4 batches of 2 sequences
    shares = [
        callback.calibration_batches(SimpleNamespace(world_size=2, global_rank=r, datamodule=None)) for r in (0, 1)
    ]
    assert [[int(b[0, 0]) for b in share] for share in shares] == [[0, 2], [1, 3]]
    sharded = DataLoader(
        list(range(10)), batch_size=2, sampler=DistributedSampler(list(range(10)), 2, 1, shuffle=False)
    )
    callback = OneShotPruning("wanda", 0.5, calibration=sharded, num_samples=3)  # rank 1 of 2: 3 // 2 sequences
    assert [
        b.tolist() for b in callback.calibration_batches(SimpleNamespace(world_size=2, global_rank=1, datamodule=None))
    ] == [[1]]
