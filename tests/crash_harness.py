"""Crash testing by system-call fault injection with strace, in the spirit of SQLite's.

A command runs once under `strace -f -y` to list the system calls that change
files (its crash points). Then, for each chosen point, it runs again from the
same starting state under `strace -e inject=SYSCALL:signal=SIGKILL:when=N`: the
kernel kills the process on entry to its N-th call of SYSCALL, before the call
is carried out, which is the state a `kill -9` (or a crash) at that instant
leaves. The caller checks the folder, reruns the command and checks again.

strace counts `when=N` per thread and per system call (verified with strace 6.1),
so a crash point is (syscall, N) in the command's main thread, where all of
delf-tf's own file writes happen; the call the injection actually hit is read
back from the crash run's own trace (`Crash.hit`), so a point that moved (a run
that made one more call than the traced one) is seen, not assumed.

Used by tests/commands/test_crash_safety.py (a fixed sample of points) and
bench/crash_sweep.py (every point). Needs the `strace` binary and ptrace; see
`strace_unavailable`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# System calls that change what is on disk (openat only with a writing flag, see
# `changes_files`). The crash points are the calls of these, in the main thread,
# on a path under the watched folder.
STATE_SYSCALLS = (
    "openat",
    "write",
    "pwrite64",
    "writev",
    "ftruncate",
    "fsync",
    "fdatasync",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "fchmod",
    "chmod",
)
WRITING_OPEN_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC")
ATOMIC_SUFFIXES = (".delf-tmp", ".delf-staging", ".delf-backup")
_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<syscall>[a-z0-9_]+)\((?P<args>.*)$")
_CWD = re.compile(r"AT_FDCWD<[^>]*>")  # -y shows the working folder: not a path the call uses
# What differs between two runs' identical calls: our temporary names' host-pid-token,
# TensorFlow's random temporary names, descriptor numbers, results.
_VARYING = re.compile(
    r"\.[0-9a-f]{6}-[0-9]+-[0-9a-f]{8}\.delf-|tempstate[0-9]+|\.tmp[0-9a-f]{32}"
    r"|\b[0-9]+<| = .*$| <unfinished.*$"
)
STRACE_INSTALL_HINT = "apt-get install -y strace (make test does this when run as root)"


def strace_unavailable() -> str | None:
    """Why the crash tests cannot run here (no strace, or ptrace not permitted), or None."""
    strace = shutil.which("strace")
    if strace is None:
        return f"strace is not installed ({STRACE_INSTALL_HINT})"
    probe = subprocess.run(
        [strace, "-f", "-qq", "-o", os.devnull, "-e", "trace=write", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        return f"strace cannot trace here: {probe.stderr.strip()[:200]}"
    return None


def command_environment() -> dict[str, str]:
    """The environment of a traced `python -m delf_tf.cli` run: this checkout, CPU only,
    no bytecode files (they would add writes), TensorFlow's start-up chatter off, the
    same number of writes in every run."""
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        PYTHONDONTWRITEBYTECODE="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        # Progress bars redraw by the clock, which would make the number of writes
        # vary from run to run: only their first and last state are drawn.
        TQDM_MININTERVAL="1000000",
    )


def delf_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "delf_tf.cli", *arguments]


@dataclasses.dataclass(frozen=True)
class Call:
    """One system call of a trace: thread id, name, its number N among that thread's calls
    of that name (strace's `when` counter), and its arguments as strace printed them
    (`-y`: file descriptors shown with their paths)."""

    pid: int
    syscall: str
    n: int
    args: str

    def describe(self, strip: str = "") -> str:
        args = self.args.replace(strip, "") if strip else self.args
        return f"{self.syscall}#{self.n}({args[:160]}"

    def changes_files(self) -> bool:
        if self.syscall == "openat":
            return any(flag in self.args for flag in WRITING_OPEN_FLAGS)
        return True

    def same_call(self, other: Call, folder: str, other_folder: str) -> bool:
        """Whether two runs' calls are the same step (paths relative to each run's folder,
        temporary-name tokens, descriptor numbers and results aside)."""
        mine = _VARYING.sub("", self.args.replace(folder, "")).rstrip(") ")
        theirs = _VARYING.sub("", other.args.replace(other_folder, "")).rstrip(") ")
        if self.syscall in ("write", "pwrite64", "writev"):  # the file, not the bytes
            mine, theirs = mine.split(', "')[0], theirs.split(', "')[0]
        return (self.syscall, self.n, mine) == (other.syscall, other.n, theirs)


def parse_trace(text: str) -> tuple[int | None, list[Call]]:
    """(main thread id, every call) of an `strace -f -o` log."""
    counts: dict[tuple[int, str], int] = {}
    calls, main = [], None
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:  # "<... resumed>", "+++ exited", "--- SIG..."
            continue
        pid, syscall = int(match["pid"]), match["syscall"]
        main = pid if main is None else main
        counts[pid, syscall] = counts.get((pid, syscall), 0) + 1
        calls.append(Call(pid, syscall, counts[pid, syscall], _CWD.sub("AT_FDCWD", match["args"])))
    return main, calls


def crash_points(calls: Iterable[Call], main: int | None, watched: Sequence[str]) -> list[Call]:
    """The file-changing calls of the main thread on a path under one of `watched`."""
    return [
        call
        for call in calls
        if call.pid == main and call.changes_files() and any(w in call.args for w in watched)
    ]


def sample(points: Sequence[Call], every: Sequence[str] = ()) -> list[Call]:
    """The first and the last point of each system call, and every point of the calls
    named in `every` (in the order they happen)."""
    chosen = set()
    for syscall in {point.syscall for point in points}:
        of_kind = [point for point in points if point.syscall == syscall]
        chosen.update(of_kind if syscall in every else (of_kind[0], of_kind[-1]))
    return [point for point in points if point in chosen]


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    calls: list[Call]
    main: int | None


def run_traced(
    command: Sequence[str],
    cwd: Path,
    log: Path,
    syscalls: Sequence[str] = STATE_SYSCALLS,
    inject: tuple[str, int] | None = None,
    timeout: float = 600,
) -> Run:
    """Runs `command` under strace (-f -y), injecting SIGKILL at (syscall, N) if given."""
    strace = [shutil.which("strace") or "strace", "-f", "-qq", "-y", "-o", str(log)]
    strace += ["-e", "trace=" + ",".join(syscalls)]
    if inject is not None:
        syscall, n = inject
        strace += ["-e", f"inject={syscall}:signal=SIGKILL:when={n}"]
    result = subprocess.run(
        [*strace, *command],
        cwd=cwd,
        env=command_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    main, calls = parse_trace(log.read_text(errors="replace"))
    return Run(result.returncode, result.stdout, result.stderr, calls, main)


def run_plain(command: Sequence[str], cwd: Path, timeout: float = 600) -> Run:
    result = subprocess.run(
        list(command),
        cwd=cwd,
        env=command_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Run(result.returncode, result.stdout, result.stderr, [], None)


@dataclasses.dataclass
class Crash:
    killed: bool
    hit: Call | None  # the call the SIGKILL was delivered at (None when not killed)
    run: Run


def crash_at(command: Sequence[str], cwd: Path, log: Path, point: Call) -> Crash:
    """Runs `command` killed on entry to the main thread's `point.n`-th `point.syscall`."""
    run = run_traced(command, cwd, log, syscalls=(point.syscall,), inject=(point.syscall, point.n))
    killed = run.returncode in (-9, 137)
    hit = None
    if killed:
        mine = [c for c in run.calls if c.syscall == point.syscall and c.pid == run.main]
        hit = mine[-1] if mine and mine[-1].n == point.n else None
        if hit is None:  # another thread reached its n-th call first
            others = [c for c in run.calls if c.syscall == point.syscall and c.n == point.n]
            hit = others[-1] if others else None
    return Crash(killed, hit, run)


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders of the atomic layer (delf_tf.atomic) under `root`."""
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.name.endswith(ATOMIC_SUFFIXES)
    )


# --- scenarios: a starting state, one command, and what must hold after a crash -----------

# The tests' tiny backbone (the values of tests/conftest.py's TINY_MODEL).
TINY_MODEL = {"backbone": "tiny", "feature_depth": 128, "attention_hidden_units": 32}
# Small, fast extraction settings: long side 64 px, 20 features, no attention threshold.
FAST_FLAGS = ("--preset=fast", "--max_image_size=64", "--max_features=20", "--score_threshold=0")
DIM = 16


def write_tiny_model_config(path: Path) -> Path:
    from delf_tf.config import ModelConfig

    ModelConfig(**TINY_MODEL).save(path)
    return path


def write_images(folder: Path, count: int) -> list[str]:
    """`count` small PNGs (64 x 48 crops of scikit-image photographs); their names."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for photo in ("astronaut", "coffee", "rocket", "chelsea")[:count]:
        pixels = np.asarray(getattr(skimage.data, photo)())[:, :, :3]
        Image.fromarray(pixels).resize((64, 48)).save(folder / f"{photo}.png")
        names.append(f"{photo}.png")
    return names


