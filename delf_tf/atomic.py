"""Atomic writes: a file or a directory appears whole or not at all.

The one place for the rules every writer of delf-tf follows:

- A file is written to a temporary file beside it, flushed, fsynced and renamed
  over the target; then the folder is fsynced. A crash (SIGKILL included) at any
  step leaves the previous file or the new one, never a partial one.
- A directory is built in a staging folder beside it (`staged_directory`), its
  files fsynced, then swapped in by two renames (old -> backup, staging -> final).
  At every instant a complete directory exists at the final path or at its backup
  name, and `recover_staged_directory` (called by every reader and writer before it
  looks at the directory) renames the backup back after a crash between the two.
- Names of temporaries: `.<name>.<host>-<pid>-<random>` + `.delf-tmp` (files),
  `.delf-staging` (directories being built) or `.delf-backup` (the previous
  directory during a swap). No file that delf-tf keeps ends in these suffixes, so
  temporaries never mix with data (an image `.x.jpg` has its features in
  `.x.jpg.npz`). `<name>` is shortened (with a hash) so every temporary name fits
  in NAME_MAX, even for a target whose own name is 255 bytes long.
- Leftovers of a killed writer are removed by the next writer into the same
  folder (`clean_stale`): those of a dead process of this host, and those of
  another host (a shared file system) older than STALE_FOREIGN_SECONDS. A running
  writer's temporaries are left alone.
- Permissions are those of a plain open() / mkdir(): files 0666 and directories
  0777 less the umask (mkstemp / mkdtemp would make them private, 0600 / 0700,
  unreadable for the other users of a shared store); a replaced file keeps its mode.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from absl import logging

TEMP_SUFFIX = ".delf-tmp"
STAGING_SUFFIX = ".delf-staging"
BACKUP_SUFFIX = ".delf-backup"
SUFFIXES = (TEMP_SUFFIX, STAGING_SUFFIX, BACKUP_SUFFIX)
DEFAULT_NAME_MAX = 255
# Bytes a temporary name adds to the (shortened) target name: the two dots, host tag,
# pid, random token, suffix; with room to spare.
_OVERHEAD = 48
# Another host's leftovers cannot be checked for a live process: removed after a day.
STALE_FOREIGN_SECONDS = 24 * 3600
# A directory swap takes microseconds: another host's backup this old is a crash's.
_FOREIGN_SWAP_SECONDS = 60
# Waiting for a running writer of this host to finish its swap (its second rename).
_SWAP_WAIT_SECONDS = 5.0
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:6]
_TEMPORARY = re.compile(
    r"\.(?P<stem>.*)\.(?P<host>[0-9a-f]{6})-(?P<pid>[0-9]{1,10})-(?P<token>[0-9a-f]{8})"
    r"(?P<suffix>\.delf-(?:tmp|staging|backup))",
    re.DOTALL,
)
# `atomic_write` scans its folder for leftovers when the folder changed since this
# process last wrote into it; a large folder (a store folder of many files, written
# by several processes at once) at most once per CLEAN_INTERVAL_SECONDS.
CLEAN_INTERVAL_SECONDS = 60.0
_SMALL_FOLDER_BYTES = 64 * 1024  # st_size of a folder of about a thousand entries
# Temporaries of delf-tf before this naming (mkstemp / mkdtemp, no pid): reported, not
# removed, as nothing tells whether their writer still runs.
_LEGACY = re.compile(r"\..+\.[a-z0-9_]{8}\.(?:tmp|staging|export)", re.DOTALL)
_cleaned: dict[str, float] = {}  # folder -> time of the last scan (time.monotonic)
_written: dict[str, int] = {}  # folder -> its st_mtime_ns after this process's last write
_name_max: dict[str, int] = {}


# --- names --------------------------------------------------------------------------------


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name (bytes) the file system of `folder` allows (NAME_MAX)."""
    key = os.path.abspath(folder)
    if key not in _name_max:
        try:
            _name_max[key] = int(os.pathconf(key, "PC_NAME_MAX"))
        except (OSError, ValueError):
            return DEFAULT_NAME_MAX
    return _name_max[key]


