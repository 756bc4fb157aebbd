"""Forward ONNX classifier -> CAM graph (camface/graph_spec.py) in ONNX itself.

The model's nodes stay as they are. Added around them: the uint8 NHWC `image` input cast and
normalised (x * scale + offset per channel, transposed to NCHW when the model takes that), the
class choice (`class_index`, -1 = the predicted class), the gradient of the chosen class's
pre-softmax logit with respect to the target tensor (the head differentiated in reverse by
`onnx_grad`, seeded with one-hot rows: each crop gets d logit[n, c_n] / dA[n]), and every
registry heatmap the head allows, written by `camface.methods` through `onnx_ops.ONNX_OPS`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from camface import graph_spec, methods
from camface.errors import ModelError
from camface.export import onnx_grad, onnx_model
from camface.export.onnx_builder import GraphBuilder
from camface.export.onnx_ops import OnnxTensor, ONNX_OPS

log = logging.getLogger(__name__)
GRADIENT = "camface/gradient_nhwc"  # the gradient tensor, for the self-check
# Names the CAM graph's contract uses; `onnx_model.rename` moves a model's own tensors aside.
RESERVED = (graph_spec.INPUT_IMAGE, graph_spec.INPUT_CLASS, graph_spec.OUTPUT_PROBS,
            graph_spec.OUTPUT_ACTIVATIONS, graph_spec.OUTPUT_SIMILARITY, *methods.METHODS, GRADIENT)


@dataclass(frozen=True)
class Built:
    """The CAM graph and what the self-check needs to look into it."""

    model: object  # onnx.ModelProto
    target: str  # the target tensor's name in the model
    layout: str  # the target's layout, NCHW or NHWC
    feature_size: tuple[int, int]
    heatmaps: tuple[str, ...]
    class_weights: np.ndarray | None  # [classes, K] when CAM is present
    cam_unavailable_reason: str


def gradient(classifier: onnx_model.Classifier, builder: GraphBuilder, target: str,
             seed: str, head_nodes: list | None = None) -> str:
    """Write d(sum(seed * logits)) / d target; returns the gradient tensor's name."""
    model = classifier.model
    nodes = head_nodes if head_nodes is not None else onnx_model.head(model, target,
                                                                      classifier.logits)
    for node in nodes:
        if node.op_type not in onnx_grad.RULES or (node.domain not in ("", "ai.onnx")):
            raise ModelError(f"no gradient rule for op {node.op_type} (node {node.name!r}) "
                             f"between target {target!r} and the logits; choose a later "
                             f"target layer (--target-layer) or an op from: "
                             f"{', '.join(sorted(onnx_grad.RULES))}")
    _check_not_cut_by_steps(nodes, target, classifier.logits)
    live = onnx_model.differentiable(model, target)
    _check_no_weights_from_target(model, nodes, target)
    context = onnx_grad.Context(builder, onnx_model.shapes(model), onnx_model.constants(model))
    pending: dict[str, list[str]] = {classifier.logits: [seed]}
    for node in reversed(nodes):
        grads = []
        for out in node.output:
            parts = pending.pop(out, [])
            grads.append(None if not parts else parts[0] if len(parts) == 1
                         else builder.op("Sum", parts))
        if all(g is None for g in grads):
            continue
        if node.op_type not in onnx_grad.EVERY_OUTPUT and any(g is not None for g in grads[1:]):
            later = next(o for o, g in zip(node.output[1:], grads[1:]) if g is not None)
            raise ModelError(f"node {node.name!r} ({node.op_type}): its output {later!r} lies "
                             "between the target and the logits, and only the first output of "
                             "this op has a gradient rule")
        carry = onnx_grad.DIFFERENTIABLE_INPUTS.get(node.op_type)
        results = onnx_grad.RULES[node.op_type](context, node, grads)
        for i, (x, g) in enumerate(zip(node.input, results)):
            if g is not None and x in live and (carry is None or i in carry):
                pending.setdefault(x, []).append(g)
    parts = pending.get(target, [])
    if not parts:
        raise ModelError(f"the gradient does not reach target {target!r}")
    return parts[0] if len(parts) == 1 else builder.op("Sum", parts)


