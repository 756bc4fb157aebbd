"""Reverse-mode differentiation of an ONNX subgraph (the head: target tensor -> logits) with
standard ONNX ops only, one rule per op type (`RULES`).

A rule reads the node, the gradient of its outputs and the forward tensors (which stay in the
graph: nothing is recomputed) and writes nodes that give the gradient of each input that depends
on the target. Gradients of several readers of a tensor are summed. Float32 only. Spatial sizes
of the convolution and pooling layers must be known (shape inference): they fix the transposed
convolutions' output padding; the batch dimension may stay dynamic.

The rules live in `onnx_grad_pointwise` (element-wise arithmetic, the ReLU family, Shrink,
sigmoids, Tanh, Exp, Gelu, shapes), `onnx_grad_activations` (ELUs, Softplus, Mish, Swish, Log,
Sign and the other steps, trigonometric and hyperbolic functions, softmaxes), `onnx_grad_norms` (batch, layer, instance, group,
mean-variance, RMS, Lp norm, LRN), `onnx_grad_moves` (Pad, Tile, DepthToSpace, TopK, GatherND,
GatherElements, ScatterElements), `onnx_grad_layers` (pooling, reductions,
CumSum, CumProd, MatMul/Gemm, Conv, ConvTranspose, Resize), `onnx_grad_einsum` (Einsum) and
`onnx_grad_attention` (Attention, opset 23); what they
share in `onnx_grad_context`. Adding an op: a rule there, a row here (and in
DIFFERENTIABLE_INPUTS when some inputs are shapes or weights), a row in tests/test_onnx_grad.py.
"""

from __future__ import annotations

from collections.abc import Callable

from camface.export import onnx_grad_activations as activations
from camface.export import onnx_grad_attention
from camface.export import onnx_grad_einsum as einsum
from camface.export import onnx_grad_layers as layers
from camface.export import onnx_grad_moves as moves
from camface.export import onnx_grad_norms as norms
from camface.export import onnx_grad_pointwise as pointwise
from camface.export.onnx_grad_context import Context

Rule = Callable[[Context, object, list], list]

