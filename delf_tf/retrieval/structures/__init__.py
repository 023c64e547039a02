"""The search structures of an index, one module each (see `base.SearchStructure`).

  votes.py               "neighbors": the votes ranking's k-NN structure (neighbors.faiss)
  asmk.py                "asmk": ASMK* codebook and inverted file (asmk/)
  global_descriptors.py  "global": the global ranking, exact or IVF (global.faiss)
  milvus.py              "neighbors" / "global" with backend "milvus": Milvus collections

`STRUCTURES` maps the names index.json records under "structures" to their FAISS
class; `structure_type` picks the class of one header (a Milvus header names the
same ranking) and `class_for` the class `delf index --backend` asks for.
"""

from __future__ import annotations

from delf_tf.retrieval.structures.asmk import AsmkStructure
from delf_tf.retrieval.structures.base import (
    BuildOptions,
    IndexChangedError,
    IndexFormatError,
    Ranking,
    SearchStructure,
)
from delf_tf.retrieval.structures.global_descriptors import GlobalStructure
from delf_tf.retrieval.structures.milvus import (
    BACKEND as MILVUS,
)
from delf_tf.retrieval.structures.milvus import (
    MilvusGlobalStructure,
    MilvusVotesStructure,
    is_milvus,
)
from delf_tf.retrieval.structures.votes import VotesStructure

STRUCTURES: dict[str, type[SearchStructure]] = {
    cls.name: cls for cls in (VotesStructure, AsmkStructure, GlobalStructure)
}
# The rankings Milvus can serve (ASMK* stays FAISS-only: see structures/milvus.py).
MILVUS_STRUCTURES: dict[str, type[SearchStructure]] = {
    cls.name: cls for cls in (MilvusVotesStructure, MilvusGlobalStructure)
}


def structure_type(name: str, header: object) -> type[SearchStructure]:
    """The class of index.json's structure `name` with this header (KeyError: unknown)."""
    if name in MILVUS_STRUCTURES and is_milvus(header):
        return MILVUS_STRUCTURES[name]
    return STRUCTURES[name]


def class_for(
    name: str, backend: str | None, current: SearchStructure | None
) -> type[SearchStructure]:
    """The class `delf index --backend=backend` builds for ranking `name`: Milvus for
    backend "milvus" (votes and global alike), the present one when backend is None,
    else the FAISS one."""
    if backend == MILVUS and name in MILVUS_STRUCTURES:
        return MILVUS_STRUCTURES[name]
    if backend is None and current is not None:
        return type(current)
    return STRUCTURES[name]


__all__ = [
    "STRUCTURES",
    "AsmkStructure",
    "BuildOptions",
    "GlobalStructure",
    "IndexChangedError",
    "IndexFormatError",
    "MILVUS_STRUCTURES",
    "MilvusGlobalStructure",
    "MilvusVotesStructure",
    "Ranking",
    "SearchStructure",
    "VotesStructure",
    "class_for",
    "structure_type",
]
