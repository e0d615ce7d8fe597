"""Pruning under HSDP (`fully_shard` on a (replicate, shard) mesh, Lightning's ModelParallelStrategy).

Two gloo CPU processes run tests/fsdp_hsdp_job.py on a 2x1 mesh (two replicas, each holding whole
weights) and a 1x2 mesh (one replica in two row blocks); one process runs the 1x1 reference and
resumes from the 2x1 run's distributed checkpoint. Four forked ranks select masks on a 2x2 mesh.
The same launches distill (row-wise GMP with KnowledgeDistillation) and recover with LoRARecovery.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_rank, run_job
from torch import nn

from lightning_prune.report import max_nonzeros_per_group

pytestmark = pytest.mark.slow  # two process launches, ~15-30 s each on 2 shared cores

JOB = Path(__file__).with_name("fsdp_hsdp_job.py")
SCOPES = ["layer", "row", "global", "nm"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both 2-rank meshes and the 1-rank reference, written into one folder."""
    out = tmp_path_factory.mktemp("hsdp")
    run_job(JOB, out, 2)
    run_job(JOB, out, 1, "--resume-from", str(out / "half-2x1"), "--resume-iterative", str(out / "cycle1-2x1"))
    return out


def whole(folder: Path, mesh: str, phase: str, key: str) -> dict[str, torch.Tensor]:
    """Whole tensors under `key`: a replica's blocks in rank order (2x1: rank 0's, which are whole)."""
    ranks = {"1x1": [0], "2x1": [0], "1x2": [0, 1]}[mesh]
    states = [load_rank(folder, f"{mesh}-{phase}", rank)[key] for rank in ranks]
    return {name: torch.cat([state[name] for state in states]) for name in states[0]}


@pytest.mark.parametrize("mesh", ["2x1", "1x2"])
@pytest.mark.parametrize("scope", SCOPES)
def test_hsdp_selects_the_masks_of_one_process(runs: Path, mesh: str, scope: str) -> None:
    single = load_rank(runs, f"1x1-{scope}")
    masks, weights = whole(runs, mesh, scope, "masks"), whole(runs, mesh, scope, "weights")
    assert sorted(masks) == ["net.0.weight", "net.2.weight"]
    for name, mask in single["masks"].items():
        assert torch.equal(masks[name], mask), name
    for name, value in single["weights"].items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-6)
    assert (
        load_rank(runs, f"{mesh}-{scope}", 0)["sparsity"]
        == load_rank(runs, f"{mesh}-{scope}", 1)["sparsity"]
        == single["sparsity"]
    )


@pytest.mark.parametrize("scope", SCOPES)
def test_replicas_hold_identical_masks_and_select_without_a_collective(runs: Path, scope: str) -> None:
    """2x1: each replica selects over its whole weights alone (a collective over both replicas
    would count every score twice); 1x2: over the shard group of both ranks."""
    rank0, rank1 = load_rank(runs, f"2x1-{scope}", 0), load_rank(runs, f"2x1-{scope}", 1)
    assert rank0["group_size"] == rank1["group_size"] == 1
    assert load_rank(runs, f"1x2-{scope}", 0)["group_size"] == 2
    for name, mask in rank0["masks"].items():
        assert mask.shape == rank0["weights"][name].shape == (48, mask.shape[1])  # whole weights on each replica
        assert torch.equal(mask, rank1["masks"][name]), name


@pytest.mark.parametrize("mesh", ["2x1", "1x2"])
@pytest.mark.parametrize("scope", SCOPES)
def test_no_pruned_value_reaches_the_forward_under_hsdp(runs: Path, mesh: str, scope: str) -> None:
    masks = whole(runs, mesh, scope, "masks")
    for rank in (0, 1):
        state = load_rank(runs, f"{mesh}-{scope}", rank)
        assert state["pruned_grad_max"] == 0.0
        for name, mask in masks.items():
            seen = state["forward_weights"][name]
            assert seen.shape == mask.shape
            assert not seen[~mask].any() and not torch.signbit(seen[~mask]).any(), name


