"""Front door round 2 (issue 17): what a new user trips over between the README and the
first right answer. Each test fails on the code before its fix."""

from __future__ import annotations

import http.server
import inspect
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import skimage_photo as photo
from PIL import Image

from delf_tf.cli import main
from delf_tf.extraction.folder import extract_to_store
from delf_tf.features.store import FeatureStore, StoreMismatchError
from delf_tf.retrieval import Index
from delf_tf.retrieval.queries import rotated, scaled

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    views = {
        "astronaut_a": photo("astronaut"),
        "astronaut_b": scaled(photo("astronaut"), 0.8),
        "coffee_a": photo("coffee"),
        "coffee_b": rotated(photo("coffee"), 10),
    }
    for name, image in views.items():
        Image.fromarray(image).save(folder / f"{name}.png")
    return folder


@pytest.fixture()
def indexed(tmp_path, photos, extractor):
    """An index of `photos` made by the session's extractor (score_threshold 0, scales
    0.5 and 1, no downsizing, 200 features): settings the defaults do not share."""
    store, _ = extract_to_store(extractor, photos, tmp_path / "features", progress=False)
    Index.from_store(store, photos, progress=False).save(tmp_path / "index")
    return tmp_path / "index"


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_queries_are_extracted_with_the_index_settings(
    indexed, photos, tmp_path, model_config_file, capsys
):
    from delf_tf.commands import common

    signature = inspect.signature(common.extractor_for_index)
    assert list(signature.parameters) == ["flag_values", "index", "cached"]
    assert signature.parameters["cached"].kind is inspect.Parameter.KEYWORD_ONLY
    query = photos / "astronaut_a.png"
    html = tmp_path / "results.html"
    search = ["delf", "search", f"--index={indexed}", f"--model_config={model_config_file}"]
    # No extraction flag: the index's settings (threshold 0), not the defaults (100).
    assert main([*search, f"--images={query}", f"--html={html}"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    stored = {r.key: r.num_features for r in Index.load(indexed).images}["astronaut_a.png"]
    assert payload["query_features"] == stored > 0 and payload["results"]  # as extracted
    assert Path(payload["results"][0]["path"]).name == "astronaut_a.png"
    # The table and the page say what ranks, and mark the query's own file.
    assert (
        "inliers initial score" in " ".join(captured.err.split())
        and "(the query itself)" in captured.err
    )
    page = html.read_text()
    assert "the query itself" in page and "Untrained weights" in page
    assert "initial score" in page and "/<wbr>astronaut_a.png" in page
    # An explicit flag overrides the recorded setting.
    assert main([*search, f"--images={query}", "--score_threshold=1e9"]) == 0
    assert json.loads(capsys.readouterr().out)["query_features"] == 0
    # The old name works, with a deprecation note.
    assert main([*search, f"--image={query}", "--top_k=1"]) == 0
    captured = capsys.readouterr()
    assert "--image is deprecated" in captured.err and json.loads(captured.out)["results"]

    # evaluate: the same settings, and a custom set needs no --dataset_dir.
    labels = {path.stem: path.stem.split("_")[0] for path in photos.iterdir()}
    groundtruth = tmp_path / "groundtruth.json"
    groundtruth.write_text(json.dumps({"labels": labels, "queries": ["astronaut_a"]}))
    evaluate = [
        "delf",
        "evaluate",
        "--dataset=json",
        f"--groundtruth={groundtruth}",
        f"--images={photos}",
        f"--index={indexed}",
        f"--model_config={model_config_file}",
        f"--output_dir={tmp_path / 'eval'}",
    ]
    assert main(evaluate) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert next(iter(report["setups"].values()))["mAP"] == 1.0
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "Untrained weights" in page and "rank score" in page
    assert main([*evaluate[:3], *evaluate[4:]]) == 2  # neither --dataset_dir nor --groundtruth
    assert "--dataset_dir" in capsys.readouterr().err


def test_only_the_pca_differs_names_the_index_pca(
    tmp_path, photos, delf_model, small_config, model_config_file, capsys
):
    from delf_tf.extraction import InProcessExtractor
    from delf_tf.extraction.pca import fit_pca

    pca_file = tmp_path / "pca.npz"
    rng = np.random.default_rng(0)
    fit_pca(rng.normal(size=(300, 128)).astype(np.float32), 16).save(pca_file)
    from delf_tf.extraction.extractor import _load_pca

    with_pca = InProcessExtractor.from_model(
        delf_model,
        small_config.replace(pca_dim=16),
        _load_pca(pca_file),
        source="DelfModel weights=random seed=0",
        pca_file=pca_file,
    )
    store, _ = extract_to_store(with_pca, photos, tmp_path / "features16", progress=False)
    Index.from_store(store, photos, progress=False).save(tmp_path / "index16")
    query = photos / "coffee_a.png"
    argv = ["delf", "search", f"--index={tmp_path / 'index16'}", f"--images={query}"]
    assert main([*argv, f"--model_config={model_config_file}"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("delf search: error: "), error
    assert f"the index was built with PCA {pca_file}; pass --pca={pca_file}" in error
    args = [f"--model_config={model_config_file}", f"--pca={pca_file}"]
    assert main([*argv, *args]) == 0
    assert json.loads(capsys.readouterr().out)["results"]


def test_zero_features_and_empty_inputs_are_reported(tmp_path, photos, model_config_file, capsys):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((photos / "coffee_a.png").read_bytes())
    extract = ["delf", "extract", f"--model_config={model_config_file}", "--max_image_size=128"]
    # Untrained weights and the reference threshold (100): every image has 0 features.
    assert main([*extract, f"--images={one}", f"--output_dir={tmp_path / 'f'}"]) == 3
    captured = capsys.readouterr()
    summary = last_json(captured.out)
    assert summary["zero_features"] == 1 and summary["extracted"] == 1
    assert "--score_threshold=0" in captured.err
    failure = json.loads((tmp_path / "f" / "failures.jsonl").read_text())
    assert failure["stage"] == "features" and "--score_threshold=0" in failure["reason"]
    # An empty folder, an empty store: one-line errors.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*extract, f"--images={empty}", f"--output_dir={tmp_path / 'g'}"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("delf extract: error: ") and "no image files" in error
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"\xff\xd8\xff not an image")
    assert main([*extract, f"--images={broken}", f"--output_dir={tmp_path / 'h'}"]) == 3
    capsys.readouterr()
    assert main(["delf", "index", f"--features={tmp_path / 'h'}", "--output_dir=i"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("delf index: error: ") and "an empty feature store" in error


def test_resuming_with_other_settings_is_refused_unless_overwrite(
    tmp_path, photos, extractor, model_config_file, capsys
):
    store, _ = extract_to_store(extractor, photos, tmp_path / "features", progress=False)
    extract = [
        "delf",
        "extract",
        f"--model_config={model_config_file}",
        f"--images={photos}",
        f"--output_dir={store.root}",
        "--score_threshold=0",
        "--max_image_size=128",
    ]
    assert main(extract) == 1
    *notes, error = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("note: ") for line in notes)  # the untrained-weights note
    assert error.startswith("delf extract: error: ")
    assert "max_image_size -1 -> 128" in error and "--overwrite" in error
    assert main([*extract, "--overwrite"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["extracted"] == 4 and summary["skipped_existing"] == 0
    manifest = FeatureStore.open(store.root).manifest
    assert manifest["extractor"]["extraction_config"]["max_image_size"] == 128
    # Beam's store creation (the store's prepare_store) compares the same way (local and
    # remote stores).
    from delf_tf.features.store import prepare_store

    description = extractor.describe()
    other = dict(description)
    other["extraction_config"] = {**description["extraction_config"], "max_features": 7}
    for root in (str(tmp_path / "beam_store"), "ram://frontdoor/store"):
        prepare_store(root, extractor.fingerprint, description)  # creates
        prepare_store(root, extractor.fingerprint, description)  # matches
        with pytest.raises(StoreMismatchError, match="max_features"):
            prepare_store(root, extractor.fingerprint, other)


def test_help_is_command_first_and_flags_are_checked_before_tensorflow(tmp_path, capsys):
    assert main(["delf", "search", "--help"]) == 0
    text = capsys.readouterr().out
    headers = [line for line in text.splitlines() if line.endswith(":") and " " not in line[:2]]
    assert headers[:3] == ["search flags:", "model:", "extraction settings:"]
    assert text.index("--index=") < text.index("--model=") < text.index("--ransac=")
    assert "delf_tf.commands" not in text and "absl.flags" not in text
    assert "(default: " not in text and "(default 10)" in text and "--flagfile" in text
    code = f"""
import pydoc, sys
import delf_tf
from delf_tf.cli import main
assert "delf_tf.build_extractor" in pydoc.render_doc(delf_tf)  # help(delf_tf): no TensorFlow
a = main(["delf", "extract", "--images={tmp_path}", "--output_dir=o", "--max_image_size=-5"])
b = main(["delf", "search", "--index={tmp_path / "none"}", "--images={tmp_path}"])
print(a, b, "tensorflow" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.stdout.split() == ["2", "1", "False"], done.stderr
    assert "--max_image_size must be -1 (keep) or > 0" in done.stderr
    assert "none: no such file or directory" in done.stderr


def test_grpc_client_on_a_non_grpc_port_suggests_rest():
    from delf_tf.serving.client import ServingExtractor
    from delf_tf.serving.errors import ServingError

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ServingExtractor(f"127.0.0.1:{server.server_address[1]}", retries=0, timeout=5)
        with pytest.raises(ServingError, match="use --protocol=rest"):
            client.fingerprint  # noqa: B018 - the first call to the server
    finally:
        server.shutdown()


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _flags(argv: list[str]):
    from absl import flags

    from delf_tf.commands.common import define_extractor_flags

    flag_values = flags.FlagValues()
    define_extractor_flags(flag_values)
    flag_values(["delf", *argv])
    return flag_values


class _Index:
    """What extractor_for_index reads of an index: its record and its own check."""

    def __init__(self, extractor: dict, fingerprint: str | None):
        self.extractor, self.path, self.fingerprint = extractor, Path("index"), fingerprint
        self.checked: list[str | None] = []

    def check_fingerprint(self, fingerprint):
        self.checked.append(fingerprint)
        return True


def test_an_export_takes_the_index_run_time_settings(exported_model):
    from delf_tf.commands.common import extractor_for_index

    recorded = {"score_threshold": 7.5, "max_features": 20, "scales": [1.0]}
    index = _Index({"extraction_config": recorded}, None)
    extractor = extractor_for_index(_flags([f"--model={exported_model}"]), index, cached=False)
    assert extractor.config.score_threshold == 7.5 and extractor.config.max_features == 20
    assert tuple(extractor.config.scales) == (1.0,)
    assert index.checked == [extractor.fingerprint]  # the index's own check ran


def test_a_server_query_notes_the_index_settings(monkeypatch, capsys):
    from delf_tf.commands import common

    class Served:
        fingerprint = "f" * 64

        def describe(self):
            return {"backend": "tf-serving grpc", "model": "delf@localhost:8500"}

    monkeypatch.setattr(common, "extractor_from_flags", lambda *a, **k: Served())
    index = _Index({"extraction_config": {"score_threshold": 0.0, "max_image_size": 384}}, "f")
    flag_values = _flags(["--server=localhost:8500"])
    assert isinstance(common.extractor_for_index(flag_values, index, cached=True), Served)
    assert "score_threshold=0.0, max_image_size=384" in capsys.readouterr().err
    assert index.checked == ["f" * 64]
