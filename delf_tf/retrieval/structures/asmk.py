"""The ASMK* ranking's structure: header "asmk", folder `asmk/` (`delf_tf.retrieval.asmk`).

A codebook and an inverted file of binarised aggregated residuals. Appending
images assigns them to the existing codebook (no retraining); another codebook
size than the present one retrains it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from delf_tf.retrieval.asmk import AsmkError, AsmkIndex, AsmkParameters
from delf_tf.retrieval.structures import base
from delf_tf.retrieval.structures.base import (
    BuildOptions,
    Collection,
    IndexFormatError,
    Ranking,
    SearchStructure,
)

if TYPE_CHECKING:
    from delf_tf.config import RetrievalConfig
    from delf_tf.features.local_features import LocalFeatures

ASMK_FOLDER = "asmk"


class AsmkStructure(SearchStructure):
    """ASMK* over every database image (value: an `AsmkIndex`)."""

    name = "asmk"
    covers = "num_images"

    @classmethod
    def check_header(cls, header: Any, where: str) -> None:
        super().check_header(header, where)
        base.relative_name(header.get("folder", ASMK_FOLDER), f"{where}.folder")
        base.parameters(AsmkParameters, header, where)
        shapes = base.mapping(header, "shapes", where)
        for name, shape in shapes.items():
            if not isinstance(shape, list) or not all(
                isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape
            ):
                raise IndexFormatError(f"{where}.shapes.{name}: expected a list of sizes")
        base.count(header, "num_images", where)

    def files(self) -> list[str]:
        return [self.header.get("folder", ASMK_FOLDER)]

    # --- building ---------------------------------------------------------------------

    @classmethod
    def build(
        cls, collection: Collection, options: BuildOptions, notes: list[str]
    ) -> AsmkStructure:
        start = time.perf_counter()
        structure = AsmkIndex.build(
            collection.descriptors,
            np.asarray(collection.offsets),
            options.codebook_size,
            progress=options.progress,
        )
        seconds = round(time.perf_counter() - start, 1)
        images = max(collection.num_images, 1)
        notes.append(
            f"ASMK: {structure.codebook_size}-word codebook, "
            f"{structure.num_entries / images:.0f} words per image, "
            f"{structure.memory_bytes() / images:.0f} bytes per image (built in {seconds} s)"
        )
        return cls._made(collection, structure, {"build_seconds": seconds})

    def append(
        self, collection: Collection, options: BuildOptions, notes: list[str]
    ) -> tuple[AsmkStructure, str]:
        existing = self.header.get("parameters", {}).get("codebook_size")
        if options.codebook_size not in (None, existing):
            notes.append(
                f"ASMK: retraining the codebook ({existing} -> {options.codebook_size} words)"
            )
            return self.build(collection, options, notes), "retrained"
        if self.header.get("num_images") == collection.num_images:
            return self, "kept"
        structure = self.value if self.fresh else self._read(collection, mmap=False)
        before = structure.num_images
        structure = structure.extended(
            collection.descriptors, collection.offsets, progress=options.progress
        )
        notes.append(
            f"ASMK: indexed {collection.num_images - before} more images with the existing "
            f"{existing}-word codebook (no retraining)"
        )
        return self._made(collection, structure, {}), "extended"

    @classmethod
    def _made(
        cls, collection: Collection, structure: AsmkIndex, extra: dict[str, Any]
    ) -> AsmkStructure:
        header: dict[str, Any] = {
            "fingerprint": collection.fingerprint,
            "folder": ASMK_FOLDER,
            **extra,
            "parameters": structure.parameters.to_dict(),
            "num_images": structure.num_images,
            "bytes_per_image": round(structure.memory_bytes() / max(collection.num_images, 1), 1),
        }
        return cls(header, structure, fresh=True)

    # --- disk -------------------------------------------------------------------------

    def save(self, staging, source) -> None:
        if not self.fresh:
            return super().save(staging, source)
        folder = staging / self.header.get("folder", ASMK_FOLDER)
        self.header.update(self.value.save(folder, base.write_array, base.write_faiss))

    def load(self, collection: Collection, mmap: bool = True) -> AsmkIndex:
        """Arrays memory-mapped unless mmap=False; checked against the collection."""
        value = self._read(collection, mmap)
        if value.num_images != collection.num_images:
            raise IndexFormatError(
                f"{collection.path / self.header.get('folder', ASMK_FOLDER)}: ASMK covers "
                f"{value.num_images} images, the index has {collection.num_images}"
            )
        return value

    def _read(self, collection: Collection, mmap: bool) -> AsmkIndex:
        if collection.path is None:
            raise IndexFormatError("index has an asmk structure but no directory to read it from")
        name = self.header.get("folder", ASMK_FOLDER)
        folder = base.confined(collection.path, name, f"{collection.path}: structures.asmk.folder")
        try:
            value = AsmkIndex.load(folder, self.header, base.read_array, mmap=mmap)
        except IndexFormatError:
            raise  # names its file already
        except (ValueError, KeyError, TypeError) as error:
            raise IndexFormatError(f"{folder}: {error}") from error
        return value

    # --- search -----------------------------------------------------------------------

    def search(
        self, collection: Collection, query: LocalFeatures, config: RetrievalConfig
    ) -> Ranking:
        try:
            scores = self.value.scores(
                query.descriptors,
                config.asmk_alpha,
                config.asmk_threshold,
                config.asmk_query_assignments,
            )
        except AsmkError as error:
            where = collection.path / ASMK_FOLDER if collection.path else "ASMK"
            raise IndexFormatError(f"{where}: {error}") from error
        ids = np.argsort(-scores, kind="stable")
        ids = ids[scores[ids] > 0]
        return Ranking(ids.astype(np.int64), scores[ids])
