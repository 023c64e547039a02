"""`delf convert`: a release's variables onto its Keras architecture, mapped by structure.

The stand-ins are the two release architectures at their tiny size (tf-slim names for
DELF, the reference TF2 Keras names for DELG), as a TF1 graph and as a re-saved TF2
export (function calls), and with names renamed or permuted: the mapping must not
depend on them. Acceptance is parity through the one extraction graph at the
release presets.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import skimage.data
import skimage.transform

from delf_tf.releases.convert import feature_parity
from delf_tf.testing.synthetic_releases import RECEPTIVE_FIELD_SIZES, build_many_in_subprocess


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_releases")
    folders = {
        "delf": root / "delf_gld_20190411",
        "delg": root / "r50delg_gld_20200814",
        "delf_renamed": root / "renamed" / "delf_gld_20190411",
        "delg_permuted": root / "permuted" / "r50delg_gld_20200814",
    }
    build_many_in_subprocess(
        [
            (folders["delf"], "delf", "tiny", 0, False),
            (folders["delg"], "delg", "tiny", 1, True, "function"),
            (folders["delf_renamed"], "delf", "tiny", 0, False, "v1", "renamed"),
            (folders["delg_permuted"], "delg", "tiny", 1, True, "v1", "permuted"),
        ]
    )
    return folders


@pytest.fixture(scope="session")
def photo():
    image = skimage.transform.resize(skimage.data.astronaut(), (240, 320), anti_aliasing=True)
    return (image * 255).round().astype(np.uint8)


@pytest.fixture(scope="session")
def converted(stand_ins, tmp_path_factory):
    """{kind: (model.keras path, conversion summary)}, through `delf convert`."""
    from delf_tf.cli import main

    out = tmp_path_factory.mktemp("converted")
    results = {}
    for kind in ("delf", "delg"):
        path = out / f"{kind}.keras"
        argv = ["delf", "convert", f"--model={stand_ins[kind]}", f"--output_file={path}"]
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(argv) == 0
        results[kind] = (path, json.loads(buffer.getvalue()))
    return results


@pytest.mark.parametrize("size", ["tiny", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_architectures_mirror_the_releases(size):
    """Full size: the reference's variable counts (222 for delf_gld_20190411, 332 for
    R50-DELG with the autoencoder) and block3's receptive field 291 / stride 32; tiny:
    the field the stand-ins' boxes use."""
    from delf_tf.config import ModelConfig
    from delf_tf.model.receptive_field import compute_receptive_field
    from delf_tf.model.reference_nets import build_reference_model

    for architecture, count in (("resnet_v1_50", 222), ("delg_resnet50", 332)):
        model = build_reference_model(ModelConfig(architecture=architecture, backbone=size))
        field = compute_receptive_field(model.block3_model())
        assert (field.size, field.stride) == (RECEPTIVE_FIELD_SIZES[size], 32)
        if size == "resnet50":
            assert len(model.weights) == count


@pytest.mark.parametrize("kind", ["delf", "delg"])
def test_converted_release_reproduces_its_graph_at_the_release_preset(
    stand_ins, converted, photo, kind
):
    from delf_tf.extraction.extractor import build_extractor

    path, summary = converted[kind]
    assert summary["architecture"] == {"delf": "resnet_v1_50", "delg": "delg_resnet50"}[kind]
    assert summary["size"] == "tiny" and summary["name_cross_check"]["disagree"] == 0
    name = stand_ins[kind].name
    release = build_extractor(model=stand_ins[kind])
    pca = stand_ins[kind] / "pca" if kind == "delf" else None
    keras_model = build_extractor(model=path, preset=name, pca=pca)
    assert keras_model.config == release.config  # the release preset
    ours, theirs = keras_model.extract(photo), release.extract(photo)
    assert len(ours) > 0
    parity = feature_parity(ours, theirs)
    assert parity["keypoints"] >= 0.99 and parity["descriptor_cosine"] >= 0.9999
    if kind == "delg":
        assert parity["global_cosine"] >= 0.9999 and ours.descriptors.shape[1] == 128
    else:
        assert parity["global_cosine"] is None and ours.descriptors.shape[1] == 40  # the PCA
    assert keras_model.describe()["model_config"]["architecture"] == summary["architecture"]

    # --precision=bfloat16: the converted network computes in bfloat16 (float32
    # variables) and stays close to float32 (measured here: keypoints 0.976 / 0.998,
    # descriptor cosine >= 0.99990, global 0.999994; full size in bench/README.md).
    bf16 = build_extractor(model=path, preset=name, pca=pca, overrides={"precision": "bfloat16"})
    assert bf16.config == keras_model.config.replace(precision="bfloat16")
    network = bf16.module.network.network
    convs = [layer for layer in network.layers if type(layer).__name__ == "Conv2D"]
    assert {layer.compute_dtype for layer in convs} == {"bfloat16"}
    assert {w.dtype for layer in convs for w in layer.weights} == {"float32"}
    reduced = bf16.extract(photo)
    close = feature_parity(reduced, ours)
    assert close["keypoints"] >= 0.95 and close["descriptor_cosine"] >= 0.9995, close
    if kind == "delg":
        assert close["global_cosine"] >= 0.9999, close
    # Not float32 under another name: the descriptors differ beyond float32 rounding.
    assert close["descriptor_cosine"] < 1.0 - 1e-6, close