@pytest.mark.parametrize(
    ("mesh", "phase"), [("2x1", "resumed"), ("1x2", "resumed"), ("1x1", "resumed"), ("1x1", "resharded0")]
)
def test_hsdp_checkpoint_resumes_on_any_mesh(runs: Path, mesh: str, phase: str) -> None:
    """Global-scope Fisher GMP saved after epoch 2 of 3 on the 2x1 mesh (on 1x1 for the 1-process
    "resumed"), resumed on 2x1, 1x2 and 1x1: the uninterrupted run's masks; bitwise weights where
    the gradients were reduced the same way."""
    uninterrupted = whole(runs, mesh, "global", "masks"), whole(runs, mesh, "global", "weights")
    resumed = whole(runs, mesh, phase, "masks"), whole(runs, mesh, phase, "weights")
    for name, mask in uninterrupted[0].items():
        assert torch.equal(mask, resumed[0][name]), name
    for name, value in uninterrupted[1].items():
        if phase == "resharded0":  # the first two epochs reduced gradients over 2 ranks
            torch.testing.assert_close(value, resumed[1][name], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(value, resumed[1][name]), name


@pytest.mark.parametrize(
    ("mesh", "phase"), [("2x1", "iterative"), ("1x2", "iterative-resumed"), ("1x1", "iterative-resumed")]
)
def test_hsdp_iterative_rewind(runs: Path, mesh: str, phase: str) -> None:
    """Two cycles of channel pruning with a rewind to initialisation on 2x1, and resumed after cycle 1
    (masks and the sharded rewind snapshot from the 2x1 checkpoint) on 1x2 and on one process: the
    one-process run's masks and, up to the order of gradient sums, its weights."""
    single = load_rank(runs, "1x1-iterative")
    masks, weights = whole(runs, mesh, phase, "masks"), whole(runs, mesh, phase, "weights")
    for name, mask in single["masks"].items():
        assert torch.equal(masks[name], mask), name
        assert int((~mask).sum()) == mask.numel() // 2
    for name, value in single["weights"].items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mesh", ["2x1", "1x2"])
def test_hsdp_teacher_is_sharded_like_the_student_and_distills_like_one_process(runs: Path, mesh: str) -> None:
    """The copied teacher lies on the student's (replicate, shard) mesh: 1/shards of it per rank,
    the same on every replica; the KD loss of every step (mean of the ranks' halves of the global
    batch) is the one process's (the masks: `test_hsdp_selects_the_masks_of_one_process`, row)."""
    single, ranks = load_rank(runs, "1x1-row"), [load_rank(runs, f"{mesh}-row", rank) for rank in (0, 1)]
    shards = int(mesh.split("x")[1])
    for state in ranks:
        assert state["teacher_placements"] == ["(Replicate(), Shard(dim=0))"] and not state["teacher_trainable"]
        assert state["teacher_bytes"] == single["teacher_bytes"] // shards
    for name, value in whole(runs, mesh, "row", "teacher").items():
        assert torch.equal(value, single["teacher"][name]), name  # the student as fit started, on every replica
        if mesh == "2x1":
            assert torch.equal(ranks[1]["teacher"][name], value), name
    two = torch.tensor(ranks[0]["kd_losses"]).add(torch.tensor(ranks[1]["kd_losses"])).div(2).double()
    one = torch.tensor(single["kd_losses"]).double()
    assert len(one) == 24 and one[1:].gt(1e-5).all()
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mesh", ["2x1", "1x2"])
def test_hsdp_lora_merges_what_one_process_merges(runs: Path, mesh: str) -> None:
    """Masked-delta LoRA on 2:4 masks (net.2 keeps an exact zero: its forward gathers mask blocks over
    the shard group) on the HSDP mesh: masks bitwise, the merged weights of one process, every
    pruned weight +0.0 and every 2:4 group kept, both replicas identical."""
    single = load_rank(runs, "1x1-lora")
    masks, merged = whole(runs, mesh, "lora", "masks"), whole(runs, mesh, "lora", "weights")
    assert sorted(masks) == ["net.0.weight", "net.2.weight"]
    for name, mask in single["masks"].items():
        assert torch.equal(masks[name], mask), name
        assert not merged[name][~mask].any() and not torch.signbit(merged[name][~mask]).any(), name
        assert max_nonzeros_per_group(merged[name], 4) == 2
        assert not torch.equal(merged[name], single["before"][name])  # the adapters did change the kept weights
    for name, value in single["weights"].items():
        torch.testing.assert_close(merged[name], value, rtol=1e-4, atol=1e-6)
    for rank in (0, 1):
        state = load_rank(runs, f"{mesh}-lora", rank)
        assert (
            state["merged"]
            and not state["wrapped"]
            and state["forward_masks"] == {"net.0": "nonzero", "net.2": "gathered"}
        )
        assert state["trainable"] == sorted(state["adapters"]) and all(
            kind == "DTensor" for kind, _ in state["adapters"].values()
        )
    if mesh == "2x1":
        replica = load_rank(runs, "2x1-lora", 1)["weights"]
        assert all(
            torch.equal(replica[name], value) for name, value in load_rank(runs, "2x1-lora", 0)["weights"].items()
        )


@pytest.fixture(scope="module")
def mesh_2x2(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Each of 4 ranks' masks on a 2x2 (replicate, shard) mesh, by rank."""
    out = tmp_path_factory.mktemp("mesh")
    run_job(JOB, out, 1, "--mesh-selection")
    return [torch.load(out / f"mesh-rank{rank}.pt", weights_only=True) for rank in range(4)]


@pytest.mark.parametrize("phase", ["layer", "row", "global", "nm"])
def test_2x2_mesh_thresholds_count_each_score_once(mesh_2x2: list[dict], phase: str) -> None:
    """Two replicas of two row blocks, integer weights (ties everywhere): the k-th lowest is found
    over the shard group (size 2), not all 4 ranks, and both replicas hold the unsharded masks."""
    from fsdp_hsdp_job import SELECTIONS

    from lightning_prune import find_targets, get_masks, update_masks

    net = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 48), nn.Linear(48, 10))
    net.load_state_dict(mesh_2x2[0]["whole"])
    targets = find_targets(net)
    update_masks(targets, {t.name: t.weight.detach().abs() for t in targets}, 0.5, **SELECTIONS[phase])
    assert [state["group_size"] for state in mesh_2x2] == [2, 2, 2, 2]
    for replica in (0, 1):
        blocks = sorted((s for s in mesh_2x2 if s["coordinate"][0] == replica), key=lambda s: s["coordinate"][1])
        for name, mask in get_masks(net).items():
            assert torch.equal(torch.cat([block["masks"][phase][name] for block in blocks]), mask), (replica, name)
