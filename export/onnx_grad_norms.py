"""Gradient rules of the normalisations (see `onnx_grad`): batch norm (inference), and the norms
that compute their statistics from the input itself: layer, instance, group and mean-variance
norm (one formula, `_standardised`), RMS norm, LpNormalization (an embedding scaled to unit length) and LRN (local
response normalisation across channels)."""

from __future__ import annotations

from camface.errors import ModelError
from camface.export.onnx_grad_context import attribute


def mean_variance_norm(ctx, node, grads):
    """MeanVarianceNormalization, x standardised over `axes` (default N, H, W): the layer norm's
    formula with the scale 1 and ONNX's epsilon (1e-9)."""
    axes = [int(a) for a in attribute(node, "axes", [0, 2, 3])]
    return [_standardised(ctx.builder, node.input[0], grads[0], axes, 1e-9)]


def rms_norm(ctx, node, grads):
    """RMSNormalization (opset 23) over the axes from `axis` on, y = x r scale with
    r = 1 / sqrt(mean(x^2) + eps): dx = r (d - x^ mean(d x^)), x^ = x r, d = g * scale (a
    weight, not differentiated)."""
    b = ctx.builder
    x, scale = node.input[:2]
    rank = _known_rank(ctx, node, x)
    axis = int(attribute(node, "axis", -1))
    axes = list(range(axis if axis >= 0 else rank + axis, rank))
    eps = float(attribute(node, "epsilon", 1e-5))

    def mean(t):
        return b.reduce("ReduceMean", t, axes, keepdims=True)

    inverse = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [mean(b.op("Mul", [x, x])),
                                                             b.const(eps)])])])
    normalised = b.op("Mul", [x, inverse])
    d = b.op("Mul", [grads[0], scale])
    inner = b.op("Sub", [d, b.op("Mul", [normalised, mean(b.op("Mul", [d, normalised]))])])
    return [b.op("Mul", [inner, inverse])] + [None] * (len(node.input) - 1)


def batch_norm(ctx, node, grads):
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


def _standardised(b, x: str, d: str, axes: list[int], eps: float) -> str:
    """The gradient through x^ = (x - mean) r, r = 1 / sqrt(var + eps), statistics over `axes`,
    given d = dL/dx^: dx = r (d - mean(d) - x^ mean(d x^)). The statistics are recomputed from x
    (the nodes rarely output them)."""

    def mean(t):
        return b.reduce("ReduceMean", t, axes, keepdims=True)

    centred = b.op("Sub", [x, mean(x)])
    inverse = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [
        mean(b.op("Mul", [centred, centred])), b.const(eps)])])])
    normalised = b.op("Mul", [centred, inverse])
    inner = b.op("Sub", [b.op("Sub", [d, mean(d)]),
                         b.op("Mul", [normalised, mean(b.op("Mul", [d, normalised]))])])
    return b.op("Mul", [inner, inverse])


def _known_rank(ctx, node, x: str) -> int:
    rank = ctx.rank(x)
    if rank is None:
        raise ModelError(f"node {node.name!r} ({node.op_type}): the gradient needs the rank of "
                         f"{x!r}, which shape inference left unknown")
    return rank


def layer_norm(ctx, node, grads):
    """LayerNormalization (opset 17) over the axes from `axis` on, d = g * scale; scale and bias
    are weights, not differentiated."""
    b = ctx.builder
    if any(g is not None for g in grads[1:]):
        raise ModelError(f"node {node.name!r}: LayerNormalization's mean and inverse standard "
                         "deviation outputs have no gradient rule")
    x, scale = node.input[:2]
    axis = int(attribute(node, "axis", -1))
    eps = float(attribute(node, "epsilon", 1e-5))
    rank = ctx.rank(x)
    if axis >= 0 and rank is None:
        raise ModelError(f"node {node.name!r}: LayerNormalization over axis {axis} of a tensor "
                         "of unknown rank")
    axes = list(range(axis, 0)) if axis < 0 else list(range(axis - rank, 0))
    d = b.op("Mul", [grads[0], scale])
    return [_standardised(b, x, d, axes, eps)] + [None] * (len(node.input) - 1)


def instance_norm(ctx, node, grads):
    """InstanceNormalization of x [N, C, ...]: statistics over the axes after the channels (as
    torch's exporters also write GroupNorm: x as [N, groups, -1], then a Mul and an Add)."""
    b = ctx.builder
    x, scale = node.input[:2]
    rank = _known_rank(ctx, node, x)
    eps = float(attribute(node, "epsilon", 1e-5))
    d = b.op("Mul", [grads[0], b.unsqueeze(scale, list(range(1, rank - 1)))])
    return [_standardised(b, x, d, list(range(2, rank)), eps), None, None]


