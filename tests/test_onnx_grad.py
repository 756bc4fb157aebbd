"""Every gradient rule of camface.export.onnx_grad on a one-op (or few-op) head built with
onnx.helper: the emitted gradient of sum(seed * y) against central finite differences, and
against torch autograd where torch is installed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx_helpers import run_nodes  # noqa: E402

from camface.errors import ModelError  # noqa: E402
from camface.export import onnx_cam, onnx_grad, onnx_model  # noqa: E402
from camface.export.onnx_builder import GraphBuilder  # noqa: E402

RNG = np.random.default_rng(11)
W_CONV = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
W_DEPTH = RNG.standard_normal((3, 1, 3, 3)).astype(np.float32) * 0.3
W_GEMM = RNG.standard_normal((5, 48)).astype(np.float32) * 0.2
W_MAT = RNG.standard_normal((4, 6)).astype(np.float32) * 0.3
B_VEC = RNG.standard_normal(4).astype(np.float32)
BN = [RNG.uniform(0.5, 1.5, 3).astype(np.float32), RNG.standard_normal(3).astype(np.float32),
      RNG.standard_normal(3).astype(np.float32), RNG.uniform(0.5, 2, 3).astype(np.float32)]
X_SHAPE = (2, 3, 4, 4)


def node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


def init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _torch():
    import torch
    import torch.nn.functional as F

    return torch, F


# name -> (nodes, initializers, torch function of x or None)
CASES = {
    "Identity": ([node("Identity", ["x"])], [], lambda t, F, x: x),
    "Dropout": ([node("Dropout", ["x"])], [], lambda t, F, x: x),
    "Relu": ([node("Relu", ["x"])], [], lambda t, F, x: F.relu(x)),
    "LeakyRelu": ([node("LeakyRelu", ["x"], alpha=0.2)], [], lambda t, F, x: F.leaky_relu(x, 0.2)),
    "PRelu": ([node("PRelu", ["x", "slope"])], [init("slope", np.float32([[[0.1]], [[0.5]], [[-0.2]]]))],
              lambda t, F, x: F.prelu(x, t.tensor([0.1, 0.5, -0.2]))),
    "Clip(ReLU6)": ([node("Clip", ["x", "lo", "hi"])], [init("lo", np.float32(0)),
                                                       init("hi", np.float32(0.5))],
                    lambda t, F, x: t.clamp(x, 0, 0.5)),
    "Sigmoid": ([node("Sigmoid", ["x"])], [], lambda t, F, x: t.sigmoid(x)),
    "HardSigmoid": ([node("HardSigmoid", ["x"], alpha=1 / 6, beta=0.5)], [],
                    lambda t, F, x: F.hardsigmoid(x)),
    "HardSwish": ([node("HardSwish", ["x"])], [], lambda t, F, x: F.hardswish(x)),
    "SiLU": ([node("Sigmoid", ["x"], ["s"]), node("Mul", ["x", "s"])], [],
             lambda t, F, x: F.silu(x)),
    "Gelu": ([node("Gelu", ["x"])], [], lambda t, F, x: F.gelu(x)),
    "Gelu(tanh)": ([node("Gelu", ["x"], approximate="tanh")], [],
                   lambda t, F, x: F.gelu(x, approximate="tanh")),
    "Gelu(erf)": ([node("Div", ["x", "r2"], ["d"]), node("Erf", ["d"], ["e"]),
                   node("Add", ["e", "one"], ["p"]), node("Mul", ["x", "p"], ["m"]),
                   node("Mul", ["m", "half"])],
                  [init("r2", np.float32(np.sqrt(2))), init("one", np.float32(1)),
                   init("half", np.float32(0.5))], lambda t, F, x: F.gelu(x)),
    "Tanh": ([node("Tanh", ["x"])], [], lambda t, F, x: t.tanh(x)),
    "Exp/Neg/Sqrt/Pow": ([node("Neg", ["x"], ["n"]), node("Exp", ["n"], ["e"]),
                          node("Sqrt", ["e"], ["s"]), node("Pow", ["s", "three"])],
                         [init("three", np.float32(3))],
                         lambda t, F, x: t.sqrt(t.exp(-x)) ** 3),
    "Add(broadcast)": ([node("ReduceMean", ["x", "hw"], ["m"], keepdims=1),
                        node("Add", ["x", "m"])], [init("hw", np.array([2, 3]))],
                       lambda t, F, x: x + x.mean((2, 3), keepdim=True)),
    "Sub": ([node("Sub", ["c", "x"])], [init("c", np.float32(0.3))], lambda t, F, x: 0.3 - x),
    "Mul(SE block)": ([node("GlobalAveragePool", ["x"], ["p"]), node("Sigmoid", ["p"], ["s"]),
                       node("Mul", ["x", "s"])], [],
                      lambda t, F, x: x * t.sigmoid(x.mean((2, 3), keepdim=True))),
    "Div": ([node("Mul", ["x", "x"], ["q"]), node("Add", ["q", "one"], ["d"]),
             node("Div", ["x", "d"])], [init("one", np.float32(1))],
            lambda t, F, x: x / (x * x + 1)),
    "BatchNormalization": ([node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)],
                           [init(n, v) for n, v in zip("sbmv", BN)],
                           lambda t, F, x: F.batch_norm(x, *[t.tensor(v) for v in (BN[2], BN[3])],
                                                        t.tensor(BN[0]), t.tensor(BN[1]),
                                                        eps=1e-3)),
    "GlobalAveragePool": ([node("GlobalAveragePool", ["x"])], [],
                          lambda t, F, x: x.mean((2, 3), keepdim=True)),
    "GlobalMaxPool": ([node("GlobalMaxPool", ["x"])], [], lambda t, F, x: x.amax((2, 3), True)),
    "ReduceMean": ([node("ReduceMean", ["x", "hw"], keepdims=0)], [init("hw", np.array([-1, -2]))],
                   lambda t, F, x: x.mean((2, 3))),
    "ReduceSum": ([node("ReduceSum", ["x", "ax"], keepdims=1)], [init("ax", np.array([1]))],
                  lambda t, F, x: x.sum(1, keepdim=True)),
    "ReduceMax": ([node("ReduceMax", ["x", "ax"], keepdims=0)], [init("ax", np.array([1]))],
                  lambda t, F, x: x.amax(1)),
    "AveragePool": ([node("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2])], [],
                    lambda t, F, x: F.avg_pool2d(x, 2)),
    "AveragePool(pad, exclude)": ([node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                        pads=[1, 1, 1, 1])], [],
                                  lambda t, F, x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)),
    "AveragePool(dilated, pads, exclude)": ([node("AveragePool", ["x"], kernel_shape=[2, 2],
                                                  dilations=[2, 2], pads=[1, 1, 0, 1])], [], None),
    "MaxPool": ([node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
                [], lambda t, F, x: F.max_pool2d(x, 3, 2, 1)),
    "MaxPool(dilated, pads)": ([node("MaxPool", ["x"], kernel_shape=[2, 2], dilations=[2, 2],
                                     pads=[1, 1, 1, 1])], [],
                               lambda t, F, x: F.max_pool2d(x, 2, 1, 1, dilation=2)),
    "MaxPool(SAME_UPPER, strides 2)": ([node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                             auto_pad="SAME_UPPER")], [], None),
    "Flatten+Gemm": ([node("Flatten", ["x"], ["f"]), node("Gemm", ["f", "w", "b"], transB=1)],
                     [init("w", W_GEMM), init("b", np.zeros(5, np.float32))],
                     lambda t, F, x: F.linear(x.flatten(1), t.tensor(W_GEMM))),
    "Gemm(transA, alpha)": ([node("Flatten", ["x"], ["f"]), node("Transpose", ["f"], ["ft"],
                                                                 perm=[1, 0]),
                             node("Gemm", ["ft", "w"], transA=1, transB=1, alpha=0.5)],
                            [init("w", W_GEMM)],
                            lambda t, F, x: 0.5 * x.flatten(1) @ t.tensor(W_GEMM).T),
    "Reshape+MatMul+Add": ([node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
                            node("Reshape", ["t", "shape"], ["r"]),
                            node("MatMul", ["r", "w"], ["mm"]), node("Add", ["mm", "b6"])],
                           [init("shape", np.array([2, 16, 3])), init("w", W_MAT[:3]),
                            init("b6", np.ones(6, np.float32))],
                           lambda t, F, x: x.permute(0, 2, 3, 1).reshape(2, 16, 3)
                           @ t.tensor(W_MAT[:3]) + 1),
    "Squeeze/Unsqueeze": ([node("GlobalAveragePool", ["x"], ["p"]),
                           node("Squeeze", ["p", "ax"], ["s"]),
                           node("Unsqueeze", ["s", "ax0"])],
                          [init("ax", np.array([2, 3])), init("ax0", np.array([0]))],
                          lambda t, F, x: x.mean((2, 3))[None]),
    "Concat": ([node("Relu", ["x"], ["r"]), node("Concat", ["x", "r", "x"], axis=1)], [],
               lambda t, F, x: t.cat([x, F.relu(x), x], 1)),
    "Softmax": ([node("Flatten", ["x"], ["f"]), node("Softmax", ["f"], axis=-1)], [],
                lambda t, F, x: t.softmax(x.flatten(1), -1)),
    "Conv": ([node("Conv", ["x", "w"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
             [init("w", W_CONV)], lambda t, F, x: F.conv2d(x, t.tensor(W_CONV), padding=1)),
    "Conv(stride 2, bias)": ([node("Conv", ["x", "w", "b"], strides=[2, 2], pads=[1, 1, 1, 1])],
                             [init("w", W_CONV), init("b", B_VEC)],
                             lambda t, F, x: F.conv2d(x, t.tensor(W_CONV), t.tensor(B_VEC),
                                                      stride=2, padding=1)),
    "Conv(depthwise, SAME_UPPER)": ([node("Conv", ["x", "w"], group=3, strides=[2, 2],
                                          auto_pad="SAME_UPPER")], [init("w", W_DEPTH)], None),
    "Conv(dilated)": ([node("Conv", ["x", "w"], dilations=[2, 2], pads=[2, 2, 2, 2])],
                      [init("w", W_CONV)],
                      lambda t, F, x: F.conv2d(x, t.tensor(W_CONV), padding=2, dilation=2)),
}

# Transformer and modern-CNN heads: tokens x [N, T, C] = [2, 5, 8] (ViT, DeiT, Swin, ConvNeXt).
TOKENS = (2, 5, 8)
W_LN = [RNG.uniform(0.5, 1.5, 8).astype(np.float32), RNG.standard_normal(8).astype(np.float32)]
W_LN_CHW = [RNG.uniform(0.5, 1.5, (3, 4, 4)).astype(np.float32),
            RNG.standard_normal((3, 4, 4)).astype(np.float32)]
W_QKV = RNG.standard_normal((8, 24)).astype(np.float32) * 0.3
KEEP = RNG.random((5, 8)) > 0.5  # Where's condition: a constant mask


def _attention(t, F, x):
    """Two-head self-attention as timm writes it (no projections after)."""
    q, k, v = (x @ t.tensor(W_QKV)).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    a = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
    return (a @ v).transpose(1, 2).reshape(2, 5, 8)


TOKEN_CASES = {
    "LayerNormalization": ([node("LayerNormalization", ["x", "s", "b"], epsilon=1e-5)],
                           [init("s", W_LN[0]), init("b", W_LN[1])],
                           lambda t, F, x: F.layer_norm(x, (8,), *map(t.tensor, W_LN), 1e-5)),
    "LayerNorm(decomposed)": (
        [node("ReduceMean", ["x", "last"], ["m"]), node("Sub", ["x", "m"], ["d"]),
         node("Pow", ["d", "two"], ["p"]), node("ReduceMean", ["p", "last"], ["v"]),
         node("Add", ["v", "eps"], ["ve"]), node("Sqrt", ["ve"], ["sd"]),
         node("Div", ["d", "sd"], ["n"]), node("Mul", ["n", "s"], ["ns"]),
         node("Add", ["ns", "b"])],
        [init("last", np.array([-1])), init("two", np.float32(2)), init("eps", np.float32(1e-5)),
         init("s", W_LN[0]), init("b", W_LN[1])],
        lambda t, F, x: F.layer_norm(x, (8,), *map(t.tensor, W_LN), 1e-5)),
    # q, k, v by one MatMul and a Split; heads by Reshapes to shapes computed by Shape / Gather /
    # Concat (the shape path is not differentiated); softmax(q k^T / 2) v; heads merged back
    "Attention(Split, Reshape, Transpose, MatMul, Softmax)": (
        [node("MatMul", ["x", "w"], ["qkv"]),
         node("Split", ["qkv", "thirds"], ["q", "k", "v"], axis=-1),
         node("Shape", ["x"], ["shape"]), node("Gather", ["shape", "i0"], ["n"]),
         node("Gather", ["shape", "i1"], ["tokens"]), node("Unsqueeze", ["n", "ax0"], ["n1"]),
         node("Unsqueeze", ["tokens", "ax0"], ["t1"]),
         node("Concat", ["n1", "t1", "two_heads"], ["heads_shape"], axis=0),
         node("Concat", ["n1", "t1", "minus_one"], ["merged_shape"], axis=0),
         *[node("Reshape", [p, "heads_shape"], [p + "h"]) for p in "qkv"],
         node("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
         node("Transpose", ["kh"], ["kt"], perm=[0, 2, 3, 1]),
         node("Transpose", ["vh"], ["vt"], perm=[0, 2, 1, 3]),
         node("MatMul", ["qt", "kt"], ["scores"]), node("Mul", ["scores", "half"], ["scaled"]),
         node("Softmax", ["scaled"], ["a"], axis=-1), node("MatMul", ["a", "vt"], ["av"]),
         node("Transpose", ["av"], ["avt"], perm=[0, 2, 1, 3]),
         node("Reshape", ["avt", "merged_shape"])],
        [init("w", W_QKV), init("thirds", np.array([8, 8, 8])), init("i0", np.array(0)),
         init("i1", np.array(1)), init("ax0", np.array([0])), init("two_heads", np.array([2, 4])),
         init("minus_one", np.array([-1])), init("half", np.float32(0.5))],
        _attention),
    "Softmax(axis 1, tokens)": ([node("Softmax", ["x"], axis=1)], [],
                                lambda t, F, x: x.softmax(1)),
    "MatMul(x x^T)": ([node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
                       node("MatMul", ["x", "xt"])], [], lambda t, F, x: x @ x.transpose(1, 2)),
    "Split(first part unused)": ([node("Split", ["x", "sizes"], ["a", "b", "c"], axis=2),
                                  node("Mul", ["b", "c"])], [init("sizes", np.array([2, 3, 3]))],
                                 lambda t, F, x: x[..., 2:5] * x[..., 5:]),
    "Gather(class token)": ([node("Gather", ["x", "i0"], axis=1)], [init("i0", np.array(0))],
                            lambda t, F, x: x[:, 0]),
    "Gather(repeated, negative)": ([node("Gather", ["x", "rows"], axis=1)],
                                   [init("rows", np.array([[0, 2], [0, -1]]))],
                                   lambda t, F, x: x[:, [[0, 2], [0, 4]]]),
    # -1 and 4 name one row: taken as distinct (np.unique of the raw values), one gradient was lost
    "Gather(one row named 4 and -1)": ([node("Gather", ["x", "rows"], axis=1)],
                                       [init("rows", np.array([4, -1]))], lambda t, F, x: x[:, [4, 4]]),
    "Gather(run-time indices)": ([node("Shape", ["x"], ["shape"]),
                                  node("Gather", ["shape", "i1"], ["tokens"]),
                                  node("Sub", ["tokens", "one"], ["last"]),
                                  node("Gather", ["x", "last"], axis=1)],
                                 [init("i1", np.array(1)), init("one", np.array(1))],
                                 lambda t, F, x: x[:, -1]),
    "Slice(patch tokens)": ([node("Slice", ["x", "start", "end", "axis"])],
                            [init("start", np.array([1])), init("end", np.array([2 ** 62])),
                             init("axis", np.array([1]))], lambda t, F, x: x[:, 1:]),
    "Slice(steps 3, -2)": ([node("Slice", ["x", "starts", "ends", "axes", "steps"])],
                           [init("starts", np.array([1, 4])), init("ends", np.array([8, -100])),
                            init("axes", np.array([2, 1])), init("steps", np.array([3, -2]))],
                           lambda t, F, x: x[:, [4, 2, 0], 1:8:3]),
    "Concat(tokens)": ([node("Slice", ["x", "zero", "one", "axis"], ["first"]),
                        node("Concat", ["first", "x"], axis=1)],
                       [init("zero", np.array([0])), init("one", np.array([1])),
                        init("axis", np.array([1]))], lambda t, F, x: t.cat([x[:, :1], x], 1)),
    "Erf": ([node("Erf", ["x"])], [], lambda t, F, x: t.erf(x)),
    "Gelu(tanh, decomposed)": ([node("Pow", ["x", "three"], ["p"]), node("Mul", ["p", "c1"], ["a"]),
                                node("Add", ["x", "a"], ["s"]), node("Mul", ["s", "c2"], ["i"]),
                                node("Tanh", ["i"], ["th"]), node("Add", ["th", "one"], ["u"]),
                                node("Mul", ["x", "u"], ["m"]), node("Mul", ["m", "half"])],
                               [init("three", np.float32(3)), init("c1", np.float32(0.044715)),
                                init("c2", np.float32(np.sqrt(2 / np.pi))),
                                init("one", np.float32(1)), init("half", np.float32(0.5))],
                               lambda t, F, x: F.gelu(x, approximate="tanh")),
    "Expand(to a computed shape)": ([node("ReduceMean", ["x", "ax1"], ["m"]),
                                     node("Shape", ["x"], ["shape"]),
                                     node("Expand", ["m", "shape"], ["e"]), node("Mul", ["e", "x"])],
                                    [init("ax1", np.array([1]))],
                                    lambda t, F, x: x.mean(1, keepdim=True).expand(2, 5, 8) * x),
    "Where": ([node("ReduceMean", ["x", "ax1"], ["m"]), node("Where", ["keep", "x", "m"])],
              [init("keep", KEEP), init("ax1", np.array([1]))],
              lambda t, F, x: t.where(t.tensor(KEEP), x, x.mean(1, keepdim=True))),
    "ReduceMean(tokens)": ([node("ReduceMean", ["x", "ax1"], keepdims=0)],
                           [init("ax1", np.array([1]))], lambda t, F, x: x.mean(1)),
}
CASES.update(TOKEN_CASES)
CASES.update({
    "LayerNormalization(axis 1)": ([node("LayerNormalization", ["x", "s", "b"], axis=1)],
                                   [init("s", W_LN_CHW[0]), init("b", W_LN_CHW[1])],
                                   lambda t, F, x: F.layer_norm(x, (3, 4, 4),
                                                                *map(t.tensor, W_LN_CHW))),
    "LayerNorm2d(permuted)": ([node("Transpose", ["x"], ["nhwc"], perm=[0, 2, 3, 1]),
                               node("LayerNormalization", ["nhwc", "s", "b"], ["n"], epsilon=1e-6),
                               node("Transpose", ["n"], perm=[0, 3, 1, 2])],
                              [init("s", W_LN[0][:3]), init("b", W_LN[1][:3])],
                              lambda t, F, x: F.layer_norm(x.permute(0, 2, 3, 1), (3,), t.tensor(
                                  W_LN[0][:3]), t.tensor(W_LN[1][:3]), 1e-6).permute(0, 3, 1, 2)),
})
# Resize (F.interpolate after the target: FPN-like heads, upsampling blocks), each mode as torch
# writes it, by scales and by sizes (of both axes or through `axes`)
CASES.update({
    "Resize(nearest x2, scales)": ([node("Resize", ["x", "", "s"], mode="nearest")],
                                   [init("s", np.float32([1, 1, 2, 2]))],
                                   lambda t, F, x: F.interpolate(x, scale_factor=2)),
    "Resize(bilinear x2)": ([node("Resize", ["x", "", "s"], mode="linear",
                                  coordinate_transformation_mode="pytorch_half_pixel")],
                            [init("s", np.float32([1, 1, 2, 2]))],
                            lambda t, F, x: F.interpolate(x, scale_factor=2, mode="bilinear")),
    "Resize(bilinear 4 -> 7, align_corners)": (
        [node("Resize", ["x", "", "", "z"], mode="linear",
              coordinate_transformation_mode="align_corners")], [init("z", np.int64([2, 3, 7, 7]))],
        lambda t, F, x: F.interpolate(x, size=(7, 7), mode="bilinear", align_corners=True)),
    "Resize(bicubic 4 -> 6x5)": ([node("Resize", ["x", "", "", "z"], mode="cubic",
                                       cubic_coeff_a=-0.75)], [init("z", np.int64([2, 3, 6, 5]))],
                                 lambda t, F, x: F.interpolate(x, size=(6, 5), mode="bicubic")),
    "Resize(nearest 4 -> 3, axes)": ([node("Resize", ["x", "", "", "z"], mode="nearest", axes=[2, 3],
                                           coordinate_transformation_mode="asymmetric",
                                           nearest_mode="floor")], [init("z", np.int64([3, 3]))],
                                     lambda t, F, x: F.interpolate(x, size=(3, 3))),
    "Resize(antialiased 4 -> 3)": ([node("Resize", ["x", "", "", "z"], mode="linear", antialias=1,
                                         exclude_outside=1)], [init("z", np.int64([2, 3, 3, 3]))],
                                   lambda t, F, x: F.interpolate(x, size=(3, 3), mode="bilinear",
                                                                 antialias=True)),
    "Resize(width only, 4 -> 9)": ([node("Resize", ["x", "", "s"], mode="linear")],
                                   [init("s", np.float32([1, 1, 1, 2.25]))],
                                   lambda t, F, x: F.interpolate(x, size=(4, 9), mode="bilinear")),
    "Resize(NHWC, bilinear x2)": ([node("Resize", ["x", "", "s"], mode="linear")],
                                  [init("s", np.float32([1, 2, 2, 1]))],
                                  lambda t, F, x: F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2,
                                                                mode="bilinear").permute(0, 2, 3, 1)),
    "Resize(sizes, not_larger)": ([node("Resize", ["x", "", "", "z"], mode="linear", axes=[2, 3],
                                        keep_aspect_ratio_policy="not_larger")],
                                  [init("z", np.int64([7, 9]))], None),
})
# Smooth activations, the log / exp family, and a head that ends in log_softmax
CASES.update({
    "Elu": ([node("Elu", ["x"], alpha=0.7)], [], lambda t, F, x: F.elu(x, 0.7)),
    "Selu": ([node("Selu", ["x"])], [], lambda t, F, x: F.selu(x)),
    "Celu": ([node("Celu", ["x"], alpha=0.5)], [], lambda t, F, x: F.celu(x, 0.5)),
    "Softplus": ([node("Softplus", ["x"])], [], lambda t, F, x: F.softplus(x)),
    "Softplus(threshold, as dynamo writes it)": (
        [node("Softplus", ["x"], ["s"]), node("Greater", ["x", "one"], ["big"]),
         node("Where", ["big", "x", "s"])], [init("one", np.float32(1))],
        lambda t, F, x: F.softplus(x, threshold=1)),
    "Softsign": ([node("Softsign", ["x"])], [], lambda t, F, x: F.softsign(x)),
    "Softsign(Abs, Add, Div)": ([node("Abs", ["x"], ["a"]), node("Add", ["a", "one"], ["d"]),
                                 node("Div", ["x", "d"])], [init("one", np.float32(1))],
                                lambda t, F, x: F.softsign(x)),
    "Mish": ([node("Mish", ["x"])], [], lambda t, F, x: F.mish(x)),
    "Mish(Softplus, Tanh, Mul)": ([node("Softplus", ["x"], ["s"]), node("Tanh", ["s"], ["t"]),
                                   node("Mul", ["x", "t"])], [], lambda t, F, x: F.mish(x)),
    "Abs/Log": ([node("Abs", ["x"], ["a"]), node("Log", ["a"])], [],
                lambda t, F, x: t.log(x.abs())),
    "Reciprocal": ([node("Reciprocal", ["x"])], [], lambda t, F, x: t.reciprocal(x)),
    "LogSoftmax": ([node("Flatten", ["x"], ["f"]), node("LogSoftmax", ["f"], axis=-1)], [],
                   lambda t, F, x: F.log_softmax(x.flatten(1), -1)),
    # before opset 13 the input is taken as 2-D [N, C H W] (axis 1 by default)
    "LogSoftmax(opset 12, 4-D)": ([node("LogSoftmax", ["x"])], [],
                                  lambda t, F, x: F.log_softmax(x.flatten(1), -1).reshape(x.shape)),
    "Softmax(opset 12, 4-D)": ([node("Softmax", ["x"])], [],
                               lambda t, F, x: x.flatten(1).softmax(-1).reshape(x.shape)),
})
# Variadic Max, Min, Sum, Mean with broadcasting. _inputs moves |x| < 0.05 to exactly 0.1: ties
# with the constant 0.1, where torch.maximum gives each side half (and so does a central
# difference of max(x, 0.1) at x = 0.1)
CASES.update({
    "Max(broadcast, ties)": ([node("ReduceMean", ["x", "hw"], ["m"]),
                              node("Max", ["x", "m", "c"])],
                             [init("hw", np.array([2, 3])), init("c", np.float32(0.1))],
                             lambda t, F, x: t.maximum(t.maximum(x, x.mean((2, 3), keepdim=True)),
                                                       t.tensor(0.1))),
    "Min(broadcast, ties)": ([node("ReduceMean", ["x", "hw"], ["m"]),
                              node("Min", ["c", "x", "m"])],
                             [init("hw", np.array([2, 3])), init("c", np.float32(0.1))],
                             lambda t, F, x: t.minimum(t.minimum(t.tensor(0.1), x),
                                                       x.mean((2, 3), keepdim=True))),
    "Max(one input)": ([node("Max", ["x"])], [], lambda t, F, x: x),
    "Sum(broadcast)": ([node("ReduceMean", ["x", "hw"], ["m"]), node("Relu", ["x"], ["r"]),
                        node("Sum", ["x", "m", "r"])], [init("hw", np.array([2, 3]))],
                       lambda t, F, x: x + x.mean((2, 3), keepdim=True) + F.relu(x)),
    "Mean(broadcast)": ([node("ReduceMean", ["x", "hw"], ["m"]), node("Mul", ["x", "x"], ["q"]),
                         node("Mean", ["x", "m", "q", "c"])],
                        [init("hw", np.array([2, 3])),
                         init("c", np.float32([[[1]], [[2]], [[3]]]))],
                        lambda t, F, x: (x + x.mean((2, 3), keepdim=True) + x * x
                                         + t.tensor([1.0, 2, 3]).reshape(3, 1, 1)) / 4),
})
# Normalisations: instance and group norm (as torch's exporters write nn.GroupNorm: legacy and
# dynamo below opset 21 by InstanceNormalization, dynamo from 21 by GroupNormalization), L2
# normalised embeddings (F.normalize: ReduceL2, Clip, Expand, Div; or LpNormalization)
W_GN = [RNG.uniform(0.5, 1.5, 4).astype(np.float32), RNG.standard_normal(4).astype(np.float32)]
GROUPS = (2, 4, 3, 3)
CASES.update({
    "InstanceNormalization": ([node("InstanceNormalization", ["x", "s", "b"], epsilon=1e-5)],
                              [init("s", BN[0]), init("b", BN[1])],
                              lambda t, F, x: F.instance_norm(x, weight=t.tensor(BN[0]),
                                                              bias=t.tensor(BN[1]), eps=1e-5)),
    "GroupNorm(InstanceNormalization, as torch exports it)": (
        [node("Reshape", ["x", "grouped"], ["r"]),
         node("InstanceNormalization", ["r", "ones", "zeros"], ["n"]),
         node("Shape", ["x"], ["shape"]), node("Reshape", ["n", "shape"], ["back"]),
         node("Mul", ["back", "s"], ["scaled"]), node("Add", ["scaled", "b"])],
        [init("grouped", np.array([0, 2, -1])), init("ones", np.ones(2, np.float32)),
         init("zeros", np.zeros(2, np.float32)), init("s", W_GN[0].reshape(4, 1, 1)),
         init("b", W_GN[1].reshape(4, 1, 1))],
        lambda t, F, x: F.group_norm(x, 2, *map(t.tensor, W_GN))),
    "GroupNormalization(opset 21)": ([node("GroupNormalization", ["x", "s", "b"], num_groups=2)],
                                     [init("s", W_GN[0]), init("b", W_GN[1])],
                                     lambda t, F, x: F.group_norm(x, 2, *map(t.tensor, W_GN))),
    "GroupNormalization(opset 18, scale per group)": (
        [node("GroupNormalization", ["x", "s", "b"], num_groups=2, epsilon=1e-3)],
        [init("s", W_GN[0][:2]), init("b", W_GN[1][:2])],
        lambda t, F, x: F.group_norm(x, 2, eps=1e-3)
        * t.tensor(W_GN[0][:2]).repeat_interleave(2).reshape(4, 1, 1)
        + t.tensor(W_GN[1][:2]).repeat_interleave(2).reshape(4, 1, 1)),
    "LpNormalization(p 2)": ([node("Flatten", ["x"], ["f"]),
                              node("LpNormalization", ["f"], axis=1, p=2)], [],
                             lambda t, F, x: F.normalize(x.flatten(1), dim=1)),
    "LpNormalization(p 1, channels)": ([node("LpNormalization", ["x"], axis=1, p=1)], [],
                                       lambda t, F, x: F.normalize(x, p=1, dim=1)),
    "F.normalize(ReduceL2, Clip, Expand, Div)": (
        [node("Flatten", ["x"], ["f"]), node("ReduceL2", ["f", "ax1"], ["n"], keepdims=1),
         node("Clip", ["n", "eps"], ["c"]), node("Shape", ["f"], ["shape"]),
         node("Expand", ["c", "shape"], ["e"]), node("Div", ["f", "e"])],
        [init("ax1", np.array([1])), init("eps", np.float32(1e-12))],
        lambda t, F, x: F.normalize(x.flatten(1), dim=1)),
    "ReduceL2(keepdims 0)": ([node("ReduceL2", ["x", "ax1"], keepdims=0)],
                             [init("ax1", np.array([1]))], lambda t, F, x: x.norm(dim=1)),
    "ReduceSumSquare": ([node("ReduceSumSquare", ["x", "hw"])], [init("hw", np.array([2, 3]))],
                        lambda t, F, x: (x * x).sum((2, 3), keepdim=True)),
    "ReduceLogSumExp": ([node("ReduceLogSumExp", ["x", "ax1"], keepdims=0)],
                        [init("ax1", np.array([1]))], lambda t, F, x: t.logsumexp(x, 1)),
    "ReduceLogSum": ([node("Mul", ["x", "x"], ["q"]), node("Add", ["q", "one"], ["p"]),
                      node("ReduceLogSum", ["p", "hw"], keepdims=0)],
                     [init("one", np.float32(1)), init("hw", np.array([2, 3]))],
                     lambda t, F, x: t.log((x * x + 1).sum((2, 3)))),
    "ReduceLogSum(keepdims)": ([node("Exp", ["x"], ["e"]), node("ReduceLogSum", ["e", "ax1"])],
                               [init("ax1", np.array([1]))],
                               lambda t, F, x: t.logsumexp(x, 1, keepdim=True)),
    "ReduceMin": ([node("ReduceMin", ["x", "hw"], keepdims=0)], [init("hw", np.array([2, 3]))],
                  lambda t, F, x: x.amin((2, 3))),
    "ReduceL1": ([node("ReduceL1", ["x", "ax1"])], [init("ax1", np.array([1]))],
                 lambda t, F, x: x.norm(p=1, dim=1, keepdim=True)),
    "ReduceMax(no axes, noop)": ([node("ReduceMax", ["x"], noop_with_empty_axes=1)], [],
                                 lambda t, F, x: x),
})
# Ops that move elements: Pad (F.pad: constant, negative pads crop; reflect, replicate and
# circular as Pad's reflect, edge and wrap), Tile (Tensor.repeat), PixelShuffle (DepthToSpace
# CRD), SpaceToDepth; and ConvTranspose (a decoder or FPN-like upsampling after the target)
W_CONVT = RNG.standard_normal((3, 2, 3, 3)).astype(np.float32) * 0.3
W_CONVT_DEPTH = RNG.standard_normal((3, 1, 3, 3)).astype(np.float32) * 0.3
SHUFFLE = (2, 8, 3, 3)
CASES.update({
    "Pad(constant 0.5)": ([node("Pad", ["x", "pads", "v"], mode="constant")],
                          [init("pads", np.array([0, 0, 1, 2, 0, 0, 3, 1])),
                           init("v", np.float32(0.5))],
                          lambda t, F, x: F.pad(x, (2, 1, 1, 3), value=0.5)),
    "Pad(negative, axes)": ([node("Pad", ["x", "pads", "", "axes"])],
                            [init("pads", np.array([-1, 2, 1, -1])),
                             init("axes", np.array([2, 3]))],
                            lambda t, F, x: F.pad(x, (2, -1, -1, 1))),
    "Pad(run-time pads)": ([node("Shape", ["x"], ["shape"]), node("Slice", ["shape", "a", "b"],
                                                                  ["hw"]),
                            node("Sub", ["hw", "three"], ["p"]),
                            node("Concat", ["zeros", "p", "zeros", "p"], ["pads"], axis=0),
                            node("Pad", ["x", "pads"])],
                           [init("a", np.array([2])), init("b", np.array([4])),
                            init("three", np.array([3])), init("zeros", np.array([0, 0]))],
                           lambda t, F, x: F.pad(x, (1, 1, 1, 1))),
    "Pad(reflect)": ([node("Pad", ["x", "pads"], mode="reflect")],
                     [init("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1]))],
                     lambda t, F, x: F.pad(x, (2, 1, 1, 2), mode="reflect")),
    "Pad(edge)": ([node("Pad", ["x", "pads"], mode="edge")],
                  [init("pads", np.array([0, 0, 3, 2, 0, 0, 2, 1]))],
                  lambda t, F, x: F.pad(x, (2, 1, 3, 2), mode="replicate")),
    "Pad(wrap)": ([node("Pad", ["x", "pads", "", "axes"], mode="wrap")],
                  [init("pads", np.array([1, 2, 2, 1])), init("axes", np.array([-2, -1]))],
                  lambda t, F, x: F.pad(x, (2, 1, 1, 2), mode="circular")),
    "Tile": ([node("Tile", ["x", "r"])], [init("r", np.array([1, 2, 1, 3]))],
             lambda t, F, x: x.repeat(1, 2, 1, 3)),
    "DepthToSpace(CRD, PixelShuffle)": ([node("DepthToSpace", ["x"], blocksize=2, mode="CRD")],
                                        [], lambda t, F, x: F.pixel_shuffle(x, 2)),
    "DepthToSpace(DCR)": ([node("DepthToSpace", ["x"], blocksize=2)], [],
                          lambda t, F, x: x.reshape(2, 2, 2, 2, 3, 3).permute(0, 3, 4, 1, 5, 2)
                          .reshape(2, 2, 6, 6)),
    "SpaceToDepth": ([node("SpaceToDepth", ["x"], blocksize=2)], [],
                     lambda t, F, x: x.reshape(2, 3, 2, 2, 2, 2).permute(0, 3, 5, 1, 2, 4)
                     .reshape(2, 12, 2, 2)),
    "ConvTranspose(stride 2, output_padding)": (
        [node("ConvTranspose", ["x", "w"], strides=[2, 2], pads=[1, 1, 1, 1],
              output_padding=[1, 1])], [init("w", W_CONVT)],
        lambda t, F, x: F.conv_transpose2d(x, t.tensor(W_CONVT), stride=2, padding=1,
                                           output_padding=1)),
    "ConvTranspose(depthwise, dilated, bias)": (
        [node("ConvTranspose", ["x", "w", "b"], group=3, dilations=[2, 2], pads=[2, 2, 2, 2])],
        [init("w", W_CONVT_DEPTH), init("b", B_VEC[:3])],
        lambda t, F, x: F.conv_transpose2d(x, t.tensor(W_CONVT_DEPTH), t.tensor(B_VEC[:3]),
                                           padding=2, dilation=2, groups=3)),
    "ConvTranspose(SAME_UPPER)": ([node("ConvTranspose", ["x", "w"], strides=[2, 2],
                                        auto_pad="SAME_UPPER")], [init("w", W_CONVT)], None),
    "ConvTranspose(SAME_LOWER, strides 2 x 3, dilated)": (
        [node("ConvTranspose", ["x", "w"], strides=[2, 3], dilations=[1, 2],
              auto_pad="SAME_LOWER")], [init("w", W_CONVT)], None),
    "ConvTranspose(output_shape 7 x 8)": ([node("ConvTranspose", ["x", "w"], strides=[2, 2],
                                                output_shape=[7, 8])], [init("w", W_CONVT)], None),
    # the last rows and columns beyond what the input reaches stay 0 (refused before)
    "ConvTranspose(output_shape 10 x 9, beyond the reach)": (
        [node("ConvTranspose", ["x", "w"], strides=[2, 2], output_shape=[10, 9])],
        [init("w", W_CONVT)], None),
    "ConvTranspose(asymmetric pads, stride 3)": (
        [node("ConvTranspose", ["x", "w"], strides=[3, 2], pads=[0, 2, 1, 0],
              output_padding=[2, 1])], [init("w", W_CONVT)], None),
})
# Einsum as torch.einsum writes attention (scores, then values), linear layers, reductions and
# transpositions: explicit and implicit outputs, labels only one operand holds, an ellipsis (of
# a batch of 1 broadcast), and an axis of size 1 broadcast along a label of the other operand
W_EINSUM = RNG.standard_normal((6, 8)).astype(np.float32) * 0.3
V_EINSUM = RNG.standard_normal(5).astype(np.float32)
M_EINSUM = RNG.standard_normal((1, 3, 4, 5)).astype(np.float32) * 0.3
EINSUM_TOKENS = ("Einsum(linear bld,od->blo)", "Einsum(ellipsis, linear ...d,od->...o)")
CASES.update({
    "Einsum(attention scores bhqd,bhkd->bhqk)": (
        [node("Einsum", ["x", "x"], equation="bhqd,bhkd->bhqk")], [],
        lambda t, F, x: t.einsum("bhqd,bhkd->bhqk", x, x)),
    "Einsum(attention values bhqk,bhkd->bhqd)": (
        [node("Softmax", ["x"], ["a"], axis=-1),
         node("Einsum", ["a", "x"], equation="bhqk, bhkd -> bhqd")], [],
        lambda t, F, x: t.einsum("bhqk,bhkd->bhqd", x.softmax(-1), x)),
    "Einsum(linear bld,od->blo)": ([node("Einsum", ["x", "w"], equation="bld,od->blo")],
                                   [init("w", W_EINSUM)],
                                   lambda t, F, x: t.einsum("bld,od->blo", x, t.tensor(W_EINSUM))),
    "Einsum(one operand, nchw->nhc)": ([node("Einsum", ["x"], equation="nchw->nhc")], [],
                                       lambda t, F, x: t.einsum("nchw->nhc", x)),
    "Einsum(implicit nchw,c)": ([node("Einsum", ["x", "v"], equation="nchw,c")],
                                [init("v", V_EINSUM[:3])],
                                lambda t, F, x: t.einsum("nchw,c", x, t.tensor(V_EINSUM[:3]))),
    "Einsum(labels of one operand, nchw,k->nk)": (
        [node("Einsum", ["x", "v"], equation="nchw,k->nk")], [init("v", V_EINSUM)],
        lambda t, F, x: t.einsum("nchw,k->nk", x, t.tensor(V_EINSUM))),
    "Einsum(to a scalar, nchw->)": ([node("Einsum", ["x"], equation="nchw->")], [],
                                    lambda t, F, x: t.einsum("nchw->", x)),
    "Einsum(ellipsis, ...qd,...kd->...qk)": (
        [node("Einsum", ["x", "x"], equation="...qd,...kd->...qk")], [],
        lambda t, F, x: t.einsum("...qd,...kd->...qk", x, x)),
    "Einsum(ellipsis, linear ...d,od->...o)": (
        [node("Einsum", ["x", "w"], equation="...d,od->...o")], [init("w", W_EINSUM)],
        lambda t, F, x: t.einsum("...d,od->...o", x, t.tensor(W_EINSUM))),
    "Einsum(ellipsis, batch of 1 broadcast)": (
        [node("Einsum", ["x", "m"], equation="...ij,...jk->...ik")], [init("m", M_EINSUM)],
        lambda t, F, x: t.einsum("...ij,...jk->...ik", x, t.tensor(M_EINSUM))),
    # x declared [2, ?, 4, 4]: its first channel's size (1, broadcast) is unknown to the rule;
    # the second form contracts the label, so x's own gradient is stretched along it
    "Einsum(unknown-size axis broadcast)": (
        [node("Slice", ["x", "zero", "one", "ax1"], ["first"]),
         node("Einsum", ["x", "first"], equation="bhqd,bhkd->bhqk")],
        [init("zero", np.array([0])), init("one", np.array([1])), init("ax1", np.array([1]))],
        lambda t, F, x: t.einsum("bhqd,bhkd->bhqk", x, x[:, :1])),
    "Einsum(unknown-size axis broadcast, contracted)": (
        [node("Slice", ["x", "zero", "one", "ax1"], ["first"]),
         node("Einsum", ["first", "x"], equation="bhqd,bhkd->bqk")],
        [init("zero", np.array([0])), init("one", np.array([1])), init("ax1", np.array([1]))],
        lambda t, F, x: t.einsum("bhqd,bhkd->bqk", x[:, :1], x)),
    "Einsum(size-1 axis broadcast)": (
        [node("ReduceMean", ["x", "ax1"], ["m"]),
         node("Einsum", ["x", "m"], equation="bhqd,bhkd->bhqk")], [init("ax1", np.array([1]))],
        lambda t, F, x: t.einsum("bhqd,bhkd->bhqk", x, x.mean(1, keepdim=True))),
})
# LRN (AlexNet, GoogLeNet; ONNX Runtime runs it on 4-D inputs and odd sizes only),
# ThresholdedRelu, LpPool (p 1, 2, 3; strides, pads, dilations, auto_pad) and GlobalLpPool
W_LRN = dict(alpha=0.5, beta=0.75, bias=2.0)
CASES.update({
    "LRN(size 3)": ([node("LRN", ["x"], size=3, **W_LRN)], [],
                    lambda t, F, x: F.local_response_norm(x, 3, 0.5, 0.75, 2.0)),
    "LRN(size 5, wider than the channels)": (
        [node("LRN", ["x"], size=5, **W_LRN)], [],
        lambda t, F, x: F.local_response_norm(x, 5, 0.5, 0.75, 2.0)),
    "LRN(size 1, defaults)": ([node("LRN", ["x"], size=1)], [],
                              lambda t, F, x: F.local_response_norm(x, 1, 1e-4, 0.75, 1.0)),
    "ThresholdedRelu": ([node("ThresholdedRelu", ["x"], alpha=0.5)], [],
                        lambda t, F, x: F.threshold(x, 0.5, 0.0)),
    "LpPool(p 2, stride 2)": ([node("LpPool", ["x"], kernel_shape=[2, 2], strides=[2, 2])], [],
                              lambda t, F, x: F.lp_pool2d(x, 2, 2)),
    "LpPool(p 1, pads)": ([node("LpPool", ["x"], p=1, kernel_shape=[3, 3], strides=[2, 2],
                                pads=[1, 1, 1, 1])], [],
                          lambda t, F, x: F.avg_pool2d(x.abs(), 3, 2, 1) * 9),
    "LpPool(p 3, dilated)": ([node("LpPool", ["x"], p=3, kernel_shape=[2, 2], dilations=[2, 1],
                                   pads=[1, 0, 0, 1])], [], None),
    "LpPool(p 2, SAME_UPPER)": ([node("LpPool", ["x"], kernel_shape=[2, 3], strides=[2, 2],
                                      auto_pad="SAME_UPPER")], [], None),
    "LpPool(p 2, SAME_LOWER)": ([node("LpPool", ["x"], kernel_shape=[3, 2], strides=[2, 2],
                                      auto_pad="SAME_LOWER")], [], None),
    "LpPool(p 3, dilated, strided, VALID)": ([node("LpPool", ["x"], p=3, kernel_shape=[2, 2],
                                                   dilations=[2, 2], strides=[1, 2],
                                                   auto_pad="VALID")], [], None),
    "LpPool(p 2, dilated, strided, pads)": ([node("LpPool", ["x"], kernel_shape=[3, 3],
                                                  dilations=[2, 2], strides=[2, 2],
                                                  pads=[2, 1, 1, 2])], [], None),
    "LpPool(p 2, 1-D)": ([node("LpPool", ["x"], kernel_shape=[3], strides=[2])], [],
                         lambda t, F, x: F.lp_pool1d(x, 2, 3, 2)),
    "GlobalLpPool(p 2)": ([node("GlobalLpPool", ["x"])], [],
                          lambda t, F, x: x.norm(dim=(2, 3), keepdim=True)),
    "GlobalLpPool(p 3)": ([node("GlobalLpPool", ["x"], p=3)], [],
                          lambda t, F, x: (x.abs() ** 3).sum((2, 3), keepdim=True) ** (1 / 3)),
})
ZEROS_KEPT = (RNG.random((3, 4, 4)) > 0.4).astype(np.float32)
# What torch writes for LPPool2d (Pow, AveragePool, sign(s) relu(|s|), Pow), cumsum, topk and
# sort (TopK), adaptive pooling from a .pt2 (GatherND), torch.prod, and trigonometry
CASES.update({
    "Sign": ([node("Sign", ["x"], ["s"]), node("Mul", ["s", "x"])], [],
             lambda t, F, x: t.sign(x) * x),
    "LPPool2d(as torch writes it)": (
        [node("Pow", ["x", "two"], ["p"]), node("AveragePool", ["p"], ["a"], kernel_shape=[2, 2],
                                                strides=[2, 2]),
         node("Sign", ["a"], ["s"]), node("Abs", ["a"], ["m"]), node("Relu", ["m"], ["r"]),
         node("Mul", ["s", "r"], ["sr"]), node("Mul", ["sr", "four"], ["f"]),
         node("Pow", ["f", "half"])],
        [init("two", np.float32(2)), init("four", np.float32(4)), init("half", np.float32(0.5))],
        lambda t, F, x: F.lp_pool2d(x, 2, 2)),
    "CumSum": ([node("CumSum", ["x", "ax"])], [init("ax", np.array(2))],
               lambda t, F, x: x.cumsum(2)),
    "CumSum(reverse, exclusive)": ([node("CumSum", ["x", "ax"], reverse=1, exclusive=1)],
                                   [init("ax", np.array(-1))],
                                   lambda t, F, x: x.flip(3).cumsum(3).flip(3) - x),
    "TopK(torch.topk)": ([node("Flatten", ["x"], ["f"]), node("TopK", ["f", "k"], ["y", "i"])],
                         [init("k", np.array([5]))],
                         lambda t, F, x: x.flatten(1).topk(5)[0]),
    "TopK(smallest, torch.sort)": ([node("TopK", ["x", "k"], ["y", "i"], axis=1, largest=0)],
                                   [init("k", np.array([3]))],
                                   lambda t, F, x: x.sort(1)[0]),
    "GatherND(repeated, negative)": ([node("GatherND", ["x", "at"])],
                                     [init("at", np.array([[0, 1], [1, -1], [0, 1]]))],
                                     lambda t, F, x: x[[0, 1, 0], [1, 2, 1]]),
    "GatherND(whole elements)": ([node("GatherND", ["x", "at"])],
                                 [init("at", np.array([[[1, 0, 3, 2], [0, 2, 1, 1]]]))],
                                 lambda t, F, x: x[[1, 0], [0, 2], [3, 1], [2, 1]][None]),
    "ReduceProd": ([node("ReduceProd", ["x", "ax"], keepdims=0)], [init("ax", np.array([1]))],
                   lambda t, F, x: x.prod(1)),
    # zeros in the slices (one, two, three of the three channels): no 0 / 0
    "ReduceProd(zeros)": ([node("Mul", ["x", "keep"], ["m"]), node("ReduceProd", ["m", "ax"])],
                          [init("keep", ZEROS_KEPT), init("ax", np.array([1]))],
                          lambda t, F, x: (x * t.tensor(ZEROS_KEPT)).prod(1, keepdim=True)),
    "Sin/Cos/Atan": ([node("Sin", ["x"], ["s"]), node("Cos", ["s"], ["c"]), node("Atan", ["c"])],
                     [], lambda t, F, x: t.atan(t.cos(t.sin(x)))),
})
# The other element-wise functions of one input: Tan, the inverse trigonometric and the
# (inverse) hyperbolic functions, each fed values inside its domain (|s| < 1 for Asin, Acos,
# Atanh; s > 1 for Acosh); Swish (opset 24); Shrink (hardshrink, softshrink); and the steps
# Floor, Ceil, Round, fed x / 10 (no step within a finite difference of the inputs)
CASES.update({
    "Tan": ([node("Mul", ["x", "c"], ["s"]), node("Tan", ["s"])], [init("c", np.float32(0.3))],
            lambda t, F, x: t.tan(0.3 * x)),
    "Asin/Acos/Atanh": ([node("Tanh", ["x"], ["h"]), node("Mul", ["h", "c"], ["s"]),
                         node("Asin", ["s"], ["a"]), node("Acos", ["s"], ["o"]),
                         node("Atanh", ["s"], ["n"]), node("Mul", ["a", "o"], ["ao"]),
                         node("Add", ["ao", "n"])], [init("c", np.float32(0.8))],
                        lambda t, F, x: t.asin(0.8 * t.tanh(x)) * t.acos(0.8 * t.tanh(x))
                        + t.atanh(0.8 * t.tanh(x))),
    "Sinh/Cosh": ([node("Sinh", ["x"], ["s"]), node("Cosh", ["x"], ["c"]),
                   node("Mul", ["c", "half"], ["h"]), node("Add", ["s", "h"])],
                  [init("half", np.float32(0.5))], lambda t, F, x: t.sinh(x) + 0.5 * t.cosh(x)),
    "Asinh/Acosh": ([node("Asinh", ["x"], ["a"]), node("Mul", ["x", "x"], ["q"]),
                     node("Add", ["q", "c"], ["s"]), node("Acosh", ["s"], ["o"]),
                     node("Mul", ["a", "o"])], [init("c", np.float32(1.5))],
                    lambda t, F, x: t.asinh(x) * t.acosh(x * x + 1.5)),
    "Swish": ([node("Swish", ["x"])], [], lambda t, F, x: F.silu(x)),
    "Swish(alpha 0.5)": ([node("Swish", ["x"], alpha=0.5)], [],
                         lambda t, F, x: x * t.sigmoid(0.5 * x)),
    "Shrink(hardshrink)": ([node("Shrink", ["x"], lambd=0.5)], [],
                           lambda t, F, x: F.hardshrink(x, 0.5)),
    "Shrink(softshrink)": ([node("Shrink", ["x"], lambd=0.5, bias=0.5)], [],
                           lambda t, F, x: F.softshrink(x, 0.5)),
    "Floor/Ceil/Round": ([node("Mul", ["x", "tenth"], ["s"]), node("Floor", ["s"], ["f"]),
                          node("Ceil", ["s"], ["c"]), node("Round", ["s"], ["r"]),
                          node("Sum", ["f", "c", "r"], ["k"]), node("Mul", ["k", "x"])],
                         [init("tenth", np.float32(0.1))],
                         lambda t, F, x: (t.floor(x / 10) + t.ceil(x / 10) + t.round(x / 10)) * x),
})
# torch.gather (GatherElements: repeated and negative indices), Tensor.scatter and scatter_add
# (ScatterElements: the gradient to the data and to the updates, x's own channels here),
# CastLike, MeanVarianceNormalization, RMSNormalization (opset 23, F.rms_norm) and Hardmax
GATHER_AT = RNG.integers(-3, 3, (2, 5, 4, 4))
SCATTER_AT = np.argsort(RNG.random((2, 3, 4, 4)), axis=1)[:, :2]  # two distinct channels
SCATTER_ADD_AT = RNG.integers(0, 3, (2, 2, 4, 4))  # repeats summed
W_RMS = RNG.uniform(0.5, 1.5, (3, 4, 4)).astype(np.float32)
TWO_CHANNELS = [init("zero", np.array([0])), init("two", np.array([2])),
                init("ax1", np.array([1]))]
# Indices computed from x at run time, over the channels u = tanh(s) is made of (s = x[:, :2]):
# ArgMax and ArgMin of s (distinct), or ArgMin of x and of s, which repeat where x's lowest
# channel is one of s's. x's margins (>= 0.09 between the lowest two, >= 0.12 between s's two)
# keep the indices fixed within a finite difference.
RUN_TIME_SCATTER = [node("Slice", ["x", "zero", "two", "ax1"], ["s"]), node("Tanh", ["s"], ["u"]),
                    node("ArgMax", ["s"], ["hi"], axis=1), node("ArgMin", ["s"], ["lo"], axis=1)]
RUN_TIME_SCATTER_REPEATED = RUN_TIME_SCATTER + [
    node("ArgMin", ["x"], ["low"], axis=1), node("Concat", ["low", "lo"], ["at"], axis=1),
    node("ScatterElements", ["x", "at", "u"], axis=1)]
CASES.update({
    "GatherElements(repeated, negative)": (
        [node("GatherElements", ["x", "at"], axis=1)], [init("at", GATHER_AT)],
        lambda t, F, x: x.gather(1, t.tensor(GATHER_AT % 3))),
    "GatherElements(last axis)": (
        [node("GatherElements", ["x", "at"], axis=-1)], [init("at", SCATTER_ADD_AT[:, :1] + 1)],
        lambda t, F, x: x.gather(3, t.tensor(SCATTER_ADD_AT[:, :1] + 1))),
    "ScatterElements(Tensor.scatter)": (
        [node("Slice", ["x", "zero", "two", "ax1"], ["s"]), node("Tanh", ["s"], ["u"]),
         node("ScatterElements", ["x", "at", "u"], axis=1)],
        [init("at", SCATTER_AT)] + TWO_CHANNELS,
        lambda t, F, x: x.scatter(1, t.tensor(SCATTER_AT), t.tanh(x[:, :2]))),
    "ScatterElements(scatter_add, repeated)": (
        [node("Slice", ["x", "zero", "two", "ax1"], ["s"]), node("Tanh", ["s"], ["u"]),
         node("ScatterElements", ["x", "at", "u"], axis=1, reduction="add")],
        [init("at", SCATTER_ADD_AT)] + TWO_CHANNELS,
        lambda t, F, x: x.scatter_add(1, t.tensor(SCATTER_ADD_AT), t.tanh(x[:, :2]))),
    "ScatterElements(run-time indices)": (RUN_TIME_SCATTER + [node(
        "Concat", ["hi", "lo"], ["at"], axis=1), node("ScatterElements", ["x", "at", "u"], axis=1)],
        TWO_CHANNELS,
        lambda t, F, x: x.scatter(1, t.cat([x[:, :2].argmax(1, True), x[:, :2].argmin(1, True)], 1),
                                  t.tanh(x[:, :2]))),
    # torch gives every repeated update the gradient (as camface did): finite differences only
    "ScatterElements(run-time indices, repeated)": (RUN_TIME_SCATTER_REPEATED, TWO_CHANNELS, None),
    "CastLike": ([node("CastLike", ["x", "like"], ["c"]), node("Mul", ["c", "c"])],
                 [init("like", np.float32([0]))], lambda t, F, x: x * x),
    "MeanVarianceNormalization": (
        [node("MeanVarianceNormalization", ["x"])], [],
        lambda t, F, x: (x - x.mean((0, 2, 3), keepdim=True))
        / t.sqrt(x.var((0, 2, 3), keepdim=True, unbiased=False) + 1e-9)),
    "MeanVarianceNormalization(axes 1, 2, 3)": (
        [node("MeanVarianceNormalization", ["x"], axes=[1, 2, 3])], [],
        lambda t, F, x: (x - x.mean((1, 2, 3), keepdim=True))
        / t.sqrt(x.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-9)),
    "RMSNormalization(last axis)": (
        [node("RMSNormalization", ["x", "w"])], [init("w", W_RMS[0, 0])],
        lambda t, F, x: F.rms_norm(x, (4,), t.tensor(W_RMS[0, 0]), 1e-5)),
    "RMSNormalization(axis 1, epsilon)": (
        [node("RMSNormalization", ["x", "w"], axis=1, epsilon=0.1)], [init("w", W_RMS)],
        lambda t, F, x: F.rms_norm(x, (3, 4, 4), t.tensor(W_RMS), 0.1)),
    "Hardmax": ([node("Hardmax", ["x"], ["h"], axis=1), node("Mul", ["h", "x"])], [],
                lambda t, F, x: F.one_hot(x.argmax(1), 3).permute(0, 3, 1, 2) * x),
})
# MatMul broadcasting an operand's batch axis of size 1 (multi-query attention: one key head
# shared by every query head; a [1, ...] weight) or of rank 1 (x @ v, v @ x: a learnt query
# vector), refused before
W_HEADS = RNG.standard_normal((1, 3, 5, 4)).astype(np.float32) * 0.3
V_QUERY = RNG.standard_normal(8).astype(np.float32)
MATMUL_TOKENS = ("MatMul(1-D right, x @ v)", "MatMul(1-D left, v @ x)")
CASES.update({
    "MatMul(shared key head, multi-query attention)": (
        [node("Slice", ["x", "zero", "one", "ax1"], ["k"]),
         node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), node("MatMul", ["x", "kt"])],
        [init("zero", np.array([0])), init("one", np.array([1])), init("ax1", np.array([1]))],
        lambda t, F, x: x @ x[:, :1].transpose(-1, -2)),
    "MatMul(batch of 1 broadcast, w @ x)": ([node("MatMul", ["w", "x"])], [init("w", W_HEADS)],
                                            lambda t, F, x: t.tensor(W_HEADS) @ x),
    "MatMul(1-D right, x @ v)": ([node("MatMul", ["x", "v"])], [init("v", V_QUERY)],
                                lambda t, F, x: x @ t.tensor(V_QUERY)),
    "MatMul(1-D left, v @ x)": ([node("MatMul", ["v", "x"])], [init("v", V_QUERY[:5])],
                               lambda t, F, x: t.tensor(V_QUERY[:5]) @ x),
})
# the heads' count unknown when exported: the axes to sum over are found at run time
CASES["MatMul(shared key head, heads unknown)"] = CASES["MatMul(shared key head, multi-query attention)"]
# AveragePool with ceil_mode (timm's ResNet-D downsampling: AvgPool2d(2, 2, ceil_mode=True,
# count_include_pad=False) on odd sizes), refused before: the last window runs past the input
# (and its end pad), each window divided by the taps it holds on the input (or on the input
# and its pads, clipped at the end pad, as torch counts them)
CEIL_ODD = ("AveragePool(ceil_mode, ResNet-D downsampling)",)
CASES.update({
    "AveragePool(ceil_mode, ResNet-D downsampling)": (
        [node("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)], [],
        lambda t, F, x: F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)),
    "AveragePool(ceil_mode, pads, include)": (
        [node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
              ceil_mode=1, count_include_pad=1)], [],
        lambda t, F, x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=True)),
    "AveragePool(ceil_mode, pads, exclude)": (
        [node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
              ceil_mode=1)], [],
        lambda t, F, x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False)),
    # the window ceil_mode adds starts in the end pad: ONNX Runtime (and torch) drop it, ONNX's
    # shapes kept it, and the global pool's rule after the max pool built a graph that did not
    # run; both pools are taken as ceil_mode 0, which both count alike
    "MaxPool(ceil_mode, window in the end pad dropped)": (
        [node("MaxPool", ["x"], ["m"], kernel_shape=[2, 2], strides=[3, 3], pads=[1, 1, 1, 1],
              ceil_mode=1), node("GlobalAveragePool", ["m"])], [],
        lambda t, F, x: F.max_pool2d(x, 2, 3, 1, ceil_mode=True).mean((2, 3), keepdim=True)),
    "AveragePool(ceil_mode, window in the end pad dropped)": (
        [node("AveragePool", ["x"], ["m"], kernel_shape=[2, 2], strides=[3, 3], pads=[1, 1, 1, 1],
              ceil_mode=1, count_include_pad=1), node("GlobalMaxPool", ["m"])], [],
        lambda t, F, x: F.avg_pool2d(x, 2, 3, 1, ceil_mode=True).amax((2, 3), keepdim=True)),
    "AveragePool(ceil_mode, dilated, asymmetric pads, include)": (
        [node("AveragePool", ["x"], kernel_shape=[2, 3], strides=[2, 3], dilations=[2, 1],
              pads=[1, 0, 0, 2], ceil_mode=1, count_include_pad=1)], [], None),
})
# An exponent, a clamp bound or a PReLU slope computed from the target: its gradient was lost
# (2 ** x refused as "the logits do not depend on the target")
CASES.update({
    "Pow(exponent from x, 2 ** x)": ([node("Pow", ["two", "x"])], [init("two", np.float32(2))],
                                     lambda t, F, x: 2.0 ** x),
    "Pow(|x| ** |x|)": ([node("Abs", ["x"], ["a"]), node("Pow", ["a", "a"])], [],
                        lambda t, F, x: x.abs() ** x.abs()),
    "Clip(bounds from x, torch.clamp(x, min, max))": (
        [node("ReduceMean", ["x"], ["lo"], keepdims=0), node("ReduceMax", ["x"], ["m"], keepdims=0),
         node("Mul", ["m", "half"], ["hi"]), node("Clip", ["x", "lo", "hi"])],
        [init("half", np.float32(0.5))],
        lambda t, F, x: t.clamp(x, min=x.mean(), max=0.5 * x.amax())),
    # CastLike(c, x) reads x's type only (torch's dynamo exporter casts constants so): its
    # output is no weight computed from the target
    "Pad(value CastLike x, as dynamo casts constants)": (
        [node("CastLike", ["c", "x"], ["v"]), node("Pad", ["x", "pads", "v"])],
        [init("c", np.float32(0.3)), init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1]))],
        lambda t, F, x: F.pad(x, (1, 1, 1, 1), value=0.3)),
    "PRelu(slope from x)": ([node("ReduceMean", ["x", "nhw"], ["m"]), node("PRelu", ["x", "m"])],
                            [init("nhw", np.array([0, 2, 3]))],
                            lambda t, F, x: t.where(x > 0, x, x * x.mean((0, 2, 3), keepdim=True))),
})
# Attention (opset 23: torch's dynamo exporter writes one per F.scaled_dot_product_attention),
# x [2, 4 heads, 5 tokens, 6]: grouped-query (fewer key/value heads), causal with fewer queries
# than keys, a boolean mask and 3-D inputs; no rule before (only gradient-free maps exported)
HEADS = (2, 4, 5, 6)
HEAD_SLICES = [init("zero", np.array([0])), init("two", np.array([2])), init("four", np.array([4])),
               init("three", np.array([3])), init("ax1", np.array([1])), init("ax2", np.array([2]))]
ATTENTION_MASK = RNG.random((5, 5)) > 0.3


def _attention_3d(t, F, x):
    """3-D Attention: [N, S, H D] read as [N, H, S, D] and written back."""
    q = x.reshape(2, 5, 24)

    def heads(z):
        return z.reshape(2, 5, 4, 6).transpose(1, 2)

    y = F.scaled_dot_product_attention(heads(q), heads(q), heads(t.tanh(q)),
                                       attn_mask=t.tensor(ATTENTION_MASK), scale=0.3)
    return y.transpose(1, 2).reshape(2, 5, 24)


ATTENTION_OP = ("Attention(self)", "Attention(grouped-query, 2 key/value heads)",
                "Attention(causal, 3 queries of 5 keys)", "Attention(3-D, boolean mask, scale)")
CASES.update({
    "Attention(self)": ([node("Attention", ["x", "x", "x"])], [],
                        lambda t, F, x: F.scaled_dot_product_attention(x, x, x)),
    "Attention(grouped-query, 2 key/value heads)": (
        [node("Slice", ["x", "zero", "two", "ax1"], ["k"]),
         node("Slice", ["x", "two", "four", "ax1"], ["v"]), node("Attention", ["x", "k", "v"])],
        HEAD_SLICES, lambda t, F, x: F.scaled_dot_product_attention(x, x[:, :2], x[:, 2:],
                                                                    enable_gqa=True)),
    "Attention(causal, 3 queries of 5 keys)": (
        [node("Slice", ["x", "zero", "three", "ax2"], ["q"]),
         node("Attention", ["q", "x", "x"], is_causal=1)], HEAD_SLICES,
        lambda t, F, x: F.scaled_dot_product_attention(x[:, :, :3], x, x, is_causal=True)),
    "Attention(3-D, boolean mask, scale)": (
        [node("Reshape", ["x", "tokens"], ["t"]), node("Tanh", ["t"], ["v"]),
         node("Attention", ["t", "t", "v", "keep"], scale=0.3, q_num_heads=4, kv_num_heads=4)],
        [init("tokens", np.array([2, 5, 24])), init("keep", ATTENTION_MASK)],
        _attention_3d),
})
# torch.tril / triu on a computed tensor (Trilu, opset 14), with and without the diagonal offset
CASES.update({
    "Trilu(tril)": ([node("Trilu", ["x"], upper=0)], [], lambda t, F, x: t.tril(x)),
    "Trilu(triu, k = 1)": ([node("Trilu", ["x", "one"])], [init("one", np.array(1))],
                           lambda t, F, x: t.triu(x, 1)),
})
# As torch's dynamo exporter writes a head with its optimiser off (optimize=False, camface's
# advice for a BatchNorm folded into its convolution): torch.chunk as SplitToSequence and
# SequenceAt (said not to reach the logits, or that path's gradient lost), a Reduce's axes as
# Reshape(Constant), an Unsqueeze's as a Range of constants (shape inference stopped there)
W_CHANNELS = RNG.standard_normal(3).astype(np.float32)
CONSTANT = {name: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))
            for name, value in (("one", np.array(1)), ("four", np.array(4)),
                                ("hw", np.array([[2, 3]])), ("flat", np.array([-1])))}
CASES.update({
    "SplitToSequence(sizes 1, 2) + SequenceAt": (
        [node("SplitToSequence", ["x", "sizes"], ["seq"], axis=1),
         node("SequenceAt", ["seq", "zero"], ["a"]), node("SequenceAt", ["seq", "one"], ["b"]),
         node("Mul", ["a", "b"])], [init("sizes", np.array([1, 2])), init("zero", np.array(0)),
                                    init("one", np.array(1))],
        lambda t, F, x: x[:, :1] * x[:, 1:]),
    "SplitToSequence(chunks of 2, torch.chunk) + SequenceAt": (
        [node("SplitToSequence", ["x", "two"], ["seq"], axis=-1),
         node("SequenceAt", ["seq", "one"], ["b"]), node("Tanh", ["b"])],
        [init("two", np.array(2)), init("one", np.array(1))], lambda t, F, x: t.tanh(x[..., 2:])),
    "SplitToSequence(no sizes, keepdims 0) + SequenceAt": (
        [node("SplitToSequence", ["x"], ["seq"], axis=1, keepdims=0),
         node("SequenceAt", ["seq", "two"], ["c"]), node("Mul", ["c", "c"])],
        [init("two", np.array(2))], lambda t, F, x: x[:, 2] * x[:, 2]),
    "ReduceMean(axes Reshape(Constant)) + Unsqueeze(axes Range(Constant))": (
        [CONSTANT["hw"], CONSTANT["flat"], node("Reshape", ["hw", "flat"], ["axes"]),
         node("ReduceMean", ["x", "axes"], ["m"]), CONSTANT["one"], CONSTANT["four"],
         node("Sub", ["four", "one"], ["stop"]), node("Range", ["one", "stop", "one"], ["ones"]),
         node("Unsqueeze", ["w", "ones"], ["w3"]), node("Mul", ["m", "w3"])],
        [init("w", W_CHANNELS)],
        lambda t, F, x: x.mean((2, 3), keepdim=True) * t.tensor(W_CHANNELS)[:, None, None]),
})
SHAPES = {name: TOKENS for name in TOKEN_CASES}  # the others read x of X_SHAPE
SHAPES.update({name: TOKENS for name in EINSUM_TOKENS + MATMUL_TOKENS})
SHAPES.update({"LRN(size 3)": GROUPS, "LRN(size 5, wider than the channels)": GROUPS,
               "LRN(size 1, defaults)": GROUPS, "LpPool(p 2, 1-D)": TOKENS})
SHAPES.update({"GroupNorm(InstanceNormalization, as torch exports it)": GROUPS,
               "GroupNormalization(opset 21)": GROUPS,
               "GroupNormalization(opset 18, scale per group)": GROUPS,
               "DepthToSpace(CRD, PixelShuffle)": SHUFFLE, "DepthToSpace(DCR)": SHUFFLE})
SHAPES.update({name: (2, 3, 5, 5) for name in CEIL_ODD})
SHAPES.update({name: HEADS for name in ATTENTION_OP})
# x's shape as the model declares it, where not x's own
DECLARED = {"Einsum(unknown-size axis broadcast)": (2, None, 4, 4),
            "MatMul(shared key head, heads unknown)": (2, None, 4, 4),
            "Einsum(unknown-size axis broadcast, contracted)": (2, None, 4, 4)}
OPSETS = {"GroupNormalization(opset 21)": 21, "GroupNormalization(opset 18, scale per group)": 18,
          "LogSoftmax(opset 12, 4-D)": 12, "Softmax(opset 12, 4-D)": 12,
          "Swish": 24, "Swish(alpha 0.5)": 24, "RMSNormalization(last axis)": 23,
          "RMSNormalization(axis 1, epsilon)": 23}  # the others: 20


def gradient_model(nodes, initializers, x_shape=X_SHAPE, opset=20):
    """(model bytes with outputs y and dx, y's shape): dx = d sum(seed * y) / dx."""
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, list(x_shape))], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 18 else 9 if opset <= 20 else 10
    model = onnx_model.prepare(model)
    y_shape = onnx_model.shapes(model)["y"]
    classifier = SimpleNamespace(model=model, logits="y")
    builder = GraphBuilder(opset, taken={"x", "y", "seed"})
    dx = onnx_cam.gradient(classifier, builder, "x", "seed")
    return model, builder, dx, y_shape


