"""Resuming a Lightning checkpoint with a differently configured pruning callback never revives a pruned weight."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_prune import GradualPruning, IterativePruning, KeepMasks, OneShotPruning
from lightning_prune.report import max_nonzeros_per_group
from tests.conftest import TinyRegressor, make_trainer

LAYERS = ("net.0.weight", "net.2.weight")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], float]:
    """A checkpoint of GradualPruning to 80% (12 steps, ramp ends at step 8); its zeros; its sparsity."""
    torch.manual_seed(0)
    module = TinyRegressor()
    pruning = GradualPruning(0.8, end_step=8, frequency=2)
    trainer = make_trainer(max_epochs=3, callbacks=[pruning])
    trainer.fit(module)
    path = tmp_path_factory.mktemp("ckpt") / "gmp80.ckpt"
    trainer.save_checkpoint(path)
    weights = dict(module.named_parameters())
    zeros = {name: weights[name].detach() == 0 for name in LAYERS}
    return path, zeros, pruning.current_sparsity


def resume(path: Path, callback: Callback | None, max_epochs: int = 6) -> tuple[TinyRegressor, list[str]]:
    """Fit a fresh module from `path` with `callback` (more steps than the checkpoint's); the warnings' texts."""
    module = TinyRegressor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_epochs=max_epochs, callbacks=[callback] if callback else []).fit(module, ckpt_path=str(path))
    return module, [str(w.message) for w in caught]


def assert_zeros_kept(module: TinyRegressor, zeros: dict[str, torch.Tensor]) -> None:
    weights = dict(module.named_parameters())
    for name, pruned in zeros.items():
        assert pruned.sum() > 0
        assert torch.equal(weights[name][pruned], torch.zeros(int(pruned.sum()))), name
        assert not torch.signbit(weights[name][pruned]).any()


def sparsity(module: TinyRegressor) -> float:
    weights = dict(module.named_parameters())
    return sum(int((weights[n] == 0).sum()) for n in LAYERS) / sum(weights[n].numel() for n in LAYERS)


def test_a_lower_target_keeps_every_zero_and_says_so_naming_both_configurations(checkpoint) -> None:
    path, zeros, before = checkpoint
    callback = GradualPruning(0.5, end_step=20, frequency=2)
    module, messages = resume(path, callback)
    assert_zeros_kept(module, zeros)
    assert sparsity(module) >= before == pytest.approx(0.8, abs=0.01)
    assert callback.current_sparsity == pytest.approx(sparsity(module))
    [kept] = [w for w in callback.warnings_recorded if w["kind"] == "checkpoint_masks_kept"]
    assert "GradualPruning{'sparsity': 0.5" in kept["message"] and "GradualPruning{'sparsity': 0.8" in kept["message"]
    assert "the stricter of the two wins" in kept["message"]
    assert kept["checkpoint"] == ["GradualPruning{'sparsity': 0.8, 'pattern': None, 'targets': 'None'}"]
    assert any(kept["message"] == m for m in messages)
    # The schedule continued from the checkpoint's step, not from 0: no "fit ended before the schedule did".
    assert callback.step == 24
    assert not any("ended before the schedule" in m for m in messages)
    assert [w["kind"] for w in callback.warnings_recorded] == ["checkpoint_masks_kept"]


def test_a_stricter_target_prunes_further_on_top_of_the_checkpoint(checkpoint) -> None:
    path, zeros, before = checkpoint
    callback = GradualPruning(0.9, end_step=20, frequency=2)
    module, _ = resume(path, callback)
    assert_zeros_kept(module, zeros)
    assert callback.current_sparsity == pytest.approx(0.9, abs=0.01) and sparsity(module) > before


def test_another_pattern_keeps_the_zeros_and_enforces_its_pattern(checkpoint) -> None:
    path, zeros, before = checkpoint
    callback = GradualPruning(0.5, pattern="2:4", end_step=20, frequency=2)
    module, _ = resume(path, callback)
    assert_zeros_kept(module, zeros)
    assert sparsity(module) >= before
    for name in LAYERS:
        assert max_nonzeros_per_group(dict(module.named_parameters())[name].detach(), 4) <= 2


def test_other_targets_keep_and_save_the_masks_they_do_not_prune(checkpoint, tmp_path: Path) -> None:
    path, zeros, _ = checkpoint
    callback = GradualPruning(0.5, targets="net.2", end_step=20, frequency=2)
    module, _ = resume(path, callback)
    assert_zeros_kept(module, zeros)
    assert [t.name for t in callback.targets] == ["net.2.weight"]
    # The kept mask of net.0 (outside the targets) is in this callback's state: a second resume keeps it too.
    assert set(callback.state_dict()["masks"]) == set(LAYERS)
    second = GradualPruning(0.5, targets="net.2", end_step=20, frequency=2)
    trainer = make_trainer(max_epochs=6, callbacks=[second])
    trainer.fit(TinyRegressor(), ckpt_path=str(path))
    trainer.save_checkpoint(tmp_path / "second.ckpt")
    again = GradualPruning(0.5, targets="net.2", end_step=20, frequency=2)
    third, _ = resume(tmp_path / "second.ckpt", again, max_epochs=8)
    assert_zeros_kept(third, zeros)
    assert again.warnings_recorded == []  # its own state this time
    assert set(again.state_dict()["masks"]) == set(LAYERS)  # and it still carries net.0's mask on


def test_iterative_pruning_keeps_a_gradual_checkpoints_zeros(checkpoint) -> None:
    path, zeros, before = checkpoint
    callback = IterativePruning(0.6, cycles=2, epochs_per_cycle=1)
    module, _ = resume(path, callback)
    assert_zeros_kept(module, zeros)
    assert sparsity(module) >= before
    assert [w["kind"] for w in callback.warnings_recorded] == ["checkpoint_masks_kept"]


def test_a_one_shot_callback_is_refused_naming_both_configurations(checkpoint) -> None:
    path, _, _ = checkpoint
    module = TinyRegressor()
    weights = {name: p.detach().clone() for name, p in module.named_parameters()}
    callback = OneShotPruning("magnitude", 0.5, progress=False)
    trainer = make_trainer(max_epochs=6, callbacks=[callback])
    with pytest.raises(ValueError, match=r"OneShotPruning\{'sparsity': 0.5.*GradualPruning\{'sparsity': 0.8.*reviving"):
        trainer.fit(module, ckpt_path=str(path))
    assert callback.masks() == {} and callback.warnings_recorded == []
    assert set(weights) == {name for name, _ in module.named_parameters()}


def test_the_same_configuration_restores_silently(checkpoint) -> None:
    path, zeros, before = checkpoint
    callback = GradualPruning(0.8, end_step=8, frequency=2)
    module, messages = resume(path, callback)
    assert_zeros_kept(module, zeros)
    assert callback.warnings_recorded == [] and not any("another pruning configuration" in m for m in messages)
    assert callback.current_sparsity == pytest.approx(before)


def test_without_a_pruning_callback_lightning_revives_the_zeros_and_keep_masks_keeps_them(checkpoint, tmp_path) -> None:
    path, zeros, before = checkpoint
    revived, _ = resume(path, None)  # nothing of ours runs: Lightning trains every weight
    assert sparsity(revived) < 0.1
    keep = KeepMasks()
    module, messages = resume(path, keep)
    assert_zeros_kept(module, zeros)
    assert sparsity(module) == pytest.approx(before)
    assert not any("KeepMasks found no masks" in m for m in messages)
    # Its own checkpoint keeps them too, and a pruning callback resuming that checkpoint without KeepMasks as well.
    trainer = make_trainer(max_epochs=6, callbacks=[KeepMasks()])
    trainer.fit(TinyRegressor(), ckpt_path=str(path))
    trainer.save_checkpoint(tmp_path / "kept.ckpt")
    again, _ = resume(tmp_path / "kept.ckpt", KeepMasks(), max_epochs=8)
    assert_zeros_kept(again, zeros)
    gradual = GradualPruning(0.5, end_step=40, frequency=2)
    pruned, _ = resume(tmp_path / "kept.ckpt", gradual, max_epochs=8)
    assert_zeros_kept(pruned, zeros)
    assert gradual.warnings_recorded[0]["checkpoint"] == ["KeepMasks"]


def test_keep_masks_on_an_unpruned_model_warns() -> None:
    with pytest.warns(UserWarning, match="KeepMasks found no masks on the model nor in the checkpoint"):
        make_trainer(max_epochs=1, callbacks=[KeepMasks()]).fit(TinyRegressor())
