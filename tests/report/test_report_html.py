"""HTML pages of search and evaluation results, rendered in headless Chromium.

The page tests need no model: a tiny synthetic index of LocalFeatures made here
(geometry known, so RANSAC finds real inliers) and a hand-made benchmark. Each
page is opened in headless Chromium with a probe script prepended that records,
once the page has loaded, what a person would see: the images and whether each
decoded (naturalWidth > 0), script and resource errors, Content-Security-Policy
violations, the visible text and the result cards' border colours; the test
reads them from the dumped DOM. Chromium's console output (stderr) must be
empty of page messages. Skipped when no Chromium is installed (`.ci/run`
installs Debian's `chromium`); $DELF_CHROMIUM names another binary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from delf_tf.config import RetrievalConfig
from delf_tf.evaluation.datasets import GroundTruth, Query, RetrievalDataset, revisited_setups
from delf_tf.evaluation.evaluate import evaluate
from delf_tf.features.local_features import LocalFeatures
from delf_tf.report.evaluation_page import write_evaluation_page
from delf_tf.report.search_page import SearchPageQuery, write_search_page
from delf_tf.retrieval import ImageRecord, Index, Searcher

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")

# Prepended to a copy of the page (before its CSP meta tag, which then forbids any
# further script): records errors as they happen and the page's state at `load`.
PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(t && t.tagName ? "resource " + t.tagName : "script " + e.message);
  }, true);
  document.addEventListener("securitypolicyviolation", function (e) {
    errors.push("csp " + e.violatedDirective + " " + e.blockedURI);
  });
  function describe(cards) {
    return cards.map(function (c) {
      return {text: c.innerText, border: getComputedStyle(c).borderTopColor};
    });
  }
  window.addEventListener("load", function () {
    var images = Array.prototype.slice.call(document.images);
    var cards = Array.prototype.slice.call(document.querySelectorAll("figure.card.result"));
    var report = {
      images: images.map(function (i) {
        return {alt: i.alt, width: i.naturalWidth, complete: i.complete};
      }),
      placeholders: document.querySelectorAll(".placeholder").length,
      errors: errors,
      text: document.body.innerText,
      cards: describe(cards)
    };
    // Choose the first setup (as a click would) and look at the marks again.
    var first = document.getElementById("setup-0");
    if (first) {
      first.click();
      report.cards_first_setup = describe(cards);
    }
    var out = document.createElement("pre");
    out.id = "probe";
    out.textContent = JSON.stringify(report);
    document.body.appendChild(out);
  });
})();
</script>
"""


def find_chromium() -> str | None:
    named = os.environ.get("DELF_CHROMIUM")
    if named:
        return shutil.which(named) or (named if os.access(named, os.X_OK) else None)
    for name in CHROMIUM_NAMES:
        if shutil.which(name):
            return shutil.which(name)
    return None


def chromium_flags(profile: Path) -> list[str]:
    """Headless, offline, no first-run or background work: quick and deterministic."""
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]


