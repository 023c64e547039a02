"""One writer per index and store (delf_tf.locks), exclusive store creation, symbolic
link output folders, and tampered store files: one line and exit 1, never a traceback."""

import fcntl
import json
import multiprocessing
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from delf_tf.atomic import BACKUP_SUFFIX, staged_directory
from delf_tf.cli import main
from delf_tf.features.local_features import LocalFeatures
from delf_tf.features.store import FeatureStore, StoreMismatchError
from delf_tf.locks import LockedError, lock_path, writer_lock
from delf_tf.retrieval import Index

DIM = 8
DESCRIPTION = {"descriptor_dim": DIM, "extraction_config": {"max_features": 20}}


def _features(count: int, seed: int) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    descriptors = rng.normal(size=(count, DIM))
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return LocalFeatures(
        rng.uniform(0, 64, (count, 2)), np.ones(count), np.linspace(1, 0, count), descriptors
    )


def _store(root, keys, seed=0) -> FeatureStore:
    store = FeatureStore.open_or_create(root, "f" * 64, DESCRIPTION)
    for number, key in enumerate(keys):
        store.save(key, _features(6, seed + number))
    return store


def _index(*arguments) -> list[str]:
    return ["delf", "index", "--index_type=votes", "--backend=brute", "--norecall", *arguments]


def _hold(path, seconds: float) -> subprocess.Popen:
    """Another process holding the flock of `path` for `seconds` (prints "held" once it does)."""
    code = (
        "import fcntl, os, sys, time\n"
        f"d = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(d, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        f"time.sleep({seconds})\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_writer_gets_one_line_or_waits(tmp_path, capsys):
    store = _store(tmp_path / "s", ["a", "b"])
    index = tmp_path / "index"
    holder = _hold(lock_path(index), 60)
    try:
        assert main(_index(f"--features={store.root}", f"--output_dir={index}")) == 1
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and "another writer holds" in error
        assert "--wait_for_lock" in error and "Traceback" not in error
        assert not index.exists()
    finally:
        holder.kill()
        holder.wait()
    holder = _hold(lock_path(index), 1.5)
    start = time.monotonic()
    try:
        arguments = _index(f"--features={store.root}", f"--output_dir={index}", "--wait_for_lock")
        assert main(arguments) == 0
    finally:
        holder.wait()
    assert time.monotonic() - start > 1.0  # it waited for the holder
    assert Index.load(index).num_images == 2


def test_two_concurrent_appends_lose_no_update(tmp_path):
    """Two `delf index --append` runs started together into one index: both stores end
    up in it (without the lock, the later swap dropped the earlier one's images)."""
    index = tmp_path / "index"
    base = _store(tmp_path / "base", [f"base{n}" for n in range(3)])
    assert main(_index(f"--features={base.root}", f"--output_dir={index}")) == 0
    stores = [
        _store(tmp_path / f"s{k}", [f"s{k}-{n}" for n in range(4)], seed=10 * k) for k in (1, 2)
    ]
    environment = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + sys.path[0]}
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "delf_tf.cli",
                *_index(
                    f"--features={store.root}",
                    f"--output_dir={index}",
                    "--append",
                    "--wait_for_lock",
                )[1:],
            ],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for store in stores
    ]
    for run in runs:
        out, err = run.communicate(timeout=240)
        assert run.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["added"] == 4
    keys = sorted(record.key for record in Index.load(index).images)
    assert len(keys) == 11 and {key[:2] for key in keys} == {"ba", "s1", "s2"}


def _create(root, fingerprint, barrier, results):
    barrier.wait()
    try:
        FeatureStore.open_or_create(root, fingerprint, {})
        results.put("ok")
    except StoreMismatchError:
        results.put("mismatch")


