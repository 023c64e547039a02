"""A cache of traced extraction graphs, so one-query commands skip building and tracing.

`delf search` and `delf match` extract one or two images: most of their time went to
building the Keras model, tracing the extraction graph and optimising it on the
first call (bench/search_latency.py). The first run with given model flags saves
the traced `extract` function (a SavedModel holding only it) under a key made of
everything the graph depends on: the model flags, the files they name (path, size,
modification time), the extraction settings, the TensorFlow version and the source
of the modules that build the graph. Later runs load it: no Keras build, no trace,
a smaller graph to optimise. The features are the same (same graph, same weights).

Location: $DELF_CACHE_DIR (default ~/.cache/delf_tf/extractors); DELF_CACHE_DIR=off
disables it. Entries are written atomically and can be deleted at any time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tensorflow as tf
from absl import logging

from delf_tf.atomic import staged_directory
from delf_tf.config import ExtractionConfig

CACHE_ENV = "DELF_CACHE_DIR"
INFO_FILE = "extractor.json"
# Modules whose source decides the traced graph: a change to any of them is a new key.
_GRAPH_SOURCES = (
    "extraction/graph.py",
    "extraction/keras_network.py",
    "extraction/resize.py",
    "extraction/pca.py",
    "model/delf.py",
    "model/backbone.py",
    "model/attention.py",
    "releases/network.py",
)


def cache_root() -> Path | None:
    """The cache folder, or None when DELF_CACHE_DIR=off."""
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() in ("off", "0", "none"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "delf_tf" / "extractors"


def _describe_path(value: Any) -> Any:
    """A file or folder argument as (path, size, mtime) of it and what it holds."""
    if not isinstance(value, (str, os.PathLike)) or not os.path.exists(value):
        return value
    path = Path(value).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [str(path)] + [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def cache_key(arguments: dict[str, Any]) -> str:
    """sha256 of the build arguments (files described by size and time), TF and graph code."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(tf.__version__.encode())
    for name in _GRAPH_SOURCES:
        digest.update((package / name).read_bytes())
    described = {name: _describe_path(value) for name, value in sorted(arguments.items())}
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def cached_extractor(arguments: dict[str, Any], build: Callable[[], Any]):
    """An InProcessExtractor from the cache entry of `arguments`, else `build()` (saved).

    `build` returns an InProcessExtractor with a `module` (an ExtractionModule); a
    SavedModel extractor (no module) is returned as it is, uncached.
    """
    from delf_tf.extraction.extractor import InProcessExtractor

    root = cache_root()
    if root is None:
        return build()
    entry = root / cache_key(arguments)
    info_path = entry / INFO_FILE
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            loaded = tf.saved_model.load(str(entry))
            config = ExtractionConfig.from_dict(info["extraction_config"], source=str(info_path))
            extractor = InProcessExtractor(
                loaded.extract, config, info["fingerprint"], info["description"]
            )
            extractor.saved_model = loaded
            return extractor
        except Exception as error:  # noqa: BLE001 - a bad entry is rebuilt, never fatal
            logging.warning("extractor cache %s unusable (%s): rebuilding it", entry, error)
    extractor = build()
    module = getattr(extractor, "module", None)
    if module is None:
        return extractor
    try:
        # Only the traced function (and the variables it captures): no Keras objects,
        # whose many layer functions would make loading slower than rebuilding.
        holder = tf.Module()
        holder.extract = module.extract
        holder.captured = list(module.extract.get_concrete_function().variables)
        info = {
            "fingerprint": module.fingerprint,
            "extraction_config": module.config.to_dict(),
            "description": extractor.describe(),
        }
        with staged_directory(entry) as staging:
            tf.saved_model.save(holder, str(staging))
            (staging / INFO_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
    except OSError as error:  # a read-only home must not stop a search
        logging.warning("extractor cache not written (%s): %s", entry, error)
    return extractor
