"""The protobuf wire format of DatumProto, written and read with numpy.

Why not only the protobuf messages: filling a `repeated float` from numpy and
reading it back costs about 0.4 us per value in python-protobuf, so a .delf file
of 1000 x 1024-D features takes most of a second to write. The layout that the
reference writer produces is fixed (every field set, fields in number order, the
numeric lists packed), so it is cheap to emit and to recognise with numpy. The
encoders below are checked byte for byte against the protobuf messages and the
reference's own files (tests/formats/test_formats.py); every decoder falls back to the
protobuf messages when a buffer is not in that canonical layout.

Canonical DatumProto of float values, shape (d1, ..., dk):
  0a len(S) S    S = [0a len(dims) varint(d1)..varint(dk)]  (S empty when k = 0)
  12 len(F) F    F = [0a len(V) V], V = float32 little-endian values (F empty when none)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def encode_varint(value: int) -> bytes:
    """Base-128 varint of a non-negative int (negative int64 as two's complement)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buffer: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """Returns (value, position after it); raises ValueError past `end` or after 10 bytes."""
    value = shift = 0
    while pos < end and shift < 70:
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated or overlong varint")


def length_delimited(tag: int, payload: bytes) -> bytes:
    """`tag varint(len) payload`: one length-delimited field."""
    return bytes([tag]) + encode_varint(len(payload)) + payload


def float_datum_prefix(shape: Sequence[int]) -> bytes:
    """Bytes of a canonical float DatumProto that come before its float32 values."""
    dims = b"".join(encode_varint(int(d)) for d in shape)
    shape_payload = length_delimited(0x0A, dims) if shape else b""
    n_bytes = 4 * int(np.prod(shape, dtype=np.int64))  # a 0-D datum holds one value
    list_header = (bytes([0x0A]) + encode_varint(n_bytes)) if n_bytes else b""
    float_list_length = len(list_header) + n_bytes
    return (
        length_delimited(0x0A, shape_payload)
        + bytes([0x12])
        + encode_varint(float_list_length)
        + list_header
    )


def decode_float_datum(buffer: bytes | memoryview) -> tuple[tuple[int, ...], np.ndarray] | None:
    """(shape, float32 values [prod(shape)]) of a canonical float datum, else None."""
    end = len(buffer)
    try:
        if end < 2 or buffer[0] != 0x0A:
            return None
        shape_length, pos = decode_varint(buffer, 1, end)
        shape_end = pos + shape_length
        dims: list[int] = []
        if shape_length:
            if buffer[pos] != 0x0A:
                return None
            dims_length, pos = decode_varint(buffer, pos + 1, shape_end)
            if pos + dims_length != shape_end:
                return None
            while pos < shape_end:
                dim, pos = decode_varint(buffer, pos, shape_end)
                dims.append(dim)
        pos = shape_end
        if pos >= end or buffer[pos] != 0x12:
            return None
        list_length, pos = decode_varint(buffer, pos + 1, end)
        if pos + list_length != end:
            return None
        values = np.zeros(0, np.float32)
        if list_length:
            if buffer[pos] != 0x0A:
                return None
            values_length, pos = decode_varint(buffer, pos + 1, end)
            if pos + values_length != end or values_length % 4:
                return None
            values = np.frombuffer(buffer, "<f4", values_length // 4, pos).astype(np.float32)
    except (ValueError, IndexError):
        return None
    if any(d >= 1 << 63 for d in dims):
        return None
    return tuple(dims), values
