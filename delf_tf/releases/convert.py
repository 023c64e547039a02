"""A released model's variables onto the Keras architecture it is (`delf convert`).

The release's variables are those `ReleaseNetwork` reads (the ones its fetches
depend on). They are mapped onto a `ReferenceModel` by structure, not by name:
1. the release's graph is flattened across its function calls, While and If (the
   variables as placeholders of their values, as ReleaseNetwork runs it);
2. every op that takes a variable as a parameter is a *unit*: a convolution (its
   kernel, and the bias a BiasAdd/Add right after it adds), a MatMul (kernel and
   bias), a fused batch norm (gamma, beta, moving mean, moving variance);
3. each unit's depth is the number of units on the longest path of ops from
   `input_image` to it; the Keras model's layers with weights get depths the same
   way from its functional graph;
4. at each depth, units are matched by kind and shapes. A depth whose units differ
   (a missing, unused or wrongly shaped variable) or holds two alike units (an
   ambiguous match) is refused with a one-line error.
Names only serve as a cross-check (a variable called `gamma` that lands on a
`beta` is counted and logged), never to decide.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import keras
from absl import logging

from delf_tf.config import ModelConfig
from delf_tf.errors import InputError
from delf_tf.releases.folder import ReleaseFolder, find_release

# Ops that pass a value through unchanged (after ReleaseNetwork's retyping).
_PASS = {"Identity", "Enter", "Exit", "Switch", "Merge", "RefIdentity", "Snapshot"}
_FUNCTION_OPS = {
    "StatefulPartitionedCall": (0, ("f",)),
    "PartitionedCall": (0, ("f",)),
    "While": (0, ("body",)),
    "StatelessWhile": (0, ("body",)),
    "If": (1, ("then_branch", "else_branch")),
    "StatelessIf": (1, ("then_branch", "else_branch")),
}
_CONV_OPS = {"Conv2D", "DepthwiseConv2dNative"}
_BN_OPS = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}
_BIAS_OPS = {"BiasAdd", "Add", "AddV2"}
_BN_ROLES = ("gamma", "beta", "moving_mean", "moving_variance")
_NAME_ROLES = {
    "weights": "kernel",
    "kernel": "kernel",
    "biases": "bias",
    "bias": "bias",
    "gamma": "gamma",
    "beta": "beta",
    "moving_mean": "moving_mean",
    "moving_variance": "moving_variance",
}
RELEASE_ARCHITECTURES = {"delf": "resnet_v1_50", "delg": "delg_resnet50"}


class ConversionError(InputError):
    """The release's variables do not map one to one onto the architecture."""


@dataclasses.dataclass
class Unit:
    """One layer with weights: kind (conv, dense, bn), depth, {role: (name, shape)}."""

    kind: str
    depth: int
    params: dict[str, tuple[str, tuple[int, ...]]]
    parents: tuple = ()  # the own signatures of the units that feed it (nearest upstream)

    @property
    def own_signature(self) -> tuple:
        return (self.kind, tuple(sorted((role, shape) for role, (_, shape) in self.params.items())))

    @property
    def signature(self) -> tuple:
        return (*self.own_signature, self.parents)

    def describe(self) -> str:
        shapes = ", ".join(
            f"{role} {list(shape)}" for role, (_, shape) in sorted(self.params.items())
        )
        return f"{self.kind} ({shapes})"


