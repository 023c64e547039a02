"""Retrieval ground truth: Oxford5k/Paris6k, Revisited Oxford/Paris and a generic JSON format.

Every loader returns a `RetrievalDataset`: the database image ids, the queries
(image id, optional box) and, per protocol setup, each query's positives and
junk. Image ids are file names without their suffix ("all_souls_000013").

Setups:
- Revisited Oxford/Paris (Radenovic et al., CVPR 2018): "easy" (positives easy,
  junk = junk + hard), "medium" (positives easy + hard, junk = junk), "hard"
  (positives hard, junk = junk + easy).
- Classic Oxford5k/Paris6k and JSON sets: one setup, "default" (classic:
  positives good + ok, junk = junk).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from delf_tf.errors import ConfigError, InputError
from delf_tf.evaluation.safe_pickle import safe_load
from delf_tf.images import exif_orientation, list_images, load_image

REVISITED_SETUPS: tuple[str, ...] = ("easy", "medium", "hard")
DEFAULT_SETUP = "default"
DATASET_KINDS: tuple[str, ...] = ("oxford5k", "paris6k", "roxford5k", "rparis6k", "json")
# Image folders looked for under a dataset directory, in this order.
IMAGE_DIR_NAMES: tuple[str, ...] = ("jpg", "images", "oxbuild_images")
JSON_GROUNDTRUTH = "groundtruth.json"

BBox = tuple[float, float, float, float]


class GroundTruthError(InputError):
    """A ground-truth file is malformed or names images that are not there."""


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """Relevance of the database images for one query in one setup (sets of image ids)."""

    positives: frozenset[str]
    junk: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Query:
    """One query.

    Attributes:
      name: the protocol's name of the query ("all_souls_1"; the image id for JSON sets).
      image_id: id of the query image.
      bbox: (x1, y1, x2, y2) float pixels of the query region, or None for the whole image.
      groundtruth: setup name -> GroundTruth.
    """

    name: str
    image_id: str
    bbox: BBox | None
    groundtruth: Mapping[str, GroundTruth]


@dataclasses.dataclass(frozen=True)
class RetrievalDataset:
    """Database, queries and ground truth of one retrieval benchmark.

    Attributes:
      name: "oxford5k", "roxford5k", the JSON file's "name", ...
      database: ids of the images to index (and rank), sorted as the protocol lists them.
      queries: the queries, in protocol order.
      setups: setup names, each present in every query's ground truth.
      image_paths: image id -> file, for every database and query image.
    """

    name: str
    database: tuple[str, ...]
    queries: tuple[Query, ...]
    setups: tuple[str, ...]
    image_paths: Mapping[str, Path]

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_paths", types.MappingProxyType(dict(self.image_paths)))
        database = set(self.database)
        if len(database) != len(self.database):
            raise GroundTruthError(f"{self.name}: duplicate ids in the database list")
        missing = sorted(database - set(self.image_paths))
        missing += sorted({q.image_id for q in self.queries} - set(self.image_paths))
        if missing:
            raise GroundTruthError(f"{self.name}: no image file for {_few(missing)}")
        for query in self.queries:
            if set(query.groundtruth) != set(self.setups):
                raise GroundTruthError(
                    f"{self.name}: query {query.name} has setups {sorted(query.groundtruth)}, "
                    f"expected {list(self.setups)}"
                )
            for setup, truth in query.groundtruth.items():
                outside = sorted((truth.positives | truth.junk) - database)
                if outside:
                    raise GroundTruthError(
                        f"{self.name}: query {query.name} ({setup}) names images that are "
                        f"not in the database: {_few(outside)}"
                    )

    def path(self, image_id: str) -> Path:
        """File of a database or query image."""
        try:
            return self.image_paths[image_id]
        except KeyError:
            raise KeyError(f"{self.name}: unknown image id {image_id!r}") from None

    def database_paths(self) -> list[tuple[str, Path]]:
        """(image id, file) of every database image: what the index must hold."""
        return [(image_id, self.image_paths[image_id]) for image_id in self.database]

    def query_image(self, query: Query) -> np.ndarray:
        """The query image as the protocol wants it extracted: uint8 [h, w, 3], cropped to its box."""
        path = self.path(query.image_id)
        image = load_image(path)
        if query.bbox is None:
            return image
        if _exif_orientation(path) not in (None, 1):
            logging.warning(
                "%s: EXIF orientation is applied before cropping; the box of query %s may "
                "refer to the stored (unrotated) pixels",
                path,
                query.name,
            )
        return crop_to_bbox(image, query.bbox)


def _exif_orientation(path: Path) -> int | None:
    try:
        with Image.open(path) as image:
            return exif_orientation(image)
    except (OSError, ValueError, SyntaxError):
        return None


def image_id_from_key(key: str | os.PathLike) -> str:
    """Dataset image id of a feature-store / index key ("jpg/all_souls_000013.jpg" -> stem)."""
    return Path(key).stem


def _few(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{shown}{more} ({len(items)} in all)"


def crop_to_bbox(image: np.ndarray, bbox: Iterable[float]) -> np.ndarray:
    """Crops uint8 [H, W, C] `image` to `bbox` (x1, y1, x2, y2) pixels, clipped to the image.

    Coordinates are rounded as Pillow's `Image.crop` rounds them (the reference
    code crops queries with it); x2 and y2 are exclusive. Raises ValueError if
    the box is not four finite numbers or is empty once clipped.
    """
    box = [float(v) for v in bbox]
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise InputError(f"bounding box must be four finite numbers (x1, y1, x2, y2), got {box}")
    if image.ndim < 2:
        raise ValueError(f"expected an image [H, W, C], got shape {image.shape}")
    height, width = image.shape[:2]
    x1, y1, x2, y2 = (round(v) for v in box)
    x1, x2 = max(0, x1), min(width, x2)
    y1, y2 = max(0, y1), min(height, y2)
    if x2 <= x1 or y2 <= y1:
        raise InputError(
            f"bounding box {tuple(box)} is empty inside the {width}x{height} image "
            f"(clipped to x {x1}..{x2}, y {y1}..{y2})"
        )
    return np.ascontiguousarray(image[y1:y2, x1:x2])


def revisited_setups(
    easy: Iterable[str], hard: Iterable[str], junk: Iterable[str]
) -> dict[str, GroundTruth]:
    """The three setups of the revisited protocol from a query's easy / hard / junk lists."""
    easy, hard, junk = frozenset(easy), frozenset(hard), frozenset(junk)
    return {
        "easy": GroundTruth(positives=easy, junk=junk | hard),
        "medium": GroundTruth(positives=easy | hard, junk=junk),
        "hard": GroundTruth(positives=hard, junk=junk | easy),
    }


