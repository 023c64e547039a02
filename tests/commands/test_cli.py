"""`delf extract` and `delf fit-pca` end to end, in process (same code as the console script)."""

import json
import os

import numpy as np
import pytest
from conftest import TINY_MODEL
from PIL import Image

from delf_tf.cli import main
from delf_tf.features import FeatureStore, LocalFeatures


@pytest.fixture()
def fast(model_config_file):
    """Flags of a quick extraction with the tests' tiny model (seeded random weights)."""
    return [
        f"--model_config={model_config_file}",
        "--score_threshold=0",
        "--max_image_size=64",
        "--max_features=50",
    ]


@pytest.fixture()
def image_folder(tmp_path, astronaut_small):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(astronaut_small).save(root / "a.jpg")
    Image.fromarray(astronaut_small[:, ::-1]).save(root / "sub" / "b.png")
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_extract_folder_resumes_and_reports_bad_files(image_folder, tmp_path, capsys, fast):
    out = tmp_path / "features"
    # Exit status 3 (EXIT_PARTIAL): finished, but an input failed.
    assert main(["delf", "extract", f"--images={image_folder}", f"--output_dir={out}", *fast]) == 3
    printed = capsys.readouterr()
    assert "broken.jpg" in printed.err and "untrained" in printed.err
    summary = json.loads(printed.out)  # stdout holds exactly the JSON summary
    assert summary["extracted"] == 2 and summary["failed"] == 1
    store = FeatureStore.open(out)
    assert list(store.stored_keys()) == ["a.jpg", "sub/b.png"]
    with np.load(out / "sub" / "b.png.npz", allow_pickle=False) as data:
        assert sorted(data.files) == ["descriptors", "keypoints", "scales", "scores"]
        assert data["descriptors"].shape == (50, TINY_MODEL.feature_depth)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["fingerprint"]) == 64
    first = store.load("a.jpg")

    # A second run skips what exists and gives the same features (seeded weights).
    (out / "a.jpg.npz").unlink()
    assert main(["delf", "extract", f"--images={image_folder}", f"--output_dir={out}", *fast]) == 3
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["extracted"] == 1 and summary["skipped_existing"] == 1
    np.testing.assert_array_equal(store.load("a.jpg").descriptors, first.descriptors)


def test_another_model_into_a_store_is_a_one_line_error(image_folder, tmp_path, capsys, fast):
    """Another model (seed) refuses to write into a store: `delf extract: error: ...`, exit 1."""
    out = tmp_path / "features"
    image = f"--images={image_folder / 'a.jpg'}"
    assert main(["delf", "extract", image, f"--output_dir={out}", *fast]) == 0
    capsys.readouterr()
    assert main(["delf", "extract", image, f"--output_dir={out}", "--seed=1", *fast]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("delf extract: error: ")]
    assert len(errors) == 1 and "holds features of extractor" in errors[0], err
    assert "Traceback" not in err


def test_extract_single_file_and_fit_pca(image_folder, tmp_path, capsys, fast):
    out = tmp_path / "one"
    assert (
        main(
            ["delf", "extract", f"--images={image_folder / 'a.jpg'}", f"--output_dir={out}", *fast]
        )
        == 0
    )
    assert isinstance(LocalFeatures.load(out / "a.jpg.npz"), LocalFeatures)
    capsys.readouterr()
    pca_path = tmp_path / "pca.npz"
    assert (
        main(
            [
                "delf",
                "fit-pca",
                f"--features={out}",
                "--dim=8",
                "--whiten",
                f"--output_file={pca_path}",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["dim"] == 8 and report["whiten"] is True
    # The reference's layout: a folder of .datum files, read back as the same PCA.
    datum_dir = tmp_path / "pca_datum"
    argv = ["delf", "fit-pca", f"--features={out}", "--dim=8", "--format=datum"]
    assert main([*argv, f"--output_dir={datum_dir}"]) == 0
    capsys.readouterr()
    from delf_tf.extraction.pca import PcaParams

    from_datum = PcaParams.from_datum_folder(datum_dir)
    np.testing.assert_array_equal(from_datum.projection, PcaParams.load(pca_path).projection)
    reduced = tmp_path / "reduced"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"pca_dim": 8, "scales": [1.0]}))
    args = [
        f"--images={image_folder / 'a.jpg'}",
        f"--output_dir={reduced}",
        f"--pca={pca_path}",
        f"--extraction_config={config}",
        *fast,
    ]
    assert main(["delf", "extract", *args]) == 0
    features = LocalFeatures.load(reduced / "a.jpg.npz")
    assert features.descriptors.shape[1] == 8
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, atol=1e-5)


