"""Ground-truth loaders, revisited setups, query cropping and the restricted unpickler."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from delf_tf.evaluation.datasets import (
    DEFAULT_SETUP,
    GroundTruthError,
    crop_to_bbox,
    image_id_from_key,
    load_classic,
    load_dataset,
    load_json,
    load_revisited,
    revisited_setups,
)
from delf_tf.evaluation.safe_pickle import UnsafePickleError, safe_load, safe_loads


def _write_images(folder, names, size=(20, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.jpg")


# A small revisited ground truth: database a..f, queries q1 and q2.
IMLIST = ["a", "b", "c", "d", "e", "f"]
GND = [
    {"bbx": [2.0, 3.0, 25.0, 18.0], "easy": [0, 1], "hard": [2], "junk": [3]},
    {"bbx": [0.0, 0.0, 10.0, 10.0], "easy": [], "hard": [4, 5], "junk": []},
]


def test_revisited_setups():
    setups = revisited_setups(easy={"a", "b"}, hard={"c"}, junk={"d"})
    assert setups["easy"].positives == {"a", "b"} and setups["easy"].junk == {"c", "d"}
    assert setups["medium"].positives == {"a", "b", "c"} and setups["medium"].junk == {"d"}
    assert setups["hard"].positives == {"c"} and setups["hard"].junk == {"a", "b", "d"}


def _revisited_folder(tmp_path, as_numpy: bool, protocol: int = pickle.HIGHEST_PROTOCOL):
    _write_images(tmp_path / "jpg", IMLIST + ["q1", "q2"])
    gnd = GND
    if as_numpy:
        gnd = [
            {k: np.asarray(v, np.float64 if k == "bbx" else np.int64) for k, v in g.items()}
            for g in GND
        ]
    content = {"imlist": IMLIST, "qimlist": ["q1", "q2"], "gnd": gnd}
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(content, protocol=protocol))
    return tmp_path


@pytest.mark.parametrize("as_numpy,protocol", [(False, 2), (True, 2), (True, 4), (True, 5)])
def test_load_revisited_pickle(tmp_path, as_numpy, protocol):
    dataset = load_dataset("roxford5k", _revisited_folder(tmp_path, as_numpy, protocol))
    assert dataset.name == "roxford5k"
    assert dataset.database == tuple(IMLIST)
    assert dataset.setups == ("easy", "medium", "hard")
    q1, q2 = dataset.queries
    assert (q1.image_id, q1.bbox) == ("q1", (2.0, 3.0, 25.0, 18.0))
    assert q1.groundtruth["easy"].positives == {"a", "b"}
    assert q1.groundtruth["easy"].junk == {"c", "d"}
    assert q1.groundtruth["medium"].positives == {"a", "b", "c"}
    assert q1.groundtruth["hard"].junk == {"a", "b", "d"}
    # q2 has no easy positives: excluded from the Easy setup later, not an error here.
    assert q2.groundtruth["easy"].positives == frozenset()
    assert q2.groundtruth["hard"].positives == {"e", "f"}
    # Queries are not part of the database, but their files are known.
    assert "q1" not in dataset.database and dataset.path("q1").name == "q1.jpg"
    assert dataset.query_image(q1).shape == (15, 23, 3)


def test_load_revisited_mat_is_one_based(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    _write_images(tmp_path / "jpg", IMLIST + ["q1", "q2"])
    fields = [("bbx", "O"), ("easy", "O"), ("hard", "O"), ("junk", "O")]
    gnd = np.zeros((1, len(GND)), dtype=fields)
    for i, g in enumerate(GND):
        gnd[0, i]["bbx"] = np.asarray(g["bbx"], np.float64)
        for key in ("easy", "hard", "junk"):
            gnd[0, i][key] = np.asarray(g[key], np.float64).reshape(1, -1) + 1
    content = {
        "imlist": np.asarray(IMLIST, dtype=object).reshape(-1, 1),
        "qimlist": np.asarray(["q1", "q2"], dtype=object).reshape(-1, 1),
        "gnd": gnd,
    }
    scipy_io.savemat(tmp_path / "gnd_rparis6k.mat", content)
    dataset = load_dataset("rparis6k", tmp_path)
    assert dataset.database == tuple(IMLIST)
    q1, q2 = dataset.queries
    assert q1.groundtruth["medium"].positives == {"a", "b", "c"}
    assert q1.groundtruth["medium"].junk == {"d"}
    assert q2.groundtruth["hard"].positives == {"e", "f"}
    assert q1.bbox == (2.0, 3.0, 25.0, 18.0)


def test_revisited_errors_name_the_problem(tmp_path):
    _revisited_folder(tmp_path, as_numpy=False)
    (tmp_path / "jpg" / "f.jpg").unlink()
    with pytest.raises(GroundTruthError, match="no image file for 'f'"):
        load_dataset("roxford5k", tmp_path)
    bad = {"imlist": IMLIST, "qimlist": ["q1"], "gnd": [{"bbx": [0, 0, 1, 1], "easy": [9]}]}
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(bad))
    with pytest.raises(GroundTruthError, match=r"gnd\[0\]\.easy: index out of range"):
        load_revisited(tmp_path / "gnd_roxford5k.pkl", tmp_path / "jpg")
    with pytest.raises(GroundTruthError, match="gnd_rparis6k"):
        load_dataset("rparis6k", tmp_path)


class _Exploit:
    """Unpickling this with pickle.load would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = {"imlist": ["a"], "qimlist": [], "gnd": [_Exploit(marker)]}
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"refused global (posix|nt)\.system"):
        safe_load(path)
    with pytest.raises(UnsafePickleError, match=r"refused global (posix|nt)\.system"):
        load_revisited(path, tmp_path)
    assert not marker.exists()


