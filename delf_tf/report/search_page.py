"""The HTML page of `delf search --html`: each query, its ranked results, their matches.

Per query: the query image, then the ranked results as thumbnails (rank, what
ranks them: inliers, then the initial score; the file as caption, broken only
after a "/"; the query's own file marked when it is in the collection), then for
the best few a picture of the matches (query left, result right, a line per
RANSAC inlier, drawn by `delf_tf.matching.visualize.draw_matches`). Database
thumbnails come from the files recorded in the index (`images.json` paths); a
file that is gone or unreadable shows a placeholder with the reason.

Bounds keep a page small: at most `max_queries` queries, `max_results`
thumbnails and `match_pictures` match drawings per query; the page states them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from delf_tf.images import ImageError, load_image
from delf_tf.matching.visualize import draw_matches
from delf_tf.report.html import (
    PICTURE_QUALITY,
    Picture,
    Thumbnails,
    error_reason,
    esc,
    img,
    missing,
    page,
    path_text,
    to_picture,
    untrained_banner,
    write_page,
)
from delf_tf.retrieval.search import SearchResult

MAX_QUERIES = 50
MAX_RESULTS = 50
MATCH_PICTURES = 3
QUERY_SIZE = 320  # long side of the query's picture
MATCH_HEIGHT = 240  # height of a match drawing


@dataclasses.dataclass(frozen=True)
class SearchPageQuery:
    """One query of the page.

    Attributes:
      path: the query's file, as given (shown, escaped).
      image: uint8 [H, W, 3] RGB: the pixels that were extracted (the matches'
        query keypoints are in its pixels).
      results: ranked results, best first.
      num_features: query features, shown when given.
    """

    path: str
    image: np.ndarray
    results: Sequence[SearchResult]
    num_features: int | None = None


def is_query_itself(query_path: str, result_path: str) -> bool:
    """Whether a result is the query's own file (the query is in the collection)."""
    try:
        return Path(query_path).resolve() == Path(result_path).resolve()
    except (OSError, RuntimeError):
        return False


def result_stats(result: SearchResult) -> str:
    """What ranks a result, in ranking order: RANSAC inliers, then the initial score
    (k-NN votes, ASMK* similarity or global inner product)."""
    return f"inliers {result.inliers} · initial score {result.score:.4g}"


def search_page(
    queries: Sequence[SearchPageQuery],
    *,
    max_queries: int = MAX_QUERIES,
    max_results: int = MAX_RESULTS,
    match_pictures: int = MATCH_PICTURES,
    title: str = "delf search",
    untrained: bool = False,
) -> str:
    """The HTML text of the page (see the module docstring); `untrained` adds a banner
    saying the weights are random."""
    thumbnails = Thumbnails()
    shown = list(queries)[:max_queries]
    bounds = (
        f"Showing {len(shown)} of {len(queries)} "
        f"{'query' if len(queries) == 1 else 'queries'}; per query at most {max_results} "
        f"results as {thumbnails.long_side} px thumbnails and match pictures (inliers) for "
        f"the best {match_pictures}."
    )
    parts = [f"<h1>{esc(title)}</h1>", f'<p class="bounds">{esc(bounds)}</p>']
    if untrained:
        parts.append(untrained_banner())
    for number, query in enumerate(shown, start=1):
        parts.append(
            _query_section(number, query, thumbnails, max_results, match_pictures, len(shown) > 1)
        )
    return page(title, "\n".join(parts))


def write_search_page(
    path: str | os.PathLike, queries: Sequence[SearchPageQuery], **options
) -> Path:
    """Writes `search_page(queries, **options)` to `path` atomically; returns the path."""
    return write_page(path, search_page(queries, **options))


def _query_section(
    number: int,
    query: SearchPageQuery,
    thumbnails: Thumbnails,
    max_results: int,
    match_pictures: int,
    numbered: bool,
) -> str:
    heading = f"Query {number}: {query.path}" if numbered else f"Query: {query.path}"
    features = "" if query.num_features is None else f"{query.num_features} features; "
    results = list(query.results)
    summary = f"{features}{len(results)} result{'s' if len(results) != 1 else ''}"
    query_picture = thumbnails.of_array(query.image, long_side=QUERY_SIZE)
    height, width = query.image.shape[:2]
    parts = [
        f'<section class="query" id="query-{number}">',
        f"<h2>{esc(heading)}</h2>",
        f'<p class="meta">{esc(summary)}</p>',
        '<div class="row">',
        '<figure class="card query-card">',
        f'<div class="pic">{img(query_picture, f"query {query.path}", query.path)}</div>',
        '<figcaption><div class="label">query</div>'
        f'<div class="caption">{path_text(query.path)} ({width}x{height})</div></figcaption>',
        "</figure>",
        "</div>",
    ]
    if not results:
        parts.append(
            '<p class="meta">No database image shares a descriptor match with the query.</p>'
        )
    else:
        parts.append(f"<h3>Ranked results (first {min(len(results), max_results)})</h3>")
        parts.append('<div class="row results">')
        for rank, result in enumerate(results[:max_results], start=1):
            parts.append(_result_card(rank, result, thumbnails, query.path))
        parts.append("</div>")
        drawn = results[:match_pictures]
        if drawn:
            parts.append(f"<h3>Matches of the best {len(drawn)}</h3>")
            parts.append('<div class="matches">')
            for rank, result in enumerate(drawn, start=1):
                parts.append(_match_figure(rank, query, result))
            parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _result_card(rank: int, result: SearchResult, thumbnails: Thumbnails, query_path: str) -> str:
    picture = thumbnails.of_file(result.path)
    if picture.uri is None and not Path(result.path).is_absolute():
        # Indexes built without --images record store keys, not image files.
        picture = missing(f"{picture.reason} (index built without --images?)")
    itself = is_query_itself(query_path, result.path)
    mark = '<div class="self-mark">the query itself</div>' if itself else ""
    return (
        f'<figure class="card result{" self" if itself else ""}">'
        f'<div class="pic">{img(picture, f"rank {rank}: {result.key}", result.path)}</div>'
        f'<figcaption><div class="label">#{rank}</div>{mark}'
        f'<div class="stats">{esc(result_stats(result))}</div>'
        f'<div class="caption">{path_text(result.path)}</div></figcaption>'
        "</figure>"
    )


def _match_figure(rank: int, query: SearchPageQuery, result: SearchResult) -> str:
    caption = (
        f"#{rank} {result.path}: {result.inliers} inliers of {result.votes} matches "
        "(query left, result right, a line per inlier)"
    )
    return (
        f"<figure>{img(_match_picture(query, result), f'matches of rank {rank}')}"
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _match_picture(query: SearchPageQuery, result: SearchResult) -> Picture:
    try:
        database_image = load_image(result.path)
    except (ImageError, OSError) as error:
        return missing(f"matches not drawn: {error_reason(error, result.path)}")
    drawing = draw_matches(
        query.image,
        database_image,
        result.matches.query_points,
        result.matches.database_points,
        result.verification.inliers,
        height=MATCH_HEIGHT,
    )
    return to_picture(drawing, None, "JPEG", PICTURE_QUALITY)
