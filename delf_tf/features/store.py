"""On-disk feature store: one `.npz` per image plus a manifest naming the extractor.

Layout:
  <root>/manifest.json          format version, extractor fingerprint and description
  <root>/<relative path>.npz    LocalFeatures of image <relative path>

Writes are atomic (temporary file + rename), so an interrupted extraction leaves
only complete files and resumes by skipping the keys that exist.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from delf_tf.atomic import atomic_write, atomic_write_text
from delf_tf.errors import FingerprintMismatchError, InputError
from delf_tf.features.local_features import LocalFeatures

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUFFIX = ".npz"


class StoreMismatchError(FingerprintMismatchError):
    """The store holds features of another extractor (different fingerprint)."""


class FeatureStore:
    """Features of many images, keyed by the image path relative to the image root."""

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @classmethod
    def open(cls, root: str | os.PathLike) -> FeatureStore:
        root = Path(root)
        path = root / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise InputError(f"{root}: not a feature store (no {MANIFEST})") from error
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"{path}: unreadable manifest ({error})") from error
        if manifest.get("format_version") != FORMAT_VERSION:
            raise InputError(
                f"{path}: format_version {manifest.get('format_version')!r}, "
                f"this version of delf-tf reads {FORMAT_VERSION}"
            )
        return cls(root, manifest)

    @classmethod
    def open_or_create(
        cls, root: str | os.PathLike, fingerprint: str, description: dict[str, Any]
    ) -> FeatureStore:
        """Opens the store at `root` if it was made by the same extractor, else creates it.

        Raises StoreMismatchError when `root` holds features of another extractor.
        """
        root = Path(root)
        if (root / MANIFEST).exists():
            store = cls.open(root)
            if store.fingerprint != fingerprint:
                raise StoreMismatchError(
                    f"{root}: holds features of extractor {store.fingerprint[:12]}, "
                    f"not of this one ({fingerprint[:12]}); use another --output directory"
                )
            return store
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "extractor": description,
        }
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return cls(root, manifest)

    def path(self, key: str) -> Path:
        return self.root / (key + SUFFIX)

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def save(self, key: str, features: LocalFeatures) -> None:
        atomic_write(self.path(key), features.save)

    def load(self, key: str) -> LocalFeatures:
        return LocalFeatures.load(self.path(key))

    def stored_keys(self) -> Iterator[str]:
        """Keys of all stored images, sorted."""
        for path in sorted(self.root.rglob("*" + SUFFIX)):
            if not path.name.startswith("."):
                yield path.relative_to(self.root).as_posix()[: -len(SUFFIX)]
