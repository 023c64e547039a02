"""Benchmark: the search service (`delf serve --index`) against `delf search` per query.

Three parts, in one run (a busy machine slows all of them alike; compare ratios):

1. `real`: a small real index (`--real_images` photos of `--data_dir`, random
   ResNet50, `--preset`, threshold 0) served by a `delf serve --index` process;
   the baseline is `delf search --images=QUERY` as one process per query (import,
   index load, cached traced extractor: what a script calling the CLI pays).
   Latency p50/p95 and throughput at `--clients` concurrent gRPC clients
   (SearchClient), the service's RSS.
2. `features given` at `--sizes` images (synthetic, `bench/index_scale.py`'s
   generator: `--per_image` 40-D descriptors per image, a planted true image per
   query): the service in this process, its extractor replaced by a lookup of the
   query's synthetic features (the request is a tiny PNG naming the query), so the
   numbers are the service's own cost plus the search (ranking `--ranking`).
   p50/p95 per client count, throughput, recall@1 of the planted image, per-stage
   medians, and the floor: `Searcher.search` called directly, same queries.
3. `extraction included`, same indexes: the requests are real photos and the
   extractor really runs (random ResNet50, `--preset`); the search then uses the
   synthetic features of the query the photo is mapped to (the index's descriptor
   space is synthetic; a real 10k index would take hours to extract on 2 cores).

At the largest size, the RSS of this process (after the generator's arrays are
released) and the latency of `--clients_during_reload` clients while the index is
saved again (a new generation) and reloaded, with the failed requests.

`--blas_threads=1` sets OMP/OpenBLAS/MKL threads to 1 before numpy loads (one core
per request); run once with and once without to compare.

  python bench/search_service.py [--sizes=1000,10000] [--clients=1,4,8]
"""

from __future__ import annotations

import os
import sys

for _argument in sys.argv[1:]:  # before numpy and FAISS load their thread pools
    if _argument.startswith("--blas_threads=") and _argument.split("=", 1)[1] not in ("", "0"):
        for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[_name] = _argument.split("=", 1)[1]

import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from common import free_port  # noqa: E402
from index_scale import FLAGS, Generator, make_index, make_query, rss_bytes  # noqa: E402
from PIL import Image  # noqa: E402

from delf_tf.config import RetrievalConfig  # noqa: E402
from delf_tf.images import list_images  # noqa: E402
from delf_tf.retrieval.index import Index, read_generation  # noqa: E402
from delf_tf.retrieval.search import Searcher  # noqa: E402
from delf_tf.serving.local_server import LocalServer  # noqa: E402
from delf_tf.serving.repository import ModelRepository  # noqa: E402
from delf_tf.serving.search_client import SearchClient  # noqa: E402
from delf_tf.serving.search_service import SearchService  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
flags.DEFINE_string(
    "data_dir",
    None,
    "photos (default: <repo>/../shared/data/landmarks-dev/images, else /work/shared/...)",
)
flags.DEFINE_list("clients", ["1", "4", "8"], "concurrent clients")
flags.DEFINE_integer("requests_per_client", 3, "queries each client sends per setting")
flags.DEFINE_integer("real_images", 24, "photos in the real index")
flags.DEFINE_integer("baseline_queries", 3, "`delf search` processes timed (after one warm-up)")
flags.DEFINE_string("preset", "fast", "extraction preset of the real extractor")
flags.DEFINE_string("ranking", "global", "ranking of the synthetic indexes")
flags.DEFINE_integer("blas_threads", 0, "BLAS/OpenMP threads (0: the libraries' default)")
flags.DEFINE_integer("clients_during_reload", 4, "clients querying while the index reloads")
flags.DEFINE_list("parts", ["real", "given", "extraction"], "parts to run")
FLAGS.set_default("sizes", ["1000", "10000"])


def data_dir() -> Path:
    if FLAGS.data_dir:
        return Path(FLAGS.data_dir)
    for base in (ROOT.parent / "shared", Path("/work/shared")):
        if (base / "data" / "landmarks-dev" / "images").is_dir():
            return base / "data" / "landmarks-dev" / "images"
    raise SystemExit("no photos: pass --data_dir")


