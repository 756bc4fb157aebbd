"""Gradient rules of ops that only move or copy elements of one input, no arithmetic (see
`onnx_grad`): Pad, Tile, DepthToSpace (PixelShuffle), SpaceToDepth, TopK (torch.topk,
torch.sort), GatherND (adaptive pooling of sizes that do not divide, from a .pt2),
GatherElements and ScatterElements. Each gradient is the inverse move, or the moved elements'
positions (`positions`) scattered back and summed."""

from __future__ import annotations

import numpy as np

from camface.errors import ModelError
from camface.export.onnx_grad_context import (attribute, float_tensor, int_tensor, mask,
                                               positions, scatter)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def pad(ctx, node, grads):
    """Pad (opset >= 11: pads, constant value and axes as inputs). constant: the gradient padded
    by minus the pads (cropped where the forward padded, zero-filled where negative pads
    cropped). reflect, edge, wrap: the input's element positions padded the same way say where
    each output came from; the gradient is summed back there (ScatterElements add, opset >= 16)."""
    b = ctx.builder
    mode = _text(attribute(node, "mode", b"constant"))
    if b.opset < 11:
        raise ModelError(f"node {node.name!r} (Pad): Pad before opset 11 (pads as an attribute) "
                         f"has no gradient rule (the model has opset {b.opset})")
    x, pads = node.input[:2]
    axes = node.input[3:4] if len(node.input) > 3 and node.input[3] else []
    rest = [None] * (len(node.input) - 1)
    if mode == "constant":
        if pads in ctx.constants:
            crop = b.ints(-ctx.constants[pads])
        else:
            crop = b.op("Neg", [pads])
        cropped = b.op("Pad", [grads[0], crop, *([""] + axes if axes else [])], mode="constant")
        return [cropped] + rest
    if mode not in ("reflect", "edge", "wrap"):
        raise ModelError(f"node {node.name!r} (Pad): mode {mode!r} has no gradient rule")
    if b.opset < 16:
        raise ModelError(f"node {node.name!r} (Pad): the gradient of {mode} padding needs "
                         f"opset >= 16 (the model has {b.opset})")
    taken = b.op("Pad", [positions(ctx, x), pads, *([""] + axes if axes else [])], mode=mode)
    return [scatter(ctx, x, taken, grads[0], add=True)] + rest


def tile(ctx, node, grads):
    """y = x repeated r_i times along each axis i: g seen as [r_0, d_0, r_1, d_1, ...] (the
    shape built at run time from the repeats and x's shape), summed over the r axes."""
    b = ctx.builder
    x, repeats = node.input
    rank = ctx.rank(x)
    if rank is None:
        raise ModelError(f"node {node.name!r} (Tile): the gradient needs the rank of {x!r}, "
                         "which shape inference left unknown")
    column = b.ints([1])
    pairs = b.op("Concat", [b.op("Unsqueeze", [repeats, column]),
                            b.op("Unsqueeze", [b.op("Shape", [x]), column])], axis=1)
    split = b.op("Reshape", [grads[0], b.op("Reshape", [pairs, b.ints([-1])])])
    return [b.reduce("ReduceSum", split, list(range(0, 2 * rank, 2)), keepdims=False), None]


def top_k(ctx, node, grads):
    """The values' gradient put back where TopK took them (its indices, distinct along the
    axis), zeros elsewhere."""
    b = ctx.builder
    x = node.input[0]
    zeros = b.op("ConstantOfShape", [b.op("Shape", [x])], value=float_tensor(0.0))
    placed = b.op("ScatterElements", [zeros, node.output[1], grads[0]],
                  axis=int(attribute(node, "axis", -1)))
    return [placed] + [None] * (len(node.input) - 1)


def gather_nd(ctx, node, grads):
    """GatherND (batch_dims 0): the gradient added back at the index tuples taken, summed
    where one repeats (ScatterND add, opset >= 16)."""
    b = ctx.builder
    batch_dims = int(attribute(node, "batch_dims", 0))
    if batch_dims:
        raise ModelError(f"node {node.name!r} (GatherND): batch_dims {batch_dims} has no "
                         "gradient rule")
    if b.opset < 16:
        raise ModelError(f"node {node.name!r} (GatherND): its gradient needs opset >= 16 (the "
                         f"model has {b.opset})")
    x, indices = node.input
    zeros = b.op("ConstantOfShape", [b.op("Shape", [x])], value=float_tensor(0.0))
    return [b.op("ScatterND", [zeros, indices, grads[0]], reduction="add"), None]


