"""The run pipeline behind `lightning-prune`: `run(cfg)`, its checks and its outputs."""

from lightning_prune.run.checks import ConfigError
from lightning_prune.run.pipeline import run

__all__ = ["ConfigError", "run"]
