"""Pools whose ceil_mode window ONNX Runtime drops and ONNX's shape inference keeps.

With ceil_mode, a last window that would start past the input and its begin padding is dropped
by ONNX Runtime (as torch drops it); ONNX's shape inference counts it. The gradient rules read
ONNX's shapes, so every rule after such a pool built a graph that did not run (a global pool
after it), or was refused. Where that happens, on every spatial axis either the window is dropped
or ceil and floor agree; the pool is then the same op with ceil_mode 0 (its other windows lie
within the pads), which both count alike. Pools of another form (an axis that keeps its ceil
window beside one that drops it) are left as they are; the AveragePool rule refuses them.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

POOLS = ("MaxPool", "AveragePool", "LpPool")


def dropped_windows(model, shapes: dict) -> set[str]:
    """The first outputs of the pools described above. shapes: tensor -> dims (inferred)."""
    from onnx import helper

    found = set()
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        if node.op_type not in POOLS or not attrs.get("ceil_mode") or \
                (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
            continue
        size = (shapes.get(node.input[0]) or [])[2:]
        kernel = list(attrs["kernel_shape"])
        if len(size) != len(kernel) or not all(isinstance(d, int) for d in size):
            continue
        axes = _ceil_axes(size, kernel, list(attrs.get("strides", [1] * len(kernel))),
                          list(attrs.get("dilations", [1] * len(kernel))),
                          list(attrs.get("pads", [0] * 2 * len(kernel))))
        if "dropped" in axes and "kept" not in axes:
            found.add(node.output[0])
    return found


def floored(model, outputs: set[str]):
    """A copy of `model` with ceil_mode 0 on the pools that write `outputs`, inside If / Loop
    bodies too (a pool of an If branch that prepare() folded into the main graph keeps its name),
    and how many it changed."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graphs, changed = [copy.graph], 0
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            graphs += [sub for attr in node.attribute
                       for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]
            if node.op_type in POOLS and node.output[0] in outputs:
                next(a for a in node.attribute if a.name == "ceil_mode").i = 0
                changed += 1
                log.info("node %r (%s): ceil_mode set to 0 (its last window, which ONNX Runtime "
                         "drops and ONNX's shapes keep, is the only one ceil_mode adds)",
                         node.name, node.op_type)
    return copy, changed


def _ceil_axes(size, kernel, strides, dilations, pads) -> list[str]:
    """Per spatial axis: "same" (ceil and floor agree), "dropped" (the window ceil_mode adds
    starts past the input and its begin pad: ONNX Runtime drops it) or "kept"."""
    dims, found = len(kernel), []
    for i in range(dims):
        span = size[i] + pads[i] + pads[i + dims] - (kernel[i] - 1) * dilations[i] - 1
        if span % strides[i] == 0:
            found.append("same")
        elif -(-span // strides[i]) * strides[i] >= size[i] + pads[i]:
            found.append("dropped")
        else:
            found.append("kept")
    return found
