"""`lightning-prune`: the Hydra entry point. Composes lightning_prune/conf/ (recipes included) and calls `run(cfg)`.

Configuration mistakes end with one line naming the key and the value and exit code 2 (a key that does
not exist gets Hydra's message, then its group's valid keys and the nearest match);
`HYDRA_FULL_ERROR=1` shows the full traceback instead. In a sweep (`-m`), a failing job is
recorded and the others still run; `sweep_summary.json`/`.md` in the sweep directory list every
job's outcome, and the command exits with 1 naming the failed jobs.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lightning_prune.run import run
from lightning_prune.run.finish import run_summary
from lightning_prune.run.overrides import unknown_key_hints
from lightning_prune.run.sweep import SweepLog

# Exceptions that report a bad configuration (ValueError includes ConfigError and the library's
# argument checks, raised before any training step).
CONFIG_ERRORS = (ValueError, OmegaConfBaseException)
EXIT_BAD_CONFIG = 2
EXIT_SWEEP_FAILED = 1
# An absolute path to the package's own conf/ folder: the source tree's from an editable install, the
# wheel's copy from an installed one; the recipes are its `recipe` group (conf/recipe/).
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
# The jobs of the sweep run by this process (Hydra's basic launcher runs them in it, in order).
SWEEP = SweepLog()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    """Run the composed config; returns the final validation metric (useful for sweepers)."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return sweep_job(cfg)
    try:
        results = run(cfg)
    except CONFIG_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"lightning-prune: error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    print(run_summary(results))
    return final_metric(results)


def final_metric(results: dict[str, Any]) -> float | None:
    """The validation metric after the pruning phase, when it was evaluated."""
    value = results.get("after", {}).get(results["metric"])
    return None if value is None else float(value)


def sweep_job(cfg: DictConfig) -> float | None:
    """One job of a sweep: its failure is printed and recorded in the sweep summary, not raised,
    so the next job runs; `main` exits non-zero at the end when any job failed."""
    hydra_config = HydraConfig.get()
    job = SWEEP.start(
        hydra_config.sweep.dir, hydra_config.job.num, list(hydra_config.overrides.task), str(cfg.get("output_dir"))
    )
    try:
        results = run(cfg)
    except Exception as error:
        if not isinstance(error, CONFIG_ERRORS):
            traceback.print_exc()
        print(f"lightning-prune: job #{job.number} failed: {error}", file=sys.stderr)
        SWEEP.finish(job, error=error)
        return None
    print(run_summary(results))
    value = final_metric(results)
    SWEEP.finish(job, metric=results["metric"], value=value)
    return value


def main() -> None:
    """Console script `lightning-prune`."""
    SWEEP.jobs.clear()  # one sweep per call (tests and notebooks call main() more than once)
    try:
        hydra_main()
    except SystemExit as exit_:
        explain_unknown_keys(exit_)
        raise
    failed = SWEEP.failed()
    if failed:
        names = "; ".join(f"#{job.number} ({' '.join(job.overrides)}): {job.error}" for job in failed)
        print(
            f"lightning-prune: {len(failed)} of {len(SWEEP.jobs)} sweep jobs failed "
            f"(see {SWEEP.summary_path()}): {names}",
            file=sys.stderr,
        )
        sys.exit(EXIT_SWEEP_FAILED)


def explain_unknown_keys(exit_: SystemExit) -> None:
    """After Hydra refused the command line (its message printed, exit 1): for each override naming no key of
    the config, print the valid keys of its group and the nearest match, and exit with `EXIT_BAD_CONFIG`."""
    if exit_.code != 1:
        return
    hints = unknown_key_hints(CONFIG_DIR, sys.argv[1:])
    for hint in hints:
        print(f"lightning-prune: error: {hint}", file=sys.stderr)
    if hints:
        sys.exit(EXIT_BAD_CONFIG)


if __name__ == "__main__":
    main()
