"""Replacing an export directory so that its path always holds the old or the new export.

A directory cannot be swapped in one rename, so `replace_directory` goes through a backup beside
it: old → `.<name>.old`, finished temporary → `<name>`, backup removed. A process killed between
the two renames leaves only the backup; `recover_directory` (run by every `save_sparse` and
`load_sparse` before they touch the path) moves it back, removes a backup whose replacement
finished, and removes `.<name>.tmp-*` directories that killed writes left behind. Two processes
writing the same path at once are not supported.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def backup_path(destination: Path) -> Path:
    """Where `replace_directory` parks the old export while the new one is renamed in."""
    return destination.parent / f".{destination.name}.old"


def temporary_prefix(destination: Path) -> str:
    """Name prefix of the temporary directories a write of `destination` builds in."""
    return f".{destination.name}.tmp-"


def recover_directory(destination: Path) -> None:
    """Finish or undo an interrupted replacement of `destination`; drop stale temporary directories."""
    backup = backup_path(destination)
    if backup.is_dir():
        if destination.exists():  # the new export is in place; only the clean-up was cut short
            shutil.rmtree(backup)
        else:  # killed between the two renames: the old export comes back
            os.replace(backup, destination)
    if destination.parent.is_dir():
        for stale in destination.parent.glob(temporary_prefix(destination) + "*"):
            if stale.is_dir():
                shutil.rmtree(stale)


def replace_directory(source: Path, destination: Path) -> None:
    """Move the finished `source` to `destination`, replacing an older export only after success."""
    if not destination.exists():
        os.replace(source, destination)
        return
    backup = backup_path(destination)
    os.replace(destination, backup)
    try:
        os.replace(source, destination)
    except BaseException:
        os.replace(backup, destination)
        raise
    shutil.rmtree(backup)