def write_store(root: Path, keys: Sequence[str], seed: int, dim: int = DIM, count: int = 30):
    """A feature store of random unit descriptors (what `delf index` and `fit-pca` read)."""
    import numpy as np

    from delf_tf.features import FeatureStore, LocalFeatures

    rng = np.random.default_rng(seed)
    store = FeatureStore.open_or_create(root, "c" * 64, {"descriptor_dim": dim, "model": "test"})
    for key in keys:
        descriptors = rng.normal(size=(count, dim)).astype(np.float32)
        descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
        store.save(
            key,
            LocalFeatures(
                rng.uniform(0, 64, (count, 2)), np.ones(count), np.ones(count), descriptors
            ),
        )
    return store


class Scenario:
    """A command with its starting state and the checks after a crash and after a rerun.

    `reference` is taken from a clean run's folder; checks raise AssertionError.
    """

    name = "scenario"
    ok_codes: tuple[int, ...] = (0,)
    uses_tensorflow = False

    def prepare(self, work: Path) -> None:
        raise NotImplementedError

    def command(self, work: Path) -> list[str]:
        raise NotImplementedError

    def reference(self, work: Path):
        raise NotImplementedError

    def check_after_crash(self, work: Path, reference) -> str:
        """Asserts the folder holds the previous or the new complete result; returns which."""
        raise NotImplementedError

    def check_after_rerun(self, work: Path, reference) -> None:
        raise NotImplementedError


