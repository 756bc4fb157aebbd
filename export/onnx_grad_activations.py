"""Gradient rules of the smooth activations, the log / exp family, trigonometry and the
softmaxes (see `onnx_grad`): Elu, Selu, Celu, Softplus, Softsign, Mish, Swish, Abs, Sign (and
the other flat steps: Floor, Ceil, Round), Log, Reciprocal, Sin, Cos, Tan, their inverses
Asin, Acos, Atan, the hyperbolic Sinh, Cosh and inverses Asinh, Acosh, Atanh, Softmax,
LogSoftmax. At x = 0 each takes the slope torch's autograd takes (the negative branch of the
ELUs, 0 for Abs)."""

from __future__ import annotations

from camface.errors import ModelError
from camface.export.onnx_grad_context import attribute, float_tensor


def _by_sign(ctx, node, grads, positive: float, negative: str):
    """g * `positive` (a number) where x > 0, g * `negative` (a slope tensor) elsewhere."""
    b = ctx.builder
    above = b.op("Greater", [node.input[0], b.const(0.0)])
    return [b.op("Mul", [grads[0], b.op("Where", [above, b.const(positive), negative])])]


def elu(ctx, node, grads):
    """y = alpha (e^x - 1) for x <= 0: slope alpha e^x (from x, not y + alpha, which loses
    digits far below 0)."""
    b = ctx.builder
    alpha = float(attribute(node, "alpha", 1.0))
    return _by_sign(ctx, node, grads, 1.0,
                    b.op("Mul", [b.op("Exp", [node.input[0]]), b.const(alpha)]))


def selu(ctx, node, grads):
    """y = gamma x for x > 0, gamma alpha (e^x - 1) else."""
    b = ctx.builder
    alpha = float(attribute(node, "alpha", 1.67326319217681884765625))
    gamma = float(attribute(node, "gamma", 1.05070102214813232421875))
    return _by_sign(ctx, node, grads, gamma,
                    b.op("Mul", [b.op("Exp", [node.input[0]]), b.const(gamma * alpha)]))


def celu(ctx, node, grads):
    """y = max(0, x) + min(0, alpha (e^(x / alpha) - 1)): slope e^(x / alpha) for x <= 0."""
    b = ctx.builder
    alpha = float(attribute(node, "alpha", 1.0))
    return _by_sign(ctx, node, grads, 1.0,
                    b.op("Exp", [b.op("Div", [node.input[0], b.const(alpha)])]))


def softplus(ctx, node, grads):
    """y = log(1 + e^x): dy/dx = sigmoid(x)."""
    b = ctx.builder
    return [b.op("Mul", [grads[0], b.op("Sigmoid", [node.input[0]])])]


def softsign(ctx, node, grads):
    """y = x / (1 + |x|): dy/dx = 1 / (1 + |x|)^2."""
    b = ctx.builder
    denominator = b.op("Add", [b.op("Abs", [node.input[0]]), b.const(1.0)])
    return [b.op("Div", [grads[0], b.op("Mul", [denominator, denominator])])]


def mish(ctx, node, grads):
    """Mish (opset 18), y = x tanh(softplus(x)): dy/dx = t + x (1 - t^2) sigmoid(x)."""
    b = ctx.builder
    x = node.input[0]
    t = b.op("Tanh", [b.op("Softplus", [x])])
    slope = b.op("Add", [t, b.op("Mul", [b.op("Mul", [x, b.op("Sub", [
        b.const(1.0), b.op("Mul", [t, t])])]), b.op("Sigmoid", [x])])])
    return [b.op("Mul", [grads[0], slope])]


def swish(ctx, node, grads):
    """Swish (opset 24), y = x sigmoid(alpha x): dy/dx = s + alpha x s (1 - s), s the sigmoid."""
    b = ctx.builder
    x = node.input[0]
    alpha = float(attribute(node, "alpha", 1.0))
    s = b.op("Sigmoid", [b.op("Mul", [x, b.const(alpha)])])
    rest = b.op("Mul", [b.op("Mul", [x, b.const(alpha)]), b.op("Sub", [b.const(1.0), s])])
    return [b.op("Mul", [grads[0], b.op("Mul", [s, b.op("Add", [rest, b.const(1.0)])])])]


def abs_(ctx, node, grads):
    """dy/dx = sign(x), 0 at 0 (torch's sgn)."""
    return [ctx.builder.op("Mul", [grads[0], ctx.builder.op("Sign", [node.input[0]])])]


def sign(ctx, node, grads):
    """Sign, Floor, Ceil, Round, Hardmax: flat between their steps (torch's gradient is 0):
    zeros shaped like x. torch's LPPool2d writes sign(s) relu(|s|) of the pooled powers s; the
    gradient goes through the ReLU."""
    b = ctx.builder
    return [b.op("ConstantOfShape", [b.op("Shape", [node.input[0]])], value=float_tensor(0.0))]