def test_restricted_unpickler_admits_data_and_refuses_objects():
    data = {
        "ints": np.arange(5, dtype=np.int32),
        "big_endian": np.arange(4, dtype=">f8").reshape(2, 2),
        "scalar": np.float32(1.5),
        "text": ["x", b"y"],
        "set": {1, 2},
        "empty": np.zeros(0, np.int64),
    }
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        out = safe_loads(pickle.dumps(data, protocol=protocol))
        assert np.array_equal(out["ints"], data["ints"]) and out["ints"].dtype == np.int32
        assert np.array_equal(out["big_endian"], data["big_endian"])
        assert out["scalar"] == np.float32(1.5) and out["set"] == {1, 2}
        assert out["text"] == ["x", b"y"] and out["empty"].shape == (0,)
        with pytest.raises(UnsafePickleError, match="dtype"):
            safe_loads(pickle.dumps(np.array([1, None], dtype=object), protocol=protocol))
        with pytest.raises(UnsafePickleError, match="refused global"):
            safe_loads(pickle.dumps(np.ma.masked_array([1, 2]), protocol=protocol))
    with pytest.raises(UnsafePickleError, match="refused global"):
        safe_loads(pickle.dumps(GroundTruthError("x")))


def test_crop_to_bbox():
    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    crop = crop_to_bbox(image, (2, 1, 7, 9))
    assert crop.shape == (8, 5, 3) and np.array_equal(crop, image[1:9, 2:7])
    # Rounded like Pillow's crop, and clipped to the image.
    assert np.array_equal(crop_to_bbox(image, (1.6, -4.0, 30.0, 3.2)), image[0:3, 2:12])
    pil = np.asarray(Image.fromarray(image).crop((1.6, 0.4, 9.4, 3.6)))
    assert np.array_equal(crop_to_bbox(image, (1.6, 0.4, 9.4, 3.6)), pil)
    with pytest.raises(ValueError, match="empty"):
        crop_to_bbox(image, (5, 5, 5, 8))
    with pytest.raises(ValueError, match="empty"):
        crop_to_bbox(image, (20, 0, 30, 5))
    with pytest.raises(ValueError, match="finite"):
        crop_to_bbox(image, (0, 0, float("nan"), 5))


