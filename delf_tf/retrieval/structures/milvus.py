"""First-stage retrieval on Milvus: header "neighbors" or "global" with backend "milvus".

`delf index --backend=milvus --milvus_uri=PATH_OR_URL` puts the votes ranking's
local descriptors and (DELG) the global descriptors into Milvus collections instead
of FAISS files. A URI ending in ".db" is Milvus Lite, the embedded engine (a folder
of this machine, opened in this process); anything else is a Milvus server or
cluster (`http://host:19530`) reached through the same `pymilvus.MilvusClient`.

  local  (votes): one row per database descriptor: "row" (INT64 primary key, the
         index's descriptor row), "image" (INT64), "vector" (FLOAT_VECTOR [D]);
         metric IP over the unit-norm descriptors (checked when built), turned
         into the squared L2 distance FAISS returns (|q|^2 + 1 - 2 q.d), so the
         votes are counted by `structures.votes.vote`, the FAISS path's own code.
         (IP, not L2: Milvus Lite's exact L2 materialises a [queries, rows, D]
         difference array, 16 GB for 100 queries over 10^6 rows; IP is one product.)
  global: one row per image: "image" (INT64 primary key), "vector" [G]; metric IP.

The structure is `external`: it owns no file of the index directory; its header
records "uri", "collection", "partitions", "prefix", the fingerprint and the stores it
read. A build fills a new collection, `<prefix>_<local|global>_<token>`, in its
"_default" partition. An append (`delf index --append`) adds a partition
`p_<token>` to the same collection holding only the new rows (row and image ids
continue the old ones), and the new index.json names the old partitions plus it:
readers search the partitions their index.json names, so a reader of the previous
generation keeps its exact rows while the append runs and after it. After the
directory swap (`published`) every collection of the prefix other than the named
one, and every partition of it that index.json does not name, is dropped: the
previous generation's collection after a rebuild, and whatever a killed writer left.
A kill at any instant therefore leaves index.json naming complete partitions (filled
and flushed before the swap). An append past `MAX_PARTITIONS` partitions, or to
another URI or prefix, copies every row into a new collection of one partition (as
a build); readers of the dropped collection see `IndexChangedError` and load the
index again.

ASMK* stays FAISS-only: its inverted file is keyed by visual word and scores an
image by a selective kernel over aggregated binary residuals per (image, word);
Milvus offers k-NN over vectors, so ASMK* would be one filtered Hamming search per
query word (hundreds per query) and the kernel summed client-side: no first stage.

Search workers read the shortlist's local features for RANSAC from the feature
store through `tf.io.gfile` (`delf_tf.features.remote`), not from the index's
arrays: `reads_store` on the loaded objects tells the `Searcher`.
"""

from __future__ import annotations

import logging as logging_module
import os
import re
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import logging

from delf_tf.errors import InputError
from delf_tf.matching.neighbors import _bounded, _empty
from delf_tf.retrieval.structures.base import (
    BuildOptions,
    Collection,
    IndexChangedError,
    IndexFormatError,
    Ranking,
    SearchStructure,
)

if TYPE_CHECKING:
    from delf_tf.config import RetrievalConfig
    from delf_tf.features.local_features import LocalFeatures

BACKEND = "milvus"
VECTOR, ROW, IMAGE = "vector", "row", "image"
FINGERPRINT_PROPERTY = "delf.fingerprint"
# Index type of the vector field: exact on Milvus Lite; a cluster may use IVF/HNSW.
INDEX_TYPE = "FLAT"
# Rows per insert call, query vectors per search call (Milvus Lite's exact search holds
# a float32 [batch, rows] array: 256 MB per 10^6 rows at 64).
INSERT_BATCH = 10_000
SEARCH_BATCH = 64
# Milvus returns at most this many results per query vector (its topk limit).
MAX_LIMIT = 16_384
# Images the global ranking asks for (as FAISS's IVF global structure: the exact FAISS
# ranking returns every image; only the first `shortlist` are verified).
GLOBAL_CANDIDATES = 1000
# Partitions of one collection (one per append) before an append copies the rows into
# a new collection of one partition. Milvus allows 1024 per collection by default; a
# search names every partition of its generation.
MAX_PARTITIONS = 64
DEFAULT_PARTITION = "_default"
# Database descriptors must be unit-norm within this (IP stands for L2).
UNIT_TOLERANCE = 1e-3
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()
# Why Milvus Lite failed to open a file, by absolute path: its server manager logs the
# exception (a traceback) and pymilvus then raises a bare "Open local milvus failed".
_lite_failures: dict[str, BaseException] = {}


