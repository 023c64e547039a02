"""evaluate(): rankings from a stand-in engine, metrics per setup, report files."""

from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from delf_tf.evaluation.datasets import load_dataset
from delf_tf.evaluation.evaluate import evaluate, write_per_query, write_report

IMLIST = ["a", "b", "c", "d", "e", "f"]
GND = [
    {"bbx": [2.0, 3.0, 25.0, 18.0], "easy": [0, 1], "hard": [2], "junk": [3]},
    {"bbx": [0.0, 0.0, 10.0, 10.0], "easy": [], "hard": [4, 5], "junk": []},
]
RANKINGS = {
    # "q1" is a query image, not a database image: dropped as the protocol requires.
    "q1": ["c", "a", "q1", "d", "e", "b", "f"],
    # Scored; "e" and "a" tie.
    "q2": [("e", 0.5), ("a", 0.5), ("f", 0.2), ("b", 0.1)],
}


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "jpg").mkdir()
    for name in IMLIST + ["q1", "q2"]:
        pixels = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "jpg" / f"{name}.jpg")
    content = {"imlist": IMLIST, "qimlist": ["q1", "q2"], "gnd": GND}
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(content))
    return load_dataset("roxford5k", tmp_path)


def test_evaluate_by_hand(dataset):
    shapes = {}

    def rank_fn(image, query_id):
        shapes[query_id] = (image.shape, image.dtype)
        return RANKINGS[query_id]

    result = evaluate(dataset, rank_fn, progress=False)
    # The engine sees the query cropped to its box.
    assert shapes == {"q1": ((15, 23, 3), np.uint8), "q2": ((10, 10, 3), np.uint8)}
    assert result.dropped_non_database == 1
    q1, q2 = result.queries
    # q1 easy: junk c, d removed -> a e b f: positives at 0 and 2.
    assert q1.metrics["easy"].ap == pytest.approx(0.5 + (1 / 2 + 2 / 3) / 4)
    # q1 medium: junk d removed -> c a e b f: positives at 0, 1, 3.
    q1_medium = (1 + 1 + (2 / 3 + 3 / 4) / 2) / 3
    assert q1.metrics["medium"].ap == pytest.approx(q1_medium)
    assert q1.metrics["hard"].ap == 1.0
    # q2 (ties pessimistic): a e f b, positives e and f at 1 and 2.
    q2_ap = ((0 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    assert q2.metrics["medium"].ap == pytest.approx(q2_ap)
    assert not q2.metrics["easy"].has_positives
    easy, medium, hard = (result.summary(s) for s in ("easy", "medium", "hard"))
    assert easy["mAP"] == pytest.approx(q1.metrics["easy"].ap)
    assert (easy["queries_evaluated"], easy["queries_without_positives"]) == (1, 1)
    assert easy["queries_without_positives_ids"] == ["q2"]
    assert medium["mAP"] == pytest.approx((q1_medium + q2_ap) / 2)
    assert hard["mAP"] == pytest.approx((1 + q2_ap) / 2)
    assert medium["mP@1"] == pytest.approx((1 + 0) / 2)
    assert medium["mP@5"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    optimistic = evaluate(dataset, lambda image, q: RANKINGS[q], ties="optimistic", progress=False)
    assert optimistic.queries[1].metrics["hard"].ap == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)


def test_unknown_ids_and_bad_rankings(dataset):
    with pytest.raises(ValueError, match="'zz', not an image of roxford5k"):
        evaluate(dataset, lambda image, q: ["a", "zz"], progress=False)
    # Extra distractors are allowed on request and count as non-relevant.
    result = evaluate(
        dataset, lambda image, q: ["zz", "a", "b"], allow_unknown_ids=True, progress=False
    )
    assert result.queries[0].metrics["easy"].ranks.tolist() == [1, 2]
    with pytest.raises(ValueError, match="q1: rank_fn returned an image id twice"):
        evaluate(dataset, lambda image, q: ["a", "b", "a"], progress=False)
    with pytest.raises(TypeError, match="image ids"):
        evaluate(dataset, lambda image, q: [1, 2], progress=False)
    with pytest.raises(ValueError, match="no setup"):
        evaluate(dataset, lambda image, q: [], setups=["default"], progress=False)


def test_report_files(dataset, tmp_path):
    result = evaluate(
        dataset, lambda image, q: RANKINGS[q], setups=["easy", "hard"], progress=False
    )
    paths = write_report(result, tmp_path / "out")
    metrics = json.loads(paths["metrics"].read_text())
    assert set(metrics["setups"]) == {"easy", "hard"}
    assert metrics["setups"]["easy"]["mAP"] == pytest.approx(result.summary("easy")["mAP"])
    assert metrics["queries"] == 2 and metrics["dropped_non_database"] == 1
    with open(paths["per_query"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["query"], r["setup"]) for r in rows] == [
        ("q1", "easy"),
        ("q1", "hard"),
        ("q2", "easy"),
        ("q2", "hard"),
    ]
    assert rows[2]["ap"] == ""  # q2 has no easy positives
    assert float(rows[0]["ap"]) == pytest.approx(result.queries[0].metrics["easy"].ap)
    rows_json = json.loads(write_per_query(result, tmp_path / "per_query.json").read_text())
    assert rows_json[2]["ap"] is None and rows_json[1]["first_positive_rank"] == 1
    with pytest.raises(ValueError, match=r"\.csv or \.json"):
        write_per_query(result, tmp_path / "per_query.txt")
    with Image.open(paths["pr_curves"]) as png:
        assert png.format == "PNG" and png.size == (640, 480)
        pixels = np.asarray(png.convert("RGB")).reshape(-1, 3)
    colored = (pixels.max(axis=1).astype(int) - pixels.min(axis=1)) > 60
    assert colored.sum() > 100  # the curves are drawn
