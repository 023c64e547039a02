"""`.delf` / `.delg_local` feature files and `.delg_global` descriptors of the reference.

A `.delf` file is one serialised `DelfFeatures` message: per feature a 1-D float
DatumProto descriptor [D] and the floats x, y, scale, orientation, strength
(attention). `.delg_local` files have the same format; a `.delg_global` file is
one [D] float DatumProto (see datum.py).

The reference writer sets every field, so each feature is a record of fixed
length for a given D (layout in `_record_header`); `delf_to_bytes` writes that
layout with numpy and `delf_from_bytes` reads it with numpy, falling back to the
protobuf messages for any other valid encoding. Arrays are float32 (the values
the file stores); the reference reader returns the same values as float64.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from delf_tf.atomic import atomic_write
from delf_tf.errors import InputError
from delf_tf.formats import protos
from delf_tf.formats._wire import (
    decode_float_datum,
    decode_varint,
    encode_varint,
    float_datum_prefix,
)
from delf_tf.formats.datum import datum_to_bytes, read_datum

# Tags of the five floats after the descriptor: fields 2..6, wire type 5 (fixed32).
_FLOAT_TAGS = np.array([0x15, 0x1D, 0x25, 0x2D, 0x35], np.uint8)
_TRAILER = np.dtype([("tag", "u1"), ("value", "<f4")])  # packed: 5 bytes per float
_TRAILER_BYTES = 5 * _TRAILER.itemsize


class DelfFileError(InputError):
    """A `.delf` / `.delg_local` / `.delg_global` file is unreadable or malformed."""


@dataclasses.dataclass(frozen=True)
class DelfArrays:
    """The arrays of one `.delf` file, as the reference reader returns them (but float32).

    Attributes:
      locations_yx: float32 [N, 2] (y, x) in original-image pixels.
      scales: float32 [N] 1 / pyramid scale.
      descriptors: float32 [N, D] ([0, 0] for an empty file).
      attention: float32 [N] attention scores ("strength" in the file).
      orientations: float32 [N], 0 for DELF.
    """

    locations_yx: np.ndarray
    scales: np.ndarray
    descriptors: np.ndarray
    attention: np.ndarray
    orientations: np.ndarray

    def __len__(self) -> int:
        return int(self.locations_yx.shape[0])


def _record_header(dim: int) -> bytes:
    """Bytes of one feature record before its D float32 descriptor values.

    Record: 0a len { 0a len <float datum [D]> 15 x 1d y 25 scale 2d orientation 35 strength }.
    """
    datum_prefix = float_datum_prefix((dim,))
    descriptor_header = b"\x0a" + encode_varint(len(datum_prefix) + 4 * dim)
    payload_length = len(descriptor_header) + len(datum_prefix) + 4 * dim + _TRAILER_BYTES
    return b"\x0a" + encode_varint(payload_length) + descriptor_header + datum_prefix


def delf_to_bytes(
    locations_yx: np.ndarray,
    scales: np.ndarray,
    descriptors: np.ndarray,
    attention: np.ndarray,
    orientations: np.ndarray | None = None,
    name: str = "features",
) -> bytes:
    """Serialises features exactly as the reference writer does (see module docstring).

    Shapes: locations_yx [N, 2] (y, x), scales [N], descriptors [N, D], attention [N],
    orientations [N] or None (zeros). Values are stored as float32.
    """
    descriptors = np.asarray(descriptors)
    n = descriptors.shape[0] if descriptors.ndim == 2 else -1
    floats = [np.asarray(a, np.float64) for a in (locations_yx, scales, attention)]
    orient = np.zeros(max(n, 0)) if orientations is None else np.asarray(orientations, np.float64)
    if (
        n < 0
        or floats[0].shape != (n, 2)
        or any(a.shape != (n,) for a in (floats[1], floats[2], orient))
    ):
        raise InputError(
            f"{name}: inconsistent shapes: locations {floats[0].shape}, scales "
            f"{floats[1].shape}, descriptors {descriptors.shape}, attention {floats[2].shape}, "
            f"orientations {orient.shape}"
        )
    dim = descriptors.shape[1]
    header = np.frombuffer(_record_header(dim), np.uint8)
    trailer = np.empty((n, 5), _TRAILER)
    trailer["tag"] = _FLOAT_TAGS
    with np.errstate(over="ignore"):
        trailer["value"] = np.stack(
            [floats[0][:, 1], floats[0][:, 0], floats[1], orient, floats[2]], axis=1
        )
        values = np.ascontiguousarray(descriptors, "<f4")
    records = np.empty((n, header.size + 4 * dim + _TRAILER_BYTES), np.uint8)
    records[:, : header.size] = header
    records[:, header.size : header.size + 4 * dim] = values.view(np.uint8).reshape(n, 4 * dim)
    records[:, header.size + 4 * dim :] = trailer.view(np.uint8).reshape(n, _TRAILER_BYTES)
    return records.tobytes()


def _canonical_records(data: bytes) -> DelfArrays | None:
    """Reads the reference writer's fixed-length records with numpy; None if not that layout."""
    try:
        _, pos = decode_varint(data, 1, len(data))
        if data[0] != 0x0A or data[pos] != 0x0A:
            return None
        datum_length, start = decode_varint(data, pos + 1, len(data))
    except (ValueError, IndexError):
        return None
    first = decode_float_datum(memoryview(data)[start : start + datum_length])
    if first is None or len(first[0]) != 1:
        return None
    dim = first[0][0]
    header = np.frombuffer(_record_header(dim), np.uint8)
    record_length = header.size + 4 * dim + _TRAILER_BYTES
    if len(data) % record_length:
        return None
    records = np.frombuffer(data, np.uint8).reshape(-1, record_length)
    trailer = records[:, header.size + 4 * dim :].copy().view(_TRAILER).reshape(-1, 5)
    if not (records[:, : header.size] == header).all() or (trailer["tag"] != _FLOAT_TAGS).any():
        return None
    values = trailer["value"].astype(np.float32)
    descriptors = records[:, header.size : header.size + 4 * dim].copy().view("<f4")
    return DelfArrays(
        locations_yx=np.ascontiguousarray(values[:, [1, 0]]),
        scales=values[:, 2].copy(),
        descriptors=descriptors.astype(np.float32),
        attention=values[:, 4].copy(),
        orientations=values[:, 3].copy(),
    )


