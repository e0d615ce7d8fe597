"""The export manifest: what was written (format, layout) and a size + sha256 per file.

A checkpoint directory is verified file by file before any tensor is read, so a truncated or
modified file is reported by name instead of being loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lightning_prune.export.config import FORMATS, MANIFEST_NAME, MANIFEST_VERSION

_CHUNK = 1 << 20
# Every key `save_sparse` writes, with the JSON type `load_sparse` relies on.
_FIELDS: dict[str, type] = {
    "files": dict,
    "format": str,
    "huggingface": bool,
    "model_class": str,
    "sparsity_config": dict,
    "target_params": list,
    "layout": dict,
    "aliases": dict,
}


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, content: dict[str, Any]) -> None:
    """Hash every file under `directory` and write the manifest beside them."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    manifest = {"manifest_version": MANIFEST_VERSION, **content, "files": files}
    with open(directory / MANIFEST_NAME, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def check_manifest(manifest: Any, path: Path) -> None:
    """Raise a ValueError naming the first field of a damaged manifest (wrong type, missing, unknown value)."""
    if not isinstance(manifest, dict):
        raise ValueError(
            f"{path} holds a JSON {type(manifest).__name__}, not an object: not a save_sparse manifest (damaged?)"
        )
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path} has manifest_version {manifest.get('manifest_version')!r}; this version reads {MANIFEST_VERSION}"
        )
    for key, kind in _FIELDS.items():
        if not isinstance(manifest.get(key), kind):
            found = "missing" if key not in manifest else f"a {type(manifest[key]).__name__}"
            raise ValueError(f"{path} is damaged: `{key}` must be a JSON {kind.__name__}, found {found}")
    if manifest["format"] not in FORMATS:
        raise ValueError(f"{path} is damaged: `format` must be one of {FORMATS}, found {manifest['format']!r}")
    for name, entry in manifest["files"].items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("bytes"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise ValueError(
                f"{path} is damaged: `files`[{name!r}] must hold `bytes` (int) and `sha256` (str), found {entry!r}"
            )


def read_manifest(directory: Path) -> dict[str, Any]:
    """Load the manifest and check every listed file's presence, size and sha256.

    Raises:
        ValueError: naming the directory when the manifest is missing or unreadable, or the
            first file that is missing, truncated or modified.
    """
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"`path`={str(directory)!r} has no {MANIFEST_NAME}: not a directory written by save_sparse")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON (truncated or modified?): {error}") from error
    check_manifest(manifest, path)
    for name, expected in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise ValueError(f"{name!r} listed in {MANIFEST_NAME} is missing from {directory}")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise ValueError(
                f"{name!r} in {directory} is truncated or modified: {size} bytes, expected {expected['bytes']}"
            )
        if sha256_of(file) != expected["sha256"]:
            raise ValueError(f"{name!r} in {directory} was modified: its sha256 does not match {MANIFEST_NAME}")
    return manifest
