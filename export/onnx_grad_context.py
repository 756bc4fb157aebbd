"""What every gradient rule of `onnx_grad` reads and shares: the `Context` (builder, shapes,
constants), node attributes, and summing a gradient back over broadcast axes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from camface.errors import ModelError
from camface.export.onnx_builder import GraphBuilder

Dim = int | str | None  # a static size, a symbolic one (dim_param) or unknown


@dataclass
class Context:
    """What a rule may read: the builder to write to, tensor shapes, the node's attributes."""

    builder: GraphBuilder
    shapes: dict[str, list[Dim] | None]
    constants: dict[str, np.ndarray]

    def shape(self, name: str) -> list[Dim] | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def static(self, name: str, node, what: str) -> list[int]:
        """The fully known shape of `name`, or ModelError naming the node."""
        shape = self.shape(name)
        if shape is None or not all(isinstance(d, int) for d in shape[1:]):
            raise ModelError(f"node {node.name!r} ({node.op_type}): the gradient needs the "
                             f"{what} shape of {name!r}, which shape inference left unknown "
                             f"({shape})")
        return shape

    def constant(self, name: str, node, what: str) -> np.ndarray:
        if name not in self.constants:
            raise ModelError(f"node {node.name!r} ({node.op_type}): {what} ({name!r}) must be "
                             "a constant for its gradient")
        return self.constants[name]


def attribute(node, name: str, default=None):
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


# --- helpers -------------------------------------------------------------------------------

def unbroadcast(ctx: Context, grad: str, x: str, out: str) -> str:
    """Sum `grad` (shaped like `out`) over the axes numpy broadcasting stretched `x` along."""
    b = ctx.builder
    xs, ys = ctx.shape(x), ctx.shape(out)
    if xs is not None and ys is not None and len(xs) == len(ys) and all(
            d1 == d2 and d1 is not None for d1, d2 in zip(xs, ys)):
        return grad
    if xs is not None and ys is not None and all(
            isinstance(d, int) for d in xs + ys[len(ys) - len(xs):]) and len(ys) >= len(xs):
        lead = len(ys) - len(xs)
        axes = list(range(lead)) + [lead + i for i, d in enumerate(xs)
                                    if d == 1 and ys[lead + i] != 1]
        if not axes:
            return grad
        summed = b.reduce("ReduceSum", grad, axes, keepdims=True)
        return b.op("Reshape", [summed, b.op("Shape", [x])]) if lead or xs != ys else summed
    # Ranks only (or less) known: the broadcast axes are found at run time.
    rank = max(len(ys) if ys else 0, len(xs) if xs else 0)
    if not rank:
        raise ModelError(f"cannot tell how {x!r} was broadcast to {out!r}: unknown ranks")
    padded = b.op("Concat", [b.op("ConstantOfShape", [b.op("Sub", [
        b.ints([rank]), b.op("Shape", [b.op("Shape", [x])])])],
        value=int_tensor(1)), b.op("Shape", [x])], axis=0)
    one = b.ints([1])
    stretched = b.op("And", [b.op("Equal", [padded, one]),
                             b.op("Not", [b.op("Equal", [b.op("Shape", [grad]), one])])])
    axes = b.op("Reshape", [b.op("NonZero", [stretched]), b.ints([-1])])
    summed = b.op("ReduceSum", [grad, axes], keepdims=1, noop_with_empty_axes=1)
    return b.op("Reshape", [summed, b.op("Shape", [x])])


def int_tensor(value: int):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array([value], np.int64))


def mask(ctx: Context, condition: str, grad: str) -> str:
    """grad where `condition` (bool) holds, else 0."""
    b = ctx.builder
    return b.op("Where", [condition, grad, b.const(0.0)])


def positions(ctx: Context, x: str) -> str:
    """int64 tensor shaped like `x` holding each element's flat (row-major) index: an op that
    only moves elements (Gather, Slice, MaxPool's indices) applied to it says where each of its
    outputs came from. An empty `x` too: from opset 14 a Range reshaped with allowzero (without
    it Reshape takes a 0 in the shape for "keep the input's size" and refuses the empty Range);
    below, where `x`'s rank is known, each axis's index (an exclusive CumSum of ones along it)
    folded in row-major order, (i0 d1 + i1) d2 + i2 ..., which no 0 in the shape upsets."""
    b = ctx.builder
    rank = ctx.rank(x)
    if b.opset >= 14 or not rank:
        flat = b.op("Range", [b.const(0, np.int64), b.op("Size", [x]), b.const(1, np.int64)])
        return b.op("Reshape", [flat, b.op("Shape", [x])],
                    **({"allowzero": 1} if b.opset >= 14 else {}))
    shape = b.op("Shape", [x])
    ones = b.op("ConstantOfShape", [shape], value=int_tensor(1))
    found = None
    for axis in range(rank):
        index = b.op("CumSum", [ones, b.const(axis, np.int64)], exclusive=1)
        if found is not None:
            size = b.op("Gather", [shape, b.const(axis, np.int64)])
            index = b.op("Add", [b.op("Mul", [found, size]), index])
        found = index
    return found


def scatter(ctx: Context, x: str, where: str, grad: str, add: bool) -> str:
    """A tensor shaped like `x`, zero but at the flat indices `where` (shaped like `grad`), which
    receive `grad`; summed where an index repeats when `add` (ScatterElements' reduction, opset
    >= 16), else each index must come once."""
    b = ctx.builder
    flat = b.ints([-1])
    zeros = b.op("ConstantOfShape", [b.op("Reshape", [b.op("Size", [x]), flat])],
                 value=float_tensor(0.0))
    attrs = {"reduction": "add"} if add else {}
    scattered = b.op("ScatterElements", [zeros, b.op("Reshape", [where, flat]),
                                         b.op("Reshape", [grad, flat])], axis=0, **attrs)
    return b.op("Reshape", [scattered, b.op("Shape", [x])])



def float_tensor(value: float):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array([value], np.float32))