def _features_of(root: Path) -> dict:
    from delf_tf.features import FeatureStore

    store = FeatureStore.open(root)
    return {key: store.load(key) for key in store.stored_keys()}


def _same_features(found: dict, expected: dict, where: str) -> None:
    import numpy as np

    for key, features in found.items():
        assert key in expected, f"{where}: unexpected key {key!r}"
        for name, array in expected[key].arrays().items():
            np.testing.assert_allclose(features.arrays()[name], array, atol=1e-5, err_msg=key)


class ExtractScenario(Scenario):
    """`delf extract` of a few images into a new store (a store may exist: resumed)."""

    ok_codes = (0,)
    uses_tensorflow = True

    def __init__(self, images: int = 1):
        self.images = images
        self.name = f"extract ({images} image{'s' if images > 1 else ''})"

    def prepare(self, work: Path) -> None:
        work.mkdir(parents=True)
        write_tiny_model_config(work / "tiny.json")
        write_images(work / "images", self.images)

    def command(self, work: Path) -> list[str]:
        return delf_command(
            "extract",
            f"--images={work / 'images'}",
            f"--output_dir={work / 'features'}",
            f"--model_config={work / 'tiny.json'}",
            *FAST_FLAGS,
        )

    def reference(self, work: Path) -> dict:
        return _features_of(work / "features")

    def check_after_crash(self, work: Path, reference) -> str:
        root = work / "features"
        if not (root / "manifest.json").is_file():
            assert not list(root.rglob("*.npz")) if root.exists() else True, (
                "features without manifest"
            )
            return "previous"
        found = _features_of(root)
        if reference is not None:
            _same_features(found, reference, "after the crash")
            if set(found) == set(reference):
                return "new"
        return "partial (resumable)" if found else "previous"

    def check_after_rerun(self, work: Path, reference) -> None:
        found = _features_of(work / "features")
        names = sorted(path.name for path in (work / "images").iterdir())
        assert sorted(found) == names, (sorted(found), names)
        if reference is not None:
            _same_features(found, reference, "after the rerun")