def location(uri: str) -> str:
    """The URI recorded in the index: a Milvus Lite ".db" path made absolute, a URL kept."""
    if "://" in uri or not uri.endswith(".db"):
        if "://" not in uri:
            raise InputError(
                f"--milvus_uri={uri}: a Milvus Lite file ends in .db; a server is a URL "
                "(http://host:19530)"
            )
        return uri
    return str(Path(uri).resolve())


def client(uri: str) -> Any:
    """The process's one `MilvusClient` of `uri` (Milvus Lite starts on first use)."""
    with _clients_lock:
        found = _clients.get(uri)
        if found is not None:
            return found
        try:
            from pymilvus import MilvusClient
        except ImportError as error:
            raise InputError(
                "the milvus back end needs pymilvus (pip install 'delf-tf[milvus]')"
            ) from error
        if _is_lite(uri):
            _quiet_lite()
        _lite_failures.pop(os.path.abspath(uri), None)
        try:
            found = MilvusClient(uri)
        except Exception as error:  # pymilvus raises its own family, and OSError
            cause = _lite_failures.pop(os.path.abspath(uri), None) if _is_lite(uri) else None
            if cause is not None and type(cause).__name__ == "DataDirLockedError":
                raise InputError(
                    f"{uri}: this Milvus Lite file is in use by another process (a running "
                    "`delf serve --index`, `delf index` or `delf search`): Milvus Lite opens "
                    "a file in one process at a time; stop that process first, or use a "
                    "Milvus server (--milvus_uri=http://HOST:19530) to search while indexing"
                ) from error
            detail = _one_line(cause) if cause is not None else _one_line(error)
            raise IndexFormatError(f"{uri}: cannot open Milvus ({detail})") from error
        _clients[uri] = found
        return found


def release(uri: str) -> None:
    """Closes the process's client of `uri`; Milvus Lite's file lock is given back."""
    with _clients_lock:
        found = _clients.pop(uri, None)
    if found is not None:
        found.close()
    if _is_lite(uri):
        from milvus_lite import server_manager_instance

        server_manager_instance.release_server(uri)


def _quiet_lite() -> None:
    """Milvus Lite's routine lines off stderr: its INFO lines (start, segment indexes) and
    the in-process gRPC server's traceback for the AllocTimestamp call pymilvus probes
    and Lite does not implement (the client carries on). DELF_TF_LOGS=1 keeps them."""
    from delf_tf.tf_runtime import VERBOSE_ENV, quiet_library_loggers

    quiet_library_loggers()
    manager = logging_module.getLogger("milvus_lite.server_manager")
    if _start_failure not in manager.filters:
        manager.addFilter(_start_failure)
    if os.environ.get(VERBOSE_ENV) != "1":
        server = logging_module.getLogger("grpc._server")
        if _not_unimplemented not in server.filters:
            server.addFilter(_not_unimplemented)


def _start_failure(record) -> bool:
    """Keeps the exception of Lite's "Failed to start MilvusLite server for PATH" record
    for `client`'s one-line error, instead of its traceback on stderr."""
    if record.exc_info and "Failed to start" in str(record.msg) and record.args:
        _lite_failures[str(record.args[0])] = record.exc_info[1]
        return False
    return True


def _not_unimplemented(record) -> bool:
    return "Method not implemented" not in record.getMessage()


def _is_lite(uri: str) -> bool:
    return uri.endswith(".db") and "://" not in uri


def _one_line(error: Exception) -> str:
    return " ".join(str(getattr(error, "message", None) or error).split())[:300]


