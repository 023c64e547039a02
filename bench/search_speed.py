"""Benchmark: the search itself (extraction excluded) at 10k images, this tree vs a baseline tree.

The synthetic collection of `index_scale.py` (10 000 images x 1000 descriptors,
40-D, planted queries) is written once to `--work_dir`. Then one worker process per
setting loads it (memory-mapped) with its own tree on PYTHONPATH, builds what it
searches with (the votes IVF-PQ structure that tree's `ivfpq_parameters` derives, ASMK,
the global ranker) and answers queries; the coordinator has the workers take turns
per query, so a load change on the shared machine hits them alike:

  baseline  `--baseline_tree` (e.g. the main checkout), default threads
  new       this tree, default threads (OpenMP/BLAS as the machine has them,
            `default_threads()` verification threads)
  new-1t    this tree, OMP/OpenBLAS/MKL threads 1 and 1 verification thread

Per ranking (votes, global, asmk) and setting: p50/p95 of `Searcher.search`, and the
stages timed on the same query: the initial ranking (votes: the k-NN search), for
global/asmk the re-ranking's matching (`shortlist_matches`), and RANSAC (the rest of
`verify`). The top-1 and the top-10 (image, inliers) of every query are compared
with the baseline's. Then throughput: queries per second with 1 and 4 client threads
over one Searcher, per setting of "new". The k-NN recall@10 against exact search is
sampled on database rows (`sampled_recall`).

  python bench/search_speed.py --baseline_tree=/work/main --work_dir=/tmp/search_speed
(`--queries`, `--per_image`, `--seed` and the generator's flags are index_scale.py's.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import index_scale  # the generator and its flags (--work_dir, --queries, --per_image, ...)
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("baseline_tree", None, "a checkout whose delf_tf is the baseline")
flags.DEFINE_integer("images", 10_000, "collection size")
flags.DEFINE_list("search_rankings", ["votes", "global", "asmk"], "rankings to time")
flags.DEFINE_list("settings", ["baseline", "new", "new-1t"], "workers")
flags.DEFINE_integer("throughput_queries", 24, "queries per throughput run")
flags.DEFINE_string("worker", None, "internal: run as a worker of this setting")

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


# --- the collection ------------------------------------------------------------------------


def write_collection(folder: Path) -> None:
    """The index_scale collection and 10 planted queries, once (arrays .npy, queries .npz)."""
    if (folder / "queries.npz").exists():
        return
    generator = index_scale.Generator(0)
    folder.mkdir(parents=True, exist_ok=True)
    index = index_scale.make_index(FLAGS.images, FLAGS.per_image, generator, folder)
    truths = generator.rng.choice(FLAGS.images, FLAGS.queries, replace=False)
    arrays = {"truths": truths}
    for number, truth in enumerate(truths):
        query = index_scale.make_query(index, int(truth), generator)
        for field in ("keypoints", "descriptors", "global_descriptor"):
            arrays[f"{field}{number}"] = getattr(query, field)
    np.savez(folder / "queries.npz", **arrays)


def load_collection(folder: Path, images: int, per: int):
    from delf_tf.features.local_features import LocalFeatures
    from delf_tf.retrieval.index import ImageRecord, Index

    arrays = {
        name: np.load(folder / f"{name}.npy", mmap_mode="r")
        for name in ("descriptors", "keypoints", "global")
    }
    records = [ImageRecord(f"img{i}", f"img{i}", 640, 480, per) for i in range(images)]
    index = Index(
        arrays["descriptors"],
        arrays["keypoints"],
        np.repeat(np.arange(images, dtype=np.int32), per),
        np.arange(images + 1, dtype=np.int64) * per,
        records,
        "synthetic",
    )
    index.global_descriptors = arrays["global"]
    saved = np.load(folder / "queries.npz")
    queries = []
    for number in range(len(saved["truths"])):
        points = saved[f"keypoints{number}"]
        ones = np.ones(len(points), np.float32)
        queries.append(
            LocalFeatures(
                points,
                ones,
                ones,
                saved[f"descriptors{number}"],
                saved[f"global_descriptor{number}"],
            )
        )
    return index, queries, [int(t) for t in saved["truths"]]


# --- a worker ------------------------------------------------------------------------------


def worker(setting: str) -> None:
    """Answers commands on stdin, one JSON line each on stdout (see `Worker`)."""
    import faiss  # noqa: F401 (imported before threads are set)

    from delf_tf.config import RetrievalConfig
    from delf_tf.matching.neighbors import IvfPqNeighbors, ivfpq_parameters, sampled_recall
    from delf_tf.retrieval.asmk import AsmkIndex
    from delf_tf.retrieval.global_ranking import GlobalRanker
    from delf_tf.retrieval.search import Searcher

    folder = work_dir()
    index, queries, truths = load_collection(folder, FLAGS.images, FLAGS.per_image)
    structures = folder / setting.split("-")[0]
    structures.mkdir(exist_ok=True)
    parameters = ivfpq_parameters(index.num_descriptors, index.dim)
    neighbors = None
    if "votes" in FLAGS.search_rankings:
        path = structures / "neighbors.faiss"
        if not path.exists():
            IvfPqNeighbors.train(index.descriptors, parameters).save(path)
        neighbors = IvfPqNeighbors.load(path, index.descriptors, parameters)
    threads = {}
    if "threads" in Searcher.__init__.__code__.co_varnames:
        threads = {"threads": 1 if setting.endswith("-1t") else None}
    searchers = {}
    for ranking in FLAGS.search_rankings:
        config = RetrievalConfig(ranking=ranking, shortlist=100, top_k=10)
        if ranking == "votes":
            structure = {"neighbors": neighbors}
        elif ranking == "global":
            structure = {"global_ranker": GlobalRanker.build(index.global_descriptors)}
        else:
            asmk_file = folder / "asmk"  # ASMK is not what is compared: built once, shared
            if not (asmk_file / "done").exists():
                asmk = AsmkIndex.build(index.descriptors, np.asarray(index.offsets))
                asmk_file.mkdir(exist_ok=True)
                header = asmk.save(asmk_file, lambda path, array: np.save(path, array))
                (asmk_file / "header.json").write_text(json.dumps(header))
                (asmk_file / "done").touch()
            header = json.loads((asmk_file / "header.json").read_text())
            structure = {"asmk": AsmkIndex.load(asmk_file, header)}
        searchers[ranking] = Searcher(index, config, **structure, **threads)
    print(json.dumps({"ready": setting, "parameters": parameters.to_dict()}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["do"] == "query":
            searcher = searchers[command["ranking"]]
            query = queries[command["query"]]
            start = time.perf_counter()
            initial = searcher.initial(query)
            middle = time.perf_counter()
            results = searcher.verify(query, initial)
            end = time.perf_counter()
            answer = {
                "total": end - start,
                "initial": middle - start,
                "verify": end - middle,
                "top": [(r.image_id, r.inliers) for r in results],
                "truth": truths[command["query"]],
            }
            if searcher.method != "votes":
                start = time.perf_counter()
                searcher.shortlist_matches(query, initial.ids[:100])
                answer["matching"] = time.perf_counter() - start
                answer["ransac"] = max(answer["verify"] - answer["matching"], 0.0)
            else:
                answer["ransac"] = answer["verify"]
            print(json.dumps(answer), flush=True)
        elif command["do"] == "throughput":
            print(
                json.dumps(throughput(searchers[command["ranking"]], queries, command)), flush=True
            )
        elif command["do"] == "recall":
            print(
                json.dumps(sampled_recall(neighbors, index.descriptors, 10, 0.8, 200)), flush=True
            )


def throughput(searcher, queries, command) -> dict:
    """Queries per second with `clients` threads sharing `searcher`."""
    from concurrent.futures import ThreadPoolExecutor

    count = command["count"]
    order = [queries[1 + i % (len(queries) - 1)] for i in range(count)]
    start = time.perf_counter()
    with ThreadPoolExecutor(command["clients"]) as pool:
        list(pool.map(searcher.search, order))
    return {"qps": count / (time.perf_counter() - start)}


class Worker:
    def __init__(self, setting: str):
        tree = ROOT if setting.startswith("new") else Path(FLAGS.baseline_tree)
        env = {**os.environ, "PYTHONPATH": f"{tree}:{ROOT / 'bench'}"}
        if setting.endswith("-1t"):
            env.update(ONE_THREAD)
        flags_ = [f"--work_dir={work_dir()}", f"--images={FLAGS.images}"]
        flags_ += [f"--per_image={FLAGS.per_image}", f"--seed={FLAGS.seed}"]
        flags_.append(f"--search_rankings={','.join(FLAGS.search_rankings)}")
        self.process = subprocess.Popen(
            [sys.executable, __file__, f"--worker={setting}", *flags_],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=tree,
        )
        self.ready = self.read()

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.read()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.process.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def work_dir() -> Path:
    return Path(FLAGS.work_dir or "/tmp/search_speed")


def cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    with open("/proc/cpuinfo") as handle:
        found = next(line for line in handle if line.startswith("flags")).split()
    return [flag for flag in wanted if flag in found]


def p(values, q) -> float:
    return round(float(np.percentile(values, q)), 4)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.worker:
        worker(FLAGS.worker)
        return
    write_collection(work_dir())
    settings = [s for s in FLAGS.settings if s != "baseline" or FLAGS.baseline_tree]
    workers = {setting: Worker(setting) for setting in settings}
    report = {
        "cpu_flags": cpu_flags(),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "images": FLAGS.images,
        "per_image": FLAGS.per_image,
        "parameters": {s: w.ready["parameters"] for s, w in workers.items()},
        "rankings": {},
    }
    for ranking in FLAGS.search_rankings:
        answers = {setting: [] for setting in workers}
        for number in range(FLAGS.queries):
            for setting, process in workers.items():
                answer = process.ask(do="query", ranking=ranking, query=number)
                if number:  # query 0 warms up
                    answers[setting].append(answer)
        rows = {}
        for setting, got in answers.items():
            row = {"p50": p([a["total"] for a in got], 50), "p95": p([a["total"] for a in got], 95)}
            for stage in ("initial", "matching", "ransac"):
                if stage in got[0]:
                    row[f"{stage}_p50"] = p([a[stage] for a in got], 50)
            row["recall_at_1"] = float(np.mean([a["top"][0][0] == a["truth"] for a in got]))
            if "baseline" in answers and setting != "baseline":
                base = answers["baseline"]
                row["p50_ratio_vs_baseline"] = round(row["p50"] / rows["baseline"]["p50"], 3)
                row["same_top1_as_baseline"] = float(
                    np.mean([a["top"][0] == b["top"][0] for a, b in zip(got, base, strict=True)])
                )
                row["same_top10_as_baseline"] = float(
                    np.mean([a["top"] == b["top"] for a, b in zip(got, base, strict=True)])
                )
            rows[setting] = row
        for setting, process in workers.items():
            if setting.startswith("new"):
                one = process.ask(do="throughput", ranking=ranking, clients=1, count=8)["qps"]
                four = process.ask(
                    do="throughput", ranking=ranking, clients=4, count=FLAGS.throughput_queries
                )["qps"]
                rows[setting]["qps_1_client"] = round(one, 2)
                rows[setting]["qps_4_clients"] = round(four, 2)
                rows[setting]["qps_ratio_4_vs_1"] = round(four / one, 2)
        report["rankings"][ranking] = rows
        print(json.dumps({ranking: rows}), file=sys.stderr, flush=True)
    if "votes" in FLAGS.search_rankings:
        report["knn_recall_at_10"] = {
            setting: process.ask(do="recall")["recall_at_k"] for setting, process in workers.items()
        }
    for process in workers.values():
        process.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
