"""On-disk feature store: one `.npz` per image plus a manifest naming the extractor.

Layout:
  <root>/manifest.json          format version, extractor fingerprint and description
                                (and "formats" when not just npz)
  <root>/<relative path>.npz    LocalFeatures of image <relative path>
  <root>/<relative path>.delf   the same features in the reference format, with
  <root>/<relative path>.delg_global  its global descriptor when there is one
                                (written for the "delf" format, see FORMATS)
  <root>/failures.jsonl         the images the last `delf extract` could not extract

A file name whose store files would not fit in NAME_MAX (255 bytes) once a suffix
is added (an image name of 244 bytes or more) is stored under a shortened name,
`<first bytes>~<32 hex digits of its SHA-256>`, with `<that name>.key` beside it
holding the full name, so `key in store`, `load(key)` and `stored_keys()` agree.
The limit is fixed (not read from the file system) so a copied store reads the same.

Writes are atomic (temporary file + rename, see delf_tf.atomic), so an interrupted
extraction leaves only complete files and resumes by skipping the keys that exist;
the manifest's random "store_id" names the store in an index (see `identity`).

A remote root (gs://, read and written with tf.io.gfile; TensorFlow is imported only
then) holds `.npz` files only: `prepare_store` makes or checks its manifest (the same
`new_manifest`, store_id included) and `StoreWriter` writes its files, for the Beam
pipeline, whose workers write where the driver cannot.

A folder without manifest.json that holds `.delf` / `.delg_local` files (the
reference extractor's output, optionally with `.delg_global` beside them) opens
as a store whose fingerprint is None: nothing records which extractor wrote the
files, so nothing can check that they match another store, an index or a model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import stat
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from delf_tf.atomic import (
    DEFAULT_NAME_MAX,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    clean_stale_tree,
    fitted_name,
    is_remote,
)
from delf_tf.config import PER_HOST_FIELDS
from delf_tf.errors import FingerprintMismatchError, InputError
from delf_tf.features import fingerprint as fingerprints
from delf_tf.features.delf_io import local_features_from_delf, local_features_to_delf
from delf_tf.features.local_features import (
    FALLBACK_MAX_DIM,
    FALLBACK_MAX_FEATURES,
    FeatureFileError,
    LocalFeatures,
)
from delf_tf.formats import delf_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUFFIX = ".npz"
FORMATS = ("npz", "delf")  # what `save` writes: our .npz, the reference's .delf (+ .delg_global)
DELF_SUFFIXES = (".delf", ".delg_local")  # read in this order; written: .delf
GLOBAL_SUFFIX = ".delg_global"
KEY_SUFFIX = ".key"  # beside a shortened file name: the full key
FAILURES = "failures.jsonl"
# Store file names are at most NAME_MAX bytes with the longest suffix added.
_NAME_LIMIT = DEFAULT_NAME_MAX - max(
    len(suffix) for suffix in (SUFFIX, *DELF_SUFFIXES, GLOBAL_SUFFIX, KEY_SUFFIX)
)
_SHORTENED = re.compile(r".*~[0-9a-f]{32}", re.DOTALL)
_warned_roots: set[str] = set()


class StoreMismatchError(FingerprintMismatchError):
    """The store holds features of another extractor (different fingerprint)."""


class FeatureStore:
    """Features of many images, keyed by the image path relative to the image root."""

    def __init__(
        self,
        root: str | os.PathLike,
        manifest: dict[str, Any],
        formats: tuple[str, ...] | list[str] | None = None,
    ):
        """`formats`: which files `save` writes, a non-empty subset of FORMATS;
        default: the manifest's "formats", else ("npz",). Reading uses the .npz
        when "npz" is among them, else the .delf files."""
        self.root = Path(root)
        self.manifest = manifest
        formats = tuple(formats or manifest.get("formats") or ("npz",))
        if not set(formats) <= set(FORMATS) or len(set(formats)) != len(formats):
            raise InputError(f"{root}: feature formats {list(formats)}, expected some of {FORMATS}")
        self.formats = formats

    @property
    def fingerprint(self) -> str | None:
        """The extractor's fingerprint; None for a folder of reference `.delf` files."""
        return self.manifest.get("fingerprint")

    @property
    def identity(self) -> str:
        """What names this store in an index: the manifest's "store_id" (random, given at
        creation, kept by a copy of the store), else (older stores, folders of .delf
        files) "path:" + the resolved root."""
        return self.manifest.get("store_id") or f"path:{self.root.resolve()}"

    @classmethod
    def open(cls, root: str | os.PathLike, formats: tuple[str, ...] | None = None) -> FeatureStore:
        """Opens a store; a folder of reference `.delf` files without manifest opens
        with fingerprint None (and a warning)."""
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise InputError(f"{root}: no such directory (not a feature store)")
        try:
            data = path.read_bytes()
        except FileNotFoundError as error:
            if _holds_delf_files(root):
                return cls._reference_files(root)
            raise InputError(f"{root}: not a feature store (no {MANIFEST})") from error
        except OSError as error:
            raise InputError(f"{path}: unreadable manifest ({error})") from error
        return cls(root, _parse_manifest(path, data), formats)

    @classmethod
    def _reference_files(cls, root: Path) -> FeatureStore:
        if str(root.resolve()) not in _warned_roots:
            _warned_roots.add(str(root.resolve()))
            logging.warning(
                "%s: reference .delf files without %s: no extractor fingerprint, so nothing "
                "checks that they match the model or index they are used with",
                root,
                MANIFEST,
            )
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": None,
            "extractor": {"source": "reference .delf / .delg_local files"},
            "formats": ["delf"],
        }
        return cls(root, manifest)

    @classmethod
    def open_or_create(
        cls,
        root: str | os.PathLike,
        fingerprint: str,
        description: dict[str, Any],
        formats: tuple[str, ...] | None = None,
        overwrite: bool = False,
    ) -> FeatureStore:
        """Opens the store at `root` if it was made by the same extractor with the same
        extraction settings, else creates it.

        `formats` (see __init__) is recorded in a new manifest when not ("npz",);
        None keeps an existing store's formats.
        overwrite: an existing store's features are deleted (then its manifest is
          replaced), so every image is extracted again with these settings.
        Raises StoreMismatchError when `root` holds features of another extractor or
        of other extraction settings (naming the fields), unless `overwrite`.
        """
        root = Path(root)
        if (root / MANIFEST).exists():
            if not overwrite:
                return cls._open_same(root, fingerprint, description, formats)
            cls.open(root, formats).delete_features()
            replace = True
        else:
            replace = False
        manifest = new_manifest(fingerprint, description, formats)
        store = cls(root, manifest, formats)  # validates formats before anything is written
        root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        try:  # exclusive: of two creators starting together, one makes the store
            atomic_write_text(root / MANIFEST, text, exclusive=not replace)
        except FileExistsError:
            return cls._open_same(root, fingerprint, description, formats)
        return store

    @classmethod
    def _open_same(
        cls,
        root: Path,
        fingerprint: str,
        description: dict[str, Any],
        formats: tuple[str, ...] | None,
    ) -> FeatureStore:
        """The existing store at `root`; StoreMismatchError unless it was made by the same
        extractor with the same settings."""
        store = cls.open(root, formats)
        check_same_extractor(root, store.manifest, fingerprint, description)
        clean_stale_tree(root)  # temporaries of a killed earlier writer
        return store

    def bounds(self) -> tuple[int | None, int | None, int | None]:
        """(max features, descriptor dimension, global descriptor dimension) of one
        image from the manifest's extractor settings; None where it does not say (then
        `LocalFeatures.load`'s fallbacks apply)."""
        extractor = self.manifest.get("extractor") or {}
        config = extractor.get("extraction_config")
        values = (
            config.get("max_features") if isinstance(config, dict) else None,
            extractor.get("descriptor_dim"),
            extractor.get("global_dim"),
        )
        return tuple(value if _positive_int(value) else None for value in values)

    def _stem(self, key: str) -> str:
        return _stem(key)

    def _key_of(self, stem: str) -> str:
        """The key of a store path without suffix (the inverse of `_stem`)."""
        if _SHORTENED.fullmatch(stem.rpartition("/")[2]):
            try:
                key = os.fsdecode((self.root / (stem + KEY_SUFFIX)).read_bytes())
            except OSError:
                return stem
            if self._stem(key) == stem:
                return key
        return stem

    def _delf_path(self, key: str) -> Path:
        """The existing .delf or .delg_local file of `key`, else where .delf goes."""
        stem = self._stem(key)
        for suffix in DELF_SUFFIXES:
            candidate = self.root / (stem + suffix)
            if candidate.is_file():
                return candidate
        return self.root / (stem + DELF_SUFFIXES[0])

    def path(self, key: str) -> Path:
        """The file `load` reads: the .npz when "npz" is a format, else the .delf."""
        if "npz" in self.formats:
            return self.root / (self._stem(key) + SUFFIX)
        return self._delf_path(key)

    def __contains__(self, key: str) -> bool:
        if "npz" in self.formats and not self.path(key).is_file():
            return False
        return "delf" not in self.formats or self._delf_path(key).is_file()

    def save(self, key: str, features: LocalFeatures) -> None:
        """Writes the features in every format, each file atomically (the .npz last;
        first the .key file of a shortened name)."""
        stem = self._stem(key)
        if stem != key:
            atomic_write(self.root / (stem + KEY_SUFFIX), lambda h: h.write(os.fsencode(key)))
        if "delf" in self.formats:
            local_features_to_delf(features, self.root / (stem + DELF_SUFFIXES[0]))
            global_path = self.root / (stem + GLOBAL_SUFFIX)
            if features.global_descriptor is not None:
                delf_file.write_global_descriptor(global_path, features.global_descriptor)
            else:
                global_path.unlink(missing_ok=True)  # no stale descriptor of an older save
        if "npz" in self.formats:
            atomic_write(self.root / (stem + SUFFIX), features.save)

    def load(self, key: str) -> LocalFeatures:
        """LocalFeatures of `key`; from .delf files with the .delg_global attached if any."""
        if "npz" in self.formats:
            return LocalFeatures.load(self.path(key), *self.bounds())
        # .delf files: the file size bounds what parsing it costs; checked before reading.
        count, dim, global_dim = self.bounds()
        count, dim = count or FALLBACK_MAX_FEATURES, dim or FALLBACK_MAX_DIM
        path = self._delf_path(key)
        _check_feature_file(path, _DELF_SLACK + count * (dim + 8) * 4 * 2)
        features = local_features_from_delf(path)
        global_path = self.root / (self._stem(key) + GLOBAL_SUFFIX)
        if global_path.is_file():
            _check_feature_file(global_path, _DELF_SLACK + 8 * (global_dim or FALLBACK_MAX_DIM))
            descriptor = delf_file.read_global_descriptor(global_path)
            features = dataclasses.replace(features, global_descriptor=descriptor)
        for name, array in features.arrays().items():
            if not np.all(np.isfinite(array)):
                raise FeatureFileError(f"{path}: {name} holds NaN or infinite values")
        return features

    def delete_features(self) -> None:
        """Deletes every feature file (and failures.jsonl); the manifest stays until a new
        one replaces it, so a crash leaves old features under their own manifest."""
        suffixes = (SUFFIX, *DELF_SUFFIXES, GLOBAL_SUFFIX, KEY_SUFFIX)
        for path in sorted(self.root.rglob("*"), reverse=True):
            if path.is_file() and path.name.endswith(suffixes):
                path.unlink()
        (self.root / FAILURES).unlink(missing_ok=True)

    def stored_keys(self) -> Iterator[str]:
        """Keys of all stored images, sorted (dot-named images included: temporary files
        never end in a store suffix, see delf_tf.atomic). Entries with a store suffix
        that are not regular files (a fifo, a dangling link, an empty folder) are keys
        too: `load` refuses them with a one-line FeatureFileError rather than letting
        them vanish silently."""
        suffixes = (SUFFIX,) if "npz" in self.formats else DELF_SUFFIXES
        keys = set()
        for suffix in suffixes:
            for path in self.root.rglob("*" + suffix):
                if path.is_file() or _misplaced(path):
                    keys.add(self._key_of(path.relative_to(self.root).as_posix()[: -len(suffix)]))
        yield from sorted(keys)