class MilvusNeighbors:
    """The votes ranking's k-NN over a Milvus collection (a `NeighborIndex`).

    `search` returns what `FlatNeighbors.search` does: ([Q, k] distances, [Q, k]
    descriptor rows, MISSING beyond `max_distance`), from Milvus's squared L2.
    """

    name = BACKEND
    reads_store = True

    def __init__(
        self,
        milvus: Any,
        collection: str,
        count: int,
        stores: dict[str, str],
        partitions: list[str] | None = None,
    ):
        self._client, self.collection, self._count = milvus, collection, count
        self.stores, self.partitions = stores, partitions

    def __len__(self) -> int:
        return self._count

    def memory_bytes(self) -> int:
        return 0  # in Milvus, not in this process

    def search(self, queries: np.ndarray, k: int, max_distance: float):
        queries = np.ascontiguousarray(queries, np.float32)
        if self._count == 0 or len(queries) == 0:
            return _empty(len(queries), k)
        kk = min(k, self._count, MAX_LIMIT)
        squared = np.full((len(queries), kk), np.inf, np.float32)
        nearest = np.full((len(queries), kk), -1, np.int64)
        norms = np.einsum("ij,ij->i", queries, queries)
        for start in range(0, len(queries), SEARCH_BATCH):
            batch = queries[start : start + SEARCH_BATCH]
            found = _search(self._client, self.collection, batch, kk, "IP", self.partitions)
            for offset, hits in enumerate(found):
                size, row = len(hits.ids), start + offset
                nearest[row, :size] = hits.ids
                squared[row, :size] = norms[row] + 1.0 - 2.0 * np.asarray(hits.distances)
        return _bounded(squared, nearest, k, max_distance)