def render(page: Path, workdir: Path) -> dict:
    """What Chromium shows of `page`: the probe's report plus `console` (page messages)."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium (apt-get install chromium, or set DELF_CHROMIUM)")
    text = page.read_text(encoding="utf-8")
    head = '<meta charset="utf-8">\n'
    assert text.count(head) == 1, "the page must declare its charset once"
    probed = workdir / f"probed_{page.name}"
    probed.write_text(text.replace(head, head + PROBE), encoding="utf-8")
    command = [
        chromium,
        *chromium_flags(workdir / "profile"),
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probed.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    match = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert match, f"no probe report (rc {done.returncode}): {done.stderr[-2000:]}"
    report = json.loads(_unescape(match.group(1)))
    report["console"] = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return report


def _unescape(text: str) -> str:
    return (
        text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    )


def assert_clean(report: dict) -> None:
    """Every <img> decoded, nothing blocked or failing, nothing on the console."""
    broken = [i["alt"] for i in report["images"] if not i["complete"] or i["width"] == 0]
    assert broken == [], broken
    assert report["errors"] == [], report["errors"]
    assert report["console"] == [], report["console"]


class Tags(HTMLParser):
    """Counts tags and collects attribute values (the page's static structure)."""

    def __init__(self):
        super().__init__()
        self.tags: dict[str, list[dict]] = {}

    def handle_starttag(self, tag, attrs):
        self.tags.setdefault(tag, []).append(dict(attrs))


def parse(page: Path) -> Tags:
    tags = Tags()
    tags.feed(page.read_text(encoding="utf-8"))
    return tags


def assert_self_contained(page: Path) -> None:
    tags = parse(page)
    assert "script" not in tags.tags and "link" not in tags.tags and "iframe" not in tags.tags
    for image in tags.tags.get("img", []):
        assert image["src"].startswith(("data:image/jpeg;base64,", "data:image/png;base64,"))
    assert "http://" not in page.read_text() and "https://" not in page.read_text()


# --- fixtures -------------------------------------------------------------------------------


def photo(name: str, size: int = 120) -> np.ndarray:
    picture = Image.fromarray(np.asarray(getattr(skimage.data, name)())[:, :, :3])
    factor = size / max(picture.size)
    size = (round(picture.width * factor), round(picture.height * factor))
    return np.asarray(picture.resize(size, Image.Resampling.BILINEAR))


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def searched(tmp_path):
    """A query and the results of a search in a 5-image synthetic index.

    The query is the astronaut photo scaled by 0.75; 60 of its features reappear in
    the database astronaut at the scaled-back positions (all RANSAC inliers), 20 in
    coffee at random positions, 15 in a file that is gone (geometry consistent), 8
    in a corrupt file. Names carry HTML metacharacters to check the escaping.
    """
    rng = np.random.default_rng(0)
    images = tmp_path / "db <&>"
    images.mkdir()
    Image.fromarray(photo("astronaut")).save(images / "astronaut.png")
    Image.fromarray(photo("coffee")).save(images / "coffee.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    query_image = np.asarray(Image.fromarray(photo("astronaut")).resize((90, 90)))
    dim, count = 64, 103  # random 64-D unit vectors are never within 0.8 of each other
    query_points = rng.uniform(5, 85, (count, 2)).astype(np.float32)
    query_descriptors = unit(rng.normal(size=(count, dim)))
    shared = {  # database file -> (query rows, keypoints in that image)
        "astronaut.png": (np.arange(0, 60), query_points[:60] / 0.75),
        "coffee.png": (np.arange(60, 80), rng.uniform((0, 0), (120, 80), (20, 2))),
        "gone.png": (np.arange(80, 95), query_points[80:95] + 7.0),
        "broken.jpg": (np.arange(95, 103), rng.uniform((0, 0), (120, 80), (8, 2))),
    }
    records, descriptors, keypoints = [], [], []
    for key, (rows, points) in shared.items():
        records.append(ImageRecord(key, str(images / key), None, None, len(rows)))
        descriptors.append(query_descriptors[rows])
        keypoints.append(points.astype(np.float32))
    counts = [record.num_features for record in records]
    index = Index(
        np.concatenate(descriptors),
        np.concatenate(keypoints),
        np.repeat(np.arange(len(records), dtype=np.int32), counts),
        np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        records,
        fingerprint="synthetic",
    )
    query = LocalFeatures(
        keypoints=query_points,
        scales=np.ones(count, np.float32),
        scores=np.ones(count, np.float32),
        descriptors=query_descriptors,
    )
    results = Searcher(index, RetrievalConfig(backend="brute")).search(query)
    return SearchPageQuery(str(tmp_path / "query <1>.png"), query_image, results, count)


def test_search_page_in_chromium(searched, tmp_path):
    results = searched.results
    assert [r.key for r in results] == ["astronaut.png", "gone.png", "coffee.png", "broken.jpg"]
    assert results[0].inliers == 60 and results[1].inliers == 15
    page = write_search_page(tmp_path / "out" / "results.html", [searched])
    assert_self_contained(page)
    text = page.read_text()
    assert "db &lt;&amp;&gt;" in text and "query &lt;1&gt;.png" in text and "<&>" not in text
    assert page.stat().st_size < 200_000
    assert list(page.parent.iterdir()) == [page]  # written atomically: no temporary left

    report = render(page, tmp_path)
    assert_clean(report)
    alts = [i["alt"] for i in report["images"]]
    # The query, the two readable results and their match drawings (the best 3 are drawn;
    # rank 2's file is gone): placeholders stand for the rest, never a broken <img>.
    assert alts[0].startswith("query ")
    assert alts[1:] == [
        "rank 1: astronaut.png",
        "rank 3: coffee.png",
        "matches of rank 1",
        "matches of rank 3",
    ]
    assert all(i["width"] > 0 for i in report["images"])
    assert report["placeholders"] == 3  # gone and broken thumbnails, gone's match drawing
    shown = report["text"]
    for rank in range(1, 5):
        assert f"#{rank}" in shown
    assert "inliers 60 · initial score 60" in shown
    assert "image unavailable" in shown and "gone.png" in shown
    assert "matches not drawn" in shown
    assert "Matches of the best 3" in shown


def test_search_page_without_results_and_bounds(searched, tmp_path):
    empty = SearchPageQuery("q.png", searched.image, [], 7)
    page = write_search_page(
        tmp_path / "two.html", [searched, empty, empty], max_queries=2, max_results=1
    )
    tags = parse(page)
    # Query 1: its picture, 1 thumbnail (max_results) and the drawings of the best 3, of
    # which 2 are readable; query 2 (no results): its picture only; query 3: not shown.
    text = page.read_text()
    assert "Showing 2 of 3 queries" in text
    assert "No database image shares a descriptor match" in text
    assert len([t for t in tags.tags["figure"] if "result" in t.get("class", "")]) == 1
    assert len(tags.tags["img"]) == 1 + 1 + 2 + 1
    # An index built without --images records store keys (relative): say so.
    keys_only = [dataclasses.replace(r, path=r.key) for r in searched.results]
    page = write_search_page(
        tmp_path / "keys.html", [dataclasses.replace(searched, results=keys_only)]
    )
    assert page.read_text().count("(index built without --images?)</div>") == 4
    assert len(parse(page).tags["img"]) == 1


@pytest.fixture()
def evaluated(tmp_path):
    """A revisited-style benchmark of 2 queries over 5 images (one gone), ranked by hand."""
    folder = tmp_path / "bench"
    folder.mkdir()
    for name in ("astronaut", "coffee", "rocket", "chelsea"):
        Image.fromarray(photo(name)).save(folder / f"{name}.png")
    Image.fromarray(photo("astronaut", 160)).save(folder / "query_astronaut.png")
    paths = {name: folder / f"{name}.png" for name in ("astronaut", "coffee", "rocket")}
    paths |= {"chelsea": folder / "chelsea.png", "gone": folder / "gone.png"}
    paths["query_astronaut"] = folder / "query_astronaut.png"
    queries = (
        Query(
            "astronaut_1",
            "query_astronaut",
            (20.0, 10.0, 120.0, 150.0),
            revisited_setups(easy=["astronaut"], hard=["chelsea"], junk=["gone"]),
        ),
        Query(
            "coffee_1",
            "coffee",
            None,
            {
                "easy": GroundTruth(frozenset({"rocket"}), frozenset()),
                "medium": GroundTruth(frozenset({"rocket"}), frozenset({"chelsea"})),
                "hard": GroundTruth(frozenset(), frozenset({"rocket"})),
            },
        ),
    )
    dataset = RetrievalDataset(
        "tinyrox",
        ("astronaut", "coffee", "rocket", "chelsea", "gone"),
        queries,
        ("easy", "medium", "hard"),
        paths,
    )
    rankings = {
        # The query image itself (not in the database) is dropped; gone and rocket tie.
        "query_astronaut": [
            ("query_astronaut", 9.0),
            ("astronaut", 8.0),
            ("gone", 5.0),
            ("rocket", 5.0),
            ("chelsea", 2.0),
            ("coffee", 1.0),
        ],
        "coffee": [("chelsea", 3.0), ("rocket", 2.0)],
    }
    result = evaluate(dataset, lambda image, qid: rankings[qid], progress=False)
    return result, dataset


def test_evaluation_page_in_chromium(evaluated, tmp_path):
    result, dataset = evaluated
    # QueryResult.top: the engine's order and scores, images outside the database dropped.
    assert result.queries[0].top == (
        ("astronaut", 8.0),
        ("gone", 5.0),
        ("rocket", 5.0),
        ("chelsea", 2.0),
        ("coffee", 1.0),
    )
    assert len(result.queries[1].top) == 2
    page = write_evaluation_page(tmp_path / "report.html", result, dataset, top=4)
    assert_self_contained(page)
    report = render(page, tmp_path)
    assert_clean(report)
    alts = [i["alt"] for i in report["images"]]
    assert alts == [
        "mean interpolated precision-recall curves",
        "query astronaut_1",
        "rank 1: astronaut",
        "rank 3: rocket",
        "rank 4: chelsea",
        "query coffee_1",
        "rank 1: chelsea",
        "rank 2: rocket",
    ]
    assert report["placeholders"] == 1 and "image unavailable" in report["text"]
    shown = report["text"]
    # AP values as the metrics computed them, in the summary and per query.
    medium = result.summary("medium")["mAP"]
    assert f"{medium:.4f}" in shown
    astronaut_medium = result.queries[0].metrics["medium"].ap
    assert f"medium {astronaut_medium:.4f}" in shown
    assert "hard n/a" in shown  # coffee_1 has no hard positive
    assert "rank score 5 (tie)" in shown
    ranks = [re.findall(r"^#\d+$", c["text"], re.M) for c in report["cards"]]
    assert ranks == [["#1"], ["#2"], ["#3"], ["#4"], ["#1"], ["#2"]]
    # Marks follow the "medium" setup (checked by default), then "easy" once chosen:
    # hard positives (chelsea) become junk. Text and colour agree; other setups' hidden.
    medium = ["positive", "junk", "negative", "positive", "junk", "positive"]
    easy = ["positive", "junk", "negative", "junk", "negative", "positive"]
    assert_marks(report["cards"], medium)
    assert_marks(report["cards_first_setup"], easy)


def assert_marks(cards: list[dict], kinds: list[str]) -> None:
    colors = {"positive": "rgb(26, 127, 55)", "junk": "rgb(191, 135, 0)"}
    colors["negative"] = "rgb(207, 34, 46)"
    assert len(cards) == len(kinds)
    for card, kind in zip(cards, kinds, strict=True):
        shown = [other for other in colors if other in card["text"]]
        assert shown == [kind], card
        assert card["border"] == colors[kind], card


def test_evaluation_page_bounds(evaluated, tmp_path):
    result, dataset = evaluated
    page = write_evaluation_page(tmp_path / "r.html", result, dataset, max_queries=1, top=2)
    text = page.read_text()
    assert "first 1 of 2 queries" in text and "first 2 ranked images" in text
    tags = parse(page)
    # PR curves + query 1 + its first 2 results (astronaut, gone -> placeholder).
    assert len(tags.tags["img"]) == 3
    assert len(tags.tags["section"]) == 2  # the per-query section and one query
    # Both queries are in the AP table; only the first links to its thumbnails.
    assert [a["href"] for a in tags.tags["a"]] == ["#q-1"]
    assert "coffee_1" in text


# --- the command (`delf evaluate`'s report.html: tests/commands/test_evaluate_command.py) --------------


def test_search_command_writes_a_page(tmp_path, extractor, small_config, model_config_file, capsys):
    from delf_tf.cli import main
    from delf_tf.extraction.folder import extract_to_store
    from delf_tf.retrieval.queries import rotated

    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(photo(name, 128)).save(images / f"{name}_a.png")
    Image.fromarray(rotated(photo("astronaut", 128), 10)).save(images / "astronaut_b.png")
    store, _ = extract_to_store(extractor, images, tmp_path / "features", progress=False)
    Index.from_store(store, images, progress=False).save(tmp_path / "index")
    config = tmp_path / "extraction.json"
    small_config.save(config)
    model = [f"--extraction_config={config}", f"--model_config={model_config_file}"]

    html = tmp_path / "results.html"
    search = ["delf", "search", f"--index={tmp_path / 'index'}", f"--html={html}"]
    assert main([*search, f"--images={images / 'astronaut_b.png'}", *model]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["html"] == str(html)
    assert payload["results"][0]["key"] == "astronaut_b.png"  # the query is in the index
    tags = parse(html)
    results = [t for t in tags.tags["figure"] if "result" in t.get("class", "")]
    assert len(results) == len(payload["results"]) == 3
    # Query + 3 thumbnails + 3 match drawings, every one embedded.
    assert len(tags.tags["img"]) == 7