class _FlatGraph:
    """A GraphDef flattened across function calls, While bodies and If branches.

    Node ids are paths (`call/f/node`); `inputs[id]` are the ids of the producers of
    its data inputs (function arguments and outputs resolved to what they carry;
    NextIteration back edges of v1 loops dropped).
    """

    def __init__(self, graph_def):
        self.functions = {f.signature.name: f for f in graph_def.library.function}
        self.ops: dict[str, str] = {}
        self.raw: dict[str, list[tuple]] = {}
        self.call_outputs: dict[tuple[str, int], list[tuple]] = {}
        self._resolved: dict[tuple, list[str]] = {}
        self._scope(graph_def.node, "", {}, in_function=False)
        self.inputs = {node: self._resolve_all(tokens) for node, tokens in self.raw.items()}

    def _scope(self, nodes, prefix: str, args: dict[str, tuple], in_function: bool) -> None:
        by_name = {node.name: node for node in nodes}

        def token(ref: str) -> tuple:
            parts = ref.split(":")
            if in_function and len(parts) == 1:
                return args[ref]
            name = parts[0]
            index = int(parts[-1]) if len(parts) > 1 else 0
            if by_name[name].op in _FUNCTION_OPS:
                return ("out", prefix + name, index)
            return ("node", prefix + name)

        for node in nodes:
            node_id = prefix + node.name
            self.ops[node_id] = node.op
            refs = [ref for ref in node.input if not ref.startswith("^")]
            if node.op == "Merge":
                refs = [ref for ref in refs if by_name[ref.split(":")[0]].op != "NextIteration"]
            self.raw[node_id] = [token(ref) for ref in refs]
        for node in nodes:
            if node.op not in _FUNCTION_OPS:
                continue
            node_id = prefix + node.name
            first, attrs = _FUNCTION_OPS[node.op]
            call_args = self.raw[node_id][first:]
            for attr in attrs:
                function = self.functions[node.attr[attr].func.name]
                inner = {
                    argument.name: call_args[index]
                    for index, argument in enumerate(function.signature.input_arg)
                }
                inner_prefix = f"{node_id}/{attr}/"
                self._scope(function.node_def, inner_prefix, inner, in_function=True)
                inner_names = {n.name: n for n in function.node_def}
                for index, argument in enumerate(function.signature.output_arg):
                    ref = function.ret[argument.name]
                    parts = ref.split(":")
                    if len(parts) == 1:
                        resolved = inner[ref]
                    elif inner_names[parts[0]].op in _FUNCTION_OPS:
                        resolved = ("out", inner_prefix + parts[0], int(parts[-1]))
                    else:
                        resolved = ("node", inner_prefix + parts[0])
                    self.call_outputs.setdefault((node_id, index), []).append(resolved)

    def _resolve_all(self, tokens: list[tuple]) -> list[str]:
        ids: list[str] = []
        for token in tokens:
            ids.extend(self._resolve(token))
        return ids

    def _resolve(self, token: tuple) -> list[str]:
        if token[0] == "node":
            return [token[1]]
        if token not in self._resolved:
            self._resolved[token] = []  # guards against cycles
            found = []
            for inner in self.call_outputs.get((token[1], token[2]), []):
                found.extend(self._resolve(inner))
            self._resolved[token] = found
        return self._resolved[token]


