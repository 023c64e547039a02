"""The interface of a search structure of an index (votes k-NN, ASMK*, global; later Milvus).

A search structure ranks the images of one collection (the `Index`'s arrays) for a
query. It is recorded in index.json under "structures": {name: header}, where the
header is a JSON object that says everything needed to load it again (kind,
parameters, fingerprint, coverage, the files it owns). Each structure is one module
of `delf_tf.retrieval.structures` with one `SearchStructure` subclass:

  build   (classmethod) trains it over the whole collection
  append  extends it to a collection that grew (or retrains it when it must)
  save    writes its files into the index's staging folder (or copies them unchanged)
  load    reads it back (memory-mapped where it can), from the index directory
  search  ranks the collection's images for one query (`Ranking`)

Files live inside the index directory, named relative to it by the header
(`files()`); `confined` refuses any name that leaves the folder. A structure that
lives outside the directory (a Milvus collection) sets `external = True`, records
its location as a "uri" string in its header, owns no files, and is saved/loaded
through that URI: the directory swap then replaces only its header. Its readers must
not see another generation than the directory's, so such a structure writes a new
location per save (for example a collection named after the index's generation) and
names it in the header; the old one is dropped once no reader holds it.

Every problem of a header or a file is an `IndexFormatError` (one line, naming the
file): `check_header` validates the types of every field before anything is read.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from delf_tf.atomic import write_staged
from delf_tf.errors import InputError
from delf_tf.matching.ondisk import SHARD_ROWS
from delf_tf.retrieval.global_ranking import IVF_MIN_IMAGES

if TYPE_CHECKING:
    from delf_tf.config import RetrievalConfig
    from delf_tf.features.local_features import LocalFeatures


class IndexFormatError(InputError):
    """An index directory is missing, unreadable or inconsistent; the message names it."""


class IndexChangedError(IndexFormatError):
    """The index directory was replaced (a newer generation) while it was being read."""


class Collection(Protocol):
    """What a structure sees of the index: the collection's arrays and its directory.

    descriptors float32 [M, D], image_ids int32 [M], offsets int64 [N + 1],
    global_descriptors float32 [N, G] or None; path: the index directory (None
    before the first save).
    """

    descriptors: np.ndarray
    image_ids: np.ndarray
    offsets: np.ndarray
    global_descriptors: np.ndarray | None
    fingerprint: str | None
    path: Path | None

    @property
    def num_images(self) -> int: ...

    @property
    def num_descriptors(self) -> int: ...

    @property
    def dim(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What `delf index` asks of the structures (see `Index.build_structures`).

    backend: the votes k-NN kind (RetrievalConfig.backend values); None keeps the
      index's. codebook_size: ASMK words (None: keep / derive). recall: measure the
      sampled recall of an approximate k-NN structure. global_ivf_min_images: the
      global ranking gets an IVF structure from this many images on.
    milvus_uri: with backend "milvus": a Milvus Lite ".db" file or a server URL (None
      keeps the index's). milvus_prefix: its collections' name prefix (None: the
      index's, or a random one). stores: {store id: location} of the feature stores
      the index reads, recorded for the search workers (`structures.milvus`).
    work_dir: a folder for the state of resumable builds (backend "ivfpq-ondisk": its
      trained file and shards), kept across a kill so that a rerun resumes; None: a
      folder beside the index, or the system's temporary folder.
    shard_rows: descriptors per shard of the "ivfpq-ondisk" build.
    """

    backend: str | None = None
    codebook_size: int | None = None
    recall: bool = True
    progress: bool = True
    global_ivf_min_images: int = IVF_MIN_IMAGES
    milvus_uri: str | None = None
    milvus_prefix: str | None = None
    stores: dict[str, str] | None = None
    work_dir: str | None = None
    shard_rows: int = SHARD_ROWS


@dataclasses.dataclass(frozen=True)
class Ranking:
    """An initial ranking of the collection for one query, best first.

    ids: int64 [R] image ids; scores: float64 [R]. voted: the votes ranking's
    (votes int64 [N], query_rows int64 [V], database_rows int64 [V]) for its
    verification (None for the others).
    """

    ids: np.ndarray
    scores: np.ndarray
    voted: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


