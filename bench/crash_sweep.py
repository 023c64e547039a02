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
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from crash_harness import SCENARIOS, strace_unavailable, sweep  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = "extract,index,index-append,fit-pca,export"
    parser.add_argument("--commands", default=default, help=f"of {sorted(SCENARIOS)}")
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