def test_usage_and_flag_errors(capsys):
    assert main(["delf", "--help"]) == 0
    assert "extract" in capsys.readouterr().out
    assert main(["delf", "nonsense"]) == 2
    assert main(["delf", "extract", "--images=x"]) == 2  # --output_dir missing
    assert "output_dir" in capsys.readouterr().err


def test_model_config_builds_the_fresh_model_only(model_config_file, delf_model):
    from absl import flags

    from delf_tf.commands.common import define_extractor_flags, extractor_from_flags
    from delf_tf.config import ExtractionConfig
    from delf_tf.extraction.graph import extractor_fingerprint

    def extractor(*argv):
        flag_values = flags.FlagValues()
        define_extractor_flags(flag_values)
        flag_values(["delf", *argv])
        return extractor_from_flags(flag_values)

    built = extractor(f"--model_config={model_config_file}", "--score_threshold=0")
    assert built.describe()["model_config"] == TINY_MODEL.to_dict()
    # --seed=0 (the default) rebuilds the session's model: same weights, same fingerprint.
    assert built.fingerprint == extractor_fingerprint(delf_model, ExtractionConfig(), None)
    with pytest.raises(ValueError, match="model_config"):
        extractor(f"--model_config={model_config_file}", "--server=localhost:8500")


@pytest.fixture()
def awkward_folder(tmp_path, astronaut_small):
    """Images with legal but awkward names, and entries that look like images but are not."""
    root = tmp_path / "awkward"
    (root / "sub").mkdir(parents=True)
    (root / "locked").mkdir()
    good = {
        "a.jpg": astronaut_small,
        ".dot.jpg": astronaut_small[::-1],
        "sub/" + "l" * 251 + ".png": astronaut_small[:, ::-1],  # a 255-byte name
        "new\nline.png": astronaut_small[::2, ::2],
    }
    for name, pixels in good.items():
        Image.fromarray(pixels).save(root / name)
    Image.fromarray(astronaut_small).save(root / "locked" / "hidden.png")
    bad = {
        "loop.jpg": "symbolic link loop",
        "dangling.jpg": "dangling symbolic link",
        "folder.jpg": "a folder",
        "pipe.jpg": "named pipe",
        "broken.jpg": "corrupt image data",
        "locked": "cannot read folder",
    }
    os.symlink("loop.jpg", root / "loop.jpg")
    os.symlink("missing.jpg", root / "dangling.jpg")
    (root / "folder.jpg").mkdir()
    os.mkfifo(root / "pipe.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root, sorted(good), bad


def test_extract_reports_every_skipped_path_and_exits_partial(
    awkward_folder, tmp_path, capsys, fast, monkeypatch
):
    """Defects 2 and 3: a 255-byte name stopped the run; loops, dangling links, folders and
    pipes named like images and unreadable folders were skipped without a word, dot-named
    images were extracted but not indexed, and the exit status was 0."""
    root, good, bad = awkward_folder
    scandir = os.scandir

    def unreadable(path="."):  # root may read any folder: refuse "locked" as chmod 0 would
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", unreadable)
    out = tmp_path / "features"
    assert main(["delf", "extract", f"--images={root}", f"--output_dir={out}", *fast]) == 3
    monkeypatch.undo()
    printed = capsys.readouterr()
    summary = json.loads(printed.out)
    assert summary["extracted"] == len(good) and summary["failed"] == len(bad)
    assert sorted(FeatureStore.open(out).stored_keys()) == good
    # One line on stderr per skipped path, the path as repr() (no forged lines).
    lines = [line for line in printed.err.splitlines() if line.startswith("skipped: ")]
    assert len(lines) == len(bad), printed.err
    for name, reason in bad.items():
        [line] = [line for line in lines if repr(str(root / name)) in line]
        assert reason in line, line
    # The machine-readable list.
    failures_file = out / "failures.jsonl"
    assert summary["failures_file"] == str(failures_file)
    records = [json.loads(line) for line in failures_file.read_text().splitlines()]
    assert sorted(record["path"] for record in records) == sorted(str(root / n) for n in bad)
    assert all(record["reason"] and record["stage"] for record in records)
    # Every extracted image is indexed, the dot-named one included.
    index = tmp_path / "index"
    assert main(["delf", "index", f"--features={out}", f"--output_dir={index}"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == len(good)
    # A rerun resumes: nothing extracted twice; "locked" is readable now, the rest fail again.
    assert main(["delf", "extract", f"--images={root}", f"--output_dir={out}", *fast]) == 3
    summary = json.loads(capsys.readouterr().out)
    assert (summary["skipped_existing"], summary["extracted"]) == (len(good), 1)
    assert summary["failed"] == len(bad) - 1
    assert len(failures_file.read_text().splitlines()) == len(bad) - 1
