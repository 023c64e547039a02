"""Released reference models: detection, presets, extraction equal to the reference's way,
export for TF Serving, serving over gRPC and REST.

The releases cannot be downloaded here; `delf_tf.testing.synthetic_releases` writes TF1 graph
SavedModels with the same feeds, fetches and semantics (no signature, v1 control flow,
TF1 ref variables for DELF and resource variables for DELG).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import skimage.transform
from conftest import saved_model_cli_show_all
from PIL import Image

from delf_tf.errors import ConfigError
from delf_tf.releases.folder import find_release
from delf_tf.releases.presets import DELG_SCALES, RELEASE_PRESETS
from delf_tf.testing.synthetic_releases import build_many_in_subprocess

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def releases(tmp_path_factory):
    """Synthetic release folders: DELF (ref variables + pca/), DELG (resource variables),
    a DELG release under a name the project does not know, and a DELG release made the
    way the reference's TF2 exporter makes one (a tf.function called from a TF1 graph:
    StatefulPartitionedCall, v2 While and If, nested function calls)."""
    root = tmp_path_factory.mktemp("releases")
    folders = {
        "delf": root / "delf_gld_20190411",
        "delg": root / "r50delg_gld_20200814",
        "unknown": root / "my_own_delg",
        "function": root / "tf2_export" / "r50delg_gld_20200814",
    }
    build_many_in_subprocess(
        [
            (folders["delf"], "delf", "tiny", 0, False),
            (folders["delg"], "delg", "tiny", 1, True),
            (folders["function"], "delg", "tiny", 2, True, "function"),
        ]
    )
    shutil.copytree(folders["delg"], folders["unknown"])  # the same graph, a name not known
    return folders


@pytest.fixture(scope="session")
def photo():
    """uint8 [300, 420, 3]: larger than the 256-px limit the tests set (Pillow resize path)."""
    image = skimage.transform.resize(skimage.data.astronaut(), (300, 420), anti_aliasing=True)
    return (image * 255).round().astype(np.uint8)


def median_score_threshold(release_dir, image) -> float:
    """The median attention score of a synthetic release on `image` (random weights put the
    scores anywhere): a threshold that keeps about half of the locations."""
    from delf_tf.extraction.extractor import build_extractor

    extractor = build_extractor(model=release_dir, overrides={"max_image_size": 256})
    scores = extractor.extract(image, score_threshold=-np.inf).scores
    return float(np.median(scores))


@pytest.fixture(scope="session")
def delg_extractor(releases, photo):
    from delf_tf.extraction.extractor import build_extractor

    threshold = median_score_threshold(releases["delg"], photo)
    overrides = {"max_image_size": 256, "score_threshold": threshold}
    return build_extractor(model=releases["delg"], overrides=overrides)


def reference_extract(release_dir, config, pca=None):
    """The reference extractor's way (prune + numpy) with the settings of `config`."""
    from delf_tf.releases.reference import ReferenceExtractor, ReferenceSettings

    return ReferenceExtractor(find_release(release_dir), ReferenceSettings.from_config(config, pca))


def assert_same_features(ours, reference):
    """Same keypoint set within 0.01 px (order-free), descriptors to 1e-5, global to 1e-5."""
    assert len(ours) == len(reference["scores"]) > 0
    # Features of different levels can share a keypoint: match on (x, y, level scale).
    ours_points = np.column_stack([ours.keypoints, 1e3 * ours.scales])
    reference_points = np.column_stack([reference["keypoints"], 1e3 * reference["scales"]])
    distances = np.linalg.norm(ours_points[:, None, :] - reference_points[None, :, :], axis=2)
    nearest = distances.argmin(axis=1)
    assert distances[np.arange(len(ours)), nearest].max() < 0.01
    assert sorted(nearest.tolist()) == list(range(len(ours)))  # a one-to-one match
    np.testing.assert_allclose(ours.descriptors, reference["descriptors"][nearest], atol=1e-5)
    np.testing.assert_allclose(ours.scores, reference["scores"][nearest], rtol=1e-6)
    np.testing.assert_allclose(ours.scales, reference["scales"][nearest], rtol=1e-6)
    if "global_descriptor" in reference:
        np.testing.assert_allclose(
            ours.global_descriptor, reference["global_descriptor"], atol=1e-5
        )


def test_release_folders_are_recognised_by_their_contents(releases, tmp_path):
    delf = find_release(releases["delf"])
    assert (delf.kind, delf.name) == ("delf", "delf_gld_20190411")
    assert delf.model_dir == releases["delf"] / "model"
    assert delf.pca_dir == releases["delf"] / "pca"
    assert find_release(releases["delf"] / "model") == delf  # the model/ folder itself
    delg = find_release(releases["delg"])
    assert (delg.kind, delg.name, delg.pca_dir) == ("delg", "r50delg_gld_20200814", None)
    assert delg.preset is RELEASE_PRESETS["r50delg_gld_20200814"]
    unknown = find_release(releases["unknown"])
    assert unknown.name is None and unknown.preset.kind == "delg"
    assert find_release(tmp_path) is None  # no SavedModel here


