"""KnowledgeDistillation together with every pruning callback, under AMP, and its preflight errors."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_prune import (
    GradualPruning,
    IterativePruning,
    KnowledgeDistillation,
    LoRARecovery,
    OneShotPruning,
    StructuredPruning,
    get_masks,
)
from lightning_prune.recovery import kd_kl_loss
from tests.conftest import TinyCausalLM, TinyRegressor, make_trainer, perturbed, tiny_llama


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(teacher: torch.nn.Module | None, dense: dict[str, torch.Tensor]) -> bool:
    assert teacher is not None
    state = teacher.state_dict()
    return state.keys() == dense.keys() and all(torch.equal(v, dense[k]) for k, v in state.items())


class StepRecorder(pl.Callback):
    """What every training step returned, and the optimizers' parameters as training started."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.optimized: set[int] = set()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.optimized = {
            id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]
        }

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


class TeacherDtypes(pl.Callback):
    """The dtype of the teacher's logits in every step (a forward hook on its `lm_head`)."""

    def __init__(self, distill: KnowledgeDistillation) -> None:
        self.distill, self.dtypes = distill, []  # type: ignore[var-annotated]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.distill.teacher is not None
        self.distill.teacher.lm_head.register_forward_hook(
            lambda module, args, output: self.dtypes.append(output.dtype)
        )


def _masks_exact(model: torch.nn.Module) -> None:
    for name, mask in get_masks(model).items():
        weight = model.get_parameter(name)
        assert torch.all(weight[~mask] == 0) and not torch.signbit(weight[~mask]).any(), name


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_bf16_autocast_runs_the_teacher_under_the_students_autocast_and_keeps_masks_exact(precision: str) -> None:
    module = TinyCausalLM(tiny_llama())
    dense = _state(module.model)
    distill = KnowledgeDistillation(alpha=0.5, temperature=2.0)
    dtypes, recorder = TeacherDtypes(distill), StepRecorder()
    pruning = GradualPruning(0.5, start_step=0, end_step=2, frequency=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(max_steps=4, precision=precision, callbacks=[pruning, distill, dtypes, recorder])
    if precision == "16-mixed":  # Lightning 2.6 on CPU: fp16 AMP is not supported, bf16 AMP is used instead
        assert any("bf16-mixed" in str(w.message) for w in caught)
    assert trainer.precision == "bf16-mixed"
    trainer.fit(module)
    assert len(recorder.losses) == 4 and all(torch.isfinite(torch.tensor(recorder.losses)))
    assert dtypes.dtypes == [torch.bfloat16] * 4  # the teacher's Linear ran under CPU bf16 autocast
    assert _equal(distill.teacher, dense) and next(distill.teacher.parameters()).dtype == torch.float32
    _masks_exact(module.model)
    assert pruning.current_sparsity == pytest.approx(0.5, abs=0.01)


def test_iterative_pruning_with_rewind_keeps_the_dense_teacher_across_cycles() -> None:
    module = TinyCausalLM(tiny_llama())
    dense = _state(module.model)
    distill = KnowledgeDistillation(alpha=0.5)
    pruning = IterativePruning(0.75, cycles=2, epochs_per_cycle=1, rewind="init")
    make_trainer(max_epochs=3, callbacks=[pruning, distill]).fit(module)
    assert pruning.cycles_done == 2 and pruning.current_sparsity == pytest.approx(0.75, abs=0.01)
    assert _equal(distill.teacher, dense)  # neither rewound nor pruned nor trained
    assert get_masks(distill.teacher) == {}
    _masks_exact(module.model)


def test_oneshot_and_lora_distill_from_the_model_before_oneshot_and_only_adapters_train() -> None:
    module = TinyCausalLM(tiny_llama())
    dense = _state(module.model)
    distill = KnowledgeDistillation(alpha=0.0, loss="cosine", layers=[0])  # hidden states through LoRA layers
    recorder = StepRecorder()
    callbacks = [OneShotPruning("magnitude", 0.5, progress=False), LoRARecovery(r=2, lr=1e-2), distill, recorder]
    make_trainer(max_steps=4, callbacks=callbacks).fit(module)
    assert _equal(distill.teacher, dense)
    assert recorder.optimized and not recorder.optimized & {id(p) for p in distill.teacher.parameters()}
    assert len(recorder.losses) == 4 and recorder.losses[0] > 0  # the one-shot student differs from the teacher


def test_the_teacher_is_outside_the_module_and_its_optimizer_and_never_updated() -> None:
    module = TinyCausalLM(tiny_llama())
    dense = _state(module.model)
    distill, recorder = KnowledgeDistillation(alpha=0.5), StepRecorder()
    make_trainer(max_steps=3, callbacks=[distill, recorder]).fit(module)
    teacher = distill.teacher
    assert teacher is not None and _equal(teacher, dense)
    assert not module.state_dict().keys() - {f"model.{k}" for k in dense}  # only the student's keys
    assert not recorder.optimized & {id(p) for p in teacher.parameters()}
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not torch.equal(module.model.lm_head.weight, dense["lm_head.weight"])  # the student trained


def test_structured_pruning_then_a_compacted_student_distills_logits_and_refuses_changed_widths() -> None:
    module = TinyCausalLM(tiny_llama(num_hidden_layers=2))
    dense = _state(module.model)
    distill = KnowledgeDistillation(alpha=0.5)
    structured = StructuredPruning(mlp_sparsity=0.5, method="magnitude", num_samples=4, compact_on_end=True)
    make_trainer(max_steps=2, callbacks=[structured, distill]).fit(module)
    assert module.model.config.intermediate_size == 32 and _equal(distill.teacher, dense)
    recorder = StepRecorder()  # the same callback (its dense teacher) on the smaller model: logits still match
    make_trainer(max_steps=2, callbacks=[distill, recorder]).fit(module)
    assert len(recorder.losses) == 2 and all(loss > 0 for loss in recorder.losses)
    assert _equal(distill.teacher, dense)
    narrower = KnowledgeDistillation(loss="mse", layers=["model.layers.0.mlp.up_proj"], teacher=distill.teacher)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*32.*64"):
        make_trainer(max_steps=1, callbacks=[narrower]).fit(module)
    same_width = KnowledgeDistillation(
        loss="cosine", layers=[0, 1], teacher=distill.teacher
    )  # block outputs keep hidden_size
    make_trainer(max_steps=1, callbacks=[same_width]).fit(module)


class ForwardLM(TinyCausalLM):
    """With a `forward`: block influence (drop_layers) runs the LightningModule itself."""

    def forward(self, batch: torch.Tensor) -> Any:
        return self.model(input_ids=batch)


def test_dropped_blocks_refuse_block_layers_but_distill_logits() -> None:
    module = ForwardLM(tiny_llama(num_hidden_layers=3))
    teacher = tiny_llama(num_hidden_layers=3)
    make_trainer(max_steps=1, callbacks=[StructuredPruning(drop_layers=1, num_samples=4, compact_on_end=True)]).fit(
        module
    )
    assert module.model.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match=r"`layers`.*2 blocks in `model.layers`.*`teacher` 3 blocks"):
        make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(loss="mse", layers=[-1], teacher=teacher)]).fit(
            module
        )
    recorder = StepRecorder()
    make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(loss="kl", teacher=teacher), recorder]).fit(module)
    assert len(recorder.losses) == 1