def _index_state(path: Path):
    """(image identities, descriptors) of the index at `path`, or None where there is none."""
    import numpy as np

    from delf_tf.retrieval import Index
    from delf_tf.retrieval.index import IndexFormatError

    try:
        index = Index.load(path, mmap=False)
    except IndexFormatError:
        if path.exists():
            assert not any(path.iterdir()), f"{path}: a folder that is neither empty nor an index"
        return None
    keys = [record.key for record in index.images]
    return keys, np.asarray(index.descriptors)


class IndexScenario(Scenario):
    """`delf index` over an existing index: rebuilt from a second store, or --append."""

    def __init__(self, append: bool):
        self.append = append
        self.name = "index --append" if append else "index (rebuild over an existing index)"

    def prepare(self, work: Path) -> None:
        from delf_tf.retrieval import Index

        work.mkdir(parents=True)
        first = write_store(work / "store1", ["a.jpg", "b.jpg", "sub/c.jpg"], seed=0)
        write_store(work / "store2", ["d.jpg", ".e.jpg"], seed=1)
        Index.from_store(first, progress=False).save(work / "index")

    def command(self, work: Path) -> list[str]:
        flags = [f"--features={work / 'store2'}", f"--output_dir={work / 'index'}"]
        return delf_command("index", *(["--append"] if self.append else []), *flags)

    def reference(self, work: Path):
        return _index_state(work / "index")

    def _previous(self, work: Path):
        return (["a.jpg", "b.jpg", "sub/c.jpg"], None)

    def check_after_crash(self, work: Path, reference) -> str:
        import numpy as np

        state = _index_state(work / "index")
        assert state is not None, "neither the previous nor the new index is found"
        keys, descriptors = state
        if keys == reference[0]:
            np.testing.assert_array_equal(descriptors, reference[1])
            return "new"
        assert keys == self._previous(work)[0], f"neither previous nor new: {keys}"
        return "previous"

    def check_after_rerun(self, work: Path, reference) -> None:
        import numpy as np

        keys, descriptors = _index_state(work / "index")
        assert keys == reference[0], (keys, reference[0])  # nothing lost, nothing twice
        assert len(set(keys)) == len(keys)
        np.testing.assert_array_equal(descriptors, reference[1])