def percentiles(seconds: list[float]) -> dict:
    return {
        "p50": round(float(np.percentile(seconds, 50)), 3),
        "p95": round(float(np.percentile(seconds, 95)), 3),
    }


def load_test(target: str, payloads: list[bytes], clients: int, check=None) -> dict:
    """`clients` threads, each a SearchClient sending `--requests_per_client` queries."""
    seconds, failures, hits = [], [], []
    lock = threading.Lock()

    def client(number: int) -> None:
        with SearchClient(target, timeout=600) as search:
            for request in range(FLAGS.requests_per_client):
                position = (number * FLAGS.requests_per_client + request) % len(payloads)
                start = time.perf_counter()
                try:
                    reply = search.search(payloads[position], top_k=10)
                except Exception as error:  # noqa: BLE001 - counted
                    with lock:
                        failures.append(repr(error)[:200])
                    continue
                with lock:
                    seconds.append(time.perf_counter() - start)
                    if check is not None:
                        hits.append(check(position, reply))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    row = {
        "clients": clients,
        "requests": len(seconds) + len(failures),
        "failed": len(failures),
        **percentiles(seconds or [float("nan")]),
        "throughput_per_s": round(len(seconds) / wall, 3),
    }
    if hits:
        row["recall_at_1"] = round(float(np.mean(hits)), 3)
    return row


def with_ratios(rows: list[dict]) -> list[dict]:
    one = next((row for row in rows if row["clients"] == 1), None)
    for row in rows:
        if one and one["throughput_per_s"]:
            row["throughput_vs_1_client"] = round(
                row["throughput_per_s"] / one["throughput_per_s"], 2
            )
    return rows


def stage_medians(service: SearchService) -> dict:
    """Median-ish seconds per stage from the service's histograms (sum / count)."""
    out = {}
    for metric in service.metrics.stages.collect():
        sums = {s.labels["stage"]: s.value for s in metric.samples if s.name.endswith("_sum")}
        counts = {s.labels["stage"]: s.value for s in metric.samples if s.name.endswith("_count")}
        out = {stage: round(sums[stage] / counts[stage], 4) for stage in sums if counts[stage]}
    return out


# --- part 1: a real index, delf serve --index against delf search per query ----------------


