"""Experiments and suites are named TOML files: "default" means <folder>/default.toml."""

from __future__ import annotations

import os
from pathlib import Path


def find_named_toml(name_or_path: str | os.PathLike, folder: Path) -> Path | None:
    """An existing TOML path, or NAME -> folder/NAME.toml; None when NAME is not there.
    A path that looks like a file (.toml or existing) but is not one is FileNotFoundError."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        return path
    candidate = folder / f"{name_or_path}.toml"
    return candidate if candidate.is_file() else None