def run_gradient(nodes, initializers, x, seed, opset=20, declared=None):
    model, builder, dx, _ = gradient_model(nodes, initializers, declared or x.shape, opset)
    y, g = run_nodes(list(model.graph.node) + builder.nodes, {"x": x, "seed": seed}, ["y", dx],
                     list(model.graph.initializer) + builder.initializers, opset=opset)
    return y, g


def finite_differences(nodes, initializers, x, seed, eps=1e-3, opset=20):
    flat = x.reshape(-1)
    probes = np.repeat(x[None], 2 * flat.size, axis=0).reshape(2 * flat.size, -1)
    for i in range(flat.size):
        probes[2 * i, i] += eps
        probes[2 * i + 1, i] -= eps
    values = []
    for probe in probes:  # the batch dimension is part of the op's shape: one run per probe
        y = run_nodes(nodes, {"x": probe.reshape(x.shape)}, ["y"], initializers, opset=opset)[0]
        values.append(float((y.astype(np.float64) * seed).sum()))
    values = np.asarray(values).reshape(flat.size, 2)
    return ((values[:, 0] - values[:, 1]) / (2 * eps)).reshape(x.shape)


def _inputs(name, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPES.get(name, X_SHAPE)).astype(np.float32)
    # keep values off the kinks (ReLU, Clip, HardSwish at +-3) and off ties (max pools)
    x = np.where(np.abs(x) < 0.05, 0.1, x)
    if any(kinked in name for kinked in ("Clip", "Thresholded", "Shrink")):  # at |x| = 0.5
        x = np.where(np.abs(np.abs(x) - 0.5) < 0.05, 0.6, x)
    return x


