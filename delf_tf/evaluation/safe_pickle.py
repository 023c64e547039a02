"""A restricted unpickler for ground-truth files such as `gnd_roxford5k.pkl`.

`pickle.load` runs whatever callable a file names, so a handed-in pickle could
execute code. This loader admits only data:
- plain containers and scalars: dict, list, tuple, set, frozenset, str, bytes,
  bytearray, int, float, complex, bool, None (built by pickle opcodes, or by
  `set` / `frozenset` / `_codecs.encode(str, "latin1")` in old protocols);
- numpy arrays and scalars of numeric, bool or string dtypes. Their globals
  (`_reconstruct`, `dtype`, `scalar`, `_frombuffer`) are mapped to checking
  stand-ins, never to numpy's own callables, and the BUILD opcode is
  re-implemented so that only those stand-ins' states are accepted (a state
  cannot set dtype flags or turn data into object pointers). Object, void and
  structured dtypes are refused.
Any other global, any other BUILD, and persistent ids raise UnsafePickleError
before anything is called.

It uses the pure-Python unpickler (`pickle._Unpickler`), whose opcode table can
be overridden; ground-truth files are small, so speed does not matter.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from delf_tf.errors import InputError

# dtype kinds admitted: bool, signed, unsigned, float, complex, bytes, unicode.
_SAFE_KINDS = frozenset("biufcSU")
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
_BUILTINS = ("builtins", "__builtin__")
# Refuse absurd shapes before allocating anything.
_MAX_ELEMENTS = 1 << 31


class UnsafePickleError(InputError, pickle.UnpicklingError):
    """The pickle names something other than plain data (a user's file: one line, exit 1)."""


class _NdarrayType:
    """Stands for `numpy.ndarray` as the subtype argument of `_reconstruct`."""


_NDARRAY = _NdarrayType()


class _PendingArray:
    """What `_reconstruct` yields; the BUILD opcode that follows turns it into an ndarray."""


class _PendingDtype:
    """What `numpy.dtype(...)` yields; BUILD (byte order) turns it into a numpy dtype."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


def _check_dtype(dtype: Any, where: str) -> np.dtype:
    if isinstance(dtype, _PendingDtype):
        dtype = dtype.dtype
    if not isinstance(dtype, np.dtype):
        raise UnsafePickleError(f"{where}: expected a dtype, got {type(dtype).__name__}")
    if dtype.kind not in _SAFE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsafePickleError(f"{where}: dtype {dtype!r} is not a plain numeric or string type")
    return dtype


def _safe_dtype(spec: Any, align: Any = False, copy: Any = False) -> _PendingDtype:
    if not isinstance(spec, str) or len(spec) > 8:
        raise UnsafePickleError(f"numpy.dtype: refused specification {spec!r}")
    try:
        dtype = np.dtype(spec)
    except TypeError as error:
        raise UnsafePickleError(f"numpy.dtype: invalid specification {spec!r}") from error
    return _PendingDtype(_check_dtype(dtype, "numpy.dtype"))


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> _PendingArray:
    if subtype is not _NDARRAY:
        raise UnsafePickleError("numpy _reconstruct: only plain numpy.ndarray is admitted")
    return _PendingArray()


def _check_shape(shape: Any, where: str) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise UnsafePickleError(f"{where}: invalid shape {shape!r}")
    if int(np.prod(shape, dtype=np.float64)) > _MAX_ELEMENTS:
        raise UnsafePickleError(f"{where}: shape {shape} is too large")
    return shape


def _array_from_bytes(
    data: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool, where: str
):
    if isinstance(data, str):  # Python 2 pickles loaded with encoding="latin1"
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"{where}: array data must be bytes, got {type(data).__name__}")
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != count * dtype.itemsize:
        raise UnsafePickleError(
            f"{where}: {len(data)} bytes of data for shape {shape} and dtype {dtype}"
        )
    flat = np.frombuffer(bytes(data), dtype=dtype, count=count)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


def _safe_frombuffer(data: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    dtype = _check_dtype(dtype, "numpy _frombuffer")
    shape = _check_shape(shape, "numpy _frombuffer")
    if order not in ("C", "F"):
        raise UnsafePickleError(f"numpy _frombuffer: invalid order {order!r}")
    if isinstance(data, pickle.PickleBuffer):
        data = bytes(data.raw())
    return _array_from_bytes(data, dtype, shape, order == "F", "numpy _frombuffer")


def _safe_scalar(dtype: Any, data: Any = None) -> Any:
    dtype = _check_dtype(dtype, "numpy scalar")
    return _array_from_bytes(data, dtype, (), False, "numpy scalar")[()]


def _safe_codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode: only str -> latin1 bytes is admitted")
    return text.encode("latin1")


def _bytes_args(name: str, args: tuple) -> bytes:
    """Old protocols write bytes as bytes() or bytes(str, "latin-1"); admit only those."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    if len(args) == 2 and isinstance(args[0], str):
        return _safe_codecs_encode(args[0], args[1])
    raise UnsafePickleError(f"{name}: only bytes() or {name}(str, 'latin-1') is admitted")


def _safe_bytes(*args: Any) -> bytes:
    return _bytes_args("bytes", args)


def _safe_bytearray(*args: Any) -> bytearray:
    return bytearray(_bytes_args("bytearray", args))


_ALLOWED: dict[tuple[str, str], Any] = {}
for _module in _NUMPY_CORE:
    _ALLOWED[(_module, "_reconstruct")] = _safe_reconstruct
    _ALLOWED[(_module, "scalar")] = _safe_scalar
for _module in _NUMPY_NUMERIC:
    _ALLOWED[(_module, "_frombuffer")] = _safe_frombuffer
_ALLOWED[("numpy", "ndarray")] = _NDARRAY
_ALLOWED[("numpy", "dtype")] = _safe_dtype
for _module in _BUILTINS:
    _ALLOWED[(_module, "set")] = set
    _ALLOWED[(_module, "frozenset")] = frozenset
    _ALLOWED[(_module, "bytes")] = _safe_bytes
    _ALLOWED[(_module, "bytearray")] = _safe_bytearray
_ALLOWED[("_codecs", "encode")] = _safe_codecs_encode


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused global {module}.{name}: only plain data and numpy arrays are admitted"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused persistent id: only plain data is admitted")

    def _load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, _PendingDtype):
            # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
            if not isinstance(state, tuple) or len(state) < 2:
                raise UnsafePickleError("numpy dtype: invalid state")
            order = state[1]
            if order in ("<", ">") and target.dtype.itemsize > 1:
                target.dtype = target.dtype.newbyteorder(order)
            self.stack[-1] = target
            return
        if isinstance(target, _PendingArray):
            # (version, shape, dtype, is_fortran, data)
            if not isinstance(state, tuple) or len(state) != 5:
                raise UnsafePickleError("numpy array: invalid state")
            _, shape, dtype, fortran, data = state
            dtype = _check_dtype(dtype, "numpy array")
            shape = _check_shape(shape, "numpy array")
            self.stack[-1] = _array_from_bytes(data, dtype, shape, bool(fortran), "numpy array")
            return
        raise UnsafePickleError(f"refused BUILD on {type(target).__name__}")

    dispatch[pickle.BUILD[0]] = _load_build


def _finalize(value: Any) -> Any:
    """Turns the stand-ins left in the result into numpy objects (or refuses them)."""
    if isinstance(value, _PendingDtype):
        return value.dtype
    if isinstance(value, (_PendingArray, _NdarrayType)):
        raise UnsafePickleError("incomplete numpy array in pickle")
    if isinstance(value, dict):
        return {_finalize(k): _finalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finalize(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_finalize(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return type(value)(_finalize(v) for v in value)
    if callable(value):
        raise UnsafePickleError("refused a callable in the unpickled data")
    return value


def safe_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickles plain data (see the module docstring); raises UnsafePickleError otherwise."""
    unpickler = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1")
    try:
        return _finalize(unpickler.load())
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{source}: {error}") from None
    except Exception as error:  # truncated or malformed data of any kind
        raise UnsafePickleError(
            f"{source}: not a valid pickle of plain data ({error!r})"
        ) from error


def safe_load(path: str | os.PathLike) -> Any:
    """Reads and unpickles the file at `path` with the restricted unpickler."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise FileNotFoundError(f"{path}: cannot read ({error.strerror})") from error
    return safe_loads(data, source=str(path))
