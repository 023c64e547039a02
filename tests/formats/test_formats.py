"""Reference file formats (delf_tf.formats): .datum, .delf, .delg_global, DelfConfig text.

The writers are checked three ways: against golden bytes built by hand from the
wire layout, against the protobuf messages (a writer that follows the
reference's steps), and against files written by the reference itself (a subset in
tests/data/official-formats, all of them when the workspace's data folder is there;
see the `official_formats` fixture in conftest.py).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from delf_tf.config import ExtractionConfig
from delf_tf.errors import ConfigError, InputError
from delf_tf.features import LocalFeatures
from delf_tf.features.delf_io import local_features_from_delf, local_features_to_delf
from delf_tf.formats import (
    DatumError,
    DelfFileError,
    datum_from_bytes,
    datum_to_bytes,
    delf_from_bytes,
    delf_to_bytes,
    parse_delf_config,
    protos,
    read_datum,
    read_delf,
    read_global_descriptor,
    resolve_paths,
    settings_overrides,
    write_datum,
    write_delf,
    write_global_descriptor,
)
from delf_tf.formats.delf_file import _canonical_records


def _f(*values: float) -> str:
    return struct.pack(f"<{len(values)}f", *values).hex()


# --- golden bytes, written from the wire layout by hand -------------------------------------


def test_float_datum_golden_bytes():
    array = np.arange(6, dtype=np.float64).reshape(2, 3)
    # shape {dim: [2, 3] packed}, float_list {value: 6 floats packed (24 bytes)}
    expected = bytes.fromhex("0a04 0a02 0203" + "121a 0a18" + _f(0, 1, 2, 3, 4, 5))
    assert datum_to_bytes(array) == expected
    back = datum_from_bytes(expected)
    assert back.dtype == np.float32 and back.shape == (2, 3)
    np.testing.assert_array_equal(back, array)


def test_uint32_datum_golden_bytes():
    # uint32_list is field 3; its values are packed varints: 1, 300 (ac 02), 0.
    expected = bytes.fromhex("0a03 0a0103" + "1a06 0a04 01ac0200")
    assert datum_to_bytes(np.array([1, 300, 0], np.uint16)) == expected
    back = datum_from_bytes(expected)
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, [1, 300, 0])


def test_delf_golden_bytes_two_features_of_three_dims():
    record = "0a30 0a15 0a03 0a0103 120e 0a0c {d} 15{x} 1d{y} 25{s} 2d{o} 35{a}"
    expected = bytes.fromhex(
        record.format(d=_f(1, 0.5, -2), x=_f(4), y=_f(3), s=_f(0.5), o=_f(0), a=_f(100))
        + record.format(d=_f(0, 0.25, 1), x=_f(2.5), y=_f(10), s=_f(2), o=_f(0), a=_f(150))
    )
    assert len(expected) == 100
    locations_yx = np.array([[3, 4], [10, 2.5]])
    scales, attention = np.array([0.5, 2.0]), np.array([100.0, 150.0])
    descriptors = np.array([[1, 0.5, -2], [0, 0.25, 1]])
    assert delf_to_bytes(locations_yx, scales, descriptors, attention) == expected
    arrays = delf_from_bytes(expected)
    np.testing.assert_array_equal(arrays.locations_yx, locations_yx)
    np.testing.assert_array_equal(arrays.descriptors, descriptors)
    np.testing.assert_array_equal(arrays.scales, scales)
    np.testing.assert_array_equal(arrays.attention, attention)
    np.testing.assert_array_equal(arrays.orientations, [0, 0])
    assert arrays.descriptors.dtype == np.float32


# --- against the protobuf messages ----------------------------------------------------------


def _reference_steps_datum(array: np.ndarray):
    datum = protos.DatumProto()
    if array.dtype.kind == "f":
        datum.float_list.value.extend(array.astype(np.float32).ravel().tolist())
    else:
        datum.uint32_list.value.extend(array.ravel().tolist())
    datum.shape.dim.extend(array.shape)
    return datum


def _reference_steps_delf(locations_yx, scales, descriptors, attention) -> bytes:
    """The reference writer's steps with the messages: every field set, orientation 0."""
    message = protos.DelfFeatures()
    for i in range(len(descriptors)):
        feature = message.feature.add()
        feature.y, feature.x = float(locations_yx[i, 0]), float(locations_yx[i, 1])
        feature.scale, feature.orientation = float(scales[i]), 0.0
        feature.strength = float(attention[i])
        feature.descriptor.CopyFrom(_reference_steps_datum(descriptors[i]))
    return message.SerializeToString()