# CumProd (opset 26, torch.cumprod); its zeros are x less x's own value (0 exactly, a slope of
# 1): none to three in a slice, so before, at and after the first zero
ZEROS_AT = _inputs("CumProd(zeros)") * (1 - ZEROS_KEPT)
CASES.update({
    "CumProd": ([node("CumProd", ["x", "ax"])], [init("ax", np.array(2))],
                lambda t, F, x: x.cumprod(2)),
    "CumProd(zeros)": ([node("Sub", ["x", "c"], ["m"]), node("CumProd", ["m", "ax"])],
                       [init("c", ZEROS_AT), init("ax", np.array(1))],
                       lambda t, F, x: (x - t.tensor(ZEROS_AT)).cumprod(1)),
    "CumProd(zeros, reverse)": ([node("Sub", ["x", "c"], ["m"]),
                                 node("CumProd", ["m", "ax"], reverse=1)],
                                [init("c", ZEROS_AT), init("ax", np.array([-3]))],
                                lambda t, F, x: (x - t.tensor(ZEROS_AT)).flip(1).cumprod(1)
                                .flip(1)),
    "CumProd(exclusive)": ([node("CumProd", ["x", "ax"], exclusive=1)], [init("ax", np.array(3))],
                           lambda t, F, x: t.cat([t.ones_like(x[..., :1]),
                                                  x.cumprod(3)[..., :-1]], 3)),
    "CumProd(zeros, reverse, exclusive)": (
        [node("Sub", ["x", "c"], ["m"]), node("CumProd", ["m", "ax"], reverse=1, exclusive=1)],
        [init("c", ZEROS_AT), init("ax", np.array(1))],
        lambda t, F, x: t.cat([t.ones_like(x[:, :1]),
                               (x - t.tensor(ZEROS_AT)).flip(1).cumprod(1)[:, :-1]], 1).flip(1)),
})
OPSETS.update({name: 26 for name in CASES if name.startswith("CumProd")})
OPSETS.update({name: 23 for name in ATTENTION_OP})


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_rule_against_finite_differences(name):
    nodes, initializers, _ = CASES[name]
    x, opset = _inputs(name), OPSETS.get(name, 20)
    # y's shape as run (shape inference leaves GroupNormalization's and run-time pads' open)
    y_shape = run_nodes(nodes, {"x": x}, ["y"], initializers, opset=opset)[0].shape
    seed = np.random.default_rng(1).standard_normal(y_shape).astype(np.float32)
    y, grad = run_gradient(nodes, initializers, x, seed, opset, DECLARED.get(name))
    expected = finite_differences(nodes, initializers, x, seed.astype(np.float64), opset=opset)
    assert grad.shape == x.shape
    np.testing.assert_allclose(grad, expected, atol=5e-3, rtol=1e-2)