def group_norm(ctx, node, grads):
    """GroupNormalization of x [N, C, ...] in `num_groups` groups of channels: x as [N, G, -1]
    standardised over its last axis. The scale is per channel [C] from opset 21 (as torch's
    dynamo exporter writes nn.GroupNorm there), per group [G] in opset 18's first form (which
    ONNX's checker refuses as deprecated: the export stops there, a graph built directly
    may hold it)."""
    b = ctx.builder
    x, scale = node.input[:2]
    rank = _known_rank(ctx, node, x)
    groups = int(attribute(node, "num_groups"))
    eps = float(attribute(node, "epsilon", 1e-5))
    grouped = b.ints([0, groups, -1])
    if b.opset >= 21:
        d = b.op("Reshape", [b.op("Mul", [grads[0], b.unsqueeze(scale, list(range(1, rank - 1)))]),
                             grouped])
    else:
        d = b.op("Mul", [b.op("Reshape", [grads[0], grouped]), b.unsqueeze(scale, [1])])
    dx = _standardised(b, b.op("Reshape", [x, grouped]), d, [2], eps)
    return [b.op("Reshape", [dx, b.op("Shape", [x])]), None, None]


def lp_norm(ctx, node, grads):
    """LpNormalization, y = x / n with n the p-norm along `axis` (p = 2: a face embedding scaled
    to unit length): dx = (g - s sum(g y)) / n with s = y for p = 2, sign(x) for p = 1. A zero
    vector (n = 0) gets no gradient."""
    b = ctx.builder
    x, y = node.input[0], node.output[0]
    p = int(attribute(node, "p", 2))
    if p not in (1, 2):
        raise ModelError(f"node {node.name!r} (LpNormalization): p = {p} has no gradient rule")
    axis = int(attribute(node, "axis", -1))
    norm = b.reduce("ReduceL2" if p == 2 else "ReduceL1", x, [axis], keepdims=True)
    along = y if p == 2 else b.op("Sign", [x])
    dot = b.reduce("ReduceSum", b.op("Mul", [grads[0], y]), [axis], keepdims=True)
    dx = b.op("Div", [b.op("Sub", [grads[0], b.op("Mul", [along, dot])]), norm])
    return [b.op("Where", [b.op("Greater", [norm, b.const(0.0)]), dx, b.const(0.0)])]


def lrn(ctx, node, grads):
    """LRN (AlexNet, GoogLeNet), y = x s^-beta with s = bias + alpha / size * W(x^2), W the sum
    over the channels c - floor((size - 1) / 2) ... c + ceil((size - 1) / 2):
    dx = g s^-beta - 2 alpha beta / size * x * W^T(g x s^(-beta - 1)), W^T the window mirrored
    (the same one for an odd size, the only one ONNX Runtime runs). Each window sum: an AveragePool of x taken as
    [N, 1, C, ...] that counts the zero padding, times `size`."""
    b = ctx.builder
    x = node.input[0]
    rank = _known_rank(ctx, node, x)
    size = int(attribute(node, "size"))
    if size % 2 == 0:  # ONNX's window is then one channel longer after c than before it
        raise ModelError(f"node {node.name!r} (LRN): size {size} is even; ONNX Runtime runs LRN "
                         "of odd sizes only (neither the model nor a CAM graph of it would run)")
    alpha = float(attribute(node, "alpha", 1e-4))
    beta = float(attribute(node, "beta", 0.75))
    bias = float(attribute(node, "bias", 1.0))
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2
    zeros = [0] * (rank - 2)

    def window(t, before, after):
        pooled = b.op("AveragePool", [b.unsqueeze(t, [1])], kernel_shape=[size] + [1] * (rank - 2),
                      pads=[before, *zeros, after, *zeros], count_include_pad=1)
        return b.squeeze(pooled, [1])  # the mean over `size`: alpha / size * sum = alpha * mean

    s = b.op("Add", [b.op("Mul", [window(b.op("Mul", [x, x]), front, back), b.const(alpha)]),
                     b.const(bias)])
    direct = b.op("Mul", [grads[0], b.op("Pow", [s, b.const(-beta)])])
    inner = b.op("Mul", [b.op("Mul", [grads[0], x]), b.op("Pow", [s, b.const(-beta - 1.0)])])
    spread = b.op("Mul", [window(inner, back, front), b.const(2.0 * alpha * beta)])
    return [b.op("Sub", [direct, b.op("Mul", [x, spread])])]
