"""Exhaustive crash sweep: SIGKILL at every file-changing system call of five commands.

For each command (`delf extract`, `delf index`, `delf index --append`, `delf
fit-pca`, `delf export`) a clean run under strace lists its crash points: every
call of the main thread that changes a file under the run's folder (openat with
a writing flag, write, fsync, rename, unlink, mkdir, rmdir, ...). Then, for
N = 1, 2, ... over those points, the command runs again from the same starting
state and is killed on entry to that call (strace -e inject=SYSCALL:signal=SIGKILL:when=N),
after which the folder must hold the previous or the new complete result; the
command is rerun, and the result must be complete, with nothing lost, nothing
twice and no temporary left (tests/crash_harness.py has the checks).

Kills at calls that change nothing under the folder (TensorFlow's start-up,
writes to stderr) leave the same state as the previous point that does, so they
are not run again. Prints one JSON object: per command the crash points found
(by system call), the points run and killed, the states seen after the crash,
and the seconds taken. Exits 1 at the first failed check (printed).

    PYTHONPATH=. python bench/crash_sweep.py [--commands=extract,index,...] [--keep]

Concurrent writers (issue 20; `--concurrent=N`, default 5 rounds each, `--commands=` to
run them alone): two `delf index --append --wait_for_lock` runs started together into
one index (none may lose the other's images); the same without --wait_for_lock (the
second gets the one-line lock error, and the index holds exactly the stores of the runs
that exited 0); a writer SIGKILLed while it holds the lock (the next one gets it at
once: the kernel releases a dead process's flock); two processes creating one store with
different fingerprints behind a barrier (exactly one is accepted).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from crash_harness import (  # noqa: E402
    SCENARIOS,
    command_environment,
    delf_command,
    strace_unavailable,
    sweep,
    write_store,
)


def _index_keys(path: Path) -> list[str]:
    from delf_tf.retrieval import Index

    return sorted(record.key for record in Index.load(path, mmap=False).images)


def _start(arguments: list[str], cwd: Path):
    import subprocess

    return subprocess.Popen(
        delf_command(*arguments),
        cwd=cwd,
        env=command_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _appends(work: Path, rounds: int, wait: bool) -> dict:
    """Two `delf index --append` runs into one index per round; checks no lost update."""
    seconds, refused = [], 0
    for number in range(rounds):
        folder = work / f"round{number}"
        base = write_store(folder / "base", ["base0.jpg", "base1.jpg"], seed=number)
        stores = [
            write_store(folder / f"s{k}", [f"s{k}-{n}.jpg" for n in range(20)], seed=10 * k)
            for k in (1, 2)
        ]
        index = folder / "index"
        first = _start(["index", f"--features={base.root}", f"--output_dir={index}"], folder)
        assert first.wait(300) == 0, first.stderr.read()
        start = time.perf_counter()
        runs = [
            _start(
                ["index", "--append", f"--features={store.root}", f"--output_dir={index}"]
                + (["--wait_for_lock"] if wait else []),
                folder,
            )
            for store in stores
        ]
        outcomes = [(run.wait(300), run.stderr.read()) for run in runs]
        seconds.append(time.perf_counter() - start)
        expected = ["base0.jpg", "base1.jpg"]
        for (code, error), store in zip(outcomes, stores, strict=True):
            if code == 0:
                expected += [f"{store.root.name}-{n}.jpg" for n in range(20)]
            else:
                last = error.strip().splitlines()[-1]
                assert not wait and code == 1 and "another writer holds" in last, error[-2000:]
                assert "Traceback" not in error
                refused += 1
        assert _index_keys(index) == sorted(expected), f"round {number}: an update was lost"
    return {"rounds": rounds, "refused_second_writers": refused, "seconds_max": max(seconds)}


def _killed_holder(work: Path, rounds: int) -> dict:
    """A writer SIGKILLed while it holds the lock: the next writer gets the lock at once."""
    import os
    import signal

    from delf_tf.locks import lock_path

    waited = []
    for number in range(rounds):
        folder = work / f"killed{number}"
        store = write_store(folder / "store", [f"k{n}.jpg" for n in range(200)], seed=number)
        index = folder / "index"
        run = _start(["index", f"--features={store.root}", f"--output_dir={index}"], folder)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not Path(lock_path(index)).exists():
            time.sleep(0.01)
        time.sleep(0.3 * number / max(rounds - 1, 1))  # at several points of the run
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        start = time.perf_counter()
        again = _start(["index", f"--features={store.root}", f"--output_dir={index}"], folder)
        assert again.wait(300) == 0, again.stderr.read()
        waited.append(time.perf_counter() - start)
        assert len(_index_keys(index)) == 200
    return {"rounds": rounds, "rerun_seconds_max": round(max(waited), 2)}


def _create(root, fingerprint, barrier, results):
    from delf_tf.features.store import FeatureStore, StoreMismatchError

    barrier.wait()
    try:
        FeatureStore.open_or_create(root, fingerprint, {})
        results.put("accepted")
    except StoreMismatchError:
        results.put("refused")


def _store_creators(work: Path, rounds: int) -> dict:
    """Two processes creating one store with different fingerprints at one instant."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for number in range(rounds):
        barrier, results = context.Barrier(2), context.Queue()
        workers = [
            context.Process(
                target=_create, args=(work / f"store{number}", f * 64, barrier, results)
            )
            for f in "ab"
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        outcome = sorted(results.get(timeout=10) for _ in workers)
        assert outcome == ["accepted", "refused"], f"round {number}: {outcome}"
    return {"rounds": rounds, "exactly_one_accepted": True}


CONCURRENT = {
    "append-wait": lambda work, rounds: _appends(work, rounds, wait=True),
    "append-refuse": lambda work, rounds: _appends(work, rounds, wait=False),
    "killed-holder": _killed_holder,
    "store-creators": lambda work, rounds: _store_creators(work, 4 * rounds),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = "extract,index,index-append,fit-pca,export," + ",".join(CONCURRENT)
    parser.add_argument(
        "--commands", default=default, help=f"of {sorted(SCENARIOS) + sorted(CONCURRENT)}"
    )
    parser.add_argument("--concurrent", type=int, default=5, help="rounds per concurrent case")
    parser.add_argument("--keep", action="store_true", help="keep every crash folder")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--details", action="store_true", help="print every point's result")
    args = parser.parse_args()
    reason = strace_unavailable()
    if reason:
        print(json.dumps({"skipped": reason}))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="crash_sweep_"))
    report = {"work": str(work), "commands": {}}
    status = 0
    for name in args.commands.split(","):
        start = time.perf_counter()
        if name in CONCURRENT:
            try:
                result = CONCURRENT[name](work / name, args.concurrent)
            except AssertionError as error:
                report["commands"][name] = {"failed": str(error)[:4000]}
                status = 1
                break
            result["seconds"] = round(time.perf_counter() - start, 1)
            report["commands"][name] = result
            print(json.dumps({name: result}), file=sys.stderr, flush=True)
            continue
        try:
            result = sweep(SCENARIOS[name](), work / name, keep=args.keep)
        except AssertionError as error:
            report["commands"][name] = {"failed": str(error)[:4000]}
            status = 1
            break
        result["seconds"] = round(time.perf_counter() - start, 1)
        if not args.details:
            result["hits"] = sorted({r["hit"].split("(")[0] for r in result["results"] if r["hit"]})
            del result["results"]
        report["commands"][name] = result
        print(json.dumps({name: result}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
