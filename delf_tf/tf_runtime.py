"""Importing TensorFlow without its native start-up chatter.

TensorFlow 2.21 logs through absl's C++ logging before it is initialised, which
ignores TF_CPP_MIN_LOG_LEVEL: every command, and every `import delf_tf.<package>`
in Python, would start with lines about CUDA drivers, CPU instructions and oneDNN.
`import delf_tf` installs `QuietTensorFlowFinder` (once): whoever imports TensorFlow
first afterwards (our modules, Keras, the user's code) imports it with file
descriptor 2 sent to a temporary file while TensorFlow loads and lists its devices;
what was captured is replayed only if that fails. `quiet_library_loggers` keeps the
INFO lines of FAISS's loader (which CPU build it picked) and of TensorFlow's Python
modules (signature names, "Sharding callback", "Assets written") off stderr while a
command logs at INFO. DELF_TF_LOGS=1 keeps all of them.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

VERBOSE_ENV = "DELF_TF_LOGS"


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[None]:
    """Redirects fd 2 (native and Python stderr) to a temporary file; replays it on error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode("utf-8", "replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


_LIBRARY_DIRS = tuple(f"{os.sep}{name}{os.sep}" for name in ("tensorflow", "keras", "tf_keras"))


def _not_library_info(record: logging.LogRecord) -> bool:
    """False for INFO (and lower) records logged from TensorFlow's or Keras' own modules."""
    return record.levelno >= logging.WARNING or not any(
        folder in record.pathname for folder in _LIBRARY_DIRS
    )


def quiet_library_loggers() -> None:
    """Keeps libraries' routine INFO lines off stderr while a command logs at INFO.

    FAISS's loader logs which CPU build it picked; TensorFlow's Python modules log
    through absl (the logger "absl", which our own notes use too) about signature
    input names, checkpoint sharding and assets. Warnings and errors still show.
    """
    if os.environ.get(VERBOSE_ENV) == "1":
        return
    for name in ("faiss.loader", "tensorflow", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.WARNING)
    absl_logger = logging.getLogger("absl")
    if _not_library_info not in absl_logger.filters:
        absl_logger.addFilter(_not_library_info)


class _QuietLoader(importlib.abc.Loader):
    """Wraps TensorFlow's own loader: executes the package with native stderr captured."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with _native_stderr_captured():
            self._loader.exec_module(module)
            module.config.list_physical_devices()  # CUDA/oneDNN probing logs here


class QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once, with a loader that keeps its native start-up lines quiet."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; also keeps find_spec below from coming back here
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install_quiet_import() -> None:
    """Makes the first import of TensorFlow in this process quiet (no-op with DELF_TF_LOGS=1)."""
    if "tensorflow" in sys.modules or os.environ.get(VERBOSE_ENV) == "1":
        return
    if not any(isinstance(finder, QuietTensorFlowFinder) for finder in sys.meta_path):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        sys.meta_path.insert(0, QuietTensorFlowFinder())


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow (and initialises its devices) without native log lines."""
    install_quiet_import()
    import tensorflow  # noqa: F401