def index_images(image_dir: str | os.PathLike) -> dict[str, Path]:
    """Image id (file name without suffix) -> path of every image under `image_dir` (recursive)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image folder not found")
    paths: dict[str, Path] = {}
    for path in list_images(image_dir):
        if path.stem in paths:
            raise GroundTruthError(
                f"{image_dir}: two images have the id {path.stem!r}: {paths[path.stem]} and {path}"
            )
        paths[path.stem] = path
    return paths


def _bbox(values: Any, where: str) -> BBox:
    try:
        box = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError) as error:
        raise GroundTruthError(f"{where}: bounding box is not numeric ({values!r})") from error
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise GroundTruthError(f"{where}: bounding box must be x1 y1 x2 y2, got {box}")
    return (box[0], box[1], box[2], box[3])


# --- Classic Oxford5k / Paris6k: the gt_files folder ---------------------------------


def _read_names(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise GroundTruthError(f"{path}: cannot read ({error.strerror})") from error
    return [line.strip() for line in text.splitlines() if line.strip()]


def _strip_query_prefix(name: str) -> str:
    # Oxford's query files name the image "oxc1_<image id>".
    return name[len("oxc1_") :] if name.startswith("oxc1_") else name


def load_classic(
    gt_dir: str | os.PathLike, image_dir: str | os.PathLike, name: str = "oxford5k"
) -> RetrievalDataset:
    """Oxford5k / Paris6k from the `gt_files` folder and the image folder.

    `gt_dir` holds, per query Q: `Q_query.txt` ("[oxc1_]<image id> x1 y1 x2 y2"),
    `Q_good.txt`, `Q_ok.txt`, `Q_junk.txt` (one image id a line). The database is
    every image under `image_dir`; positives are good + ok.
    """
    gt_dir = Path(gt_dir)
    query_files = sorted(gt_dir.glob("*_query.txt"))
    if not query_files:
        raise GroundTruthError(f"{gt_dir}: no *_query.txt files (expected Oxford's gt_files)")
    image_paths = index_images(image_dir)
    queries = []
    for query_file in query_files:
        query_name = query_file.name[: -len("_query.txt")]
        lines = _read_names(query_file)
        fields = lines[0].split() if lines else []
        if len(fields) != 5:
            raise GroundTruthError(f"{query_file}: expected '<image> x1 y1 x2 y2', got {lines[:1]}")
        bbox = _bbox(fields[1:], str(query_file))
        lists = {}
        for kind in ("good", "ok", "junk"):
            path = gt_dir / f"{query_name}_{kind}.txt"
            if not path.is_file():
                raise GroundTruthError(f"{path}: missing (every query needs good, ok and junk)")
            lists[kind] = frozenset(_read_names(path))
        truth = GroundTruth(positives=lists["good"] | lists["ok"], junk=lists["junk"])
        queries.append(
            Query(query_name, _strip_query_prefix(fields[0]), bbox, {DEFAULT_SETUP: truth})
        )
    return RetrievalDataset(
        name=name,
        database=tuple(sorted(image_paths)),
        queries=tuple(queries),
        setups=(DEFAULT_SETUP,),
        image_paths=image_paths,
    )


# --- Revisited Oxford / Paris: gnd_roxford5k.pkl or .mat ----------------------------------


def _indices(values: Any, where: str, size: int, one_based: bool) -> list[int]:
    array = np.atleast_1d(np.asarray(values if values is not None else [], dtype=np.float64))
    array = array.reshape(-1)
    if array.size and (not np.all(np.isfinite(array)) or np.any(array != np.round(array))):
        raise GroundTruthError(f"{where}: indices must be integers")
    indices = array.astype(np.int64) - (1 if one_based else 0)
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        raise GroundTruthError(f"{where}: index out of range for {size} database images")
    return indices.tolist()


def _names(values: Any, where: str) -> list[str]:
    items = np.atleast_1d(np.asarray(values, dtype=object)).reshape(-1)
    names = []
    for item in items:
        while isinstance(item, np.ndarray) and item.size == 1:  # MATLAB cells
            item = item.reshape(-1)[0]
        if isinstance(item, bytes):
            item = item.decode("utf-8")
        if not isinstance(item, str):
            raise GroundTruthError(f"{where}: image names must be strings, got {type(item)}")
        names.append(item)
    return names


def _field(entry: Any, key: str) -> Any:
    if isinstance(entry, Mapping):
        return entry.get(key)
    if isinstance(entry, np.void) and entry.dtype.names:  # scipy struct as record
        return entry[key] if key in entry.dtype.names else None
    return getattr(entry, key, None)  # scipy mat_struct


def _read_gnd_file(path: Path) -> tuple[dict[str, Any], bool]:
    """Returns (content, one_based): the .pkl is 0-based, the .mat 1-based."""
    if path.suffix == ".mat":
        import scipy.io

        try:
            content = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
        except (OSError, ValueError, NotImplementedError) as error:
            raise GroundTruthError(f"{path}: not a readable MATLAB file ({error})") from error
        return content, True
    content = safe_load(path)
    if not isinstance(content, dict):
        raise GroundTruthError(f"{path}: expected a dict, got {type(content).__name__}")
    return content, False


def load_revisited(
    gnd_path: str | os.PathLike, image_dir: str | os.PathLike, name: str | None = None
) -> RetrievalDataset:
    """Revisited Oxford/Paris from `gnd_roxford5k.pkl` / `gnd_rparis6k.pkl` (or their `.mat`).

    The file holds `imlist` (database ids), `qimlist` (query ids) and `gnd`, one
    entry per query with `bbx` and the `easy` / `hard` / `junk` indices into
    `imlist`. The pickle is read with a restricted unpickler (no code runs). A
    classic file (`gnd_oxford5k.pkl`: `qidx` and `ok` / `junk` lists) gives the
    single "default" setup.
    """
    gnd_path = Path(gnd_path)
    content, one_based = _read_gnd_file(gnd_path)
    where = str(gnd_path)
    if _field(content, "imlist") is None or _field(content, "gnd") is None:
        raise GroundTruthError(f"{where}: expected keys 'imlist' and 'gnd'")
    imlist = _names(content["imlist"], f"{where}: imlist")
    entries = list(np.atleast_1d(np.asarray(content["gnd"], dtype=object)).reshape(-1))
    if _field(content, "qimlist") is not None:
        qimlist = _names(content["qimlist"], f"{where}: qimlist")
    elif _field(content, "qidx") is not None:
        qidx = _indices(content["qidx"], f"{where}: qidx", len(imlist), one_based)
        qimlist = [imlist[i] for i in qidx]
    else:
        raise GroundTruthError(f"{where}: expected 'qimlist' (revisited) or 'qidx' (classic)")
    if len(qimlist) != len(entries):
        raise GroundTruthError(f"{where}: {len(qimlist)} queries but {len(entries)} gnd entries")
    revisited = _field(entries[0], "easy") is not None if entries else True
    queries = []
    for number, (query_id, entry) in enumerate(zip(qimlist, entries, strict=True)):
        at = f"{where}: gnd[{number}]"

        def ids(key: str, entry: Any = entry, at: str = at) -> list[str]:
            return [
                imlist[i]
                for i in _indices(_field(entry, key), f"{at}.{key}", len(imlist), one_based)
            ]

        bbx = _field(entry, "bbx")
        bbox = None if bbx is None or np.size(bbx) == 0 else _bbox(bbx, f"{at}.bbx")
        if revisited:
            truth = revisited_setups(ids("easy"), ids("hard"), ids("junk"))
        else:
            truth = {DEFAULT_SETUP: GroundTruth(frozenset(ids("ok")), frozenset(ids("junk")))}
        queries.append(Query(query_id, query_id, bbox, truth))
    image_paths = index_images(image_dir)
    wanted = set(imlist) | set(qimlist)
    return RetrievalDataset(
        name=name or gnd_path.stem.removeprefix("gnd_"),
        database=tuple(imlist),
        queries=tuple(queries),
        setups=REVISITED_SETUPS if revisited else (DEFAULT_SETUP,),
        image_paths={k: v for k, v in image_paths.items() if k in wanted},
    )


# --- Generic JSON: {"labels": {image id: landmark or null}, "queries": [...]} -------------


def load_json(
    path: str | os.PathLike, image_dir: str | os.PathLike | None = None
) -> RetrievalDataset:
    """A custom set in the JSON format of `landmarks-dev/groundtruth.json`.

    Fields: "labels" maps every image id to a landmark name or null (a
    distractor); "queries" lists query image ids (or objects {"id": ..., "bbox":
    [x1, y1, x2, y2]}); "name" is optional. Each query is ranked against all
    other images: positives are the other images of its landmark and the query
    image itself is junk (ignored if the engine returns it). Images are looked
    up under `image_dir` (default: `images/` beside the file).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise GroundTruthError(f"{path}: cannot read ({error.strerror})") from error
    except json.JSONDecodeError as error:
        raise GroundTruthError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise GroundTruthError(f"{path}: expected a JSON object")
    labels = data.get("labels")
    if not isinstance(labels, dict) or not all(
        isinstance(v, str) or v is None for v in labels.values()
    ):
        raise GroundTruthError(f"{path}: 'labels' must map image ids to a landmark name or null")
    raw_queries = data.get("queries")
    if not isinstance(raw_queries, list) or not raw_queries:
        raise GroundTruthError(f"{path}: 'queries' must be a non-empty list")
    by_landmark: dict[str, set[str]] = {}
    for image_id, landmark in labels.items():
        if landmark is not None:
            by_landmark.setdefault(landmark, set()).add(image_id)
    queries = []
    for number, item in enumerate(raw_queries):
        where = f"{path}: queries[{number}]"
        if isinstance(item, dict):
            query_id, bbox = item.get("id"), item.get("bbox")
            bbox = None if bbox is None else _bbox(bbox, where)
        else:
            query_id, bbox = item, None
        if not isinstance(query_id, str) or query_id not in labels:
            raise GroundTruthError(f"{where}: {query_id!r} is not an image id in 'labels'")
        landmark = labels[query_id]
        if landmark is None:
            raise GroundTruthError(f"{where}: {query_id!r} is a distractor (label null)")
        positives = frozenset(by_landmark[landmark] - {query_id})
        truth = GroundTruth(positives=positives, junk=frozenset({query_id}))
        queries.append(Query(query_id, query_id, bbox, {DEFAULT_SETUP: truth}))
    image_paths = index_images(image_dir if image_dir is not None else path.parent / "images")
    return RetrievalDataset(
        name=str(data.get("name") or path.stem),
        database=tuple(sorted(labels)),
        queries=tuple(queries),
        setups=(DEFAULT_SETUP,),
        image_paths={k: v for k, v in image_paths.items() if k in labels},
    )