class MilvusIndexScenario(IndexScenario):
    """`delf index --append` of an index whose rankings live in Milvus Lite (a .db folder
    beside it): after a kill, index.json names complete collections and partitions (an
    append adds a partition to the same collection); after the rerun, exactly the
    collections and partitions it names are left (the killed run's are dropped)."""

    def __init__(self):
        super().__init__(append=True)
        self.name = "index --append (milvus)"

    def prepare(self, work: Path) -> None:
        from delf_tf.commands.index import milvus_prefix
        from delf_tf.retrieval import Index
        from delf_tf.retrieval.structures import milvus

        work.mkdir(parents=True)
        first = write_store(work / "store1", ["a.jpg", "b.jpg", "sub/c.jpg"], seed=0)
        write_store(work / "store2", ["d.jpg", ".e.jpg"], seed=1)
        index = Index.from_store(first, progress=False)
        index.build_structures(
            backend="milvus",
            milvus_uri=str(work / "milvus.db"),
            milvus_prefix=milvus_prefix(work / "index"),
            stores={first.identity: str(first.root)},
            recall=False,
            progress=False,
        )
        index.save(work / "index")
        milvus.release(milvus.location(str(work / "milvus.db")))  # the command opens it

    def reference(self, work: Path):
        return super().reference(work), self._milvus_state(work, final=True)

    def _milvus_state(self, work: Path, final: bool):
        """Top-1 of each image as a query, by votes, through the index's collection;
        with `final`, the prefix must hold only the collections index.json names."""
        from delf_tf.config import RetrievalConfig
        from delf_tf.features import FeatureStore
        from delf_tf.retrieval import Index
        from delf_tf.retrieval.search import Searcher
        from delf_tf.retrieval.structures import milvus

        index = Index.load(work / "index")
        uri = index.structures["neighbors"]["uri"]
        try:
            searcher = Searcher(index, RetrievalConfig(ranking="votes"))
            assert len(searcher.neighbors) == index.num_descriptors
            top = []
            for name in ("store1", "store2"):
                store = FeatureStore.open(work / name)
                for key in store.stored_keys():
                    ranking = searcher.initial(store.load(key))
                    top.append(index.images[int(ranking.ids[0])].key if ranking.ids.size else None)
            if final:
                prefix = index.structures["neighbors"]["prefix"]
                named = {header["collection"] for header in index.structures.values()}
                found = {
                    name
                    for name in milvus.client(uri).list_collections()
                    if name.startswith(prefix)
                }
                assert found == named, f"collections {sorted(found)}, index.json names {named}"
                for header in index.structures.values():  # an append adds a partition
                    there = set(milvus.client(uri).list_partitions(header["collection"]))
                    assert there == set(header["partitions"]), (there, header["partitions"])
            return top
        finally:
            milvus.release(uri)

    def check_after_crash(self, work: Path, reference) -> str:
        state = super().check_after_crash(work, reference[0])
        top = self._milvus_state(work, final=False)
        if state == "new":
            assert top == reference[1], (top, reference[1])
        else:  # the previous index: its three images find themselves
            assert top[:3] == ["a.jpg", "b.jpg", "sub/c.jpg"], top
        return state

    def check_after_rerun(self, work: Path, reference) -> None:
        super().check_after_rerun(work, reference[0])
        assert self._milvus_state(work, final=True) == reference[1]


class OnDiskIndexScenario(IndexScenario):
    """`delf index --backend=ivfpq-ondisk` in shards of 100 rows over an existing index
    (rebuilt from a second store of 300 descriptors): after a kill the previous or the
    new index is complete; the rerun resumes in `index.build/` and its on-disk lists
    hold every row exactly once, and the build folder is gone."""

    def __init__(self):
        super().__init__(append=False)
        self.name = "index --backend=ivfpq-ondisk"

    def prepare(self, work: Path) -> None:
        from delf_tf.retrieval import Index

        work.mkdir(parents=True)
        first = write_store(work / "store1", ["a.jpg", "b.jpg", "sub/c.jpg"], seed=0)
        write_store(work / "store2", ["d.jpg", ".e.jpg"], seed=1, count=150)
        Index.from_store(first, progress=False).save(work / "index")

    def command(self, work: Path) -> list[str]:
        extra = ["--backend=ivfpq-ondisk", "--shard_rows=100", "--norecall"]
        return [*super().command(work), *extra]

    def check_after_rerun(self, work: Path, reference) -> None:
        import faiss
        import numpy as np

        from delf_tf.retrieval import Index

        super().check_after_rerun(work, reference)
        index = Index.load(work / "index")
        lists = faiss.extract_index_ivf(index.neighbors()._index).invlists
        ids = np.concatenate(
            [
                faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number)).copy()
                for number in range(lists.nlist)
            ]
        )
        assert np.array_equal(np.sort(ids), np.arange(index.num_descriptors)), "rows lost or twice"
        assert not (work / "index.build").exists(), "the build folder stayed"


