"""The search structures of an index, one module each (see `base.SearchStructure`).

  votes.py               "neighbors": the votes ranking's k-NN structure (neighbors.faiss)
  asmk.py                "asmk": ASMK* codebook and inverted file (asmk/)
  global_descriptors.py  "global": the global ranking, exact or IVF (global.faiss)

`STRUCTURES` maps the names index.json records under "structures" to their class;
another back end (a Milvus collection) is one more module and one more entry.
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
from delf_tf.retrieval.structures.votes import VotesStructure

STRUCTURES: dict[str, type[SearchStructure]] = {
    cls.name: cls for cls in (VotesStructure, AsmkStructure, GlobalStructure)
}

__all__ = [
    "STRUCTURES",
    "AsmkStructure",
    "BuildOptions",
    "GlobalStructure",
    "IndexChangedError",
    "IndexFormatError",
    "Ranking",
    "SearchStructure",
    "VotesStructure",
]