@pytest.mark.parametrize("name", sorted(n for n, case in CASES.items() if case[2] is not None))
def test_gradient_rule_against_torch_autograd(name):
    torch, F = pytest.importorskip("torch"), pytest.importorskip("torch.nn.functional")
    nodes, initializers, function = CASES[name]
    x = _inputs(name)
    xt = torch.tensor(x, requires_grad=True)
    yt = function(torch, F, xt)
    seed = np.random.default_rng(1).standard_normal(tuple(yt.shape)).astype(np.float32)
    (yt * torch.tensor(seed)).sum().backward()
    y, grad = run_gradient(nodes, initializers, x, seed, OPSETS.get(name, 20), DECLARED.get(name))
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grad, xt.grad.numpy(), atol=1e-5, rtol=1e-4)


def test_a_run_time_scatter_gives_gradient_to_the_update_onnx_runtime_kept_only():
    """Repeated run-time indices: of the updates sent to one place, the one whose value is in
    ONNX Runtime's output gets the gradient; the others 0 (not g again: torch's and camface's
    earlier answer). x's gradient: the seed where no update landed, plus, on the channels the
    updates are made of (u = tanh(s)), tanh'(s) times the seed where a kept update landed."""
    x = _inputs("ScatterElements(run-time indices, repeated)")
    at = np.stack([x.argmin(1), x[:, :2].argmin(1)], 1)  # [2, 2, 4, 4], channels of x
    seed = np.random.default_rng(1).standard_normal(X_SHAPE).astype(np.float32)
    y, u = run_nodes(RUN_TIME_SCATTER_REPEATED, {"x": x}, ["y", "u"], TWO_CHANNELS, opset=20)
    repeated = at[:, 0] == at[:, 1]
    assert repeated.any() and not repeated.all()
    assert np.abs(u[:, 0] - u[:, 1]).min() > 0.01  # which update is in y is plain
    landed = np.take_along_axis(y, at, 1)
    kept = landed == u
    assert ((kept[:, 0] ^ kept[:, 1]) == repeated).all() and kept.sum() == at.size - repeated.sum()
    expected = seed.copy()
    np.put_along_axis(expected, at, 0.0, 1)
    expected[:, :2] += kept * np.take_along_axis(seed, at, 1) * (1 - u.astype(np.float64) ** 2)
    _, grad = run_gradient(RUN_TIME_SCATTER_REPEATED, TWO_CHANNELS, x, seed)
    np.testing.assert_allclose(grad, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, checked", [("ScatterElements(Tensor.scatter)", False),
                                           ("ScatterElements(run-time indices)", True)])
