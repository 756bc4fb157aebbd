"""Gradient rules of element-wise arithmetic (Add ... Max, Min, Sum, Mean), the ReLU family
(ThresholdedRelu and Shrink included), sigmoids, Tanh, Exp, Sqrt, Erf, Pow, Gelu, and shape ops (see
`onnx_grad`): rule(ctx, node, grads) -> the gradient of each input, None where not needed."""

from __future__ import annotations

import numpy as np

from camface.errors import ModelError
from camface.export.onnx_grad_context import (attribute, float_tensor, mask, positions, scatter,
                                               unbroadcast)

def identity(ctx, node, grads):
    return [grads[0]] + [None] * (len(node.input) - 1)


def reshape_like_input(ctx, node, grads):
    """Flatten, Reshape, Squeeze, Unsqueeze: the gradient takes the input's shape back."""
    b = ctx.builder
    return [b.op("Reshape", [grads[0], b.op("Shape", [node.input[0]])])] + \
        [None] * (len(node.input) - 1)


def add(ctx, node, grads):
    return [unbroadcast(ctx, grads[0], x, node.output[0]) for x in node.input]


def sub(ctx, node, grads):
    b = ctx.builder
    a, c = node.input
    return [unbroadcast(ctx, grads[0], a, node.output[0]),
            unbroadcast(ctx, b.op("Neg", [grads[0]]), c, node.output[0])]


def mul(ctx, node, grads):
    b = ctx.builder
    a, c = node.input
    return [unbroadcast(ctx, b.op("Mul", [grads[0], c]), a, node.output[0]),
            unbroadcast(ctx, b.op("Mul", [grads[0], a]), c, node.output[0])]


def div(ctx, node, grads):
    b = ctx.builder
    a, c = node.input
    ga = b.op("Div", [grads[0], c])
    gc = b.op("Neg", [b.op("Mul", [ga, node.output[0]])])  # -g a / c^2 = -(g / c) y
    return [unbroadcast(ctx, ga, a, node.output[0]), unbroadcast(ctx, gc, c, node.output[0])]


def sum_(ctx, node, grads):
    """Sum of any number of inputs (broadcast): g to each."""
    return [unbroadcast(ctx, grads[0], x, node.output[0]) for x in node.input]


def mean(ctx, node, grads):
    """Mean of any number of inputs (broadcast): g / n to each."""
    share = ctx.builder.op("Mul", [grads[0], ctx.builder.const(1.0 / len(node.input))])
    return [unbroadcast(ctx, share, x, node.output[0]) for x in node.input]


def extremum(ctx, node, grads):
    """Max / Min of any number of inputs (broadcast): g to the inputs equal to the result,
    shared equally among tied ones. torch.maximum / torch.minimum give each of two tied inputs
    half (the same rule for two inputs); a tie is rare but a ReLU-like max(x, 0) meets it."""
    from onnx import TensorProto

    b = ctx.builder
    y = node.output[0]
    if len(node.input) == 1:
        return [grads[0]]
    hits = [b.op("Cast", [b.op("Equal", [x, y])], to=TensorProto.FLOAT) for x in node.input]
    share = b.op("Div", [grads[0], b.op("Sum", hits)])  # hits and their sum: y's shape
    return [unbroadcast(ctx, b.op("Mul", [hit, share]), x, y) for hit, x in zip(hits, node.input)]


def relu(ctx, node, grads):
    b = ctx.builder
    return [mask(ctx, b.op("Greater", [node.input[0], b.const(0.0)]), grads[0])]


def leaky_relu(ctx, node, grads):
    b = ctx.builder
    alpha = float(attribute(node, "alpha", 0.01))
    positive = b.op("Greater", [node.input[0], b.const(0.0)])
    return [b.op("Where", [positive, grads[0], b.op("Mul", [grads[0], b.const(alpha)])])]


def thresholded_relu(ctx, node, grads):
    """y = x where x > alpha, else 0 (torch's F.threshold(x, alpha, 0))."""
    b = ctx.builder
    alpha = float(attribute(node, "alpha", 1.0))
    return [mask(ctx, b.op("Greater", [node.input[0], b.const(alpha)]), grads[0])]


def shrink(ctx, node, grads):
    """Shrink (torch's hardshrink, softshrink): y = x + bias below -lambd, x - bias above
    lambd, 0 between: the gradient passes where |x| > lambd."""
    b = ctx.builder
    lambd = float(attribute(node, "lambd", 0.5))
    return [mask(ctx, b.op("Greater", [b.op("Abs", [node.input[0]]), b.const(lambd)]), grads[0])]