# --- One entry point for the command ------------------------------------------------------


def _default_image_dir(dataset_dir: Path) -> Path:
    for name in IMAGE_DIR_NAMES:
        if (dataset_dir / name).is_dir():
            return dataset_dir / name
    return dataset_dir


def _classic_gt_dir(dataset_dir: Path) -> Path:
    if any(dataset_dir.glob("*_query.txt")):
        return dataset_dir
    for candidate in sorted(dataset_dir.glob("gt_files*")):
        if candidate.is_dir() and any(candidate.glob("*_query.txt")):
            return candidate
    raise GroundTruthError(
        f"{dataset_dir}: no ground truth found (expected gt_files*/ with *_query.txt, "
        "or gnd_<name>.pkl / .mat)"
    )


def load_dataset(
    kind: str,
    dataset_dir: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    groundtruth: str | os.PathLike | None = None,
) -> RetrievalDataset:
    """Loads a benchmark by kind, finding its files under `dataset_dir`.

    Args:
      kind: one of DATASET_KINDS.
      dataset_dir: the dataset folder (for "json", the folder or the JSON file).
      image_dir: image folder; default `jpg/`, `images/` or `oxbuild_images/` under
        `dataset_dir`, else `dataset_dir` itself.
      groundtruth: ground-truth file or folder; default: `gnd_<kind>.pkl` or `.mat`
        (revisited and classic), the `gt_files*` folder (classic), `groundtruth.json`.
    """
    if kind not in DATASET_KINDS:
        raise ConfigError(f"unknown dataset kind {kind!r}; expected one of {DATASET_KINDS}")
    dataset_dir = Path(dataset_dir)
    if kind == "json":
        json_path = Path(groundtruth) if groundtruth else dataset_dir
        if json_path.is_dir():
            json_path = json_path / JSON_GROUNDTRUTH
        return load_json(json_path, image_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"{dataset_dir}: dataset folder not found")
    images = Path(image_dir) if image_dir else _default_image_dir(dataset_dir)
    if groundtruth is None:
        for suffix in (".pkl", ".mat"):
            candidate = dataset_dir / f"gnd_{kind}{suffix}"
            if candidate.is_file():
                groundtruth = candidate
                break
    if groundtruth is not None and Path(groundtruth).is_file():
        return load_revisited(groundtruth, images, name=kind)
    if kind in ("roxford5k", "rparis6k"):
        raise GroundTruthError(f"{dataset_dir}: gnd_{kind}.pkl (or .mat) not found")
    gt_dir = Path(groundtruth) if groundtruth else _classic_gt_dir(dataset_dir)
    return load_classic(gt_dir, images, name=kind)