def cli(*arguments: str, capture: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "delf_tf.cli", *arguments],
        env=env,
        check=True,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def process_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def real_part(work: Path) -> dict:
    photos = list_images(data_dir())
    database, queries = photos[: FLAGS.real_images], photos[FLAGS.real_images :]
    queries = (queries or photos)[: max(FLAGS.baseline_queries + 1, 4)]
    folder = work / "real_images"
    folder.mkdir()
    for photo in database:
        shutil.copy(photo, folder / photo.name)
    extraction = [f"--preset={FLAGS.preset}", "--score_threshold=0"]
    start = time.perf_counter()
    cli("extract", f"--images={folder}", f"--output_dir={work / 'real_features'}", *extraction)
    cli(
        "index",
        f"--features={work / 'real_features'}",
        f"--images={folder}",
        f"--output_dir={work / 'real_index'}",
    )
    built = time.perf_counter() - start
    search = ["search", f"--index={work / 'real_index'}", *extraction]
    baseline = []
    for number, query in enumerate(queries[: FLAGS.baseline_queries + 1]):
        start = time.perf_counter()
        cli(*search, f"--images={query}", capture=True)
        if number:  # the first run fills the traced-extractor cache
            baseline.append(time.perf_counter() - start)
    grpc_port, rest_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "delf_tf.cli", "serve", f"--index={work / 'real_index'}"]
        + [f"--port={grpc_port}", f"--rest_api_port={rest_port}", *extraction]
        + ["--search_max_concurrent=2", "--file_system_poll_wait_seconds=0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in server.stdout:
            if "delf serve: ready" in line:
                break
        else:
            raise RuntimeError(f"delf serve exited with {server.wait()}")
        started = time.perf_counter() - start
        payloads = [query.read_bytes() for query in queries]
        target = f"127.0.0.1:{grpc_port}"
        SearchClient(target).search(payloads[0])  # warm-up
        rows = with_ratios([load_test(target, payloads, int(clients)) for clients in FLAGS.clients])
        rss = process_rss(server.pid)
    finally:
        server.terminate()
        server.wait(60)
    one = rows[0]["p50"]
    return {
        "images": len(database),
        "preset": FLAGS.preset,
        "index_build_seconds": round(built, 1),
        "service_start_seconds": round(started, 1),
        "service_rss_bytes": rss,
        "baseline_delf_search_per_query": percentiles(baseline),
        "service": rows,
        "speedup_p50_1_client_vs_delf_search": round(float(np.median(baseline)) / one, 2),
    }


# --- parts 2 and 3: synthetic indexes at scale ------------------------------------------------


def query_png(number: int) -> bytes:
    """A 16x16 PNG whose first pixel names query `number`."""
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[0, 0] = [(number >> 16) & 255, (number >> 8) & 255, number & 255]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class GivenFeatures:
    """The extractor of the synthetic service: the request names its query's features
    (a tiny PNG, `query_png`), or, with `real`, the real extractor runs on the photo and
    the photo's position in `photos` picks the features."""

    fingerprint = "synthetic"

    def __init__(self, features, real=None, photos=None):
        self.features = features
        self.real = real
        self.photos = photos or {}

    def extract(self, image):
        if self.real is None:
            pixel = image[0, 0].astype(int)
            return self.features[(pixel[0] << 16) | (pixel[1] << 8) | pixel[2]]
        self.real.extract(image)
        return self.features[self.photos.get(image.shape, 0) % len(self.features)]


def synthetic_index(size: int, work: Path):
    """(index directory, query features, planted image ids) of `size` images."""
    per = min(FLAGS.per_image, max(1, FLAGS.max_descriptors // size))
    arrays = work / f"arrays_{size}"
    arrays.mkdir()
    generator = Generator(FLAGS.seed)
    index = make_index(size, per, generator, arrays)
    truths = [int(t) for t in generator.rng.choice(size, FLAGS.queries, replace=False)]
    queries = [make_query(index, t, generator) for t in truths]
    directory = work / f"index_{size}"
    index.save(directory)
    del index
    gc.collect()
    shutil.rmtree(arrays)
    return directory, queries, truths


def reload_latency(service: SearchService, target: str, payloads: list[bytes]) -> dict:
    """Latency of clients querying before, while and after the index is saved again."""
    samples, failures, stop = [], [], threading.Event()
    lock = threading.Lock()

    def client(number: int) -> None:
        with SearchClient(target, timeout=600) as search:
            position = number
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    search.search(payloads[position % len(payloads)], top_k=10)
                    with lock:
                        samples.append((start, time.perf_counter() - start))
                except Exception as error:  # noqa: BLE001 - counted
                    with lock:
                        failures.append(repr(error)[:200])
                position += 1

    threads = [
        threading.Thread(target=client, args=(n,)) for n in range(FLAGS.clients_during_reload)
    ]
    for thread in threads:
        thread.start()
    time.sleep(10)
    before = service.snapshot.generation
    save_start = time.perf_counter()
    Index.load(service.directory).save(service.directory)  # a new generation, same content
    saved = time.perf_counter()
    generation = read_generation(service.directory)
    while service.snapshot.generation != generation:
        time.sleep(0.05)
    swapped = time.perf_counter()
    time.sleep(10)
    stop.set()
    for thread in threads:
        thread.join()

    def window(low, high):
        values = [s for t, s in samples if low <= t < high]
        return {"requests": len(values), **percentiles(values)} if values else {"requests": 0}

    return {
        "clients": FLAGS.clients_during_reload,
        "generation_before": before,
        "generation_after": generation,
        "save_seconds": round(saved - save_start, 1),
        "reload_seconds_after_save": round(swapped - saved, 2),
        "before": window(0, save_start),
        "during_save_and_reload": window(save_start, swapped),
        "after": window(swapped, float("inf")),
        "failed": len(failures),
        "failures": failures[:3],
    }


def scale_part(work: Path, real_extractor) -> list[dict]:
    config = RetrievalConfig(ranking=FLAGS.ranking, shortlist=FLAGS.shortlist, top_k=10)
    sizes = [int(s) for s in FLAGS.sizes]
    photos = list_images(data_dir())[:8] if real_extractor is not None else []
    entries = []
    for size in sizes:
        start = time.perf_counter()
        directory, queries, truths = synthetic_index(size, work)
        entry = {
            "images": size,
            "per_image": queries[0].descriptors.shape[0],
            "ranking": FLAGS.ranking,
            "data_seconds": round(time.perf_counter() - start, 1),
        }
        gc.collect()
        rss_before = rss_bytes()
        searcher = Searcher(Index.load(directory), config)
        floor = []
        for query in queries[:3]:
            begin = time.perf_counter()
            searcher.search(query)
            floor.append(time.perf_counter() - begin)
        entry["searcher_search_direct"] = percentiles(floor)
        del searcher
        gc.collect()
        parts = [p for p in ("given", "extraction") if p in FLAGS.parts]
        for part in parts:
            if part == "extraction" and real_extractor is None:
                continue
            if part == "given":
                extractor = GivenFeatures(queries)
                payloads = [query_png(n) for n in range(len(queries))]

                def check(position, reply, truths=truths):
                    return bool(reply.hits) and reply.hits[0].image_id == truths[position]

            else:
                from delf_tf.images import decode_image

                payloads = [photo.read_bytes() for photo in photos]
                shapes = {decode_image(p).shape: n for n, p in enumerate(payloads)}
                extractor = GivenFeatures(queries, real_extractor, shapes)
                check = None
            service = SearchService(directory, extractor, config, poll_seconds=0.2)
            server = LocalServer(
                ModelRepository([]), grpc_port=0, rest_port=None, poll_seconds=0, search=service
            )
            server.start()
            try:
                target = server.addresses()["grpc"]
                SearchClient(target, timeout=600).search(payloads[0])  # warm-up
                rows = with_ratios(
                    [load_test(target, payloads, int(c), check) for c in FLAGS.clients]
                )
                entry[part] = {"rows": rows, "stage_seconds_mean": stage_medians(service)}
                if part == "given" and size == max(sizes):
                    entry["rss_bytes"] = rss_bytes()
                    entry["rss_growth_bytes"] = rss_bytes() - rss_before
                    entry["reload"] = reload_latency(service, target, payloads)
            finally:
                server.stop(grace=5)
            print(json.dumps({"images": size, part: entry[part]}), file=sys.stderr, flush=True)
        entries.append(entry)
        shutil.rmtree(directory, ignore_errors=True)
    return entries


def real_extractor_or_none():
    if "extraction" not in FLAGS.parts:
        return None
    from delf_tf.extraction.cache import cached_extractor
    from delf_tf.extraction.extractor import build_extractor

    arguments = {
        "model": None,
        "weights": "random",
        "seed": 0,
        "config": None,
        "overrides": {"score_threshold": 0.0},
        "pca": None,
        "model_config": None,
        "preset": FLAGS.preset,
        "delf_config": None,
    }
    return cached_extractor(arguments, lambda: build_extractor(**arguments))


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return [flag for flag in wanted if f" {flag}" in line]


def main(argv: list[str]) -> None:
    del argv
    work = Path(FLAGS.work_dir or tempfile.mkdtemp(prefix="search_service_"))
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "blas_threads": FLAGS.blas_threads or "default",
        "requests_per_client": FLAGS.requests_per_client,
        "shortlist": FLAGS.shortlist,
    }
    try:
        if "real" in FLAGS.parts:
            report["real"] = real_part(work)
            print(json.dumps({"real": report["real"]}), file=sys.stderr, flush=True)
        if {"given", "extraction"} & set(FLAGS.parts):
            report["scale"] = scale_part(work, real_extractor_or_none())
    finally:
        if FLAGS.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
