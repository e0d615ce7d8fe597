"""The run's output directory: a run refused before its first stage starts leaves an earlier run's
directory byte for byte as it was (API and command line), and an `output_dir` that cannot be a
directory is a ValueError naming it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lightning_prune import cli
from lightning_prune.run import ConfigError, run
from tests.conftest import QUIET_RUN, compose_config

TINY = [
    "dense_epochs=1",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "stage_checkpoints=last",
]


def snapshot(out: Path) -> dict[str, bytes]:
    """{path relative to `out`: bytes} of every file under `out`."""
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A finished tiny quickstart run (plots and model included) and its files."""
    out = tmp_path_factory.mktemp("finished")
    results = run(compose_config("quickstart", out, *TINY))
    assert results["status"] == "completed" and results["global_sparsity"] == pytest.approx(0.9, abs=1e-3)
    files = snapshot(out)
    expected = {"config.yaml", "results.json", "history.csv", "sparsity_report.md", "checkpoints/stage-1-prune.ckpt"}
    assert expected <= set(files) and any(name.startswith("plots/") for name in files)
    return out, files


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["resume=true", "seed=1"], ConfigError, r"`resume`=True: `data.seed`=1 differs from the interrupted run.s 0"),
        (["pruning.targets=[nomatch]"], ValueError, "nomatch"),
        # A pruning callback configured differently from the checkpoint's (or none at all) is refused.
        (["resume=true", "pruning.sparsity=0.5"], ConfigError, r"`pruning.sparsity`=0.5 differs from .*s 0.9 \("),
        (["resume=true", "pruning=none"], ConfigError, r"`resume`=True: `pruning(\.\w+)?`=.* differs from"),
    ],
    ids=["resume-refused", "preflight-refused", "resume-other-pruning", "resume-no-pruning"],
)
def test_a_run_refused_before_it_starts_leaves_the_earlier_run_byte_identical(
    finished: tuple[Path, dict[str, bytes]], overrides: list[str], error: type[Exception], match: str
) -> None:
    out, files = finished
    with pytest.raises(error, match=match) as raised:
        run(compose_config("quickstart", out, *TINY, *overrides))
    after = snapshot(out)
    assert list(after) == list(files)
    assert after == files
    assert json.loads(after["results.json"])["status"] == "completed"
    assert raised.value.__notes__ == [
        f"nothing was written into {out}: it holds an earlier run's config.yaml and this run stopped before its "
        "first stage started"
    ]


def test_the_command_line_refusing_a_resume_exits_2_and_leaves_the_run_byte_identical(
    finished: tuple[Path, dict[str, bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, files = finished
    monkeypatch.chdir(tmp_path)  # Hydra's own run directory (.hydra/, the log) goes here
    arguments = ["recipe=quickstart", f"output_dir={out}", *QUIET_RUN, *TINY, "resume=true", "seed=1"]
    monkeypatch.setattr(sys, "argv", ["lightning-prune", *arguments])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == cli.EXIT_BAD_CONFIG
    assert "`resume`=True: `data.seed`=1 differs" in capsys.readouterr().err
    assert snapshot(out) == files


def test_a_refused_run_in_a_new_directory_still_records_its_failure(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nomatch") as raised:
        run(compose_config("quickstart", tmp_path, *TINY, "pruning.targets=[nomatch]"))
    assert not hasattr(raised.value, "__notes__")
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["status"], results["failed_phase"]) == ("failed", "preflight")
    assert (tmp_path / "config.yaml").is_file()


@pytest.mark.parametrize("under", [True, False], ids=["under-a-file", "is-a-file"])
def test_output_dir_that_is_or_is_under_a_file_names_output_dir(tmp_path: Path, under: bool) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file\n")
    out = blocker / "run" if under else blocker
    place = f"is under {blocker}, which is" if under else "is"
    message = f"`output_dir`='{out}' {place} a file, not a directory"
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")) as raised:
        run(compose_config("quickstart", out, *TINY))
    assert str(raised.value) == (
        f"{message}; `output_dir` must be a directory: a new path, or an earlier run's directory to resume it"
    )
    assert blocker.read_text() == "a file\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_export_path_from_the_config_is_named_by_its_key(tmp_path: Path) -> None:
    blocker = tmp_path / "export-here"
    blocker.write_text("a file\n")
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as raised:
        run(compose_config("quickstart", out, *TINY, "export=dense", f"export.dirpath={blocker}"))
    assert str(raised.value) == (
        f"`export.dirpath`='{blocker}' (lightning_prune.SparseExport): `dirpath`='{blocker}' is an existing file, "
        "not a directory"
    )
    results = json.loads((out / "results.json").read_text())
    assert (results["failed_phase"], results["error"]["type"]) == ("preflight", "ConfigError")
    assert blocker.read_text() == "a file\n"
