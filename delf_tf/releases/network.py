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
   variables. The release's ops, v1 control flow (Enter/Exit/Merge/Switch), and
   the function calls, v2 While/If and library functions of TF2-exported graphs
   (variables passed to them become value arguments of copies of the functions)
   run unchanged with the release's weights: the numbers are the release's.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.framework import function_pb2

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
_RESOURCE = tf.resource.as_datatype_enum
# Ops that pass a resource on to a library function (TF2 exports, v2 control flow):
# op -> (its type-list attribute of the inputs, first input that maps to a function
# argument, the attributes naming the functions).
_FUNCTION_OPS = {
    "StatefulPartitionedCall": ("Tin", 0, ("f",)),
    "PartitionedCall": ("Tin", 0, ("f",)),
    "While": ("T", 0, ("cond", "body")),
    "StatelessWhile": ("T", 0, ("cond", "body")),
    "If": ("Tin", 1, ("then_branch", "else_branch")),
    "StatelessIf": ("Tin", 1, ("then_branch", "else_branch")),
}
# Attributes that describe the resource inputs or outputs, stale once they carry values.
_STALE_ATTRS = ("_output_shapes", "_read_only_resource_inputs", "_input_shapes")


def _normal_ref(ref: str, in_function: bool) -> str:
    """A tensor reference in one spelling: `node:index` in a graph (`node` is output 0);
    function bodies spell `arg` or `node:output_name:index` already."""
    if in_function or ":" in ref:
        return ref
    return f"{ref}:0"


class _ValueRewriter:
    """Makes variables flow as values through a GraphDef and its function library.

    Starting from the variable nodes (turned into placeholders of their values by
    `_as_value_graph`), it follows each variable through the ops that pass it on
    and retypes them: ReadVariableOp becomes Identity; Identity, the v1 control
    flow ops and their Ref forms take the value's type; a function call, While or
    If (v2 control flow and the StatefulPartitionedCall of TF2 exports) gets a copy
    of its functions whose arguments are values, retyped the same way inside
    (recursively), and passes values on through its outputs where the functions
    return them (a While's loop variables). Any other use of a resource variable
    (an assignment, a gather on the resource, ...) is refused; a ref variable's
    other consumers take its value as they did.
    """

    def __init__(self, library: function_pb2.FunctionDefLibrary, ref_owners: set[str]):
        self.library = library
        self.ref_owners = ref_owners
        self.functions = {f.signature.name: f for f in library.function}
        self.copies: dict[tuple, tuple[str, dict[int, int]]] = {}
        self.originals: dict[str, str] = {}  # copy name -> the function it copies

    def rewrite(
        self, nodes, starts: list[tuple[str, int, str]], in_function: bool
    ) -> tuple[dict[str, int], set[str]]:
        """Retypes `nodes` (a graph's or a function's) from the value references `starts`
        [(reference, dtype, variable name)]. Returns ({reference: dtype} of what now
        carries values, names of the ReadVariableOps that became Identity)."""
        consumers: dict[str, list[tuple[Any, int]]] = {}
        for node in nodes:
            for position, name in enumerate(node.input):
                if not name.startswith("^"):
                    key = _normal_ref(name, in_function)
                    consumers.setdefault(key, []).append((node, position))
        values: dict[str, int] = {}
        reads: set[str] = set()
        calls: dict[str, tuple[Any, dict[int, int], str]] = {}
        done: dict[str, dict[int, int]] = {}
        pending = list(starts)
        while pending:
            while pending:
                ref, dtype, owner = pending.pop()
                if ref in values:
                    continue
                values[ref] = dtype
                for node, position in consumers.get(ref, []):
                    pending.extend(
                        self._consume(node, position, dtype, owner, in_function, calls, reads)
                    )
            for name, (node, positions, owner) in calls.items():
                if done.get(name) == positions:
                    continue
                done[name] = dict(positions)
                for index, dtype in self._retype_call(node, positions, owner).items():
                    ref = f"{node.name}:output:{index}" if in_function else f"{node.name}:{index}"
                    pending.append((ref, dtype, owner))
        return values, reads

    def _consume(self, node, position, dtype, owner, in_function, calls, reads) -> list[tuple]:
        """Retypes `node`, whose input `position` now carries a value; returns the
        references it passes the value on to."""
        if node.op == "ReadVariableOp":
            node.op = "Identity"
            del node.attr["dtype"]
            node.attr["T"].type = dtype
            reads.add(node.name)
            return []
        if node.op in _PASS_THROUGH:
            if node.attr["T"].type not in (dtype + _REF_OFFSET, _RESOURCE):
                return []  # e.g. the `/read` Identity of a ref variable: plain already
            node.op = _PASS_THROUGH[node.op]
            node.attr["T"].type = dtype
            if in_function:
                return [(f"{node.name}:output:0", dtype, owner)]
            outputs = 2 if node.op == "Switch" else 1
            return [(f"{node.name}:{index}", dtype, owner) for index in range(outputs)]
        if node.op in _FUNCTION_OPS:
            first = _FUNCTION_OPS[node.op][1]
            if position < first:
                raise InputError(f"variable {owner} is the condition of {node.op} op {node.name}")
            calls.setdefault(node.name, (node, {}, owner))[1][position - first] = dtype
            return []
        if owner in self.ref_owners:
            return []  # a ref variable read in place: the op takes the value
        raise InputError(
            f"variable {owner} is used by a {node.op} op ({node.name}); delf-tf reads release "
            "variables through ReadVariableOp, Identity, control flow and function calls only"
        )

    def _retype_call(self, node, positions: dict[int, int], owner: str) -> dict[int, int]:
        """Points a call, While or If node at copies of its functions whose arguments
        `positions` are values; returns {output index: dtype} of the outputs that now
        carry values."""
        types_attr, _, function_attrs = _FUNCTION_OPS[node.op]
        for index, dtype in positions.items():
            node.attr[types_attr].list.type[index] = dtype
        outputs: dict[int, int] | None = None
        for attr in function_attrs:
            original = node.attr[attr].func.name
            original = self.originals.get(original, original)
            name, returned = self._copy(original, positions, owner)
            node.attr[attr].func.name = name
            if attr == "cond":
                continue  # a While's condition returns the boolean only
            if outputs is not None and returned != outputs:
                raise InputError(f"{node.op} op {node.name}: its branches return different types")
            outputs = returned
        outputs = outputs or {}
        is_loop = node.op in ("While", "StatelessWhile")
        if is_loop and outputs != positions:
            raise InputError(f"{node.op} op {node.name}: variable {owner} is not loop-invariant")
        if not is_loop:
            for index, dtype in outputs.items():
                node.attr["Tout"].list.type[index] = dtype
        if "output_shapes" in node.attr:
            for index in outputs:
                shape = node.attr["output_shapes"].list.shape[index]
                shape.Clear()
                shape.unknown_rank = True
        for attr in _STALE_ATTRS:
            node.attr.pop(attr, None)
        return outputs

    def _copy(self, name: str, positions: dict[int, int], owner: str) -> tuple[str, dict]:
        """(the name of a copy of function `name` whose arguments `positions` are values,
        {output index: dtype} of its outputs that return values)."""
        key = (name, tuple(sorted(positions.items())))
        if key in self.copies:
            return self.copies[key]
        source = self.functions.get(name)
        if source is None:
            raise InputError(f"variable {owner} flows into function {name}, not in the graph")
        function = function_pb2.FunctionDef()
        function.CopyFrom(source)
        copy_name = f"{name}_delf_values_{len(self.copies)}"
        function.signature.name = copy_name
        for attr in _STALE_ATTRS:
            function.attr.pop(attr, None)
        starts = []
        for index, dtype in positions.items():
            argument = function.signature.input_arg[index]
            if argument.type != _RESOURCE:
                raise InputError(
                    f"variable {owner} flows into argument {argument.name} of function "
                    f"{name}, which is not a resource"
                )
            argument.type = dtype
            if index in function.arg_attr:
                for attr in ("_output_shapes", "_handle_dtypes", "_handle_shapes"):
                    function.arg_attr[index].attr.pop(attr, None)
            if index in function.resource_arg_unique_id:
                del function.resource_arg_unique_id[index]
            starts.append((argument.name, dtype, owner))
        for node in function.node_def:
            for attr in _STALE_ATTRS:
                node.attr.pop(attr, None)
        self.copies[key] = (copy_name, {})  # recursive calls see the name
        self.originals[copy_name] = name
        values, reads = self.rewrite(function.node_def, starts, in_function=True)
        # A ReadVariableOp's output is `value`, an Identity's is `output`.
        renamed = {f"{read}:value:0": f"{read}:output:0" for read in reads}
        for node in function.node_def:
            for position, ref in enumerate(node.input):
                if ref in renamed:
                    node.input[position] = renamed[ref]
        returned = {}
        for index, argument in enumerate(function.signature.output_arg):
            ref = function.ret[argument.name]
            if ref in renamed:
                function.ret[argument.name] = renamed[ref]
            elif ref in values:
                argument.type = values[ref]
                returned[index] = values[ref]
        self.library.function.append(function)
        self.functions[copy_name] = function
        self.copies[key] = (copy_name, returned)
        return copy_name, returned


