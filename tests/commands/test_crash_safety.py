"""Crash safety: SIGKILL at file-changing system calls (strace fault injection), then rerun.

`tests/crash_harness.py` has the machinery and the scenarios. Here: the regression
test of the `--append` data loss, and a fixed sample of crash points per command
(the first and the last call of each kind that changes the output, plus every
rename) so `make test` stays fast; `bench/crash_sweep.py` runs every point.
"""

from __future__ import annotations

import pytest
from crash_harness import (
    IndexScenario,
    crash_at,
    crash_points,
    run_plain,
    run_traced,
    strace_unavailable,
)

UNAVAILABLE = strace_unavailable()
pytestmark = [
    pytest.mark.crash,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
]


def test_append_killed_between_the_two_renames_then_rerun_keeps_every_image(tmp_path):
    """Defect 1: `delf index --append` killed between the renames of the directory swap,
    then run again, rebuilt the index from the new store alone (5 images became 2):
    the backup was restored only after the command had looked for index.json."""
    from delf_tf.retrieval import Index

    scenario = IndexScenario(append=True)
    clean_dir, crash_dir = tmp_path / "clean", tmp_path / "crash"
    scenario.prepare(clean_dir)
    clean = run_traced(scenario.command(clean_dir), clean_dir, tmp_path / "clean.log")
    assert clean.returncode == 0, clean.stderr
    renames = [
        call
        for call in crash_points(clean.calls, clean.main, [str(clean_dir)])
        if call.syscall.startswith("rename") and call.args.endswith(f'"{clean_dir / "index"}") = 0')
    ]
    assert renames, "no rename onto the index folder"
    swap_in = renames[-1]  # the new folder renamed in: the old one is at its backup name now

    scenario.prepare(crash_dir)
    crash = crash_at(scenario.command(crash_dir), crash_dir, tmp_path / "crash.log", swap_in)
    assert crash.killed and crash.hit is not None and crash.hit.n == swap_in.n
    assert not (crash_dir / "index").exists()  # the moment of the crash: only the backup
    rerun = run_plain(scenario.command(crash_dir), crash_dir)
    assert rerun.returncode == 0, rerun.stderr
    keys = [record.key for record in Index.load(crash_dir / "index").images]
    assert keys == ["a.jpg", "b.jpg", "sub/c.jpg", ".e.jpg", "d.jpg"]


def in_process(scenario):
    """The rerun after a crash as `delf_tf.cli.main` in this process (no second start-up
    of Python and TensorFlow: the crash itself is the subprocess that matters)."""
    from crash_harness import Run

    from delf_tf.cli import main

    def rerun(work):
        command = scenario.command(work)
        return Run(main(["delf", *command[3:]]), "", "", [], None)

    return rerun


def choose(*kinds: str, every: tuple[str, ...] = ("rename",)):
    """Crash points of a sweep: the first and the last call of each of `kinds`, and every
    call of the kinds in `every` (renames: the steps that publish a result)."""

    def pick(points):
        chosen = set()
        for kind in kinds:
            of_kind = [point for point in points if point.syscall == kind]
            chosen.update(of_kind if kind in every else of_kind[:1] + of_kind[-1:])
        return [point for point in points if point in chosen]

    return pick


# The default sample per command (`make test`); bench/crash_sweep.py runs every point.
# Commands without TensorFlow: a traced clean run lists the points; the sample is
# every rename, and the first and the last write, fsync and removal.
SAMPLES = {
    "index-append": choose("rename", "write", "fsync", "unlinkat", "rmdir"),
    "index": choose("rename", "write", "unlinkat"),
    # Milvus Lite: the renames are hit in Lite's own threads (strace counts per
    # thread: their renames come first), i.e. killed in the middle of filling the new
    # collections; unlinkat: after the swap, the old collections not dropped yet.
    "index-append-milvus": choose("rename", "unlinkat"),
    "fit-pca": choose("rename", "write", "fsync"),
}
# Milvus Lite writes from its own threads: a kill may land in one of them (another
# valid crash point); every run must still be killed and pass the checks.
MAY_MOVE = {"index-append-milvus"}
# Commands with TensorFlow take several seconds per run: one fixed point each, the
# rename that publishes the result, with no traced clean run (the hit is checked).
# extract (one image): a link() publishes manifest.json (created exclusively), rename 1
# the .npz.
# export: renames 1-5 are TensorFlow's own inside the staging folder (variables,
# saved_model.pb, fingerprint.pb), rename 6 publishes the version folder.
FIXED = {
    "extract": (("rename", 1), ".npz"),
    "export": (("rename", 6), "/models/delf/1"),
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_killed_at_sampled_crash_points_then_rerun(name, tmp_path):
    """Killed at each sampled point: the previous or the new result is complete and
    loadable; after a rerun the new one is, with nothing lost or twice, no leftovers."""
    from crash_harness import SCENARIOS, sweep

    scenario = SCENARIOS[name]()
    result = sweep(scenario, tmp_path, choose=SAMPLES[name], rerun=in_process(scenario))
    assert result["run"] >= 3 and result["killed"] == result["run"], result
    assert name in MAY_MOVE or result["moved"] == 0, result["results"]


def test_ondisk_index_killed_between_shards_and_when_publishing_then_rerun(tmp_path, monkeypatch):
    """`delf index --backend=ivfpq-ondisk`: killed when publishing its second shard, its
    merged lists, and the index (the swap); the rerun resumes and holds every row once."""
    import faiss
    from crash_harness import SCENARIOS, sweep

    def points(calls):
        renames = [call for call in calls if call.syscall.startswith("rename")]
        published = ('shard_00001.faiss") = 0', 'neighbors.faiss") = 0')
        return [call for call in renames if call.args.endswith(published)] + renames[-1:]

    # FAISS's OpenMP k-means on 2 busy cores: ~10x slower with 2 threads than with 1.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the traced runs
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # the in-process reruns
    try:
        scenario = SCENARIOS["index-ondisk"]()
        result = sweep(scenario, tmp_path, choose=points, rerun=in_process(scenario))
    finally:
        faiss.omp_set_num_threads(threads)
    assert result["run"] == 3 and result["killed"] == 3 and result["moved"] == 0, result
    states = [point["state"] for point in result["results"]]
    assert states == ["previous", "previous", "previous"], states


@pytest.mark.parametrize("name", list(FIXED))
def test_tensorflow_commands_killed_when_publishing_then_rerun(name, tmp_path):
    from crash_harness import SCENARIOS, sweep

    scenario = SCENARIOS[name]()
    point, published = FIXED[name]
    result = sweep(scenario, tmp_path, rerun=in_process(scenario), fixed=[point])
    [only] = result["results"]
    assert only["hit"] and only["hit"].startswith("rename") and published in only["hit"], (
        f"the crash point moved: {only['hit']} (update FIXED: the command's renames changed)"
    )
    assert only["state"] == "previous"  # killed before its result was published
