"""`extract_to_store` with a stand-in extractor (no TensorFlow): every per-image step
(read, decode, extract, write) fails for that image alone, and is reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from delf_tf.extraction.folder import BROKEN_EXTRACTOR_AFTER, extract_to_store
from delf_tf.features import FeatureStore, LocalFeatures


class StandIn:
    """An Extractor that fails on images of width `fail_width` (a bug, not a bad image)."""

    fingerprint = "e" * 64

    def __init__(self, fail_width: int | None = None):
        self.fail_width = fail_width

    def describe(self) -> dict:
        return {"model": "stand-in", "descriptor_dim": 4}

    def extract(self, image: np.ndarray) -> LocalFeatures:
        if image.shape[1] == self.fail_width:
            raise RuntimeError("the network fell over")
        n = 3
        descriptors = np.eye(n, 4, dtype=np.float32)
        return LocalFeatures(np.zeros((n, 2)), np.ones(n), np.ones(n), descriptors)


def write(path, width=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, 8), (200, 10, 10)).save(path)


def test_every_step_fails_for_its_image_alone(tmp_path):
    images, out = tmp_path / "images", tmp_path / "features"
    write(images / "a.png")
    write(images / "b.png", width=17)  # the extractor fails on it
    write(images / "c.png")
    write(images / "d" / "e.png")  # its store folder "d" is blocked by a file below
    (images / "f.png").write_bytes(b"")  # empty: decode fails
    (images / "g.png").symlink_to(images / "a.png")  # a link to a good image: extracted
    out.mkdir()
    (out / "d").write_text("a file where the folder d/ should go")
    failures = []
    store, summary = extract_to_store(
        StandIn(fail_width=17), images, out, progress=False, on_failure=failures.append
    )
    assert sorted(store.stored_keys()) == ["a.png", "c.png", "g.png"]
    assert (summary.images, summary.extracted) == (6, 3)
    stages = {f.path.rsplit("/", 1)[-1]: (f.stage, f.reason) for f in summary.failed}
    assert stages["b.png"] == ("extract", "RuntimeError: the network fell over")
    assert stages["e.png"][0] == "write"
    assert stages["f.png"] == ("decode", "empty file")
    assert failures == summary.failed
    lines = (out / "failures.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["stage"] for line in lines) == ["decode", "extract", "write"]
    # Fixed and rerun: only the failed images are extracted; failures.jsonl goes away.
    (out / "d").unlink()
    write(images / "f.png")
    store, summary = extract_to_store(StandIn(), images, out, progress=False)
    assert (summary.extracted, summary.skipped_existing, summary.failed) == (3, 3, [])
    assert not (out / "failures.jsonl").exists() and summary.failures_file is None
    assert FeatureStore.open(out).load("d/e.png").descriptors.shape == (3, 4)


def test_an_extractor_that_fails_on_every_image_stops_the_run(tmp_path):
    for number in range(BROKEN_EXTRACTOR_AFTER + 2):
        write(tmp_path / "images" / f"{number}.png", width=17)
    with pytest.raises(RuntimeError, match="fell over"):
        extract_to_store(StandIn(fail_width=17), tmp_path / "images", tmp_path / "out", False)


def test_disk_full_names_the_file_and_prints_what_was_saved(tmp_path, monkeypatch, capsys):
    """ENOSPC stops the run with one line naming the file; the JSON summary of what was
    saved is printed first, and a rerun resumes after it."""
    import errno

    import delf_tf.commands.extract as extract_command
    from delf_tf.cli import main

    for name in "abcd":
        write(tmp_path / "images" / f"{name}.png")
    real_save = FeatureStore.save

    def save(self, key, features):
        if key == "c.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(self, key, features)

    monkeypatch.setattr(FeatureStore, "save", save)
    monkeypatch.setattr(extract_command, "extractor_from_flags", lambda flags: StandIn())
    monkeypatch.setattr(extract_command, "warn_if_untrained", lambda extractor: None)
    out = tmp_path / "out"
    arguments = ["delf", "extract", f"--images={tmp_path / 'images'}", f"--output_dir={out}"]
    assert main(arguments) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert (summary["images"], summary["extracted"]) == (4, 2)
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith(f"delf extract: error: {out / 'c.png.npz'}: No space left on device")
    assert "2 image(s) saved" in error
    monkeypatch.setattr(FeatureStore, "save", real_save)
    assert main(arguments) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["extracted"], summary["skipped_existing"]) == (2, 2)
