"""TF Serving's REST JSON tensor format, both ways (client requests, dev-server answers).

Request: {"signature_name": s, "instances": [...]} (row format: one entry per
batch item; with one input an entry is its value, else an object of named values)
or {"signature_name": s, "inputs": value | {name: value}} (columnar format).
Binary strings are {"b64": "<base64>"}. Answers mirror the request format:
{"predictions": [...]} (row; an object per item when there are several outputs)
or {"outputs": value | {name: value}}; string outputs whose name ends in `_bytes`
are base64 objects, other strings are plain JSON strings.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import tensorflow as tf


class JsonTensorError(ValueError):
    """A JSON request or answer does not fit TF Serving's tensor format."""


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _to_bytes(value: Any) -> Any:
    if isinstance(value, list):
        return [_to_bytes(item) for item in value]
    if _is_b64(value):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError) as error:
            raise JsonTensorError(f"invalid base64 string ({error})") from error
    if isinstance(value, str):
        return value.encode("utf-8")
    raise JsonTensorError(f"expected a string or {{'b64': ...}}, got {type(value).__name__}")


def json_to_array(value: Any, dtype: tf.DType, name: str) -> np.ndarray:
    """A JSON value (nested lists) -> np.ndarray of `dtype` (object array of bytes for strings)."""
    try:
        if dtype == tf.string:
            array = np.array(_to_bytes(value), dtype=object)
            if array.dtype != object or any(not isinstance(v, bytes) for v in array.flat):
                raise JsonTensorError("ragged nested lists")
            return array
        if dtype == tf.bool:
            return np.asarray(value, dtype=bool)
        return np.asarray(value, dtype=dtype.as_numpy_dtype)
    except (ValueError, TypeError, OverflowError) as error:
        raise JsonTensorError(
            f"input '{name}': cannot be read as {dtype.name} ({error})"
        ) from error


def array_to_json(array: np.ndarray, name: str) -> Any:
    """np.ndarray -> JSON value; strings as text, or {"b64": ...} when `name` ends in _bytes."""
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind in "SU":
        if name.endswith("_bytes"):
            encode = np.frompyfunc(lambda v: {"b64": base64.b64encode(v).decode("ascii")}, 1, 1)
        else:
            encode = np.frompyfunc(
                lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v), 1, 1
            )
        return encode(array).tolist() if array.ndim else encode(array[()])
    return array.tolist()


def parse_request(
    body: Any, input_dtypes: dict[str, tf.DType]
) -> tuple[dict[str, np.ndarray], bool]:
    """JSON request -> ({input name: array}, row_format), per the signature's input dtypes."""
    if not isinstance(body, dict):
        raise JsonTensorError("the request body must be a JSON object")
    if ("instances" in body) == ("inputs" in body):
        raise JsonTensorError("the request must have exactly one of 'instances' or 'inputs'")
    names = sorted(input_dtypes)
    single = names[0] if len(names) == 1 else None
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise JsonTensorError("'instances' must be a list")
        named = bool(instances) and isinstance(instances[0], dict) and not _is_b64(instances[0])
        if not named:
            if single is None:
                raise JsonTensorError(
                    f"the signature has {len(names)} inputs {names}: each instance must be an "
                    "object naming them"
                )
            return {single: json_to_array(instances, input_dtypes[single], single)}, True
        columns: dict[str, list] = {}
        for index, instance in enumerate(instances):
            if not isinstance(instance, dict) or _is_b64(instance):
                raise JsonTensorError(f"instance {index} is not an object of named inputs")
            if index and set(instance) != set(columns):
                raise JsonTensorError(f"instance {index} names other inputs than instance 0")
            for key, value in instance.items():
                columns.setdefault(key, []).append(value)
        return {
            key: json_to_array(values, _dtype_of(input_dtypes, key), key)
            for key, values in columns.items()
        }, True
    inputs = body["inputs"]
    if isinstance(inputs, dict) and not _is_b64(inputs):
        return {
            key: json_to_array(value, _dtype_of(input_dtypes, key), key)
            for key, value in inputs.items()
        }, False
    if single is None:
        raise JsonTensorError(f"the signature has inputs {names}: 'inputs' must name them")
    return {single: json_to_array(inputs, input_dtypes[single], single)}, False


def _dtype_of(input_dtypes: dict[str, tf.DType], key: str) -> tf.DType:
    if key not in input_dtypes:
        raise JsonTensorError(
            f"input tensor alias not found in signature: {key}. Inputs expected to be in the "
            f"set {{{','.join(sorted(input_dtypes))}}}."
        )
    return input_dtypes[key]


def format_response(outputs: dict[str, np.ndarray], row_format: bool) -> dict[str, Any]:
    """{output name: array} -> TF Serving's JSON answer for the request's format."""
    names = sorted(outputs)
    if not row_format:
        if len(names) == 1:
            return {"outputs": array_to_json(outputs[names[0]], names[0])}
        return {"outputs": {name: array_to_json(outputs[name], name) for name in names}}
    sizes = {np.shape(outputs[name])[0] if np.ndim(outputs[name]) else None for name in names}
    if len(sizes) != 1 or None in sizes:
        raise JsonTensorError(
            "the row format ('instances') needs every output to have the same 0th dimension; "
            "use the columnar format ('inputs')"
        )
    columns = {name: array_to_json(outputs[name], name) for name in names}
    if len(names) == 1:
        return {"predictions": columns[names[0]]}
    return {
        "predictions": [{name: columns[name][i] for name in names} for i in range(sizes.pop() or 0)]
    }


def encode_inputs(inputs: dict[str, np.ndarray], signature_name: str, row_format: bool) -> dict:
    """Client side: named arrays -> a JSON request body."""
    encoded = {name: array_to_json_input(value) for name, value in inputs.items()}
    body: dict[str, Any] = {"signature_name": signature_name}
    if row_format:
        if len(encoded) != 1:
            raise ValueError("encode_inputs: the row format is used here for one input only")
        body["instances"] = next(iter(encoded.values()))
    else:
        body["inputs"] = encoded
    return body


def array_to_json_input(value: Any) -> Any:
    """Request values: bytes become {"b64": ...}, arrays nested lists."""
    array = np.asarray(value, dtype=object if isinstance(value, (bytes, list)) else None)
    if array.dtype == object:
        encode = np.frompyfunc(lambda v: {"b64": base64.b64encode(v).decode("ascii")}, 1, 1)
        return encode(array).tolist() if array.ndim else encode(array[()])
    return array.tolist()


def decode_outputs(body: Any, row_format: bool) -> dict[str, Any]:
    """Client side: a JSON answer -> {output name: JSON value} (a list per item in row format)."""
    if not isinstance(body, dict):
        raise JsonTensorError("the answer is not a JSON object")
    if row_format:
        rows = body.get("predictions")
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise JsonTensorError("the answer lacks 'predictions' as a list of objects")
        names = set(rows[0]) if rows else set()
        return {name: [row[name] for row in rows] for name in names}
    outputs = body.get("outputs")
    if not isinstance(outputs, dict):
        raise JsonTensorError("the answer lacks 'outputs' as an object")
    return outputs
