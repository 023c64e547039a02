"""Reading a SavedModel's protocol buffer without loading it (op lists, signatures, XLA use).

Beside the server so `delf serve` does not import the exporter; `delf_tf.export`
imports these too (to refuse exports that TF Serving could not run).
"""

from __future__ import annotations

import os
from pathlib import Path

from delf_tf.contract import SAVED_MODEL_FILE


def read_saved_model_proto(version_dir: str | os.PathLike):
    """The SavedModel protocol buffer of `<version_dir>/saved_model.pb`.

    Raises OSError when the file cannot be read and google.protobuf's DecodeError when
    it is not a SavedModel.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((Path(version_dir) / SAVED_MODEL_FILE).read_bytes())
    return saved_model


def graph_ops(version_dir: str | os.PathLike) -> set[str]:
    """Every op type in a SavedModel: graph nodes and all library functions."""
    ops = set()
    for meta_graph in read_saved_model_proto(version_dir).meta_graphs:
        graph = meta_graph.graph_def
        ops.update(node.op for node in graph.node)
        for function in graph.library.function:
            ops.update(node.op for node in function.node_def)
    return ops


def uses_xla(version_dir: str | os.PathLike) -> bool:
    """True when a function of the SavedModel must be compiled with XLA (jit_compile)."""
    for meta_graph in read_saved_model_proto(version_dir).meta_graphs:
        for function in meta_graph.graph_def.library.function:
            flag = function.attr.get("_XlaMustCompile")
            if flag is not None and flag.b:
                return True
    return False
