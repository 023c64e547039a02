"""The search service: a long-running `Searcher` over an index directory, hot-reloaded.

`delf serve --index=INDEX_DIR` puts a `SearchService` beside the model repository
of the dev server (`local_server.LocalServer`): the same ports, limits, error
mapping and SIGTERM grace, and one more model name (`contract.SEARCH_MODEL_NAME`,
"index" by default) on PredictionService/Predict and POST /v1/models/<name>:predict.
Names, dtypes and shapes of the inputs and outputs are in `delf_tf.contract`.

A query is: decode (`delf_tf.images.decode_image`, bounded in pixels), extract
(the extractor given: in process, traced once at start, or TF Serving), the initial
ranking (`Searcher.initial`: k-NN votes, ASMK* or global) and verification
(`Searcher.verify`: the re-ranking's matches and RANSAC). Each stage is timed into a
Prometheus histogram.

Hot reload: a background thread polls `read_generation(INDEX_DIR)`. A new generation
is loaded (arrays memory-mapped, every ranking's structure opened) while the old
one keeps serving; the generation is read again after the load, and a load that
raced with a writer is thrown away and retried at the next poll (no half index).
Then one reference is swapped: a request takes the current `IndexSnapshot` once
and uses it to the end, so it sees one index, old or new. A new index that fails
to load (or holds features of another extractor) leaves the old one serving; the
failure shows in `status()` (REST GET /v1/models/<name>, /status). While INDEX_DIR
is missing (between the two renames of `Index.save`) nothing changes.

Bounds (`limits.SearchLimits`): `max_concurrent` searches run at once, `max_queued`
more wait for at most `queue_timeout` seconds; beyond that a request is refused at
once with RESOURCE_EXHAUSTED (REST: 503). Request bytes, batch size, connections and
timeouts are the dev server's (`ServerLimits`). Uploads stay in memory: nothing a
client sends is written to disk or unpickled.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from delf_tf.config import RANKINGS, RetrievalConfig
from delf_tf.contract import SEARCH_INPUT, SEARCH_MODEL_NAME, SEARCH_OUTPUTS
from delf_tf.images import ImageError, decode_image, load_image
from delf_tf.retrieval.index import Index, read_generation
from delf_tf.retrieval.search import Searcher, SearchResult, resolve_ranking
from delf_tf.serving.errors import ServingError
from delf_tf.serving.limits import SearchLimits

STAGES = ("decode", "extract", "ranking", "verification")
_THUMBNAILS = 512  # JPEG thumbnails kept in memory (~10 KB each)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class QueueFullError(ServingError):
    """The service's queue is full: RESOURCE_EXHAUSTED over gRPC, 503 over REST."""

    http_status = 503

    def __init__(self, message: str):
        super().__init__("RESOURCE_EXHAUSTED", message)


@dataclasses.dataclass(frozen=True)
class IndexSnapshot:
    """One loaded generation of the index: what a request uses from start to end.

    Attributes:
      index: the loaded Index (arrays memory-mapped).
      searchers: ranking method -> Searcher, for every method the index supports.
      default: the method used when a request names none.
      generation: `read_generation` of the directory when it was loaded.
      loaded_at: time.time() of the load.
      keys: store key -> image id (the files the index lists, for thumbnails).
    """

    index: Index
    searchers: dict[str, Searcher]
    default: str
    generation: int
    loaded_at: float
    keys: dict[str, int]


@dataclasses.dataclass(frozen=True)
class QueryAnswer:
    """One answered query: results best first, the pixels extracted, seconds per stage."""

    snapshot: IndexSnapshot
    method: str
    image: np.ndarray
    num_features: int
    results: list[SearchResult]
    stages: dict[str, float]