def prelu(ctx, node, grads):
    """PRelu(x, slope): the gradient passes where x > 0, times the (broadcast) slope elsewhere.
    The slope is a weight (ArcFace's IResNet blocks); where it is computed from the target, its
    own gradient is g x where x <= 0, summed over the axes it was broadcast along."""
    b = ctx.builder
    x, slope = node.input
    positive = b.op("Greater", [x, b.const(0.0)])
    gx = b.op("Where", [positive, grads[0], b.op("Mul", [grads[0], slope])])
    if slope in ctx.constants:
        return [gx, None]
    gs = b.op("Where", [positive, b.const(0.0), b.op("Mul", [grads[0], x])])
    return [gx, unbroadcast(ctx, gs, slope, node.output[0])]


def clip(ctx, node, grads):
    """Pass-through strictly between the bounds (as TensorFlow's Relu6Grad). A bound computed
    from the target (torch.clamp(x, min=t)) takes the gradient where x lies beyond it, summed
    over the axes it was broadcast along."""
    b = ctx.builder
    x = node.input[0]
    bounds = [node.input[i] if len(node.input) > i and node.input[i] else None for i in (1, 2)]
    if ctx.builder.opset < 11:
        lo, hi = attribute(node, "min"), attribute(node, "max")
        bounds = [None if v is None else b.const(v) for v in (lo, hi)]
    inside, beyond = None, [None, None]
    for k, (bound, op_type, past) in enumerate(zip(bounds, ("Greater", "Less"), ("Less", "Greater"))):
        if bound is None:
            continue
        test = b.op(op_type, [x, bound])
        inside = test if inside is None else b.op("And", [inside, test])
        if bound not in ctx.constants and ctx.builder.opset >= 11:
            beyond[k] = unbroadcast(ctx, mask(ctx, b.op(past, [x, bound]), grads[0]), bound,
                                    node.output[0])
    grad = grads[0] if inside is None else mask(ctx, inside, grads[0])
    return [grad, *beyond][:len(node.input)]


def sigmoid(ctx, node, grads):
    b = ctx.builder
    y = node.output[0]
    return [b.op("Mul", [grads[0], b.op("Mul", [y, b.op("Sub", [b.const(1.0), y])])])]


def hard_sigmoid(ctx, node, grads):
    b = ctx.builder
    alpha = float(attribute(node, "alpha", 0.2))
    beta = float(attribute(node, "beta", 0.5))
    z = b.op("Add", [b.op("Mul", [node.input[0], b.const(alpha)]), b.const(beta)])
    inside = b.op("And", [b.op("Greater", [z, b.const(0.0)]), b.op("Less", [z, b.const(1.0)])])
    return [mask(ctx, inside, b.op("Mul", [grads[0], b.const(alpha)]))]


def hard_swish(ctx, node, grads):
    """y = x * clip(x / 6 + 1/2, 0, 1): dy/dx = 0 below -3, 1 above 3, (2x + 3) / 6 between."""
    b = ctx.builder
    x = node.input[0]
    slope = b.op("Add", [b.op("Mul", [x, b.const(1 / 3)]), b.const(0.5)])
    slope = b.op("Where", [b.op("Less", [x, b.const(-3.0)]), b.const(0.0), slope])
    slope = b.op("Where", [b.op("Greater", [x, b.const(3.0)]), b.const(1.0), slope])
    return [b.op("Mul", [grads[0], slope])]


def tanh(ctx, node, grads):
    b = ctx.builder
    y = node.output[0]
    return [b.op("Mul", [grads[0], b.op("Sub", [b.const(1.0), b.op("Mul", [y, y])])])]


def exp(ctx, node, grads):
    return [ctx.builder.op("Mul", [grads[0], node.output[0]])]


def neg(ctx, node, grads):
    return [ctx.builder.op("Neg", [grads[0]])]


def sqrt(ctx, node, grads):
    b = ctx.builder
    return [b.op("Div", [grads[0], b.op("Mul", [node.output[0], b.const(2.0)])])]


def erf(ctx, node, grads):
    b = ctx.builder
    x = node.input[0]
    slope = b.op("Mul", [b.op("Exp", [b.op("Neg", [b.op("Mul", [x, x])])]),
                         b.const(2 / np.sqrt(np.pi))])
    return [b.op("Mul", [grads[0], slope])]


