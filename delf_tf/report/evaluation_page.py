"""The HTML page `delf evaluate` writes beside metrics.json: report.html.

Top to bottom: the summary metrics per setup, the mean precision-recall curves
(the picture of pr_curves.png), a table of every query's AP per setup, then for
the first `max_queries` queries the query image (cropped to its box when the
dataset has one) and the first `top` ranked database images as thumbnails.

Each ranked image is marked positive, junk or negative by a coloured border and
a text label (never by colour alone). Setups disagree on those labels (the
revisited protocol moves hard images between positives and junk), so when a
dataset has several setups a row of radio buttons chooses the setup the marks
follow; it is plain CSS (`:checked ~`), the page has no script. The ranking is
shown in the order the engine returned it with its scores; equal scores are
ties, marked "tie", which the metrics order by the tie policy (pessimistic by
default: non-positives first).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from delf_tf.evaluation.datasets import Query, RetrievalDataset
from delf_tf.evaluation.evaluate import EvaluationResult, QueryResult
from delf_tf.evaluation.plots import pr_curves_picture
from delf_tf.images import ImageError
from delf_tf.report.html import (
    COLORS,
    Picture,
    Thumbnails,
    error_reason,
    esc,
    fmt,
    img,
    missing,
    page,
    path_text,
    to_picture,
    untrained_banner,
    write_page,
)

REPORT_FILE = "report.html"
MAX_QUERIES = 50
TOP = 10
MAX_TABLE_ROWS = 1000  # rows of the per-query AP table
# Setup whose marks show first: the revisited protocol's customary one when present.
PREFERRED_SETUP = "medium"
MARK_TEXT = {"positive": "✓ positive", "junk": "○ junk", "negative": "✗ negative"}


def evaluation_page(
    result: EvaluationResult,
    dataset: RetrievalDataset,
    *,
    max_queries: int = MAX_QUERIES,
    top: int = TOP,
    untrained: bool = False,
) -> str:
    """The HTML text of the report (see the module docstring); `untrained` adds a banner
    saying the weights are random."""
    setups = list(result.setups)
    thumbnails = Thumbnails()
    shown = list(result.queries)[:max_queries]
    title = f"delf evaluate: {result.dataset}"
    info = result.to_dict()
    seconds = info["seconds_per_query"]["mean"]
    meta = (
        f"{len(result.queries)} queries · setups {', '.join(setups)} · ties {result.ties}"
        + (f" · {seconds:.3f} s per query" if seconds is not None else "")
        + (
            f" · ranked images outside the database dropped: {result.dropped_non_database}"
            if result.dropped_non_database
            else ""
        )
    )
    parts = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">{esc(meta)}</p>',
        untrained_banner() if untrained else "",
        "<h2>Summary</h2>",
        _summary_table(result),
        "<h2>Precision-recall</h2>",
        img(_pr_picture(result), "mean interpolated precision-recall curves"),
        "<h2>Per query</h2>",
        _ap_table(result, len(shown)),
        '<section class="per-query">',
        f'<p class="bounds">{esc(_bounds(len(shown), len(result.queries), top, thumbnails))}</p>',
        _legend(),
        _setup_switch(setups),
        '<div class="queries">',
    ]
    for number, query_result in enumerate(shown, start=1):
        parts.append(_query_section(number, query_result, dataset, setups, top, thumbnails))
    parts += ["</div>", "</section>"]
    return page(title, "\n".join(parts), _setup_css(len(setups)))


def write_evaluation_page(
    path: str | os.PathLike, result: EvaluationResult, dataset: RetrievalDataset, **options
) -> Path:
    """Writes `evaluation_page(result, dataset, **options)` to `path` atomically."""
    return write_page(path, evaluation_page(result, dataset, **options))


def write_evaluation_report(
    result: EvaluationResult,
    dataset: RetrievalDataset,
    output_dir: str | os.PathLike,
    untrained: bool = False,
) -> Path:
    """Writes `<output_dir>/report.html`; returns its path."""
    path = Path(output_dir) / REPORT_FILE
    return write_evaluation_page(path, result, dataset, untrained=untrained)


def _bounds(shown: int, total: int, top: int, thumbnails: Thumbnails) -> str:
    return (
        f"Thumbnails for the first {shown} of {total} queries (protocol order), each with its "
        f"first {top} ranked images ({thumbnails.long_side} px). Ranked images appear in the "
        "engine's order with its rank score (delf's engine: 1 + RANSAC inliers + the "
        "initial score scaled into [0, 1) for the verified shortlist, below 1 for the rest: "
        "inliers first, then the initial score, as on the search page); equal rank scores "
        "are ties (marked), ordered for the metrics by the tie policy."
    )


def _summary_table(result: EvaluationResult) -> str:
    ks = list(result.ks)
    head = "".join(f"<th>mP@{k}</th>" for k in ks)
    rows = [
        "<table class='summary'><tr><th>setup</th><th>mAP</th>"
        f"{head}<th>queries evaluated</th><th>without positives</th></tr>"
    ]
    for setup in result.setups:
        summary = result.summary(setup)
        cells = "".join(f'<td class="num">{fmt(summary[f"mP@{k}"])}</td>' for k in ks)
        rows.append(
            f'<tr><td>{esc(setup)}</td><td class="num">{fmt(summary["mAP"])}</td>{cells}'
            f'<td class="num">{summary["queries_evaluated"]}</td>'
            f'<td class="num">{summary["queries_without_positives"]}</td></tr>'
        )
    rows.append("</table>")
    return "\n".join(rows)


def _pr_picture(result: EvaluationResult) -> Picture:
    return to_picture(pr_curves_picture(result), None, "PNG")


def _ap_table(result: EvaluationResult, with_thumbnails: int) -> str:
    queries = list(result.queries)
    head = "".join(f"<th>AP {esc(s)}</th>" for s in result.setups)
    rows = [f"<table class='per-query-ap'><tr><th>query</th><th>image</th>{head}</tr>"]
    for number, query_result in enumerate(queries[:MAX_TABLE_ROWS], start=1):
        name = esc(query_result.query.name)
        if number <= with_thumbnails:
            name = f'<a href="#q-{number}">{name}</a>'
        cells = "".join(
            f'<td class="num">{fmt(query_result.metrics[s].ap)}</td>' for s in result.setups
        )
        rows.append(f"<tr><td>{name}</td><td>{esc(query_result.query.image_id)}</td>{cells}</tr>")
    rows.append("</table>")
    if len(queries) > MAX_TABLE_ROWS:
        rows.append(
            f'<p class="bounds">First {MAX_TABLE_ROWS} of {len(queries)} queries listed; '
            "per_query.csv has them all.</p>"
        )
    return "\n".join(rows)


def _legend() -> str:
    spans = "".join(
        f'<span style="border-color:{COLORS[kind]}">{esc(text)}</span>'
        for kind, text in MARK_TEXT.items()
    )
    return f'<p class="legend">Marks: {spans}</p>'


def _default_setup(setups: Sequence[str]) -> int:
    return setups.index(PREFERRED_SETUP) if PREFERRED_SETUP in setups else 0


def _setup_switch(setups: Sequence[str]) -> str:
    """Radio buttons (siblings of `.queries`, which the CSS of `_setup_css` keys on)."""
    checked = _default_setup(setups)
    hidden = ' style="display:none"' if len(setups) == 1 else ""
    parts = [f'<span class="meta"{hidden}>Marks follow the setup: </span>']
    for number, setup in enumerate(setups):
        mark = " checked" if number == checked else ""
        parts.append(
            f'<input type="radio" name="setup" id="setup-{number}"{mark}{hidden}>'
            f'<label for="setup-{number}"{hidden}> {esc(setup)} </label>'
        )
    return "\n".join(parts)


def _setup_css(num_setups: int) -> str:
    rules = [".queries .mark { display: none; }"]
    for number in range(num_setups):
        selected = f"#setup-{number}:checked ~ .queries"
        rules.append(f"{selected} .mark.s{number} {{ display: block; }}")
        for kind in MARK_TEXT:
            rules.append(
                f"{selected} .card.s{number}-{kind} {{ border-color: {COLORS[kind]}; }}"
                f" {selected} .mark.s{number}.{kind} {{ color: {COLORS[kind]}; }}"
            )
    return "\n" + "\n".join(rules) + "\n"


def _query_section(
    number: int,
    query_result: QueryResult,
    dataset: RetrievalDataset,
    setups: Sequence[str],
    top: int,
    thumbnails: Thumbnails,
) -> str:
    query = query_result.query
    aps = [fmt(query_result.metrics[setup].ap) for setup in setups]
    if len(setups) > 1:
        aps = [f"{setup} {ap}" for setup, ap in zip(setups, aps, strict=True)]
    meta = (
        f"AP {' · '.join(aps)} · {query_result.ranked} images ranked in "
        f"{query_result.seconds:.3f} s"
    )
    parts = [
        f'<section class="query" id="q-{number}">',
        f"<h3>Query {number}: {esc(query.name)} ({esc(query.image_id)})</h3>",
        f'<p class="meta">{esc(meta)}</p>',
        '<div class="row">',
        _query_card(query, dataset, thumbnails),
    ]
    ranked = list(query_result.top)
    scores = [score for _, score in ranked]
    for rank, (image_id, score) in enumerate(ranked[:top], start=1):
        tie = score is not None and (
            (rank > 1 and scores[rank - 2] == score)
            or (rank < len(scores) and scores[rank] == score)
        )
        parts.append(_result_card(rank, image_id, score, tie, query, dataset, setups, thumbnails))
    parts.append("</div>")
    if not ranked:
        parts.append('<p class="meta">The engine ranked no database image for this query.</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _query_card(query: Query, dataset: RetrievalDataset, thumbnails: Thumbnails) -> str:
    try:
        picture = thumbnails.of_array(dataset.query_image(query))
    except (ImageError, OSError, ValueError) as error:
        path = dataset.image_paths.get(query.image_id, "")
        picture = missing(f"query image unavailable: {error_reason(error, path)}")
    where = "whole image"
    if query.bbox is not None:
        where = "cropped to box (" + ", ".join(f"{v:.0f}" for v in query.bbox) + ")"
    return (
        '<figure class="card query-card">'
        f'<div class="pic">{img(picture, f"query {query.name}", query.image_id)}</div>'
        '<figcaption><div class="label">query</div>'
        f'<div class="caption">{esc(query.image_id)}, {esc(where)}</div></figcaption>'
        "</figure>"
    )


def _result_card(
    rank: int,
    image_id: str,
    score: float | None,
    tie: bool,
    query: Query,
    dataset: RetrievalDataset,
    setups: Sequence[str],
    thumbnails: Thumbnails,
) -> str:
    path = dataset.image_paths.get(image_id)
    picture = thumbnails.of_file(path) if path is not None else missing("not an image of the set")
    kinds = [_kind(image_id, query, setup) for setup in setups]
    classes = " ".join(f"s{number}-{kind}" for number, kind in enumerate(kinds))
    marks = "".join(
        f'<div class="mark s{number} {kind}">{esc(MARK_TEXT[kind])}</div>'
        for number, kind in enumerate(kinds)
    )
    stats = "" if score is None else f"rank score {score:.4g}" + (" (tie)" if tie else "")
    return (
        f'<figure class="card result {classes}">'
        f'<div class="pic">{img(picture, f"rank {rank}: {image_id}", str(path or image_id))}</div>'
        f'<figcaption><div class="label">#{rank}</div>{marks}'
        f'<div class="stats">{esc(stats)}</div>'
        f'<div class="caption">{path_text(image_id)}</div></figcaption>'
        "</figure>"
    )


def _kind(image_id: str, query: Query, setup: str) -> str:
    truth = query.groundtruth[setup]
    if image_id in truth.positives:
        return "positive"
    if image_id in truth.junk:
        return "junk"
    return "negative"
