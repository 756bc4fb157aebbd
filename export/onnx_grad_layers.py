"""Gradient rules of layers (see `onnx_grad`): pooling and reductions, MatMul/Gemm, Conv (a
transposed convolution) and ConvTranspose (a convolution), AveragePool, LpPool and MaxPool,
Resize."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from camface.errors import ModelError
from camface.export.onnx_grad_context import (Context, attribute, scatter,
                                               unbroadcast)

def global_average_pool(ctx, node, grads):
    b = ctx.builder
    x = node.input[0]
    spread = b.op("Expand", [grads[0], b.op("Shape", [x])])
    return [b.op("Div", [spread, b.count(x, node.output[0])])]


def global_max_pool(ctx, node, grads):
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


def _kept(ctx, node, grads):
    """(axes, g with the reduced axes kept as 1s) of a Reduce* node; axes None where it reduces
    nothing (no axes, noop_with_empty_axes: y = x)."""
    axes, keepdims = _reduce_axes(ctx, node)
    if axes is None:
        return None, grads[0]
    return axes, grads[0] if keepdims else ctx.builder.unsqueeze(grads[0], axes)


def reduce(ctx, node, grads, mean: bool):
    b = ctx.builder
    x = node.input[0]
    axes, grad = _kept(ctx, node, grads)
    if axes is None:
        return [grad] + [None] * (len(node.input) - 1)
    spread = b.op("Expand", [grad, b.op("Shape", [x])])
    if mean:
        spread = b.op("Div", [spread, b.count(x, node.output[0])])
    return [spread] + [None] * (len(node.input) - 1)


def reduce_max(ctx, node, grads):
    """ReduceMax / ReduceMin: the gradient shared among the elements equal to the result."""
    from onnx import TensorProto

    b = ctx.builder
    x = node.input[0]
    axes, grad = _kept(ctx, node, grads)
    if axes is None:
        return [grad] + [None] * (len(node.input) - 1)
    top = node.output[0] if attribute(node, "keepdims", 1) else b.unsqueeze(node.output[0], axes)
    hits = b.op("Cast", [b.op("Equal", [x, top])], to=TensorProto.FLOAT)
    ties = b.reduce("ReduceSum", hits, axes, keepdims=True)
    return [b.op("Mul", [hits, b.op("Div", [grad, ties])])] + [None] * (len(node.input) - 1)


def reduce_by_formula(ctx, node, grads):
    """ReduceL1 (dx = g sign(x)), ReduceL2 (dx = g x / y, 0 where y = 0 as torch's norm;
    F.normalize exports as ReduceL2, Clip, Expand, Div), ReduceSumSquare (dx = 2 g x),
    ReduceLogSumExp (dx = g exp(x - y)), ReduceLogSum (dx = g / exp(y), the sum's reciprocal)."""
    b = ctx.builder
    x = node.input[0]
    axes, keepdims = _reduce_axes(ctx, node)
    if axes is None:
        raise ModelError(f"node {node.name!r} ({node.op_type}): no axes with "
                         "noop_with_empty_axes has no gradient rule")
    y = node.output[0] if keepdims else b.unsqueeze(node.output[0], axes)
    grad = grads[0] if keepdims else b.unsqueeze(grads[0], axes)
    zero = b.const(0.0)
    if node.op_type == "ReduceL1":
        dx = b.op("Mul", [grad, b.op("Sign", [x])])
    elif node.op_type == "ReduceL2":
        dx = b.op("Where", [b.op("Greater", [y, zero]),
                            b.op("Mul", [grad, b.op("Div", [x, y])]), zero])
    elif node.op_type == "ReduceSumSquare":
        dx = b.op("Mul", [b.op("Mul", [grad, x]), b.const(2.0)])
    elif node.op_type == "ReduceLogSum":
        dx = b.op("Expand", [b.op("Div", [grad, b.op("Exp", [y])]), b.op("Shape", [x])])
    else:  # ReduceLogSumExp
        dx = b.op("Mul", [grad, b.op("Exp", [b.op("Sub", [x, y])])])
    return [dx] + [None] * (len(node.input) - 1)


def reduce_prod(ctx, node, grads):
    """ReduceProd (torch.prod): dx = g times the product of the others in x's slice, taken as
    P / x with P the product of the slice's non-zero elements: P / x where the slice holds no
    zero, P at its one zero, 0 elsewhere (never 0 / 0)."""
    from onnx import TensorProto

    b = ctx.builder
    x = node.input[0]
    axes, grad = _kept(ctx, node, grads)
    if axes is None:
        return [grad] + [None] * (len(node.input) - 1)
    zero, one = b.const(0.0), b.const(1.0)
    is_zero = b.op("Equal", [x, zero])
    zeros = b.reduce("ReduceSum", b.op("Cast", [is_zero], to=TensorProto.FLOAT), axes, True)
    safe = b.op("Where", [is_zero, one, x])
    product = b.reduce("ReduceProd", safe, axes, keepdims=True)
    others = b.op("Where", [is_zero,
                            b.op("Where", [b.op("Equal", [zeros, one]), product, zero]),
                            b.op("Where", [b.op("Equal", [zeros, zero]),
                                           b.op("Div", [product, safe]), zero])])
    return [b.op("Mul", [grad, others])] + [None] * (len(node.input) - 1)


def cumsum(ctx, node, grads):
    """y_i = sum of x_j for j <= i (j < i exclusive; j >= i reversed): dx_j sums g_i over the
    i that read x_j, the same CumSum run the other way."""
    reverse = int(attribute(node, "reverse", 0))
    exclusive = int(attribute(node, "exclusive", 0))
    summed = ctx.builder.op("CumSum", [grads[0], node.input[1]], exclusive=exclusive,
                            reverse=1 - reverse)
    return [summed, None]


def cumprod(ctx, node, grads):
    """CumProd (opset 26, torch.cumprod), Y_i the product of x_j for j <= i (the direction
    reversed with `reverse`; exclusive reads Y one step back, so its g is moved one step on):
    dx_j = sum over i >= j of g_i Y_i / x_j before the first zero z of the slice, sum over
    i >= z of g_i Y'_i at z (Y' the products with x_z taken as 1), 0 after it (never 0 / 0)."""
    from onnx import TensorProto

    b = ctx.builder
    x, axis = node.input[:2]
    reverse = int(attribute(node, "reverse", 0))
    axes = b.op("Reshape", [axis, b.ints([-1])])
    g = grads[0]
    if int(attribute(node, "exclusive", 0)):
        padded = b.op("Pad", [g, b.ints([1, 0] if reverse else [0, 1]), "", axes])
        g = b.op("Slice", [padded, b.ints([0 if reverse else 1]),
                           b.ints([-1 if reverse else np.iinfo(np.int64).max]), axes])
    zero, one = b.const(0.0), b.const(1.0)
    is_zero = b.op("Equal", [x, zero])
    zeros_so_far = b.op("CumSum", [b.op("Cast", [is_zero], to=TensorProto.FLOAT), axis],
                        reverse=reverse)
    first_zero = b.op("And", [is_zero, b.op("Equal", [zeros_so_far, one])])
    safe = b.op("Where", [is_zero, one, x])

    def products(t):
        return b.op("CumProd", [t, axis], reverse=reverse)

    def summed_back(t):  # sum over the i that read x_j
        return b.op("CumSum", [t, axis], reverse=1 - reverse)

    before = b.op("Div", [summed_back(b.op("Mul", [g, products(x)])), safe])
    at = summed_back(b.op("Mul", [g, products(b.op("Where", [first_zero, one, x]))]))
    dx = b.op("Where", [b.op("Equal", [zeros_so_far, zero]), before,
                        b.op("Where", [first_zero, at, zero])])
    return [dx, None]


def matmul(ctx, node, grads):
    """numpy matmul: dA = g B^T, dB = A^T g, each summed back over the batch axes its operand
    was broadcast along (a lower rank, or a size of 1: multi-query attention's shared keys); a
    1-D operand taken as a row (A) or a column (B) and the output's lost axis put back in g."""
    b = ctx.builder
    a, c = node.input
    ranks = [ctx.rank(a), ctx.rank(c)]
    if None in ranks:
        raise ModelError(f"node {node.name!r} (MatMul): only operands of known rank have a rule "
                         f"(ranks {ranks})")
    shapes = [list(ctx.shape(a)), list(ctx.shape(c))]
    lost = ([-2] if ranks[0] == 1 else []) + ([-1] if ranks[1] == 1 else [])
    if ranks[0] == 1:
        a, shapes[0] = b.op("Reshape", [a, b.ints([1, -1])]), [1, *shapes[0]]
    if ranks[1] == 1:
        c, shapes[1] = b.op("Reshape", [c, b.ints([-1, 1])]), [*shapes[1], 1]
    g = grads[0]
    if lost:
        g = b.unsqueeze(g, lost) if b.opset >= 13 else b.op("Unsqueeze", [g], axes=lost)
    rank = max(len(s) for s in shapes)
    out = ctx.shape(node.output[0])
    batch = list(out[:rank - 2]) if out is not None and len(out) + len(lost) == rank else \
        [None] * (rank - 2)

    def swap(t, r):
        return b.op("Transpose", [t], perm=list(range(r - 2)) + [r - 1, r - 2])

    def summed_to(product, rows, cols, x, shape, original):
        """product [*batch, rows, cols] summed over the axes `x` (`shape`) was broadcast along,
        then shaped as `original` (the operand before a 1-D one was made 2-D)."""
        ctx.shapes[product], ctx.shapes[x] = [*batch, rows, cols], shape
        summed = unbroadcast(ctx, product, x, product)
        return summed if x == original else b.op("Reshape", [summed, b.op("Shape", [original])])

    ga = summed_to(b.op("MatMul", [g, swap(c, len(shapes[1]))]), shapes[0][-2], shapes[0][-1],
                   a, shapes[0], node.input[0])
    gc = summed_to(b.op("MatMul", [swap(a, len(shapes[0])), g]), shapes[1][-2], shapes[1][-1],
                   c, shapes[1], node.input[1])
    return [ga, gc]


def gemm(ctx, node, grads):
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


def _refuse_dilated_same(node, dilations: Sequence[int]) -> str:
    """The node's auto_pad, or ModelError naming the node for SAME_* with dilations: ONNX
    Runtime pads such a pool as if undilated, so its output is smaller than ONNX's shapes say
    (and the rules after it, which read those shapes, build a graph that does not run)."""
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and any(d != 1 for d in dilations):
        raise ModelError(f"node {node.name!r} ({node.op_type}): auto_pad {auto_pad} with dilations "
                         f"{list(dilations)} has no gradient rule (ONNX Runtime pads such a pool as "
                         "if undilated, its output smaller than ONNX's shapes say, and refuses "
                         "such a Conv)")
    return auto_pad


def _refuse_dropped_ceil_window(ctx, node, kernel: Sequence[int]) -> None:
    """ModelError naming the node where ceil_mode's last window would start past the input and
    its begin padding: ONNX Runtime drops such a window (as torch does), ONNX's shape inference
    keeps it, and the gradient graph, built on ONNX's shapes, would not run."""
    if not attribute(node, "ceil_mode", 0):
        return
    x = node.input[0]
    strides, dilations, pads = _spatial(node, ctx, x, kernel)
    size, dims = ctx.static(x, node, "input")[2:], len(kernel)
    for i in range(dims):
        span = size[i] + pads[i] + pads[i + dims] - (kernel[i] - 1) * dilations[i] - 1
        if -(-span // strides[i]) * strides[i] >= size[i] + pads[i]:
            raise ModelError(f"node {node.name!r} ({node.op_type}): ceil_mode with a last window "
                             f"that starts in the end padding (axis {i + 2}: size {size[i]}, "
                             f"kernel {kernel[i]}, stride {strides[i]}, pads {pads[i]}, "
                             f"{pads[i + dims]}) has no gradient rule (ONNX Runtime drops that "
                             "window, ONNX's shapes keep it)")


def _spatial(node, ctx: Context, x: str, kernel: Sequence[int]):
    """(strides, dilations, pads [begin..., end...]) with auto_pad resolved on static shapes."""
    dims = len(kernel)
    strides = list(attribute(node, "strides", [1] * dims))
    dilations = list(attribute(node, "dilations", [1] * dims))
    pads = list(attribute(node, "pads", [0] * (2 * dims)))
    auto_pad = _refuse_dilated_same(node, dilations)
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


def _transpose_conv(ctx, node, grad, x, weights, kernel, group, pads=None):
    """The input gradient of a convolution: ConvTranspose with the same weights, padded back to
    the input's spatial size. pads: the node's own (auto_pad resolved) when None."""
    strides, dilations, own = _spatial(node, ctx, x, kernel)
    pads = own if pads is None else pads
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


def conv(ctx, node, grads):
    x, weights = node.input[:2]
    shape = ctx.static(weights, node, "weight")
    kernel = attribute(node, "kernel_shape", shape[2:])
    group = int(attribute(node, "group", 1))
    gx = _transpose_conv(ctx, node, grads[0], x, weights, kernel, group)
    return [gx] + [None] * (len(node.input) - 1)


def conv_transpose(ctx, node, grads):
    """The input gradient of ConvTranspose (y[s i + d k - pad] += x[i] w[k]) is the convolution
    of g with the same weights, strides, dilations, pads and groups: g[s i + d k - pad] w[k]
    summed over k. Pads explicit (what torch writes), or from auto_pad SAME_* or output_shape
    on static sizes as ONNX Runtime places them; output_padding below the strides (so that the
    convolution's output has the input's size)."""
    x, weights = node.input[:2]
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    kernel = list(attribute(node, "kernel_shape", ctx.static(weights, node, "weight")[2:]))
    dims = len(kernel)
    strides = list(attribute(node, "strides", [1] * dims))
    dilations = list(attribute(node, "dilations", [1] * dims))
    extra = list(attribute(node, "output_padding", [0] * dims))
    if any(e >= s for e, s in zip(extra, strides)):
        raise ModelError(f"node {node.name!r} (ConvTranspose): output_padding {extra} not below "
                         f"the strides {strides} has no gradient rule")
    shape = attribute(node, "output_shape")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") or shape is not None:
        size = ctx.static(x, node, "input")[2:]
        out = list(shape)[-dims:] if shape is not None else [n * s for n, s in zip(size, strides)]
        total = [strides[i] * (size[i] - 1) + extra[i] + (kernel[i] - 1) * dilations[i] + 1
                 - out[i] for i in range(dims)]
        if any(t < 0 for t in total) and shape is None:
            raise ModelError(f"node {node.name!r} (ConvTranspose): auto_pad {auto_pad} to an output "
                             f"size {out} beyond what the input {size} reaches has no gradient "
                             "rule (ONNX Runtime's output stops where the input reaches, ONNX's "
                             "shapes do not)")
        # an output_shape beyond that reach: ONNX Runtime leaves the last outputs 0, which pass
        # no gradient (cropped from it by a Pad of negative amounts)
        beyond = [0] * dims + [min(t, 0) for t in total]
        total = [max(t, 0) for t in total]
        begin = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
        pads = begin + [t - b for t, b in zip(total, begin)]
    elif auto_pad == "VALID":
        pads, beyond = [0] * (2 * dims), [0] * (2 * dims)
    elif auto_pad == "NOTSET":
        pads, beyond = list(attribute(node, "pads", [0] * 2 * dims)), [0] * (2 * dims)
    else:
        raise ModelError(f"node {node.name!r} (ConvTranspose): auto_pad {auto_pad} has no "
                         "gradient rule")
    grad = grads[0]
    if any(beyond):  # cropped by a Pad of negative amounts
        grad = ctx.builder.op("Pad", [grad, ctx.builder.ints(
            [0, 0, *beyond[:dims], 0, 0, *beyond[dims:]])])
    gx = ctx.builder.op("Conv", [grad, weights], kernel_shape=kernel, strides=strides,
                        dilations=dilations, pads=pads, group=int(attribute(node, "group", 1)))
    return [gx] + [None] * (len(node.input) - 1)


def average_pool(ctx, node, grads):
    """Each output's gradient shared equally over its window: divided by the window's count,
    then a transposed convolution with a ones kernel per channel (group = C). ceil_mode's last
    windows, which run past the end padding, are clipped there: the transposed convolution
    pads the end as far as they reach."""
    b = ctx.builder
    x = node.input[0]
    kernel = list(attribute(node, "kernel_shape"))
    channels = ctx.static(x, node, "input")[1]
    _refuse_dropped_ceil_window(ctx, node, kernel)
    strides, dilations, pads = _spatial(node, ctx, x, kernel)
    size = ctx.static(x, node, "input")[2:]
    out = ctx.static(node.output[0], node, "output")[2:]
    counts = _window_counts(size, out, kernel, strides, dilations, pads,
                            bool(attribute(node, "count_include_pad", 0)))
    grad = b.op("Div", [grads[0], b.const(counts)])
    dims = len(kernel)
    reach = [max(pads[i + dims], (out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
                 - size[i] - pads[i]) for i in range(dims)]
    ones = b.const(np.ones([channels, 1, *kernel], np.float32))
    return [_transpose_conv(ctx, node, grad, x, ones, kernel, channels, pads[:dims] + reach)]


def _window_counts(size, out, kernel, strides, dilations, pads, include_pad: bool) -> np.ndarray:
    """float32 [*out]: how many of each pooling window's taps an AveragePool divides by, those
    on the input (count_include_pad 0) or on the input and its pads (1; ceil_mode's windows are
    clipped at the end pad, as ONNX Runtime and torch count them)."""
    dims = len(kernel)
    counts = np.ones([], np.float32)
    for i in range(dims):
        taps = (np.arange(out[i])[:, None] * strides[i] - pads[i]
                + np.arange(kernel[i])[None] * dilations[i])
        low, high = (-pads[i], size[i] + pads[i + dims]) if include_pad else (0, size[i])
        along = ((taps >= low) & (taps < high)).sum(axis=1).astype(np.float32)
        counts = np.multiply.outer(counts, along)
    return np.maximum(counts, 1.0)


def _lp_slope(ctx, node, x: str, y: str, grad: str, p: int) -> tuple[str, str]:
    """(d|x|^p / dx / p, g y^(1 - p)) of an Lp pooling, y = (sum |x|^p)^(1 / p) over each
    window: dx = |x|^(p - 1) sign(x) * (the windows' g y^(1 - p) summed back). A window of
    zeros (y = 0) passes no gradient."""
    b = ctx.builder
    if p < 1:
        raise ModelError(f"node {node.name!r} ({node.op_type}): p = {p} has no gradient rule")
    if p == 1:
        slope = b.op("Sign", [x])
    elif p == 2:
        slope = x
    else:
        slope = b.op("Mul", [b.op("Sign", [x]), b.op("Pow", [b.op("Abs", [x]), b.const(p - 1.0)])])
    zero = b.const(0.0)
    scaled = grad if p == 1 else b.op("Mul", [grad, b.op("Pow", [y, b.const(1.0 - p)])])
    return slope, b.op("Where", [b.op("Greater", [y, zero]), scaled, zero])


def lp_pool(ctx, node, grads):
    """LpPool (p >= 1, strides, pads, auto_pad, dilations): each window's g y^(1 - p) summed
    back over the window (a transposed convolution with a ones kernel per channel, as
    AveragePool), times |x|^(p - 1) sign(x)."""
    b = ctx.builder
    x, y = node.input[0], node.output[0]
    if attribute(node, "ceil_mode", 0):
        raise ModelError(f"node {node.name!r} (LpPool): ceil_mode 1 has no gradient rule")
    kernel = list(attribute(node, "kernel_shape"))
    channels = ctx.static(x, node, "input")[1]
    slope, scaled = _lp_slope(ctx, node, x, y, grads[0], int(attribute(node, "p", 2)))
    ones = b.const(np.ones([channels, 1, *kernel], np.float32))
    return [b.op("Mul", [slope, _transpose_conv(ctx, node, scaled, x, ones, kernel, channels)])]


def global_lp_pool(ctx, node, grads):
    """GlobalLpPool: LpPool over every spatial axis, g y^(1 - p) broadcast back."""
    x, y = node.input[0], node.output[0]
    slope, scaled = _lp_slope(ctx, node, x, y, grads[0], int(attribute(node, "p", 2)))
    return [ctx.builder.op("Mul", [slope, scaled])]


def max_pool(ctx, node, grads):
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
    # The indices are ONNX Runtime's own (right for any padding), but the later rules would
    # read ONNX's shapes of the output, which a dilated SAME pool does not have
    _refuse_dilated_same(node, attrs.get("dilations", []))
    _, indices = b.op("MaxPool", [x], outputs=2, **attrs)
    return [scatter(ctx, x, indices, grads[0], add=True)]


def resize(ctx, node, grads):
    """Resize of any axes but the batch's (nearest, linear or cubic, any coordinate mode,
    antialias): a linear map A_axis of each resized axis, applied one after the other, so
    dx = A_h^T g A_w for height and width. The matrices are the node itself run by ONNX Runtime on basis inputs (what
    the forward computes, whatever its attributes), then checked against it on a random input."""
    b = ctx.builder
    x, y = node.input[0], node.output[0]
    mode = attribute(node, "mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    transform = attribute(node, "coordinate_transformation_mode", b"half_pixel")
    if (transform.decode() if isinstance(transform, bytes) else transform) == "tf_crop_and_resize":
        raise ModelError(f"node {node.name!r} (Resize): tf_crop_and_resize has no gradient rule")
    before, after = ctx.static(x, node, "input"), ctx.static(y, node, "output")
    if len(before) != len(after) or len(before) < 2:
        raise ModelError(f"node {node.name!r} (Resize): input {before} and output {after} "
                         "of different ranks")
    scales = None  # the scales input (opset 10: the second) when the sizes input is empty
    given = node.input[1:2] if b.opset < 11 else node.input[2:3]
    if given and given[0] and not (b.opset >= 11 and len(node.input) > 3 and node.input[3]):
        scales = ctx.constant(given[0], node, "the scales").astype(np.float32).reshape(-1)
    rank = len(before)
    axes = [a % rank for a in attribute(node, "axes", list(range(rank)))]
    factor = dict(zip(axes, scales.tolist())) if scales is not None else {}
    resized = [a for a in range(1, rank) if before[a] != after[a] or factor.get(a, 1.0) != 1.0]
    # the batch axis may be dynamic (named differently on either side): only its scale is read
    if factor.get(0, 1.0) != 1.0:
        raise ModelError(f"node {node.name!r} (Resize): resizes the batch axis ({before} -> "
                         f"{after}, mode {mode}); no gradient rule")
    if not resized:
        return [grads[0]] + [None] * (len(node.input) - 1)
    sizes = list(after)  # the sizes input as written where constant (an aspect-ratio policy
    # reads it), else the output's
    if scales is None and len(node.input) > 3 and node.input[3] in ctx.constants:
        for a, size in zip(axes, ctx.constants[node.input[3]].reshape(-1).tolist()):
            sizes[a] = int(size)
    maps = _resize_maps(node, b.opset, before, sizes, axes, factor, resized)
    grad = grads[0]
    for axis in sorted(resized, reverse=True):  # g A_w first, then A_h^T (g A_w)
        if axis == rank - 1:
            grad = b.op("MatMul", [grad, b.const(maps[axis])])
        elif axis == rank - 2:
            grad = b.op("MatMul", [b.const(maps[axis].T), grad])
        else:  # another axis (NHWC's height): moved last and back
            perm = [a for a in range(rank) if a != axis] + [axis]
            moved = b.op("MatMul", [b.op("Transpose", [grad], perm=perm), b.const(maps[axis])])
            grad = b.op("Transpose", [moved], perm=[int(i) for i in np.argsort(perm)])
    return [grad] + [None] * (len(node.input) - 1)


def _resize_maps(node, opset, before, sizes, axes, factor, resized) -> dict[int, np.ndarray]:
    """axis -> A [out, in] with y = A x along that axis, measured by running `node` on ONNX
    Runtime: a batch of basis inputs (row k: 1 at index k of the axis, constant along the
    others) per resized axis, then one random input against the matrices."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rank = len(before)
    small = [1] * rank  # the probe: batch = basis index, the axes not resized of size 1
    for a in resized:
        small[a] = before[a]

    def run(probe: np.ndarray) -> np.ndarray:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs, initializers = (["x"] if opset < 11 else ["x", "", ""]), []
        if factor:  # scales given: the same scales, 1 on the probe's other axes
            values = [factor[a] if a in resized else 1.0 for a in axes]
            initializers.append(helper.make_tensor("scales", TensorProto.FLOAT, [len(values)],
                                                   values))
            inputs[-1 if opset < 11 else 2:] = ["scales"]
        else:  # sizes given: the probe's own, the output's on the resized axes
            values = [sizes[a] if a in resized else probe.shape[a] for a in axes]
            initializers.append(helper.make_tensor("sizes", TensorProto.INT64, [len(values)],
                                                   values))
            inputs.append("sizes")
        graph = helper.make_graph(
            [helper.make_node("Resize", inputs, ["y"], **attrs)], "resize",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(probe.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8 if opset <= 18 else 9 if opset <= 20 else 10
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return session.run(["y"], {"x": probe})[0]

    maps = {}
    for axis in resized:
        n = before[axis]
        probe = np.zeros([n] + small[1:], np.float32)
        for k in range(n):
            selector = [slice(None)] * rank
            selector[0], selector[axis] = k, k
            probe[tuple(selector)] = 1.0
        out = run(probe)
        rows = [slice(None) if a in (0, axis) else 0 for a in range(rank)]
        columns = out[tuple(rows)]  # [k, out along axis]
        maps[axis] = np.ascontiguousarray(columns.T, np.float32)
    check = np.random.default_rng(0).standard_normal([1] + small[1:]).astype(np.float32)
    expected = run(check)
    mapped = check.astype(np.float64)
    for axis in sorted(resized):
        mapped = np.moveaxis(np.tensordot(maps[axis], mapped, axes=([1], [axis])), 0, axis)
    if mapped.shape != expected.shape or not np.allclose(mapped, expected, atol=1e-4, rtol=1e-4):
        raise ModelError(f"node {node.name!r} (Resize): not a separable linear map of its last "
                         "two axes, no gradient rule")
    return maps
