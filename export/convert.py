"""TensorFlow function -> ONNX model with tf2onnx, plus the converter handlers that the
in-graph gradients need, the metadata of camface.graph_spec, and optional float16.

tf2onnx 1.17 has no handler for several ops that TensorFlow's gradients emit. The ones a
classifier head needs are added here (and kept under test, tests/test_export_convert.py):
- ShapeN (Conv2D's input gradient asks for the shapes of input and filter at once): one ONNX
  Shape per input, cast to the int32 TensorFlow expects.
- ReluGrad: gradient * (features > 0).
- Relu6Grad: gradient * (0 < features < 6).
- BroadcastGradientArgs (Add/Mul of two tensors with a dynamic batch): the axes along which
  each input was broadcast, from NonZero over the padded shapes.
- MaxPoolGrad: ONNX MaxPool's argmax indices, then ScatterElements(reduction="add") of the
  gradient into zeros (opset >= 16); ties go to the first maximum, as in TensorFlow.
- DepthwiseConv2dNativeBackpropInput (separable / depthwise convs): a grouped ConvTranspose.
- Erfc (Keras' exact GELU, in ConvNeXt blocks): 1 - Erf.
- RsqrtGrad (LayerNormalization in a head: ConvNeXt's): dy * -0.5 * y^3.
- SigmoidGrad, TanhGrad, LeakyReluGrad, EluGrad, SeluGrad (those activations in a head): their
  derivatives written from the activation's output (its input for LeakyRelu), as TensorFlow's
  kernels compute them.
- ResizeBilinearGrad, ResizeBicubicGrad (UpSampling2D / tf.image.resize after the target):
  A_h^T g A_w, the matrices TensorFlow's own resize of basis images; ResizeBicubic itself as
  A_h x A_w^T (tf2onnx's cubic Resize differs from TensorFlow's by up to 5e-4).
Global pooling's gradient is made convertible on the TensorFlow side instead
(graph.safe_global_average_pool).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from camface.errors import ModelError, OutputError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def _shape_n(ctx, node, name, args):
    """ShapeN(x_1..x_n) -> n int32/int64 shapes: one Shape (+ Cast) per input."""
    from onnx import TensorProto

    out_type = node.get_attr_value("out_type", TensorProto.INT32)
    for i, (source, output) in enumerate(zip(list(node.input), list(node.output))):
        shape = ctx.make_node("Shape", [source], name=f"{node.name}_shape_{i}")
        result = shape.output[0]
        if out_type != TensorProto.INT64:
            result = ctx.make_node("Cast", [result], attr={"to": out_type},
                                   name=f"{node.name}_cast_{i}").output[0]
        ctx.set_dtype(result, out_type)
        rank = ctx.get_shape(source)
        ctx.set_shape(result, [len(rank)] if rank is not None else [-1])
        ctx.replace_all_inputs(output, result)
    ctx.remove_node(node.name)


def _relu_grad(ctx, node, name, args):
    """ReluGrad(gradients, features) = gradients * (features > 0)."""
    _masked_gradient(ctx, node, upper=None)


def _relu6_grad(ctx, node, name, args):
    """Relu6Grad(gradients, features) = gradients * (0 < features < 6)."""
    _masked_gradient(ctx, node, upper=6.0)


def _masked_gradient(ctx, node, upper):
    import numpy as np
    from onnx import helper

    gradients, features = node.input[0], node.input[1]
    dtype = ctx.get_dtype(gradients)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    zero = ctx.make_const(f"{node.name}_zero", np.zeros((), dtype=np_dtype)).output[0]
    mask = ctx.make_node("Greater", [features, zero], name=f"{node.name}_positive").output[0]
    if upper is not None:
        six = ctx.make_const(f"{node.name}_upper", np.asarray(upper, dtype=np_dtype)).output[0]
        below = ctx.make_node("Less", [features, six], name=f"{node.name}_below").output[0]
        mask = ctx.make_node("And", [mask, below], name=f"{node.name}_inside").output[0]
    mask = ctx.make_node("Cast", [mask], attr={"to": dtype}, name=f"{node.name}_mask").output[0]
    shapes, dtypes = [ctx.get_shape(node.output[0])], [dtype]
    output = node.output[0]
    ctx.remove_node(node.name)
    ctx.make_node("Mul", [gradients, mask], outputs=[output], name=node.name,
                  shapes=shapes, dtypes=dtypes)


def _erfc(ctx, node, name, args):
    """Erfc(x) = 1 - Erf(x): Keras' exact GELU (keras.applications' ConvNeXt) on TensorFlow."""
    import numpy as np
    from onnx import helper

    dtype = ctx.get_dtype(node.input[0])
    one = ctx.make_const(f"{node.name}_one",
                         np.ones((), dtype=helper.tensor_dtype_to_np_dtype(dtype))).output[0]
    erf = ctx.make_node("Erf", [node.input[0]], name=f"{node.name}_erf").output[0]
    shapes, dtypes, output = [ctx.get_shape(node.output[0])], [dtype], node.output[0]
    ctx.remove_node(node.name)
    ctx.make_node("Sub", [one, erf], outputs=[output], name=node.name, shapes=shapes, dtypes=dtypes)


def _rsqrt_grad(ctx, node, name, args):
    """RsqrtGrad(y, dy) = dy * -0.5 * y^3, y = 1 / sqrt(x) (a LayerNormalization's gradient)."""
    import numpy as np
    from onnx import helper

    y, dy = node.input[0], node.input[1]
    dtype = ctx.get_dtype(dy)
    half = ctx.make_const(f"{node.name}_minus_half",
                          np.asarray(-0.5, dtype=helper.tensor_dtype_to_np_dtype(dtype))).output[0]
    square = ctx.make_node("Mul", [y, y], name=f"{node.name}_square").output[0]
    cube = ctx.make_node("Mul", [square, y], name=f"{node.name}_cube").output[0]
    scaled = ctx.make_node("Mul", [dy, half], name=f"{node.name}_scaled").output[0]
    shapes, dtypes, output = [ctx.get_shape(node.output[0])], [dtype], node.output[0]
    ctx.remove_node(node.name)
    ctx.make_node("Mul", [scaled, cube], outputs=[output], name=node.name, shapes=shapes,
                  dtypes=dtypes)


class _Builder:
    """Nodes replacing the TensorFlow op `node` (its name, dtype and output kept): constants of its
    dtype, intermediate nodes, and `finish`, the last node writing the op's output."""

    def __init__(self, ctx, node, dtype_of: str):
        from onnx import helper

        self.ctx, self.node = ctx, node
        self.dtype = ctx.get_dtype(dtype_of)
        self.np_dtype = helper.tensor_dtype_to_np_dtype(self.dtype)

    def const(self, suffix: str, value: float) -> str:
        import numpy as np

        return self.ctx.make_const(f"{self.node.name}_{suffix}", np.asarray(value, self.np_dtype)).output[0]

    def op(self, op_type: str, inputs: list, suffix: str, **attr) -> str:
        return self.ctx.make_node(op_type, inputs, attr=attr, name=f"{self.node.name}_{suffix}").output[0]

    def positive(self, x: str) -> str:
        """Where x > 0, as the op's dtype (1 or 0)."""
        above = self.op("Greater", [x, self.const("zero", 0.0)], "positive")
        return self.op("Cast", [above], "mask", to=self.dtype)

    def negative(self, x: str) -> str:
        """Where x < 0, as the op's dtype (1 or 0)."""
        below = self.op("Less", [x, self.const("zero", 0.0)], "negative")
        return self.op("Cast", [below], "mask", to=self.dtype)

    def finish(self, op_type: str, inputs: list) -> None:
        ctx, node = self.ctx, self.node
        shapes, output = [ctx.get_shape(node.output[0])], node.output[0]
        ctx.remove_node(node.name)
        ctx.make_node(op_type, inputs, outputs=[output], name=node.name, shapes=shapes, dtypes=[self.dtype])


def _sigmoid_grad(ctx, node, name, args):
    """SigmoidGrad(y, dy) = dy * y * (1 - y), y = sigmoid(x)."""
    y, dy = node.input[0], node.input[1]
    b = _Builder(ctx, node, dy)
    slope = b.op("Mul", [y, b.op("Sub", [b.const("one", 1.0), y], "one_minus_y")], "slope")
    b.finish("Mul", [dy, slope])


def _tanh_grad(ctx, node, name, args):
    """TanhGrad(y, dy) = dy * (1 - y^2), y = tanh(x)."""
    y, dy = node.input[0], node.input[1]
    b = _Builder(ctx, node, dy)
    slope = b.op("Sub", [b.const("one", 1.0), b.op("Mul", [y, y], "square")], "slope")
    b.finish("Mul", [dy, slope])


def _leaky_relu_grad(ctx, node, name, args):
    """LeakyReluGrad(dy, x) = dy where x > 0, else dy * alpha."""
    dy, x = node.input[0], node.input[1]
    b = _Builder(ctx, node, dy)
    alpha = float(node.get_attr_value("alpha", 0.2))
    mask = b.positive(x)  # slope = alpha + (1 - alpha) * (x > 0)
    slope = b.op("Add", [b.const("alpha", alpha), b.op("Mul", [mask, b.const("rest", 1.0 - alpha)], "rise")],
                 "slope")
    b.finish("Mul", [dy, slope])


SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717


def _exponential_unit_grad(ctx, node, scale: float, scaled_alpha: float):
    """(dy, y) -> dy * (y + scaled_alpha) where y < 0, else dy * scale: ELU (scale 1, alpha 1)
    and SELU, whose output below 0 is scaled_alpha * (exp(x) - 1). y = 0 takes `scale`, as
    TensorFlow's kernels test activations < 0 (SELU's two branches differ there)."""
    dy, y = node.input[0], node.input[1]
    b = _Builder(ctx, node, dy)
    mask = b.negative(y)
    below = b.op("Add", [y, b.const("scaled_alpha", scaled_alpha)], "below")
    # slope = (1 - mask) * scale + mask * below
    slope = b.op("Add", [b.op("Mul", [b.op("Sub", [b.const("one", 1.0), mask], "not_negative"),
                                      b.const("scale", scale)], "above"),
                         b.op("Mul", [mask, below], "below_part")], "slope")
    b.finish("Mul", [dy, slope])


def _elu_grad(ctx, node, name, args):
    """EluGrad(dy, y) = dy * (y + 1) where y < 0, else dy, y = elu(x) (alpha 1)."""
    _exponential_unit_grad(ctx, node, 1.0, 1.0)


def _selu_grad(ctx, node, name, args):
    """SeluGrad(dy, y) = dy * (y + scale * alpha) where y < 0, else dy * scale."""
    _exponential_unit_grad(ctx, node, SELU_SCALE, SELU_SCALE * SELU_ALPHA)


def _broadcast_gradient_args(ctx, node, name, args):
    """BroadcastGradientArgs(s0, s1) -> (r0, r1): axes where one shape is 1 and the other not."""
    import numpy as np
    from onnx import TensorProto

    shapes = [node.input[0], node.input[1]]
    ranks = [ctx.get_shape(s)[0] if ctx.get_shape(s) else -1 for s in shapes]
    _require(all(r >= 0 for r in ranks), "BroadcastGradientArgs needs shapes of known rank")
    rank = max(ranks)
    dtype = ctx.get_dtype(node.input[0])
    padded = []
    for shape, r in zip(shapes, ranks):
        shape = ctx.make_node("Cast", [shape], attr={"to": TensorProto.INT64}).output[0]
        if r < rank:
            ones = ctx.make_const(f"{node.name}_ones_{len(padded)}",
                                  np.ones(rank - r, dtype=np.int64)).output[0]
            shape = ctx.make_node("Concat", [ones, shape], attr={"axis": 0}).output[0]
        padded.append(shape)
    one = ctx.make_const(f"{node.name}_one", np.ones((), dtype=np.int64)).output[0]
    is_one = [ctx.make_node("Equal", [s, one]).output[0] for s in padded]
    outputs = list(node.output)
    ctx.remove_node(node.name)
    for i, output in enumerate(outputs):
        other = ctx.make_node("Not", [is_one[1 - i]]).output[0]
        mask = ctx.make_node("And", [is_one[i], other]).output[0]
        where = ctx.make_node("NonZero", [mask]).output[0]
        flat = ctx.make_node("Squeeze", [where, ctx.make_const(
            f"{node.name}_axis_{i}", np.zeros(1, dtype=np.int64)).output[0]]).output[0]
        ctx.make_node("Cast", [flat], attr={"to": dtype}, outputs=[output],
                      shapes=[[-1]], dtypes=[dtype])


def _max_pool_grad(ctx, node, name, args):
    """MaxPoolGrad(orig_input, orig_output, grad), NHWC -> gradient w.r.t. orig_input."""
    import numpy as np
    from onnx import TensorProto

    _require(ctx.opset >= 16, "MaxPoolGrad needs opset >= 16 (ScatterElements add)")
    _require(_data_format(node) == "NHWC", "MaxPoolGrad: only NHWC is supported")
    x, grad = node.input[0], node.input[2]
    ksize = list(node.get_attr_value("ksize"))[1:3]
    strides = list(node.get_attr_value("strides"))[1:3]
    padding = _padding(node)
    dtype = ctx.get_dtype(node.output[0])
    out_shape = ctx.get_shape(node.output[0])
    output = node.output[0]
    ctx.remove_node(node.name)
    x_nchw = ctx.make_node("Transpose", [x], attr={"perm": [0, 3, 1, 2]}).output[0]
    pool = ctx.make_node("MaxPool", [x_nchw], output_count=2,
                         attr={"kernel_shape": ksize, "strides": strides,
                               "auto_pad": "SAME_UPPER" if padding == "SAME" else "VALID"},
                         dtypes=[dtype, TensorProto.INT64])
    minus_one = ctx.make_const(f"{node.name}_flat", np.array([-1], dtype=np.int64)).output[0]
    indices = ctx.make_node("Reshape", [pool.output[1], minus_one]).output[0]
    grad_nchw = ctx.make_node("Transpose", [grad], attr={"perm": [0, 3, 1, 2]}).output[0]
    updates = ctx.make_node("Reshape", [grad_nchw, minus_one]).output[0]
    x_shape = ctx.make_node("Shape", [x_nchw]).output[0]
    flat_x = ctx.make_node("Reshape", [x_nchw, minus_one]).output[0]
    zeros = ctx.make_node("Mul", [flat_x, ctx.make_const(
        f"{node.name}_zero", np.zeros((), dtype=np.float32)).output[0]]).output[0]
    scattered = ctx.make_node("ScatterElements", [zeros, indices, updates],
                              attr={"axis": 0, "reduction": "add"}).output[0]
    shaped = ctx.make_node("Reshape", [scattered, x_shape]).output[0]
    ctx.make_node("Transpose", [shaped], attr={"perm": [0, 2, 3, 1]}, outputs=[output],
                  shapes=[out_shape], dtypes=[dtype])


def _depthwise_backprop_input(ctx, node, name, args):
    """DepthwiseConv2dNativeBackpropInput(input_sizes, filter [kh, kw, C, M],
    out_backprop [N, h, w, C*M]) -> [N, H, W, C]: ConvTranspose with group = C."""
    import numpy as np

    _require(_data_format(node) == "NHWC", "depthwise gradient: only NHWC is supported")
    padding = _padding(node)
    filter_shape = ctx.get_shape(node.input[1])
    out_shape = ctx.get_shape(node.output[0])
    _require(filter_shape is not None and -1 not in filter_shape,
                    "depthwise gradient needs a filter of known shape")
    _require(out_shape is not None and -1 not in out_shape[1:3],
                    "depthwise gradient needs a known input height and width")
    kh, kw, channels, multiplier = filter_shape
    strides = list(node.get_attr_value("strides"))[1:3]
    dilations = list(node.get_attr_value("dilations") or [1, 1, 1, 1])[1:3]
    grad_shape = ctx.get_shape(node.input[2])
    in_dims = grad_shape[1:3]
    pads, output_padding = [0, 0, 0, 0], [0, 0]
    for i, (size, k, s, d) in enumerate(zip(out_shape[1:3], (kh, kw), strides, dilations)):
        total = s * (in_dims[i] - 1) + (k - 1) * d + 1 - size
        if padding == "VALID" or total < 0:
            output_padding[i] = max(-total, 0)
            total = max(total, 0)
        pads[i], pads[i + 2] = total // 2, total - total // 2
    dtype = ctx.get_dtype(node.output[0])
    output = node.output[0]
    weights, grad = node.input[1], node.input[2]
    ctx.remove_node(node.name)
    shape = ctx.make_const(f"{node.name}_wshape",
                           np.array([kh, kw, channels * multiplier, 1], dtype=np.int64)).output[0]
    w = ctx.make_node("Reshape", [weights, shape]).output[0]
    w = ctx.make_node("Transpose", [w], attr={"perm": [2, 3, 0, 1]}).output[0]
    grad_nchw = ctx.make_node("Transpose", [grad], attr={"perm": [0, 3, 1, 2]}).output[0]
    attr = {"group": channels, "kernel_shape": [kh, kw], "strides": strides,
            "dilations": dilations, "pads": pads}
    if any(output_padding):
        attr["output_padding"] = output_padding
    conv = ctx.make_node("ConvTranspose", [grad_nchw, w], attr=attr).output[0]
    ctx.make_node("Transpose", [conv], attr={"perm": [0, 2, 3, 1]}, outputs=[output],
                  shapes=[out_shape], dtypes=[dtype])


def _resize_grad(ctx, node, name, args):
    """ResizeBilinearGrad / ResizeBicubicGrad(grads [N, H, W, C], original_image [N, h, w, C])
    -> [N, h, w, C]: the resize is a linear map per axis, so the gradient is A_h^T g A_w, with
    A_h [H, h] and A_w [W, w] TensorFlow's own resize of basis images (`_tf_resize_maps`)."""
    grad, original = node.input[0], node.input[1]
    before, after = ctx.get_shape(original), ctx.get_shape(grad)
    out_shape = ctx.get_shape(node.output[0])
    _require(before is not None and after is not None and -1 not in before[1:3] + after[1:3],
             f"{node.type} needs a known height and width of the image and the gradient")
    align = bool(node.get_attr_value("align_corners", 0))
    half = bool(node.get_attr_value("half_pixel_centers", 0))
    a_h, a_w = _tf_resize_maps(node.type[:-len("Grad")], tuple(before[1:3]), tuple(after[1:3]),
                               align, half)
    dtype = ctx.get_dtype(node.output[0])
    output = node.output[0]
    ctx.remove_node(node.name)
    nchw = ctx.make_node("Transpose", [grad], attr={"perm": [0, 3, 1, 2]}).output[0]
    rows = ctx.make_node("MatMul", [nchw, ctx.make_const(f"{node.name}_aw", a_w).output[0]]).output[0]
    both = ctx.make_node("MatMul", [ctx.make_const(f"{node.name}_ah", a_h.T.copy()).output[0],
                                    rows]).output[0]
    ctx.make_node("Transpose", [both], attr={"perm": [0, 2, 3, 1]}, outputs=[output],
                  shapes=[out_shape], dtypes=[dtype])


def _resize_bicubic(ctx, node, name, args):
    """ResizeBicubic(images [N, h, w, C], size) -> A_h x A_w^T: tf2onnx's own conversion (an ONNX
    cubic Resize) moved TensorFlow's values by up to 5e-4 (another kernel at the borders)."""
    images = node.input[0]
    before, out_shape = ctx.get_shape(images), ctx.get_shape(node.output[0])
    _require(before is not None and out_shape is not None and -1 not in before[1:3] + out_shape[1:3],
             "ResizeBicubic needs a known height and width of the image and the output")
    a_h, a_w = _tf_resize_maps("ResizeBicubic", tuple(before[1:3]), tuple(out_shape[1:3]),
                               bool(node.get_attr_value("align_corners", 0)),
                               bool(node.get_attr_value("half_pixel_centers", 0)))
    dtype = ctx.get_dtype(node.output[0])
    output = node.output[0]
    ctx.remove_node(node.name)
    nchw = ctx.make_node("Transpose", [images], attr={"perm": [0, 3, 1, 2]}).output[0]
    rows = ctx.make_node("MatMul", [nchw, ctx.make_const(f"{node.name}_awt", a_w.T.copy()).output[0]]).output[0]
    both = ctx.make_node("MatMul", [ctx.make_const(f"{node.name}_ah", a_h).output[0], rows]).output[0]
    ctx.make_node("Transpose", [both], attr={"perm": [0, 2, 3, 1]}, outputs=[output],
                  shapes=[out_shape], dtypes=[dtype])


def _tf_resize_maps(op: str, before, after, align: bool, half: bool):
    """(A_h [H, h], A_w [W, w]) of TensorFlow's `op` (ResizeBilinear, ResizeBicubic) from
    (h, w) to (H, W): one axis at a time on basis images (the other axis of size 1, which both
    keep), checked against the op on a random image."""
    import numpy as np
    import tensorflow as tf

    resize = getattr(tf.raw_ops, op)

    def run(images, size):  # a graph and session of its own: tf2onnx converts inside a graph
        graph = tf.Graph()
        with graph.as_default():
            out = resize(images=tf.constant(images), size=list(size), align_corners=align,
                         half_pixel_centers=half)
        with tf.compat.v1.Session(graph=graph) as session:
            return session.run(out).astype(np.float64)

    (h, w), (big_h, big_w) = before, after
    a_h = run(np.eye(h, dtype=np.float32).reshape(h, h, 1, 1), (big_h, 1))[:, :, 0, 0].T
    a_w = run(np.eye(w, dtype=np.float32).reshape(w, 1, w, 1), (1, big_w))[:, 0, :, 0].T
    probe = np.random.default_rng(0).standard_normal((1, h, w, 1)).astype(np.float32)
    mapped = a_h @ probe[0, :, :, 0].astype(np.float64) @ a_w.T
    _require(np.allclose(mapped, run(probe, after)[0, :, :, 0], atol=1e-4, rtol=1e-4),
             f"{op}Grad: the resize is not one linear map per axis")
    return a_h.astype(np.float32), a_w.astype(np.float32)


def _data_format(node) -> str:
    value = node.get_attr_value("data_format", b"NHWC")
    return value.decode() if isinstance(value, bytes) else value


def _padding(node) -> str:
    value = node.get_attr_value("padding")
    value = value.decode() if isinstance(value, bytes) else value
    _require(value in ("SAME", "VALID"), f"{node.type}: padding {value} is not supported")
    return value


def _require(condition: bool, message: str) -> None:
    from tf2onnx import utils

    utils.make_sure(condition, message)


GRADIENT_HANDLERS = {
    "BroadcastGradientArgs": (_broadcast_gradient_args, []),
    "MaxPoolGrad": (_max_pool_grad, []),
    "DepthwiseConv2dNativeBackpropInput": (_depthwise_backprop_input, []),
    "ShapeN": (_shape_n, []),
    "ReluGrad": (_relu_grad, []),
    "Relu6Grad": (_relu6_grad, []),
    "Erfc": (_erfc, []),
    "RsqrtGrad": (_rsqrt_grad, []),
    "SigmoidGrad": (_sigmoid_grad, []),
    "TanhGrad": (_tanh_grad, []),
    "LeakyReluGrad": (_leaky_relu_grad, []),
    "EluGrad": (_elu_grad, []),
    "SeluGrad": (_selu_grad, []),
    "ResizeBilinearGrad": (_resize_grad, []),
    "ResizeBicubicGrad": (_resize_grad, []),
    "ResizeBicubic": (_resize_bicubic, []),
}


def to_onnx(function, opset: int = DEFAULT_OPSET, layers: tuple[str, ...] = ()):
    """Convert a `tf.function` with an input signature to an onnx.ModelProto (dynamic batch).
    ModelError naming the op (and, from `layers`, the Keras layer names, the layer it is in)
    when tf2onnx leaves an op unconverted.

    Output names are the keys of the function's returned dict."""
    import tf2onnx

    model = by_tf2onnx(tf2onnx.convert.from_function, function, input_signature=function.input_signature,
                       opset=opset, custom_op_handlers=dict(GRADIENT_HANDLERS), layers=layers)
    return _captures_as_initializers(model, function)


class _UnconvertedOpLines(logging.Filter):
    """Drops tf2onnx's own error lines about ops it has no handler for ("Tensorflow op [...] is
    not supported", "Unsupported ops: Counter(...)"): `check_converted` says it once, naming the
    op and its layer."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.msg if isinstance(record.msg, str) else ""
        return not (text.startswith("Unsupported ops") or text.endswith("is not supported"))


def by_tf2onnx(convert, *args, layers: tuple[str, ...] = (), **kwargs):
    """The onnx.ModelProto of `convert(*args, **kwargs)` (tf2onnx.convert.from_function or
    from_keras), checked by `check_converted` (`layers`: the Keras layer names), the same bytes
    in every process (`tf2onnx_order`). tf2onnx's own logs (every optimisation pass at INFO, its
    lines about unconverted ops) are kept for --debug."""
    from camface.export.tf2onnx_order import fixed_order

    debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    package, converter = logging.getLogger("tf2onnx"), logging.getLogger("tf2onnx.tfonnx")
    level, quiet = package.level, _UnconvertedOpLines()
    if not debug:
        package.setLevel(logging.WARNING)
        converter.addFilter(quiet)
    try:
        with fixed_order():
            model, _ = convert(*args, **kwargs)
    finally:
        package.setLevel(level)
        converter.removeFilter(quiet)
    check_converted(model, layers)
    return model


def check_converted(model, layers: tuple[str, ...] = ()) -> None:
    """ModelError naming the first op of `model` that is no ONNX op (tf2onnx leaves a TensorFlow
    op it has no handler for as it is, and the graph would fail later, in ONNX Runtime or the
    checker), and the layer of `layers` its node name says it is in."""
    import re

    import onnx

    for node in model.graph.node:
        domain = node.domain or ""
        if domain not in ("", "ai.onnx") or onnx.defs.has(node.op_type, domain):
            continue
        # TensorFlow names nodes by scope, a layer called twice (a cut model) with a suffix _1
        parts = node.name.split("/")
        known = set(layers)
        layer = next((p for p in reversed(parts) if p in known), None) or next(
            (re.sub(r"_\d+$", "", p) for p in reversed(parts) if re.sub(r"_\d+$", "", p) in known), None)
        where = f" in layer {layer!r}" if layer else ""
        backward = ""
        if node.name.startswith("gradient"):
            # the forward op: the scope the gradient op sits in (Sigmoid/SigmoidGrad), unless that
            # is the layer's own scope (head_conv_1/TanhGrad), then the op's name without Grad
            scope = parts[-2] if len(parts) > 1 else ""
            forward = (scope if scope and re.sub(r"_\d+$", "", scope) not in known
                       else node.op_type.removesuffix("Grad") if node.op_type.endswith("Grad") else "")
            backward = f" (in the gradient of {forward})" if forward else " (in the gradient)"
        raise ModelError(f"TensorFlow op {node.op_type}{backward}{where} has no ONNX conversion "
                         f"(node {node.name!r}); camface cannot export this model. Replace that layer "
                         "or its activation with one tf2onnx converts, or export it as a .pt2/.onnx")


def _captures_as_initializers(model, function):
    """`model` with the graph inputs that tf2onnx leaves for tensors the function captured
    (constants that are no variables: a keras Normalization layer's mean and variance, given
    when it was built) turned into initializers holding their values."""
    from onnx import numpy_helper

    concrete = function.get_concrete_function()
    values = {inner.name: outer for inner, outer in zip(concrete.graph.internal_captures,
                                                        concrete.captured_inputs)}
    captured = [v for v in model.graph.input if v.name in values]
    for value in captured:
        tensor = values[value.name]
        if getattr(tensor, "dtype", None) is not None and tensor.dtype.name == "resource":
            continue  # a variable: tf2onnx freezes those itself
        model.graph.initializer.append(numpy_helper.from_array(tensor.numpy(), value.name))
        model.graph.input.remove(value)
    return model


def name_batch_dimension(model, name: str = "N") -> None:
    """Call the first (dynamic) dimension of every graph input and output `name`."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = name


