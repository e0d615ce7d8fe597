"""KnowledgeDistillation: the teacher is a true frozen copy, alpha mixing inside fit, pure distillation, resume."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_prune import GradualPruning, KnowledgeDistillation, LoRARecovery, OneShotPruning, get_masks
from lightning_prune.recovery import kd_kl_loss
from tests.conftest import TinyCausalLM, make_trainer, tiny_llama


class Recorder(pl.Callback):
    """Keeps what every training step returned."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


class UnlabelledLM(TinyCausalLM):
    """Runs the model without labels and returns no loss: only pure distillation can train it."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.model(input_ids=batch, attention_mask=torch.ones_like(batch))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_teacher_is_a_frozen_unpruned_copy_of_the_dense_model_through_gradual_pruning() -> None:
    module = TinyCausalLM(tiny_llama())
    dense = _state(module.model)
    distill = KnowledgeDistillation(alpha=0.5, temperature=2.0)
    pruning = GradualPruning(0.5, start_step=0, end_step=2, frequency=1)
    recorder = Recorder()
    make_trainer(max_steps=4, callbacks=[pruning, distill, recorder]).fit(module)  # pruning listed first
    teacher = distill.teacher
    assert teacher is not None and teacher is not module.model
    assert all(torch.equal(v, dense[k]) for k, v in teacher.state_dict().items())  # never updated, never pruned
    assert get_masks(teacher) == {} and get_masks(module.model) != {}
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert all(m is not teacher for m in module.modules())
    assert pruning.current_sparsity == pytest.approx(0.5, abs=0.01)
    assert "training_step" not in module.__dict__  # the wrapper is gone after fit
    assert len(recorder.losses) == 4


def _perturbed_teacher() -> torch.nn.Module:
    """The tiny Llama with noise added: far enough from the student for the losses to matter."""
    teacher = tiny_llama()
    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return teacher


def test_alpha_mixes_the_task_loss_with_kl_against_a_given_teacher() -> None:
    module = TinyCausalLM(tiny_llama())
    teacher = _perturbed_teacher()
    batch = module.tokens[:2]
    with torch.no_grad():
        output = module.model(input_ids=batch, labels=batch)
        kd = kd_kl_loss(output.logits, teacher(input_ids=batch).logits, temperature=3.0)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.0)  # type: ignore[method-assign]
    recorder = Recorder()
    make_trainer(
        max_steps=1, callbacks=[KnowledgeDistillation(alpha=0.25, temperature=3.0, teacher=teacher), recorder]
    ).fit(module)
    assert float(kd) > 0.01
    assert recorder.losses[0] == pytest.approx(0.25 * float(output.loss) + 0.75 * float(kd), rel=1e-5)


def test_pure_distillation_needs_no_labels_and_pulls_the_pruned_student_to_the_teacher() -> None:
    module = UnlabelledLM(tiny_llama())
    distill = KnowledgeDistillation(alpha=0.0, loss="cosine", layers=[0], teacher=_perturbed_teacher())
    recorder = Recorder()
    pruning = OneShotPruning("magnitude", 0.5, progress=False)
    make_trainer(max_epochs=3, callbacks=[distill, pruning, recorder]).fit(module)  # the same 4 batches each epoch
    first, last = sum(recorder.losses[:4]), sum(recorder.losses[-4:])
    assert first > 0.1 and last < 0.8 * first
    assert get_masks(distill.teacher) == {}
    with pytest.raises(ValueError, match="alpha"):
        make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(alpha=0.5)]).fit(UnlabelledLM(tiny_llama()))


def test_distillation_composes_with_lora_recovery() -> None:
    module = TinyCausalLM(tiny_llama())
    dense = _state(module.model)
    distill = KnowledgeDistillation(alpha=0.0, loss="kl")
    recorder = Recorder()
    callbacks = [OneShotPruning("magnitude", 0.5, progress=False), LoRARecovery(r=2, lr=1e-2), distill, recorder]
    make_trainer(max_steps=6, callbacks=callbacks).fit(module)
    assert all(torch.equal(v, dense[k]) for k, v in distill.teacher.state_dict().items())
    assert len(recorder.losses) == 6 and all(0 < loss < 1 for loss in recorder.losses)  # KL of the pruned LoRA student


def test_resume_distills_from_the_same_dense_teacher(tmp_path: Path) -> None:
    module = TinyCausalLM(tiny_llama())
    dense = _state(module.model)
    first = KnowledgeDistillation(alpha=0.3, temperature=1.5)
    trainer = make_trainer(max_steps=2, callbacks=[GradualPruning(0.5, end_step=1, frequency=1), first])
    trainer.fit(module)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    state = first.state_dict()
    assert state["teacher_taken"] and state["alpha"] == 0.3 and state["temperature"] == 1.5
    fresh = TinyCausalLM(tiny_llama())
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.mul_(0.5)  # a different starting model: the teacher must come from the checkpoint
    second = KnowledgeDistillation(alpha=0.9, temperature=4.0)
    make_trainer(max_steps=3, callbacks=[GradualPruning(0.5, end_step=1, frequency=1), second]).fit(
        fresh, ckpt_path=path
    )
    assert second.alpha == 0.3 and second.temperature == 1.5
    assert all(torch.equal(v, dense[k]) for k, v in second.teacher.state_dict().items())
    round_trip = KnowledgeDistillation()
    round_trip.load_state_dict(copy.deepcopy(state))
    assert round_trip.state_dict()["teacher"].keys() == state["teacher"].keys()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.1}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"loss": "l1"}, "loss"),
        ({"loss": "kl", "layers": [0]}, "layers"),
        ({"teacher": 3}, "teacher"),
        ({"teacher_dtype": "int8"}, "teacher_dtype"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KnowledgeDistillation(**kwargs)


def test_bad_layers_and_student_attr_fail_before_training() -> None:
    with pytest.raises(ValueError, match="layers"):
        make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(loss="mse", layers=[7])]).fit(
            TinyCausalLM(tiny_llama())
        )
    with pytest.raises(ValueError, match="student_attr"):
        make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(student_attr="nothing")]).fit(
            TinyCausalLM(tiny_llama())
        )


def test_a_copy_of_an_already_pruned_model_drops_the_copied_masks_and_leaves_the_students_hooks() -> None:
    from lightning_prune.masking import set_mask
    from lightning_prune.recovery.teacher import frozen_copy

    model = tiny_llama()
    layer = model.model.layers[0].mlp.up_proj
    set_mask(layer, torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    teacher = frozen_copy(model)
    assert get_masks(teacher) == {} and torch.equal(
        teacher.state_dict()["model.layers.0.mlp.up_proj.weight"], layer.weight
    )
    teacher.load_state_dict(model.state_dict())  # no mask hook left on the copy
    with torch.no_grad():
        layer.weight.fill_(1.0)
    model.load_state_dict({"model.layers.0.mlp.up_proj.weight": torch.ones_like(layer.weight)}, strict=False)
    assert torch.equal(
        layer.weight == 0, ~get_masks(model)["model.layers.0.mlp.up_proj.weight"]
    )  # the student's load hook still re-zeroes


def test_llama_gmp_distill_recipe_reaches_70_percent_with_a_dense_teacher(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from lightning_prune.cli import CONFIG_DIR
    from lightning_prune.run import run

    overrides = [
        "recipe=llama_gmp_distill", f"output_dir={tmp_path}", "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu", "tensorboard=false", "plots=false", "dense_epochs=1", "trainer.max_epochs=1",
        "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "data.seq_len=16", "data.vocab_size=300",
        "pruning.frequency=1",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    assert cfg.callbacks.distill.alpha == 0.5 and cfg.pruning.sparsity == 0.7
    results = run(cfg)
    assert results["global_sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert 1.0 < results["after"]["val/ppl"] < float("inf")


def test_a_recipe_with_unknown_distillation_layers_fails_at_preflight_before_the_dense_phase(tmp_path: Path) -> None:
    import json

    from lightning_prune.run import run
    from tests.conftest import compose_config

    cfg = compose_config(
        "llama_gmp_distill",
        tmp_path,
        "callbacks.distill.loss=mse",
        "callbacks.distill.layers=[model.layers.0.mlp.up_prj]",
        "plots=false",
        "data.seq_len=16",
        "data.vocab_size=300",
    )
    with pytest.raises(
        ValueError, match=r"`layers` entry 'model.layers.0.mlp.up_prj'.*Did you mean \['model.layers.0.mlp.up_proj'"
    ):
        run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["failed_phase"] == "preflight"