class FitPcaScenario(Scenario):
    """`delf fit-pca` replacing an existing PCA file."""

    name = "fit-pca (replacing an existing file)"

    def prepare(self, work: Path) -> None:
        import numpy as np

        from delf_tf.extraction.pca import fit_pca

        work.mkdir(parents=True)
        write_store(work / "store", ["a.jpg", "b.jpg", "c.jpg"], seed=2)
        fit_pca(np.random.default_rng(3).normal(size=(40, DIM)), 4).save(work / "pca.npz")

    def command(self, work: Path) -> list[str]:
        return delf_command(
            "fit-pca",
            f"--features={work / 'store'}",
            "--dim=8",
            f"--output_file={work / 'pca.npz'}",
        )

    def reference(self, work: Path):
        from delf_tf.extraction.pca import PcaParams

        return PcaParams.load(work / "pca.npz")

    def check_after_crash(self, work: Path, reference) -> str:
        from delf_tf.extraction.pca import PcaParams

        pca = PcaParams.load(work / "pca.npz")  # raises unless complete
        if pca.output_dim == 4:
            return "previous"
        self._same(pca, reference)
        return "new"

    def check_after_rerun(self, work: Path, reference) -> None:
        from delf_tf.extraction.pca import PcaParams

        self._same(PcaParams.load(work / "pca.npz"), reference)

    @staticmethod
    def _same(pca, reference) -> None:
        import numpy as np

        np.testing.assert_array_equal(pca.projection, reference.projection)
        np.testing.assert_array_equal(pca.mean, reference.mean)


class ExportScenario(Scenario):
    """`delf export` of the tiny model (random weights) as version 1 of a new model folder."""

    name = "export"
    uses_tensorflow = True

    def prepare(self, work: Path) -> None:
        work.mkdir(parents=True)
        write_tiny_model_config(work / "tiny.json")

    def command(self, work: Path) -> list[str]:
        return delf_command(
            "export",
            f"--model_config={work / 'tiny.json'}",
            f"--export_base={work / 'models'}",
            *FAST_FLAGS,
        )

    @staticmethod
    def _versions(work: Path) -> dict[int, str]:
        """{version: fingerprint} of every version folder; asserts each is complete."""
        import json

        from delf_tf.contract import EXPORT_INFO_ASSET, existing_versions

        model = work / "models" / "delf"
        found = {}
        for version in existing_versions(model):
            folder = model / str(version)
            assert (folder / "saved_model.pb").stat().st_size > 0, f"{folder}: no saved_model.pb"
            assert (folder / "variables" / "variables.index").is_file(), f"{folder}: no variables"
            info = json.loads((folder / "assets" / EXPORT_INFO_ASSET).read_text())
            _parse_saved_model(folder / "saved_model.pb")
            found[version] = info["fingerprint"]
        return found

    def reference(self, work: Path):
        return self._versions(work)[1]

    def check_after_crash(self, work: Path, reference) -> str:
        versions = self._versions(work)
        assert len(set(versions.values()) | ({reference} if reference else set())) <= 1
        return "new" if versions else "previous"

    def check_after_rerun(self, work: Path, reference) -> None:
        versions = self._versions(work)
        # Exports never overwrite: a crash after the version appeared makes the rerun
        # export version 2 (the same model again); either way every version is complete.
        assert sorted(versions) in ([1], [1, 2]), versions
        assert len(set(versions.values()) | ({reference} if reference else set())) == 1


def _parse_saved_model(path: Path) -> None:
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString(path.read_bytes())
    assert saved_model.meta_graphs, f"{path}: no meta graph"