def test_two_store_creators_one_is_accepted(tmp_path):
    """Two processes creating one store with different fingerprints at the same instant:
    exactly one is accepted (the manifest is created exclusively)."""
    context = multiprocessing.get_context("fork")
    for attempt in range(6):
        root = tmp_path / f"store{attempt}"
        barrier, results = context.Barrier(2), context.Queue()
        workers = [
            context.Process(target=_create, args=(root, fingerprint * 64, barrier, results))
            for fingerprint in "ab"
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert sorted(results.get(timeout=5) for _ in workers) == ["mismatch", "ok"]


def test_lock_is_per_directory_and_nests(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert (
        lock_path(tmp_path / "link") == lock_path(tmp_path / "real") == str(tmp_path / "real.lock")
    )
    with writer_lock(tmp_path / "real"), writer_lock(tmp_path / "link"):  # the same lock, nested
        descriptor = os.open(lock_path(tmp_path / "real"), os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(descriptor)
    holder = _hold(lock_path(tmp_path / "real"), 30)
    try:
        with (
            pytest.raises(LockedError, match=f"pid {holder.pid}|another writer"),
            writer_lock(tmp_path / "link"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with writer_lock("gs://bucket/store") as path:  # remote: exempt
        assert path is None


def test_symlinked_output_dir_is_replaced_at_its_target(tmp_path, capsys):
    real, link = tmp_path / "idx_real", tmp_path / "current"
    with staged_directory(real) as staging:
        (staging / "old").write_text("old")
    link.symlink_to(real.name)
    with staged_directory(link) as staging:
        (staging / "new").write_text("new")
    assert link.is_symlink() and os.readlink(link) == real.name
    assert sorted(os.listdir(real)) == ["new"]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(BACKUP_SUFFIX)]
    # Through `delf index --append --output_dir=current`: the real path sees the images too.
    first, second = _store(tmp_path / "s1", ["a"]), _store(tmp_path / "s2", ["b"], seed=5)
    index_real, current = tmp_path / "index_v1", tmp_path / "index_current"
    assert main(_index(f"--features={first.root}", f"--output_dir={index_real}")) == 0
    current.symlink_to(index_real)
    arguments = _index(f"--features={second.root}", f"--output_dir={current}", "--append")
    assert main(arguments) == 0
    capsys.readouterr()
    assert current.is_symlink()
    assert [record.key for record in Index.load(index_real).images] == ["a", "b"]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(BACKUP_SUFFIX)]


def _npz_with(path, **arrays):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


def _huge_header(path):
    """An .npz whose descriptors header claims shape (1e11, 128), with no data."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**11, 128)}
    with zipfile.ZipFile(path, "w") as archive, archive.open("descriptors.npy", "w") as member:
        np.lib.format.write_array_header_2_0(member, header)


def _tamper(case: str, root) -> None:
    target = root / "a.npz"
    good = _features(6, 0).arrays()
    if case == "huge header":
        _huge_header(target)
    elif case == "inflates beyond the bound":  # 100 x 8 compresses to little, bound 20 x 8
        _npz_with(target, **{**good, "descriptors": np.zeros((100_000, DIM), np.float32)})
    elif case == "NaN descriptors":
        _npz_with(target, **{**good, "descriptors": np.full((6, DIM), np.nan, np.float32)})
    elif case == "integer descriptors":
        _npz_with(target, **{**good, "descriptors": np.ones((6, DIM), np.int32)})
    elif case == "fifo":
        os.mkfifo(root / "c.npz")
    elif case == "folder":
        (root / "c.npz").mkdir()
    elif case == "manifest list":
        (root / "manifest.json").write_text("[1, 2]")
    elif case == "fingerprint number":
        manifest = json.loads((root / "manifest.json").read_text())
        (root / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": 12345}))
    elif case == "huge integer":
        (root / "manifest.json").write_text('{"format_version": ' + "9" * 100_000 + "}")


TAMPERED = [
    "huge header",
    "inflates beyond the bound",
    "NaN descriptors",
    "integer descriptors",
    "fifo",
    "folder",
    "manifest list",
    "fingerprint number",
    "huge integer",
]


@pytest.mark.parametrize("case", TAMPERED)
def test_tampered_store_gives_one_line(tmp_path, capsys, case):
    store = _store(tmp_path / "s", ["a", "b"])
    _tamper(case, store.root)
    start = time.monotonic()
    assert main(_index(f"--features={store.root}", f"--output_dir={tmp_path / 'i'}")) == 1
    error = capsys.readouterr().err  # (after the progress bar's line)
    assert error.strip().splitlines()[-1].startswith("delf index: error: "), error
    assert "Traceback" not in error and "delf index: error" in error.strip().splitlines()[-1]
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("case", ["oversized .delf", "NaN in .delf"])
def test_tampered_delf_store_gives_one_line(tmp_path, capsys, case):
    store = FeatureStore.open_or_create(tmp_path / "s", "f" * 64, DESCRIPTION, formats=("delf",))
    store.save("a", _features(6, 0))
    if case == "oversized .delf":
        with open(store.root / "a.delf", "r+b") as handle:
            handle.truncate(1 << 30)  # sparse: no disk space, never read
    else:
        bad = _features(6, 1)
        store.save(
            "a", LocalFeatures(bad.keypoints, bad.scales, bad.scores, bad.descriptors * np.nan)
        )
    assert main(_index(f"--features={store.root}", f"--output_dir={tmp_path / 'i'}")) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("delf index: error: ") and "a.delf" in error, error