def test_a_scatter_checks_its_winners_at_run_time_only_for_run_time_indices(name, checked):
    """Constant indices are checked distinct when exported: no extra scatter in the graph
    (the two there: the data's gradient, and the Slice's under the updates)."""
    nodes, initializers, _ = CASES[name]
    _, builder, _, _ = gradient_model(nodes, initializers)
    ops = [n.op_type for n in builder.nodes]
    assert ops.count("ScatterElements") == 2 + checked and ops.count("Equal") == checked


@pytest.mark.parametrize("x_shape, checked", [(X_SHAPE, False), ((2, "channels", 4, 4), True)])
def test_a_scatter_checks_negative_constant_indices_at_run_time_when_the_size_is_unknown(x_shape, checked):
    """-1 and size - 1 name one place: with the axis's size unknown when exported, constant
    negative indices cannot be checked distinct, and are checked at run time. The gradient is
    the one of the same indices counted from the start."""
    nodes, initializers, _ = CASES["ScatterElements(Tensor.scatter)"]
    negative = [init("at", SCATTER_AT - 3)] + TWO_CHANNELS
    _, builder, _, _ = gradient_model(nodes, negative, x_shape)
    ops = [n.op_type for n in builder.nodes]
    assert ops.count("ScatterElements") == 2 + checked and ops.count("Equal") == checked
    x = RNG.standard_normal(X_SHAPE).astype(np.float32)
    seed = RNG.standard_normal(X_SHAPE).astype(np.float32)
    _, expected = run_gradient(nodes, initializers, x, seed)
    _, grad = run_gradient(nodes, negative, x, seed, declared=x_shape)
    np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_every_listed_op_has_a_rule():
    listed = ("Gemm MatMul Add Sub Mul Div Relu LeakyRelu Clip Sigmoid HardSigmoid HardSwish Gelu "
              "Tanh BatchNormalization GlobalAveragePool ReduceMean AveragePool MaxPool Flatten "
              "Reshape Transpose Squeeze Unsqueeze Concat Identity Dropout Conv LayerNormalization "
              "Softmax Pow Sqrt Erf Split Slice Gather Expand Where Resize Elu Selu Celu Softplus "
              "Softsign Mish Abs Log Reciprocal LogSoftmax Max Min Sum Mean InstanceNormalization "
              "GroupNormalization LpNormalization ReduceL1 ReduceL2 ReduceSumSquare ReduceLogSumExp "
              "ReduceMin Pad Tile DepthToSpace SpaceToDepth ConvTranspose Einsum LRN ThresholdedRelu "
              "LpPool GlobalLpPool Sign Sin Cos Atan CumSum TopK GatherND ReduceProd Tan Asin Acos Sinh "
              "Cosh Asinh Acosh Atanh Swish Shrink Floor Ceil Round ReduceLogSum GatherElements "
              "ScatterElements CastLike MeanVarianceNormalization RMSNormalization Hardmax CumProd "
              "Attention Trilu").split()
    assert not [op for op in listed if op not in onnx_grad.RULES]


