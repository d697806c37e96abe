"""Atomic writes: files that others read appear whole or not at all (temp file + rename); and
the lock one writer holds on a folder.

mkstemp/mkdtemp create 0600 files and 0700 folders; what is renamed into place gets the mode a
plain open()/mkdir would give it under the process umask (0644/0755 under umask 022), so shared
folders stay readable to the users the umask lets in.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """The process umask, read from /proc/self/status where Linux shows it (no change of the
    process state); elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temp file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        # after the write: some writers (safetensors) make their own 0600 file at tmp
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, data, **kwargs) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, **kwargs))


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path` to fill; when the block ends without error it replaces
    `path` whole (an older `path` is removed first). On error nothing of it is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class FolderBusy(OSError):
    """Another process holds the folder's lock."""


@contextmanager
def folder_lock(path: str | os.PathLike) -> Iterator[None]:
    """One writer at a time in `path`: an flock on the folder itself (no lock file to leave
    behind), released by the kernel whichever way the process ends; FolderBusy if held."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise FolderBusy(f"{path}: another process holds this folder's lock") from err
        yield
    finally:
        os.close(fd)  # releases the lock
