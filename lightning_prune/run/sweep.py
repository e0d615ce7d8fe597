"""The record of a sweep (`lightning-prune -m ...`): every job's overrides, output and outcome,
rewritten into `sweep_summary.json` and `sweep_summary.md` in the sweep directory after each job."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lightning_prune.run.outputs import write_text


@dataclass
class SweepJob:
    """One job of a sweep and how it ended (`status`: running, completed or failed)."""

    number: int
    overrides: list[str]
    output_dir: str
    status: str = "running"
    metric: str | None = None
    value: float | None = None
    error: str | None = None


@dataclass
class SweepLog:
    """The jobs of one sweep, in the order they ran."""

    directory: Path | None = None
    jobs: list[SweepJob] = field(default_factory=list)

    def start(self, directory: str, number: int, overrides: list[str], output_dir: str) -> SweepJob:
        """Record that job `number` starts (written at once: a killed sweep still says where it was)."""
        self.directory = Path(directory)
        job = SweepJob(number, overrides, output_dir)
        self.jobs.append(job)
        self.write()
        return job

    def finish(
        self, job: SweepJob, metric: str | None = None, value: float | None = None, error: BaseException | None = None
    ) -> None:
        """Record `job`'s outcome: its final metric, or the error that ended it."""
        job.status = "failed" if error is not None else "completed"
        job.metric, job.value = metric, value
        job.error = f"{type(error).__name__}: {error}" if error is not None else None
        self.write()

    def failed(self) -> list[SweepJob]:
        """Jobs that ended in an error."""
        return [job for job in self.jobs if job.status == "failed"]

    def summary_path(self) -> Path:
        """`sweep_summary.json` in the sweep directory."""
        if self.directory is None:
            raise ValueError("no sweep job has started: the sweep directory is unknown")
        return self.directory / "sweep_summary.json"

    def write(self) -> None:
        """`sweep_summary.json` (every job's fields) and `sweep_summary.md` (a table)."""
        path = self.summary_path()
        payload = {"jobs": [asdict(job) for job in self.jobs], "failed": [job.number for job in self.failed()]}
        write_text(path, json.dumps(payload, indent=2) + "\n")
        lines = ["| job | overrides | status | metric | output / error |", "|---:|---|---|---:|---|"]
        for job in self.jobs:
            shown = "" if job.value is None else f"{job.metric} = {job.value:.4f}"
            outcome = (job.error or job.output_dir).replace("\n", " ").replace("|", "\\|")
            lines.append(f"| {job.number} | `{' '.join(job.overrides)}` | {job.status} | {shown} | {outcome} |")
        write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