def release_units(graph_def, shapes: dict[str, tuple[int, ...]]) -> list[Unit]:
    """The units of a release's value graph (variables as placeholders named in `shapes`)."""
    flat = _FlatGraph(graph_def)
    variable_of: dict[str, str | None] = {}

    def source(node_id: str) -> str | None:
        """The variable whose value `node_id` carries unchanged, or None."""
        chain = []
        current = node_id
        while current not in variable_of:
            op = flat.ops.get(current)
            if op == "Placeholder" and current in shapes:
                variable_of[current] = current
                break
            inputs = flat.inputs.get(current, [])
            if op not in _PASS or not inputs:
                variable_of[current] = None
                break
            chain.append(current)
            current = inputs[0]
        for node in chain:
            variable_of[node] = variable_of[current]
        return variable_of[current]

    # Each use of a variable by an op that is not a pass-through.
    units: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    biases: list[tuple[str, str, str]] = []
    used: set[str] = set()
    for node_id, op in flat.ops.items():
        if op in _PASS or op in _FUNCTION_OPS:
            continue  # a function op's uses are those inside its functions
        for position, producer in enumerate(flat.inputs.get(node_id, [])):
            variable = source(producer)
            if variable is None:
                continue
            used.add(variable)
            if op in _CONV_OPS | {"MatMul"} and position == 1:
                kinds[node_id] = "dense" if op == "MatMul" else "conv"
                units.setdefault(node_id, {})["kernel"] = variable
            elif op in _BN_OPS and 1 <= position <= 4:
                kinds[node_id] = "bn"
                units.setdefault(node_id, {})[_BN_ROLES[position - 1]] = variable
            elif op in _BIAS_OPS:
                other = flat.inputs[node_id][1 - position] if len(flat.inputs[node_id]) == 2 else ""
                biases.append((node_id, other, variable))
            else:
                raise ConversionError(
                    f"variable {variable} is used by a {op} op ({node_id}), which delf convert "
                    "does not map onto a Keras layer"
                )
    for node_id, producer, variable in biases:
        while flat.ops.get(producer) in _PASS:
            producer = flat.inputs[producer][0]
        if kinds.get(producer) not in ("conv", "dense"):
            raise ConversionError(
                f"variable {variable} is added ({node_id}) to the output of a "
                f"{flat.ops.get(producer)} op, not to a convolution's or a MatMul's"
            )
        units[producer]["bias"] = variable
    depths = _depths(flat, set(units), "input_image")
    own = {
        node_id: Unit(kinds[node_id], 0, {r: (n, shapes[n]) for r, n in params.items()})
        for node_id, params in units.items()
    }

    def parents(node_id: str) -> tuple:
        """Own signatures of the nearest units upstream of the unit's data input."""
        found, seen = [], set()
        pending = list(flat.inputs.get(node_id, [])[:1])
        while pending:
            current = pending.pop()
            if current in seen:
                continue
            seen.add(current)
            if current in own and current != node_id:
                found.append(own[current].own_signature)
                continue
            if flat.ops.get(current) == "Placeholder" and current in shapes:
                continue
            pending.extend(flat.inputs.get(current, []))
        return tuple(sorted(set(found), key=repr))

    found: dict[tuple, Unit] = {}
    for node_id, params in units.items():
        if node_id not in depths:
            raise ConversionError(
                f"variable {next(iter(params.values()))} is used by {node_id}, which does not "
                "depend on input_image"
            )
        unit = Unit(
            kinds[node_id],
            depths[node_id],
            {role: (name, shapes[name]) for role, name in params.items()},
            parents(node_id),
        )
        key = tuple(sorted(params.items()))
        previous = found.get(key)
        if previous is not None and previous.depth != unit.depth:
            raise ConversionError(
                f"variables {sorted(params.values())} are used at two depths of the graph"
            )
        found[key] = unit
    unused = set(shapes) - used
    if unused:
        raise ConversionError(f"release variables not used by the graph: {sorted(unused)[:5]}")
    return list(found.values())


def _depths(flat: _FlatGraph, units: set[str], start: str) -> dict[str, int]:
    """{node id: units on the longest path from `start`} for the nodes that depend on it."""
    consumers: dict[str, list[str]] = {}
    indegree: dict[str, int] = {}
    for node, inputs in flat.inputs.items():
        for producer in inputs:
            consumers.setdefault(producer, []).append(node)
    # Kahn's order over the nodes reachable from `start`.
    reachable, stack = {start}, [start]
    while stack:
        for node in consumers.get(stack.pop(), []):
            if node not in reachable:
                reachable.add(node)
                stack.append(node)
    for node in reachable:
        indegree[node] = sum(1 for p in flat.inputs.get(node, []) if p in reachable)
    depth = {start: 0}
    ready = [node for node in reachable if indegree[node] == 0]
    while ready:
        node = ready.pop()
        own = max((depth[p] for p in flat.inputs.get(node, []) if p in depth), default=0)
        depth[node] = own + (1 if node in units else 0)
        for consumer in consumers.get(node, []):
            if consumer in reachable:
                indegree[consumer] -= 1
                if indegree[consumer] == 0:
                    ready.append(consumer)
    return depth


