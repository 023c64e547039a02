"""PcaParams in the reference layout (.datum folder) and without variances."""

from __future__ import annotations

import numpy as np
import pytest

from delf_tf.errors import ConfigError, InputError
from delf_tf.extraction.pca import PcaParams, fit_pca
from delf_tf.formats import read_datum, write_datum


def _pca(whiten: bool = False) -> PcaParams:
    return fit_pca(np.random.default_rng(0).normal(size=(200, 24)), dim=6, whiten=whiten)


def test_datum_folder_round_trip(tmp_path):
    pca = _pca(whiten=True)
    pca.save_datum_folder(tmp_path / "pca")
    names = sorted(p.name for p in (tmp_path / "pca").iterdir())
    assert names == ["mean.datum", "pca_proj_mat.datum", "pca_vars.datum"]
    assert read_datum(tmp_path / "pca" / "pca_proj_mat.datum").shape == (6, 24)
    loaded = PcaParams.from_datum_folder(tmp_path / "pca", whiten=True)
    for name in ("mean", "projection", "variances"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(pca, name))
    assert loaded.whiten is True


def test_release_without_variances(tmp_path):
    pca = _pca()
    write_datum(tmp_path / "mean.datum", pca.mean)
    write_datum(tmp_path / "pca_proj_mat.datum", pca.projection)
    loaded = PcaParams.from_datum_folder(tmp_path)
    assert loaded.variances is None and loaded.output_dim == 6 and loaded.input_dim == 24
    with pytest.raises(ConfigError, match="whitening needs the variances"):
        PcaParams.from_datum_folder(tmp_path, whiten=True)
    # The project's .npz keeps working without variances.
    loaded.save(tmp_path / "pca.npz")
    again = PcaParams.load(tmp_path / "pca.npz")
    assert again.variances is None
    np.testing.assert_array_equal(again.projection, pca.projection)
    loaded.save_datum_folder(tmp_path / "out")
    assert not (tmp_path / "out" / "pca_vars.datum").exists()


def test_config_paths_and_variances_of_input_size(tmp_path):
    pca = _pca()
    write_datum(tmp_path / "m.datum", pca.mean)
    write_datum(tmp_path / "p.datum", pca.projection)
    variances = np.arange(1, 25, dtype=np.float32)  # [D]: the first K belong to the K rows
    write_datum(tmp_path / "v.datum", variances)
    loaded = PcaParams.from_datum_folder(
        (tmp_path / "m.datum", tmp_path / "p.datum"),
        whiten=True,
        variances_path=tmp_path / "v.datum",
    )
    np.testing.assert_array_equal(loaded.variances, variances[:6])
    write_datum(tmp_path / "bad_mean.datum", pca.mean[:5])
    with pytest.raises(ConfigError, match="inconsistent PCA shapes"):
        PcaParams.from_datum_folder((tmp_path / "bad_mean.datum", tmp_path / "p.datum"))
    with pytest.raises(InputError, match="nothing.datum"):
        PcaParams.from_datum_folder((tmp_path / "nothing.datum", tmp_path / "p.datum"))


def test_official_pca_folder(official_formats):
    names = ("mean.datum", "pca_proj_mat.datum", "pca_vars.datum", "pca_arrays.npz")
    folder = official_formats(*(f"pca/{name}" for name in names)) / "pca"
    expected = np.load(folder / "pca_arrays.npz", allow_pickle=False)
    pca = PcaParams.from_datum_folder(folder, whiten=True)
    np.testing.assert_array_equal(pca.mean, expected["mean"])
    np.testing.assert_array_equal(pca.projection, expected["projection"])
    np.testing.assert_array_equal(pca.variances, expected["variances"])
    assert (pca.input_dim, pca.output_dim) == (1024, 1024)
