"""The SavedModel export: signatures TF Serving reads, standard ops, same features as in process."""

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import saved_model_cli_show_all
from PIL import Image

from delf_tf.cli import main
from delf_tf.contract import FORBIDDEN_OPS, existing_versions, next_version
from delf_tf.errors import InputError
from delf_tf.export import export_saved_model
from delf_tf.extraction import ExtractionModule
from delf_tf.features import LocalFeatures
from delf_tf.images import decode_image, encode_png
from delf_tf.model.loading import MODEL_CONFIG_FILE, load_delf_model
from delf_tf.serving.saved_model_proto import graph_ops, uses_xla

REPO = Path(__file__).resolve().parents[1]


def subprocess_env():
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}


def jpeg(image, orientation=None):
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def serve(exported_model, local_server, images):
    """Runs serving_default of the served version on encoded images string [B]."""
    servable = local_server.repository.resolve("delf")
    assert servable.path == exported_model
    return servable.predict("serving_default", {"image_bytes": np.array(images, dtype=object)})


def assert_same_features(outputs, row, expected, atol=1e-5):
    n = int(outputs["num_features"][row])
    assert n == len(expected)
    np.testing.assert_allclose(outputs["keypoints"][row, :n], expected.keypoints, atol=1e-3)
    np.testing.assert_allclose(outputs["scales"][row, :n], expected.scales, rtol=1e-6)
    np.testing.assert_allclose(outputs["scores"][row, :n], expected.scores, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(outputs["descriptors"][row, :n], expected.descriptors, atol=atol)
    assert not outputs["descriptors"][row, n:].any() and not outputs["keypoints"][row, n:].any()


def test_layout_and_export_info(exported_model, serving_reference, serving_config, delf_model):
    assert exported_model.name == "1"
    assert (exported_model / "saved_model.pb").is_file()
    assert (exported_model / "variables").is_dir()
    assert (exported_model / "assets.extra" / "tf_serving_warmup_requests").is_file()
    info = json.loads((exported_model / "assets" / "extraction_config.json").read_text())
    assert info["fingerprint"] == serving_reference.fingerprint
    assert info["descriptor_dim"] == delf_model.feature_depth
    assert info["model_config"] == delf_model.config.to_dict()
    assert info["extraction_config"] == serving_config.to_dict()
    assert [p.name for p in exported_model.parent.iterdir()] == ["1"], "no staging left behind"


def test_saved_model_cli_lists_both_signatures(exported_model, delf_model):
    shown = saved_model_cli_show_all(exported_model)
    blocks = {
        name: shown.split(f"signature_def['{name}']:")[1].split("signature_def[")[0]
        for name in ("serving_default", "extract_image")
    }
    for block in blocks.values():
        assert "Method name is: tensorflow/serving/predict" in block
    serving = blocks["serving_default"]
    assert "inputs['image_bytes']" in serving and "DT_STRING" in serving
    for output, shape in [
        ("keypoints", "(-1, 50, 2)"),
        ("descriptors", f"(-1, 50, {delf_model.feature_depth})"),
        ("scores", "(-1, 50)"),
        ("scales", "(-1, 50)"),
        ("num_features", "(-1)"),
        ("valid", "(-1)"),
        ("fingerprint", "(-1)"),
    ]:
        part = serving.split(f"outputs['{output}']")[1]
        assert f"shape: {shape}" in part.split("outputs[")[0], output
    image = blocks["extract_image"]
    for name in ("image", "max_features", "score_threshold", "scales"):
        assert f"inputs['{name}']" in image
    for name in ("keypoints", "scales", "scores", "descriptors", "fingerprint"):
        assert f"outputs['{name}']" in image


def test_graph_has_only_standard_ops(exported_model):
    ops = graph_ops(exported_model)
    assert not ops & FORBIDDEN_OPS
    assert not {op for op in ops if "PyFunc" in op}
    assert not uses_xla(exported_model)
    assert {"DecodeJpeg", "Conv2D", "TopKV2"} <= ops  # decoding and extraction are in the graph


def test_signature_defaults_recorded(exported_model, serving_config):
    from delf_tf.serving.saved_model_proto import read_saved_model_proto

    signature = read_saved_model_proto(exported_model).meta_graphs[0].signature_def["extract_image"]
    defaults = {key: tf.make_ndarray(value) for key, value in signature.defaults.items()}
    assert sorted(defaults) == ["max_features", "scales", "score_threshold"]
    assert int(defaults["max_features"]) == serving_config.max_features
    np.testing.assert_allclose(defaults["scales"], serving_config.scales)
    assert not set(signature.defaults) & {"image"}


def test_fresh_process_matches_in_process(
    exported_model, serving_reference, astronaut_small, tmp_path
):
    """InProcessExtractor.from_saved_model in a new Python process (no state shared)."""
    image = astronaut_small[:, :100]
    np.save(tmp_path / "image.npy", image)
    script = textwrap.dedent(
        f"""
        import numpy as np
        from delf_tf.extraction import InProcessExtractor
        extractor = InProcessExtractor.from_saved_model({str(exported_model.parent)!r})
        features = extractor.extract(np.load({str(tmp_path / "image.npy")!r}))
        features.save({str(tmp_path / "features.npz")!r})
        print(extractor.fingerprint)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env(),
        timeout=240,
        check=True,
        capture_output=True,
        text=True,
    )
    assert done.stdout.split()[-1] == serving_reference.fingerprint
    loaded = LocalFeatures.load(tmp_path / "features.npz")
    expected = serving_reference.extract(image)
    assert len(loaded) == len(expected) == 50
    np.testing.assert_allclose(loaded.keypoints, expected.keypoints, atol=1e-4)
    np.testing.assert_allclose(loaded.scores, expected.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loaded.descriptors, expected.descriptors, atol=1e-5)


def test_exif_rotated_jpegs_match_in_process_in_one_mixed_batch(
    exported_model, local_server, serving_reference, astronaut_small
):
    """Orientations 1..8 (half of them transposed: mixed sizes) in one image_bytes batch."""
    photo = astronaut_small[:96]  # 96 x 128
    images = [jpeg(photo, orientation) for orientation in range(1, 9)]
    outputs = serve(exported_model, local_server, images)
    assert outputs["valid"].all()
    for row, data in enumerate(images):
        rotated = decode_image(data)  # the in-process path: Pillow + EXIF transpose
        assert rotated.shape[:2] == ((128, 96) if row >= 4 else (96, 128))
        assert_same_features(outputs, row, serving_reference.extract(rotated))


def test_corrupt_items_flagged_and_others_extracted(
    exported_model, local_server, serving_reference, astronaut_small
):
    good = encode_png(astronaut_small)
    rotated = jpeg(astronaut_small[:, :80], 6)
    batch = [good, b"not an image", rotated[:-300], b"", rotated]
    outputs = serve(exported_model, local_server, batch)
    assert outputs["valid"].tolist() == [True, False, False, False, True]
    assert outputs["num_features"][[1, 2, 3]].tolist() == [0, 0, 0]
    assert not outputs["descriptors"][[1, 2, 3]].any()
    assert len(set(outputs["fingerprint"].tolist())) == 1
    assert_same_features(outputs, 0, serving_reference.extract(astronaut_small))
    assert_same_features(outputs, 4, serving_reference.extract(decode_image(rotated)))


def test_versions_never_overwritten(exported_model, tmp_path):
    assert existing_versions(exported_model.parent) == [1]
    for name in ("3", "10", "notes", ".1.tmp"):
        (tmp_path / "m" / name).mkdir(parents=True)
    assert next_version(tmp_path / "m") == 11
    assert next_version(tmp_path / "new") == 1
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_saved_model(None, exported_model.parents[1], "delf", version=1)


def test_failed_export_leaves_nothing(delf_model, serving_config, tmp_path, monkeypatch):
    import delf_tf.export

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(delf_tf.export, "ServingModule", broken)
    extraction = ExtractionModule(delf_model, serving_config)
    with pytest.raises(RuntimeError, match="disk full"):
        export_saved_model(extraction, tmp_path, "delf")
    assert list((tmp_path / "delf").iterdir()) == []


def test_delf_export_command_with_random_weights(
    exported_model, serving_config, model_config_file, tmp_path, capsys, monkeypatch
):
    """`delf export --weights=random --seed=0 --model_config=F` rebuilds the fixture's model.

    The export itself is the fixture's code path (export_saved_model); here it is
    replaced by a recorder so the command's plumbing is checked without a second export.
    """
    import delf_tf.export

    calls = []

    def record(module, export_base, model_name, version):
        calls.append((model_name, version, module.config, module.pca_projection))
        target = (
            Path(export_base)
            / model_name
            / str(version or next_version(Path(export_base) / model_name))
        )
        target.mkdir(parents=True)
        return target

    monkeypatch.setattr(delf_tf.export, "export_saved_model", record)
    config = tmp_path / "config.json"
    serving_config.save(config)
    (tmp_path / "models" / "delf" / "1").mkdir(parents=True)
    argv = ["delf", "export", "--weights=random", "--seed=0", f"--extraction_config={config}"]
    argv.append(f"--model_config={model_config_file}")
    assert main(argv + [f"--export_base={tmp_path / 'models'}"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calls == [("delf", None, serving_config, None)]
    assert printed["version"] == 2 and printed["export"].endswith(os.path.join("delf", "2"))
    expected = json.loads((exported_model / "assets" / "extraction_config.json").read_text())
    assert printed["fingerprint"] == expected["fingerprint"]
    (tmp_path / "x.keras").write_bytes(b"")  # exists: the flag combination is what fails
    argv = ["delf", "export", f"--model={tmp_path / 'x.keras'}", "--weights=random"]
    assert main([*argv, "--export_base=m"]) == 1
    assert "delf export: error: --weights applies only without --model" in capsys.readouterr().err


def test_load_model_from_checkpoint(delf_model, tmp_path):
    tf.train.Checkpoint(model=delf_model).write(str(tmp_path / "ckpt" / "weights"))
    # The architecture: the given ModelConfig, else model_config.json beside the checkpoint.
    restored = load_delf_model(tmp_path / "ckpt", delf_model.config)
    delf_model.config.save(tmp_path / "ckpt" / MODEL_CONFIG_FILE)
    from_file = load_delf_model(tmp_path / "ckpt")  # the directory: its only .index prefix
    assert restored.config == from_file.config == delf_model.config
    for original, loaded, other in zip(
        delf_model.weights, restored.weights, from_file.weights, strict=True
    ):
        np.testing.assert_array_equal(original.numpy(), loaded.numpy())
        np.testing.assert_array_equal(original.numpy(), other.numpy())
    other = tf.train.Checkpoint(model=tf.Module())
    other.model.v = tf.Variable(1.0)
    other.write(str(tmp_path / "bad" / "weights"))
    with pytest.raises(ValueError, match="under the key 'model'"):
        load_delf_model(tmp_path / "bad")
    with pytest.raises(InputError, match="nothing: no such"):
        load_delf_model(tmp_path / "nothing")


def test_delf_extract_takes_an_exported_model(exported_model, serving_reference, tmp_path):
    """`delf extract --model=<export>` runs the SavedModel and records its fingerprint."""
    import json

    from PIL import Image

    from delf_tf.cli import main
    from delf_tf.features import FeatureStore
    from delf_tf.images import load_image

    image_path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (80, 120, 3), np.uint8)).save(
        image_path
    )
    output = tmp_path / "features"
    model_dir = exported_model.parent  # the model dir: its highest version is used
    assert (
        main(
            [
                "delf",
                "extract",
                f"--images={image_path}",
                f"--output_dir={output}",
                f"--model={model_dir}",
            ]
        )
        == 0
    )
    store = FeatureStore.open(output)
    assert store.fingerprint == serving_reference.fingerprint
    assert json.loads((output / "manifest.json").read_text())["extractor"]["model"] == str(
        exported_model
    )
    served = store.load("photo.png")
    expected = serving_reference.extract(load_image(image_path))
    np.testing.assert_allclose(served.descriptors, expected.descriptors, atol=1e-5)
    np.testing.assert_allclose(served.keypoints, expected.keypoints, atol=1e-4)
    # The export fixes its graph settings; the command says so instead of ignoring them.
    argv = ["delf", "extract", f"--images={image_path}", f"--output_dir={tmp_path / 'x'}"]
    assert main([*argv, f"--model={model_dir}", "--max_image_size=64"]) == 1