def _random_features(n: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        (rng.random((n, 2)) * 1000).astype(np.float32),
        rng.choice([0.5, 1.0, 2.0, 4.0], n).astype(np.float32),
        rng.standard_normal((n, dim)).astype(np.float32),
        (rng.random(n) * 300).astype(np.float32),
    )


@pytest.mark.parametrize(
    "shape", [(), (0,), (1,), (5,), (32,), (33,), (2, 3), (0, 4), (40, 1024), (3, 2, 2)]
)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.uint8, np.uint64])
def test_datum_round_trip_and_protobuf_bytes(tmp_path, shape, dtype):
    array = np.asarray((np.random.default_rng(0).random(shape) * 200).astype(dtype))
    data = datum_to_bytes(array)
    assert data == _reference_steps_datum(array).SerializeToString()
    path = tmp_path / "a.datum"
    write_datum(path, array)
    assert path.read_bytes() == data
    back = read_datum(path)
    assert back.shape == shape
    assert back.dtype == (np.float32 if array.dtype.kind == "f" else np.uint32)
    np.testing.assert_array_equal(back, array.astype(back.dtype))
    assert [p.name for p in tmp_path.iterdir()] == ["a.datum"]  # no temporary left


@pytest.mark.parametrize("n, dim", [(0, 40), (1, 0), (1, 1), (2, 3), (7, 31), (3, 32), (5, 128)])
def test_delf_bytes_equal_the_protobuf_messages(n, dim):
    arrays = _random_features(n, dim, seed=n + dim)
    data = delf_to_bytes(*arrays)
    assert data == _reference_steps_delf(*arrays)
    parsed = protos.DelfFeatures.FromString(data)
    assert len(parsed.feature) == n
    if n:
        assert parsed.feature[0].x == arrays[0][0, 1] and parsed.feature[0].y == arrays[0][0, 0]


def test_delf_round_trip_1000_by_40(tmp_path):
    arrays = _random_features(1000, 40)
    path = tmp_path / "image.delf"
    write_delf(path, *arrays, orientations=np.full(1000, 0.25))
    read = read_delf(path)
    assert len(read) == 1000
    for got, want in zip(
        (read.locations_yx, read.scales, read.descriptors, read.attention), arrays, strict=True
    ):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(read.orientations, np.full(1000, 0.25, np.float32))


def test_empty_delf_file(tmp_path):
    path = tmp_path / "empty.delf"
    write_delf(path, np.zeros((0, 2)), np.zeros(0), np.zeros((0, 40)), np.zeros(0))
    assert path.read_bytes() == b""
    read = read_delf(path)
    assert len(read) == 0 and read.locations_yx.shape == (0, 2)
    assert read.descriptors.shape == (0, 0)
    assert len(local_features_from_delf(path)) == 0


def test_other_valid_encodings_are_read_through_the_messages():
    # Fields out of the writer's order and orientation left unset: not the fixed layout.
    message = protos.DelfFeatures()
    for i in range(3):
        feature = message.feature.add(x=float(i), y=2.0 * i, scale=1.0, strength=50.0 + i)
        feature.descriptor.shape.dim.append(2)
        feature.descriptor.float_list.value.extend([i, -i])
    read = delf_from_bytes(message.SerializeToString())
    np.testing.assert_array_equal(read.locations_yx, [[0, 0], [2, 1], [4, 2]])
    np.testing.assert_array_equal(read.descriptors, [[0, 0], [1, -1], [2, -2]])
    np.testing.assert_array_equal(read.attention, [50, 51, 52])
    np.testing.assert_array_equal(read.orientations, [0, 0, 0])


def test_malformed_files_name_the_file(tmp_path):
    arrays = _random_features(3, 8)
    path = tmp_path / "broken.delf"
    path.write_bytes(delf_to_bytes(*arrays)[:-7])
    with pytest.raises(DelfFileError, match="broken.delf") as info:
        read_delf(path)
    assert "\n" not in str(info.value)
    mixed = delf_to_bytes(*_random_features(1, 4)) + delf_to_bytes(*_random_features(1, 5))
    with pytest.raises(DelfFileError, match="1-D of one size"):
        delf_from_bytes(mixed, "mixed.delf")
    with pytest.raises(DatumError, match="missing.datum"):
        read_datum(tmp_path / "missing.datum")
    with pytest.raises(DatumError, match="does not hold"):
        datum_from_bytes(bytes.fromhex("0a03 0a0105 1206 0a04" + _f(1.0)), "short.datum")
    with pytest.raises(InputError, match="int32"):
        write_datum(tmp_path / "x.datum", np.arange(3, dtype=np.int32))
    with pytest.raises(InputError, match="2\\*\\*32"):
        datum_to_bytes(np.array([2**40], np.uint64))
    assert not (tmp_path / "x.datum").exists()