def model_units(network: keras.Model) -> list[tuple[Unit, keras.layers.Layer]]:
    """The layers with weights of a functional model, as units with their depths."""
    depths: dict[str, int] = {}
    result = []
    owns: dict[str, tuple] = {}
    feeders: dict[str, tuple] = {}  # weightless layer -> own signatures of units feeding it
    for layer in network.layers:
        parents = [
            parent.operation.name for node in layer._inbound_nodes for parent in node.parent_nodes
        ]
        own = max((depths[name] for name in parents), default=0)
        upstream = set()
        for name in parents:
            upstream |= {owns[name]} if name in owns else set(feeders.get(name, ()))
        upstream = tuple(sorted(upstream, key=repr))
        if not layer.weights:
            depths[layer.name] = own
            feeders[layer.name] = upstream
            continue
        depths[layer.name] = own + 1
        if isinstance(layer, keras.layers.BatchNormalization):
            kind, roles = "bn", _BN_ROLES
        elif isinstance(layer, keras.layers.Conv2D):
            kind, roles = "conv", ("kernel", "bias")
        elif isinstance(layer, keras.layers.Dense):
            kind, roles = "dense", ("kernel", "bias")
        else:
            raise ConversionError(f"layer {layer.name} ({type(layer).__name__}) is not mappable")
        params = {
            role: (weight.path, tuple(weight.shape))
            for role, weight in zip(roles, layer.weights, strict=False)
        }
        unit = Unit(kind, own + 1, params, upstream)
        owns[layer.name] = unit.own_signature
        result.append((unit, layer))
    return result


def match_units(
    released: list[Unit], model: list[tuple[Unit, Any]]
) -> list[tuple[Unit, Unit, Any]]:
    """[(release unit, model unit, layer)] matched by depth, kind and shapes; refuses
    missing, unused, wrongly shaped and ambiguous ones (ConversionError)."""
    by_depth: dict[int, tuple[list, list]] = {}
    for unit in released:
        by_depth.setdefault(unit.depth, ([], []))[0].append(unit)
    for unit, layer in model:
        by_depth.setdefault(unit.depth, ([], []))[1].append((unit, layer))
    pairs = []
    for depth in sorted(by_depth):
        ours, theirs = by_depth[depth]
        signatures = {unit.signature for unit in ours} | {unit.signature for unit, _ in theirs}
        for signature in sorted(signatures, key=repr):
            a = [unit for unit in ours if unit.signature == signature]
            b = [(unit, layer) for unit, layer in theirs if unit.signature == signature]
            if len(a) == len(b) == 1:
                pairs.append((a[0], b[0][0], b[0][1]))
                continue
            if len(a) > 1 and len(a) == len(b):
                raise ConversionError(
                    f"ambiguous: {len(a)} alike layers at depth {depth} "
                    f"({a[0].describe()}): {sorted(p[0] for u in a for p in u.params.values())[:4]}"
                )
            release_side = ", ".join(unit.describe() for unit in ours) or "nothing"
            model_side = ", ".join(unit.describe() for unit, _ in theirs) or "nothing"
            raise ConversionError(
                f"the release and the architecture differ at depth {depth}: release has "
                f"{release_side}; the model expects {model_side}"
            )
    return pairs


@dataclasses.dataclass
class Conversion:
    """The converted model and what the conversion found."""

    model: Any
    release: ReleaseFolder
    config: ModelConfig
    variables: int
    names_agree: int
    names_disagree: int
    names_unknown: int

    def summary(self) -> dict[str, Any]:
        return {
            "release": str(self.release.model_dir),
            "release_name": self.release.name,
            "kind": self.release.kind,
            "architecture": self.config.architecture,
            "size": self.config.backbone,
            "variables": self.variables,
            "name_cross_check": {
                "agree": self.names_agree,
                "disagree": self.names_disagree,
                "unknown": self.names_unknown,
            },
        }