# op type -> rule. Inputs a rule returns None for (shapes, axes, weights) are not differentiated.
RULES: dict[str, Rule] = {
    "Identity": pointwise.identity,
    "Dropout": pointwise.identity,
    "Cast": pointwise.identity,  # float -> float only (checked where the head is read)
    "CastLike": pointwise.identity,  # as Cast (a tensor of another type breaks the chain)
    "Flatten": pointwise.reshape_like_input,
    "Reshape": pointwise.reshape_like_input,
    "Squeeze": pointwise.reshape_like_input,
    "Unsqueeze": pointwise.reshape_like_input,
    "Add": pointwise.add,
    "Sub": pointwise.sub,
    "Mul": pointwise.mul,
    "Div": pointwise.div,
    "Neg": pointwise.neg,
    "Sum": pointwise.sum_,
    "Mean": pointwise.mean,
    "Max": pointwise.extremum,
    "Min": pointwise.extremum,
    "Relu": pointwise.relu,
    "LeakyRelu": pointwise.leaky_relu,
    "ThresholdedRelu": pointwise.thresholded_relu,
    "Shrink": pointwise.shrink,
    "PRelu": pointwise.prelu,
    "Clip": pointwise.clip,
    "Sigmoid": pointwise.sigmoid,
    "HardSigmoid": pointwise.hard_sigmoid,
    "HardSwish": pointwise.hard_swish,
    "Tanh": pointwise.tanh,
    "Exp": pointwise.exp,
    "Sqrt": pointwise.sqrt,
    "Erf": pointwise.erf,
    "Pow": pointwise.power,
    "Gelu": pointwise.gelu,
    "Elu": activations.elu,
    "Selu": activations.selu,
    "Celu": activations.celu,
    "Softplus": activations.softplus,
    "Softsign": activations.softsign,
    "Mish": activations.mish,
    "Swish": activations.swish,
    "Abs": activations.abs_,
    "Sign": activations.sign,
    "Floor": activations.sign,
    "Ceil": activations.sign,
    "Round": activations.sign,
    "Hardmax": activations.sign,
    "Sin": activations.sin,
    "Cos": activations.cos,
    "Tan": activations.tan,
    "Asin": activations.asin,
    "Acos": activations.acos,
    "Atan": activations.atan,
    "Sinh": activations.sinh,
    "Cosh": activations.cosh,
    "Asinh": activations.asinh,
    "Acosh": activations.acosh,
    "Atanh": activations.atanh,
    "Log": activations.log,
    "Reciprocal": activations.reciprocal,
    "Softmax": activations.softmax,
    "LogSoftmax": activations.log_softmax,
    "BatchNormalization": norms.batch_norm,
    "LayerNormalization": norms.layer_norm,
    "InstanceNormalization": norms.instance_norm,
    "GroupNormalization": norms.group_norm,
    "LpNormalization": norms.lp_norm,
    "LRN": norms.lrn,
    "MeanVarianceNormalization": norms.mean_variance_norm,
    "RMSNormalization": norms.rms_norm,
    "GlobalAveragePool": layers.global_average_pool,
    "GlobalMaxPool": layers.global_max_pool,
    "ReduceMean": lambda ctx, node, grads: layers.reduce(ctx, node, grads, mean=True),
    "ReduceSum": lambda ctx, node, grads: layers.reduce(ctx, node, grads, mean=False),
    "ReduceMax": layers.reduce_max,
    "ReduceMin": layers.reduce_max,
    "ReduceL1": layers.reduce_by_formula,
    "ReduceL2": layers.reduce_by_formula,
    "ReduceSumSquare": layers.reduce_by_formula,
    "ReduceLogSumExp": layers.reduce_by_formula,
    "ReduceLogSum": layers.reduce_by_formula,
    "ReduceProd": layers.reduce_prod,
    "CumSum": layers.cumsum,
    "CumProd": layers.cumprod,
    "AveragePool": layers.average_pool,
    "MaxPool": layers.max_pool,
    "LpPool": layers.lp_pool,
    "GlobalLpPool": layers.global_lp_pool,
    "Transpose": pointwise.transpose,
    "Trilu": pointwise.trilu,
    "Concat": pointwise.concat,
    "Split": pointwise.split,
    "Slice": pointwise.slice_,
    "Gather": pointwise.gather,
    "Expand": pointwise.expand,
    "Where": pointwise.where,
    "MatMul": layers.matmul,
    "Gemm": layers.gemm,
    "Einsum": einsum.einsum,
    "Attention": onnx_grad_attention.attention,
    "Conv": layers.conv,
    "ConvTranspose": layers.conv_transpose,
    "Pad": moves.pad,
    "Tile": moves.tile,
    "DepthToSpace": moves.depth_to_space,
    "SpaceToDepth": moves.space_to_depth,
    "TopK": moves.top_k,
    "GatherND": moves.gather_nd,
    "GatherElements": moves.gather_elements,
    "ScatterElements": moves.scatter_elements,
    "Resize": layers.resize,
}
# Only these inputs of an op carry gradient (others are shapes, axes, bounds, exponents).
DIFFERENTIABLE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (0,), "Squeeze": (0,), "Unsqueeze": (0,),
    "BatchNormalization": (0,), "ReduceMean": (0,), "ReduceSum": (0,), "ReduceMax": (0,),
    "Conv": (0,), "Dropout": (0,), "LayerNormalization": (0,), "Split": (0,), "Slice": (0,),
    "Gather": (0,), "Expand": (0,), "Where": (1, 2), "Resize": (0,),
    "ReduceMin": (0,), "ReduceL1": (0,), "ReduceL2": (0,), "ReduceSumSquare": (0,),
    "ReduceLogSumExp": (0,), "ReduceLogSum": (0,), "ConvTranspose": (0,),
    "InstanceNormalization": (0,), "GroupNormalization": (0,), "Pad": (0,), "Tile": (0,),
    "CumSum": (0,), "TopK": (0,), "GatherND": (0,), "ReduceProd": (0,),
    "CastLike": (0,), "RMSNormalization": (0,), "GatherElements": (0,),
    "ScatterElements": (0, 2), "CumProd": (0,), "Attention": (0, 1, 2),
    "Trilu": (0,),
}
# Ops whose rule reads the gradient of every output (None where nothing reads one); the other
# rules read the first output's only.
EVERY_OUTPUT = frozenset({"Split", "LayerNormalization"})
# Steps flat between their jumps: their gradient is 0 everywhere (torch's too). A target from
# which every path to the logits passes one has a gradient of 0: `onnx_cam.gradient` refuses it
STEPS = frozenset({"Sign", "Floor", "Ceil", "Round", "Hardmax"})
