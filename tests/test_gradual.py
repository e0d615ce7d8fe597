"""GradualPruning: exact sparsity on schedule, logging, argument errors, 2:4 on a Llama, bitwise resume."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_prune import GradualPruning, finalize, get_masks
from lightning_prune.report import max_nonzeros_per_group
from lightning_prune.selection import prune_count
from lightning_prune.targets import find_targets
from tests.conftest import ResumableLoader, TinyCausalLM, TinyRegressor, make_trainer, tiny_llama

SIZES = (8 * 32, 32 * 32)  # the two targeted weights of TinyRegressor (its last layer is the head)


def zero_fractions(sparsity: float) -> list[float]:
    return [prune_count(n, sparsity) / n for n in SIZES]


def test_reaches_exact_sparsity_on_schedule_and_logs_it(tmp_path: Path) -> None:
    module = TinyRegressor()
    pruning = GradualPruning(0.75, start_step=2, end_step=8, frequency=3, schedule="linear")
    logger = CSVLogger(tmp_path, name="run", version=0)
    make_trainer(max_steps=10, callbacks=[pruning], logger=logger, log_every_n_steps=1).fit(module)
    # Updates at steps 2, 5, 8 (linear: 0, 0.375, 0.75); the forward sees the pruned weights.
    expected = [zero_fractions(0.0)] * 5 + [zero_fractions(0.375)] * 3 + [zero_fractions(0.75)] * 2
    assert module.zeros_seen == expected
    assert pruning.current_sparsity == (prune_count(256, 0.75) + prune_count(1024, 0.75)) / 1280
    assert pruning.layer_sparsity == {"net.0.weight": 0.75, "net.2.weight": 0.75}
    assert module.net[4].weight.ne(0).all()  # the output head stays dense
    assert module.net[0].weight.eq(0).float().mean() == 0.75  # still exact after the last optimizer step
    metrics = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert {"prune/sparsity", "prune/layer/net.0.weight", "prune/layer/net.2.weight"} <= set(header)
    column = header.index("prune/sparsity")
    logged = [float(row.split(",")[column]) for row in metrics[1:] if row.split(",")[column]]
    assert logged[0] == 0.0 and logged[-1] == 0.75 and len(logged) == 10


def test_callback_metrics_hold_the_sparsity() -> None:
    pruning = GradualPruning(0.5, end_step=2, frequency=1)
    trainer = make_trainer(max_steps=4, callbacks=[pruning])
    trainer.fit(TinyRegressor())
    assert float(trainer.callback_metrics["prune/sparsity"]) == 0.5


def test_end_step_none_is_the_trainers_last_step() -> None:
    module = TinyRegressor()
    pruning = GradualPruning(0.5, frequency=100, schedule="cubic")
    make_trainer(max_epochs=3, callbacks=[pruning]).fit(module)  # 3 × 4 batches
    assert pruning.resolved_end_step == 11
    # Updates only at step 0 (sparsity 0) and at the end step 11.
    assert module.zeros_seen == [zero_fractions(0.0)] * 11 + [zero_fractions(0.5)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sparsity=1.0), r"`sparsity` must be a number in \[0, 1\), got 1.0"),
        (dict(sparsity=0.5, initial_sparsity=0.7), r"`initial_sparsity` \(0.7\) must not exceed `sparsity` \(0.5\)"),
        (dict(sparsity=0.5, start_step=-2), r"`start_step` must be an integer >= 0, got -2"),
        (
            dict(sparsity=0.5, start_step=4, end_step=4),
            r"`end_step` must be None or an integer > `start_step` \(4\), got 4",
        ),
        (dict(sparsity=0.5, frequency=0), r"`frequency` must be an integer >= 1, got 0"),
        (dict(sparsity=0.5, schedule="steps"), r"`schedule` must be one of .*got 'steps'"),
        (dict(sparsity=0.5, criterion="l1"), r"`criterion` must be one of .*got 'l1'"),
        (dict(sparsity=0.5, scope="tensor"), r"`scope` must be one of .*got 'tensor'"),
        (dict(sparsity=0.6, pattern="2:4"), r"`sparsity` must be 0.5 for `pattern`='2:4'.*got 0.6"),
        (dict(sparsity=0.5, pattern="4:4"), r"`pattern` needs 0 < N < M, got '4:4'"),
        (dict(sparsity=0.5, initial_sparsity=0.1, criterion="taylor"), r"`criterion`='taylor' .*start_step=0"),
        (dict(sparsity=0.5, targets="["), r"`targets` has an invalid regular expression"),
    ],
)
def test_invalid_arguments_raise_before_training(kwargs: dict, match: str) -> None:
    module = TinyRegressor()
    with pytest.raises(ValueError, match=match):
        make_trainer(max_steps=2, callbacks=[GradualPruning(**kwargs)]).fit(module)
    assert module.training_steps == 0


def test_end_step_none_needs_a_finite_trainer() -> None:
    module = TinyRegressor()
    trainer = make_trainer(max_epochs=-1, max_steps=-1, callbacks=[GradualPruning(0.5)])
    with pytest.raises(
        ValueError, match=r"`end_step`=None ends the ramp at the Trainer's last step.*trains without end"
    ):
        trainer.fit(module)
    assert module.training_steps == 0


def test_targets_that_match_nothing_raise_before_training() -> None:
    module = TinyRegressor()
    with pytest.raises(ValueError, match=r"no prunable weights matched `targets`='attn'.*net.0"):
        make_trainer(max_steps=2, callbacks=[GradualPruning(0.5, targets="attn")]).fit(module)
    assert module.training_steps == 0


def test_pattern_that_does_not_divide_a_layer_raises_before_training() -> None:
    module = TinyRegressor()
    module.net[0] = torch.nn.Linear(6, 32)  # 6 inputs: no 2:4 groups
    module.inputs = torch.randn(32, 6)
    pruning = GradualPruning(0.5, pattern="2:4", start_step=3, end_step=5, frequency=1)
    with pytest.raises(ValueError, match=r"`pattern`='2:4' needs .* divide by 4, got 6 for 'net.0.weight'"):
        make_trainer(max_steps=6, callbacks=[pruning]).fit(module)
    assert module.training_steps == 0


def test_2_4_on_a_tiny_llama_is_exact_and_finalizes_to_plain_keys() -> None:
    model = tiny_llama()
    pruning = GradualPruning(0.5, pattern="2:4", start_step=1, end_step=3, frequency=1, finalize_on_end=True)
    make_trainer(max_steps=6, callbacks=[pruning]).fit(TinyCausalLM(model))
    targets = find_targets(model)
    assert len(targets) == 7  # q, k, v, o, gate, up, down
    for target in targets:
        matrix = target.as_matrix(target.weight.detach())
        groups = (matrix != 0).reshape(matrix.shape[0], -1, 4).sum(-1)
        assert groups.eq(2).all(), target.name  # exactly 2 of every 4
        assert max_nonzeros_per_group(matrix, 4) == 2
        assert not torch.signbit(matrix[matrix == 0]).any()
    assert get_masks(model) == {}
    tiny_llama().load_state_dict(model.state_dict(), strict=True)


def run_regressor(max_epochs: int, ckpt_path: str | None = None, save_to: Path | None = None):
    module = TinyRegressor()
    pruning = GradualPruning(0.75, start_step=0, end_step=12, frequency=4, criterion="taylor")
    trainer = make_trainer(max_epochs=max_epochs, callbacks=[pruning])
    trainer.fit(module, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module, pruning, trainer


def test_resume_mid_schedule_is_bitwise_equal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    straight, straight_cb, _ = run_regressor(max_epochs=4)  # 16 steps; updates at 0, 4, 8, 12
    checkpoint = tmp_path / "mid.ckpt"
    run_regressor(max_epochs=2, save_to=checkpoint)  # stops at step 8, between two updates
    resumed, resumed_cb, trainer = run_regressor(max_epochs=4, ckpt_path=str(checkpoint))
    assert trainer.global_step == 16
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight_cb.masks().keys() == resumed_cb.masks().keys()
    assert all(torch.equal(straight_cb.masks()[k], resumed_cb.masks()[k]) for k in straight_cb.masks())
    assert resumed_cb.current_sparsity == straight_cb.current_sparsity > 0.7
    assert resumed_cb.last_update_step == straight_cb.last_update_step == 12
    assert resumed.zeros_seen == straight.zeros_seen[8:]  # the forward saw the same masks after resume


@pytest.mark.parametrize("end_step", [12, None])
def test_resume_mid_epoch_with_a_resumable_loader_is_bitwise_equal(tmp_path: Path, end_step: int | None) -> None:
    """From a checkpoint inside an epoch the resumed fit trains on the straight fit's batches; with `end_step`=None
    the schedule's length used to be read in `on_fit_start`, which set up the train loader before Lightning
    restored its state, so the epoch restarted from its first batch (Lightning 2.6, #20550)."""

    def fit(ckpt: str | None, root: Path) -> tuple[TinyRegressor, GradualPruning]:
        module = TinyRegressor()  # 4 batches per epoch
        pruning = GradualPruning(0.75, start_step=0, end_step=end_step, frequency=3)
        saver = ModelCheckpoint(dirpath=root, save_top_k=-1, filename="{step}", every_n_train_steps=6)
        trainer = make_trainer(max_epochs=4, callbacks=[pruning, saver], enable_checkpointing=True)
        trainer.fit(module, ResumableLoader(module.train_dataloader()), ckpt_path=ckpt)
        return module, pruning

    straight, straight_cb = fit(None, tmp_path / "a")
    resumed, resumed_cb = fit(str(tmp_path / "a" / "step=6.ckpt"), tmp_path / "b")  # 2 batches into epoch 1
    assert resumed.zeros_seen == straight.zeros_seen[6:] and resumed_cb.current_sparsity == straight_cb.current_sparsity
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    for name, mask in straight_cb.masks().items():
        assert torch.equal(resumed_cb.masks()[name], mask), name


def test_finalize_after_fit_loads_strict_into_the_plain_module() -> None:
    module = TinyRegressor()
    make_trainer(max_steps=3, callbacks=[GradualPruning(0.5, end_step=2, frequency=1)]).fit(module)
    finalize(module)
    fresh = TinyRegressor(seed=1)
    fresh.load_state_dict(module.state_dict(), strict=True)
    assert fresh.net[0].weight.eq(0).float().mean() == 0.5


class TwoOptimizers(TinyRegressor):
    """Manual optimization with two optimizers: each batch moves `global_step` by 2."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        first, second = self.optimizers()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self):
        head = list(self.net[2].parameters()) + list(self.net[4].parameters())
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.01), torch.optim.SGD(head, lr=0.01)]


@pytest.mark.parametrize("length", [dict(max_epochs=2), dict(max_steps=16)])
def test_schedule_reaches_its_target_when_two_optimizers_step_per_batch(length: dict) -> None:
    module = TwoOptimizers()
    pruning = GradualPruning(0.8, frequency=2, schedule="linear")
    make_trainer(callbacks=[pruning], **length).fit(module)  # 8 batches either way, global_step ends at 16
    assert pruning.resolved_end_step == 7 and pruning.step == 8 and pruning.global_steps_per_step == 2
    assert pruning.current_sparsity == (prune_count(256, 0.8) + prune_count(1024, 0.8)) / 1280
    assert module.zeros_seen[-1] == zero_fractions(0.8)
    assert pruning.warnings_recorded == []


@pytest.mark.parametrize(
    ("kwargs", "achieved"),
    [(dict(start_step=2, end_step=20), 0.8 * 7 / 18), (dict(start_step=12, end_step=20), 0.0)],
)
def test_a_schedule_past_the_end_of_training_warns_before_and_after(kwargs: dict, achieved: float) -> None:
    pruning = GradualPruning(0.8, frequency=1, schedule="linear", **kwargs)
    with pytest.warns(UserWarning) as caught:
        make_trainer(max_steps=10, callbacks=[pruning]).fit(TinyRegressor())
    messages = [str(w.message) for w in caught if "GradualPruning" in str(w.message)]
    assert "cannot finish" in messages[0] and "estimated 10 optimizer steps" in messages[0]
    assert f"ended at sparsity {pruning.current_sparsity:.4f}, below its target 0.8" in messages[1]
    kinds = [(w["kind"], w["target"]) for w in pruning.warnings_recorded]
    assert kinds == [("schedule_too_long", 0.8), ("sparsity_shortfall", 0.8)]
    assert pruning.warnings_recorded[1]["achieved"] == pytest.approx(achieved, abs=2e-3)


class PoolerUnused(TinyRegressor):
    """`net.2` (a middle layer) is skipped by the forward: it never gets a gradient, like BERT's pooler."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net[4](torch.relu(self.net[0](inputs)))


@pytest.mark.parametrize("criterion", ["taylor", "fisher"])
def test_gradient_criterion_names_targets_without_gradients_before_any_pruning(criterion: str) -> None:
    module = PoolerUnused()
    pruning = GradualPruning(0.5, start_step=3, end_step=6, frequency=1, criterion=criterion)
    with pytest.raises(
        ValueError,
        match=rf"`criterion`='{criterion}' .* \['net.2.weight'\] got no gradient in the first training step"
        r".*ignore=\['net.2'\]",
    ):
        make_trainer(max_steps=8, callbacks=[pruning]).fit(module)
    assert module.training_steps == 1 and module.net[0].weight.ne(0).all()  # stopped after one step, nothing pruned
    ignored = GradualPruning(0.5, start_step=3, end_step=6, frequency=1, criterion=criterion, ignore="net.2")
    make_trainer(max_steps=8, callbacks=[ignored]).fit(PoolerUnused())
    assert ignored.current_sparsity == pytest.approx(0.5, abs=1e-3)


def test_preflight_refuses_unmatched_targets_and_unfit_patterns_without_a_trainer() -> None:
    module = TinyRegressor()
    with pytest.raises(ValueError, match=r"no prunable weights matched `targets`='nomatch'"):
        GradualPruning(0.5, targets="nomatch").preflight(module)
    with pytest.raises(
        ValueError, match=r"`pattern`='2:8' needs every target's input dimension to divide by 8, got 12 for '0.weight'"
    ):
        GradualPruning(0.75, pattern="2:8", targets="0").preflight(
            torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Linear(8, 2))
        )
    GradualPruning(0.5).preflight(module)