def convert_release(path: str | os.PathLike, size: str | None = None) -> Conversion:
    """The release at `path` as a ReferenceModel with the release's weights.

    size: "resnet50" or "tiny"; None tries both and takes the one that matches.
    """
    from delf_tf.model.reference_nets import build_reference_model
    from delf_tf.releases.network import _as_value_graph, _load_graph_and_values

    release = find_release(path)
    if release is None:
        raise InputError(f"{path}: not a released DELF/DELG model folder")
    graph_def, values = _load_graph_and_values(release)
    value_graph = _as_value_graph(graph_def, {name: op for name, op, _ in values})
    arrays = {name: value for name, _, value in values}
    shapes = {name: tuple(value.shape) for name, value in arrays.items()}
    released = release_units(value_graph, shapes)
    architecture = RELEASE_ARCHITECTURES[release.kind]
    errors = []
    for candidate in (size,) if size else ("tiny", "resnet50"):
        config = ModelConfig(architecture=architecture, backbone=candidate)
        model = build_reference_model(config)
        try:
            pairs = match_units(released, model_units(model.network))
        except ConversionError as error:
            errors.append(f"{candidate}: {error}")
            continue
        return _apply(model, pairs, arrays, release, config)
    raise ConversionError(f"{release.model_dir} is not a {architecture} ({'; '.join(errors)})")


def _apply(model, pairs, arrays, release, config) -> Conversion:
    agree = disagree = unknown = 0
    for released, ours, layer in pairs:
        roles = [role for role in ("kernel", "bias", *_BN_ROLES) if role in ours.params]
        if set(roles) != set(released.params):
            raise ConversionError(f"{layer.name}: the release gives {sorted(released.params)}")
        layer.set_weights([arrays[released.params[role][0]] for role in roles])
        for role in roles:
            said = _NAME_ROLES.get(released.params[role][0].rsplit("/", 1)[-1])
            if said is None:
                unknown += 1
            elif said == role:
                agree += 1
            else:
                disagree += 1
                logging.warning(
                    "%s is named as a %s but is the %s of %s by the graph's structure",
                    released.params[role][0],
                    said,
                    role,
                    layer.name,
                )
    return Conversion(model, release, config, len(arrays), agree, disagree, unknown)


def save_converted(conversion: Conversion, output_file: str | os.PathLike) -> Path:
    """Writes the converted model as `.keras` (atomically)."""
    import tempfile

    from delf_tf.atomic import atomic_write_bytes

    output = Path(output_file)
    if output.suffix != ".keras":
        raise InputError(f"{output}: the output file must end in .keras")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model.keras"
        conversion.model.save(local)
        atomic_write_bytes(output, local.read_bytes())
    return output


def feature_parity(ours, release) -> dict[str, float | None]:
    """How closely two LocalFeatures of one image agree (a converted model vs its release).

    keypoints: share of features (of the larger set) with a counterpart at the same
    level within 0.01 px; descriptor_cosine: the smallest cosine between counterparts;
    global_cosine: cosine of the global descriptors (None without).
    """
    import numpy as np

    if len(ours) == 0 or len(release) == 0:
        return {
            "keypoints": float(len(ours) == len(release)),
            "descriptor_cosine": None,
            "global_cosine": None,
        }
    a = np.column_stack([ours.keypoints, 1e3 * ours.scales])
    b = np.column_stack([release.keypoints, 1e3 * release.scales])
    distances = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    nearest = distances.argmin(axis=1)
    close = distances[np.arange(len(a)), nearest] < 0.01
    cosines = np.sum(ours.descriptors[close] * release.descriptors[nearest[close]], axis=1)
    global_cosine = None
    if release.global_descriptor is not None and ours.global_descriptor is not None:
        global_cosine = float(ours.global_descriptor @ release.global_descriptor)
    return {
        "keypoints": float(close.sum() / max(len(a), len(b))),
        "descriptor_cosine": float(cosines.min()) if close.any() else None,
        "global_cosine": global_cosine,
    }