def _as_value_graph(
    graph_def: tf.compat.v1.GraphDef, owners: dict[str, str]
) -> tf.compat.v1.GraphDef:
    """A copy where every variable is a placeholder of its value.

    Variable nodes (`owners`: name -> op) become placeholders of the variable's
    dtype; the ops the variable flows through are retyped by `_ValueRewriter`
    (ReadVariableOp -> Identity; pass-through and control flow ops, function
    calls, While and If with copies of their functions). The graph then reads no
    variable inside its loops (no stateful op there), so it can run inside
    tf.function branches and loops, and the values come from the caller. Device
    and colocation pins and recorded output shapes are dropped.
    """
    result = tf.compat.v1.GraphDef()
    result.CopyFrom(graph_def)
    for node in result.node:
        node.device = ""
        for attr in ("_class", "_output_shapes"):  # pins and shapes of the old types
            if attr in node.attr:
                del node.attr[attr]
    by_name = {node.name: node for node in result.node}
    starts = []
    for owner in owners:
        node = by_name[owner]
        dtype = node.attr["dtype"].type
        shape = tf.compat.v1.AttrValue()
        shape.CopyFrom(node.attr["shape"])
        node.Clear()
        node.name, node.op = owner, "Placeholder"
        node.attr["dtype"].type = dtype
        node.attr["shape"].CopyFrom(shape)
        starts.append((f"{owner}:0", dtype, owner))
    ref_owners = {owner for owner, op in owners.items() if op in _REF_VARIABLE_OPS}
    _ValueRewriter(result.library, ref_owners).rewrite(result.node, starts, in_function=False)
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