def _check_no_weights_from_target(model, nodes: list, target: str) -> None:
    """ModelError naming the node where an input that carries no gradient (a convolution's
    weights, a norm's scale, onnx_grad.DIFFERENTIABLE_INPUTS) is computed from `target`: the
    gradient through it would be silently lost (a dynamic convolution, an adaptive norm)."""
    depends = onnx_model.differentiable(model, target, every_input=True)
    for node in nodes:
        carry = onnx_grad.DIFFERENTIABLE_INPUTS.get(node.op_type)
        for i, x in enumerate(node.input):
            if carry is not None and i not in carry and x in depends:
                raise ModelError(f"node {node.name!r} ({node.op_type}): its input {i} ({x!r}) "
                                 f"depends on target {target!r}, and the gradient rule of "
                                 f"{node.op_type} covers input(s) {', '.join(map(str, carry))} "
                                 "only; choose a later target layer (--target-layer)")


def _check_not_cut_by_steps(nodes: list, target: str, logits: str) -> None:
    """ModelError naming them when every path from `target` to `logits` through `nodes` (the
    head, in graph order) passes a step (onnx_grad.STEPS: Floor, Round ... whose slope is 0):
    the gradient would be 0 everywhere, every gradient map empty (the export offered Grad-CAM
    of zeros, `--method auto` showing it). A step on one path of several (torch's LPPool2d:
    sign(s) relu(|s|)) cuts nothing."""
    reached, steps = {target}, []
    for node in nodes:
        carry = onnx_grad.DIFFERENTIABLE_INPUTS.get(node.op_type)
        if not any(x in reached and (carry is None or i in carry) for i, x in enumerate(node.input)):
            continue
        if node.op_type in onnx_grad.STEPS:
            steps.append(f"{node.op_type} (node {node.name!r})")
        else:
            reached.update(o for o in node.output if o)
    if logits not in reached and steps:
        raise ModelError(f"the gradient at target {target!r} is 0 everywhere: every path from it to "
                         f"the logits passes a step whose slope is 0 ({', '.join(steps)}); choose a "
                         f"target layer after it (--target-layer)")


def used(nodes: list, outputs) -> list:
    """`nodes` (camface's own, in order) less those that no tensor in `outputs` depends on: the
    gradients the rules write for inputs that do not depend on the target (a linear layer's
    weights: A^T g, the size of its input again) are left out, so ONNX Runtime does not run them."""
    needed, kept = set(outputs) | {graph_spec.OUTPUT_PROBS}, []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]