def settings_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the extraction settings (`extraction_config` fields of two extractor
    descriptions) that differ, as "field recorded -> wanted"; [] when either has none.
    Fields chosen per host (`delf_tf.config.PER_HOST_FIELDS`: precision) never differ."""
    old, new = recorded.get("extraction_config"), wanted.get("extraction_config")
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    names = sorted((set(old) | set(new)) - set(PER_HOST_FIELDS))  # precision: the host's
    return [
        f"{name} {old.get(name)!r} -> {new.get(name)!r}"
        for name in names
        if old.get(name) != new.get(name)
    ]


def check_same_extractor(
    root: str | os.PathLike, manifest: dict[str, Any], fingerprint: str, description: dict
) -> None:
    """Raises StoreMismatchError when the store whose manifest this is holds features of
    another extractor or of other extraction settings (a run must not mix them)."""
    _require_extractor(root, manifest.get("fingerprint"), fingerprint)
    differences = settings_differences(manifest.get("extractor") or {}, description)
    if differences:
        raise StoreMismatchError(
            f"{root}: holds features extracted with other settings ({'; '.join(differences)}); "
            "use another --output_dir, or --overwrite to extract every image again"
        )


def _holds_delf_files(root: Path) -> bool:
    """Whether `root` (recursively) holds a .delf or .delg_local file."""
    if not root.is_dir():
        return False
    return any(path.suffix in DELF_SUFFIXES and path.is_file() for path in root.rglob("*"))


_DELF_SLACK = 1 << 16  # protobuf framing and the header fields of a .delf file


def _check_feature_file(path: Path, limit: int) -> None:
    """FeatureFileError unless `path` is a regular file of at most `limit` bytes."""
    try:
        status = os.stat(path)
    except OSError as error:
        raise FeatureFileError(f"{path}: cannot read ({error.strerror})") from error
    if not stat.S_ISREG(status.st_mode):
        raise FeatureFileError(f"{path}: not a regular file")
    if status.st_size > limit:
        raise FeatureFileError(
            f"{path}: {status.st_size} bytes, more than the store's max_features x "
            f"descriptor dimension allow ({limit})"
        )


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _misplaced(path: Path) -> bool:
    """An entry with a store suffix that is no feature file: not a regular file and not
    a folder of images' features (a folder named *.npz that holds none)."""
    if not path.is_dir():
        return True  # a fifo, socket, device or dangling link
    try:
        return not any(path.iterdir())
    except OSError:
        return True