class SearchMetrics:
    """The service's Prometheus metrics, in a registry of their own (one per service)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        options = {"registry": self.registry}
        self.requests = Counter(
            "delf_search_requests", "search requests received", ["api"], **options
        )
        self.errors = Counter(
            "delf_search_errors",
            "search requests that failed, by status code",
            ["api", "code"],
            **options,
        )
        self.latency = Histogram(
            "delf_search_request_seconds",
            "search request latency",
            ["api"],
            buckets=_LATENCY_BUCKETS,
            **options,
        )
        self.stages = Histogram(
            "delf_search_stage_seconds",
            "seconds per query and stage: decode, extract, ranking (k-NN votes / ASMK* / "
            "global), verification (re-ranking matches and RANSAC)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            **options,
        )
        self.images = Gauge("delf_search_index_images", "images in the served index", **options)
        self.generation = Gauge(
            "delf_search_index_generation", "generation of the served index", **options
        )
        self.reloads = Counter(
            "delf_search_reloads",
            "index reloads, by outcome (loaded, failed)",
            ["outcome"],
            **options,
        )
        self.running = Gauge("delf_search_running", "searches running now", **options)
        self.queued = Gauge("delf_search_queued", "searches waiting for a slot", **options)


class SearchService:
    """Searches over INDEX_DIR with one extractor; see the module docstring.

    Args:
      directory: the index directory (from `delf index`).
      extractor: the query extractor (`extract(uint8 [H, W, 3]) -> LocalFeatures`,
        `fingerprint`), already checked against the index at start
        (`commands.common.extractor_for_index`); every reloaded index is checked
        against it again.
      config: retrieval settings (top_k, shortlist, RANSAC, default ranking).
      name: the model name the index is served under.
      limits: concurrency, queue and size bounds.
      poll_seconds: how often INDEX_DIR is checked for a new generation (0: never).
    """

    def __init__(
        self,
        directory: str | Path,
        extractor: Any,
        config: RetrievalConfig | None = None,
        *,
        name: str = SEARCH_MODEL_NAME,
        limits: SearchLimits | None = None,
        poll_seconds: float = 1.0,
        registry: CollectorRegistry | None = None,
    ):
        self.directory = Path(directory)
        self.extractor = extractor
        self.config = config or RetrievalConfig()
        self.name = name
        self.limits = limits or SearchLimits()
        self.poll_seconds = poll_seconds
        self.metrics = SearchMetrics(registry)
        self._slots = threading.BoundedSemaphore(self.limits.max_concurrent)
        self._lock = threading.Lock()  # guards the counters and the failure record
        self._reloading = threading.Lock()  # one reload at a time
        self._waiting = 0
        self._thumbnails: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._running = 0
        self._failure: dict[str, Any] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        generation = read_generation(self.directory)
        self._snapshot = self._load(generation if generation is not None else 0)
        self._publish(self._snapshot)

    # --- life cycle --------------------------------------------------------------------

    @classmethod
    def from_index(cls, index: Index, extractor: Any, **options) -> SearchService:
        """A service over the directory `index` was loaded from (its check already done)."""
        if index.path is None:
            raise ValueError("the index has no directory to serve from")
        return cls(index.path, extractor, **options)

    def start(self) -> SearchService:
        if self.poll_seconds > 0 and self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._poll, name="index-poll", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops polling (a load in progress finishes in its daemon thread, unused)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    @property
    def snapshot(self) -> IndexSnapshot:
        return self._snapshot

    def ready(self) -> bool:
        """An index is loaded (always, once constructed) and the service is not stopping."""
        return not self._stopping.is_set()

    # --- reload ------------------------------------------------------------------------

    def _poll(self) -> None:
        while not self._stopping.wait(self.poll_seconds):
            try:
                self.reload()
            except Exception:  # keep serving what is loaded
                logging.exception("index reload failed")

    def reload(self) -> str:
        """One poll: "unchanged", "missing" (mid-swap), "retry" (raced a writer),
        "failed" (the old index keeps serving) or "loaded"."""
        with self._reloading:
            return self._reload()

    def _reload(self) -> str:
        generation = read_generation(self.directory)
        if generation is None:
            return "missing"
        with self._lock:
            failed = self._failure is not None and self._failure["generation"] == generation
        if generation == self._snapshot.generation or failed:
            return "unchanged"
        try:
            snapshot = self._load(generation)
        except Exception as error:  # noqa: BLE001 - a bad index must not stop the service
            if read_generation(self.directory) != generation:
                return "retry"  # read while a writer replaced it: not a failure
            message = " ".join(f"{type(error).__name__}: {error}".split())[:1000]
            logging.error("%s: generation %d not loaded: %s", self.directory, generation, message)
            with self._lock:
                self._failure = {"generation": generation, "error": message, "at": time.time()}
            self.metrics.reloads.labels("failed").inc()
            return "failed"
        if read_generation(self.directory) != generation:
            return "retry"
        with self._lock:  # the swap: one reference, atomic for readers
            self._snapshot = snapshot
            self._failure = None
        self._publish(snapshot)
        self.metrics.reloads.labels("loaded").inc()
        logging.info(
            "%s: serving generation %d (%d images)",
            self.directory,
            generation,
            snapshot.index.num_images,
        )
        return "loaded"

    def _load(self, generation: int) -> IndexSnapshot:
        index = Index.load(self.directory)
        index.check_fingerprint(getattr(self.extractor, "fingerprint", None))
        default = resolve_ranking(self.config.ranking, index)
        methods = [default] + [m for m in _available(index) if m != default]
        # Every ranking's structure is opened now: a snapshot never reads INDEX_DIR again
        # (after a swap the directory holds another generation).
        searchers = {
            method: Searcher(index, self.config.replace(ranking=method)) for method in methods
        }
        keys = {record.key: image_id for image_id, record in enumerate(index.images)}
        return IndexSnapshot(index, searchers, default, generation, time.time(), keys)

    def _publish(self, snapshot: IndexSnapshot) -> None:
        self.metrics.images.set(snapshot.index.num_images)
        self.metrics.generation.set(snapshot.generation)

    def status(self) -> dict[str, Any]:
        """What /status shows: the served generation and the last failed load, if any."""
        with self._lock:
            snapshot = self._snapshot
            failure = dict(self._failure) if self._failure else None
        return {
            "name": self.name,
            "index": str(self.directory),
            "generation": snapshot.generation,
            "images": snapshot.index.num_images,
            "descriptors": snapshot.index.num_descriptors,
            "ranking": snapshot.default,
            "rankings": sorted(snapshot.searchers),
            "loaded_at": snapshot.loaded_at,
            "fingerprint": snapshot.index.fingerprint,
            "failed_reload": failure,
            "running": self._running,
            "queued": self._waiting,
        }

    def version_status(self) -> list[tuple[int, str, str, str]]:
        """GetModelStatus rows, as `ModelRepository.status`: the served generation
        AVAILABLE, a generation that failed to load END with its error."""
        rows = [(self._snapshot.generation, "AVAILABLE", "OK", "")]
        with self._lock:
            if self._failure is not None:
                failure = self._failure
                rows.append((failure["generation"], "END", "FAILED_PRECONDITION", failure["error"]))
        return sorted(rows)

    # --- queries -----------------------------------------------------------------------

    def _admit(self, timeout: float | None) -> None:
        with self._lock:
            limit = self.limits.max_concurrent + self.limits.max_queued
            if self._waiting + self._running >= limit:
                raise QueueFullError(
                    f"the search queue is full ({self._running} running, {self._waiting} "
                    "waiting); retry later"
                )
            self._waiting += 1
            self.metrics.queued.set(self._waiting)
        try:
            wait = self.limits.queue_timeout if timeout is None else min(timeout, 1e6)
            if not self._slots.acquire(timeout=max(wait, 0.0)):
                raise ServingError(
                    "DEADLINE_EXCEEDED", f"no search slot free within {max(wait, 0.0):.3g} s"
                )
        finally:
            with self._lock:
                self._waiting -= 1
                self.metrics.queued.set(self._waiting)

    def search_batch(
        self,
        images: list[bytes],
        top_k: int | None = None,
        ranking: str | None = None,
        *,
        api: str = "grpc",
        timeout: float | None = None,
    ) -> list[QueryAnswer]:
        """Answers every encoded image of one request with one snapshot (ServingError)."""
        self.metrics.requests.labels(api).inc()
        start = time.perf_counter()
        try:
            if not images:
                raise ServingError("INVALID_ARGUMENT", f"'{SEARCH_INPUT}' holds no image")
            top_k = self._top_k(top_k)
            self._admit(timeout)
            with self._lock:
                self._running += 1
                self.metrics.running.set(self._running)
            try:
                snapshot = self._snapshot  # one generation for the whole request
                method = self._method(snapshot, ranking)
                return [
                    self._query(snapshot, method, data, top_k, f"{SEARCH_INPUT}[{position}]")
                    for position, data in enumerate(images)
                ]
            finally:
                with self._lock:
                    self._running -= 1
                    self.metrics.running.set(self._running)
                self._slots.release()
        except ServingError as error:
            self.metrics.errors.labels(api, error.code).inc()
            raise
        except Exception:
            self.metrics.errors.labels(api, "INTERNAL").inc()
            raise
        finally:
            self.metrics.latency.labels(api).observe(time.perf_counter() - start)

    def _top_k(self, top_k: int | None) -> int:
        if top_k is None:
            return self.config.top_k
        if not 1 <= top_k <= self.limits.max_top_k:
            raise ServingError(
                "INVALID_ARGUMENT",
                f"input 'top_k': must be in 1..{self.limits.max_top_k}, got {top_k}",
            )
        return top_k

    @staticmethod
    def _method(snapshot: IndexSnapshot, ranking: str | None) -> str:
        if not ranking:
            return snapshot.default
        if ranking not in RANKINGS:
            raise ServingError(
                "INVALID_ARGUMENT", f"input 'ranking': {ranking[:40]!r} is not one of {RANKINGS}"
            )
        method = resolve_ranking(ranking, snapshot.index)
        if method not in snapshot.searchers:
            raise ServingError(
                "INVALID_ARGUMENT",
                f"input 'ranking': this index cannot rank by {method} "
                f"(it supports {sorted(snapshot.searchers)})",
            )
        return method

    def _query(
        self, snapshot: IndexSnapshot, method: str, data: bytes, top_k: int, name: str
    ) -> QueryAnswer:
        stages: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            stages[stage] = now - clock
            self.metrics.stages.labels(stage).observe(now - clock)
            clock = now

        if len(data) > self.limits.max_image_bytes:
            raise ServingError(
                "INVALID_ARGUMENT",
                f"{name}: {len(data)} bytes, over the limit of {self.limits.max_image_bytes}",
            )
        try:
            image = decode_image(data, name=name, max_pixels=self.limits.max_image_pixels)
        except ImageError as error:
            raise ServingError("INVALID_ARGUMENT", str(error)) from error
        lap("decode")
        features = self.extractor.extract(image)
        lap("extract")
        searcher = snapshot.searchers[method]
        initial = searcher.initial(features)
        lap("ranking")
        results = searcher.verify(features, initial, top_k=top_k)
        lap("verification")
        return QueryAnswer(snapshot, method, image, len(features), results, stages)

    @staticmethod
    def outputs(answers: list[QueryAnswer], top_k: int) -> dict[str, np.ndarray]:
        """The Predict outputs (`contract.SEARCH_OUTPUTS`) of a request's answers, padded to
        [B, top_k]."""
        batch = len(answers)
        ids = np.full((batch, top_k), -1, np.int64)
        keys = np.full((batch, top_k), b"", dtype=object)
        scores = np.zeros((batch, top_k), np.float32)
        inliers = np.zeros((batch, top_k), np.int32)
        counts = np.zeros(batch, np.int32)
        generations = np.zeros(batch, np.int64)
        for row, answer in enumerate(answers):
            results = answer.results[:top_k]
            counts[row] = len(results)
            generations[row] = answer.snapshot.generation
            for column, result in enumerate(results):
                ids[row, column] = result.image_id
                keys[row, column] = result.key.encode("utf-8")
                scores[row, column] = result.score
                inliers[row, column] = result.inliers
        outputs = {
            "image_ids": ids,
            "keys": keys,
            "scores": scores,
            "inliers": inliers,
            "num_results": counts,
            "generation": generations,
        }
        assert tuple(outputs) == SEARCH_OUTPUTS
        return outputs

    def thumbnail(self, key: str, long_side: int = 256) -> bytes:
        """JPEG bytes of a collection image the served index lists (NOT_FOUND otherwise);
        the last `_THUMBNAILS` are kept in memory."""
        snapshot = self._snapshot
        image_id = snapshot.keys.get(key)
        if image_id is None:
            raise ServingError("NOT_FOUND", "not an image of the index")
        path = snapshot.index.images[image_id].path
        entry = f"{snapshot.generation}:{path}"  # a new generation may change the file
        with self._lock:
            cached = self._thumbnails.get(entry)
            if cached is not None:
                self._thumbnails.move_to_end(entry)
                return cached
        try:
            pixels = load_image(path)
        except (ImageError, OSError) as error:
            raise ServingError("NOT_FOUND", "the image file is unavailable") from error
        picture = Image.fromarray(pixels)
        picture.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        with self._lock:
            self._thumbnails[entry] = buffer.getvalue()
            while len(self._thumbnails) > _THUMBNAILS:
                self._thumbnails.popitem(last=False)
        return buffer.getvalue()


def _available(index: Index) -> list[str]:
    """Ranking methods `index` supports (votes always: exact search needs no structure)."""
    methods = ["votes"]
    if "asmk" in index.structures:
        methods.append("asmk")
    if index.global_descriptors is not None:
        methods.append("global")
    return methods
