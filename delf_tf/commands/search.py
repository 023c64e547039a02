"""`delf search`: rank the images of an index against one query image or a batch of them."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from absl import flags

from delf_tf.commands.common import (
    check_output_path,
    define_extractor_flags,
    extraction_precision,
    extractor_from_flags,
    warn_if_untrained,
)
from delf_tf.commands.retrieval_flags import (
    define_ranking_flags,
    define_retrieval_flags,
    retrieval_config_from_flags,
)
from delf_tf.config import RetrievalConfig

if TYPE_CHECKING:
    from delf_tf.retrieval.batch import QueryRunner
    from delf_tf.retrieval.search import SearchResult


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    defaults = RetrievalConfig()
    flags.DEFINE_string("index", None, "index directory from `delf index`", **define)
    flags.DEFINE_string("image", None, "query image file (or --queries)", **define)
    flags.DEFINE_string(
        "queries",
        None,
        "many queries: a folder of images or a text file of image paths (one per line); "
        "needs --output_file",
        **define,
    )
    flags.DEFINE_string(
        "output_file",
        None,
        "with --queries: results file, one JSON line per query, appended line by line; "
        "rerunning with the same file resumes after the queries it holds",
        **define,
    )
    flags.DEFINE_integer("top_k", None, f"results to show (default {defaults.top_k})", **define)
    flags.DEFINE_integer(
        "shortlist",
        None,
        f"images of the initial ranking verified with RANSAC (default {defaults.shortlist})",
        **define,
    )
    flags.DEFINE_integer(
        "neighbors",
        None,
        f"nearest descriptors per query descriptor (default {defaults.neighbors})",
        **define,
    )
    flags.DEFINE_string(
        "visualize", None, "write a PNG of the query against its best matches", **define
    )
    flags.DEFINE_string("html", None, "write an HTML page of the ranked thumbnails", **define)
    flags.mark_flags_as_required(["index"], **define)
    define_extractor_flags(flag_values)
    define_retrieval_flags(flag_values)
    define_ranking_flags(flag_values)


def run(flag_values: flags.FlagValues) -> int:
    from delf_tf.errors import InputError
    from delf_tf.images import load_image
    from delf_tf.retrieval.batch import QueryRunner, read_queries
    from delf_tf.retrieval.index import Index
    from delf_tf.retrieval.search import Searcher

    if bool(flag_values.image) == bool(flag_values.queries):
        raise InputError("give one of --image and --queries")
    for name in ("output_file", "visualize", "html"):  # before any model is built
        check_output_path(name, flag_values[name].value)
    if flag_values.queries and not flag_values.output_file:
        raise InputError("--queries needs --output_file (a .jsonl file)")
    config = retrieval_config_from_flags(
        flag_values,
        top_k=flag_values.top_k,
        shortlist=flag_values.shortlist,
        neighbors=flag_values.neighbors,
    )
    image = load_image(flag_values.image) if flag_values.image else None
    queries = read_queries(flag_values.queries) if flag_values.queries else None
    index = Index.load(flag_values.index)
    searcher = Searcher(index, config)
    extractor = extractor_from_flags(flag_values, cached=image is not None)
    index.check_fingerprint(extractor.fingerprint)
    warn_if_untrained(extractor)
    runner = QueryRunner(extractor, searcher)
    if queries is not None:
        return _run_batch(runner, queries, flag_values.output_file)
    outcome = runner.run(image)
    results = outcome.results
    print(format_table(flag_values.image, len(outcome.features), results), file=sys.stderr)
    payload = {
        "query": flag_values.image,
        "query_features": len(outcome.features),
        "ranking": searcher.method,
        "precision": extraction_precision(extractor),
        "results": [result.to_dict() for result in results],
    }
    if flag_values.visualize and results:
        from delf_tf.matching.visualize import save_picture
        from delf_tf.retrieval.visualize import draw_results

        save_picture(draw_results(image, results), flag_values.visualize)
        payload["visualize"] = flag_values.visualize
    if flag_values.html:
        from delf_tf.report.search_page import SearchPageQuery, write_search_page

        page = SearchPageQuery(flag_values.image, image, results, len(outcome.features))
        payload["html"] = str(write_search_page(flag_values.html, [page]))
    print(json.dumps(payload))
    return 0


def _run_batch(runner: QueryRunner, queries: list[str], output: str) -> int:
    from delf_tf.errors import EXIT_OK, EXIT_PARTIAL
    from delf_tf.retrieval.batch import search_to_jsonl

    summary = search_to_jsonl(runner, queries, output)
    if summary.skipped:
        print(f"note: {summary.skipped} queries already in {output}: skipped", file=sys.stderr)
    report = {
        "output_file": output,
        "queries": len(queries),
        "answered": summary.answered,
        "skipped": summary.skipped,
        "failed": summary.failed + summary.failed_before,
        "ranking": runner.searcher.method,
        "precision": extraction_precision(runner.extractor),
        "seconds_per_query_median": summary.seconds_per_query,
    }
    print(json.dumps(report))
    return EXIT_PARTIAL if report["failed"] else EXIT_OK


def format_table(query: str, num_features: int, results: list[SearchResult]) -> str:
    lines = [
        f"query {query} ({num_features} features)",
        f"{'rank':>4} {'inliers':>7} {'votes':>6} {'score':>9}  path",
    ]
    lines += [
        f"{rank:>4} {r.inliers:>7} {r.votes:>6} {r.score:>9.4g}  {r.path}"
        for rank, r in enumerate(results, 1)
    ]
    if not results:
        lines.append("  (no database image shares a descriptor match with the query)")
    return "\n".join(lines)
