"""KnowledgeDistillation's teacher: dtype and device, a module or a model directory, sizes, checkpoints."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate

from lightning_prune import GradualPruning, KnowledgeDistillation, OneShotPruning, get_masks
from lightning_prune.recovery import kd_kl_loss
from tests.conftest import TinyCausalLM, TinyRegressor, make_trainer, perturbed, tiny_llama

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _equal(teacher: torch.nn.Module | None, expected: dict[str, torch.Tensor]) -> bool:
    assert teacher is not None
    state = teacher.state_dict()
    return state.keys() == expected.keys() and all(torch.equal(v.cpu(), expected[k]) for k, v in state.items())


class Losses(pl.Callback):
    """What every training step returned."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.values.append(float(outputs["loss"]))


def _frozen_student(module: TinyCausalLM) -> TinyCausalLM:
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.0)  # type: ignore[method-assign]
    return module


def _expected_loss(module: TinyCausalLM, teacher: torch.nn.Module, alpha: float) -> float:
    """α·task + (1−α)·KL on the first batch, computed by hand on CPU."""
    batch = module.tokens[:2]
    with torch.no_grad():
        output = module.model.cpu()(input_ids=batch, labels=batch)
        kd = kd_kl_loss(output.logits, teacher.cpu()(input_ids=batch).logits, temperature=2.0)
    assert float(kd) > 0.01
    return alpha * float(output.loss) + (1 - alpha) * float(kd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])
def test_a_bf16_teacher_from_a_dtype_or_a_hydra_string_gives_the_hand_computed_loss(dtype: Any) -> None:
    module = _frozen_student(TinyCausalLM(tiny_llama()))
    teacher = perturbed(tiny_llama())
    expected = _expected_loss(module, copy.deepcopy(teacher).to(torch.bfloat16), alpha=0.5)
    if isinstance(dtype, str):  # as a YAML / command-line override gives it
        distill = instantiate(
            {"_target_": "lightning_prune.KnowledgeDistillation", "teacher_dtype": dtype, "teacher_device": "cpu"},
            teacher=teacher,
        )
    else:
        distill = KnowledgeDistillation(teacher=teacher, teacher_dtype=dtype)
    losses = Losses()
    make_trainer(max_steps=1, callbacks=[distill, losses]).fit(module)
    assert {p.dtype for p in distill.teacher.parameters()} == {torch.bfloat16}
    assert losses.values[0] == pytest.approx(expected, rel=1e-5)


def test_teacher_device_cpu_keeps_the_teacher_there() -> None:
    module = TinyCausalLM(tiny_llama())
    distill = KnowledgeDistillation(teacher_device="cpu", teacher_dtype="bfloat16")
    losses = Losses()
    make_trainer(max_steps=2, callbacks=[distill, losses]).fit(module)
    assert {p.device.type for p in distill.teacher.parameters()} == {"cpu"} and len(losses.values) == 2


@CUDA
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_cpu_teacher_distills_a_cuda_student(precision: str) -> None:
    module = _frozen_student(TinyCausalLM(tiny_llama()))
    teacher = perturbed(tiny_llama())
    expected = _expected_loss(copy.deepcopy(module), copy.deepcopy(teacher), alpha=0.5)
    distill, losses = KnowledgeDistillation(teacher=teacher, teacher_device="cpu"), Losses()
    pruning = GradualPruning(0.5, start_step=1, end_step=2, frequency=1)
    make_trainer(
        max_steps=3, accelerator="gpu", devices=1, precision=precision, callbacks=[pruning, distill, losses]
    ).fit(module)
    assert {p.device.type for p in distill.teacher.parameters()} == {"cpu"}
    assert next(module.model.parameters()).device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(losses.values)))
    if precision == "32-true":
        assert losses.values[0] == pytest.approx(expected, rel=1e-4)
    for name, mask in get_masks(module.model).items():
        assert torch.all(module.model.get_parameter(name)[~mask] == 0), name