class MilvusGlobalRanker:
    """The global ranking over a Milvus collection (what `GlobalRanker.rank` returns)."""

    kind = BACKEND
    reads_store = True

    def __init__(self, milvus: Any, collection: str, count: int, dim: int, stores, partitions=None):
        self._client, self.collection, self._count, self.dim = milvus, collection, count, dim
        self.stores, self.partitions = stores, partitions

    def rank(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image ids int64 [R], inner products float32 [R]), best first; R <= 1000."""
        query = np.asarray(query, np.float32).reshape(1, -1)
        if query.shape[1] != self.dim:
            raise ValueError(
                f"query global descriptor is {query.shape[1]}-D, the index holds {self.dim}-D"
            )
        if self._count == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        limit = min(self._count, GLOBAL_CANDIDATES)
        [hits] = _search(self._client, self.collection, query, limit, "IP", self.partitions)
        ids = np.asarray(hits.ids, np.int64)
        scores = np.asarray(hits.distances, np.float32)
        order = np.lexsort((ids, -scores))  # ties by image id, as the exact ranking's stable sort
        return ids[order], scores[order]


def _search(
    milvus: Any,
    collection: str,
    vectors: np.ndarray,
    limit: int,
    metric: str,
    partitions: list[str] | None,
):
    """Milvus search over the partitions of one generation (None: the whole collection)."""
    try:
        return milvus.search(
            collection,
            data=vectors,
            limit=limit,
            search_params={"metric_type": metric},
            partition_names=partitions,
        )
    except Exception as error:
        detail = _one_line(error)
        if "not exist" in detail or "not found" in detail:
            raise IndexChangedError(
                f"Milvus collection {collection} no longer exists: the index was replaced "
                "since it was loaded; load it again"
            ) from error
        raise IndexFormatError(
            f"Milvus collection {collection}: search failed ({detail})"
        ) from error


class _MilvusStructure(SearchStructure):
    """What the local and the global Milvus structures share (header, life cycle)."""

    external = True
    part: str  # "local" or "global": the collection name's middle

    @classmethod
    def check_header(cls, header: Any, where: str) -> None:
        super().check_header(header, where)
        if header.get("backend") != BACKEND:
            raise IndexFormatError(f"{where}.backend: expected {BACKEND!r}")
        for field in ("collection", "prefix"):
            if not (isinstance(header.get(field), str) and _NAME.fullmatch(header[field])):
                raise IndexFormatError(f"{where}.{field}: expected a Milvus collection name")
        partitions = header.get("partitions", [DEFAULT_PARTITION])
        if not (
            isinstance(partitions, list)
            and partitions
            and all(isinstance(name, str) and _NAME.fullmatch(name) for name in partitions)
        ):
            raise IndexFormatError(f"{where}.partitions: expected a list of partition names")
        stores = header.get("stores", {})
        if not isinstance(stores, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in stores.items()
        ):
            raise IndexFormatError(f"{where}.stores: expected {{store id: location}}")

    # --- building ---------------------------------------------------------------------

    @classmethod
    def build(cls, collection: Collection, options: BuildOptions, notes: list[str]):
        if not options.milvus_uri:
            raise InputError("--backend=milvus needs --milvus_uri (a .db file or a server URL)")
        prefix = options.milvus_prefix or f"delf_{uuid.uuid4().hex[:12]}"
        return cls._filled(collection, location(options.milvus_uri), prefix, options, {}, notes)

    def append(self, collection: Collection, options: BuildOptions, notes: list[str]):
        uri = location(options.milvus_uri) if options.milvus_uri else self.header["uri"]
        if (
            uri == self.header["uri"]
            and self.header.get(self.covers) == getattr(collection, self.covers)
            and self.header.get("fingerprint") == collection.fingerprint
        ):
            stores = {**self.header.get("stores", {}), **(options.stores or {})}
            if stores == self.header.get("stores", {}):
                return self, "kept"
            return type(self)({**self.header, "stores": stores}, self.value, True), "kept"
        prefix = options.milvus_prefix or self.header["prefix"]
        partitions = self.header.get("partitions")
        if (
            (uri, prefix) == (self.header["uri"], self.header["prefix"])
            and self.header.get("fingerprint") == collection.fingerprint
            and partitions is not None  # older headers search the whole collection
            and len(partitions) < MAX_PARTITIONS
            and getattr(collection, self.covers) > self.header[self.covers]
        ):
            return self._extended(collection, options, notes), "extended"
        made = self._filled(collection, uri, prefix, options, self.header.get("stores", {}), notes)
        return made, "extended"

    def _extended(self, collection: Collection, options: BuildOptions, notes: list[str]):
        """This generation's collection with a new partition holding the rows past the
        previous count (the collection's rows are a prefix of it: appends add at the end)."""
        header, uri, name = self.header, self.header["uri"], self.header["collection"]
        milvus = client(uri)
        partition = f"p_{uuid.uuid4().hex[:12]}"
        vectors, ids, extra = self._rows(collection)
        first = int(header[self.covers])
        try:
            milvus.create_partition(name, partition)
            self._insert(milvus, name, vectors, ids, extra, first, partition)
        except Exception as error:
            raise IndexFormatError(
                f"{uri}: writing partition {partition} of Milvus collection {name} failed "
                f"({_one_line(error)})"
            ) from error
        notes.append(
            f"milvus: {len(vectors) - first} rows into partition {partition} of {name} at {uri}"
        )
        made = type(self)(
            {
                **header,
                self.covers: int(len(vectors)),
                "partitions": [*header["partitions"], partition],
                "stores": {**header.get("stores", {}), **(options.stores or {})},
            },
            None,
            True,
        )
        made.value = made._object(milvus)
        return made

    @classmethod
    def _insert(cls, milvus, name, vectors, ids, extra, first: int, partition: str) -> None:
        """Inserts rows [first, len(vectors)) into `partition` and flushes them."""
        for start in range(first, len(vectors), INSERT_BATCH):
            stop = min(start + INSERT_BATCH, len(vectors))
            block = np.asarray(vectors[start:stop], np.float32)
            rows = [
                {cls.key: int(ids[i]), VECTOR: block[i - start]}
                | ({IMAGE: int(extra[i])} if extra is not None else {})
                for i in range(start, stop)
            ]
            milvus.insert(name, rows, partition_name=partition)
        milvus.flush(name)  # durable before index.json names it

    @classmethod
    def _filled(cls, collection, uri, prefix, options, stores, notes):
        """A new collection of this generation holding every row of `collection`."""
        from pymilvus import DataType

        milvus = client(uri)
        name = f"{prefix}_{cls.part}_{uuid.uuid4().hex[:8]}"
        vectors, ids, extra = cls._rows(collection)
        schema = milvus.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(cls.key, DataType.INT64, is_primary=True)
        if extra is not None:
            schema.add_field(IMAGE, DataType.INT64)
        schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=int(vectors.shape[1]))
        index_params = milvus.prepare_index_params()
        index_params.add_index(field_name=VECTOR, index_type=INDEX_TYPE, metric_type=cls.metric)
        try:
            milvus.create_collection(name, schema=schema, index_params=index_params)
            milvus.alter_collection_properties(
                name, properties={FINGERPRINT_PROPERTY: collection.fingerprint or ""}
            )
            cls._insert(milvus, name, vectors, ids, extra, 0, DEFAULT_PARTITION)
        except Exception as error:
            raise IndexFormatError(
                f"{uri}: writing Milvus collection {name} failed ({_one_line(error)})"
            ) from error
        notes.append(f"milvus: {len(vectors)} rows into collection {name} at {uri}")
        header = {
            "backend": BACKEND,
            "kind": BACKEND,
            "uri": uri,
            "collection": name,
            "partitions": [DEFAULT_PARTITION],
            "prefix": prefix,
            "fingerprint": collection.fingerprint,
            cls.covers: int(len(vectors)),
            "dim": int(vectors.shape[1]),
            "metric": cls.metric,
            "index_type": INDEX_TYPE,
            "stores": {**stores, **(options.stores or {})},
        }
        structure = cls(header, None, fresh=True)
        structure.value = structure._object(milvus)
        return structure

    # --- disk -------------------------------------------------------------------------

    def save(self, staging, source) -> None:
        """Nothing to write: the collection was filled and flushed when it was made."""

    def loaded(self) -> bool:
        return False  # the collection stays where it is across the directory swap

    def load(self, collection: Collection, mmap: bool = True):
        header, uri, name = self.header, self.header["uri"], self.header["collection"]
        partitions = header.get("partitions")
        milvus = client(uri)
        try:
            present = milvus.has_collection(name)
            if present:
                if partitions is None:
                    rows = int(milvus.get_collection_stats(name)["row_count"])
                else:
                    there = set(milvus.list_partitions(name))
                    missing = [p for p in partitions if p not in there]
                    if missing:
                        raise IndexFormatError(
                            f"{uri}: Milvus collection {name} lacks partition(s) {missing} "
                            "that the index names; rebuild it with `delf index`"
                        )
                    rows = sum(
                        int(milvus.get_partition_stats(name, p)["row_count"]) for p in partitions
                    )
                properties = milvus.describe_collection(name).get("properties") or {}
        except IndexFormatError:
            raise
        except Exception as error:
            raise IndexFormatError(f"{uri}: Milvus unreachable ({_one_line(error)})") from error
        if not present:
            collection.check_unchanged()  # dropped by a newer generation: IndexChangedError
            raise IndexFormatError(
                f"{collection.path or 'index'}: Milvus collection {name} is missing at {uri}; "
                "rebuild it with `delf index --backend=milvus`"
            )
        found = properties.get(FINGERPRINT_PROPERTY) or None
        if found != collection.fingerprint:
            raise IndexFormatError(
                f"{uri}: Milvus collection {name} was built from features of extractor "
                f"{(found or '(none)')[:12]}, the index holds "
                f"{(collection.fingerprint or '(none)')[:12]}; rebuild it with `delf index`"
            )
        expected = getattr(collection, self.covers)
        if rows != expected or header.get(self.covers) != expected:
            raise IndexFormatError(
                f"{uri}: Milvus collection {name} holds {rows} rows, the index has {expected}"
            )
        try:
            milvus.load_collection(name)
        except Exception as error:
            raise IndexFormatError(f"{uri}: cannot load {name} ({_one_line(error)})") from error
        return self._object(milvus)

    # --- generations --------------------------------------------------------------------

    def published(self, previous: SearchStructure | None) -> None:
        """After the swap: drops the other collections of this prefix and part (the
        previous generation's, a killed writer's); a previous header of another
        location or prefix is retired."""
        self._sweep(keep=self.header["collection"])
        self._sweep_partitions()
        if isinstance(previous, _MilvusStructure) and (
            previous.header["uri"],
            previous.header["prefix"],
        ) != (self.header["uri"], self.header["prefix"]):
            previous.retired()

    def retired(self) -> None:
        """No index names this prefix's collections any more: all of them are dropped."""
        self._sweep(keep=None)

    def _sweep_partitions(self) -> None:
        """Drops the partitions of this collection that index.json does not name (a
        killed append's); readers of older generations name a subset of these."""
        named = self.header.get("partitions")
        if named is None:
            return
        name, doomed = self.header["collection"], []
        try:
            milvus = client(self.header["uri"])
            doomed = [
                p for p in milvus.list_partitions(name) if p not in named and p != DEFAULT_PARTITION
            ]
            for partition in doomed:
                try:
                    milvus.drop_partition(name, partition)
                except Exception:  # a server drops released partitions only (Lite: any)
                    milvus.release_partitions(name, [partition])
                    milvus.drop_partition(name, partition)
        except Exception as error:  # published already: a leftover is dropped next time
            logging.warning("milvus: could not drop %s of %s (%s)", doomed, name, _one_line(error))

    def _sweep(self, keep: str | None) -> None:
        doomed: list[str] = []
        try:
            milvus = client(self.header["uri"])
            start = f"{self.header['prefix']}_{self.part}_"
            doomed = [n for n in milvus.list_collections() if n.startswith(start) and n != keep]
            for name in doomed:
                milvus.drop_collection(name)
        except Exception as error:  # published already: a leftover is dropped next time
            logging.warning("milvus: could not drop %s (%s)", doomed, _one_line(error))


