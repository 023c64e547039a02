"""`delf search`: rank the images of an index against a query image, or many (--queries)."""

from __future__ import annotations

import json
import sys

from absl import flags

from delf_tf.commands.common import (
    define_extractor_flags,
    extractor_from_flags,
    weights_are_trained,
)
from delf_tf.commands.retrieval_flags import (
    define_ranking_flags,
    define_retrieval_flags,
    retrieval_config_from_flags,
)
from delf_tf.errors import EXIT_PARTIAL, FingerprintMismatchError
from delf_tf.images import ImageError, load_image
from delf_tf.matching.visualize import save_picture
from delf_tf.retrieval.batch import QueryRunner, read_queries, search_to_jsonl
from delf_tf.retrieval.index import Index, IndexFormatError
from delf_tf.retrieval.search import Searcher, SearchResult
from delf_tf.retrieval.visualize import draw_results


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string("index", None, "index directory from `delf index`", **define)
    flags.DEFINE_string("image", None, "query image file (or --queries)", **define)
    flags.DEFINE_string(
        "queries",
        None,
        "many queries: a folder of images or a text file of image paths (one per line); "
        "needs --output",
        **define,
    )
    flags.DEFINE_string(
        "output",
        None,
        "with --queries: results file, one JSON line per query, appended line by line; "
        "rerunning with the same file resumes after the queries it holds",
        **define,
    )
    flags.DEFINE_integer("top_k", None, "results to show (default 10)", **define)
    flags.DEFINE_integer(
        "shortlist", None, "images by votes verified with RANSAC (default 100)", **define
    )
    flags.DEFINE_integer(
        "neighbors", None, "nearest descriptors per query descriptor (default 10)", **define
    )
    flags.DEFINE_bool("json", False, "print the results as JSON", **define)
    flags.DEFINE_string(
        "visualize", None, "write a PNG of the query against its best matches", **define
    )
    flags.mark_flags_as_required(["index"], **define)
    define_extractor_flags(flag_values)
    define_retrieval_flags(flag_values)
    define_ranking_flags(flag_values)


def run(flag_values: flags.FlagValues) -> int:
    if bool(flag_values.image) == bool(flag_values.queries):
        print("delf search: error: give one of --image and --queries", file=sys.stderr)
        return 1
    if flag_values.queries and not flag_values.output:
        print("delf search: error: --queries needs --output (a .jsonl file)", file=sys.stderr)
        return 1
    try:
        config = retrieval_config_from_flags(
            flag_values,
            top_k=flag_values.top_k,
            shortlist=flag_values.shortlist,
            neighbors=flag_values.neighbors,
        )
        if flag_values.image:
            image = load_image(flag_values.image)
        else:
            queries = read_queries(flag_values.queries)
        index = Index.load(flag_values.index)
        searcher = Searcher(index, config)
        extractor = extractor_from_flags(flag_values)
        index.check_fingerprint(extractor.fingerprint)
    except (ImageError, IndexFormatError, FingerprintMismatchError, ValueError) as error:
        print(f"delf search: error: {error}", file=sys.stderr)
        return 1
    if not weights_are_trained(extractor):
        print("note: untrained (random) weights", file=sys.stderr)
    runner = QueryRunner(extractor, searcher)
    if flag_values.queries:
        return _run_batch(runner, queries, flag_values.output)
    try:
        outcome = runner.run(image)
    except ValueError as error:  # e.g. --ranking=global with a query without global descriptor
        print(f"delf search: error: {error}", file=sys.stderr)
        return 1
    results = outcome.results
    if flag_values.json:
        payload = {
            "query": flag_values.image,
            "query_features": len(outcome.features),
            "ranking": searcher.method,
            "results": [result.to_dict() for result in results],
        }
        print(json.dumps(payload, indent=2))
    else:
        print(format_table(flag_values.image, len(outcome.features), results))
    if flag_values.visualize and results:
        try:
            save_picture(draw_results(image, results), flag_values.visualize)
        except ValueError as error:
            print(f"delf search: cannot visualize: {error}", file=sys.stderr)
            return 1
        print(f"wrote {flag_values.visualize}", file=sys.stderr)
    return 0


def _run_batch(runner: QueryRunner, queries: list[str], output: str) -> int:
    try:
        summary = search_to_jsonl(runner, queries, output)
    except ValueError as error:
        print(f"delf search: error: {error}", file=sys.stderr)
        return 1
    if summary.skipped:
        print(f"note: {summary.skipped} queries already in {output}: skipped", file=sys.stderr)
    report = {
        "output": output,
        "queries": len(queries),
        "answered": summary.answered,
        "skipped": summary.skipped,
        "failed": summary.failed + summary.failed_before,
        "ranking": runner.searcher.method,
        "seconds_per_query_median": summary.seconds_per_query,
    }
    print(json.dumps(report))
    return EXIT_PARTIAL if report["failed"] else 0


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
