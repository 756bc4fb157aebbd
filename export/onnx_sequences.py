"""SequenceAt(SplitToSequence(x, split), p) -> Slice of x: torch's dynamo exporter writes
torch.chunk / split so when its optimiser is off (optimize=False, which camface's own advice
asks for to keep a BatchNorm apart from its convolution). A sequence is no float tensor: the
gradient did not pass it, and the logits were said not to depend on a target before it (or the
gradient lost that path). Each piece read at a constant position p is the same Slice of x."""

from __future__ import annotations

import numpy as np


def sequences_as_slices(model, constants: dict):
    """A copy of `model` with every SequenceAt of a SplitToSequence (constant split, constant
    position >= 0) written as a Slice (and a Squeeze, for keepdims 0 without split); `model`
    itself when there is none. constants: tensor name -> value (onnx_model.constants)."""
    import onnx
    from onnx import helper

    splits = {n.output[0]: n for n in model.graph.node if n.op_type == "SplitToSequence"}
    found = {}
    for node in model.graph.node:
        if node.op_type != "SequenceAt" or node.input[0] not in splits:
            continue
        split = splits[node.input[0]]
        position = constants.get(node.input[1])
        sizes = constants.get(split.input[1]) if len(split.input) > 1 and split.input[1] else None
        if position is None or int(position) < 0 or (len(split.input) > 1 and split.input[1]
                                                    and sizes is None):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
        found[node.output[0]] = _piece(split.input[0], int(attrs.get("axis", 0)), int(position),
                                       sizes, int(attrs.get("keepdims", 1)))
    if not found:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    nodes = []
    for node in copy.graph.node:
        if node.op_type == "SequenceAt" and node.output[0] in found:
            nodes += _slice_nodes(node, *found[node.output[0]])
        else:
            nodes.append(node)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def _piece(x: str, axis: int, position: int, sizes, keepdims: int):
    """(x, axis, start, end, squeeze) of piece `position`: sizes a 1-D list of piece sizes, a
    scalar (every piece that size, the last what is left) or None (pieces of 1)."""
    if sizes is None:
        return x, axis, position, position + 1, not keepdims
    if np.ndim(sizes) == 0:
        size = int(sizes)
        return x, axis, position * size, (position + 1) * size, False
    sizes = np.asarray(sizes).reshape(-1)
    start = int(np.sum(sizes[:position]))
    return x, axis, start, start + int(sizes[position]), False


def _slice_nodes(node, x: str, axis: int, start: int, end: int, squeeze: bool) -> list:
    from onnx import helper, numpy_helper

    out, stem = node.output[0], f"{node.output[0]}/camface_piece"
    consts = [helper.make_node("Constant", [], [f"{stem}_{k}"], value=numpy_helper.from_array(
        np.array([v], np.int64))) for k, v in (("start", start), ("end", end), ("axis", axis))]
    sliced = f"{stem}_slice" if squeeze else out
    nodes = consts + [helper.make_node("Slice", [x, f"{stem}_start", f"{stem}_end", f"{stem}_axis"],
                                       [sliced], name=node.name)]
    if squeeze:
        nodes.append(helper.make_node("Squeeze", [sliced, f"{stem}_axis"], [out]))
    return nodes
