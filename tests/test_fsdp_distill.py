"""KnowledgeDistillation under FSDP2 (Lightning's ModelParallelStrategy): two gloo CPU processes against one.

Both launches run every phase of tests/fsdp_distill_job.py; the one-process run also resumes from
the two-process run's distributed checkpoint (a different number of ranks). The unit tests at the
bottom need no launch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import joined_ranks, load_rank, run_job
from torch import nn

from lightning_prune import KnowledgeDistillation

JOB = Path(__file__).with_name("fsdp_distill_job.py")
TEACHERS = [
    "copy",
    "empty-init",
    "given",
    "resumed",
]  # every way the teacher is made: copied, copied after empty init, given, restored


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One FSDP2 run on 2 ranks and one on 1 rank with the same global batch."""
    two, one = tmp_path_factory.mktemp("kd2"), tmp_path_factory.mktemp("kd1")
    run_job(JOB, two, 2)
    run_job(JOB, one, 1, "--resume-from", str(two / "kd-epoch1-2"))
    return {"two": two, "one": one}


@pytest.mark.slow
@pytest.mark.parametrize("phase", TEACHERS)
def test_each_rank_holds_its_block_of_a_frozen_teacher(runs: dict[str, Path], phase: str) -> None:
    whole = (2 if phase == "empty-init" else 4) * (
        64 * 48 + 48 + 48 * 48 + 48 + 48 * 10 + 10
    )  # bytes of the whole teacher (bf16 there)
    assert load_rank(runs["one"], phase)["teacher_bytes"] == whole
    for rank in (0, 1):
        state = load_rank(runs["two"], phase, rank)
        assert state["teacher_full_bytes"] == whole
        assert state["teacher_bytes"] == whole // 2  # 1/world: a dense copy per rank would hold `whole`
        assert state["teacher_row_sharded"] and not state["teacher_trainable"]
        assert [tuple(t.shape) for t in state["teacher"].values()] == [(24, 64), (24,), (24, 48), (24,), (5, 48), (5,)]
        assert state["kd_warnings"] == []


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["copy", "empty-init"])
def test_the_copied_teacher_is_the_student_as_training_starts(runs: dict[str, Path], phase: str) -> None:
    """Also when the model was built on the meta device and materialized after sharding (a copy taken
    in `setup`, before `configure_model`, would have no weights at all), there in `teacher_dtype` bf16."""
    for run, ranks in (("two", (0, 1)), ("one", (0,))):
        for rank in ranks:
            state = load_rank(runs[run], phase, rank)
            assert state["teacher"].keys() == state["at_fit_start"].keys()
            for name, block in state["at_fit_start"].items():
                assert torch.equal(state["teacher"][name], block.to(state["teacher"][name].dtype)), (run, rank, name)
                assert block.isfinite().all() and block.abs().sum() > 0  # materialized, initialized weights
            assert not torch.equal(
                state["teacher"]["0.weight"].float(), state["weights"]["net.0.weight"]
            )  # the student trained on; the teacher did not


