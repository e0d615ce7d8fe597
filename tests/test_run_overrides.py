"""A command-line key that does not exist: Hydra's message, then the group's valid keys and the nearest match."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_prune import cli
from lightning_prune.run.overrides import unknown_key_hint, unknown_key_hints

GMP_KEYS = (
    "sparsity, initial_sparsity, start_step, end_step, frequency, schedule, criterion, scope, pattern, targets, "
    "ignore, finalize_on_end, structure, compact_on_end"
)


@pytest.mark.parametrize(
    ("arguments", "hydra_says", "hint"),
    [
        (
            ["pruning.sparsty=0.5"],
            "Key 'sparsty' is not in struct",
            f"`pruning.sparsty` is not a key of `pruning` (lightning_prune.GradualPruning); valid keys: {GMP_KEYS}; "
            "did you mean `pruning.sparsity`?",
        ),
        (
            ["dense_epoch=1"],
            "Key 'dense_epoch' is not in struct",
            "`dense_epoch` is not a top-level key; valid keys: model, data, trainer, pruning, lora, export,",
        ),
        (["dense_epoch=1"], "Could not override 'dense_epoch'", "; did you mean `dense_epochs`?"),
        (
            ["pruning=wanda", "pruning.num_sample=8"],
            "Key 'num_sample' is not in struct",
            "`pruning.num_sample` is not a key of `pruning` (lightning_prune.OneShotPruning); valid keys: method, "
            "sparsity, pattern, calibration, num_samples,",
        ),
    ],
    ids=["group-key", "top-level-key", "top-level-nearest", "key-of-a-chosen-group"],
)
def test_a_typo_in_a_key_gets_hydras_error_the_valid_keys_and_the_nearest(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    hydra_says: str,
    hint: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-prune", *arguments, "trainer.accelerator=cpu"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == cli.EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert hydra_says in err
    assert hint in err.split("lightning-prune: error: ", 1)[1]
    assert not (tmp_path / "outputs").exists()  # refused before any run started


def test_an_argument_missing_from_the_yaml_is_suggested_with_a_plus() -> None:
    cfg = OmegaConf.create({"pruning": {"_target_": "lightning_prune.GradualPruning", "sparsity": 0.5}})
    hint = unknown_key_hint(cfg, "pruning.frequncy")
    assert hint is not None and hint.startswith(
        "`pruning.frequncy` is not a key of `pruning` (lightning_prune.GradualPruning); valid keys: sparsity "
        "(and, added with `+pruning.NAME=value`, initial_sparsity, start_step, end_step, frequency,"
    )
    assert hint.endswith("; did you mean `+pruning.frequency`?")


def test_existing_keys_and_group_choices_get_no_hint() -> None:
    assert unknown_key_hints(cli.CONFIG_DIR, ["pruning=wanda", "pruning.num_samples=8", "+x=1", "dense_epochs=2"]) == []
    assert unknown_key_hints(cli.CONFIG_DIR, ["stages.1.trainer.max_epochs=1", "-m"]) == [
        "`stages.1.trainer.max_epochs` is not a key of `stages.1`; valid keys: name, use, evaluate, evaluate_start"
    ]


def test_an_unknown_group_choice_beside_a_key_gets_hydras_message_and_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # `recipe=nope output_dir=...`: the hint's own compose met the missing recipe again and raised a traceback.
    assert unknown_key_hints(cli.CONFIG_DIR, ["recipe=nope", f"output_dir={tmp_path}"]) == []
    monkeypatch.setattr(sys, "argv", ["lightning-prune", "recipe=nope", f"output_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Could not find 'recipe/nope'" in err and "Traceback" not in err
