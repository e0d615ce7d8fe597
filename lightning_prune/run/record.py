"""What a run records besides its metrics: the phase it is in, how it failed or was interrupted, and
every warning.

`results.json` is written even when a phase fails (which phase, the error) or is interrupted (Ctrl-C,
SIGTERM: which phase, how to resume), and lists in `warnings`
what the callbacks recorded (`callback.warnings_recorded`: dicts `{"kind", "message"}`) and the
Python warnings that lightning_prune raised during the run — a result that differs from what was
asked is said in a warning and kept in the results, never only printed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

import lightning_prune

PACKAGE_DIR = str(Path(lightning_prune.__file__).resolve().parent)
# Final sparsity within this of the target counts as reached (exact rounding per layer is finer).
SPARSITY_TOLERANCE = 1e-3


def is_ours(warning: warnings.WarningMessage) -> bool:
    """A warning raised from lightning_prune's code, or of a warning class it defines."""
    return str(Path(warning.filename).resolve()).startswith(PACKAGE_DIR) or warning.category.__module__.startswith(
        "lightning_prune"
    )


class RunRecord:
    """The run's mutable record: current phase, results dict, captured warnings.

    `capture()` wraps the phases: Python warnings are recorded while they run and re-emitted when
    they end, so the user still sees each one where it would have appeared.
    """

    def __init__(self, results: dict[str, Any]) -> None:
        self.results = results
        self.phase = "setup"
        self.caught: list[warnings.WarningMessage] = []
        self.carried: list[dict[str, str]] = []  # warnings of the finished stages (restored on resume)
        self.compactions: dict[int, dict[str, Any]] = {}  # stage index -> what its compaction removed
        self._stage_start = 0  # index into `caught` where the current stage's Python warnings begin

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record Python warnings raised inside the block, then re-emit every one of them."""
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                self.caught = caught
                yield
        finally:
            for item in self.caught:
                warnings.warn_explicit(item.message, item.category, item.filename, item.lineno, source=item.source)

    def close_stage(self, callbacks: Iterable[Any]) -> list[dict[str, str]]:
        """A stage finished: its warnings join `carried` (so a resumed run lists them in the same order)."""
        self.carried = self.collect_warnings(callbacks)
        self._stage_start = len(self.caught)
        return self.carried

    def collect_warnings(self, callbacks: Iterable[Any]) -> list[dict[str, str]]:
        """The finished stages' warnings, then the current stage's callbacks' `warnings_recorded` and
        lightning_prune's Python warnings since it started, each message once."""
        recorded: list[dict[str, str]] = list(self.carried)
        for callback in callbacks:
            for item in getattr(callback, "warnings_recorded", []):
                entry = item if isinstance(item, dict) else {"message": str(item)}
                recorded.append(
                    {
                        "kind": str(entry.get("kind", "warning")),
                        "message": str(entry.get("message", "")),
                        "source": type(callback).__name__,
                    }
                )
        for item in self.caught[self._stage_start :]:
            if is_ours(item):
                recorded.append({"kind": item.category.__name__, "message": str(item.message), "source": "python"})
        seen: set[str] = set()
        unique = []
        for entry in recorded:
            if entry["message"] not in seen:
                seen.add(entry["message"])
                unique.append(entry)
        self.results["warnings"] = unique
        return unique

    def fail(self, error: BaseException) -> None:
        """Mark the results failed in the current phase, with the error's type and message."""
        self.results["status"] = "failed"
        self.results["failed_phase"] = self.phase
        self.results["error"] = {"type": type(error).__name__, "message": str(error)}

    def interrupt(self, error: BaseException, resume: str | None) -> None:
        """Mark the results interrupted in the current phase by `error` (KeyboardInterrupt, or the
        SystemExit Lightning ends its graceful shutdown with), with `resume`, the overrides that
        continue the run (None when no stage checkpoint exists)."""
        self.results["status"] = "interrupted"
        self.results["interrupted_phase"] = self.phase
        self.results["interrupted_by"] = interruption_cause(error)
        if resume is not None:
            self.results["resume"] = resume


def interruption_cause(error: BaseException) -> str:
    """What interrupted the run: "KeyboardInterrupt" (also when Lightning turned it into SystemExit),
    "SIGTERM" (Lightning's SIGTERMException) or the exception's type."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, KeyboardInterrupt):
            return "KeyboardInterrupt"
        if isinstance(cause, SIGTERMException):
            return "SIGTERM"
        cause = cause.__cause__ or cause.__context__
    return type(error).__name__


def target_sparsity(callbacks: Iterable[Any]) -> float | None:
    """The final weight sparsity the pruning-phase callbacks were asked for (the first one that has
    one); structured callbacks, whose sparsity counts whole units, compare no zero fraction."""
    for callback in callbacks:
        if getattr(callback, "prunes_units", False):
            continue
        value = getattr(callback, "sparsity", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def check_final_sparsity(target: float | None, achieved: float, key: str = "pruning.sparsity") -> dict[str, str] | None:
    """A warning (raised and returned for the record) when `achieved` is not `target`."""
    if target is None or abs(achieved - target) <= SPARSITY_TOLERANCE:
        return None
    relation = "below" if achieved < target else "above"
    message = (
        f"final sparsity {achieved:.4f} is {relation} the target `{key}`={target} "
        "(the pruning phase ended before its schedule did, or a layer was left out)"
    )
    warnings.warn(message, UserWarning, stacklevel=2)
    return {"kind": f"sparsity_{relation}_target", "message": message, "source": "run"}