def test_presets_follow_the_reference_configs(releases, delg_extractor):
    from delf_tf.extraction.extractor import build_extractor

    config = build_extractor(model=releases["delg"]).config
    assert config.score_threshold == 175.0 and config.max_features == 1000
    assert config.scales == DELG_SCALES and config.global_scale_indices == (3, 4, 5)
    assert config.max_image_size == 1024
    assert delg_extractor.config.max_image_size == 256  # a flag overrides the preset
    described = delg_extractor.describe()
    assert described["release"] == "r50delg_gld_20200814"
    assert (described["descriptor_dim"], described["global_dim"]) == (128, 2048)
    delf = build_extractor(model=releases["delf"])
    assert delf.config.max_image_size == -1 and delf.config.pca_dim == 40
    assert delf.describe()["pca"] is True and delf.describe()["descriptor_dim"] == 40
    # A release of unknown name gets the DELG defaults; a preset name picks another config.
    unknown = build_extractor(model=releases["unknown"])
    assert unknown.config.score_threshold == 100.0 and unknown.config.max_image_size == 1024
    named = build_extractor(model=releases["unknown"], preset="r101delg_gldv2clean_20200914")
    assert named.config.score_threshold == 357.48


def test_delg_release_extracts_what_the_reference_extractor_computes(
    releases, delg_extractor, photo
):
    ours = delg_extractor.extract(photo)
    expected = reference_extract(releases["delg"], delg_extractor.config).extract(photo)
    assert_same_features(ours, expected)
    assert ours.descriptors.shape[1] == 128 and ours.global_descriptor.shape == (2048,)
    np.testing.assert_allclose(np.linalg.norm(ours.global_descriptor), 1.0, atol=1e-6)
    assert ours.keypoints[:, 0].max() > 256  # original-image pixels, not resized ones


def test_function_call_release_extracts_what_the_reference_extractor_computes(releases, photo):
    """Variables flowing into StatefulPartitionedCall, library functions, v2 While and If:
    what the reference's prune accepts, ReleaseNetwork runs, with the same numbers."""
    from tensorflow.core.protobuf import saved_model_pb2

    from delf_tf.extraction.extractor import build_extractor

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((releases["function"] / "saved_model.pb").read_bytes())
    graph = saved_model.meta_graphs[0].graph_def
    top_ops = {node.op for node in graph.node}
    function_ops = {node.op for f in graph.library.function for node in f.node_def}
    assert "StatefulPartitionedCall" in top_ops and "Enter" not in top_ops
    assert {"While", "If", "StatefulPartitionedCall"} <= function_ops
    threshold = median_score_threshold(releases["function"], photo)
    overrides = {"max_image_size": 256, "score_threshold": threshold}
    extractor = build_extractor(model=releases["function"], overrides=overrides)
    ours = extractor.extract(photo)
    expected = reference_extract(releases["function"], extractor.config).extract(photo)
    assert_same_features(ours, expected)
    assert ours.global_descriptor.shape == (2048,)


def test_delf_release_applies_its_pca_as_the_reference_does(releases, photo):
    from delf_tf.extraction.extractor import build_extractor
    from delf_tf.extraction.pca import PcaParams

    threshold = median_score_threshold(releases["delf"], photo)
    extractor = build_extractor(model=releases["delf"], overrides={"score_threshold": threshold})
    ours = extractor.extract(photo)
    pca = PcaParams.from_datum_folder(releases["delf"] / "pca")
    expected = reference_extract(releases["delf"], extractor.config, pca).extract(photo)
    assert_same_features(ours, expected)
    assert ours.descriptors.shape[1] == 40 and ours.global_descriptor is None


def test_a_delf_config_file_configures_the_release(releases, photo, tmp_path):
    from delf_tf.extraction.extractor import build_extractor

    config_file = tmp_path / "my_config.pbtxt"
    model_path = os.path.relpath(releases["delg"], tmp_path)  # relative to the config file
    config_file.write_text(
        textwrap.dedent(
            f"""
            use_local_features: true
            use_global_features: true
            model_path: "{model_path}"
            image_scales: 0.5
            image_scales: 1.0
            image_scales: 1.4142135
            delf_local_config {{ use_pca: false max_feature_num: 50 score_threshold: 60.0 }}
            delf_global_config {{ use_pca: false image_scales_ind: 0 image_scales_ind: 2 }}
            max_image_size: 200
            """
        )
    )
    extractor = build_extractor(delf_config=config_file)
    config = extractor.config
    assert config.scales == (0.5, 1.0, float(np.float32(1.4142135)))  # float32, as the proto
    assert (config.max_features, config.score_threshold, config.max_image_size) == (50, 60.0, 200)
    assert config.global_scale_indices == (0, 2)
    expected = reference_extract(releases["delg"], config).extract(photo)
    assert_same_features(extractor.extract(photo), expected)
    with pytest.raises(ConfigError, match="applies to released reference models"):
        build_extractor(weights="random", delf_config=config_file, model=tmp_path)