def power(ctx, node, grads):
    """y = x^p: dy/dx = p x^(p - 1); where p is computed from the target (not a constant),
    dy/dp = y ln x where x > 0 (0 elsewhere, as torch gives at x = 0). Each summed over the
    axes its operand was broadcast along."""
    from onnx import TensorProto

    b = ctx.builder
    x, p = node.input
    y, g = node.output[0], grads[0]
    if p in ctx.constants:
        exponent = np.asarray(ctx.constants[p], np.float64)
        slope = b.op("Mul", [b.op("Pow", [x, b.const(exponent - 1)]), b.const(exponent)])
        return [unbroadcast(ctx, b.op("Mul", [g, slope]), x, y), None]
    exponent = b.op("Cast", [p], to=TensorProto.FLOAT)
    slope = b.op("Mul", [b.op("Pow", [x, b.op("Sub", [exponent, b.const(1.0)])]), exponent])
    positive = b.op("Greater", [x, b.const(0.0)])
    gp = mask(ctx, positive, b.op("Mul", [b.op("Mul", [g, y]), b.op("Log", [x])]))
    return [unbroadcast(ctx, b.op("Mul", [g, slope]), x, y), unbroadcast(ctx, gp, p, y)]


def gelu(ctx, node, grads):
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


def trilu(ctx, node, grads):
    """Trilu (torch.tril / triu): the gradient masked by the same triangle."""
    return [ctx.builder.op("Trilu", [grads[0], *node.input[1:2]],
                           upper=int(attribute(node, "upper", 1)))] + [None] * (len(node.input) - 1)


def transpose(ctx, node, grads):
    perm = attribute(node, "perm")
    if perm is None:
        perm = list(reversed(range(ctx.rank(node.input[0]))))
    inverse = [int(i) for i in np.argsort(perm)]
    return [ctx.builder.op("Transpose", [grads[0]], perm=inverse)]


def concat(ctx, node, grads):
    b = ctx.builder
    axis = int(attribute(node, "axis"))
    sizes = [b.op("Gather", [b.op("Shape", [x]), b.ints([axis])]) for x in node.input]
    parts = b.op("Split", [grads[0], b.op("Concat", sizes, axis=0)], outputs=len(node.input),
                 axis=axis)
    return [parts] if len(node.input) == 1 else list(parts)


def split(ctx, node, grads):
    """The gradients of the parts concatenated back, zeros for a part nothing reads (a Split of
    q, k, v where only some depend on the target)."""
    b = ctx.builder
    axis = int(attribute(node, "axis", 0))
    parts = [g if g is not None else b.op("ConstantOfShape", [b.op("Shape", [out])],
                                          value=float_tensor(0.0))
             for g, out in zip(grads, node.output)]
    return [b.op("Concat", parts, axis=axis)] + [None] * (len(node.input) - 1)


def slice_(ctx, node, grads):
    """The gradient put back where the slice took it from, zeros elsewhere: the same Slice of
    the input's element positions says where (any starts, ends, axes, steps)."""
    b = ctx.builder
    x = node.input[0]
    taken = b.op("Slice", [positions(ctx, x), *node.input[1:]])
    return [scatter(ctx, x, taken, grads[0], add=False)] + [None] * (len(node.input) - 1)


def gather(ctx, node, grads):
    """Gather (the class token x[:, 0], a token subset): the gradient added back at the rows
    taken, as Slice; an index taken twice sums its gradients (ScatterElements add, opset >= 16)
    unless the indices are constant and name distinct rows (a negative index counts from the
    end: with the axis's size unknown, one is taken as possibly naming the row of a
    non-negative one; indices of one sign are compared as they are)."""
    b = ctx.builder
    x, indices = node.input
    axis = int(attribute(node, "axis", 0))
    values = ctx.constants.get(indices)
    if values is not None and np.asarray(values).size and np.min(values) < 0:
        # -1 and size - 1 name one row: compared as rows, or taken as possibly repeated
        shape = ctx.shape(x)
        size = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
        if isinstance(size, int) and size > 0:
            values = np.asarray(values) % size
        elif np.max(values) >= 0:  # (only -k and size - k can meet: x[:, -1] alone is distinct)
            values = None
    distinct = values is not None and np.unique(values).size == np.asarray(values).size
    if not distinct and b.opset < 16:
        raise ModelError(f"node {node.name!r}: the gradient of Gather with run-time or repeated "
                         f"indices needs opset >= 16 (the model has {b.opset})")
    taken = b.op("Gather", [positions(ctx, x), indices], axis=axis)
    return [scatter(ctx, x, taken, grads[0], add=not distinct), None]


def expand(ctx, node, grads):
    return [unbroadcast(ctx, grads[0], node.input[0], node.output[0]), None]


def where(ctx, node, grads):
    """The gradient goes to X where the condition holds, to Y elsewhere."""
    b = ctx.builder
    condition, x, y = node.input
    zero = b.const(0.0)
    return [None,
            unbroadcast(ctx, b.op("Where", [condition, grads[0], zero]), x, node.output[0]),
            unbroadcast(ctx, b.op("Where", [condition, zero, grads[0]]), y, node.output[0])]
