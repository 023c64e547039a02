"""The files of an index directory as data: names, index.json's schema, images.json,
and the generation a reader or a poller sees (`delf_tf.retrieval.index` uses them).

Every check here is O(images) or less and ends in a one-line IndexFormatError that
names the file and the field; the structures' own fields are checked by their
modules (`delf_tf.retrieval.structures`), and every file name that index.json holds
must stay inside the directory (`structures.base.confined`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from delf_tf.retrieval.structures import STRUCTURES, base, structure_type
from delf_tf.retrieval.structures.base import IndexFormatError

FORMAT_VERSION = 1
HEADER = "index.json"
IMAGES = "images.json"
ARRAYS = {
    "descriptors": np.float32,
    "keypoints": np.float32,
    "image_ids": np.int32,
    "offsets": np.int64,
}
GLOBAL_ARRAY = "global_descriptors"
# image records: field -> its exact JSON types ("store" may be absent: older indexes)
RECORD_FIELDS = {
    "key": {str},
    "path": {str},
    "width": {int, type(None)},
    "height": {int, type(None)},
    "num_features": {int},
    "store": {str, type(None)},
}
_ABSENT = object()


def read_json(path: Path, missing_message: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise IndexFormatError(missing_message) from error
    except (OSError, json.JSONDecodeError) as error:
        raise IndexFormatError(f"{path}: unreadable ({error})") from error


def read_records(path: Path) -> list[dict[str, Any]]:
    """images.json: a list of records (JSON objects) with typed fields, sizes >= 0.

    Checked field by field over all records (exact JSON types: a bool is no int).
    """
    records = read_json(path, f"{path.parent}: incomplete index (no {IMAGES})")
    if not isinstance(records, list):
        raise IndexFormatError(f"{path}: expected a JSON list of image records")
    allowed = RECORD_FIELDS.keys()
    for number, record in enumerate(records):
        if type(record) is not dict or not record.keys() <= allowed:
            raise IndexFormatError(f"{path}: record {number} is not an image record")
    for field, types in RECORD_FIELDS.items():
        values = [record.get(field, _ABSENT) for record in records]
        for number, value in enumerate(values):
            if type(value) not in types and not (field == "store" and value is _ABSENT):
                shown = "nothing" if value is _ABSENT else repr(value)
                raise IndexFormatError(f"{path}: record {number}: malformed {field} {shown}")
        if int in types:
            negative = [
                number for number, value in enumerate(values) if type(value) is int and value < 0
            ]
            if negative:
                number = negative[0]
                raise IndexFormatError(
                    f"{path}: record {number}: malformed {field} {values[number]!r}"
                )
    return records


def check_image_ids(image_ids: np.ndarray, offsets: np.ndarray) -> list[str]:
    """image_ids at the first and last row of every image (O(images)); the rows between
    are checked where a search reads them (`structures.votes`)."""
    counts = np.diff(offsets)
    owners = np.flatnonzero(counts > 0)
    firsts, lasts = offsets[:-1][owners], offsets[1:][owners] - 1
    expected = owners.astype(np.int64)
    for rows in (firsts, lasts):
        found = np.asarray(image_ids[rows], np.int64)
        if not np.array_equal(found, expected):
            bad = int(found[found != expected][0])
            return [f"image_ids holds {bad} where the offsets say another image"]
    return []


def check_header(header: Any, path: Path) -> dict[str, dict[str, Any]]:
    """Validates index.json's fields (types, known names, confined file names); returns
    its structures ({} when it has none)."""
    if not isinstance(header, dict):
        raise IndexFormatError(f"{path}: expected a JSON object")
    if header.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: format_version {header.get('format_version')!r}, "
            f"this version of delf-tf reads {FORMAT_VERSION}"
        )
    if "fingerprint" not in header or not isinstance(header["fingerprint"], str | None):
        raise IndexFormatError(f"{path}: malformed extractor fingerprint")
    if not isinstance(header.get("extractor"), dict | None):
        raise IndexFormatError(f"{path}: extractor: expected a JSON object")
    if "generation" in header:
        base.count(header, "generation", str(path))
    for field in ("descriptor_dim", "num_images", "num_descriptors"):
        if field in header:
            base.count(header, field, str(path))
    arrays = base.mapping(header, "arrays", str(path))
    names = set(ARRAYS) | ({GLOBAL_ARRAY} if GLOBAL_ARRAY in arrays else set())
    if set(arrays) != names:
        raise IndexFormatError(
            f"{path}: arrays {sorted(arrays)}, expected {sorted(ARRAYS)} (+ {GLOBAL_ARRAY})"
        )
    for name, entry in arrays.items():
        where = f"{path}: arrays.{name}"
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
            raise IndexFormatError(f"{where}: expected {{dtype, shape}}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape
        ):
            raise IndexFormatError(f"{where}.shape: expected a list of sizes, got {shape!r}")
    structures = header.get("structures")
    if structures is None:
        return {}
    if not isinstance(structures, dict):
        raise IndexFormatError(
            f"{path}: structures: expected a JSON object, got {type(structures).__name__}"
        )
    for name, entry in structures.items():
        if name not in STRUCTURES:
            raise IndexFormatError(
                f"{path}: unknown search structure {name!r}; known {sorted(STRUCTURES)}"
            )
        structure_type(name, entry).check_header(entry, f"{path}: structures.{name}")
    return structures


def read_generation(directory: str | os.PathLike) -> int | None:
    """The generation of the index at `directory` (0 for an index saved before it was
    recorded), or None while there is no loadable one there: absent, not an index (yet),
    between the two renames of a writer's swap, or an index.json that is unreadable or
    malformed (`Index.load` says why). Cheap (reads index.json only) and never raises:
    for polling (hot reload).
    """
    path = Path(directory) / HEADER
    try:
        header = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    generation = header.get("generation", 0)
    if type(generation) is not int or generation < 0:
        return None
    return generation