def test_local_features_and_global_descriptor(tmp_path):
    rng = np.random.default_rng(3)
    features = LocalFeatures(
        keypoints=rng.random((6, 2)) * 100,  # (x, y)
        scales=np.full(6, 2.0),
        scores=rng.random(6) * 200,
        descriptors=rng.standard_normal((6, 16)),
    )
    path = tmp_path / "img.delg_local"
    local_features_to_delf(features, path)
    arrays = read_delf(path)
    np.testing.assert_array_equal(arrays.locations_yx[:, 0], features.keypoints[:, 1])  # y
    np.testing.assert_array_equal(arrays.attention, features.scores)
    back = local_features_from_delf(path)
    for name in ("keypoints", "scales", "scores", "descriptors"):
        np.testing.assert_array_equal(getattr(back, name), getattr(features, name))
    global_path = tmp_path / "img.delg_global"
    descriptor = rng.standard_normal(2048)
    write_global_descriptor(global_path, descriptor)
    assert global_path.read_bytes()[:8] == bytes.fromhex("0a04 0a02 8010 1283")  # [2048]
    np.testing.assert_array_equal(read_global_descriptor(global_path), descriptor.astype("f4"))
    write_datum(tmp_path / "two_d.delg_global", np.zeros((2, 2), np.float32))
    with pytest.raises(DelfFileError, match="1-D"):
        read_global_descriptor(tmp_path / "two_d.delg_global")


def test_large_files_are_fast(tmp_path):
    import time

    arrays = _random_features(1000, 1024)
    path = tmp_path / "big.delf"
    start = time.perf_counter()
    write_delf(path, *arrays)
    middle = time.perf_counter()
    read = read_delf(path)
    end = time.perf_counter()
    np.testing.assert_array_equal(read.descriptors, arrays[2])
    assert middle - start < 0.5 and end - middle < 0.5, (middle - start, end - middle)


# --- the reference's own files ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["delf_pca40", "delf_1024", "delg_local128"])
def test_official_delf_files(official_formats, tmp_path, name):
    folder = official_formats(f"{name}.npz", f"{name}.delf")
    expected = np.load(folder / f"{name}.npz", allow_pickle=False)
    read = read_delf(folder / f"{name}.delf")
    assert _canonical_records((folder / f"{name}.delf").read_bytes()) is not None  # numpy path
    fields = ("locations_yx", "scales", "descriptors", "attention")
    for field in fields:
        assert getattr(read, field).dtype == expected[field].dtype == np.float32
        np.testing.assert_array_equal(getattr(read, field), expected[field])
    assert not read.orientations.any()
    write_delf(tmp_path / "out.delf", *(expected[field] for field in fields))
    assert (tmp_path / "out.delf").read_bytes() == (folder / f"{name}.delf").read_bytes()


def test_official_global_descriptor(official_formats, tmp_path):
    folder = official_formats("delg_global2048.npz", "delg_global2048.delg_global")
    expected = np.load(folder / "delg_global2048.npz", allow_pickle=False)["global_descriptor"]
    np.testing.assert_array_equal(
        read_global_descriptor(folder / "delg_global2048.delg_global"), expected
    )
    write_global_descriptor(tmp_path / "g.delg_global", expected)
    assert (tmp_path / "g.delg_global").read_bytes() == (
        folder / "delg_global2048.delg_global"
    ).read_bytes()


@pytest.mark.parametrize(
    "datum, key", [("mean", "mean"), ("pca_proj_mat", "projection"), ("pca_vars", "variances")]
)
def test_official_pca_datum_files(official_formats, tmp_path, datum, key):
    folder = official_formats("pca/pca_arrays.npz", f"pca/{datum}.datum") / "pca"
    expected = np.load(folder / "pca_arrays.npz", allow_pickle=False)[key]
    original = folder / f"{datum}.datum"
    np.testing.assert_array_equal(read_datum(original), expected)
    write_datum(tmp_path / "out.datum", expected)
    assert (tmp_path / "out.datum").read_bytes() == original.read_bytes()


# --- DelfConfig text --------------------------------------------------------------------------

DELG_CONFIG = """\
use_local_features: true
use_global_features: true
model_path: "parameters/r50delg_gld_20200814"
image_scales: 0.25
image_scales: 0.35355338
image_scales: 0.5
image_scales: 0.70710677
image_scales: 1.0
image_scales: 1.4142135
image_scales: 2.0
max_image_size: 1024
delf_local_config {
  use_pca: false
  max_feature_num: 1000
  score_threshold: 175.0
}
delf_global_config {
  use_pca: false
  image_scales_ind: 3
  image_scales_ind: 4
  image_scales_ind: 5
}
"""

