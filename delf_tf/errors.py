"""The error family of delf-tf and the exit codes of the `delf` command.

Every error a user can cause (a bad flag value, a missing or malformed file, a
model that does not fit an index) is a `DelfError` whose message is one line
that names the file or field. The `delf` command prints such an error as
`delf <command>: error: <message>` and exits with EXIT_ERROR; anything else that
escapes a command is a bug and keeps its traceback.

No TensorFlow here: the command line imports this module before it knows
whether TensorFlow is needed at all.
"""

from __future__ import annotations

# Exit statuses of `delf <command>` (also documented in `delf --help`).
EXIT_OK = 0
EXIT_ERROR = 1  # a user error: one line on stderr, nothing written
EXIT_USAGE = 2  # unknown command or bad flags
EXIT_PARTIAL = 3  # the command finished, but some inputs failed (listed in its summary)


class DelfError(Exception):
    """Base of every error caused by the user's input, files or environment."""


class InputError(DelfError, ValueError):
    """A flag, config field, file or folder given by the user is unusable."""


class ConfigError(InputError):
    """A configuration (dataclass field, JSON file, DelfConfig text) is invalid."""


class FingerprintMismatchError(DelfError):
    """Descriptors of two different extractors (model, weights or PCA) would be mixed.

    Raised for a feature store or an index written by another extractor, and (as
    `delf_tf.serving.errors.ServedModelChangedError`) when a served model changes.
    """


class WorkerLostError(DelfError):
    """A worker of a multi-worker training stopped (crashed, killed, preempted).

    The others cannot go on alone: every worker is started again, with the same
    flags, and the run resumes from the chief's newest checkpoint.
    """