class SearchStructure(abc.ABC):
    """One search structure of an index: its index.json header and, once loaded, its object.

    header: the JSON object recorded under index.json "structures"[name].
    value: the loaded or built search object (None until `load`).
    fresh: built or changed in this process (saved by writing it); otherwise its
      files are copied from the index directory on save.
    """

    name: ClassVar[str]  # key under index.json "structures"
    covers: ClassVar[str]  # header field that counts what it covers (num_images / ...)
    external: ClassVar[bool] = False  # lives outside the index directory (header "uri")

    def __init__(self, header: dict[str, Any], value: Any = None, fresh: bool = False):
        self.header = header
        self.value = value
        self.fresh = fresh

    def copy(self) -> SearchStructure:
        """The same structure for another Index object (header copied, value shared)."""
        return type(self)(dict(self.header), self.value, self.fresh)

    @classmethod
    def wrap(cls, value: Any) -> SearchStructure:
        """A structure around an already loaded object (benchmarks, tests)."""
        return cls({}, value)

    # --- schema -----------------------------------------------------------------------

    @classmethod
    def check_header(cls, header: Any, where: str) -> None:
        """Raises IndexFormatError unless `header` is a well-typed header of this kind.

        The base checks the fields every structure has; subclasses add theirs.
        """
        if not isinstance(header, dict):
            raise IndexFormatError(f"{where}: expected a JSON object, got {type(header).__name__}")
        fingerprint = header.get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise IndexFormatError(f"{where}.fingerprint: expected a string")
        if cls.covers in header:
            count(header, cls.covers, where)
        if cls.external and not (isinstance(header.get("uri"), str) and header["uri"]):
            raise IndexFormatError(f"{where}.uri: expected the structure's location (string)")

    def files(self) -> list[str]:
        """Names (relative to the index directory) of the files and folders it owns."""
        return []

    # --- life cycle -------------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def build(
        cls, collection: Collection, options: BuildOptions, notes: list[str]
    ) -> SearchStructure:
        """Trains the structure over the whole collection (fresh); notes: sentences for users."""

    @abc.abstractmethod
    def append(
        self, collection: Collection, options: BuildOptions, notes: list[str]
    ) -> tuple[SearchStructure, str]:
        """Covers a collection that grew (or whose options changed): (structure, action).

        action: "kept" (nothing to do), "extended" (added without retraining) or
        "retrained" (built again: the options changed, or it outgrew its training).
        """

    def save(self, staging: Path, source: Path | None) -> None:
        """Writes its files into `staging` (fresh) or copies them from `source` (the
        index directory it was loaded from). The staging folder is fsynced and
        swapped in by `delf_tf.atomic.staged_directory`."""
        import shutil

        for name in self.files():
            if source is None:
                raise IndexFormatError(f"the {self.name} structure has no directory to copy from")
            origin = confined(source, name, f"{source}: structures.{self.name}")
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(origin, target)
            else:
                shutil.copyfile(origin, target)

    @abc.abstractmethod
    def load(self, collection: Collection, mmap: bool = True) -> Any:
        """The search object, read from `collection.path` (memory-mapped unless mmap=False)."""

    @abc.abstractmethod
    def search(
        self, collection: Collection, query: LocalFeatures, config: RetrievalConfig
    ) -> Ranking:
        """The initial ranking of the collection's images for `query` (uses `value`)."""

    def loaded(self) -> bool:
        """Whether `value` reads its own files (reloaded after a save moved them)."""
        return bool(getattr(self.value, "read_only", False))

    # --- external structures: after the directory swap --------------------------------

    def published(self, previous: SearchStructure | None) -> None:
        """Called once the directory swap made this header current; `previous`: the
        replaced generation's structure of the same name. An external structure drops
        the locations no header names any more (nothing to do for files)."""
        return None

    def retired(self) -> None:
        """Called after the swap for a previous generation's external structure that the
        new index no longer has: its location is dropped."""
        return None

    def saved(self) -> None:
        """Called once the directory swap made this structure's files current: what a
        build kept outside the index (a resumable build's folder) can go."""
        return None


