"""Reverse-mode differentiation of an ONNX subgraph (the head: target tensor -> logits) with
standard ONNX ops only, one rule per op type (`RULES`).

A rule reads the node, the gradient of its outputs and the forward tensors (which stay in the
graph: nothing is recomputed) and writes nodes that give the gradient of each input that depends
on the target. Gradients of several readers of a tensor are summed. Float32 only. Spatial sizes
of the convolution and pooling layers must be known (shape inference): they fix the transposed
convolutions' output padding; the batch dimension may stay dynamic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        value=_int_tensor(1)), b.op("Shape", [x])], axis=0)
    one = b.ints([1])
    stretched = b.op("And", [b.op("Equal", [padded, one]),
                             b.op("Not", [b.op("Equal", [b.op("Shape", [grad]), one])])])
    axes = b.op("Reshape", [b.op("NonZero", [stretched]), b.ints([-1])])
    summed = b.op("ReduceSum", [grad, axes], keepdims=1, noop_with_empty_axes=1)
    return b.op("Reshape", [summed, b.op("Shape", [x])])


def _int_tensor(value: int):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array([value], np.int64))


def _mask(ctx: Context, condition: str, grad: str) -> str:
    """grad where `condition` (bool) holds, else 0."""
    b = ctx.builder
    return b.op("Where", [condition, grad, b.const(0.0)])


def _out(node, grads):
    return grads[0]


# --- rules: rule(ctx, node, grads) -> gradient per input (None where not needed) ------------

def _identity(ctx, node, grads):
    return [_out(node, grads)] + [None] * (len(node.input) - 1)


def _reshape_like_input(ctx, node, grads):
    """Flatten, Reshape, Squeeze, Unsqueeze: the gradient takes the input's shape back."""
    b = ctx.builder
    return [b.op("Reshape", [grads[0], b.op("Shape", [node.input[0]])])] + \
        [None] * (len(node.input) - 1)


def _add(ctx, node, grads):
    return [unbroadcast(ctx, grads[0], x, node.output[0]) for x in node.input]


def _sub(ctx, node, grads):
    b = ctx.builder
    a, c = node.input
    return [unbroadcast(ctx, grads[0], a, node.output[0]),
            unbroadcast(ctx, b.op("Neg", [grads[0]]), c, node.output[0])]


def _mul(ctx, node, grads):
    b = ctx.builder
    a, c = node.input
    return [unbroadcast(ctx, b.op("Mul", [grads[0], c]), a, node.output[0]),
            unbroadcast(ctx, b.op("Mul", [grads[0], a]), c, node.output[0])]


def _div(ctx, node, grads):
    b = ctx.builder
    a, c = node.input
    ga = b.op("Div", [grads[0], c])
    gc = b.op("Neg", [b.op("Mul", [ga, node.output[0]])])  # -g a / c^2 = -(g / c) y
    return [unbroadcast(ctx, ga, a, node.output[0]), unbroadcast(ctx, gc, c, node.output[0])]


def _relu(ctx, node, grads):
    b = ctx.builder
    return [_mask(ctx, b.op("Greater", [node.input[0], b.const(0.0)]), grads[0])]


def _leaky_relu(ctx, node, grads):
    b = ctx.builder
    alpha = float(attribute(node, "alpha", 0.01))
    positive = b.op("Greater", [node.input[0], b.const(0.0)])
    return [b.op("Where", [positive, grads[0], b.op("Mul", [grads[0], b.const(alpha)])])]


def _clip(ctx, node, grads):
    """Pass-through strictly between the bounds (as TensorFlow's Relu6Grad)."""
    b = ctx.builder
    x = node.input[0]
    bounds = [node.input[i] if len(node.input) > i and node.input[i] else None for i in (1, 2)]
    if ctx.builder.opset < 11:
        lo, hi = attribute(node, "min"), attribute(node, "max")
        bounds = [None if v is None else b.const(v) for v in (lo, hi)]
    inside = None
    for bound, op_type in zip(bounds, ("Greater", "Less")):
        if bound is None:
            continue
        test = b.op(op_type, [x, bound])
        inside = test if inside is None else b.op("And", [inside, test])
    grad = grads[0] if inside is None else _mask(ctx, inside, grads[0])
    return [grad] + [None] * (len(node.input) - 1)


def _sigmoid(ctx, node, grads):
    b = ctx.builder
    y = node.output[0]
    return [b.op("Mul", [grads[0], b.op("Mul", [y, b.op("Sub", [b.const(1.0), y])])])]


