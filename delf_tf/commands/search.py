"""`delf search`: rank the images of an index against a query image."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from absl import flags

from delf_tf.commands.common import define_extractor_flags, extractor_from_flags, warn_if_untrained
from delf_tf.commands.retrieval_flags import define_retrieval_flags, retrieval_config_from_flags
from delf_tf.config import RetrievalConfig

if TYPE_CHECKING:
    from delf_tf.retrieval.search import SearchResult


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string("index", None, "index directory from `delf index`", **define)
    flags.DEFINE_string("image", None, "query image file", **define)
    defaults = RetrievalConfig()
    flags.DEFINE_integer("top_k", None, f"results to show (default {defaults.top_k})", **define)
    flags.DEFINE_integer(
        "shortlist",
        None,
        f"images by votes verified with RANSAC (default {defaults.shortlist})",
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
    flags.mark_flags_as_required(["index", "image"], **define)
    define_extractor_flags(flag_values)
    define_retrieval_flags(flag_values)


def run(flag_values: flags.FlagValues) -> int:
    from delf_tf.images import load_image
    from delf_tf.matching.visualize import save_picture
    from delf_tf.report.search_page import SearchPageQuery, write_search_page
    from delf_tf.retrieval.index import Index
    from delf_tf.retrieval.search import Searcher
    from delf_tf.retrieval.visualize import draw_results

    config = retrieval_config_from_flags(
        flag_values,
        top_k=flag_values.top_k,
        shortlist=flag_values.shortlist,
        neighbors=flag_values.neighbors,
    )
    image = load_image(flag_values.image)
    index = Index.load(flag_values.index)
    extractor = extractor_from_flags(flag_values, cached=True)
    index.check_fingerprint(extractor.fingerprint)
    warn_if_untrained(extractor)
    query = extractor.extract(image)
    results = Searcher(index, config).search(query)
    print(format_table(flag_values.image, len(query), results), file=sys.stderr)
    payload = {
        "query": flag_values.image,
        "query_features": len(query),
        "results": [result.to_dict() for result in results],
    }
    if flag_values.visualize and results:
        save_picture(draw_results(image, results), flag_values.visualize)
        payload["visualize"] = flag_values.visualize
    if flag_values.html:
        page = SearchPageQuery(flag_values.image, image, results, len(query))
        payload["html"] = str(write_search_page(flag_values.html, [page]))
    print(json.dumps(payload))
    return 0


def format_table(query: str, num_features: int, results: list[SearchResult]) -> str:
    lines = [
        f"query {query} ({num_features} features)",
        f"{'rank':>4} {'inliers':>7} {'votes':>6}  path",
    ]
    lines += [
        f"{rank:>4} {r.inliers:>7} {r.votes:>6}  {r.path}" for rank, r in enumerate(results, 1)
    ]
    if not results:
        lines.append("  (no database image shares a descriptor match with the query)")
    return "\n".join(lines)