DELF_CONFIG = """\
model_path: "parameters/delf_gld_20190411/model/"
image_scales: .25
image_scales: .3536
image_scales: .5
image_scales: .7071
image_scales: 1.0
image_scales: 1.4142
image_scales: 2.0
delf_local_config {
  use_pca: true
  # Note that for the exported model provided as an example, layer_name and
  # iou_threshold are hard-coded in the checkpoint.
  layer_name: "resnet_v1_50/block3"
  iou_threshold: 1.0
  max_feature_num: 1000
  score_threshold: 100.0
  pca_parameters {
    mean_path: "parameters/delf_gld_20190411/pca/mean.datum"
    projection_matrix_path: "parameters/delf_gld_20190411/pca/pca_proj_mat.datum"
    pca_dim: 40
    use_whitening: false
  }
}
"""


def test_delg_config():
    settings = parse_delf_config(DELG_CONFIG)
    assert settings.model_path == "parameters/r50delg_gld_20200814"
    assert settings.image_scales == tuple(
        float(np.float32(s)) for s in (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)
    )
    assert settings.max_image_size == 1024 and settings.min_image_size == -1
    assert settings.use_local_features and settings.use_global_features
    assert not settings.is_tf2_exported and not settings.use_square_images
    local = settings.local_config
    assert (local.use_pca, local.max_feature_num, local.score_threshold) == (False, 1000, 175.0)
    assert local.iou_threshold == 1.0 and local.pca is None
    assert not local.use_resized_coordinates
    assert settings.global_config.image_scales_ind == (3, 4, 5)
    assert settings.global_config.use_pca is False
    overrides = settings_overrides(settings)
    assert "pca_dim" not in overrides
    config = ExtractionConfig(**overrides)
    assert config.scales == settings.image_scales and config.max_image_size == 1024
    assert config.score_threshold == 175.0 and config.max_features == 1000


def test_delf_config_with_pca(tmp_path):
    path = tmp_path / "delf_config_example.pbtxt"
    path.write_text(DELF_CONFIG)
    settings = parse_delf_config(path)
    assert settings.source == str(path) and settings == parse_delf_config(str(path))
    assert settings.image_scales[1] == float(np.float32(0.3536)) != 0.3536
    assert settings.max_image_size == -1 and not settings.use_global_features
    pca = settings.local_config.pca
    assert pca.pca_dim == 40 and not pca.use_whitening and pca.pca_variances_path == ""
    assert pca.mean_path == "parameters/delf_gld_20190411/pca/mean.datum"
    assert settings.local_config.layer_name == "resnet_v1_50/block3"
    assert settings.global_config.use_pca and settings.global_config.image_scales_ind == ()
    resolved = resolve_paths(settings, "/releases")
    assert resolved.model_path == "/releases/parameters/delf_gld_20190411/model"
    assert resolved.local_config.pca.projection_matrix_path == (
        "/releases/parameters/delf_gld_20190411/pca/pca_proj_mat.datum"
    )
    assert resolved.local_config.pca.pca_variances_path == ""  # empty stays empty
    overrides = settings_overrides(settings)
    assert overrides["pca_dim"] == 40 and overrides["max_image_size"] == -1
    assert ExtractionConfig(**overrides).pca_dim == 40


def test_empty_config_has_the_reference_defaults():
    settings = parse_delf_config("")
    assert settings.image_scales == () and settings.max_image_size == -1
    assert settings.use_local_features and not settings.use_global_features
    local = settings.local_config
    assert (local.use_pca, local.iou_threshold, local.max_feature_num) == (True, 1.0, 1000)
    assert local.score_threshold == 100.0 and local.layer_name == ""
    assert "scales" not in settings_overrides(settings)


@pytest.mark.parametrize(
    "text, where",
    [
        ("model_path: 'x'\nimage_scales: 0.5\nmax_image_size: big\n", ":3:"),
        ("delf_local_config {\n  no_such_field: 1\n}\n", ":2:"),
        ("delf_local_config {\n  use_pca: true\n", ":2:"),  # end of input: last line
    ],
)
def test_malformed_config_is_one_line_naming_file_and_line(tmp_path, text, where):
    path = tmp_path / "bad.pbtxt"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_delf_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}{where}") and "\n" not in message, message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.pbtxt"):
        parse_delf_config(str(tmp_path / "nope.pbtxt"))
