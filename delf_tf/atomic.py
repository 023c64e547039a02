"""Atomic writes: a file or a directory appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Calls `write(handle)` on a temporary file beside `path`, then renames it over `path`.

    A crash or exception leaves any previous `path` untouched and no partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory beside `final`; on success it becomes `final`.

    If `final` exists it is replaced only after the new content is complete: the
    old directory is moved aside, the new one renamed in, then the old removed,
    so at every instant a complete directory exists at `final` or at its backup
    `<final>.old` (see `recover_staged_directory`). On an exception the staging
    directory is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".staging", dir=final.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = final.with_name(final.name + ".old")
    if backup.exists():
        shutil.rmtree(backup)
    if final.exists():
        os.replace(final, backup)
    os.replace(staging, final)
    shutil.rmtree(backup, ignore_errors=True)


def recover_staged_directory(final: str | os.PathLike) -> None:
    """Restores `<final>.old` when a crash happened between the two renames above."""
    final = Path(final)
    backup = final.with_name(final.name + ".old")
    if not final.exists() and backup.exists():
        os.replace(backup, final)
