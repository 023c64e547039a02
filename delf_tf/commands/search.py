"""`delf search`: rank the images of an index against one query image or a batch of them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from absl import flags

from delf_tf.commands.common import (
    check_output_path,
    define_extractor_flags,
    extraction_precision,
    extractor_for_index,
    is_untrained,
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
    flags.DEFINE_string(
        "images",
        None,
        "the query: an image file; or many queries: a folder of images or a list file "
        "(.txt, .lst: one image path per line), which need --output_file",
        **define,
    )
    flags.DEFINE_string("image", None, "deprecated: use --images=FILE", **define)
    flags.DEFINE_string("queries", None, "deprecated: use --images=FOLDER_OR_LIST", **define)
    flags.DEFINE_string(
        "output_file",
        None,
        "with many queries: results file, one JSON line per query, appended line by line; "
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
    from delf_tf.retrieval.search import load_searcher

    single, many = query_inputs(flag_values)
    if many and not flag_values.output_file:
        raise InputError(f"--images={many}: many queries need --output_file (a .jsonl file)")
    for name in ("output_file", "visualize", "html"):  # before any model is built
        check_output_path(name, flag_values[name].value)
    config = retrieval_config_from_flags(
        flag_values,
        top_k=flag_values.top_k,
        shortlist=flag_values.shortlist,
        neighbors=flag_values.neighbors,
    )
    image = load_image(single) if single else None
    queries = read_queries(many) if many else None
    searcher = load_searcher(flag_values.index, config)
    index = searcher.index
    extractor = extractor_for_index(flag_values, index, cached=image is not None)
    warn_if_untrained(extractor)
    runner = QueryRunner(extractor, searcher)
    if queries is not None:
        return _run_batch(runner, queries, flag_values.output_file)
    outcome = runner.run(image)
    results = outcome.results
    print(format_table(single, len(outcome.features), results), file=sys.stderr)
    payload = {
        "query": single,
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

        page = SearchPageQuery(single, image, results, len(outcome.features))
        untrained = is_untrained(extractor)
        payload["html"] = str(write_search_page(flag_values.html, [page], untrained=untrained))
    print(json.dumps(payload))
    return 0


LIST_SUFFIXES = (".txt", ".lst", ".list")  # --images=FILE with these: a list of query images


def query_inputs(flag_values: flags.FlagValues) -> tuple[str | None, str | None]:
    """(one query image, or None; a folder or list file of many queries, or None) from
    --images, or the deprecated --image / --queries (with a note)."""
    from delf_tf.commands.common import deprecated
    from delf_tf.errors import InputError

    given = [name for name in ("images", "image", "queries") if flag_values[name].value]
    if len(given) != 1:
        raise InputError("give the query images once: --images=FILE, FOLDER or LIST.txt")
    value = flag_values[given[0]].value
    if given[0] != "images":
        deprecated(given[0], "images")
        return (value, None) if given[0] == "image" else (None, value)
    path = Path(value)
    if path.is_file() and path.suffix.lower() not in LIST_SUFFIXES:
        return value, None
    return None, value


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
    """The ranked results as text: what ranks them (RANSAC inliers, then the initial
    score), the query's own file marked."""
    from delf_tf.report.search_page import is_query_itself

    lines = [
        f"query {query} ({num_features} features)",
        f"{'rank':>4} {'inliers':>7} {'initial score':>13}  path",
    ]
    for rank, r in enumerate(results, 1):
        mark = "  (the query itself)" if is_query_itself(query, r.path) else ""
        lines.append(f"{rank:>4} {r.inliers:>7} {r.score:>13.4g}  {r.path}{mark}")
    if not results:
        lines.append("  (no database image shares a descriptor match with the query)")
    return "\n".join(lines)