def space_to_depth(ctx, node, grads):
    """SpaceToDepth is undone by DepthToSpace in DCR mode (its default)."""
    b = ctx.builder
    attrs = {"mode": "DCR"} if b.opset >= 11 else {}
    block = int(attribute(node, "blocksize"))
    return [b.op("DepthToSpace", [grads[0]], blocksize=block, **attrs)]


def depth_to_space(ctx, node, grads):
    """DCR mode is undone by SpaceToDepth. CRD (PixelShuffle as torch exports it) moves x
    [N, C b^2, H, W] as [N, C, b, b, H, W] -> [N, C, H, b, W, b]: g taken back the other way."""
    b = ctx.builder
    block = int(attribute(node, "blocksize"))
    if _text(attribute(node, "mode", b"DCR")) == "DCR":
        return [b.op("SpaceToDepth", [grads[0]], blocksize=block)]
    x = node.input[0]
    shape = ctx.static(x, node, "input")
    if len(shape) != 4:
        raise ModelError(f"node {node.name!r} (DepthToSpace): input {shape} is not 4-D")
    channels, height, width = shape[1] // (block * block), shape[2], shape[3]
    spread = b.op("Reshape", [grads[0], b.ints([0, channels, height, block, width, block])])
    blocks = b.op("Transpose", [spread], perm=[0, 1, 3, 5, 2, 4])
    return [b.op("Reshape", [blocks, b.op("Shape", [x])])]


def gather_elements(ctx, node, grads):
    """GatherElements (torch.gather): the gradient added back where each element was taken,
    summed where an index repeats (ScatterElements add, opset >= 16)."""
    b = ctx.builder
    if b.opset < 16:
        raise ModelError(f"node {node.name!r} (GatherElements): its gradient needs opset >= 16 "
                         f"(the model has {b.opset})")
    x, indices = node.input
    zeros = b.op("ConstantOfShape", [b.op("Shape", [x])], value=float_tensor(0.0))
    return [b.op("ScatterElements", [zeros, indices, grads[0]], reduction="add",
                 axis=int(attribute(node, "axis", 0))), None]


def scatter_elements(ctx, node, grads):
    """ScatterElements (Tensor.scatter, scatter_add): the updates' gradient is g taken where they
    went (GatherElements); the data's is g, zeroed where updates replaced it (no reduction) or
    whole (reduction add). The mul, max and min reductions have no rule here.

    Without a reduction only one of several updates sent to the same place reaches the output
    (ONNX leaves which undefined). Constant indices that repeat are refused. Indices computed at
    run time cannot be checked here: the same scatter is run on the updates' flat positions
    (`positions`), and an update whose position is the one left at its place is the one kept;
    the others get 0. ONNX Runtime's CPU scatter writes the updates in order, so the same op on
    the same indices keeps the same update as the forward pass. A runtime whose scatter may
    pick differently from call to call (a parallel GPU one) could give the gradient to another
    of the repeats than the one in the output: accepted, as such a runtime's forward pass is
    itself not repeatable there."""
    b = ctx.builder
    reduction = _text(attribute(node, "reduction", b"none"))
    if reduction not in ("none", "add"):
        raise ModelError(f"node {node.name!r} (ScatterElements): reduction {reduction!r} has no "
                         "gradient rule")
    x, indices, updates = node.input
    axis = int(attribute(node, "axis", 0))
    checked = False  # the indices are constant and known to name distinct places
    if reduction == "none" and indices in ctx.constants:
        size = (ctx.shape(x) or [None] * (axis + 1 if axis >= 0 else -axis))[axis]
        at = ctx.constants[indices] % size if isinstance(size, int) else ctx.constants[indices]
        # (-1 and size - 1 name one place: with the size unknown, negatives are checked at run time)
        checked = isinstance(size, int) or not np.any(at < 0)
        if at.size and np.any(np.diff(np.sort(at, axis=axis), axis=axis) == 0):
            raise ModelError(f"node {node.name!r} (ScatterElements): indices {indices!r} repeat "
                             "along the axis without a reduction (which update wins is "
                             "undefined); no gradient rule")
    g = grads[0]
    dupdates = b.op("GatherElements", [g, indices], axis=axis)
    if reduction == "add":
        return [g, None, dupdates]
    if not checked:
        ids = positions(ctx, updates)
        empty = b.op("ConstantOfShape", [b.op("Shape", [x])], value=int_tensor(-1))
        winner = b.op("ScatterElements", [empty, indices, ids], axis=axis)
        kept = b.op("Equal", [b.op("GatherElements", [winner, indices], axis=axis), ids])
        dupdates = mask(ctx, kept, dupdates)
    zeros = b.op("ConstantOfShape", [b.op("Shape", [updates])], value=float_tensor(0.0))
    return [b.op("ScatterElements", [g, indices, zeros], axis=axis), None, dupdates]