def _hard_sigmoid(ctx, node, grads):
    b = ctx.builder
    alpha = float(attribute(node, "alpha", 0.2))
    beta = float(attribute(node, "beta", 0.5))
    z = b.op("Add", [b.op("Mul", [node.input[0], b.const(alpha)]), b.const(beta)])
    inside = b.op("And", [b.op("Greater", [z, b.const(0.0)]), b.op("Less", [z, b.const(1.0)])])
    return [_mask(ctx, inside, b.op("Mul", [grads[0], b.const(alpha)]))]


def _hard_swish(ctx, node, grads):
    """y = x * clip(x / 6 + 1/2, 0, 1): dy/dx = 0 below -3, 1 above 3, (2x + 3) / 6 between."""
    b = ctx.builder
    x = node.input[0]
    slope = b.op("Add", [b.op("Mul", [x, b.const(1 / 3)]), b.const(0.5)])
    slope = b.op("Where", [b.op("Less", [x, b.const(-3.0)]), b.const(0.0), slope])
    slope = b.op("Where", [b.op("Greater", [x, b.const(3.0)]), b.const(1.0), slope])
    return [b.op("Mul", [grads[0], slope])]


def _tanh(ctx, node, grads):
    b = ctx.builder
    y = node.output[0]
    return [b.op("Mul", [grads[0], b.op("Sub", [b.const(1.0), b.op("Mul", [y, y])])])]


def _exp(ctx, node, grads):
    return [ctx.builder.op("Mul", [grads[0], node.output[0]])]


def _neg(ctx, node, grads):
    return [ctx.builder.op("Neg", [grads[0]])]


def _sqrt(ctx, node, grads):
    b = ctx.builder
    return [b.op("Div", [grads[0], b.op("Mul", [node.output[0], b.const(2.0)])])]


def _erf(ctx, node, grads):
    b = ctx.builder
    x = node.input[0]
    slope = b.op("Mul", [b.op("Exp", [b.op("Neg", [b.op("Mul", [x, x])])]),
                         b.const(2 / np.sqrt(np.pi))])
    return [b.op("Mul", [grads[0], slope])]


def _pow(ctx, node, grads):
    b = ctx.builder
    x, p = node.input
    exponent = ctx.constant(p, node, "the exponent")
    slope = b.op("Mul", [b.op("Pow", [x, b.const(exponent - 1)]), b.const(exponent)])
    return [b.op("Mul", [grads[0], slope]), None]


def _gelu(ctx, node, grads):
    """Gelu (opset 20): exact dy/dx = Phi(x) + x phi(x); tanh form differentiated as written."""
    b = ctx.builder
    x = node.input[0]
    if attribute(node, "approximate", b"none") in (b"tanh", "tanh"):
        c = float(np.sqrt(2 / np.pi))
        x2 = b.op("Mul", [x, x])
        inner = b.op("Mul", [b.op("Mul", [x, b.op("Add", [b.const(1.0), b.op(
            "Mul", [x2, b.const(0.044715)])])]), b.const(c)])
        t = b.op("Tanh", [inner])
        dinner = b.op("Mul", [b.op("Add", [b.const(1.0), b.op("Mul", [x2, b.const(3 * 0.044715)])]),
                              b.const(c)])
        slope = b.op("Add", [b.op("Mul", [b.op("Add", [b.const(1.0), t]), b.const(0.5)]),
                             b.op("Mul", [b.op("Mul", [b.op("Mul", [x, b.const(0.5)]), b.op(
                                 "Sub", [b.const(1.0), b.op("Mul", [t, t])])]), dinner])])
    else:
        cdf = b.op("Mul", [b.op("Add", [b.const(1.0), b.op("Erf", [
            b.op("Mul", [x, b.const(1 / np.sqrt(2))])])]), b.const(0.5)])
        pdf = b.op("Mul", [b.op("Exp", [b.op("Mul", [b.op("Mul", [x, x]), b.const(-0.5)])]),
                           b.const(1 / np.sqrt(2 * np.pi))])
        slope = b.op("Add", [cdf, b.op("Mul", [x, pdf])])
    return [b.op("Mul", [grads[0], slope])]


def _softmax(ctx, node, grads):
    """dx = y * (g - sum(g * y, axis)) (opset >= 13: one axis)."""
    b = ctx.builder
    y = node.output[0]
    axis = int(attribute(node, "axis", -1))
    dot = b.reduce("ReduceSum", b.op("Mul", [grads[0], y]), [axis], keepdims=True)
    return [b.op("Mul", [y, b.op("Sub", [grads[0], dot])])]


