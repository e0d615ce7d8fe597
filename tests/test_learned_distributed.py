"""LearnedSparsity under Lightning's DDP: two CPU processes (gloo) against one process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_rank, run_job

from lightning_prune.selection import group_counts

JOB = Path(__file__).with_name("learned_job.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ddp, single = tmp_path_factory.mktemp("learned-ddp"), tmp_path_factory.mktemp("learned-single")
    run_job(JOB, ddp, 2)
    run_job(JOB, single, 1)
    return {"ddp": ddp, "single": single}


@pytest.mark.slow
def test_two_ranks_hold_identical_logits_masks_and_weights(runs: dict[str, Path]) -> None:
    rank0, rank1 = load_rank(runs["ddp"], "learned", 0), load_rank(runs["ddp"], "learned", 1)
    assert rank0["steps"] == rank1["steps"] == 8 and len(rank0["logits"]) == 14  # 2 blocks × 7 projections
    for key in ("logits", "masks", "weights"):
        assert rank0[key].keys() == rank1[key].keys() and rank0[key]
        for name, value in rank0[key].items():
            assert torch.equal(value, rank1[key][name]), (key, name)
    for name, mask in rank0["masks"].items():
        assert group_counts(mask, 4).eq(2).all(), name


@pytest.mark.slow
def test_two_ranks_learn_what_one_process_learns_from_the_same_global_batch(runs: dict[str, Path]) -> None:
    ddp, single = load_rank(runs["ddp"], "learned"), load_rank(runs["single"], "learned")
    for name, logits in ddp["logits"].items():
        # Adam divides by the gradients' root mean square: where a logit's gradient is ~1e-9 (a candidate the
        # softmax gives ~0), the summation order of two ranks moves its update (~lr/10 at worst over 8 steps)
        difference = (logits - single["logits"][name]).abs()
        assert difference.mean() < 5e-4 and difference.max() < 0.02, name  # the steps could move 0.4
    changed = sum(int((ddp["masks"][n] != single["masks"][n]).sum()) for n in ddp["masks"])
    total = sum(mask.numel() for mask in ddp["masks"].values())
    assert changed / total < 1e-3  # a near tie may flip a group or two
