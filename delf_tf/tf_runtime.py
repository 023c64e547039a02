"""Importing TensorFlow without its native start-up chatter.

TensorFlow 2.21 logs through absl's C++ logging before it is initialised, which
ignores TF_CPP_MIN_LOG_LEVEL: every command would start with lines about CUDA
drivers, CPU instructions and oneDNN. `import_tensorflow_quietly` sends file
descriptor 2 to a temporary file while TensorFlow is imported and its devices
are listed, and replays what was captured only if that fails.
`quiet_library_loggers` keeps the INFO lines of FAISS's loader (which CPU build it
picked) off stderr. DELF_TF_LOGS=1 keeps both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

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


def quiet_library_loggers() -> None:
    """Raises the loggers of libraries that report their start-up at INFO to WARNING."""
    if os.environ.get(VERBOSE_ENV) != "1":
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow (and initialises its devices) without native log lines."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ.get(VERBOSE_ENV) == "1":
        import tensorflow  # noqa: F401

        return
    with _native_stderr_captured():
        import tensorflow as tf

        tf.config.list_physical_devices()