def _batch_norm(ctx, node, grads):
    """Inference BatchNormalization: dx = g * scale / sqrt(var + eps), per channel (axis 1)."""
    b = ctx.builder
    if len([o for o in node.output if o]) > 1 or attribute(node, "training_mode", 0):
        raise ModelError(f"node {node.name!r}: BatchNormalization in training mode has no rule")
    x, scale, _, _, var = node.input[:5]
    eps = float(attribute(node, "epsilon", 1e-5))
    factor = b.op("Div", [scale, b.op("Sqrt", [b.op("Add", [var, b.const(eps)])])])
    rank = ctx.rank(x) or 4
    if rank > 2:
        factor = b.unsqueeze(factor, list(range(1, rank - 1)))
    return [b.op("Mul", [grads[0], factor]), None, None, None, None]


def _global_average_pool(ctx, node, grads):
    b = ctx.builder
    x = node.input[0]
    spread = b.op("Expand", [grads[0], b.op("Shape", [x])])
    return [b.op("Div", [spread, b.count(x, node.output[0])])]


def _global_max_pool(ctx, node, grads):
    """The gradient shared among the positions that hold the maximum."""
    from onnx import TensorProto

    b = ctx.builder
    x = node.input[0]
    hits = b.op("Cast", [b.op("Equal", [x, node.output[0]])], to=TensorProto.FLOAT)
    rank = ctx.rank(x) or 4
    ties = b.reduce("ReduceSum", hits, list(range(2, rank)), keepdims=True)
    return [b.op("Mul", [hits, b.op("Div", [grads[0], ties])])]


def _reduce_axes(ctx, node):
    """(axes normalised to non-negative, keepdims) of a Reduce* node."""
    rank = ctx.rank(node.input[0])
    axes = attribute(node, "axes")
    if len(node.input) > 1 and node.input[1]:
        axes = ctx.constant(node.input[1], node, "the axes").tolist()
    if axes is None or len(axes) == 0:
        if attribute(node, "noop_with_empty_axes", 0):
            return None, True
        if rank is None:
            raise ModelError(f"node {node.name!r}: unknown rank")
        axes = list(range(rank))
    if rank is None and any(a < 0 for a in axes):
        raise ModelError(f"node {node.name!r}: negative axes of a tensor of unknown rank")
    return sorted(a % rank if rank else a for a in axes), bool(attribute(node, "keepdims", 1))


def _reduce(ctx, node, grads, mean: bool):
    b = ctx.builder
    x = node.input[0]
    axes, keepdims = _reduce_axes(ctx, node)
    if axes is None:
        return [grads[0]] + [None] * (len(node.input) - 1)
    grad = grads[0] if keepdims else b.unsqueeze(grads[0], axes)
    spread = b.op("Expand", [grad, b.op("Shape", [x])])
    if mean:
        spread = b.op("Div", [spread, b.count(x, node.output[0])])
    return [spread] + [None] * (len(node.input) - 1)


def _reduce_max(ctx, node, grads):
    from onnx import TensorProto

    b = ctx.builder
    x = node.input[0]
    axes, keepdims = _reduce_axes(ctx, node)
    top = node.output[0] if keepdims else b.unsqueeze(node.output[0], axes)
    grad = grads[0] if keepdims else b.unsqueeze(grads[0], axes)
    hits = b.op("Cast", [b.op("Equal", [x, top])], to=TensorProto.FLOAT)
    ties = b.reduce("ReduceSum", hits, axes, keepdims=True)
    return [b.op("Mul", [hits, b.op("Div", [grad, ties])])] + [None] * (len(node.input) - 1)


def _transpose(ctx, node, grads):
    perm = attribute(node, "perm")
    if perm is None:
        perm = list(reversed(range(ctx.rank(node.input[0]))))
    inverse = [int(i) for i in np.argsort(perm)]
    return [ctx.builder.op("Transpose", [grads[0]], perm=inverse)]


def _concat(ctx, node, grads):
    b = ctx.builder
    axis = int(attribute(node, "axis"))
    sizes = [b.op("Gather", [b.op("Shape", [x]), b.ints([axis])]) for x in node.input]
    parts = b.op("Split", [grads[0], b.op("Concat", sizes, axis=0)], outputs=len(node.input),
                 axis=axis)
    return [parts] if len(node.input) == 1 else list(parts)