def test_an_op_without_a_rule_is_named_with_its_node():
    nodes = [node("Det", ["x"], ["s"], name="the_det"), node("Relu", ["s"])]
    with pytest.raises(ModelError, match=r"no gradient rule for op Det \(node 'the_det'\).*later "
                                         r"target layer"):
        gradient_model(nodes, [])



@pytest.mark.parametrize("nodes, initializers, why", [
    ([node("Resize", ["x", "", "s"], mode="nearest", name="the_resize")],
     [init("s", np.float32([2, 1, 1, 1]))], r"resizes the batch axis"),
    ([node("Resize", ["x", "roi", "s"], mode="linear", name="the_resize",
           coordinate_transformation_mode="tf_crop_and_resize")],
     [init("roi", np.float32([0, 0, 0, 0, 1, 1, 0.5, 0.5])), init("s", np.float32([1, 1, 2, 2]))],
     r"tf_crop_and_resize has no gradient rule"),
], ids=["batch", "crop"])
def test_a_resize_without_a_rule_is_named(nodes, initializers, why):
    with pytest.raises(ModelError, match=r"node 'the_resize' \(Resize\): " + why):
        gradient_model(nodes, initializers)


def test_layer_norms_statistics_outputs_on_the_path_are_refused():
    """LayerNormalization's mean output read on the way to the logits: no silent zero."""
    nodes = [node("LayerNormalization", ["x", "s"], ["n", "mean"], name="the_norm"),
             node("Add", ["n", "mean"])]
    with pytest.raises(ModelError, match=r"node 'the_norm': LayerNormalization's mean and "
                                         r"inverse standard deviation outputs have no gradient"):
        gradient_model(nodes, [init("s", W_LN[0])], TOKENS)


