"""`.datum` files: one array in a DatumProto, the reference's format for PCA parameters.

Storage: float16, float32 and float64 arrays are stored as float32 values, uint8
to uint64 arrays as uint32 values, row-major, with the shape beside them; other
dtypes are refused (as the reference writer does).

Reading returns float32 (float_list) or uint32 (uint32_list) arrays of the
stored shape: exactly the stored values, in the narrowest dtype that holds them.
The reference reader widens them (float64 / uint64); convert with
`.astype(np.float64)` where that matters, nothing is lost either way.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from delf_tf.atomic import atomic_write
from delf_tf.errors import InputError
from delf_tf.formats import protos
from delf_tf.formats._wire import decode_float_datum, float_datum_prefix

FLOAT_DTYPES = (np.float16, np.float32, np.float64)
UINT_DTYPES = (np.uint8, np.uint16, np.uint32, np.uint64)
UINT32_MAX = np.iinfo(np.uint32).max


class DatumError(InputError):
    """A `.datum` file (or DatumProto bytes) is unreadable or malformed; names the source."""


def datum_to_bytes(array: np.ndarray, name: str = "array") -> bytes:
    """Serialises an array of any shape to DatumProto bytes, as the reference writer does.

    Raises InputError (naming `name`) for dtypes other than float16/32/64 and
    uint8..uint64, and for unsigned values above 2**32 - 1.
    """
    array = np.asarray(array)
    if array.dtype.type in FLOAT_DTYPES:
        with np.errstate(over="ignore"):
            values = np.ascontiguousarray(array, dtype="<f4")
        return float_datum_prefix(array.shape) + values.tobytes()
    if array.dtype.type in UINT_DTYPES:
        if array.size and int(array.max()) > UINT32_MAX:
            raise InputError(f"{name}: values above 2**32 - 1 do not fit a uint32 DatumProto")
        datum = protos.DatumProto()
        datum.shape.dim.extend(array.shape)
        datum.uint32_list.value.extend(array.ravel().tolist())
        return datum.SerializeToString()
    raise InputError(
        f"{name}: dtype {array.dtype} cannot be stored in a DatumProto "
        "(float16/32/64 or uint8/16/32/64)"
    )


def datum_from_bytes(data: bytes | bytearray | memoryview, source: str = "<bytes>") -> np.ndarray:
    """Parses DatumProto bytes: float32 or uint32 array of the stored shape.

    Raises DatumError naming `source` when the bytes are not a DatumProto or the
    number of values does not match the shape.
    """
    canonical = decode_float_datum(data)
    if canonical is not None:
        shape, values = canonical
    else:
        datum = protos.DatumProto()
        try:
            datum.ParseFromString(bytes(data))
        except DecodeError as error:
            raise DatumError(f"{source}: not a DatumProto ({error})") from error
        shape = tuple(datum.shape.dim)
        kind = datum.WhichOneof("kind_oneof")
        if kind == "uint32_list":
            values = np.array(datum.uint32_list.value, dtype=np.uint32)
        else:
            values = np.array(datum.float_list.value, dtype=np.float32)
    if any(d < 0 for d in shape) or int(np.prod(shape, dtype=object)) != values.size:
        raise DatumError(f"{source}: shape {list(shape)} does not hold {values.size} values")
    return values.reshape(shape)


def read_datum(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview) -> np.ndarray:
    """Reads a `.datum` file (or its bytes): float32 / uint32 array of the stored shape."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return datum_from_bytes(path_or_bytes)
    path = Path(path_or_bytes)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatumError(f"{path}: cannot read ({error.strerror or error})") from error
    return datum_from_bytes(data, str(path))


def write_datum(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes `array` as a `.datum` file atomically (see `datum_to_bytes` for dtypes)."""
    data = datum_to_bytes(array, str(path))
    atomic_write(path, lambda handle: handle.write(data))
