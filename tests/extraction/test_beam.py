"""`delf extract --runner=DirectRunner`: the extraction as a Beam pipeline.

The pipeline test runs the DirectRunner in multi-processing mode (two worker
processes that each import TensorFlow and load the export), on four small
scikit-image photos and one corrupt file, into a store that a killed run left
half full; it compares every feature file with in-process extraction of the
same export.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import skimage.transform
from PIL import Image

from delf_tf.cli import main
from delf_tf.features import FeatureStore, StoreMismatchError

REPO = Path(__file__).resolve().parents[2]
MULTI_PROCESS = "--direct_num_workers=2 --direct_running_mode=multi_processing"


def _photo(image: np.ndarray, size: int = 96) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return (
        (skimage.transform.resize(image, (size, size), anti_aliasing=True) * 255)
        .round()
        .astype(np.uint8)
    )


@pytest.fixture()
def photos(tmp_path) -> Path:
    """images/{astronaut.png, coffee.jpg, sub/chelsea.png, sub/camera.png, broken.jpg}."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(_photo(skimage.data.astronaut())).save(root / "astronaut.png")
    Image.fromarray(_photo(skimage.data.coffee())).save(root / "coffee.jpg", quality=90)
    Image.fromarray(_photo(skimage.data.chelsea())).save(root / "sub" / "chelsea.png")
    Image.fromarray(_photo(skimage.data.camera())).save(root / "sub" / "camera.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated, not a jpeg")
    (root / "notes.txt").write_text("not an image: not listed")
    return root