@pytest.mark.parametrize("nodes, initializers, opset, why", [
    ([node("ConvTranspose", ["x", "w"], name="the_node", strides=[3, 3], auto_pad="SAME_UPPER")],
     [init("w", W_CONVT[:, :, :1, :1])], 20,
     r"\(ConvTranspose\): auto_pad SAME_UPPER to an output size \[12, 12\] beyond what the input "
     r"\[4, 4\] reaches has no gradient rule \(ONNX Runtime's output stops where the input reaches"),
    ([node("ConvTranspose", ["x", "w"], name="the_node", dilations=[2, 2], output_padding=[1, 1])],
     [init("w", W_CONVT)], 20, r"\(ConvTranspose\): output_padding \[1, 1\] not below the "
                                r"strides \[1, 1\]"),
    ([node("Pad", ["x", "pads"], name="the_node", mode="reflect")],
     [init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1]))], 15,
     r"\(Pad\): the gradient of reflect padding needs opset >= 16 \(the model has 15\)"),
    ([node("Pad", ["x"], name="the_node", pads=[0, 0, 1, 1, 0, 0, 1, 1])], [], 10,
     r"\(Pad\): Pad before opset 11 \(pads as an attribute\) has no gradient rule"),
    ([node("ReduceSumSquare", ["x"], name="the_node", noop_with_empty_axes=1)], [], 20,
     r"\(ReduceSumSquare\): no axes with noop_with_empty_axes"),
    ([node("Einsum", ["x"], name="the_node", equation="nchh->nch")], [], 20,
     r"\(Einsum\): equation 'nchh->nch' repeats a label within one term \(a diagonal\); no "
     r"gradient rule"),
    ([node("Einsum", ["x", "x"], name="the_node", equation="nch,nchw->nc")], [], 20,
     r"\(Einsum\): equation 'nch,nchw->nc' labels 3 axes of 'x', which has 4; no gradient rule"),
    ([node("LpPool", ["x"], name="the_node", kernel_shape=[3, 3], ceil_mode=1, strides=[2, 2])],
     [], 20, r"\(LpPool\): ceil_mode 1 has no gradient rule"),
    ([node("GlobalLpPool", ["x"], name="the_node", p=0)], [], 20,
     r"\(GlobalLpPool\): p = 0 has no gradient rule"),
    ([node("GatherND", ["x", "at"], name="the_node", batch_dims=1)],
     [init("at", np.array([[0], [2]]))], 20, r"\(GatherND\): batch_dims 1 has no gradient rule"),
    ([node("GatherND", ["x", "at"], name="the_node")], [init("at", np.array([[0, 1]]))], 15,
     r"\(GatherND\): its gradient needs opset >= 16 \(the model has 15\)"),
    ([node("LRN", ["x"], name="the_node", size=4)], [], 20,
     r"\(LRN\): size 4 is even; ONNX Runtime runs LRN of odd sizes only"),
    # ONNX Runtime sizes these as if undilated ([1, 3] where ONNX's shapes say [2, 4])
    ([node("LpPool", ["x"], name="the_node", kernel_shape=[2, 2], dilations=[2, 2],
           strides=[2, 1], auto_pad="SAME_UPPER")], [], 20,
     r"\(LpPool\): auto_pad SAME_UPPER with dilations \[2, 2\] has no gradient rule \(ONNX "
     r"Runtime pads such a pool as if undilated"),
    ([node("LpPool", ["x"], name="the_node", p=1, kernel_shape=[2, 3], dilations=[1, 2],
           auto_pad="SAME_LOWER")], [], 20,
     r"\(LpPool\): auto_pad SAME_LOWER with dilations \[1, 2\] has no gradient rule"),
    ([node("AveragePool", ["x"], name="the_node", kernel_shape=[2, 2], dilations=[2, 2],
           auto_pad="SAME_LOWER")], [], 20,
     r"\(AveragePool\): auto_pad SAME_LOWER with dilations \[2, 2\] has no gradient rule"),
    # MaxPool's own gradient (ONNX Runtime's indices) is right, but the rules after it read
    # ONNX's [4, 4] where ONNX Runtime makes [2, 2]: their graph does not run
    ([node("MaxPool", ["x"], ["m"], name="the_node", kernel_shape=[3, 3], dilations=[2, 2],
           auto_pad="SAME_UPPER"), node("GlobalAveragePool", ["m"])], [], 20,
     r"\(MaxPool\): auto_pad SAME_UPPER with dilations \[2, 2\] has no gradient rule \(ONNX "
     r"Runtime pads such a pool as if undilated"),
    ([node("MaxPool", ["x"], name="the_node", kernel_shape=[2, 3], dilations=[1, 2],
           auto_pad="SAME_LOWER")], [], 20,
     r"\(MaxPool\): auto_pad SAME_LOWER with dilations \[1, 2\] has no gradient rule"),
    # ONNX's shapes keep a ceil_mode window starting in the end padding, ONNX Runtime drops it;
    # the pool is taken as ceil_mode 0 unless another axis keeps its ceil window, as here
    ([node("AveragePool", ["x"], name="the_node", kernel_shape=[2, 3], strides=[2, 2],
           pads=[0, 0, 1, 0], ceil_mode=1)], [], 20,
     r"\(AveragePool\): ceil_mode with a last window that starts in the end padding \(axis 2: "
     r"size 4, kernel 2, stride 2, pads 0, 1\) has no gradient rule"),
    # weights computed from the target (a dynamic convolution, an adaptive norm): refused, not
    # silently left out of the gradient
    ([node("Slice", ["x", "zero", "two", "ax0"], ["w"]), node("Conv", ["x", "w"], name="the_node")],
     [init("zero", np.array([0])), init("two", np.array([2])), init("ax0", np.array([0]))], 20,
     r"\(Conv\): its input 1 \('w'\) depends on target 'x', and the gradient rule of Conv "
     r"covers input\(s\) 0 only"),
    ([node("ReduceMean", ["x", "ax0"], ["s"], keepdims=0),
      node("LayerNormalization", ["x", "s"], name="the_node", axis=1)], [init("ax0", np.array([0]))],
     20, r"\(LayerNormalization\): its input 1 \('s'\) depends on target 'x'"),
    ([node("Attention", ["x", "x", "x"], name="the_node", softcap=2.0)], [], 23,
     r"\(Attention\): softcap has no gradient rule"),
    ([node("ScatterElements", ["x", "at", "x"], name="the_node", reduction="mul")],
     [init("at", np.zeros(X_SHAPE, np.int64))], 20,
     r"\(ScatterElements\): reduction 'mul' has no gradient rule"),
    ([node("ScatterElements", ["x", "at", "u"], name="the_node", axis=1)],
     [init("at", np.array([0, -3])[None, :, None, None] + np.zeros((2, 2, 4, 4), np.int64)),
      init("u", np.ones((2, 2, 4, 4), np.float32))], 20,
     r"\(ScatterElements\): indices 'at' repeat along the axis without a reduction"),
    ([node("GatherElements", ["x", "at"], name="the_node")], [init("at", np.zeros((1, 3, 4, 4),
                                                                              np.int64))], 15,
     r"\(GatherElements\): its gradient needs opset >= 16 \(the model has 15\)"),
], ids=["deconv SAME beyond the reach", "deconv output_padding", "reflect opset 15",
        "pad opset 10", "noop sum of squares", "einsum diagonal", "einsum rank",
        "lp pool ceil_mode", "global lp pool p 0", "gather_nd batch_dims", "gather_nd opset 15",
        "lrn size 4", "lp pool SAME_UPPER dilated", "lp pool SAME_LOWER dilated", "average pool SAME dilated",
        "max pool SAME_UPPER dilated", "max pool SAME_LOWER dilated", "average pool ceil dropped",
        "conv weights from x", "layer norm scale from x", "attention softcap", "scatter mul",
        "scatter repeated", "gather_elements opset 15"])
def test_an_unsupported_form_of_an_op_is_named(nodes, initializers, opset, why):
    with pytest.raises(ModelError, match=r"node 'the_node' " + why):
        gradient_model(nodes, initializers, opset=opset)


def test_an_einsum_broadcasting_an_unknown_size_before_opset_13_is_named():
    """The run-time sum over the broadcast axes takes its axes as an input from opset 13 on."""
    nodes = [node("Slice", ["x", "zero", "one", "ax1"], ["first"]),
             node("Einsum", ["x", "first"], name="the_node", equation="bhqd,bhkd->bhqk")]
    initializers = [init("zero", np.array([0])), init("one", np.array([1])),
                    init("ax1", np.array([1]))]
    with pytest.raises(ModelError, match=r"node 'the_node' \(Einsum\): equation 'bhqd,bhkd->bhqk' "
                                         r"shares a label of unknown size with 'x' \(it may be "
                                         r"broadcast\); its gradient needs opset >= 13 \(the model "
                                         r"has 12\); no gradient rule"):
        gradient_model(nodes, initializers, (2, None, 4, 4), opset=12)


@pytest.mark.parametrize("rows, opset", [(np.array(-1), 13), (np.array([-1, -3]), 13), (np.array([0, 2]), 13),
                                         (np.array([4, -1]), 16)], ids=["last", "negatives", "firsts", "one row twice"])
def test_a_gather_of_distinct_constant_rows_of_an_unknown_count_needs_no_opset_16(rows, opset):
    """x[:, -1] (the last token) where the token count is unknown when exported: every Gather
    with a negative constant index was taken as possibly repeated, which needs opset >= 16, so
    a model of opset 13 that worked was refused. Indices of one sign name distinct rows whatever
    the count (only -k and size - k can meet: those are still summed); their gradient is the one
    of the same rows named from the start."""
    x = _inputs("Gather(class token)")
    forward = [node("Gather", ["x", "rows"], axis=1)]
    seed = np.random.default_rng(1).standard_normal(x[:, rows].shape).astype(np.float32)
    _, grad = run_gradient(forward, [init("rows", rows)], x, seed, opset=opset, declared=(2, None, 8))
    _, expected = run_gradient(forward, [init("rows", rows % TOKENS[1])], x, seed, opset=opset)
    np.testing.assert_allclose(grad, expected, atol=1e-6)
    assert np.abs(grad).sum() > 0


@pytest.mark.parametrize("opset", [11, 13, 14, 20])
@pytest.mark.parametrize("declared", [X_SHAPE, (2, None, 4, 4)], ids=["static", "channels unknown"])
def test_a_run_time_scatter_of_no_updates_has_a_gradient(declared, opset):
    """The run-time check of which update was kept numbers the updates (`positions`: a Range
    reshaped to their shape), and Reshape takes a 0 in the shape as "keep the input's size":
    a scatter of no updates (an empty selection) gave a gradient graph ONNX Runtime refused
    (below opset 14, which has no allowzero, still: the updates are now numbered from a CumSum
    along each axis there). Nothing is scattered: x's gradient is the seed."""
    nodes = RUN_TIME_SCATTER + [node("Concat", ["hi", "lo"], ["both"], axis=1),
                                node("Slice", ["both", "zero", "zero", "ax1"], ["at"]),
                                node("Slice", ["u", "zero", "zero", "ax1"], ["none"]),
                                node("ScatterElements", ["x", "at", "none"], axis=1)]
    x = _inputs("ScatterElements(run-time indices)")
    seed = np.random.default_rng(1).standard_normal(X_SHAPE).astype(np.float32)
    y, grad = run_gradient(nodes, TWO_CHANNELS, x, seed, opset, declared=declared)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(grad, seed)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("name", ["Slice(steps 3, -2)", "Gather(class token)",
                                  "ScatterElements(Tensor.scatter)", "ScatterElements(run-time indices)"])
def test_rules_that_number_elements_below_opset_14(name, opset):
    """Below opset 14 `positions` numbers the elements by CumSums along each axis (no Reshape
    with allowzero there): the gradients still match finite differences."""
    nodes, initializers, _ = CASES[name]
    x = _inputs(name)
    y_shape = run_nodes(nodes, {"x": x}, ["y"], initializers, opset=opset)[0].shape
    seed = np.random.default_rng(1).standard_normal(y_shape).astype(np.float32)
    _, grad = run_gradient(nodes, initializers, x, seed, opset)
    expected = finite_differences(nodes, initializers, x, seed.astype(np.float64), opset=opset)
    np.testing.assert_allclose(grad, expected, atol=5e-3, rtol=1e-2)
    assert np.abs(grad).max() > 0.1


@pytest.mark.parametrize("nodes, initializers, why", [
    ([node("Slice", ["x", "zero", "two", "ax0"], ["w"]), node("Conv", ["image", "w"], name="the_conv")],
     [init("zero", np.array([0])), init("two", np.array([2])), init("ax0", np.array([0])),
      init("image", np.ones(X_SHAPE, np.float32))],
     r"only through inputs that have no gradient rule: input 1 \('w'\) of node 'the_conv' \(Conv\)"),
    ([node("Cast", ["x"], ["half"], name="the_cast", to=TensorProto.FLOAT16),
      node("Relu", ["half"], ["r"]), node("Cast", ["r"], to=TensorProto.FLOAT)], [],
     r"only through tensors that are not float32 \(node 'the_cast' \(Cast\) makes float16 'half'\)"),
    ([node("QuantizeLinear", ["x", "scale", "zero_point"], ["q"], name="the_q"),
      node("DequantizeLinear", ["q", "scale", "zero_point"], ["d"]), node("Relu", ["d"])],
     [init("scale", np.float32(0.05)), init("zero_point", np.uint8(128))],
     r"only through tensors that are not float32 \(node 'the_q' \(QuantizeLinear\) makes uint8 'q'\)"),
], ids=["weights only", "half precision", "quantized"])
def test_logits_reached_only_where_no_rule_goes_are_named(nodes, initializers, why):
    """"The logits do not depend on the target" was said of logits that do, through a weight
    computed from it, a head cast to half precision or quantized: what stops the gradient is
    named."""
    with pytest.raises(ModelError, match=r"the logits 'y' depend on target 'x' " + why):
        gradient_model(nodes, initializers)


@pytest.mark.parametrize("nodes, initializers, opset", [
    *[([node("Hardmax", ["x"], ["h"], axis=axis), node("Mul", ["h", "x"])], [], 11) for axis in (0, 1, 2)],
    ([node("Resize", ["x", "s"], mode="linear")], [init("s", np.float32([1, 1, 2, 1.5]))], 10),
    ([node("Upsample", ["x", "s"], mode="linear")], [init("s", np.float32([1, 1, 2, 2]))], 9),
    ([node("Upsample", ["x"], mode="linear", scales=[1.0, 1.0, 1.5, 2.0])], [], 8),
    ([node("Resize", ["x", "s"], mode="nearest")], [init("s", np.float32([1, 1, 1.75, 1.25]))], 10),
    ([node("Resize", ["x", "s"])], [init("s", np.float32([1, 1, 0.75, 0.5]))], 10),
    ([node("Upsample", ["x", "s"])], [init("s", np.float32([1, 1, 1.5, 1.75]))], 9),
    ([node("Upsample", ["x"], scales=[1.0, 1.0, 1.75, 2.5])], [], 8),
], ids=["hardmax axis 0", "hardmax axis 1", "hardmax axis 2", "resize 10 linear", "upsample 9 linear",
        "upsample 8 linear", "resize 10 nearest", "resize 10 nearest shrinking", "upsample 9 nearest",
        "upsample 8 nearest"])
def test_an_old_model_converted_by_the_export_keeps_its_values_and_gradient(nodes, initializers, opset):
    """onnx.version_converter keeps ops whose meaning changed as they are: Hardmax (before 13
    one-hot over the 2-D view [before axis, from axis on], from 13 along the axis alone), and a
    Resize of opset 10 or Upsample (asymmetric coordinates, half_pixel from 11; a nearest one
    rounded them down, or up where it shrinks, round_prefer_floor from 11). When
    the export converted such a model to 17, the head it differentiated computed other values.
    The converted model now gives the original's values, its gradient the finite differences."""
    from camface.export import onnx_export

    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, list(X_SHAPE))], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=initializers)
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    old.ir_version = 7
    converted = onnx_model.prepare(onnx_export.upgrade(old))
    x = _inputs("Hardmax")
    expected_y = run_nodes(nodes, {"x": x}, ["y"], initializers, opset=opset)[0]
    seed = np.random.default_rng(1).standard_normal(expected_y.shape).astype(np.float32)
    builder = GraphBuilder(17, taken={"x", "y", "seed"})
    dx = onnx_cam.gradient(SimpleNamespace(model=converted, logits="y"), builder, "x", "seed")
    y, grad = run_nodes(list(converted.graph.node) + builder.nodes, {"x": x, "seed": seed}, ["y", dx],
                        list(converted.graph.initializer) + builder.initializers, opset=17)
    np.testing.assert_allclose(y, expected_y, atol=1e-6)
    np.testing.assert_allclose(grad, finite_differences(nodes, initializers, x, seed.astype(np.float64),
                                                        opset=opset), atol=5e-3, rtol=1e-2)