def test_load_classic_gt_files(tmp_path):
    images = ["all_souls_000001", "all_souls_000002", "all_souls_000003", "radcliffe_000001"]
    _write_images(tmp_path / "oxbuild_images", images)
    gt = tmp_path / "gt_files_170407"
    gt.mkdir()
    (gt / "all_souls_1_query.txt").write_text("oxc1_all_souls_000001 1.5 2.0 20.0 15.5\n")
    (gt / "all_souls_1_good.txt").write_text("all_souls_000001\nall_souls_000002\n")
    (gt / "all_souls_1_ok.txt").write_text("all_souls_000003\n")
    (gt / "all_souls_1_junk.txt").write_text("")
    dataset = load_dataset("oxford5k", tmp_path)
    assert dataset.setups == (DEFAULT_SETUP,)
    assert dataset.database == tuple(sorted(images))
    (query,) = dataset.queries
    assert (query.name, query.image_id) == ("all_souls_1", "all_souls_000001")
    assert query.bbox == (1.5, 2.0, 20.0, 15.5)
    truth = query.groundtruth[DEFAULT_SETUP]
    assert truth.positives == {"all_souls_000001", "all_souls_000002", "all_souls_000003"}
    assert truth.junk == frozenset()
    (gt / "all_souls_1_ok.txt").unlink()
    with pytest.raises(GroundTruthError, match="all_souls_1_ok.txt: missing"):
        load_classic(gt, tmp_path / "oxbuild_images")
    (gt / "all_souls_1_ok.txt").write_text("not_an_image\n")
    with pytest.raises(GroundTruthError, match="not in the database: 'not_an_image'"):
        load_classic(gt, tmp_path / "oxbuild_images")


def test_load_json(tmp_path):
    labels = {"a1": "arch", "a2": "arch", "a3": "arch", "t1": "tower", "t2": "tower", "x": None}
    _write_images(tmp_path / "images", labels)
    spec = {"name": "mini", "labels": labels, "queries": ["a1", {"id": "t1", "bbox": [0, 0, 9, 9]}]}
    (tmp_path / "groundtruth.json").write_text(json.dumps(spec))
    dataset = load_dataset("json", tmp_path)
    assert dataset.name == "mini" and dataset.database == tuple(sorted(labels))
    arch, tower = dataset.queries
    assert arch.groundtruth[DEFAULT_SETUP].positives == {"a2", "a3"}
    # The query image stays in the database but is junk: ranked against all *other* images.
    assert arch.groundtruth[DEFAULT_SETUP].junk == {"a1"}
    assert arch.bbox is None and tower.bbox == (0.0, 0.0, 9.0, 9.0)
    assert tower.groundtruth[DEFAULT_SETUP].positives == {"t2"}
    spec["queries"] = ["x"]
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(GroundTruthError, match="distractor"):
        load_json(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"labels": labels, "queries": ["nope"]}))
    with pytest.raises(GroundTruthError, match=r"queries\[0\]: 'nope'"):
        load_json(tmp_path / "bad.json")


def test_exif_rotated_query_warns(tmp_path, caplog):
    labels = {"r1": "arch", "r2": "arch"}
    _write_images(tmp_path / "images", labels)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    with Image.open(tmp_path / "images" / "r1.jpg") as image:
        image.load()
        image.save(tmp_path / "images" / "r1.jpg", exif=exif)
    spec = {"labels": labels, "queries": [{"id": "r1", "bbox": [0, 0, 10, 25]}, "r2"]}
    (tmp_path / "groundtruth.json").write_text(json.dumps(spec))
    dataset = load_dataset("json", tmp_path)
    with caplog.at_level("WARNING"):
        crop = dataset.query_image(dataset.queries[0])
        whole = dataset.query_image(dataset.queries[1])
    assert crop.shape == (25, 10, 3) and whole.shape == (20, 30, 3)
    assert any("EXIF orientation" in record.getMessage() for record in caplog.records)


def test_image_id_from_store_key():
    assert image_id_from_key("jpg/all_souls_000013.jpg") == "all_souls_000013"
    assert image_id_from_key("paris/defense/paris_defense_000001.jpg") == "paris_defense_000001"


def test_load_dataset_rejects_unknown_kinds(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset kind"):
        load_dataset("holidays", tmp_path)
    with pytest.raises(GroundTruthError, match="no ground truth"):
        load_dataset("paris6k", tmp_path)