def _empty(dim: int = 0) -> DelfArrays:
    zeros = np.zeros(0, np.float32)
    return DelfArrays(np.zeros((0, 2), np.float32), zeros, np.zeros((0, dim), np.float32),
                      zeros.copy(), zeros.copy())  # fmt: skip


def _parse_messages(data: bytes, source: str) -> DelfArrays:
    """Any valid DelfFeatures encoding, through the protobuf messages (slower)."""
    message = protos.DelfFeatures()
    try:
        message.ParseFromString(data)
    except DecodeError as error:
        raise DelfFileError(f"{source}: not a DelfFeatures file ({error})") from error
    if not message.feature:
        return _empty()
    rows, dims = [], set()
    for feature in message.feature:
        datum = feature.descriptor
        dims.add(tuple(datum.shape.dim))
        rows.append(np.array(datum.float_list.value, np.float32))
    if len(dims) != 1 or len(next(iter(dims))) != 1 or rows[0].size != next(iter(dims))[0]:
        raise DelfFileError(f"{source}: descriptors are not all 1-D of one size: {sorted(dims)}")
    if any(row.size != rows[0].size for row in rows):
        raise DelfFileError(f"{source}: descriptor values do not match their shape")
    fields = ("y", "x", "scale", "strength", "orientation")
    values = np.array([[getattr(f, k) for k in fields] for f in message.feature], np.float32)
    return DelfArrays(
        np.ascontiguousarray(values[:, :2]), values[:, 2].copy(), np.stack(rows),
        values[:, 3].copy(), values[:, 4].copy(),
    )  # fmt: skip


def delf_from_bytes(data: bytes, source: str = "<bytes>") -> DelfArrays:
    """Parses the bytes of a `.delf` file (float32 arrays; see DelfArrays)."""
    data = bytes(data)
    if not data:
        return _empty()
    return _canonical_records(data) or _parse_messages(data, source)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DelfFileError(f"{path}: cannot read ({error.strerror or error})") from error


def read_delf(path: str | os.PathLike) -> DelfArrays:
    """Reads a `.delf` / `.delg_local` file."""
    path = Path(path)
    return delf_from_bytes(_read_bytes(path), str(path))


def write_delf(
    path: str | os.PathLike,
    locations_yx: np.ndarray,
    scales: np.ndarray,
    descriptors: np.ndarray,
    attention: np.ndarray,
    orientations: np.ndarray | None = None,
) -> None:
    """Writes a `.delf` file atomically, byte-identical to the reference writer's."""
    data = delf_to_bytes(locations_yx, scales, descriptors, attention, orientations, str(path))
    atomic_write(path, lambda handle: handle.write(data))


def read_global_descriptor(path: str | os.PathLike) -> np.ndarray:
    """Reads a `.delg_global` file: float32 [D]."""
    path = Path(path)
    try:
        value = read_datum(path)
    except InputError as error:
        raise DelfFileError(str(error)) from error
    if value.ndim != 1 or value.dtype != np.float32:
        raise DelfFileError(f"{path}: expected a 1-D float descriptor, got {value.dtype} "
                            f"{list(value.shape)}")  # fmt: skip
    return value


def write_global_descriptor(path: str | os.PathLike, descriptor: np.ndarray) -> None:
    """Writes a float [D] global descriptor as a `.delg_global` file, atomically."""
    descriptor = np.asarray(descriptor)
    if descriptor.ndim != 1 or descriptor.dtype.kind != "f":
        raise InputError(f"{path}: a global descriptor must be float [D], got "
                         f"{descriptor.dtype} {list(descriptor.shape)}")  # fmt: skip
    data = datum_to_bytes(descriptor, str(path))
    atomic_write(path, lambda handle: handle.write(data))