def _matmul(ctx, node, grads):
    """numpy matmul of rank >= 2 operands: dA = g B^T, dB = A^T g, summed over the leading
    axes an operand of lower rank was broadcast along."""
    b = ctx.builder
    a, c = node.input
    ranks = [ctx.rank(a), ctx.rank(c)]
    if None in ranks or min(ranks) < 2:
        raise ModelError(f"node {node.name!r} (MatMul): only operands of known rank >= 2 have "
                         f"a rule (ranks {ranks})")
    rank = max(ranks)
    for x in (a, c):
        shape, out = ctx.shape(x), ctx.shape(node.output[0])
        lead = rank - len(shape)
        if any(d == 1 and out[lead + i] != 1 for i, d in enumerate(shape[:-2])):
            raise ModelError(f"node {node.name!r} (MatMul): batch axes of size 1 broadcast "
                             "have no rule")

    def swap(t, r):
        return b.op("Transpose", [t], perm=list(range(r - 2)) + [r - 1, r - 2])

    def reduce_to(product, x, r):
        if r == rank:
            return product
        summed = b.reduce("ReduceSum", product, list(range(rank - r)), keepdims=False)
        return b.op("Reshape", [summed, b.op("Shape", [x])])

    ga = reduce_to(b.op("MatMul", [grads[0], swap(c, ranks[1])]), a, ranks[0])
    gc = reduce_to(b.op("MatMul", [swap(a, ranks[0]), grads[0]]), c, ranks[1])
    return [ga, gc]


def _gemm(ctx, node, grads):
    """Y = alpha A' B' + beta C (A' = A^T when transA, B' likewise)."""
    b = ctx.builder
    a, c = node.input[:2]
    alpha, beta = float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))
    trans_a, trans_b = int(attribute(node, "transA", 0)), int(attribute(node, "transB", 0))
    g = grads[0]
    # dA' = alpha g B'^T and dB' = alpha A'^T g; transposed back when the operand was.
    if trans_a:
        ga = b.op("Gemm", [c, g], alpha=alpha, transA=trans_b, transB=1)
    else:
        ga = b.op("Gemm", [g, c], alpha=alpha, transB=1 - trans_b)
    if trans_b:
        gb = b.op("Gemm", [g, a], alpha=alpha, transA=1, transB=trans_a)
    else:
        gb = b.op("Gemm", [a, g], alpha=alpha, transA=1 - trans_a)
    result = [ga, gb]
    if len(node.input) > 2 and node.input[2]:
        scaled = g if beta == 1.0 else b.op("Mul", [g, b.const(beta)])
        result.append(unbroadcast(ctx, scaled, node.input[2], node.output[0]))
    return result