def test_a_lightning_module_without_a_model_attribute_is_its_own_student() -> None:
    module = TinyRegressor()
    dense = _state(module)
    distill, recorder = KnowledgeDistillation(alpha=0.0, loss="mse"), StepRecorder()
    make_trainer(
        max_steps=3, callbacks=[GradualPruning(0.5, start_step=0, end_step=1, frequency=1), distill, recorder]
    ).fit(module)
    assert _equal(distill.teacher, dense) and get_masks(distill.teacher) == {}
    assert recorder.losses[0] == 0.0 and recorder.losses[-1] > 0  # equal at first, apart once pruned


class SideStep(TinyCausalLM):
    """A training step that runs only the inner decoder, never `self.model` itself."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model.model(input_ids=batch).last_hidden_state.pow(2).mean()


def test_a_training_step_that_skips_the_student_is_named() -> None:
    with pytest.raises(ValueError, match=r"did not call the student LlamaForCausalLM.*student_attr"):
        make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(alpha=0.5)]).fit(SideStep(tiny_llama()))


def test_unknown_layers_fail_at_preflight_with_the_valid_names_before_oneshot_prunes() -> None:
    module = TinyCausalLM(tiny_llama())
    distill = KnowledgeDistillation(loss="mse", layers=["model.layers.0.mlp.up_prj"])
    with pytest.raises(ValueError, match=r"`layers`.*'model\.layers\.0\.mlp\.up_prj'.*model\.layers\.0\.mlp\.up_proj"):
        distill.preflight(module)
    oneshot = OneShotPruning("magnitude", 0.5, progress=False)
    with pytest.raises(ValueError, match="up_prj"):
        make_trainer(max_steps=1, callbacks=[oneshot, distill]).fit(module)
    assert get_masks(module.model) == {}  # refused before OneShotPruning acted


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True])
def test_alpha_outside_0_1_is_refused(alpha: float) -> None:
    with pytest.raises(ValueError, match="`alpha`"):
        KnowledgeDistillation(alpha=alpha)


def test_kd_loss_on_a_pruned_student_matches_the_hand_computed_loss() -> None:
    module = TinyCausalLM(tiny_llama())
    teacher = perturbed(tiny_llama())
    make_trainer(max_epochs=0, callbacks=[OneShotPruning("magnitude", 0.5, progress=False)]).fit(module)
    batch = module.tokens[:2]
    with torch.no_grad():
        expected = kd_kl_loss(module.model(input_ids=batch).logits, teacher(input_ids=batch).logits, temperature=2.0)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.0)  # type: ignore[method-assign]
    recorder = StepRecorder()
    make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(alpha=0.0, teacher=teacher), recorder]).fit(module)
    assert float(expected) > 0.01 and recorder.losses[0] == pytest.approx(float(expected), rel=1e-5)


class ManualLM(TinyCausalLM):
    """Manual optimization: Lightning ignores what training_step returns."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.automatic_optimization = False

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.manual_backward(loss)
        self.optimizers().step()  # type: ignore[union-attr]
        return loss


def test_manual_optimization_is_refused_since_the_distillation_loss_would_be_ignored() -> None:
    with pytest.raises(ValueError, match="manual optimization"):
        make_trainer(max_steps=1, callbacks=[KnowledgeDistillation(alpha=0.5)]).fit(ManualLM(tiny_llama()))