def sin(ctx, node, grads):
    return [ctx.builder.op("Mul", [grads[0], ctx.builder.op("Cos", [node.input[0]])])]


def cos(ctx, node, grads):
    b = ctx.builder
    return [b.op("Neg", [b.op("Mul", [grads[0], b.op("Sin", [node.input[0]])])])]


def tan(ctx, node, grads):
    """y = tan x: dy/dx = 1 + y^2."""
    b = ctx.builder
    y = node.output[0]
    return [b.op("Mul", [grads[0], b.op("Add", [b.op("Mul", [y, y]), b.const(1.0)])])]


def _over(ctx, node, grads, denominator, square_root: bool = False):
    """g / d(x^2), d a function of x^2 (the inverse trigonometric and hyperbolic slopes)."""
    b = ctx.builder
    x = node.input[0]
    d = denominator(b.op("Mul", [x, x]))
    return [b.op("Div", [grads[0], b.op("Sqrt", [d]) if square_root else d])]


def asin(ctx, node, grads):
    """dy/dx = 1 / sqrt(1 - x^2)."""
    b = ctx.builder
    return _over(ctx, node, grads, lambda q: b.op("Sub", [b.const(1.0), q]), square_root=True)


def acos(ctx, node, grads):
    """dy/dx = -1 / sqrt(1 - x^2)."""
    b = ctx.builder
    return [b.op("Neg", asin(ctx, node, grads))]


def atan(ctx, node, grads):
    """dy/dx = 1 / (1 + x^2)."""
    b = ctx.builder
    return _over(ctx, node, grads, lambda q: b.op("Add", [q, b.const(1.0)]))


def sinh(ctx, node, grads):
    return [ctx.builder.op("Mul", [grads[0], ctx.builder.op("Cosh", [node.input[0]])])]


def cosh(ctx, node, grads):
    return [ctx.builder.op("Mul", [grads[0], ctx.builder.op("Sinh", [node.input[0]])])]


def asinh(ctx, node, grads):
    """dy/dx = 1 / sqrt(x^2 + 1)."""
    b = ctx.builder
    return _over(ctx, node, grads, lambda q: b.op("Add", [q, b.const(1.0)]), square_root=True)


def acosh(ctx, node, grads):
    """dy/dx = 1 / sqrt(x^2 - 1) (x > 1)."""
    b = ctx.builder
    return _over(ctx, node, grads, lambda q: b.op("Sub", [q, b.const(1.0)]), square_root=True)


def atanh(ctx, node, grads):
    """dy/dx = 1 / (1 - x^2)."""
    b = ctx.builder
    return _over(ctx, node, grads, lambda q: b.op("Sub", [b.const(1.0), q]))


def log(ctx, node, grads):
    return [ctx.builder.op("Div", [grads[0], node.input[0]])]


def reciprocal(ctx, node, grads):
    """y = 1 / x: dy/dx = -y^2."""
    b = ctx.builder
    y = node.output[0]
    return [b.op("Neg", [b.op("Mul", [grads[0], b.op("Mul", [y, y])])])]


def _softmax_axes(ctx, node) -> list[int]:
    """The axes a (Log)Softmax normalises over: `axis` from opset 13; before, the input taken
    as 2-D [before axis, from axis on] (axis 1 by default), so every axis from `axis` on."""
    if ctx.builder.opset >= 13:
        return [int(attribute(node, "axis", -1))]
    rank = ctx.rank(node.input[0])
    if rank is None:
        raise ModelError(f"node {node.name!r} ({node.op_type}): the gradient before opset 13 "
                         f"needs the rank of {node.input[0]!r}, which shape inference left unknown")
    return list(range(int(attribute(node, "axis", 1)) % rank, rank))


def softmax(ctx, node, grads):
    """dx = y * (g - sum(g * y, axes))."""
    b = ctx.builder
    y = node.output[0]
    dot = b.reduce("ReduceSum", b.op("Mul", [grads[0], y]), _softmax_axes(ctx, node),
                   keepdims=True)
    return [b.op("Mul", [y, b.op("Sub", [grads[0], dot])])]


def log_softmax(ctx, node, grads):
    """y = x - log(sum(e^x)): dx = g - e^y sum(g, axes) (a head that ends in log_softmax)."""
    b = ctx.builder
    total = b.reduce("ReduceSum", grads[0], _softmax_axes(ctx, node), keepdims=True)
    return [b.op("Sub", [grads[0], b.op("Mul", [b.op("Exp", [node.output[0]]), total])])]
