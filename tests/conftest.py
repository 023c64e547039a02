"""Shared fixtures: one seeded random DelfModel per session, tiny images, CPU only.

The session's model has the tiny backbone (`TINY_MODEL`): the pipeline around the
network (extraction graph, export, serving, retrieval, commands) does not depend on
ResNet50's numbers, and the tiny net builds and traces in a fraction of the time.
Tests where ResNet50 itself matters build it and are marked `slow`.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The traced-extractor cache of `delf search` / `delf match` goes to a per-run folder.
os.environ.setdefault("DELF_CACHE_DIR", tempfile.mkdtemp(prefix="delf_test_cache_"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import skimage.data  # noqa: E402
import skimage.transform  # noqa: E402

from delf_tf.config import ExtractionConfig, ModelConfig  # noqa: E402

SMALL_SCALES = (0.5, 1.0)
# The tests' model: stride 16 like ResNet50 conv4, 128-D features, receptive field 78 px.
TINY_MODEL = ModelConfig(backbone="tiny", feature_depth=128, attention_hidden_units=32)


@pytest.fixture(scope="session")
def delf_model():
    """The seeded (seed 0) random DelfModel of TINY_MODEL: `delf ... --model_config=...`."""
    from delf_tf.model import build_delf_model

    return build_delf_model(TINY_MODEL, seed=0)


@pytest.fixture(scope="session")
def model_config_file(tmp_path_factory):
    """TINY_MODEL as a JSON file: `--model_config=<it> --seed=0` rebuilds `delf_model`."""
    path = tmp_path_factory.mktemp("model_config") / "tiny.json"
    TINY_MODEL.save(path)
    return path


@pytest.fixture(scope="session")
def small_config():
    """Two pyramid levels, no downsizing, every location kept: fast and threshold-free."""
    return ExtractionConfig(
        scales=SMALL_SCALES, score_threshold=0.0, max_features=200, max_image_size=-1
    )


@pytest.fixture(scope="session")
def extractor(delf_model, small_config):
    from delf_tf.extraction import InProcessExtractor

    return InProcessExtractor.from_model(delf_model, small_config)


def skimage_photo(name: str, size: int = 128) -> np.ndarray:
    """uint8 [h, w, 3] RGB: scikit-image's `name` photo with its long side resized to
    `size` (Pillow's default filter)."""
    from PIL import Image

    picture = Image.fromarray(np.asarray(getattr(skimage.data, name)())[:, :, :3])
    factor = size / max(picture.size)
    return np.asarray(
        picture.resize((round(picture.width * factor), round(picture.height * factor)))
    )


@pytest.fixture(scope="session")
def astronaut_small():
    """uint8 [128, 128, 3] RGB photograph from scikit-image."""
    image = skimage.transform.resize(skimage.data.astronaut(), (128, 128), anti_aliasing=True)
    return (image * 255).round().astype(np.uint8)


# --- serving (export, TF Serving client, dev server) ------------------------------------------


@pytest.fixture(scope="session")
def serving_config():
    """Tiny export settings: K = 50 features, two scales, long side <= 128 px, no threshold."""
    return ExtractionConfig(
        max_features=50, scales=SMALL_SCALES, max_image_size=128, score_threshold=0.0
    )


@pytest.fixture(scope="session")
def serving_reference(delf_model, serving_config):
    """The in-process extractor an export of `delf_model` with `serving_config` must match."""
    from delf_tf.extraction import InProcessExtractor

    return InProcessExtractor.from_model(delf_model, serving_config)


@pytest.fixture(scope="session")
def exported_model(delf_model, serving_config, tmp_path_factory):
    """Path of `<base>/delf/1/`: one export per session of `delf_model` with `serving_config`."""
    from delf_tf.export import export_model

    return export_model(delf_model, tmp_path_factory.mktemp("exports"), serving_config)


@pytest.fixture(scope="session")
def local_server(exported_model):
    """`delf serve`'s LocalServer over the export, gRPC and REST on free loopback ports."""
    from delf_tf.serving.local_server import LocalServer
    from delf_tf.serving.repository import ModelRepository, ModelSource

    repository = ModelRepository([ModelSource("delf", exported_model.parent)])
    server = LocalServer(repository, grpc_port=0, rest_port=0, poll_seconds=0).start()
    yield server
    server.stop()


# --- files written by the reference implementation (outside the repository) -----------------


@pytest.fixture(scope="session")
def official_formats():
    """`find(*relative_paths) -> folder` holding all of them, among reference-written
    files: $DELF_OFFICIAL_FORMATS_DIR, <repo>/../shared/data/official-formats (the
    project workspace's full set), then tests/data/official-formats (the smaller files,
    in the repository). The test is skipped when no folder holds them all."""
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    folders = [tests.parents[1] / "shared" / "data" / "official-formats"]
    folders.append(tests / "data" / "official-formats")
    if os.environ.get("DELF_OFFICIAL_FORMATS_DIR"):
        folders.insert(0, Path(os.environ["DELF_OFFICIAL_FORMATS_DIR"]))

    def find(*relative_paths: str) -> Path:
        for folder in folders:
            if all((folder / path).is_file() for path in relative_paths):
                return folder
        pytest.skip(
            f"reference-written {', '.join(relative_paths)} not found in "
            f"{', '.join(map(str, folders))} (set DELF_OFFICIAL_FORMATS_DIR to the "
            "official-formats data folder)"
        )

    return find


def saved_model_cli_show_all(version_dir) -> str:
    """What `saved_model_cli show --all --dir=<version_dir>` prints (its own code, run in
    this process: a subprocess would import TensorFlow again)."""
    import contextlib
    import io

    from tensorflow.python.tools import saved_model_cli

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        saved_model_cli._show_all(str(version_dir))
    return buffer.getvalue()


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_serve_process(program: list[str], model_dir, grpc_port: int, rest_port: int):
    """`delf serve` (through `program`, e.g. ["-m", "delf_tf.cli"]) in a subprocess over
    `model_dir`, waited for until it prints its ready line: (process, lines read)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, *program, "serve", f"--port={grpc_port}"]
        + [f"--rest_api_port={rest_port}", f"--model_base_path={model_dir}"]
        + ["--file_system_poll_wait_seconds=0"],
        env={**os.environ, "PYTHONPATH": str(repo), "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "delf serve: ready" in line:
            break
    return process, lines
