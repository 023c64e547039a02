"""Readers and writers of the reference DELF/DELG file formats, without protoc or TensorFlow.

datum.py        `.datum` arrays (PCA mean, projection, variances)
delf_file.py    `.delf` / `.delg_local` local features, `.delg_global` descriptors
delf_config.py  DelfConfig text files (`.pbtxt`) -> DelfConfigSettings
protos.py       the reference's messages, built at run time (no generated _pb2)
"""

from delf_tf.formats.datum import (
    DatumError,
    datum_from_bytes,
    datum_to_bytes,
    read_datum,
    write_datum,
)
from delf_tf.formats.delf_config import (
    DelfConfigSettings,
    parse_delf_config,
    resolve_paths,
    settings_overrides,
)
from delf_tf.formats.delf_file import (
    DelfArrays,
    DelfFileError,
    delf_from_bytes,
    delf_to_bytes,
    read_delf,
    read_global_descriptor,
    write_delf,
    write_global_descriptor,
)

__all__ = [
    "DatumError",
    "DelfArrays",
    "DelfConfigSettings",
    "DelfFileError",
    "datum_from_bytes",
    "datum_to_bytes",
    "delf_from_bytes",
    "delf_to_bytes",
    "parse_delf_config",
    "read_datum",
    "read_delf",
    "read_global_descriptor",
    "resolve_paths",
    "settings_overrides",
    "write_datum",
    "write_delf",
    "write_global_descriptor",
]
