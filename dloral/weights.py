"""Finding a weight file on this machine: the one lookup every loader uses (nothing downloads)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def find_weights(
    file: str, candidates: Iterable[tuple[str | os.PathLike | None, str]]
) -> tuple[Path | None, list[str]]:
    """The first existing file among (path, origin) candidates (a folder means folder/file),
    and the "path (origin): not found" lines of those looked at before it, for error messages."""
    looked: list[str] = []
    for candidate, origin in candidates:
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        if path.is_dir():
            path = path / file
        if path.is_file():
            return path, looked
        looked.append(f"{path} ({origin}): not found")
    return None, looked