def test_a_teacher_without_teacher_device_follows_the_students_device_and_goes_to_the_cpu_after_fit() -> None:
    module, distill = TinyCausalLM(tiny_llama()), KnowledgeDistillation(teacher=tiny_llama())
    distill.prepare(make_trainer(), module)
    module._device = torch.device("meta")  # where the strategy put the student (a device the CPU test can tell apart)
    distill.attach(module)
    assert {p.device.type for p in distill.teacher.parameters()} == {"meta"}
    moves: list[Any] = []
    # meta tensors cannot be copied back
    distill.teacher.to = lambda *args, **kwargs: moves.append(args)  # type: ignore[method-assign]
    distill.detach(module)
    assert moves == [(torch.device("cpu"),)] and "training_step" not in module.__dict__
    placed = KnowledgeDistillation(teacher=tiny_llama(), teacher_device="cpu")
    placed.prepare(make_trainer(), module)
    placed.attach(module)
    assert {p.device.type for p in placed.teacher.parameters()} == {"cpu"}  # an explicit device is kept


@CUDA
def test_a_teacher_that_follows_the_student_leaves_the_accelerator_with_it() -> None:
    module, distill = TinyCausalLM(tiny_llama()), KnowledgeDistillation(alpha=0.5)
    make_trainer(max_steps=1, accelerator="gpu", devices=1, callbacks=[distill]).fit(module)
    assert next(module.parameters()).device.type == "cpu" and {p.device.type for p in distill.teacher.parameters()} == {
        "cpu"
    }


def test_bad_teacher_devices_and_dtypes_are_named() -> None:
    with pytest.raises(ValueError, match="`teacher_device`"):
        KnowledgeDistillation(teacher_device="gpu:x")
    with pytest.raises(ValueError, match="`teacher_dtype`"):
        KnowledgeDistillation(teacher_dtype=torch.int8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_teacher_device_without_cuda_fails_at_setup_naming_teacher_device() -> None:
    module = TinyCausalLM(tiny_llama())
    with pytest.raises(ValueError, match="`teacher_device`='cuda' cannot hold the teacher"):
        make_trainer(
            max_steps=1,
            callbacks=[OneShotPruning("magnitude", 0.5, progress=False), KnowledgeDistillation(teacher_device="cuda")],
        ).fit(module)
    assert get_masks(module.model) == {}  # before OneShotPruning acted


def test_a_teacher_from_a_model_directory_is_loaded_and_reloaded_on_resume(tmp_path: Path) -> None:
    saved = perturbed(tiny_llama())
    saved.save_pretrained(tmp_path / "teacher")
    expected = _state(saved)
    module = TinyCausalLM(tiny_llama())
    distill = KnowledgeDistillation(alpha=0.5, teacher=str(tmp_path / "teacher"))
    trainer = make_trainer(max_steps=2, callbacks=[GradualPruning(0.5, end_step=1, frequency=1), distill])
    trainer.fit(module)
    assert type(distill.teacher).__name__ == "LlamaForCausalLM" and _equal(distill.teacher, expected)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    assert distill.state_dict()["teacher"] == {}  # the directory is the teacher's record, not the checkpoint
    resumed = KnowledgeDistillation(alpha=0.5, teacher=str(tmp_path / "teacher"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_steps=3, callbacks=[GradualPruning(0.5, end_step=1, frequency=1), resumed]).fit(
            TinyCausalLM(tiny_llama()), ckpt_path=tmp_path / "run.ckpt"
        )
    assert _equal(resumed.teacher, expected) and resumed.warnings_recorded == []
    assert not [w for w in caught if "teacher" in str(w.message)]


def test_a_teacher_path_needs_a_model_directory_and_a_student_that_loads_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`teacher`.*config\.json"):
        make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(teacher=str(tmp_path))]).fit(
            TinyCausalLM(tiny_llama())
        )
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"`teacher`.*TinyRegressor has no `from_pretrained`"):
        make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(loss="mse", teacher=str(tmp_path))]).fit(
            TinyRegressor()
        )


@pytest.mark.parametrize(
    ("teacher_settings", "loss", "layers", "match"),
    [
        (
            {"vocab_size": 64},
            "kl",
            None,
            r"`teacher` LlamaForCausalLM has vocab_size=64 but the student LlamaForCausalLM has vocab_size=48",
        ),
        ({"hidden_size": 48}, "mse", [0], r"`teacher` LlamaForCausalLM has hidden_size=48 but .* has hidden_size=32"),
        ({"hidden_size": 48}, "cosine", None, r"hidden_size=48 .* hidden_size=32"),
    ],
)
def test_a_teacher_of_other_sizes_is_named_before_any_pruning(
    teacher_settings: dict[str, int], loss: str, layers: list[int] | None, match: str
) -> None:
    module = TinyCausalLM(tiny_llama())
    distill = KnowledgeDistillation(loss=loss, layers=layers, teacher=tiny_llama(**teacher_settings))
    with pytest.raises(ValueError, match=match):
        distill.preflight(module)
    with pytest.raises(ValueError, match=match):
        make_trainer(max_steps=1, callbacks=[OneShotPruning("magnitude", 0.5, progress=False), distill]).fit(module)
    assert get_masks(module.model) == {}


