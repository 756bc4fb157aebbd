"""Gradient rule of ONNX's Attention (opset 23: torch's dynamo exporter writes one for every
F.scaled_dot_product_attention from that opset on). See `onnx_grad`.

Y = P V with P = softmax(scale Q K^T + mask), per head; with grouped-query attention (fewer key
and value heads than query heads) query head h reads key and value head h // (Hq / Hkv). P is
taken from ONNX Runtime itself (an Attention with V = the identity returns P), so the mask,
is_causal and the scale are applied exactly as in the forward pass. Then, with dY per query head:
dV = P^T dY, dS = P (dY V^T - rowsum(dY V^T P)), dQ = scale dS K, dK = scale dS^T Q, and the
key and value gradients summed over each group of query heads. 3-D inputs [N, S, H D] are
taken as [N, H, S, D] and their gradients laid out back.
"""

from __future__ import annotations

import numpy as np

from camface.errors import ModelError
from camface.export.onnx_grad_context import Context, attribute


def attention(ctx: Context, node, grads) -> list:
    b = ctx.builder
    inputs = list(node.input) + [""] * (7 - len(node.input))
    q, k, v, mask = inputs[:4]
    if any(inputs[4:]) or float(attribute(node, "softcap", 0.0)):
        why = "a past key/value cache" if any(inputs[4:6]) else \
            "nonpad_kv_seqlen" if inputs[6] else "softcap"
        raise ModelError(f"node {node.name!r} (Attention): {why} has no gradient rule")
    ranks = [ctx.rank(t) for t in (q, k, v)]
    if ranks not in ([4, 4, 4], [3, 3, 3]):
        raise ModelError(f"node {node.name!r} (Attention): inputs of ranks {ranks} have no "
                         "gradient rule (3-D or 4-D Q, K and V)")
    if ranks[0] == 3:
        heads = [int(attribute(node, "q_num_heads", 0)), int(attribute(node, "kv_num_heads", 0))]
        widths = [_static(ctx, node, t, -1) for t in (q, k, v)]
        sizes = [widths[0] // heads[0], widths[1] // heads[1], widths[2] // heads[1]]
        q4, k4, v4 = (_heads_first(ctx, t, h, d) for t, h, d in
                      zip((q, k, v), (heads[0], heads[1], heads[1]), sizes))
        dy = _heads_first(ctx, grads[0], heads[0], sizes[2])
    else:
        heads = [_static(ctx, node, q, 1), _static(ctx, node, k, 1)]
        sizes = [_static(ctx, node, t, -1) for t in (q, k, v)]
        q4, k4, v4, dy = q, k, v, grads[0]
    if heads[0] % heads[1]:
        raise ModelError(f"node {node.name!r} (Attention): {heads[0]} query heads are no multiple "
                         f"of {heads[1]} key/value heads")
    group = heads[0] // heads[1]
    scale = float(attribute(node, "scale", 1.0 / np.sqrt(sizes[0])))
    p = _probabilities(ctx, node, q4, k4, mask, heads[1], scale)  # [N, Hq, S, L]
    k_all, v_all = (_every_query_head(ctx, t, group, heads[0], d)
                    for t, d in ((k4, sizes[1]), (v4, sizes[2])))
    dp = b.op("MatMul", [dy, _swap(ctx, v_all)])
    ds = b.op("Mul", [p, b.op("Sub", [dp, b.reduce("ReduceSum", b.op("Mul", [dp, p]), [-1],
                                                      keepdims=True)])])
    ds = b.op("Mul", [ds, b.const(scale)])
    dq = b.op("MatMul", [ds, k_all])
    dk = _per_group(ctx, b.op("MatMul", [_swap(ctx, ds), q4]), group, heads[1], sizes[1])
    dv = _per_group(ctx, b.op("MatMul", [_swap(ctx, p), dy]), group, heads[1], sizes[2])
    if ranks[0] == 3:
        dq, dk, dv = (_heads_last(ctx, t) for t in (dq, dk, dv))
    return [dq, dk, dv] + [None] * (len(node.input) - 3)


def _static(ctx: Context, node, name: str, axis: int) -> int:
    shape = ctx.shape(name)
    size = None if shape is None else shape[axis]
    if not isinstance(size, int):
        raise ModelError(f"node {node.name!r} (Attention): the gradient needs the size of axis "
                         f"{axis} of {name!r}, which shape inference left unknown ({shape})")
    return size


def _swap(ctx: Context, t: str) -> str:
    return ctx.builder.op("Transpose", [t], perm=[0, 1, 3, 2])


def _heads_first(ctx: Context, t: str, heads: int, size: int) -> str:
    """[N, S, H D] -> [N, H, S, D]."""
    b = ctx.builder
    return b.op("Transpose", [b.op("Reshape", [t, b.ints([0, 0, heads, size])])], perm=[0, 2, 1, 3])


def _heads_last(ctx: Context, t: str) -> str:
    """[N, H, S, D] -> [N, S, H D]."""
    b = ctx.builder
    return b.op("Reshape", [b.op("Transpose", [t], perm=[0, 2, 1, 3]), b.ints([0, 0, -1])])


def _every_query_head(ctx: Context, t: str, group: int, heads: int, size: int) -> str:
    """[N, Hkv, L, D] -> [N, Hq, L, D], each key/value head repeated for its group."""
    if group == 1:
        return t
    b = ctx.builder
    spread = b.op("Expand", [b.unsqueeze(t, [2]), b.ints([1, 1, group, 1, 1])])
    return b.op("Reshape", [spread, b.ints([0, heads, -1, size])])


def _per_group(ctx: Context, t: str, group: int, heads: int, size: int) -> str:
    """[N, Hq, L, D] summed over each group of query heads -> [N, Hkv, L, D]."""
    if group == 1:
        return t
    b = ctx.builder
    grouped = b.op("Reshape", [t, b.ints([0, heads, group, -1, size])])
    return b.reduce("ReduceSum", grouped, [2], keepdims=False)


def _probabilities(ctx: Context, node, q4: str, k4: str, mask: str, kv_heads: int,
                   scale: float) -> str:
    """softmax(scale Q K^T + mask) [N, Hq, S, L] as ONNX Runtime computes it: the same
    Attention with V = the identity [N, Hkv, L, L]."""
    from onnx import TensorProto, numpy_helper

    b = ctx.builder
    shape = b.op("Shape", [k4])
    length = b.op("Slice", [shape, b.ints([2]), b.ints([3])])
    square = b.op("ConstantOfShape", [b.op("Concat", [length, length], axis=0)],
                  value=numpy_helper.from_array(np.zeros(1, np.float32)))
    eye = b.op("EyeLike", [square], dtype=TensorProto.FLOAT)
    every = b.op("Concat", [b.op("Slice", [shape, b.ints([0]), b.ints([1])]), b.ints([kv_heads]),
                            length, length], axis=0)
    values = b.op("Expand", [eye, every])
    attrs = {"scale": scale, "is_causal": int(attribute(node, "is_causal", 0))}
    return b.op("Attention", [q4, k4, values] + ([mask] if mask else []), **attrs)