# --- helpers of every structure -------------------------------------------------------


def confined(directory: str | os.PathLike, name: Any, where: str) -> Path:
    """`directory / name`, refused (IndexFormatError) unless it stays inside `directory`.

    `name` comes from index.json: it must be a relative path without "..", and it
    must not resolve (symbolic links followed) outside the folder.
    """
    relative = relative_name(name, where)
    directory = Path(directory)
    path = directory / relative
    root = directory.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise IndexFormatError(f"{where}: {name!r} leads outside the index folder")
    return path


def relative_name(name: Any, where: str) -> Path:
    """`name` as a relative path without "..", else IndexFormatError (see `confined`)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise IndexFormatError(f"{where}: expected a file name inside the index, got {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or relative.drive:
        raise IndexFormatError(f"{where}: {name!r} is not inside the index folder")
    return relative


def count(header: dict[str, Any], field: str, where: str) -> int:
    """header[field] as a non-negative int (not a bool), else IndexFormatError."""
    value = header.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise IndexFormatError(f"{where}.{field}: expected a non-negative integer, got {value!r}")
    return value


def mapping(header: dict[str, Any], field: str, where: str) -> dict[str, Any]:
    """header[field] as a JSON object (required), else IndexFormatError."""
    value = header.get(field)
    if not isinstance(value, dict):
        got = "nothing" if value is None else type(value).__name__
        raise IndexFormatError(f"{where}.{field}: expected a JSON object, got {got}")
    return value


def parameters(factory, header: dict[str, Any], where: str):
    """`factory(**header["parameters"])`, a malformed object being an IndexFormatError."""
    fields = mapping(header, "parameters", where)
    try:
        return factory(**fields)
    except (TypeError, ValueError) as error:
        raise IndexFormatError(f"{where}.parameters: malformed ({error})") from error


def read_array(path: Path, dtype: Any, shape: Any, mmap: bool, said_by: str = "index.json"):
    """The `.npy` file `path`, which index.json says is `dtype` [shape]; memory-mapped
    unless mmap=False. Its header is checked first: a file that claims another dtype or
    shape, or holds fewer bytes, is refused (IndexFormatError) before anything is
    allocated or mapped."""
    dtype = np.dtype(dtype)
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            found_shape, fortran, found_dtype = read_header(handle)
            data_bytes = os.fstat(handle.fileno()).st_size - handle.tell()
    except (OSError, ValueError) as error:
        raise IndexFormatError(f"{path}: unreadable array ({error})") from error
    if found_dtype != dtype or list(found_shape) != list(shape) or fortran:
        raise IndexFormatError(
            f"{path}: {found_dtype} {list(found_shape)}, {said_by} says {dtype.name} {shape}"
        )
    if data_bytes < int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise IndexFormatError(f"{path}: truncated ({data_bytes} bytes of data for {shape})")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise IndexFormatError(f"{path}: unreadable array ({error})") from error


def write_array(path: Path, array: np.ndarray) -> None:
    """Writes one `.npy` file (no pickle) into the index's staging folder (`delf_tf.atomic`)."""
    write_staged(path, lambda handle: np.save(handle, array, allow_pickle=False))


def write_json(path: Path, value: Any) -> None:
    """Writes one JSON file into the index's staging folder (`delf_tf.atomic`)."""
    text = json.dumps(value, indent=1 if isinstance(value, list) else 2) + "\n"
    write_staged(path, lambda handle: handle.write(text.encode("utf-8")))


def write_faiss(path: Path, index: Any) -> None:
    """Writes one FAISS index file into the index's staging folder (`delf_tf.atomic`)."""
    import faiss

    write_staged(
        path, lambda handle: faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))
    )


def read_faiss(path: Path, writable: bool) -> Any:
    """A FAISS index file: memory-mapped read-only, or fully read (writable).

    A damaged file is an IndexFormatError (FAISS's RuntimeError, one line).
    """
    import faiss

    flags = 0 if writable else faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300] or "unreadable"
        raise IndexFormatError(f"{path}: unreadable FAISS structure ({detail})") from error
