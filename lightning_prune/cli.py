"""`lightning-prune`: the Hydra entry point. Composes conf/ + recipes/ and calls `run(cfg)`.

Configuration mistakes end with one line naming the key and the value and exit code 2;
`HYDRA_FULL_ERROR=1` shows the full traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lightning_prune.run import run

# Exceptions that report a bad configuration (ValueError includes ConfigError and the library's
# argument checks, raised before any training step).
CONFIG_ERRORS = (ValueError, OmegaConfBaseException)
EXIT_BAD_CONFIG = 2
# An absolute path: the same folder from an editable install (a link to the repository's conf/)
# and from a wheel (the files copied in); recipes/ is the `recipe` group inside it.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    """Run the composed config; returns the final validation metric (useful for sweepers)."""
    try:
        results = run(cfg)
    except CONFIG_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"lightning-prune: error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    after = results.get("after", {})
    return after.get(results["metric"])


def main() -> None:
    """Console script `lightning-prune`."""
    hydra_main()


if __name__ == "__main__":
    main()
