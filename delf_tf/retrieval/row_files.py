"""`.npy` files written row by row, so that building an index never holds a whole array.

`RowWriter` appends rows to a new `.npy` file whose header is reserved first and
written with the final shape when it is closed (a `.npy` header is a padded Python
literal: a fixed-size slot holds any shape); `close` returns the file memory-mapped.
`Index.add_store` streams the old index's arrays and then each new image's features
through one writer per array, in a private scratch folder beside the index
(`delf_tf.atomic.scratch_directory`), and `Index.save` hard-links the finished files
into the new generation's staging folder (`delf_tf.atomic.link_or_copy`). Memory is
one image's features, or one chunk of COPY_ROWS rows of an old array, not the
collection.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

# Bytes of the reserved .npy header (version 1.0; a multiple of 64, as NumPy aligns it).
HEADER_BYTES = 128
_MAGIC = b"\x93NUMPY\x01\x00"
# Rows of an existing array copied per step (~42 MB of float32 at 40-D).
COPY_ROWS = 1 << 18


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The HEADER_BYTES-long `.npy` (1.0) header of a C-order array `dtype` [shape]."""
    literal = repr(
        {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": tuple(int(size) for size in shape),
        }
    ).encode("latin1")
    length = HEADER_BYTES - len(_MAGIC) - 2
    if len(literal) + 1 > length:
        raise ValueError(f"shape {shape} does not fit a {HEADER_BYTES}-byte .npy header")
    return _MAGIC + struct.pack("<H", length) + literal.ljust(length - 1) + b"\n"


class RowWriter:
    """A new `.npy` file of `dtype` [rows, *row_shape], filled by `append`, ended by `close`.

    The file is created exclusively (never over another). Until `close` its header
    says nothing valid, so only the finished file is ever read.
    """

    def __init__(self, path: str | os.PathLike, dtype, row_shape: tuple[int, ...]):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(int(size) for size in row_shape)
        self.rows = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self._handle = os.fdopen(os.open(self.path, flags, 0o666), "wb")
        self._handle.write(b"\0" * HEADER_BYTES)

    def append(self, rows: np.ndarray) -> None:
        """Appends `rows` [n, *row_shape] (converted to the file's dtype)."""
        rows = np.ascontiguousarray(rows, self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows {rows.shape[1:]}, expected {self.row_shape}")
        rows.tofile(self._handle)
        self.rows += len(rows)

    def extend(self, array: np.ndarray, chunk_rows: int = COPY_ROWS) -> None:
        """Appends every row of `array` (e.g. a memory-mapped old array), chunk by chunk."""
        for start in range(0, len(array), chunk_rows):
            self.append(np.asarray(array[start : start + chunk_rows]))

    def close(self) -> np.ndarray:
        """Writes the header and closes the file; returns it memory-mapped read-only."""
        self._handle.seek(0)
        self._handle.write(npy_header(self.dtype, (self.rows, *self.row_shape)))
        self._handle.close()
        if self.rows == 0 or 0 in self.row_shape:
            return np.zeros((self.rows, *self.row_shape), self.dtype)
        return np.load(self.path, mmap_mode="r", allow_pickle=False)

    def abort(self) -> None:
        self._handle.close()