# field -> (allowed JSON types, what the message says)
_MANIFEST_FIELDS = {
    "format_version": ((int,), "an integer"),
    "fingerprint": ((str, type(None)), "a string"),
    "extractor": ((dict,), "an object"),
    "store_id": ((str,), "a string"),
    "formats": ((list,), "a list"),
}


def check_manifest(path: Path | str, manifest: object) -> None:
    """InputError (one line) unless `manifest` is a JSON object whose known fields have
    their types: a tampered manifest must not reach code that trusts it."""
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    for name, (types, text) in _MANIFEST_FIELDS.items():
        if name in manifest and not isinstance(manifest[name], types):
            raise InputError(f"{path}: {name!r} must be {text}, got {manifest[name]!r:.40}")
    formats = manifest.get("formats") or []
    if not all(isinstance(item, str) for item in formats):
        raise InputError(f"{path}: 'formats' must be a list of strings")


def _stem(key: str) -> str:
    """The store path of `key` without suffix: the key, its file name shortened
    when too long (see the module docstring)."""
    folder, slash, name = key.rpartition("/")
    return folder + slash + fitted_name(name, _NAME_LIMIT)


def new_manifest(
    fingerprint: str | None, description: dict[str, Any], formats: Sequence[str] | None = None
) -> dict[str, Any]:
    """The manifest of a new store: format version, fingerprint, extractor, a random
    store_id, and "formats" when not just npz."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "extractor": description,
        "store_id": uuid.uuid4().hex,
    }
    if formats and tuple(formats) != ("npz",):
        manifest["formats"] = list(formats)
    return manifest


def _parse_manifest(path: str | os.PathLike, data: bytes) -> dict[str, Any]:
    """A manifest's bytes -> dict; InputError when unreadable or of another format version."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError as error:  # UTF-8, JSON, an integer too long to convert
        raise InputError(f"{path}: unreadable manifest ({error})") from error
    check_manifest(path, manifest)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{path}: format_version {manifest.get('format_version')!r}, "
            f"this version of delf-tf reads {FORMAT_VERSION}"
        )
    return manifest