def run_delf(argv: list[str]) -> tuple[int, str, str]:
    """`delf ...` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["delf", *argv])
    return status, out.getvalue(), err.getvalue()


@pytest.mark.heavy
@pytest.mark.slow
def test_multi_process_pipeline_resumes_and_matches_in_process(
    photos, exported_model, tmp_path, monkeypatch
):
    from delf_tf.extraction import InProcessExtractor
    from delf_tf.images import load_image

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    reference = InProcessExtractor.from_saved_model(exported_model)
    expected = {
        key: reference.extract(load_image(photos / key))
        for key in ("astronaut.png", "coffee.jpg", "sub/camera.png", "sub/chelsea.png")
    }

    # What a killed run leaves: the manifest, two complete files, a temporary file.
    out = tmp_path / "features"
    store = FeatureStore.open_or_create(out, reference.fingerprint, reference.describe())
    for key in ("astronaut.png", "sub/camera.png"):
        store.save(key, expected[key])
    (out / "sub" / ".chelsea.png.npz.x1y2.tmp").write_bytes(b"half written")
    before = {key: os.stat(store.path(key)) for key in ("astronaut.png", "sub/camera.png")}

    status, stdout, stderr = run_delf(
        [
            "extract",
            f"--images={photos}",
            f"--output_dir={out}",
            f"--model={exported_model.parent}",  # the model dir: its highest version
            "--runner=DirectRunner",
            f"--beam_options={MULTI_PROCESS}",
            "--batch_size=2",
        ]
    )
    summary = json.loads(stdout)  # stdout holds exactly the JSON summary
    assert status == 3, stderr  # done, but an input failed
    assert summary["images"] == 5 and summary["failed"] == 1
    assert summary["skipped_existing"] == 2 and summary["extracted"] == 2
    assert summary["model"] == str(exported_model)
    failures = [line for line in stderr.splitlines() if line.startswith("skipped: ")]
    assert len(failures) == 1 and "broken.jpg" in failures[0] and "decode" in failures[0]
    report = json.loads(Path(summary["report"]).read_text())
    assert [Path(path).name for path, _ in report["failed"]] == ["broken.jpg"]

    # Nothing extracted twice: the files of the killed run are untouched.
    for key, stat in before.items():
        now = os.stat(store.path(key))
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), key
    # Everything present, bit for bit what the export gives in process.
    store = FeatureStore.open(out)
    assert list(store.stored_keys()) == sorted(expected)
    for key, features in expected.items():
        stored = store.load(key)
        assert len(stored) == len(features) > 0
        for name, array in features.arrays().items():
            np.testing.assert_array_equal(stored.arrays()[name], array, err_msg=f"{key} {name}")

    # `delf index` reads the store unchanged.
    status, stdout, stderr = run_delf(
        ["index", f"--features={out}", f"--output_dir={tmp_path / 'index'}"]
    )
    assert status == 0, stderr
    index = json.loads(stdout)
    assert index["images"] == 4
    assert index["descriptors"] == sum(len(features) for features in expected.values())
    assert index["fingerprint"] == reference.fingerprint[:12]


def _copy_to(folder: Path, remote: str) -> None:
    import tensorflow as tf

    for path in folder.rglob("*"):
        if path.is_file():
            target = f"{remote}/{path.relative_to(folder).as_posix()}"
            tf.io.gfile.makedirs(target.rsplit("/", 1)[0])
            tf.io.gfile.copy(str(path), target, overwrite=True)


def test_remote_file_system_and_a_glob_in_memory(photos, exported_model):
    """Images and store on a remote TF file system (ram://, so the in-memory DirectRunner),
    a glob pattern as input."""
    import tensorflow as tf

    from delf_tf.extraction import InProcessExtractor
    from delf_tf.images import load_image

    images, out = "ram://beam-test/images", "ram://beam-test/features"
    _copy_to(photos, images)
    argv = [
        "extract",
        f"--images={images}/*/*.png",
        f"--output_dir={out}",
        f"--model={exported_model}",
        "--runner=DirectRunner",
    ]
    status, stdout, stderr = run_delf(argv)
    assert status == 0, stderr
    summary = json.loads(stdout)
    assert (summary["images"], summary["extracted"], summary["failed"]) == (2, 2, 0), summary
    reference = InProcessExtractor.from_saved_model(exported_model)
    with tf.io.gfile.GFile(f"{out}/manifest.json") as handle:
        assert json.load(handle)["fingerprint"] == reference.fingerprint
    # Keys are relative to the folder above the pattern's first wildcard.
    assert sorted(tf.io.gfile.listdir(f"{out}/sub")) == ["camera.png.npz", "chelsea.png.npz"]
    with tf.io.gfile.GFile(f"{out}/sub/chelsea.png.npz", "rb") as handle:
        data = handle.read()
    expected = reference.extract(load_image(photos / "sub" / "chelsea.png"))
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        for name, array in expected.arrays().items():
            np.testing.assert_array_equal(arrays[name], array, err_msg=name)


@pytest.mark.heavy
@pytest.mark.slow
def test_a_model_that_is_not_an_export_is_exported_first(photos, model_config_file, tmp_path):
    from delf_tf.config import ExtractionConfig, ModelConfig
    from delf_tf.extraction import build_extractor
    from delf_tf.images import load_image

    out = tmp_path / "features"
    settings = ["--score_threshold=0", "--max_image_size=64", "--max_features=20"]
    status, stdout, stderr = run_delf(
        [
            "extract",
            f"--images={photos / 'sub'}",
            f"--output_dir={out}",
            f"--model_config={model_config_file}",
            *settings,
            "--runner=DirectRunner",
        ]
    )
    assert status == 0, stderr
    assert "exported the model" in stderr
    assert json.loads(stdout)["extracted"] == 2
    extractor = build_extractor(
        model_config=ModelConfig.load(model_config_file),
        config=ExtractionConfig(score_threshold=0.0, max_image_size=64, max_features=20),
    )
    store = FeatureStore.open(out)
    assert store.fingerprint == extractor.fingerprint
    assert list(store.stored_keys()) == ["camera.png", "chelsea.png"]
    # The features of the module the export was made of (as test_export compares them).
    stored = store.load("camera.png")
    expected = extractor.extract(load_image(photos / "sub" / "camera.png"))
    assert len(stored) == len(expected) == 20
    np.testing.assert_allclose(stored.keypoints, expected.keypoints, atol=1e-3)
    np.testing.assert_allclose(stored.descriptors, expected.descriptors, atol=1e-5)


def test_listing_keys_match_in_process_keys(photos):
    from delf_tf.extraction.beam_pipeline import glob_root, list_inputs
    from delf_tf.extraction.folder import image_key
    from delf_tf.images import list_images

    listed = dict(list_inputs(str(photos)))
    assert listed == {image_key(path, photos): str(path) for path in list_images(photos)}
    assert dict(list_inputs(f"{photos}/sub/*.png")) == {
        "camera.png": f"{photos}/sub/camera.png",
        "chelsea.png": f"{photos}/sub/chelsea.png",
    }
    assert sorted(dict(list_inputs(f"{photos}/*/c*.png"))) == ["sub/camera.png", "sub/chelsea.png"]
    assert list(list_inputs(f"{photos}/coffee.jpg")) == [("coffee.jpg", f"{photos}/coffee.jpg")]
    assert glob_root("gs://bucket/photos/*/x?.jpg") == "gs://bucket/photos"


def test_batch_rows_become_features_or_failures():
    from delf_tf.extraction.beam_pipeline import rows_to_results

    k, d = 3, 4
    outputs = {
        "keypoints": np.arange(2 * k * 2, dtype=np.float32).reshape(2, k, 2),
        "scales": np.ones((2, k), np.float32),
        "scores": np.array([[3, 2, 0], [0, 0, 0]], np.float32),
        "descriptors": np.eye(k, d, dtype=np.float32)[None].repeat(2, 0),
        "num_features": np.array([2, 0], np.int32),
        "valid": np.array([True, False]),
        "fingerprint": np.array([b"abc", b"abc"], dtype=object),
    }
    good, bad = rows_to_results(outputs, seconds=0.5)
    assert good.valid and good.fingerprint == "abc" and len(good.features) == 2
    np.testing.assert_array_equal(good.features.keypoints, [[0, 1], [2, 3]])
    np.testing.assert_array_equal(good.features.scores, [3, 2])
    assert not bad.valid and bad.features is None and bad.seconds == 0.5


def test_help_imports_neither_tensorflow_nor_beam_and_flags_need_runner(tmp_path):
    code = (
        "import contextlib, io, sys\n"
        "from delf_tf.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as text:\n"
        "    assert main(['delf', 'extract', '--help']) == 0\n"
        "assert '--runner' in text.getvalue() and '--beam_options' in text.getvalue()\n"
        "print(sorted(m for m in ('tensorflow', 'apache_beam') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    status, _, stderr = run_delf(
        ["extract", "--images=x", f"--output_dir={tmp_path}", "--beam_options=--project=p"]
    )
    assert status == 2 and "only with --runner" in stderr


def test_an_export_refuses_settings_it_fixes(photos, exported_model, tmp_path):
    status, stdout, stderr = run_delf(
        [
            "extract",
            f"--images={photos}",
            f"--output_dir={tmp_path / 'f'}",
            f"--model={exported_model}",
            "--max_features=10",
            "--runner=DirectRunner",
        ]
    )
    assert status == 1 and stdout == ""
    assert "an export carries its own settings" in stderr and "--max_features" in stderr
    assert not (tmp_path / "f").exists()


def test_store_writer_formats_local_and_remote(tmp_path, astronaut_small, extractor):
    """Local stores write the formats asked for (`delf extract --format`); remote ones npz only."""
    import tensorflow as tf

    from delf_tf.errors import InputError
    from delf_tf.features.store import StoreWriter, prepare_store

    features = extractor.extract(astronaut_small)
    root = str(tmp_path / "store")
    formats = prepare_store(root, "f" * 64, {}, ("npz", "delf"))
    assert formats == ("npz", "delf")
    writer = StoreWriter(root, formats)
    assert "a/b.jpg" not in writer
    writer.save("a/b.jpg", features)
    assert "a/b.jpg" in writer
    assert sorted(path.name for path in (tmp_path / "store" / "a").iterdir()) == [
        "b.jpg.delf",
        "b.jpg.npz",
    ]
    np.testing.assert_array_equal(
        FeatureStore.open(root).load("a/b.jpg").descriptors, features.descriptors
    )
    with pytest.raises(InputError, match="npz files only"):
        prepare_store("ram://beam-formats/store", "f" * 64, {}, ("delf",))
    assert prepare_store("ram://beam-formats/store", "f" * 64, {}) == ("npz",)
    remote = StoreWriter("ram://beam-formats/store")
    remote.save("x.png", features)
    assert "x.png" in remote and "y.png" not in remote
    # The remote manifest is the store's own: store_id included.
    with tf.io.gfile.GFile("ram://beam-formats/store/manifest.json") as handle:
        assert set(json.loads(handle.read())) == {
            "format_version",
            "fingerprint",
            "extractor",
            "store_id",
        }
    with pytest.raises(StoreMismatchError, match="use another --output_dir"):
        prepare_store("ram://beam-formats/store", "e" * 64, {})
