"""One writer per index and per feature store: an advisory lock beside the directory.

Every writer of a directory that delf-tf shares between runs (`delf index` into an
index, `delf extract` into a store, local or through Beam's launching process,
`delf fit-pca --format=datum` and `delf export` into their folders) holds
`writer_lock(directory)` for the whole write. The lock is `fcntl.flock(LOCK_EX)` on
`<directory>.lock`, a file BESIDE the directory: an index directory is replaced by
renames (`delf_tf.atomic.staged_directory`), so a lock file inside it would be
swapped away with it. The directory's symbolic links are resolved first, so a
writer through `current -> idx_real` and one through `idx_real` take the same lock.

- The second writer gets `LockedError` (one line naming the lock file and its
  holder's pid) at once, or waits for the lock with wait=True (`--wait_for_lock`).
- The lock is released by the kernel when its holder exits, SIGKILL included: a
  killed writer never leaves a stale lock. The lock file itself stays (removing it
  would let two writers lock two different files of one name); it holds the pid of
  its last holder, for the error message only.
- One process may take the lock of a directory again while it holds it (nested
  writers: the count is kept per process).
- Remote directories (gs://, s3://, ...) cannot be locked with flock: they are
  exempt, and one writer at a time there is the operator's job.
- flock locks are advisory: only delf-tf writers respect them. On NFS, Linux
  emulates flock with POSIX byte-range locks (held by the NFS server).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Iterator

from delf_tf.atomic import is_remote
from delf_tf.errors import DelfError

LOCK_SUFFIX = ".lock"
_held: dict[str, tuple[int, int]] = {}  # lock path -> (file descriptor, nesting count)
_guard = threading.Lock()


class LockedError(DelfError):
    """Another process writes the same index or store (its lock is held)."""


def lock_path(directory: str | os.PathLike) -> str:
    """`<directory>.lock` beside the directory, its symbolic links resolved."""
    resolved = os.path.realpath(os.fspath(directory).rstrip("/") or "/")
    return resolved + LOCK_SUFFIX


def _holder(descriptor: int) -> str:
    try:
        text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


@contextlib.contextmanager
def writer_lock(directory: str | os.PathLike, wait: bool = False) -> Iterator[str | None]:
    """Holds the exclusive writer lock of `directory` (see the module docstring).

    Yields the lock file's path (None for a remote directory, which is not locked).
    Raises LockedError when another process holds the lock and wait is False.
    """
    if is_remote(directory):
        yield None
        return
    path = lock_path(directory)
    with _guard:
        if path in _held:
            descriptor, count = _held[path]
            _held[path] = (descriptor, count + 1)
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            _release(path)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags, 0o666)
    except OSError as error:
        raise LockedError(f"{path}: cannot open the writer lock ({error.strerror})") from error
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if not wait:
                raise LockedError(
                    f"{directory}: another writer holds {path}{_holder(descriptor)}; "
                    "wait for it to finish, or pass --wait_for_lock"
                ) from None
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode("ascii"), 0)
    except BaseException:
        os.close(descriptor)
        raise
    with _guard:
        _held[path] = (descriptor, 1)
    try:
        yield path
    finally:
        _release(path)


def _release(path: str) -> None:
    with _guard:
        descriptor, count = _held[path]
        if count > 1:
            _held[path] = (descriptor, count - 1)
            return
        del _held[path]
    os.close(descriptor)  # releases the flock