@pytest.mark.parametrize(
    ("kind", "variant", "check"),
    [("delf", "delf_renamed", "unknown"), ("delg", "delg_permuted", "disagree")],
)
def test_names_only_cross_check_the_structural_mapping(stand_ins, kind, variant, check):
    """Opaque names (renamed) and misleading names (gamma <-> beta, kernel <-> bias,
    digits shifted) give the very weights of the release-named stand-in."""
    from delf_tf.releases.convert import convert_release

    reference = convert_release(stand_ins[kind])
    renamed = convert_release(stand_ins[variant])
    assert renamed.summary()["name_cross_check"][check] > 0
    for ours, theirs in zip(renamed.model.weights, reference.model.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_a_release_of_another_structure_is_refused_in_one_line(stand_ins, tmp_path, capsys):
    from delf_tf.cli import main
    from delf_tf.releases.convert import ConversionError, Unit, match_units

    argv = ["delf", "convert", f"--model={stand_ins['delf']}", "--size=resnet50"]
    assert main([*argv, f"--output_file={tmp_path / 'm.keras'}"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("delf convert: error:") and "differ at depth 1" in error
    assert not (tmp_path / "m.keras").exists()
    # Missing, unused, wrongly shaped and ambiguous units, on hand-made unit lists.
    conv = Unit("conv", 1, {"kernel": ("a/weights", (1, 1, 8, 8))})
    bn = Unit("bn", 2, {role: (f"b/{role}", (8,)) for role in ("gamma", "beta")})
    with pytest.raises(ConversionError, match="expects nothing"):
        match_units([conv, bn], [(conv, None)])  # a release variable the model lacks
    with pytest.raises(ConversionError, match="release has nothing"):
        match_units([conv], [(conv, None), (bn, None)])  # a model weight with no variable
    wide = Unit("conv", 1, {"kernel": ("a/weights", (1, 1, 8, 16))})
    with pytest.raises(ConversionError, match=r"kernel \[1, 1, 8, 16\]"):
        match_units([wide], [(conv, None)])
    with pytest.raises(ConversionError, match="ambiguous"):
        match_units([conv, conv], [(conv, None), (conv, None)])
    # Alike units at one depth that different units feed (the full-size DELG's l5a bn2b
    # and the attention's batch norm, both 512 wide) are told apart by what feeds them.
    fed = [dataclasses.replace(bn, parents=(("conv", name),)) for name in ("after a", "after b")]
    pairs = match_units(fed[::-1], [(unit, unit.parents) for unit in fed])
    assert all(ours.parents == layer for ours, _, layer in pairs)


def test_a_converted_release_fine_tunes_on_new_classes_exports_and_extracts(
    converted, photo, tmp_path, capsys
):
    """convert -> delf train --init_from (new class heads) -> delf export -> extract."""
    import keras

    from delf_tf.cli import main
    from delf_tf.extraction import build_extractor
    from delf_tf.model.reference_nets import ReferenceModel
    from delf_tf.testing.synthetic_training import write_pattern_dataset

    release_keras, _ = converted["delg"]
    data = tmp_path / "landmarks"
    write_pattern_dataset(data, num_classes=2, images_per_class=2, size=64, pattern_size=32)
    model_dir = tmp_path / "run"
    argv = [
        "delf",
        "train",
        f"--train_data={data}",
        f"--model_dir={model_dir}",
        f"--init_from={release_keras}",
        "--stage=joint",
        "--batch_size=4",
        "--image_size=64",
        "--max_steps=2",
        "--log_every=1",
        "--image_summary_every=0",
        "--eval_every=0",
        "--crop_area_range=1.0,1.0",
        "--shuffle_buffer=4",
    ]
    capsys.readouterr()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["num_classes"], summary["start_step"], summary["final_step"]) == (2, 0, 2)
    assert {"loss/global", "loss/attention", "loss/reconstruction"} <= set(summary["history"][-1])
    release = keras.saving.load_model(release_keras)
    trained = keras.saving.load_model(summary["model_path"])
    assert isinstance(trained, ReferenceModel)
    assert trained.config.architecture == release.config.architecture == "delg_resnet50"
    moved = [
        not np.array_equal(np.array(a), np.array(b))
        for a, b in zip(release.weights, trained.weights, strict=True)
    ]
    assert any(moved) and not all(moved)  # trained from the release (BN's epsilon etc. stay)
    argv = ["delf", "export", f"--model={summary['model_path']}", f"--export_base={tmp_path}"]
    assert main(argv) == 0
    exported = json.loads(capsys.readouterr().out)
    assert (exported["descriptor_dim"], exported["global_dim"]) == (128, 2048)
    features = build_extractor(model=exported["export"]).extract(photo)
    assert len(features.descriptors) > 0 and features.descriptors.shape[1] == 128
    np.testing.assert_allclose(np.linalg.norm(features.global_descriptor), 1.0, atol=1e-5)
