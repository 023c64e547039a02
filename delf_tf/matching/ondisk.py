"""IVF-PQ with on-disk inverted lists: built in shards, resumably, and searched from disk.

For collections past one machine's memory (10^8 local descriptors: ~2.8 GB of codes,
16 GB of float32 descriptors). Neither the build nor the search holds the codes:

1. `trained.faiss`: the coarse cells and PQ codebooks, trained on a sample
   (`IvfPqNeighbors.train(add=False)`), or, when extending, taken from the previous
   structure (no retraining);
2. `shard_NNNNN.faiss`: the trained index with rows [k * shard_rows, (k + 1) *
   shard_rows) of the memory-mapped descriptors added (FAISS ids = rows);
3. `<name>.faiss` + `<name>.ivfdata`: every shard's lists (and, when extending, the
   previous structure's) merged into FAISS `OnDiskInvertedLists`
   (`merge_from_multiple`), after which the shards are deleted.

Every file is published atomically (`delf_tf.atomic.atomic_write`), and a rerun in
the same folder skips the published ones: a build killed after shard k resumes at
shard k + 1. The caller owns the folder and must give a fresh one for other data
(`structures/votes.py` names it after a digest of the rows and parameters).
`timings.json` holds the seconds of each step, added up over interrupted runs.

FAISS's on-disk lists hold plain codes, not fast-scan's blocks of 32 codes, so this
uses 8-bit PQ (`IndexIVFPQ`): 2-D sub-vectors, dim / 2 bytes per code plus the 8-byte
id (28 B per descriptor at 40-D, against 28 for in-memory 4-bit fast-scan at 1-D
sub-vectors); scanning 8-bit codes costs ~10x fast-scan's per code, so
`ondisk_parameters` takes twice the derived lists. The lists are read with
`faiss.IO_FLAG_ONDISK_SAME_DIR` (the data file beside the `.faiss` file, paged in by
the kernel on demand); IO_FLAG_MMAP on top of it crashes FAISS 1.x, so it is not used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from delf_tf.atomic import atomic_write, atomic_write_text
from delf_tf.errors import InputError
from delf_tf.matching.neighbors import (
    _ADD_EF_SEARCH,
    IvfPqNeighbors,
    IvfPqParameters,
    ivfpq_parameters,
)

TRAINED = "trained.faiss"
TIMINGS = "timings.json"
# Descriptors per shard: the codes of one shard are in memory while it is built
# (10^7 x 28 B = 280 MB), plus one chunk of ADD_ROWS float32 rows.
SHARD_ROWS = 10_000_000
ADD_ROWS = 1 << 20
NAME = "ivfpq-ondisk"


def shard_name(number: int) -> str:
    return f"shard_{number:05d}.faiss"


def ondisk_parameters(count: int, dim: int, nprobe: int = 32) -> IvfPqParameters:
    """IVF-PQ parameters of an on-disk structure over `count` descriptors of `dim` dims.

    From `ivfpq_parameters`: twice its lists (8-bit codes scan ~10x slower than
    fast-scan's, so fewer codes per list), at most 65536 and count / 64; 8-bit codes
    on 2-D sub-vectors (a divisor of dim); an HNSW coarse quantizer from 16384 lists
    on; `nprobe` lists per query; trained on 64 points per list.
    """
    derived = ivfpq_parameters(count, dim)
    nlist = int(min(65_536, 2 * derived.nlist, max(count // 64, 16)))
    subquantizers = max(1, dim // 2)
    while dim % subquantizers:
        subquantizers -= 1
    return dataclasses.replace(
        derived,
        nlist=nlist,
        subquantizers=subquantizers,
        quantizer="hnsw" if nlist >= 16_384 else "flat",
        nprobe=min(nprobe, nlist),
        train_size=int(min(count, 64 * nlist)),
        bits=8,
    )


class OnDiskIvfPqNeighbors(IvfPqNeighbors):
    """An `IvfPqNeighbors` whose inverted lists stay in a `.ivfdata` file (read-only)."""

    def __init__(self, index: Any, descriptors: np.ndarray, parameters: IvfPqParameters):
        super().__init__(index, descriptors, parameters, read_only=True)
        self.name = NAME

    @classmethod
    def load(  # type: ignore[override]
        cls, path: str | Path, descriptors: np.ndarray, parameters: IvfPqParameters
    ) -> OnDiskIvfPqNeighbors:
        """Reads `path` with its lists on disk (the `.ivfdata` file beside it).

        FAISS errors (a missing or damaged file) are RuntimeError; ntotal must be the
        rows of `descriptors` (InputError)."""
        index = read_ondisk(path)
        if int(index.ntotal) != len(descriptors):
            raise InputError(
                f"{path}: holds {index.ntotal} descriptors, the index has {len(descriptors)}"
            )
        return cls(index, descriptors, parameters)

    def disk_bytes(self, path: str | Path) -> int:
        """Bytes of the `.faiss` file and its `.ivfdata` lists."""
        path = Path(path)
        return path.stat().st_size + path.with_suffix(".ivfdata").stat().st_size


def read_ondisk(path: str | Path) -> Any:
    """A `.faiss` file read with its on-disk lists (`.ivfdata`) beside it."""
    import faiss

    with _native_stdout_silenced():
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)


_STDOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """fd 1 to /dev/null: FAISS's on-disk lists printf() a line when read ("updating
    ondisk filename") and merged ("resizing"), which would end up in the JSON that
    `delf search` prints on stdout."""
    with _STDOUT_LOCK:
        sys.stdout.flush()
        saved = os.dup(1)
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(null)


def build_ondisk(
    descriptors: np.ndarray,
    parameters: IvfPqParameters,
    folder: str | Path,
    shard_rows: int = SHARD_ROWS,
    name: str = "merged",
    base: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[OnDiskIvfPqNeighbors, dict[str, float]]:
    """IVF-PQ over float32 [M, D] `descriptors` (memory-mapped), built in `folder`.

    Returns the structure loaded from `folder / f"{name}.faiss"` (lists on disk) and
    the seconds of each step. Resumable: see the module docstring.
    base: a previous structure's `.faiss` file (lists in its `.ivfdata` beside it)
      covering rows [0, B): its cells and codebooks are kept (no training), its lists
      merged with shards of rows [B, M) only.
    log: called with one line per finished step (default: absl logging).
    """
    import faiss

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = len(descriptors)
    log = log or logging.info
    timings_file = folder / TIMINGS
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    clock = [time.perf_counter()]

    def publish(target: Path, index: Any) -> None:
        atomic_write(target, lambda handle: faiss.write_index(index, _writer(handle)))
        now = time.perf_counter()
        timings[target.stem] = round(now - clock[0], 1)
        clock[0] = now
        atomic_write_text(timings_file, json.dumps(timings, indent=1))
        log(f"{folder / target.name} in {timings[target.stem]} s")

    merged, data = folder / f"{name}.faiss", folder / f"{name}.ivfdata"
    if merged.exists() and not data.exists():  # a removal of the folder killed midway
        merged.unlink()
    if not merged.exists():
        first = 0
        trained = folder / TRAINED
        if not trained.exists():
            if base is not None:
                publish(trained, _emptied(read_ondisk(base)))
            else:
                structure = IvfPqNeighbors.train(descriptors, parameters, add=False)
                publish(trained, structure._index)
        if base is not None:
            first = int(read_ondisk(base).ntotal)
        shards = []
        for number, start in enumerate(range(first, count, shard_rows)):
            shard = folder / shard_name(number)
            shards.append(shard)
            if shard.exists():
                continue
            clock[0] = time.perf_counter()
            part = faiss.read_index(str(trained))
            _adding_breadth(part, parameters)
            stop = min(count, start + shard_rows)
            for low in range(start, stop, ADD_ROWS):
                high = min(stop, low + ADD_ROWS)
                rows = np.ascontiguousarray(descriptors[low:high], dtype=np.float32)
                part.add_with_ids(rows, np.arange(low, high, dtype=np.int64))
            publish(shard, part)
            del part
        clock[0] = time.perf_counter()
        empty = faiss.read_index(str(trained))
        data.unlink(missing_ok=True)  # a merge killed midway
        sources = [read_ondisk(base)] if base is not None else []
        sources += [faiss.read_index(str(shard), faiss.IO_FLAG_MMAP) for shard in shards]
        _merge(empty, sources, data)
        _fsync(data)  # written through a memory map: durable before merged.faiss names it
        publish(merged, empty)
        for shard in shards:  # merged holds every code now
            shard.unlink()
    structure = OnDiskIvfPqNeighbors.load(merged, descriptors, parameters)
    return structure, timings


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _writer(handle):
    import faiss

    return faiss.PyCallbackIOWriter(handle.write)


def _adding_breadth(index: Any, parameters: IvfPqParameters) -> None:
    import faiss

    if parameters.quantizer == "hnsw":
        faiss.downcast_index(index.quantizer).hnsw.efSearch = _ADD_EF_SEARCH


def _emptied(index: Any) -> Any:
    """A trained IVF index without vectors: `index` (read with its lists on disk) with
    empty in-memory lists in their place."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    index.ntotal = ivf.ntotal = 0
    return index


def _merge(empty: Any, sources: list[Any], data: Path) -> None:
    """Moves the lists of `sources` (IVF indexes of the same training) into `empty` as
    `OnDiskInvertedLists` written to `data`."""
    import faiss

    ivf = faiss.extract_index_ivf(empty)
    if ivf.ntotal != 0:
        raise ValueError("merging into a non-empty index")
    pointers = faiss.InvertedListsPtrVector()
    for source in sources:
        pointers.push_back(faiss.extract_index_ivf(source).invlists)
    with _native_stdout_silenced():
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data))
        total = lists.merge_from_multiple(pointers.data(), pointers.size(), False)
    empty.ntotal = ivf.ntotal = total
    ivf.replace_invlists(lists, True)
    lists.this.disown()