@pytest.mark.slow
def test_a_given_teacher_is_sharded_as_passed(runs: dict[str, Path]) -> None:
    whole = torch.load(runs["two"] / "given-whole.pt", weights_only=True)
    for name, value in joined_ranks(runs["two"], "given", "teacher").items():
        assert torch.equal(value, whole[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["copy", "given"])
def test_two_ranks_distill_like_one_process(runs: dict[str, Path], phase: str) -> None:
    """The same global batch: the KD loss of every step (mean of the two halves), masks bitwise, weights."""
    rank0, rank1, single = (
        load_rank(runs["two"], phase, 0),
        load_rank(runs["two"], phase, 1),
        load_rank(runs["one"], phase),
    )
    two = torch.tensor(rank0["kd_losses"]).add(torch.tensor(rank1["kd_losses"])).div(2).double()
    one = torch.tensor(single["kd_losses"]).double()
    assert (
        len(one) == (24 if phase == "copy" else 8) and one[1:].gt(1e-4).all()
    )  # after the first step the student has moved off its teacher
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-7)
    for name, mask in joined_ranks(runs["two"], phase, "masks").items():
        assert torch.equal(mask, single["masks"][name]), name
    for name, value in joined_ranks(runs["two"], phase, "weights").items():
        torch.testing.assert_close(value, single["weights"][name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("run", "phase"), [("two", "resumed"), ("one", "resumed"), ("one", "resharded")])
def test_resume_distills_from_the_saved_dense_teacher(runs: dict[str, Path], run: str, phase: str) -> None:
    """Resumed at step 16 of a ramp to step 20, from a freshly built model with another seed: the
    teacher is the dense one from the distributed checkpoint (on 1 rank from the 2-rank one), and
    the remaining steps are those of the uninterrupted run."""
    source = "two" if phase == "resharded" else run  # whose uninterrupted run wrote the checkpoint
    expected = (
        joined_ranks(runs[source], "copy", "teacher") if source == "two" else load_rank(runs[source], "copy")["teacher"]
    )
    restored = joined_ranks(runs[run], phase, "teacher") if run == "two" else load_rank(runs[run], phase)["teacher"]
    for name, value in expected.items():
        assert torch.equal(restored[name], value), name
    resumed = load_rank(runs[run], phase)
    assert not torch.equal(
        resumed["at_fit_start"]["0.weight"], load_rank(runs[source], "copy")["at_fit_start"]["0.weight"]
    )  # the copy was replaced
    if phase == "resharded":
        straight = torch.tensor(load_rank(runs["one"], "copy")["kd_losses"][16:])
        torch.testing.assert_close(torch.tensor(resumed["kd_losses"]), straight, rtol=1e-4, atol=1e-7)
    else:
        assert resumed["kd_losses"] == load_rank(runs[run], "copy")["kd_losses"][16:]
        for name, value in load_rank(runs[run], "copy")["weights"].items():
            assert torch.equal(resumed["weights"][name], value), name


def test_fsdp2_refuses_a_teacher_device_and_an_unsharded_student() -> None:
    with pytest.raises(ValueError, match="`teacher_device`='cpu'"):
        KnowledgeDistillation(teacher_device="cpu").sharded_teacher(None, nn.Linear(4, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no FSDP2-sharded parameter"):
        KnowledgeDistillation().sharded_teacher(None, nn.Linear(4, 4))  # type: ignore[arg-type]


def test_a_sharded_teacher_is_not_read_outside_fsdp2() -> None:
    """A checkpoint whose teacher went to the distributed checkpoint, restored without it, raises
    instead of distilling from a copy."""
    callback = KnowledgeDistillation()
    callback.teacher = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="teacher is sharded"):
        callback.load_state_dict({"alpha": 0.5, "teacher": {}, "teacher_taken": True, "sharded_teacher": ["weight"]})


def test_the_meta_skeleton_of_a_transformers_model_is_the_model_without_hooks_masks_or_memory() -> None:
    """What the sharded copy is built from (here of an unsharded model: the same copier, minus
    FSDP2's class and state)."""
    from conftest import tiny_llama

    from lightning_prune.masking import get_masks, set_mask
    from lightning_prune.recovery.sharded import meta_skeleton

    model: Any = tiny_llama(tie_word_embeddings=True).eval()
    layer = model.model.layers[0].mlp.up_proj
    set_mask(layer, torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    calls: list[int] = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    skeleton: Any = meta_skeleton(model, dtype=torch.bfloat16)
    assert type(skeleton) is type(model) and skeleton.config.to_dict() == model.config.to_dict()
    assert skeleton.state_dict().keys() == model.state_dict().keys() and not get_masks(skeleton) and get_masks(model)
    assert all(
        t.is_meta and t.shape == model.get_parameter(n).shape and t.dtype == torch.bfloat16
        for n, t in skeleton.named_parameters()
    )
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight  # tied as in the model
    skeleton.to_empty(device="cpu").float()
    skeleton.load_state_dict(model.state_dict())
    for (
        name,
        buffer,
    ) in skeleton.named_buffers():  # non-persistent ones too (rotary frequencies), as the sharded copy does
        buffer.copy_(model.get_buffer(name))
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(skeleton(ids).logits, model(ids).logits)
    assert len(calls) == 1  # the model's own hook ran once (its forward), none was copied


def distributed_checkpoint(path: Path, scratch: Path) -> dict[str, Any]:
    """A Lightning distributed checkpoint (a folder) read whole in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, scratch)
    state: dict[str, Any] = torch.load(scratch, weights_only=False)
    return state


@pytest.mark.slow
@pytest.mark.parametrize("run", ["two", "one"])
def test_a_staged_run_under_fsdp2_distills_from_the_dense_stage(
    runs: dict[str, Path], tmp_path: Path, run: str
) -> None:
    """The run pipeline (gmp_chain) under ModelParallelStrategy: the dense stage's fit sharded the
    model, so the copy taken as the first pruning stage starts is a sharded one (FSDP2 refuses
    deepcopy), and the last stage's teacher is the dense stage's model; the report counts every
    rank's zeros, and the saved model holds whole tensors, those of the last stage."""
    out = runs[run] / "staged"
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == [
        "stage-0-dense.ckpt",
        "stage-3-gmp70_distill.ckpt",
    ]  # folders; `last` removed the others
    results = json.loads((out / "results.json").read_text())
    assert [entry["status"] for entry in results["stages"]] == ["completed"] * 4 and results["warnings"] == []
    assert results["global_sparsity"] == pytest.approx(0.7, abs=1e-3)
    dense = distributed_checkpoint(out / "checkpoints" / "stage-0-dense.ckpt", tmp_path / "dense.pt")["state_dict"]
    last = distributed_checkpoint(out / "checkpoints" / "stage-3-gmp70_distill.ckpt", tmp_path / "last.pt")[
        "state_dict"
    ]
    teacher = {
        key.split(".", 2)[2]: value
        for key, value in last.items()
        if key.startswith("_lightning_prune.KnowledgeDistillation")
    }  # its blocks
    assert sorted(teacher) == [
        f"{layer}.{kind}" for layer in ("classifier", "fc1", "fc2") for kind in ("bias", "weight")
    ]
    for name, value in teacher.items():
        assert torch.equal(value, dense[f"model.{name}"]), name
    saved = torch.load(out / "model" / "model.pt", weights_only=True)
    assert sorted(saved) == sorted(teacher) and all(type(value) is torch.Tensor for value in saved.values())
    for name, value in saved.items():
        assert torch.equal(value, last[f"model.{name}"]), name  # finalized: the masks were applied after every step
    assert float((saved["fc1.weight"] == 0).float().mean()) == pytest.approx(0.7, abs=1e-3)
    assert not torch.equal(saved["fc1.weight"], dense["model.fc1.weight"])  # the student was pruned and trained on


def test_resume_of_a_staged_run_under_fsdp2_is_refused_before_anything_runs(tmp_path: Path) -> None:
    from conftest import compose_config
    from fsdp_distill_job import STAGED

    from lightning_prune.run import ConfigError, run

    with pytest.raises(
        ConfigError,
        match=r"`resume`=True: stage `dense` runs under `trainer.strategy`=.*ModelParallelStrategy.*resume=false",
    ):
        run(compose_config("gmp_chain", tmp_path, *STAGED, "resume=true"))
    assert not any(tmp_path.iterdir())  # before the output folder is written
