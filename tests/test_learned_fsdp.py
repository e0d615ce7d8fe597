"""LearnedSparsity under FSDP2 (Lightning's ModelParallelStrategy): two gloo CPU processes against one.

Both launches run tests/learned_fsdp_job.py; the one-process run also resumes from the two-process
run's distributed checkpoint (another number of ranks: the row blocks are laid out anew).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import joined_ranks, load_rank, run_job

from lightning_prune.selection import group_counts

pytestmark = pytest.mark.slow  # two process launches, ~30 s together on 2 shared cores

JOB = Path(__file__).with_name("learned_fsdp_job.py")
TARGETS = ["net.0.weight", "net.2.weight", "net.4.weight"]  # net.6 (9 inputs) is left out with `ignore`


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    two, one = tmp_path_factory.mktemp("learned-fsdp2"), tmp_path_factory.mktemp("learned-fsdp1")
    run_job(JOB, two, 2)
    run_job(JOB, one, 1, "--resume-from", str(two / "learned-half-2"))
    return {"two": two, "one": one}


def assert_learned_the_same(logits: dict[str, torch.Tensor], single: dict[str, torch.Tensor]) -> None:
    """Equal up to the order two ranks sum the gradients in (Adam divides by their root mean square: a
    logit whose gradient is ~1e-9 moves by up to a few lr/100 over 16 steps; the steps could move 0.8)."""
    assert sorted(logits) == sorted(single) == TARGETS
    for name, value in single.items():
        difference = (logits[name] - value).abs()
        assert difference.mean() < 1e-4 and difference.max() < 0.01, name


def test_each_rank_holds_the_logits_of_its_rows_only(runs: dict[str, Path]) -> None:
    rank0, rank1 = load_rank(runs["two"], "learned", 0), load_rank(runs["two"], "learned", 1)
    single = load_rank(runs["one"], "learned")
    shapes = [[tuple(rank["logits"][n].shape) for n in TARGETS] for rank in (rank0, rank1, single)]
    assert shapes == [  # 48, 36 and 9 rows: blocks of 24/24, 18/18, 5/4 rows; 64, 48 and 36 inputs: 16, 12, 9 groups
        [(24, 16, 6), (18, 12, 6), (5, 9, 6)],
        [(24, 16, 6), (18, 12, 6), (4, 9, 6)],
        [(48, 16, 6), (36, 12, 6), (9, 9, 6)],
    ]
    # 6 fp32 logits per 4 weights, and AdamW's two moments: 18 bytes per weight of the rank's own block
    assert rank0["memory"] == rank1["memory"] == single["memory"] == {"logits": 6.0, "optimizer": 12.0, "total": 18.0}


def test_two_sharded_ranks_learn_what_one_process_learns(runs: dict[str, Path]) -> None:
    single = load_rank(runs["one"], "learned")
    assert load_rank(runs["two"], "learned")["step"] == single["step"] == 16
    assert_learned_the_same(joined_ranks(runs["two"], "learned", "logits"), single["logits"])
    masks = joined_ranks(runs["two"], "learned", "masks")
    for name, mask in single["masks"].items():
        assert torch.equal(masks[name], mask), name  # the same argmax: the same final 2:4 masks
        assert group_counts(mask, 4).eq(2).all(), name
    weights = joined_ranks(runs["two"], "learned", "weights")
    for name in TARGETS:  # frozen during learning, then the argmax zeroes the pruned +0.0
        torch.testing.assert_close(weights[name], single["weights"][name], rtol=0, atol=0)
        assert not weights[name][~masks[name]].ne(0).any() and not torch.signbit(weights[name][~masks[name]]).any()


@pytest.mark.parametrize("folder", ["two", "one"])
def test_resume_from_the_distributed_checkpoint_is_bitwise(runs: dict[str, Path], folder: str) -> None:
    for rank in (0, 1) if folder == "two" else (0,):
        straight, resumed = load_rank(runs[folder], "learned", rank), load_rank(runs[folder], "resumed", rank)
        assert resumed["step"] == straight["step"] == 16
        assert resumed["memory"] == straight["memory"]  # AdamW's state came back with the logits
        for key in ("logits", "masks", "weights"):
            for name, value in straight[key].items():
                assert torch.equal(resumed[key][name], value), (rank, key, name)


def test_one_process_resumes_what_two_ranks_saved(runs: dict[str, Path]) -> None:
    resharded, single = load_rank(runs["one"], "resharded"), load_rank(runs["one"], "learned")
    assert resharded["step"] == 16
    assert_learned_the_same(resharded["logits"], single["logits"])
    for name, mask in single["masks"].items():
        assert torch.equal(resharded["masks"][name], mask), name


@pytest.mark.parametrize("mesh", ["2x1", "1x2"])
def test_hsdp_replicas_and_blocks_learn_what_one_process_learns(runs: dict[str, Path], mesh: str) -> None:
    rank0, rank1 = load_rank(runs["two"], f"hsdp-{mesh}", 0), load_rank(runs["two"], f"hsdp-{mesh}", 1)
    single = load_rank(runs["one"], "learned")
    if mesh == "2x1":  # each replica holds every row; the replicas' gradients are summed across them
        for name, logits in rank0["logits"].items():
            assert torch.equal(logits, rank1["logits"][name]), name
        logits, masks = rank0["logits"], rank0["masks"]
    else:
        logits, masks = (
            joined_ranks(runs["two"], f"hsdp-{mesh}", "logits"),
            joined_ranks(runs["two"], f"hsdp-{mesh}", "masks"),
        )
    assert_learned_the_same(logits, single["logits"])
    for name, mask in single["masks"].items():
        assert torch.equal(masks[name], mask), name