SCENARIOS = {
    "extract": ExtractScenario,
    "extract-2": lambda: ExtractScenario(images=2),  # crashes between two images too
    "index": lambda: IndexScenario(append=False),
    "index-append": lambda: IndexScenario(append=True),
    "index-append-milvus": MilvusIndexScenario,
    "index-ondisk": OnDiskIndexScenario,
    "fit-pca": FitPcaScenario,
    "export": ExportScenario,
}


@dataclasses.dataclass
class PointResult:
    point: str  # the crash point planned (syscall#N(args...)
    hit: str | None  # the call the SIGKILL was delivered at; None: ran to completion
    state: str  # after the crash: "previous", "new" or "partial (resumable)"
    moved: bool  # the kill hit another call than planned (a run made other calls)


def sweep(
    scenario: Scenario,
    root: Path,
    choose=None,
    rerun=None,
    keep: bool = False,
    fixed: Sequence[tuple[str, int]] | None = None,
    clean=None,
) -> dict:
    """Runs `scenario` cleanly under strace, then crashes it at each chosen point.

    choose: list of crash points -> the ones to run (default: all of them).
    rerun: work -> Run, the rerun after a crash (default: the command, in a subprocess).
    fixed: (syscall, N) points to run instead, without the traced clean run; then
      `clean` (work -> None, e.g. the command in process) makes the reference result,
      or there is none (None: the checks compare with nothing but themselves).
    Raises AssertionError naming the point where a check fails. Returns counts and
    the per-point results.
    """
    trace_dir = root / "clean"
    scenario.prepare(trace_dir)
    if fixed is None:
        clean_run = run_traced(scenario.command(trace_dir), trace_dir, root / "clean.log")
        assert clean_run.returncode in scenario.ok_codes, clean_run.stderr[-3000:]
        reference = scenario.reference(trace_dir)
        points = crash_points(clean_run.calls, clean_run.main, [str(trace_dir)])
        chosen = list(choose(points)) if choose else points
    else:
        reference = None
        if clean is not None:
            clean(trace_dir)
            reference = scenario.reference(trace_dir)
        points = chosen = [Call(0, syscall, n, "") for syscall, n in fixed]
    results = []
    for number, point in enumerate(chosen):
        work = root / f"p{number:04d}"  # as long as "clean": the same write sizes
        scenario.prepare(work)
        where = point.describe(str(trace_dir))
        crash = crash_at(scenario.command(work), work, root / f"p{number:04d}.log", point)
        if not crash.killed:
            assert crash.run.returncode in scenario.ok_codes, (where, crash.run.stderr[-3000:])
        try:
            state = scenario.check_after_crash(work, reference)
            again = rerun(work) if rerun else run_plain(scenario.command(work), work)
            assert again.returncode in scenario.ok_codes, again.stderr[-3000:]
            scenario.check_after_rerun(work, reference)
            assert leftovers(work) == [], leftovers(work)
        except AssertionError as error:
            hit = crash.hit.describe(str(work)) if crash.hit else "no kill"
            raise AssertionError(
                f"{scenario.name}: crash at {where} (hit {hit}): {error}"
            ) from None
        hit = crash.hit.describe(str(work)) if crash.hit else None
        moved = crash.hit is None or (
            fixed is None and not point.same_call(crash.hit, str(trace_dir), str(work))
        )
        results.append(PointResult(where, hit, state, moved))
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    by_syscall: dict[str, int] = {}
    for point in points:
        by_syscall[point.syscall] = by_syscall.get(point.syscall, 0) + 1
    return {
        "command": scenario.name,
        "crash_points": len(points),
        "crash_points_by_syscall": by_syscall,
        "run": len(results),
        "killed": sum(result.hit is not None for result in results),
        "moved": sum(result.moved for result in results),
        "states_after_crash": {
            state: sum(result.state == state for result in results)
            for state in sorted({result.state for result in results})
        },
        "results": [dataclasses.asdict(result) for result in results],
    }