def fitted_name(name: str, limit: int) -> str:
    """`name` when it has at most `limit` bytes (file-system encoding), else its first
    bytes + "~" + 32 hex digits of its SHA-256: deterministic, unique in practice."""
    raw = os.fsencode(name)
    if len(raw) <= limit:
        return name
    prefix = os.fsdecode(raw[: max(limit - 33, 0)])
    while prefix and "\udc80" <= prefix[-1] <= "\udcff":  # a character cut in two
        prefix = prefix[:-1]
    return f"{prefix}~{hashlib.sha256(raw).hexdigest()[:32]}"


def _temporary_name(name: str, suffix: str, folder: Path) -> str:
    stem = fitted_name(name, name_max(folder) - _OVERHEAD)
    return f".{stem}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def is_temporary(name: str) -> bool:
    """Whether `name` is a temporary file or folder of this module."""
    return name.endswith(SUFFIXES) and _TEMPORARY.fullmatch(name) is not None


# --- stale leftovers --------------------------------------------------------------------


def _owner_alive(host: str, pid: int) -> bool | None:
    """Whether the writer (host, pid) runs; None when it cannot be known (another host)."""
    if host != _HOST or os.name != "posix":  # (on Windows, os.kill(pid, 0) would kill it)
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, OSError):
        return False
    return True


def _is_stale(path: Path, match: re.Match, foreign_seconds: float, use_ctime: bool = False) -> bool:
    alive = _owner_alive(match["host"], int(match["pid"]))
    if alive is not None:
        return not alive
    try:
        status = path.lstat()
    except FileNotFoundError:
        return False
    changed = status.st_ctime if use_ctime else status.st_mtime
    return time.time() - changed > foreign_seconds


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError as error:
        logging.warning("%s: cannot remove a stale temporary (%s)", path, error)
        return False
    return True


def clean_stale(folder: str | os.PathLike, when_changed: bool = False) -> list[Path]:
    """Removes the temporary files and staging folders of killed writers in `folder`.

    Not recursive; backups of a directory swap are left to `recover_staged_directory`,
    which knows their directory. when_changed: skip the scan when the folder has not
    changed since this process last wrote into it, or when it is large and was
    scanned less than CLEAN_INTERVAL_SECONDS ago. Returns what was removed.
    """
    folder = Path(folder)
    key = os.path.abspath(folder)
    now = time.monotonic()
    if when_changed and key in _cleaned:
        try:
            status = os.stat(folder)
        except OSError:
            return []
        if status.st_mtime_ns == _written.get(key):
            return []
        recent = now - _cleaned[key] < CLEAN_INTERVAL_SECONDS
        if recent and status.st_size > _SMALL_FOLDER_BYTES:
            return []
    _cleaned[key] = now
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except OSError:
        return []
    return _remove_stale(folder, names)


def _remove_stale(folder: Path, names: list[str]) -> list[Path]:
    """Removes those of `names` (entries of `folder`) that are stale temporaries."""
    removed, legacy = [], []
    for name in names:
        if not name.endswith((TEMP_SUFFIX, STAGING_SUFFIX)):
            if name.startswith(".") and _LEGACY.fullmatch(name):
                legacy.append(name)
            continue
        match = _TEMPORARY.fullmatch(name)
        path = folder / name
        if match and _is_stale(path, match, STALE_FOREIGN_SECONDS) and _remove(path):
            removed.append(path)
    if removed:
        logging.info("%s: removed %d leftover(s) of killed writers", folder, len(removed))
    if legacy:
        logging.warning(
            "%s: %d temporary file(s)/folder(s) of an older delf-tf, left by killed runs "
            "(e.g. %r); remove them by hand once no older delf-tf writes here",
            folder,
            len(legacy),
            legacy[0],
        )
    return removed


def clean_stale_tree(root: str | os.PathLike) -> list[Path]:
    """`clean_stale` in `root` and every folder below it (symbolic links not followed),
    in one walk of the tree."""
    removed = []
    now = time.monotonic()
    for folder, subfolders, files in os.walk(root):
        gone = _remove_stale(Path(folder), subfolders + files)
        _cleaned[os.path.abspath(folder)] = now
        removed += gone
        names = {path.name for path in gone}
        subfolders[:] = [name for name in subfolders if name not in names]
    return removed


