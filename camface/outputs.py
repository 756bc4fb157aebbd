"""Checks on output paths (recordings, graphs, JSON), run before any slow work starts."""

from __future__ import annotations

import os
from pathlib import Path

from camface.errors import OutputError


def check_output_file(path: str | Path, overwrite: bool = False) -> Path:
    """Return `path` if it can be written, else raise OutputError naming it: its folder must
    exist, be a folder and be writable; the path must not be a folder; an existing file is
    replaced only with `overwrite`."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"cannot write {path}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: folder {folder} does not exist")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"cannot write {path}: permission denied")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; pass --overwrite to replace it")
    return path