def _spatial(node, ctx: Context, x: str, kernel: Sequence[int]):
    """(strides, dilations, pads [begin..., end...]) with auto_pad resolved on static shapes."""
    dims = len(kernel)
    strides = list(attribute(node, "strides", [1] * dims))
    dilations = list(attribute(node, "dilations", [1] * dims))
    pads = list(attribute(node, "pads", [0] * (2 * dims)))
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        size = ctx.static(x, node, "input")[2:]
        pads = [0] * (2 * dims)
        for i in range(dims):
            out = -(-size[i] // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size[i], 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + dims] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    elif auto_pad == "VALID":
        pads = [0] * (2 * dims)
    return strides, dilations, pads


def _transpose_conv(ctx, node, grad, x, weights, kernel, group):
    """The input gradient of a convolution: ConvTranspose with the same weights, padded back to
    the input's spatial size."""
    strides, dilations, pads = _spatial(node, ctx, x, kernel)
    size = ctx.static(x, node, "input")[2:]
    out = ctx.static(node.output[0], node, "output")[2:]
    dims = len(kernel)
    output_padding = [size[i] - ((out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
                                 - pads[i] - pads[i + dims]) for i in range(dims)]
    attrs = dict(strides=strides, dilations=dilations, pads=pads, group=group,
                 kernel_shape=list(kernel))
    if any(output_padding):
        attrs["output_padding"] = output_padding
    return ctx.builder.op("ConvTranspose", [grad, weights], **attrs)


def _conv(ctx, node, grads):
    x, weights = node.input[:2]
    shape = ctx.static(weights, node, "weight")
    kernel = attribute(node, "kernel_shape", shape[2:])
    group = int(attribute(node, "group", 1))
    gx = _transpose_conv(ctx, node, grads[0], x, weights, kernel, group)
    return [gx] + [None] * (len(node.input) - 1)


def _average_pool(ctx, node, grads):
    """Each output's gradient shared equally over its window: a transposed convolution with a
    ones kernel per channel (group = C), divided by the window's count first."""
    b = ctx.builder
    x = node.input[0]
    if attribute(node, "ceil_mode", 0):
        raise ModelError(f"node {node.name!r}: AveragePool with ceil_mode has no rule")
    kernel = list(attribute(node, "kernel_shape"))
    channels = ctx.static(x, node, "input")[1]
    ones = b.const(np.ones([channels, 1, *kernel], np.float32))
    strides, dilations, pads = _spatial(node, ctx, x, kernel)
    grad = grads[0]
    if attribute(node, "count_include_pad", 0) or not any(pads):
        grad = b.op("Mul", [grad, b.const(1.0 / float(np.prod(kernel)))])
    else:  # the count of real (unpadded) inputs under each window
        window = b.op("AveragePool", [b.op("ConstantOfShape", [b.op("Shape", [x])],
                                           value=_float_tensor(1.0))],
                      kernel_shape=kernel, strides=strides, pads=pads, count_include_pad=1)
        counts = b.op("Mul", [window, b.const(float(np.prod(kernel)))])
        grad = b.op("Div", [grad, counts])
    padded = _transpose_conv(ctx, node, grad, x, ones, kernel, channels)
    return [padded]


def _float_tensor(value: float):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array([value], np.float32))


def _max_pool(ctx, node, grads):
    """The gradient goes to the max of each window (first one on ties): MaxPool's indices, then
    ScatterElements(add) into zeros (opset >= 16)."""
    b = ctx.builder
    if b.opset < 16:
        raise ModelError(f"node {node.name!r}: the MaxPool gradient needs opset >= 16 "
                         f"(the model has {b.opset})")
    if int(attribute(node, "storage_order", 0)):
        raise ModelError(f"node {node.name!r}: MaxPool with storage_order 1 has no rule")
    x = node.input[0]
    attrs = {a.name: attribute(node, a.name) for a in node.attribute}
    _, indices = b.op("MaxPool", [x], outputs=2, **attrs)
    flat = b.ints([-1])
    zeros = b.op("ConstantOfShape", [b.op("Reshape", [b.op("Size", [x]), flat])],
                 value=_float_tensor(0.0))
    scattered = b.op("ScatterElements", [zeros, b.op("Reshape", [indices, flat]),
                                         b.op("Reshape", [grads[0], flat])],
                     axis=0, reduction="add")
    return [b.op("Reshape", [scattered, b.op("Shape", [x])])]


Rule = Callable[[Context, object, list], list]

# op type -> rule. Inputs a rule returns None for (shapes, axes, weights) are not differentiated.
RULES: dict[str, Rule] = {
    "Identity": _identity,
    "Dropout": _identity,
    "Cast": _identity,  # float -> float only (checked where the head is read)
    "Flatten": _reshape_like_input,
    "Reshape": _reshape_like_input,
    "Squeeze": _reshape_like_input,
    "Unsqueeze": _reshape_like_input,
    "Add": _add,
    "Sub": _sub,
    "Mul": _mul,
    "Div": _div,
    "Neg": _neg,
    "Relu": _relu,
    "LeakyRelu": _leaky_relu,
    "Clip": _clip,
    "Sigmoid": _sigmoid,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "Tanh": _tanh,
    "Exp": _exp,
    "Sqrt": _sqrt,
    "Erf": _erf,
    "Pow": _pow,
    "Gelu": _gelu,
    "Softmax": _softmax,
    "BatchNormalization": _batch_norm,
    "GlobalAveragePool": _global_average_pool,
    "GlobalMaxPool": _global_max_pool,
    "ReduceMean": lambda ctx, node, grads: _reduce(ctx, node, grads, mean=True),
    "ReduceSum": lambda ctx, node, grads: _reduce(ctx, node, grads, mean=False),
    "ReduceMax": _reduce_max,
    "AveragePool": _average_pool,
    "MaxPool": _max_pool,
    "Transpose": _transpose,
    "Concat": _concat,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
}
# Only these inputs of an op carry gradient (others are shapes, axes, bounds, exponents).
DIFFERENTIABLE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Clip": (0,), "Pow": (0,),
    "BatchNormalization": (0,), "ReduceMean": (0,), "ReduceSum": (0,), "ReduceMax": (0,),
    "Conv": (0,), "Dropout": (0,),
}
