"""The atomic-write layer: permissions, long names, stale leftovers, directory swaps."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from delf_tf.atomic import (
    atomic_write,
    atomic_write_text,
    recover_staged_directory,
    staged_directory,
)
from delf_tf.extraction.pca import fit_pca
from delf_tf.features import FeatureStore, LocalFeatures
from delf_tf.retrieval import Index

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = (".delf-tmp", ".delf-staging", ".delf-backup")


def features(count: int = 5, dim: int = 8, seed: int = 0) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    descriptors = rng.normal(size=(count, dim)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return LocalFeatures(
        rng.uniform(0, 64, (count, 2)), np.ones(count), np.ones(count), descriptors
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders of the atomic layer anywhere under `root`."""
    return sorted(p.name for p in root.rglob("*") if p.name.endswith(SUFFIXES))


def run_python(code: str, cwd: Path, **variables: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", **variables)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_files_and_folders_follow_the_umask(tmp_path, umask):
    """Defect 6: features were 0600 and index folders 0700 (mkstemp/mkdtemp defaults)."""
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    previous = os.umask(umask)
    try:
        store = FeatureStore.open_or_create(tmp_path / "store", "f" * 64, {"descriptor_dim": 8})
        store.save("sub/a.jpg", features())
        store.save("b.jpg", features(seed=1))
        index = Index.from_store(store, progress=False)
        index.save(tmp_path / "index")
        fit_pca(np.random.default_rng(0).normal(size=(50, 8)), 4).save(tmp_path / "pca.npz")
        with staged_directory(tmp_path / "staged") as staging:
            (staging / "x").write_bytes(b"x")
        atomic_write_text(tmp_path / "note.txt", "hello")
    finally:
        os.umask(previous)
    files = [
        tmp_path / "store" / "manifest.json",
        tmp_path / "store" / "b.jpg.npz",
        tmp_path / "store" / "sub" / "a.jpg.npz",
        tmp_path / "pca.npz",
        tmp_path / "note.txt",
        *sorted((tmp_path / "index").iterdir()),
    ]
    folders = [tmp_path / "store", tmp_path / "store" / "sub", tmp_path / "index"]
    folders.append(tmp_path / "staged")
    assert {str(p): oct(mode(p)) for p in files} == {str(p): oct(file_mode) for p in files}
    assert {str(p): oct(mode(p)) for p in folders} == {str(p): oct(folder_mode) for p in folders}


def test_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "kept.txt"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o640


def test_longest_legal_name_is_written(tmp_path):
    """Defect 2 (atomic layer): the temporary file of a 255-byte name must fit NAME_MAX."""
    for name in ("n" * 255, "é" * 127 + "x"):  # 255 bytes in UTF-8 both
        assert len(os.fsencode(name)) == 255
        atomic_write_text(tmp_path / name, "data")
        assert (tmp_path / name).read_text() == "data"
    with staged_directory(tmp_path / ("d" * 255)) as staging:
        (staging / "x").write_text("1")
    assert (tmp_path / ("d" * 255) / "x").read_text() == "1"
    assert leftovers(tmp_path) == []


KILLED_WRITERS = """
    import os, signal
    from pathlib import Path
    from delf_tf.atomic import atomic_write, staged_directory

    def die(handle):
        handle.write(b"partial")
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    what = os.environ["WHAT"]
    if what == "file":
        atomic_write(Path("data") / "a.bin", die)
    else:
        with staged_directory(Path("data") / "folder") as staging:
            (staging / "half").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
"""


def kill_a_writer(cwd: Path, what: str) -> None:
    result = run_python(KILLED_WRITERS, cwd, WHAT=what)
    assert result.returncode == -9, result.stderr


def test_leftovers_of_killed_writers_are_removed_by_the_next_writer(tmp_path):
    """Defect 4: temporary files and staging folders of killed writers stayed forever."""
    (tmp_path / "data").mkdir()
    kill_a_writer(tmp_path, "file")
    assert [p.name.endswith(".delf-tmp") for p in (tmp_path / "data").iterdir()] == [True]
    kill_a_writer(tmp_path, "folder")  # (its start removes the dead writer's file)
    left = [p.name for p in (tmp_path / "data").iterdir()]
    assert len(left) == 1 and left[0].endswith(".delf-staging"), left
    atomic_write_text(tmp_path / "data" / "b.txt", "b")
    with staged_directory(tmp_path / "data" / "folder") as staging:
        (staging / "done").write_text("done")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["b.txt", "folder"]
    assert [p.name for p in (tmp_path / "data" / "folder").iterdir()] == ["done"]


LIVE_WRITER = """
    import sys
    from pathlib import Path
    from delf_tf.atomic import atomic_write, staged_directory

    def wait(handle):
        handle.write(b"first half ")
        handle.flush()
        print("writing", flush=True)
        sys.stdin.readline()
        handle.write(b"second half")

    with staged_directory(Path("data") / "folder") as staging:
        atomic_write(Path("data") / "a.bin", wait)
        (staging / "x").write_text("x")
"""


def test_leftovers_of_a_running_writer_are_kept(tmp_path):
    (tmp_path / "data").mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(LIVE_WRITER)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        # Another process writes into the same folder meanwhile: it must not touch the
        # running writer's temporary file and staging folder.
        cleaner = run_python(
            """
            from pathlib import Path
            from delf_tf.atomic import atomic_write_text, staged_directory
            atomic_write_text(Path("data") / "other.txt", "other")
            with staged_directory(Path("data") / "other") as staging:
                (staging / "y").write_text("y")
            """,
            tmp_path,
        )
        assert cleaner.returncode == 0, cleaner.stderr
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    assert (tmp_path / "data" / "a.bin").read_bytes() == b"first half second half"
    assert (tmp_path / "data" / "folder" / "x").read_text() == "x"
    assert leftovers(tmp_path) == []


SWAP_KILLED = """
    import os, signal
    from pathlib import Path
    import delf_tf.atomic as atomic

    kill_at = int(os.environ["KILL_AT"])
    calls = []
    real = os.rename

    def rename(source, target):
        calls.append(target)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real(source, target)

    atomic.os.rename = rename
    atomic.os.replace = rename
    with atomic.staged_directory(Path("index")) as staging:
        (staging / "content").write_text("new")
"""


@pytest.mark.parametrize("kill_at", [1, 2])
def test_directory_swap_killed_at_either_rename_leaves_one_complete_folder(tmp_path, kill_at):
    """Killed before the 1st or the 2nd rename of the swap: the old folder is found again
    (by the next reader, before anything decides on the folder's state)."""
    with staged_directory(tmp_path / "index") as staging:
        (staging / "content").write_text("old")
    env = dict(os.environ, PYTHONPATH=str(REPO), KILL_AT=str(kill_at))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SWAP_KILLED)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == -9, result.stderr
    recover_staged_directory(tmp_path / "index")
    assert (tmp_path / "index" / "content").read_text() == "old"
    with staged_directory(tmp_path / "index") as staging:
        (staging / "content").write_text("newer")
    assert (tmp_path / "index" / "content").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_atomic_write_error_leaves_nothing(tmp_path):
    def fails(handle):
        handle.write(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "f.bin", fails)
    assert list(tmp_path.iterdir()) == []


