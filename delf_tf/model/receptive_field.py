"""Receptive field of a functional Keras conv net, computed from its layer configs.

For one spatial axis a tensor's receptive field is described by
  size:    input pixels seen by one output unit,
  stride:  input pixels between neighbouring output units,
  start:   input coordinate of the first pixel seen by output unit 0 (-padding).
Output unit i of the tensor then sees input pixels [start + i*stride,
start + i*stride + size - 1], and its centre is start + i*stride + (size - 1) / 2.
"""

from __future__ import annotations

import dataclasses

import keras

# Layers that keep the spatial grid untouched.
_POINTWISE = (
    keras.layers.InputLayer,
    keras.layers.BatchNormalization,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.Dropout,
    keras.layers.LayerNormalization,
)
_MERGE = (keras.layers.Add, keras.layers.Multiply, keras.layers.Concatenate, keras.layers.Average)


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """Receptive field along one axis (the DELF backbone is square: same on both)."""

    size: int
    stride: int
    padding: int

    def centers(self, indices):
        """Input-pixel centre of output units `indices` (any array-like of ints)."""
        return indices * self.stride - self.padding + (self.size - 1) / 2.0


@dataclasses.dataclass(frozen=True)
class _Field:
    size: int
    stride: int
    start: int

    def through_window(self, kernel: int, stride: int, dilation: int, pad_before: int) -> _Field:
        extent = dilation * (kernel - 1) + 1
        return _Field(
            size=self.size + (extent - 1) * self.stride,
            stride=self.stride * stride,
            start=self.start - pad_before * self.stride,
        )

    def union(self, other: _Field) -> _Field:
        if self.stride != other.stride:
            raise ValueError(f"merging tensors of strides {self.stride} and {other.stride}")
        start = min(self.start, other.start)
        end = max(self.start + self.size, other.start + other.size)
        return _Field(size=end - start, stride=self.stride, start=start)


def compute_receptive_field(model: keras.Model, output_name: str | None = None) -> ReceptiveField:
    """Receptive field of `model`'s output (or of layer `output_name`) on its input.

    Walks the functional graph in topological order. Supports Conv2D,
    DepthwiseConv2D, pooling, ZeroPadding2D, merges and point-wise layers; any
    other layer raises ValueError, so a new architecture cannot silently give a
    wrong answer. 'same' padding with stride > 1 assumes an input size divisible
    by the stride, as TensorFlow's padding rule then is size-independent.
    """
    fields: dict[int, tuple[_Field, _Field]] = {}
    for layer in model.layers:
        inputs = _input_layers(layer)
        if not inputs:
            fields[id(layer)] = (_Field(1, 1, 0), _Field(1, 1, 0))
            continue
        in_fields = [fields[id(source)] for source in inputs]
        if isinstance(layer, _MERGE):
            merged = in_fields[0]
            for other in in_fields[1:]:
                merged = (merged[0].union(other[0]), merged[1].union(other[1]))
            fields[id(layer)] = merged
        elif len(in_fields) != 1:
            raise ValueError(f"layer {layer.name!r}: cannot trace {len(in_fields)} inputs")
        else:
            fields[id(layer)] = tuple(
                _through_layer(layer, axis, in_fields[0][axis]) for axis in (0, 1)
            )
    last = model.get_layer(output_name) if output_name else model.layers[-1]
    rows, cols = fields[id(last)]
    if rows != cols:
        raise ValueError(f"receptive field is not square: rows {rows}, cols {cols}")
    return ReceptiveField(size=rows.size, stride=rows.stride, padding=-rows.start)


def _input_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    if isinstance(layer, keras.layers.InputLayer):
        return []
    tensors = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
    return [tensor._keras_history.operation for tensor in tensors]


def _through_layer(layer: keras.layers.Layer, axis: int, field: _Field) -> _Field:
    if isinstance(layer, _POINTWISE):
        return field
    if isinstance(layer, keras.layers.ZeroPadding2D):
        (top, _), (left, _) = layer.padding
        return _Field(field.size, field.stride, field.start - (top, left)[axis] * field.stride)
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
        kernel, stride = layer.kernel_size[axis], layer.strides[axis]
        dilation = layer.dilation_rate[axis]
    elif isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
        kernel, stride, dilation = layer.pool_size[axis], layer.strides[axis], 1
    else:
        raise ValueError(
            f"layer {layer.name!r} ({type(layer).__name__}) has no known receptive-field rule"
        )
    pad_before = 0
    if layer.padding == "same":
        extent = dilation * (kernel - 1) + 1
        pad_before = max(extent - stride, 0) // 2
    return field.through_window(kernel, stride, dilation, pad_before)