def test_a_teacher_directory_of_another_vocabulary_is_named_at_preflight_from_its_config(tmp_path: Path) -> None:
    tiny_llama(vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"`teacher` .* has vocab_size=64 but the student LlamaForCausalLM has vocab_size=48"
    ):
        KnowledgeDistillation(teacher=str(tmp_path)).preflight(TinyCausalLM(tiny_llama()))


def test_a_wider_teacher_distills_logits() -> None:
    module, losses = TinyCausalLM(tiny_llama()), Losses()
    make_trainer(
        max_steps=2,
        callbacks=[KnowledgeDistillation(loss="kl", teacher=tiny_llama(hidden_size=48, intermediate_size=96)), losses],
    ).fit(module)
    assert len(losses.values) == 2 and all(loss > 0 for loss in losses.values)


def test_the_student_itself_is_refused_as_teacher() -> None:
    module = TinyCausalLM(tiny_llama())
    with pytest.raises(ValueError, match=r"`teacher` shares .* parameters with the student"):
        make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(teacher=module.model)]).fit(module)


def test_a_given_module_teacher_and_a_bf16_teacher_resume_bitwise(tmp_path: Path) -> None:
    given = perturbed(tiny_llama())
    expected = {k: v.to(torch.bfloat16) for k, v in _state(given).items()}
    first = KnowledgeDistillation(alpha=0.5, teacher=given, teacher_dtype="bfloat16")
    trainer = make_trainer(max_steps=2, callbacks=[GradualPruning(0.5, end_step=1, frequency=1), first])
    trainer.fit(TinyCausalLM(tiny_llama()))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=False)
    assert not [
        key for key in checkpoint["state_dict"] if not key.startswith("model.")
    ]  # no teacher keys in the module
    second = KnowledgeDistillation(
        alpha=0.5, teacher=tiny_llama(), teacher_dtype=torch.bfloat16
    )  # a different module: the checkpoint wins
    make_trainer(max_steps=3, callbacks=[GradualPruning(0.5, end_step=1, frequency=1), second]).fit(
        TinyCausalLM(tiny_llama()), ckpt_path=tmp_path / "run.ckpt"
    )
    assert _equal(second.teacher, expected) and second.warnings_recorded == []


def test_a_checkpoint_without_a_teacher_and_a_pruned_copy_are_warned_and_recorded(tmp_path: Path) -> None:
    trainer = make_trainer(max_steps=2, callbacks=[GradualPruning(0.5, end_step=1, frequency=1)])
    trainer.fit(TinyCausalLM(tiny_llama()))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    fresh = TinyCausalLM(tiny_llama(seed=3))
    constructed = _state(fresh.model)
    resumed = KnowledgeDistillation(alpha=0.5)
    with pytest.warns(UserWarning, match="checkpoint holds no teacher"):
        make_trainer(max_steps=3, callbacks=[GradualPruning(0.5, end_step=1, frequency=1), resumed]).fit(
            fresh, ckpt_path=tmp_path / "run.ckpt"
        )
    assert _equal(resumed.teacher, constructed) and [w["kind"] for w in resumed.warnings_recorded] == [
        "teacher_not_in_checkpoint"
    ]
    later = KnowledgeDistillation(alpha=0.5)  # a second fit of the pruned model, masks still attached
    with pytest.warns(UserWarning, match="copy of the pruned model"):
        make_trainer(max_steps=1, callbacks=[later]).fit(fresh)
    assert [w["kind"] for w in later.warnings_recorded] == ["pruned_teacher"] and get_masks(later.teacher) == {}


def test_a_teacher_loaded_in_bf16_gets_the_students_float_inputs_in_its_dtype() -> None:
    module, losses = TinyRegressor(), Losses()
    teacher = copy.deepcopy(module).to(
        torch.bfloat16
    )  # as `from_pretrained` gives a model saved in bf16: no `teacher_dtype`
    make_trainer(max_steps=2, callbacks=[KnowledgeDistillation(alpha=0.0, loss="mse", teacher=teacher), losses]).fit(
        module
    )
    assert len(losses.values) == 2 and 0.0 < losses.values[0] < 1e-3  # only bf16 rounding separates the two
