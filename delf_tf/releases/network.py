"""A released model's own TF1 graph as the network stage of the extraction graph.

The reference extractor loads a release with `tf.saved_model.load(path)` and
calls `prune(feeds, fetches)`. A pruned function cannot be re-exported: its TF1
variables live outside any trackable object, so `tf.saved_model.save` would
write the graph without their values. `ReleaseNetwork` instead
1. loads the release in a TF1 session (its own restore op fills its variables)
   and reads every variable the fetches depend on;
2. keeps the part of the release's GraphDef that computes the fetches
   (`extract_sub_graph`), with each variable node replaced by a placeholder;
3. holds the values as `tf.Variable`s (tracked, so exports save them), and on
   each call imports that GraphDef into the calling graph with `input_map`
   binding the feeds to the call's tensors and the variable placeholders to the
   variables. The release's ops, v1 control flow (Enter/Exit/Merge/Switch) and
   weights run unchanged: the numbers are the release's.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from delf_tf.errors import InputError
from delf_tf.releases.folder import ReleaseFolder

# Ops that own a TF1 variable (ref variables: VariableV2; resource variables: VarHandleOp).
_REF_VARIABLE_OPS = ("VariableV2", "Variable")
_RESOURCE_VARIABLE_OPS = ("VarHandleOp",)


def _load_graph_and_values(
    release: ReleaseFolder,
) -> tuple[tf.compat.v1.GraphDef, list[tuple[str, str, np.ndarray]]]:
    """(the GraphDef computing the release's fetches, [(node name, op, value)] of its variables)."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        try:
            meta_graph = tf.compat.v1.saved_model.loader.load(
                session, list(release.tags), str(release.model_dir)
            )
        except Exception as error:  # noqa: BLE001 - the loader raises many types
            raise InputError(f"{release.model_dir}: cannot load the release ({error})") from error
        pruned = tf.compat.v1.graph_util.extract_sub_graph(
            meta_graph.graph_def, list(release.fetches)
        )
        pruned.versions.CopyFrom(meta_graph.graph_def.versions)
        owners = [
            node for node in pruned.node if node.op in _REF_VARIABLE_OPS + _RESOURCE_VARIABLE_OPS
        ]
        reads = []
        for node in owners:
            tensor = graph.get_tensor_by_name(f"{node.name}:0")
            if node.op in _RESOURCE_VARIABLE_OPS:
                tensor = tf.raw_ops.ReadVariableOp(resource=tensor, dtype=node.attr["dtype"].type)
            reads.append(tensor)
        values = session.run(reads) if reads else []
    return pruned, [(node.name, node.op, value) for node, value in zip(owners, values, strict=True)]


# Ops through which a variable's ref or handle flows unchanged (TF1 control flow).
_PASS_THROUGH = {
    "Identity": "Identity",
    "RefIdentity": "Identity",
    "Enter": "Enter",
    "RefEnter": "Enter",
    "Switch": "Switch",
    "RefSwitch": "Switch",
    "Merge": "Merge",
    "RefMerge": "Merge",
}
_REF_OFFSET = 100  # DataType enum: DT_FLOAT_REF = DT_FLOAT + 100, ...


def _as_value_graph(
    graph_def: tf.compat.v1.GraphDef, owners: dict[str, str]
) -> tf.compat.v1.GraphDef:
    """A copy where every variable is a float placeholder of its value.

    Variable nodes (`owners`: name -> op) become placeholders of the variable's
    dtype; the ref or resource types on the pass-through ops after them (Enter,
    Identity, Switch, Merge and their Ref forms) become plain types, and each
    ReadVariableOp becomes an Identity. The graph then reads no variable inside
    its loops (no stateful op there), so it can run inside tf.function branches
    and loops, and the values come from the caller. Device and colocation pins
    and recorded output shapes are dropped.
    """
    result = tf.compat.v1.GraphDef()
    result.CopyFrom(graph_def)
    consumers: dict[str, list] = {}
    for node in result.node:
        node.device = ""
        for attr in ("_class", "_output_shapes"):  # pins and shapes of the old types
            if attr in node.attr:
                del node.attr[attr]
        for name in node.input:
            if not name.startswith("^"):
                consumers.setdefault(name.split(":")[0], []).append(node)
    by_name = {node.name: node for node in result.node}
    for owner, op in owners.items():
        node = by_name[owner]
        dtype = node.attr["dtype"].type
        shape = tf.compat.v1.AttrValue()
        shape.CopyFrom(node.attr["shape"])
        node.Clear()
        node.name, node.op = owner, "Placeholder"
        node.attr["dtype"].type = dtype
        node.attr["shape"].CopyFrom(shape)
        pending, seen = list(consumers.get(owner, [])), {owner}
        while pending:
            consumer = pending.pop()
            if consumer.name in seen:
                continue
            seen.add(consumer.name)
            if consumer.op == "ReadVariableOp":
                consumer.op = "Identity"
                del consumer.attr["dtype"]
                consumer.attr["T"].type = dtype
            elif consumer.op in _PASS_THROUGH:
                if consumer.attr["T"].type not in (
                    dtype + _REF_OFFSET,
                    tf.resource.as_datatype_enum,
                ):
                    continue  # e.g. the `/read` Identity of a ref variable: plain already
                consumer.op = _PASS_THROUGH[consumer.op]
                consumer.attr["T"].type = dtype
                pending.extend(consumers.get(consumer.name, []))
            elif op in _RESOURCE_VARIABLE_OPS:
                raise InputError(
                    f"variable {owner} is used by a {consumer.op} op ({consumer.name}); delf-tf "
                    "reads release variables through ReadVariableOp only"
                )
    return result


def _variable_name(node_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", node_name)


class ReleaseNetwork(tf.Module):
    """A released DELF/DELG model behind the FeatureNetwork interface (see graph.py)."""

    def __init__(self, release: ReleaseFolder):
        super().__init__(name="release_network")
        self.release = release
        graph_def, values = _load_graph_and_values(release)
        self._owners = [name for name, _, _ in values]
        self._graph_def = _as_value_graph(graph_def, {name: op for name, op, _ in values})
        self.weights = [
            tf.Variable(value, trainable=False, name=_variable_name(name))
            for name, _, value in values
        ]
        signature = [
            tf.TensorSpec([None, None, 3], tf.uint8),
            tf.TensorSpec([None], tf.float32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([None], tf.int32),
        ] + [tf.TensorSpec(value.shape, tf.as_dtype(value.dtype)) for _, _, value in values]
        # wrap_function traces without automatic control dependencies: those would
        # treat the imported loop's Merge ops as side effects and chain them to the
        # outputs across the loop's frames (tf.function's ACD does not know v1 loops
        # it did not build).
        self._run_graph = tf.compat.v1.wrap_function(self._import_graph, signature)
        self._digest = self._weights_digest(values)
        self.global_dim: int | None = None
        self.local_dim = 0
        self.local_dim, self.global_dim = self._output_dims()
        logging.info(
            "release %s (%s): %d variables, %d-D local descriptors%s",
            release.name or release.model_dir,
            release.kind,
            len(self.weights),
            self.local_dim,
            f", {self.global_dim}-D global" if self.global_dim else "",
        )

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "in-process release",
            "model": str(self.release.model_dir),
            "release": self.release.name,
            "release_kind": self.release.kind,
        }

    @staticmethod
    def _weights_digest(values: list[tuple[str, str, np.ndarray]]) -> bytes:
        digest = hashlib.sha256(b"delf-tf-release-1")
        for name, _, value in sorted(values, key=lambda item: item[0]):
            value = np.ascontiguousarray(value)
            digest.update(f"{name}:{value.shape}:{value.dtype}".encode())
            digest.update(value.tobytes())
        return digest.digest()

    def update_fingerprint(self, digest: Any) -> None:
        """Adds the identity of the release: its kind and every variable's name and value."""
        digest.update(f"release:{self.release.kind}".encode())
        digest.update(self._digest)

    def _output_dims(self) -> tuple[int, int | None]:
        """(local descriptor size, global descriptor size or None): static shapes, else a
        probe run on a 64 x 64 grey image."""
        probe = tf.function(
            lambda: self(
                tf.fill([64, 64, 3], tf.constant(128, tf.uint8)),
                tf.constant([1.0]),
                tf.constant(-np.inf, tf.float32),
                tf.constant(1),
                tf.constant([0]),
            ),
            autograph=False,
        )
        outputs = probe.get_concrete_function().structured_outputs
        dims = {
            name: outputs[name].shape[-1]
            for name in ("descriptors", "global_descriptors")
            if name in outputs
        }
        if None in dims.values():
            dims = {name: value.shape[-1] for name, value in probe().items() if name in dims}
        global_dim = dims.get("global_descriptors")
        return int(dims["descriptors"]), (int(global_dim) if global_dim is not None else None)

    def __call__(self, image, scales, score_threshold, max_features, global_scale_indices):
        """Runs the release's graph; returns the FeatureNetwork dict (see graph.py).

        locations: the centres of the release's receptive-field boxes, (y, x) in
        `image` pixels, as the reference extractor computes them.
        """
        values = [variable.read_value() for variable in self.weights]
        fetched = self._run_graph(
            image, scales, score_threshold, max_features, global_scale_indices, *values
        )
        boxes, features, level_scales, scores = fetched[:4]
        outputs = {
            "locations": (boxes[:, 0:2] + boxes[:, 2:4]) / 2.0,
            "descriptors": features,
            "scales": tf.reshape(level_scales, [-1]),
            "scores": tf.reshape(scores, [-1]),
        }
        if self.release.kind == "delg":
            outputs["global_descriptors"] = fetched[4]
        return outputs

    def _import_graph(self, image, scales, score_threshold, max_features, indices, *values):
        """The release's fetches for these feeds and variable values.

        A function of its own whose inputs are the variables' values: the caller's
        automatic control dependencies attach to its call, never to the release's
        v1 loop ops.
        """
        input_map = {
            "input_image:0": image,
            "input_scales:0": scales,
            "input_abs_thres:0": score_threshold,
            "input_max_feature_num:0": max_features,
        }
        if self.release.kind == "delg":
            input_map["input_global_scales_ind:0"] = indices
        for name, value in zip(self._owners, values, strict=True):
            input_map[f"{name}:0"] = value
        return tf.graph_util.import_graph_def(
            self._graph_def,
            input_map=input_map,
            return_elements=[f"{name}:0" for name in self.release.fetches],
            name="release",
        )