OLD_RESIZES = {
    "resize 10 linear": (node("Resize", ["x", "s"], ["r"], mode="linear"), [1, 1, 2, 1.5], 10),
    "upsample 9 linear": (node("Upsample", ["x", "s"], ["r"], mode="linear"), [1, 1, 2, 2], 9),
    "upsample 8 linear": (node("Upsample", ["x"], ["r"], mode="linear", scales=[1.0, 1.0, 1.5, 2.0]), None, 8),
    "resize 10 nearest": (node("Resize", ["x", "s"], ["r"], mode="nearest"), [1, 1, 1.75, 1.25], 10),
    "resize 10 nearest shrinking": (node("Resize", ["x", "s"], ["r"]), [1, 1, 0.75, 0.5], 10),
}


def _old_resize_in_a_body(name: str, loop: bool):
    """(model, the resize and its scales as main-graph nodes) of `OLD_RESIZES[name]` inside an
    If whose condition the shapes decide (x has 3 channels), each branch its own Resize (the
    then branch reads its scales from the main graph, the else branch holds its own), or
    inside a Loop's body run once, the Resize a scan output."""
    resize, scales, opset = OLD_RESIZES[name]
    values = {"f": TensorProto.FLOAT, "b": TensorProto.BOOL, "i": TensorProto.INT64}

    def value(name, kind="f", shape=(None,) * 4):
        return helper.make_tensor_value_info(name, values[kind], shape)

    def body(prefix, source, scales_name, extra=()):
        """(nodes, initializers) of a body: `extra`, then the Resize of `source` as `{prefix}r`,
        its scales `scales_name` (held by the body when it starts with `prefix`)."""
        inner = helper.make_node(resize.op_type, [source] + [scales_name] * (scales is not None),
                                 [f"{prefix}r"], name=f"{prefix}resize")
        inner.attribute.extend(resize.attribute)
        own = scales is not None and scales_name.startswith(prefix)
        return [*extra, inner], [init(scales_name, np.float32(scales))] if own else []

    outer = [init("outer_s", np.float32(scales))] if scales else []
    if loop:
        nodes, inits = body("", "v", "s", [node("Identity", ["c_in"], ["c_out"]), node("Identity", ["v"], ["v_out"])])
        graph = helper.make_graph(nodes, "body", [value("i", "i", []), value("c_in", "b", []), value("v")],
                                  [value("c_out", "b", []), value("v_out"), value("r")], inits)
        nodes = [node("Loop", ["once", "true", "x"], ["x_out", "y"], body=graph)]
        inits = [init("once", np.int64(1)), init("true", np.bool_(True))]
        out = value("y", shape=(None,) * 5)
    else:
        then, _ = body("then_", "x", "outer_s")
        other, other_inits = body("else_", "x", "else_s")
        nodes = [node("Shape", ["x"], ["shape"]), node("Gather", ["shape", "one"], ["c"], axis=0),
                 node("Equal", ["c", "three"], ["cond"]),
                 node("If", ["cond"], ["y"], then_branch=helper.make_graph(then, "then", [], [value("then_r")]),
                      else_branch=helper.make_graph(other, "else", [], [value("else_r")], other_inits))]
        inits = [init("one", np.int64(1)), init("three", np.int64(3)), *outer]
        out = value("y")
    graph = helper.make_graph(nodes, "head", [value("x", shape=["N", 3, 4, 4])], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    unbranched = helper.make_node(resize.op_type, ["x"] + ["s"] * (scales is not None), ["y"])
    unbranched.attribute.extend(resize.attribute)
    return model, [unbranched], [init("s", np.float32(scales))] if scales else []


def _ort(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("loop", [False, True], ids=["if", "loop"])
@pytest.mark.parametrize("name", sorted(OLD_RESIZES))
def test_an_old_resize_inside_a_branch_or_loop_body_keeps_its_values_after_the_upgrade(name, loop):
    """onnx.version_converter upgrades If branches and Loop bodies as the main graph, and the
    upgrade gave the main graph's old Resizes and Upsamples their coordinates back (asymmetric,
    a nearest one floored, or ceiled where it shrinks) but not those of the subgraphs: their
    values changed (by up to 3 on unit normal inputs). The upgraded model passes ONNX's full
    check and gives the original's values in ONNX Runtime."""
    import onnx

    from camface.export import onnx_export

    model, _, _ = _old_resize_in_a_body(name, loop)
    onnx.checker.check_model(model, full_check=True)
    converted = onnx_export.upgrade(model)
    onnx.checker.check_model(converted, full_check=True)
    assert converted.opset_import[0].version == 17
    x = _inputs("Resize")
    np.testing.assert_allclose(_ort(converted, x), _ort(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(OLD_RESIZES))
def test_an_old_resize_in_a_branch_the_shapes_decide_has_the_gradient_of_finite_differences(name):
    """The same If, folded by prepare() into the main graph: the CAM graph's gradient through
    the upgraded Resize is the finite differences of the original op's."""
    from camface.export import onnx_export

    model, nodes, initializers = _old_resize_in_a_body(name, loop=False)
    opset = model.opset_import[0].version
    prepared = onnx_model.prepare(onnx_export.upgrade(model))
    assert "If" not in {n.op_type for n in prepared.graph.node}
    x = _inputs("Resize")
    expected_y = run_nodes(nodes, {"x": x}, ["y"], initializers, opset=opset)[0]
    seed = np.random.default_rng(1).standard_normal(expected_y.shape).astype(np.float32)
    builder = GraphBuilder(17, taken={"x", "y", "seed"})
    dx = onnx_cam.gradient(SimpleNamespace(model=prepared, logits="y"), builder, "x", "seed")
    y, grad = run_nodes(list(prepared.graph.node) + builder.nodes, {"x": x, "seed": seed}, ["y", dx],
                        list(prepared.graph.initializer) + builder.initializers, opset=17)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, finite_differences(nodes, initializers, x, seed.astype(np.float64),
                                                        opset=opset), atol=5e-3, rtol=1e-2)


def test_a_dropped_ceil_window_in_a_branch_the_shapes_decide_is_floored_once(monkeypatch):
    """A pool whose ceil_mode window ONNX Runtime drops, inside an If branch that prepare()
    folds into the main graph: prepare() set ceil_mode 0 on the pools of the model before the
    folding, where the pool was still inside the If, changed nothing and prepared that model
    again, until Python's recursion limit (the If was then left unfolded). It now sets the
    branch's pool and prepares twice; the shapes and the gradient are ONNX Runtime's."""
    def branch(name):
        return helper.make_graph(
            [node("MaxPool", ["x"], [f"{name}_m"], kernel_shape=[2, 2], strides=[3, 3],
                  pads=[1, 1, 1, 1], ceil_mode=1)], name, [],
            [helper.make_tensor_value_info(f"{name}_m", TensorProto.FLOAT, None)])

    nodes = [node("Shape", ["x"], ["s"]), node("Gather", ["s", "one"], ["c"], axis=0),
             node("Equal", ["c", "three"], ["cond"]),
             node("If", ["cond"], ["m"], then_branch=branch("then"), else_branch=branch("other")),
             node("GlobalAveragePool", ["m"])]
    initializers = [init("one", np.int64(1)), init("three", np.int64(3))]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 3, 4, 4])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    prepare, passes = onnx_model.prepare, []

    def counted(*args):
        passes.append(1)
        assert len(passes) <= 4, "prepare() keeps preparing the same model"
        return prepare(*args)

    monkeypatch.setattr(onnx_model, "prepare", counted)
    prepared = onnx_model.prepare(model)
    assert len(passes) == 2
    pools = [n for n in prepared.graph.node if n.op_type == "MaxPool"]
    assert [a.i for n in pools for a in n.attribute if a.name == "ceil_mode"] == [0]
    x = _inputs("MaxPool")
    # the reference is ONNX Runtime's pool outside the If: with its optimisations off, the If's
    # branch output is allocated at the shape ONNX infers (3 x 3) and the original fails to run
    unbranched = [node("MaxPool", ["x"], ["m"], kernel_shape=[2, 2], strides=[3, 3], pads=[1, 1, 1, 1],
                       ceil_mode=1), nodes[-1]]
    m = run_nodes(unbranched[:1], {"x": x}, ["m"], [], opset=17)[0]
    assert onnx_model.shapes(prepared)["then_m"][1:] == list(m.shape[1:]) == [3, 2, 2]
    seed = np.random.default_rng(1).standard_normal((2, 3, 1, 1)).astype(np.float32)
    builder = GraphBuilder(17, taken={"x", "y", "seed"})
    dx = onnx_cam.gradient(SimpleNamespace(model=prepared, logits="y"), builder, "x", "seed")
    grad = run_nodes(list(prepared.graph.node) + builder.nodes, {"x": x, "seed": seed}, [dx],
                     list(prepared.graph.initializer) + builder.initializers, opset=17)[0]
    np.testing.assert_allclose(grad, finite_differences(unbranched, [], x, seed.astype(np.float64),
                                                        opset=17), atol=5e-3, rtol=1e-2)


def test_an_old_nearest_resize_that_enlarges_and_shrinks_is_refused_by_name():
    """A nearest Resize of opset 10 rounds its coordinates down on an axis it enlarges and up
    on one it shrinks (ONNX Runtime's rule); opset 11's nearest_mode is one for every axis."""
    from camface.export import onnx_export

    graph = helper.make_graph([node("Resize", ["x", "s"], name="up_down")], "head", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X_SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[init("s", np.float32([1, 1, 1.5, 0.5]))])
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    old.ir_version = 7
    with pytest.raises(ModelError, match=r"^m.onnx: node 'up_down' \(Resize, nearest, opset < 11\) "
                                         r"enlarges one axis and shrinks another"):
        onnx_export.upgrade(old, "m.onnx")


def _integer_graph(nodes, initializers):
    graph = helper.make_graph(nodes, "shapes", [], [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
                              initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("nodes, initializers", [
    ([node("Reshape", ["a", "s"])], [init("a", np.arange(6).reshape(2, 3)), init("s", np.array([0, -1, 1]))]),
    ([node("Squeeze", ["a", "ax"])], [init("a", np.arange(3).reshape(1, 3, 1)), init("ax", np.array([-1, 0]))]),
    ([node("Unsqueeze", ["a", "ax"])], [init("a", np.arange(3)), init("ax", np.array([-1, 0]))]),
    ([node("Range", ["a", "b", "c"])], [init("a", np.int64(10)), init("b", np.int64(-3)), init("c", np.int64(-3))]),
    ([node("Range", ["a", "b", "c"])], [init("a", np.int64(2)), init("b", np.int64(-5)), init("c", np.int64(1))]),
    ([node("Concat", ["a", "b"], axis=-1), node("Sub", ["y", "c"], ["z"]), node("Neg", ["z"], ["w"]),
      node("Mul", ["w", "c"], ["v"]), node("Cast", ["v"], ["f"], to=TensorProto.FLOAT)],
     [init("a", np.array([[1]])), init("b", np.array([[2, 3]])), init("c", np.array([4]))]),
], ids=["reshape 0 -1", "squeeze negative axes", "unsqueeze negative axes", "range down", "range empty",
        "concat sub neg mul cast"])
def test_small_integer_computations_fold_to_onnx_runtimes_values(nodes, initializers):
    """onnx_model.constants folds small integer computations on constants (torch's dynamo
    exporter's axes and shapes with optimize=False): the values ONNX Runtime computes."""
    import onnxruntime as ort

    outputs = [o for n in nodes for o in n.output]
    model = _integer_graph(nodes, initializers)
    found = onnx_model.constants(model)
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=o) for o in outputs)
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for name, value in zip(outputs, session.run(outputs, {})):
        assert found[name].dtype == value.dtype and found[name].shape == value.shape, name
        np.testing.assert_array_equal(found[name], value, err_msg=name)


@pytest.mark.parametrize("limit, delta", [(2 ** 62, 1), (5, 0)], ids=["2 ** 62 elements", "delta 0"])
def test_a_range_of_constants_that_is_no_small_shape_is_not_folded(limit, delta):
    """A constant Range was made by numpy before its size was checked: one of 2 ** 62
    elements raised ValueError (2 ** 40: MemoryError; 10 ** 8 took seconds and 800 MB in every
    constants() call), a delta of 0 ZeroDivisionError, out of onnx_model.prepare. Neither is
    folded now."""
    nodes = [node("Range", ["a", "b", "c"], ["r"]), node("Shape", ["r"], ["y"])]
    model = _integer_graph(nodes, [init("a", np.int64(0)), init("b", np.int64(limit)), init("c", np.int64(delta))])
    assert "r" not in onnx_model.constants(model)
    prepared = onnx_model.prepare(model)
    assert [n.op_type for n in prepared.graph.node] == ["Range", "Shape"]


@pytest.mark.parametrize("inner, initializers", [
    (lambda b: [node("Hardmax", ["x"], [f"{b}_h"], axis=1), node("Mul", [f"{b}_h", "x"], [f"{b}_y"])], []),
    (lambda b: [node("Hardmax", ["x"], [f"{b}_y"], axis=2)], []),
], ids=["hardmax axis 1", "hardmax axis 2"])
def test_an_old_models_hardmax_inside_a_branch_keeps_its_values_when_converted(inner, initializers):
    """The Hardmax rewrite (see above) read the main graph only (onnx.version_converter leaves
    subgraphs as they are), and prepare() folds an If branch the shapes decide into it: a
    Hardmax of an opset 10 model's branch computed other one-hot rows in the exported head."""
    import onnxruntime as ort

    from camface.export import onnx_export

    def branch(name):
        nodes = inner(name)
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(
            nodes[-1].output[0], TensorProto.FLOAT, None)])

    nodes = [node("Shape", ["x"], ["shape"]), node("Gather", ["shape", "one"], ["c"], axis=0),
             node("Equal", ["c", "three"], ["cond"]),
             node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("other"))]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[init("one", np.int64(1)), init("three", np.int64(3)), *initializers])
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    old.ir_version = 7
    prepared = onnx_model.prepare(onnx_export.upgrade(old))
    assert "If" not in [n.op_type for n in prepared.graph.node]
    x = _inputs("Hardmax")

    def run(model):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(["y"], {"x": x})[0]

    np.testing.assert_allclose(run(prepared), run(old), atol=1e-6)