@pytest.fixture(scope="session")
def release_export(releases, delg_extractor, tmp_path_factory):
    from delf_tf.export import export_saved_model

    return export_saved_model(delg_extractor.module, tmp_path_factory.mktemp("release_exports"))


def test_release_export_survives_a_fresh_process_and_saved_model_cli(
    release_export, delg_extractor, photo, tmp_path
):
    from delf_tf.images import encode_png

    ours = delg_extractor.extract(photo)
    (tmp_path / "photo.png").write_bytes(encode_png(photo))
    script = textwrap.dedent(
        f"""
        import json, pathlib, tensorflow as tf
        data = pathlib.Path({str(tmp_path / "photo.png")!r}).read_bytes()
        model = tf.saved_model.load({str(release_export)!r})
        served = model.signatures["serving_default"](
            image_bytes=tf.constant([data, b"not an image"]))
        out = {{k: v.numpy().tolist() for k, v in served.items() if k != "fingerprint"}}
        print(json.dumps(out))
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert served["valid"] == [True, False] and served["num_features"] == [len(ours), 0]
    n = len(ours)
    np.testing.assert_allclose(np.array(served["descriptors"][0])[:n], ours.descriptors, atol=1e-6)
    np.testing.assert_allclose(np.array(served["keypoints"][0])[:n], ours.keypoints, atol=1e-4)
    np.testing.assert_allclose(served["global_descriptor"][0], ours.global_descriptor, atol=1e-6)
    shown = saved_model_cli_show_all(release_export)
    for text in ("signature_def['serving_default']", "signature_def['extract_image']"):
        assert text in shown
    assert shown.count("outputs['global_descriptor']") == 2


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_release_export_serves_the_in_process_features(
    release_export, delg_extractor, photo, protocol
):
    from delf_tf.serving.client import ServingExtractor
    from delf_tf.serving.local_server import LocalServer
    from delf_tf.serving.repository import ModelRepository, ModelSource

    repository = ModelRepository([ModelSource("delf", release_export.parent)])
    server = LocalServer(repository, grpc_port=0, rest_port=0, poll_seconds=0).start()
    try:
        client = ServingExtractor(server.addresses()[protocol], protocol=protocol)
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format="PNG")
        (served,) = client.extract_batch([buffer.getvalue()])
        assert client.fingerprint == delg_extractor.fingerprint
    finally:
        server.stop()
    ours = delg_extractor.extract(photo)
    np.testing.assert_allclose(served.keypoints, ours.keypoints, atol=1e-4)
    np.testing.assert_allclose(served.descriptors, ours.descriptors, atol=1e-5)
    np.testing.assert_allclose(served.global_descriptor, ours.global_descriptor, atol=1e-5)


def test_delf_extract_and_export_take_a_release_folder(releases, photo, tmp_path, capsys):
    from delf_tf.cli import main
    from delf_tf.features import FeatureStore

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(photo).save(images / "a.png")
    store_dir = tmp_path / "features"
    argv = ["delf", "extract", f"--images={images}", f"--output_dir={store_dir}", "--format=both"]
    model = [f"--model={releases['delg']}", "--max_image_size=256", "--score_threshold=0"]
    assert main([*argv, *model]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["extracted"] == 1
    stored = FeatureStore.open(store_dir).load("a.png")
    assert stored.global_descriptor.shape == (2048,) and stored.descriptors.shape[1] == 128
    # The reference's files beside the .npz: the same arrays.
    from delf_tf.features.delf_io import local_features_from_delf
    from delf_tf.formats.delf_file import read_global_descriptor

    as_delf = local_features_from_delf(store_dir / "a.png.delf")
    np.testing.assert_array_equal(as_delf.keypoints, stored.keypoints)
    np.testing.assert_array_equal(as_delf.descriptors, stored.descriptors)
    np.testing.assert_array_equal(
        read_global_descriptor(store_dir / "a.png.delg_global"), stored.global_descriptor
    )
    # The reference's files alone (no manifest, no fingerprint) index and search too,
    # with the DELG global descriptors ranking the collection.
    reference_dir = tmp_path / "reference_files"
    reference_dir.mkdir()
    for name in ("a.png.delf", "a.png.delg_global"):
        shutil.copy(store_dir / name, reference_dir / name)
    index_dir = tmp_path / "index"
    argv = ["delf", "index", f"--features={reference_dir}", f"--output_dir={index_dir}"]
    assert main([*argv, f"--images={images}"]) == 0
    indexed = json.loads(capsys.readouterr().out)
    assert indexed["global_descriptors"] is True and indexed["fingerprint"] is None
    search = ["delf", "search", f"--index={index_dir}", f"--images={images / 'a.png'}", *model]
    assert main([*search, "--ranking=global", "--top_k=1"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["ranking"] == "global" and found["results"][0]["key"] == "a.png"
    argv = ["delf", "export", f"--model={releases['delf']}", f"--export_base={tmp_path / 'm'}"]
    assert main(argv) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["descriptor_dim"] == 40 and exported["global_dim"] is None
    assert Path(exported["export"], "saved_model.pb").is_file()