def test_crash_tests_say_why_they_skip_without_strace(monkeypatch):
    import shutil

    from crash_harness import strace_unavailable

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "strace is not installed" in strace_unavailable()
    assert "apt-get install -y strace" in strace_unavailable()


def test_store_reopened_for_writing_removes_leftovers_in_every_folder(tmp_path, caplog):
    """Leftovers of a dead writer of this host go; another host's only when a day old;
    an older delf-tf's (no pid in the name) are named in a warning, and kept."""
    import time

    from delf_tf import atomic

    store = FeatureStore.open_or_create(tmp_path / "s", "f" * 64, {"descriptor_dim": 8})
    store.save("deep/er/a.jpg", features())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=-1)
    pid = int(dead.stdout)
    mine = f".b.jpg.npz.{atomic._HOST}-{pid}-0123abcd.delf-tmp"
    fresh_foreign = f".c.jpg.npz.ffffff-{pid}-0123abcd.delf-tmp"
    old_foreign = f".d.jpg.npz.ffffff-{pid}-4567abcd.delf-tmp"
    folder = tmp_path / "s" / "deep" / "er"
    for name in (mine, fresh_foreign, old_foreign):
        (folder / name).write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(folder / old_foreign, (two_days_ago, two_days_ago))
    (tmp_path / "s" / f".x.{atomic._HOST}-{pid}-89abcdef.delf-staging").mkdir()
    legacy = ".e.jpg.npz.k2_x9qzt.tmp"  # tempfile.mkstemp's pattern, before the pid
    (folder / legacy).write_bytes(b"old")
    FeatureStore.open_or_create(tmp_path / "s", "f" * 64, {"descriptor_dim": 8})
    assert sorted(p.name for p in folder.iterdir()) == sorted([fresh_foreign, legacy, "a.jpg.npz"])
    assert "older delf-tf" in caplog.text and legacy in caplog.text
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["deep", "manifest.json"]
    assert list(FeatureStore.open(tmp_path / "s").stored_keys()) == ["deep/er/a.jpg"]