def _fsync_path(path: str | os.PathLike, flags: int = 0) -> None:
    """fsync of a file or folder by its path; a no-op where it cannot be opened or synced."""
    try:
        descriptor = os.open(path, os.O_RDONLY | flags)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def fsync_directory(folder: str | os.PathLike) -> None:
    """Makes the folder's entries (a rename into it) durable; a no-op where unsupported."""
    _fsync_path(folder, getattr(os, "O_DIRECTORY", 0))


def atomic_write(
    path: str | os.PathLike, write: Callable[[BinaryIO], None], exclusive: bool = False
) -> None:
    """Calls `write(handle)` on a temporary file beside `path`, then renames it over `path`.

    A crash or exception leaves any previous `path` untouched and no partial file;
    the temporary file of a killed process is removed by the next writer.
    exclusive: create `path` only if it does not exist (FileExistsError otherwise),
    whole or not at all: the complete temporary file is hard-linked to `path`
    (link() fails on an existing name, as open(O_CREAT | O_EXCL) does); on a file
    system without hard links, `path` is created with O_EXCL and the bytes copied.
    Of two processes creating one path at once, exactly one succeeds.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale(folder, when_changed=True)
    try:
        kept_mode = os.stat(path).st_mode & 0o7777
    except OSError:
        kept_mode = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    while True:
        temporary = folder / _temporary_name(path.name, TEMP_SUFFIX, folder)
        try:
            descriptor = os.open(temporary, flags, 0o666)  # less the umask, as open() does
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if kept_mode is not None:
                os.fchmod(handle.fileno(), kept_mode)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            _link_exclusive(temporary, path)
            os.unlink(temporary)
        else:
            os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_directory(folder)
    with contextlib.suppress(OSError):
        _written[os.path.abspath(folder)] = os.stat(folder).st_mtime_ns


def _link_exclusive(temporary: Path, path: Path) -> None:
    """Creates `path` with the content of `temporary`; FileExistsError if it exists."""
    try:
        os.link(temporary, path)
        return
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    descriptor = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(temporary.read_bytes())
        handle.flush()
        os.fsync(handle.fileno())


def is_remote(path: str | os.PathLike) -> bool:
    """A path of a TensorFlow file system other than the local disk (gs://, s3://, ram://)."""
    return "://" in os.fspath(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, exclusive: bool = False) -> None:
    """Writes `data` at a local path (`atomic_write`) or a remote one (`is_remote`).

    A remote file is one tf.io.gfile object upload, which becomes visible only when
    complete (GCS): whole or not at all as well. TensorFlow is imported only then.
    exclusive (local paths only; a remote store is not locked either, see
    delf_tf.locks): FileExistsError when `path` exists, see `atomic_write`.
    """
    if not is_remote(path):
        atomic_write(path, lambda handle: handle.write(data), exclusive=exclusive)
        return
    import tensorflow as tf

    path = os.fspath(path)
    tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
    with tf.io.gfile.GFile(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, exclusive: bool = False) -> None:
    """`atomic_write_bytes` of UTF-8 text (local or remote)."""
    atomic_write_bytes(path, text.encode("utf-8"), exclusive=exclusive)


# --- directories ------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    """fsync of every file and folder under `root` (what a swap makes visible)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(folder, name))
        fsync_directory(folder)


def _backups(final: Path) -> list[tuple[Path, re.Match]]:
    """The swap backups of `final` in its folder."""
    stem = fitted_name(final.name, name_max(final.parent) - _OVERHEAD)
    found = []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return []
    for entry in entries:
        if entry.name.endswith(BACKUP_SUFFIX):
            match = _TEMPORARY.fullmatch(entry.name)
            if match and match["stem"] == stem:
                found.append((Path(entry.path), match))
    return found


def link_target(final: str | os.PathLike) -> Path:
    """`final`, or where it points when it is a symbolic link (chains resolved): a
    directory swap replaces the link's target, never the link itself."""
    final = Path(final)
    return Path(os.path.realpath(final)) if final.is_symlink() else final


def recover_staged_directory(final: str | os.PathLike) -> None:
    """Repairs the state a crash during a swap of `final` (see `staged_directory`) left.

    Call it before looking at `final` at all (whether it exists, what it holds):
    - `final` missing and a killed writer's backup present: a crash between the two
      renames; the backup (the previous, complete directory) is renamed back. A
      running writer of this host in that window is waited for (a few seconds).
    - `final` present and a killed writer's backup too: a crash after the swap,
      before the backup was removed; the backup is removed.
    A symbolic link `final` stands for its target (see `link_target`).
    """
    final = link_target(final)
    backups = _backups(final)
    if not backups:
        return
    deadline = time.monotonic() + _SWAP_WAIT_SECONDS
    while True:
        present = os.path.lexists(final)
        foreign_seconds = STALE_FOREIGN_SECONDS if present else _FOREIGN_SWAP_SECONDS
        stale = [path for path, match in backups if _is_stale(path, match, foreign_seconds, True)]
        if present:
            for path in stale:
                _remove(path)
            return
        if stale:
            break
        if time.monotonic() > deadline:
            logging.warning("%s: missing, and a running writer's backup stays: %s", final, backups)
            return
        time.sleep(0.01)
        backups = _backups(final)
    newest = max(stale, key=lambda path: path.lstat().st_mtime)
    try:
        os.rename(newest, final)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another process was quicker
            return recover_staged_directory(final)
        raise
    fsync_directory(final.parent)
    logging.warning(
        "%s: restored the previous version (a writer was killed while replacing it)", final
    )
    for path in stale:
        if path != newest:
            _remove(path)


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yields an empty staging folder beside `final`; on success it becomes `final`.

    If `final` exists it is replaced only after the new content is complete (and
    fsynced): the old directory is renamed to a backup name, the new one renamed in,
    then the backup removed, so at every instant a complete directory exists at
    `final` or at its backup (`recover_staged_directory` restores it). With
    replace=False an existing `final` raises FileExistsError instead (before and
    after the content is made). On an exception the staging folder is removed and
    `final` is left as it was. When `final` is a symbolic link (`current -> idx_v2`),
    its target is replaced, atomically as above, and the link stays as it is.
    """
    final = link_target(final)
    folder = final.parent
    folder.mkdir(parents=True, exist_ok=True)
    recover_staged_directory(final)
    clean_stale(folder)  # one folder scan per directory written: cheap
    if not replace and os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, "exists", str(final))
    while True:
        staging = folder / _temporary_name(final.name, STAGING_SUFFIX, folder)
        try:
            os.mkdir(staging, 0o777)  # less the umask, as mkdir() does
            break
        except FileExistsError:
            continue
    try:
        yield staging
        _fsync_tree(staging)
        if os.path.lexists(final):
            if not replace:
                raise FileExistsError(errno.EEXIST, "exists", str(final))
            backup = folder / _temporary_name(final.name, BACKUP_SUFFIX, folder)
            os.rename(final, backup)
            try:
                os.rename(staging, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rename(backup, final)
                raise
            fsync_directory(folder)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(staging, final)
            fsync_directory(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def scratch_directory(beside: str | os.PathLike) -> Path:
    """A new empty private folder next to `beside` (same file system, so that its files
    can be hard-linked into a `staged_directory` of `beside`), named as a staging folder:
    when its process dies, the next writer into that folder removes it (`clean_stale`).
    The caller removes it when done."""
    final = link_target(beside)
    folder = final.parent
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale(folder)
    while True:
        scratch = folder / _temporary_name(final.name + ".scratch", STAGING_SUFFIX, folder)
        try:
            os.mkdir(scratch, 0o777)
            return scratch
        except FileExistsError:
            continue


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Publishes the complete file `source` as the new file `target` inside a
    `staged_directory` folder: a hard link (no bytes copied) where the file system
    allows, else a copy. Never over an existing file."""
    try:
        os.link(source, target)
        return
    except OSError as error:
        if error.errno not in (
            errno.EPERM,
            errno.ENOTSUP,
            errno.EOPNOTSUPP,
            errno.EMLINK,
            errno.EXDEV,
        ):
            raise
    with open(source, "rb") as handle:
        write_staged(target, lambda out: shutil.copyfileobj(handle, out, 1 << 24))


def write_staged(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Calls `write(handle)` on a new file `path` inside a `staged_directory` folder.

    No temporary and no rename: the folder is the unit that appears whole (its swap
    publishes every file at once, after `staged_directory` fsynced them), so a file
    inside it needs neither. O_EXCL: never over an existing file or a link.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    descriptor = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(descriptor, "wb") as handle:
        write(handle)
