"""The run's output directory: created up front (a file in the way is a ValueError naming
`output_dir`), and recognised when it holds an earlier run, whose files a run refused before its first
stage starts leaves as they were (DESIGN.md, "Clear errors, nothing lost")."""

from __future__ import annotations

from pathlib import Path

from lightning_prune.run.resume import CHECKPOINT_DIR

# What every run writes first (config.yaml), last (results.json) and after each stage (checkpoints/).
RUN_FILES = ("config.yaml", "results.json", CHECKPOINT_DIR)


def make_output_dir(out: Path) -> None:
    """Create `out` and its parents; a ValueError naming `output_dir` where it is, or is under, a file
    or cannot be created."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                place = "is" if path == out else f"is under {path}, which is"
                raise ValueError(
                    f"`output_dir`='{out}' {place} a file, not a directory; `output_dir` must be a directory: "
                    "a new path, or an earlier run's directory to resume it"
                )
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"`output_dir`='{out}' cannot be created: {error.strerror} ({error.filename})") from error


def earlier_run(out: Path) -> str | None:
    """The first of an earlier run's files (`RUN_FILES`) that `out` holds, None when it holds none."""
    return next((name for name in RUN_FILES if (out / name).exists()), None)


def note_untouched(error: BaseException, out: Path, found: str) -> None:
    """Say on `error` (a note, shown with its traceback) that the earlier run in `out` was left as it was."""
    error.add_note(
        f"nothing was written into {out}: it holds an earlier run's {found} and this run stopped before its "
        "first stage started"
    )