class MilvusVotesStructure(_MilvusStructure):
    """The votes ranking's descriptors in Milvus (value: `MilvusNeighbors`)."""

    name = "neighbors"
    covers = "num_descriptors"
    part, key, metric = "local", ROW, "IP"

    @staticmethod
    def _rows(collection: Collection):
        descriptors = collection.descriptors
        for start in range(0, len(descriptors), 1 << 20):
            block = np.asarray(descriptors[start : start + (1 << 20)], np.float32)
            squared = np.einsum("ij,ij->i", block, block)
            worst = int(np.argmax(np.abs(squared - 1.0))) if squared.size else 0
            if squared.size and abs(float(squared[worst]) - 1.0) > UNIT_TOLERANCE:
                raise InputError(
                    "the milvus back end ranks unit-norm local descriptors (inner product "
                    f"for L2); descriptor {start + worst} has squared norm "
                    f"{float(squared[worst]):.4f}"
                )
        ids = np.arange(collection.num_descriptors, dtype=np.int64)
        return collection.descriptors, ids, np.asarray(collection.image_ids)

    def _object(self, milvus: Any) -> MilvusNeighbors:
        count = self.header["num_descriptors"]
        return MilvusNeighbors(
            milvus,
            self.header["collection"],
            count,
            self.header["stores"],
            self.header.get("partitions"),
        )

    def search(
        self, collection: Collection, query: LocalFeatures, config: RetrievalConfig
    ) -> Ranking:
        from delf_tf.retrieval.structures.votes import VotesStructure

        return VotesStructure.wrap(self.value).search(collection, query, config)


class MilvusGlobalStructure(_MilvusStructure):
    """The global ranking's descriptors in Milvus (value: `MilvusGlobalRanker`)."""

    name = "global"
    covers = "num_images"
    part, key, metric = "global", IMAGE, "IP"

    @staticmethod
    def _rows(collection: Collection):
        descriptors = collection.global_descriptors
        return descriptors, np.arange(len(descriptors), dtype=np.int64), None

    def _object(self, milvus: Any) -> MilvusGlobalRanker:
        header = self.header
        return MilvusGlobalRanker(
            milvus,
            header["collection"],
            header["num_images"],
            header["dim"],
            header["stores"],
            header.get("partitions"),
        )

    def search(
        self, collection: Collection, query: LocalFeatures, config: RetrievalConfig
    ) -> Ranking:
        from delf_tf.retrieval.structures.global_descriptors import GlobalStructure

        return GlobalStructure.wrap(self.value).search(collection, query, config)


def is_milvus(header: Any) -> bool:
    """Whether an index.json structure header is a Milvus one."""
    return isinstance(header, dict) and header.get("backend") == BACKEND
