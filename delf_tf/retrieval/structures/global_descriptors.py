"""The global ranking's structure: header "global", file `global.faiss` when IVF.

Exact ranking (kind "flat") scans the index's global_descriptors.npy and owns no
file; from `BuildOptions.global_ivf_min_images` images on, a FAISS IVF-Flat
structure (inner product) is trained once, saved, memory-mapped on load and grown
without retraining (`delf_tf.retrieval.global_ranking`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from delf_tf.errors import InputError
from delf_tf.retrieval.global_ranking import IVF_FILE, GlobalIvfParameters, GlobalRanker
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

KINDS = ("flat", "ivf")


class GlobalStructure(SearchStructure):
    """Inner-product ranking over the global descriptors (value: a `GlobalRanker`)."""

    name = "global"
    covers = "num_images"

    @classmethod
    def check_header(cls, header: Any, where: str) -> None:
        super().check_header(header, where)
        kind = header.get("kind", "flat")
        if kind not in KINDS:
            raise IndexFormatError(f"{where}.kind: unknown back end {kind!r}; known {KINDS}")
        if kind == "ivf":
            base.relative_name(header.get("file"), f"{where}.file")
            base.parameters(GlobalIvfParameters, header, where)

    def files(self) -> list[str]:
        return [self.header["file"]] if self.header.get("kind") == "ivf" else []

    # --- building ---------------------------------------------------------------------

    @classmethod
    def build(
        cls, collection: Collection, options: BuildOptions, notes: list[str]
    ) -> GlobalStructure:
        ranker = GlobalRanker.build(collection.global_descriptors, options.global_ivf_min_images)
        if ranker.structure is not None:
            notes.append(f"global IVF: trained {ranker.parameters.nlist} cells")
        return cls._made(collection, ranker)

    def append(
        self, collection: Collection, options: BuildOptions, notes: list[str]
    ) -> tuple[GlobalStructure, str]:
        if collection.num_images < options.global_ivf_min_images:
            return self._made(collection, GlobalRanker(collection.global_descriptors)), "built"
        if self.header.get("kind") != "ivf":
            return self.build(collection, options, notes), "built"
        ranker = self.value if self.fresh else self._read(collection, mmap=False)
        added = ranker.add(collection.global_descriptors)
        notes.append(f"global IVF: added {added} images (no retraining)")
        return self._made(collection, ranker), "extended"

    @classmethod
    def _made(cls, collection: Collection, ranker: GlobalRanker) -> GlobalStructure:
        header: dict[str, Any] = {
            "fingerprint": collection.fingerprint,
            "num_images": collection.num_images,
            "dim": int(collection.global_descriptors.shape[1]),
            "kind": ranker.kind,
        }
        if ranker.parameters is not None:
            header["file"] = IVF_FILE
            header["parameters"] = ranker.parameters.to_dict()
        return cls(header, ranker, fresh=True)

    # --- disk -------------------------------------------------------------------------

    def save(self, staging, source) -> None:
        if not self.fresh:
            return super().save(staging, source)
        if self.value.structure is not None:
            base.write_faiss(staging / self.header["file"], self.value.structure)

    def load(self, collection: Collection, mmap: bool = True) -> GlobalRanker:
        """Exact over the (memory-mapped) global descriptors, or the IVF file read with
        IO_FLAG_MMAP | IO_FLAG_READ_ONLY (fully when mmap=False)."""
        ranker = self._read(collection, mmap)
        if ranker.structure is not None and int(ranker.structure.ntotal) != collection.num_images:
            raise IndexFormatError(
                f"{collection.path}: the global structure holds {ranker.structure.ntotal} "
                f"images, the index has {collection.num_images}"
            )
        return ranker

    def _read(self, collection: Collection, mmap: bool) -> GlobalRanker:
        descriptors = collection.global_descriptors
        if self.header.get("kind", "flat") == "flat":
            return GlobalRanker(descriptors)
        if collection.path is None:
            raise IndexFormatError("index has a global structure but no directory to read it from")
        where = f"{collection.path}: structures.global.file"
        file = base.confined(collection.path, self.header["file"], where)
        structure = base.read_faiss(file, writable=not mmap)
        if structure.d != descriptors.shape[1]:
            raise IndexFormatError(
                f"{file}: {structure.d}-D descriptors, the index has {descriptors.shape[1]}-D"
            )
        parameters = GlobalIvfParameters(**self.header["parameters"])
        return GlobalRanker(descriptors, structure, parameters, read_only=mmap)

    # --- search -----------------------------------------------------------------------

    def search(
        self, collection: Collection, query: LocalFeatures, config: RetrievalConfig
    ) -> Ranking:
        if query.global_descriptor is None:
            raise InputError(
                "the query has no global descriptor: ranking=global needs a model with a "
                "global head (DELG); use --ranking=votes or asmk"
            )
        ids, scores = self.value.rank(query.global_descriptor)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= collection.num_images):
            raise IndexFormatError(
                f"{collection.path or 'index'}: the global structure returned images outside "
                f"the index (0..{collection.num_images - 1}); rebuild it with `delf index`"
            )
        return Ranking(ids, np.asarray(scores, np.float64))