def _require_extractor(root: str | os.PathLike, found: str | None, expected: str | None) -> None:
    """StoreMismatchError when the store at `root` holds another extractor's features."""
    fingerprints.require_same(
        found,
        expected,
        lambda found, expected: (
            f"{root}: holds features of extractor {found}, not of this one ({expected}); "
            "use another --output_dir, or --overwrite to replace them"
        ),
        StoreMismatchError,
    )


def prepare_store(
    root: str,
    fingerprint: str,
    description: dict[str, Any],
    formats: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Opens or creates the store at a local or remote (gs://) root for writing.

    Local roots are `FeatureStore.open_or_create`; a remote root holds `.npz` files
    only and its manifest (the same `new_manifest`) is read and written with
    tf.io.gfile (TensorFlow is imported only then). Returns the formats written
    (None: the store's own, else npz). Raises StoreMismatchError for a store of
    another extractor, InputError for a remote store asked for other formats.
    """
    formats = tuple(formats) if formats else None
    if not is_remote(root):
        return FeatureStore.open_or_create(root, fingerprint, description, formats).formats
    import tensorflow as tf

    if formats and formats != ("npz",):
        raise InputError(f"{root}: a remote store holds npz files only, not {list(formats)}")
    path = f"{root.rstrip('/')}/{MANIFEST}"
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, "rb") as handle:
            manifest = _parse_manifest(path, handle.read())
        if tuple(manifest.get("formats") or ("npz",)) != ("npz",):
            raise InputError(f"{path}: a remote store holds npz files only")
        check_same_extractor(root, manifest, fingerprint, description)
        return ("npz",)
    manifest = new_manifest(fingerprint, description)
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return ("npz",)


class StoreWriter:
    """Membership and writes of a feature store at a local or remote root (Beam workers).

    Local stores are a FeatureStore (its `formats`, default the manifest's; its
    atomic writes); remote stores (gs://...) hold `.npz` files only, named as a
    local store names them, written with `atomic_write_bytes` (tf.io.gfile).
    """

    def __init__(self, root: str, formats: Sequence[str] | None = None):
        self.root = str(root).rstrip("/")
        formats = tuple(formats) if formats else None
        self._local = None if is_remote(self.root) else FeatureStore.open(self.root, formats)

    def _npz(self, key: str) -> str:
        return f"{self.root}/{_stem(key)}{SUFFIX}"

    def __contains__(self, key: str) -> bool:
        if self._local is not None:
            return key in self._local
        import tensorflow as tf

        return tf.io.gfile.exists(self._npz(key))

    def save(self, key: str, features: LocalFeatures) -> None:
        if self._local is not None:
            self._local.save(key, features)
            return
        if _stem(key) != key:
            atomic_write_bytes(f"{self.root}/{_stem(key)}{KEY_SUFFIX}", os.fsencode(key))
        buffer = io.BytesIO()
        features.save(buffer)
        atomic_write_bytes(self._npz(key), buffer.getvalue())