def set_metadata(model, metadata: dict[str, str], doc: str = "") -> None:
    """Replace the model's metadata_props with `metadata` (str -> str)."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    if doc:
        model.doc_string = doc


def to_float16(model):
    """float16 features (image -> target-layer activations, the bulk of the work); the rest
    stays float32. Inputs and outputs keep their types (uint8/int64 in, float32 out). Uses
    onnxconverter-common's converter.

    Float32 after the target layer (`explanation_part`: the head's forward and backward passes
    and the heatmap maths, reading the float16 activations through Casts) because gradients of
    ~1e-4 lose most of their bits in float16, sums over positions and channels overflow or cancel
    there, and a float16 head's ReLU masks and max-pool choices flip on rounding, moving whole
    regions of a map. Rounding of the activations themselves stays; `camface.export.verify`
    says how that is checked."""
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        from camface.errors import CamfaceError

        raise CamfaceError("--fp16 needs onnxconverter-common (pip install 'camface[keras]')") from exc
    model = _isolate_outputs(model)
    # tf2onnx casts int64 class indices to float for comparisons; the converter would retype the
    # Cast's output without changing its `to` attribute, so Casts stay as they are.
    casts = {node.name for node in model.graph.node if node.op_type == "Cast"}
    keep = sorted(explanation_part(model) | casts)
    # ScatterElements(add) (the max-pool gradient) has no float16 kernel on ONNX Runtime's CPU.
    # Comparisons fed by those Casts stay float32 with them.
    blocked = list(float16.DEFAULT_OP_BLOCK_LIST) + ["ScatterElements", "Less", "Greater",
                                                     "Equal", "LessOrEqual", "GreaterOrEqual"]
    with warnings.catch_warnings():  # one warning per denormal weight clipped to 1e-7
        warnings.simplefilter("ignore", UserWarning)
        model = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep,
                                                 op_block_list=blocked)
    return drop_float16_round_trips(model)


def drop_float16_round_trips(model):
    """Make every Cast(float16) -> Cast(float32) pair read the float32 original, in place, and
    remove Casts to float16 that nothing reads any more; returns `model`.

    onnxconverter-common 1.16 wraps every blocked node in Casts to and from float16 and drops
    the pairs between two blocked nodes only when a Cast has one reader, so a float32 region
    would still round intermediate values (g^3 included) and its outputs to float16. The
    remaining Cast(float32) of a float32 tensor is the identity (ONNX Runtime removes it).
    Graph outputs are float32 afterwards."""
    from onnx import TensorProto

    def cast_to(node) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    graph = model.graph
    to_half = {node.output[0]: node for node in graph.node if cast_to(node) == TensorProto.FLOAT16}
    for node in graph.node:
        if cast_to(node) == TensorProto.FLOAT and node.input[0] in to_half:
            node.input[0] = to_half[node.input[0]].input[0]
    # A blocked node that writes a graph output gets a Cast to float16 *as* the output (the
    # converter retypes the output too): make that Cast the float32 identity again.
    for output in graph.output:
        if output.name in to_half:
            cast = to_half.pop(output.name)
            next(a for a in cast.attribute if a.name == "to").i = TensorProto.FLOAT
            output.type.tensor_type.elem_type = TensorProto.FLOAT
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in to_half.values():
        if node.output[0] not in read:
            graph.node.remove(node)
    return model


def explanation_part(model) -> set[str]:
    """Names of the nodes after the target layer: every node that the `activations` output
    does not need (the head's forward and backward passes, the heatmap maths). Found from the
    graph's wiring, not node names (tf2onnx's optimisers insert unnamed Transposes)."""
    from camface import graph_spec

    producer = {output: node for node in model.graph.node for output in node.output}
    features: set[str] = set()
    stack = [graph_spec.OUTPUT_ACTIVATIONS]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in features:
            features.add(node.name)
            stack.extend(node.input)
    return {node.name for node in model.graph.node} - features


def _isolate_outputs(model):
    """A copy where each graph output is written by its own Identity node.

    The float16 converter casts graph outputs back to float32 in place, which breaks nodes that
    also read an output tensor inside the graph (`activations` feeds the heatmaps)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for output in graph.output:
        inner = f"{output.name}__inner"
        for node in graph.node:
            node.output[:] = [inner if o == output.name else o for o in node.output]
            node.input[:] = [inner if i == output.name else i for i in node.input]
        graph.node.append(onnx.helper.make_node("Identity", [inner], [output.name],
                                                name=f"{output.name}__output"))
    # tf2onnx shares equal constants between nodes; one read by a node kept in float32 and one
    # converted would stay float32 for both. Give every reader its own copy.
    initializers = {init.name: init for init in graph.initializer}
    seen: set[str] = set()
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name not in initializers:
                continue
            if name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(initializers[name])
                copy.name = f"{name}__{node.name}_{position}"
                graph.initializer.append(copy)
                node.input[position] = copy.name
            seen.add(name)
    return model


def save(model, path: str | Path) -> Path:
    """Write the model (binary protobuf, whatever the name's suffix), whole or not at all
    (`camface.outputs.replace_whole`: a failure or a kill midway leaves the previous file, or
    none, never half a graph); raises OutputError naming the path when it cannot be written."""
    import onnx

    from camface.outputs import replace_whole

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {path.parent} does not exist")
    # format given: onnx picks it by the suffix otherwise (g.json would be written as JSON text)
    replace_whole(path, lambda partial: onnx.save_model(model, str(partial), format="protobuf"))
    return path