def build(classifier: onnx_model.Classifier, target: str, scale, offset,
          heads: tuple[str, ...] | None = None) -> Built:
    """The CAM graph of `classifier` at `target` (a 4-D tensor name). scale/offset: per channel
    of the uint8 input. heads: registry methods to include (None: all the head allows)."""
    import onnx
    from onnx import TensorProto, helper

    source = classifier.model
    model = onnx.ModelProto()
    model.CopyFrom(source)
    graph = model.graph
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer} | \
        {v.name for v in graph.input}
    clash = taken & set(RESERVED)
    if clash:  # onnx_export.build renames them first (onnx_model.rename)
        raise ModelError(f"the model already has tensors named {sorted(clash)}, which the CAM "
                         "graph's contract uses (rename them with onnx_model.rename)")
    # node names must be unique too (a CAM graph's own nodes, rebuilt by the sanity check, are camface/...)
    b = GraphBuilder(classifier.opset, taken=taken | {n.name for n in graph.node})
    layout = onnx_model.target_layout(source, target, onnx_model.spatial_maps(classifier))
    h, w, k = onnx_model.feature_dims(classifier, target, layout)  # k: the target's channels
    feature_size = (h, w)
    head_nodes = onnx_model.head(source, target, classifier.logits)

    # image uint8 [N, H, W, C] -> the model's float input
    height, width = classifier.input_size
    x = b.op("Cast", [graph_spec.INPUT_IMAGE], to=TensorProto.FLOAT)
    x = b.op("Add", [b.op("Mul", [x, b.const(np.asarray(scale, np.float32))]),
                     b.const(np.asarray(offset, np.float32))])
    if classifier.input_layout == "NCHW":
        b.op("Transpose", [x], outputs=[classifier.input_name], perm=[0, 3, 1, 2])
    else:
        b.op("Identity", [x], outputs=[classifier.input_name])
    pre_nodes, b.nodes = b.nodes, []

    logits = classifier.logits
    # the model's own probabilities (Softmax or Sigmoid), else the softmax of its logits
    probs = classifier.output_name if classifier.final_activation in ("Softmax", "Sigmoid") \
        else b.op("Softmax", [logits], axis=-1)
    predicted = b.op("ArgMax", [logits], axis=-1, keepdims=0)
    chosen = b.op("Where", [b.op("Less", [graph_spec.INPUT_CLASS, b.const(0, np.int64)]),
                            predicted, graph_spec.INPUT_CLASS])
    # the methods that run the model again are added to the finished graph (onnx_rerun)
    wanted = [methods.get(h) for h in (methods.names() if heads is None else heads)
              if h in methods.METHODS and not methods.get(h).reruns]
    weights, why_no_cam = onnx_model.cam_weights(classifier, target, head_nodes)
    if weights is None:
        wanted = [m for m in wanted if methods.CLASS_WEIGHTS not in m.needs]
    elif not any(methods.CLASS_WEIGHTS in m.needs for m in wanted):
        why_no_cam, weights = "not exported (heads)", None

    to_nhwc = (lambda t, name=None: b.op("Transpose", [t], outputs=[name] if name else 1,
                                         perm=[0, 2, 3, 1])) if layout == "NCHW" else \
        (lambda t, name=None: b.op("Identity", [t], outputs=[name] if name else 1))
    activations = to_nhwc(target, graph_spec.OUTPUT_ACTIVATIONS)
    grad_nhwc = class_w = None
    if any(methods.GRADIENTS in m.needs for m in wanted):
        written = len(b.nodes)
        seed = b.op("OneHot", [chosen, b.const(classifier.num_classes, np.int64),
                               b.const([0.0, 1.0])], axis=-1)
        try:
            grad = gradient(classifier, b, target, seed, head_nodes)
        except ModelError as exc:
            if heads is not None:  # asked for by name: the reason stands
                raise
            # the gradient-free methods still explain it
            gradient_free = [m.name for m in wanted if methods.GRADIENTS not in m.needs]
            log.warning("no gradient methods (%s); exporting %s and the gradient-free methods",
                        exc, ", ".join(gradient_free) or "none of the others")
            wanted = [m for m in wanted if methods.GRADIENTS not in m.needs]
            del b.nodes[written:]  # unused initializers it wrote do no harm
        else:
            grad_nhwc = to_nhwc(grad, GRADIENT)
    if weights is not None:
        rows = b.op("Gather", [b.const(weights), chosen], axis=0)  # [N, K]
        class_w = OnnxTensor(b, b.unsqueeze(rows, [1, 2]))
    a = OnnxTensor(b, activations, shape=(None, *feature_size, k))  # the Eigen methods read a.shape
    g = None if grad_nhwc is None else OnnxTensor(b, grad_nhwc)
    outputs = {graph_spec.OUTPUT_PROBS: probs, graph_spec.OUTPUT_ACTIVATIONS: activations}
    for method in wanted:
        heatmap = method.compute(ONNX_OPS, a, g, class_w)
        outputs[method.name] = b.op("Identity", [heatmap.name], outputs=[method.name])
    if outputs[graph_spec.OUTPUT_PROBS] != graph_spec.OUTPUT_PROBS:
        b.op("Identity", [probs], outputs=[graph_spec.OUTPUT_PROBS])

    for node in graph.node:  # torch's stack traces name files on the exporting machine
        kept = [p for p in node.metadata_props if p.key == onnx_model.NAME_SCOPES]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    nodes = pre_nodes + list(graph.node) + used(b.nodes, {*outputs, *outputs.values()})
    del graph.node[:]
    graph.node.extend(nodes)
    read = {x for node in nodes for x in node.input}
    graph.initializer.extend(i for i in b.initializers if i.name in read)
    del graph.input[:]
    del graph.output[:]
    del graph.value_info[:]
    channels = classifier.channels
    graph.input.extend([
        helper.make_tensor_value_info(graph_spec.INPUT_IMAGE, TensorProto.UINT8,
                                      ["N", height, width, channels]),
        helper.make_tensor_value_info(graph_spec.INPUT_CLASS, TensorProto.INT64, ["N"])])
    out_shapes = {graph_spec.OUTPUT_PROBS: ["N", classifier.num_classes],
                  graph_spec.OUTPUT_ACTIVATIONS: ["N", *feature_size, k]}
    graph.output.extend(helper.make_tensor_value_info(
        name, TensorProto.FLOAT, out_shapes.get(name, ["N", *feature_size])) for name in outputs)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:  # an op the model's opset deprecates (ONNX
        # Runtime still runs GroupNormalization-18, the checker refuses it): one line, no traceback
        raise ModelError(f"ONNX's checker refuses the model's nodes in the CAM graph "
                         f"({' '.join(str(exc).split())}); re-export the model (a deprecated op: "
                         "at an opset that replaces it)") from exc
    model = onnx_model.prepare(model, where="the CAM graph")
    return Built(model, target, layout, feature_size, tuple(m.name for m in wanted),
                 weights, "" if weights is not None else why_no_cam)
