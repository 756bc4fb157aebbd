"""`camface.methods.Ops` as ONNX nodes: the registry's heatmap equations inside an ONNX graph.

`OnnxTensor` is a handle on one float32 tensor of a `GraphBuilder`; its Python operators
(+ - * / ** and unary -, with scalars or other handles on either side) append nodes.
`ONNX_OPS` implements the `Ops` namespace on such handles, so `method.compute(ONNX_OPS, A, g, w)`
writes a heatmap's nodes (numpy semantics: broadcasting, `axis` an int or a tuple, `keepdims`).

Adding an op: one method here (usually one line: `_unary("Onnx Op")` or a builder call) and a
row in tests/test_onnx_ops.py's table, which checks every op against `camface.methods.NumpyOps`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from camface.export.onnx_builder import GraphBuilder


class OnnxTensor:
    """A float32 tensor named `name` in `builder`'s graph (rank, when known, in `rank`)."""

    __array_priority__ = 1000  # numpy scalars on the left defer to our reflected operators

    def __init__(self, builder: GraphBuilder, name: str, shape: tuple | None = None):
        self.builder, self.name = builder, name
        self.shape = shape  # static shape where the caller knows it (None for unknown dims)

    def _lift(self, other) -> str:
        if isinstance(other, OnnxTensor):
            return other.name
        return self.builder.const(np.asarray(other, np.float32))

    def _binary(self, op_type: str, other, reflected: bool = False) -> "OnnxTensor":
        a, b = self.name, self._lift(other)
        if reflected:
            a, b = b, a
        return OnnxTensor(self.builder, self.builder.op(op_type, [a, b]))

    def __add__(self, other):
        return self._binary("Add", other)

    def __radd__(self, other):
        return self._binary("Add", other, reflected=True)

    def __sub__(self, other):
        return self._binary("Sub", other)

    def __rsub__(self, other):
        return self._binary("Sub", other, reflected=True)

    def __mul__(self, other):
        return self._binary("Mul", other)

    def __rmul__(self, other):
        return self._binary("Mul", other, reflected=True)

    def __truediv__(self, other):
        return self._binary("Div", other)

    def __rtruediv__(self, other):
        return self._binary("Div", other, reflected=True)

    def __pow__(self, other):
        return self._binary("Pow", other)

    def __matmul__(self, other):
        return self._binary("MatMul", other)

    def __neg__(self):
        return OnnxTensor(self.builder, self.builder.op("Neg", [self.name]))

    def __repr__(self) -> str:
        return f"OnnxTensor({self.name!r})"


def _axes(axis) -> list[int] | None:
    if axis is None:
        return None
    return [int(a) for a in axis] if isinstance(axis, Sequence) else [int(axis)]


def _unary(op_type: str):
    def method(self, x):
        return OnnxTensor(x.builder, x.builder.op(op_type, [x.name]))

    method.__doc__ = f"Elementwise ONNX {op_type}."
    return method


def _reduction(op_type: str):
    def method(self, x, axis=None, keepdims=False):
        return OnnxTensor(x.builder, x.builder.reduce(op_type, x.name, _axes(axis), keepdims))

    method.__doc__ = f"ONNX {op_type} over `axis` (None: all), numpy's keepdims."
    return method


def _handle(x, like: OnnxTensor) -> OnnxTensor:
    return x if isinstance(x, OnnxTensor) else OnnxTensor(like.builder, like._lift(x))


class OnnxOps:
    """`camface.methods.Ops` on `OnnxTensor` handles (float32). Besides the protocol's sum,
    mean, relu, square and safe_divide it offers numpy-named extras for methods to come."""

    sum = _reduction("ReduceSum")
    mean = _reduction("ReduceMean")
    max = _reduction("ReduceMax")
    min = _reduction("ReduceMin")
    prod = _reduction("ReduceProd")
    relu = _unary("Relu")
    sqrt = _unary("Sqrt")
    abs = _unary("Abs")
    exp = _unary("Exp")
    log = _unary("Log")
    sign = _unary("Sign")
    tanh = _unary("Tanh")
    sigmoid = _unary("Sigmoid")
    negative = _unary("Neg")
    floor = _unary("Floor")

    def cumsum(self, x, axis):
        """Inclusive cumulative sum along one axis (an int), as numpy.cumsum."""
        return OnnxTensor(x.builder, x.builder.op("CumSum", [x.name, x.builder.const(int(axis), np.int64)]))

    def square(self, x):
        return x * x

    def safe_divide(self, numerator, denominator):
        """numerator / denominator where denominator != 0, else 0 (as `NumpyOps`)."""
        like = numerator if isinstance(numerator, OnnxTensor) else denominator
        b = like.builder
        num, den = _handle(numerator, like).name, _handle(denominator, like).name
        zero, one = b.const(0.0), b.const(1.0)
        nonzero = b.op("Not", [b.op("Equal", [den, zero])])
        safe = b.op("Where", [nonzero, den, one])
        return OnnxTensor(b, b.op("Where", [nonzero, b.op("Div", [num, safe]), zero]))

    def maximum(self, a, b):
        like = a if isinstance(a, OnnxTensor) else b
        return OnnxTensor(like.builder, like.builder.op(
            "Max", [_handle(a, like).name, _handle(b, like).name]))

    def minimum(self, a, b):
        like = a if isinstance(a, OnnxTensor) else b
        return OnnxTensor(like.builder, like.builder.op(
            "Min", [_handle(a, like).name, _handle(b, like).name]))

    def clip(self, x, lower, upper):
        return self.minimum(self.maximum(x, lower), upper)

    def matmul(self, a, b):
        """numpy.matmul (batched over leading axes, broadcasting)."""
        like = a if isinstance(a, OnnxTensor) else b
        return OnnxTensor(like.builder, like.builder.op(
            "MatMul", [_handle(a, like).name, _handle(b, like).name]))

    def transpose(self, x, axes):
        """numpy.transpose with an explicit permutation `axes`."""
        return OnnxTensor(x.builder, x.builder.op("Transpose", [x.name],
                                                  perm=[int(a) for a in axes]))

    def reshape(self, x, shape):
        """numpy.reshape; `shape` ints, -1 at most once."""
        return OnnxTensor(x.builder, x.builder.op("Reshape", [x.name, x.builder.ints(shape)]))

    def take(self, x, indices, axis):
        """numpy.take: x's entries at int64 `indices` (a handle or ints) along `axis`."""
        b = x.builder
        index = indices.name if isinstance(indices, OnnxTensor) else b.const(np.asarray(indices), np.int64)
        return OnnxTensor(b, b.op("Gather", [x.name, index], axis=int(axis)))

    def one_hot(self, indices, depth):
        """float32 [B, depth]: row b one at int64 indices[b] (a handle or ints), zero elsewhere."""
        b = indices.builder
        return OnnxTensor(b, b.op("OneHot", [indices.name, b.const(int(depth), np.int64), b.const([0.0, 1.0])],
                                  axis=-1))

    def expand_dims(self, x, axis):
        return OnnxTensor(x.builder, x.builder.unsqueeze(x.name, _axes(axis)))

    def squeeze(self, x, axis):
        return OnnxTensor(x.builder, x.builder.squeeze(x.name, _axes(axis)))


ONNX_OPS = OnnxOps()
