"""Cascading model-parameter randomisation of a CAM graph (Adebayo et al., "Sanity checks for
saliency maps", NeurIPS 2018, arXiv:1810.03292, sec. 3.1), on the graph's own weights.

A CAM graph holds the model's forward pass (image -> target activations -> logits -> probs) and,
beside it, the explanation: the in-graph backward pass and the heatmaps. The backward pass uses
the weights too, and an exporter may have folded them into copies there (tf2onnx does: transposed
and batch-norm-unfolded constants), so re-drawing initializers in place would leave the gradient
describing the old model. So `Randomizer` cuts the forward pass out of the graph
(`forward_model`: the nodes that `probs` and the target depend on, the uint8 input kept as it
is), re-draws its weights, and writes the explanation again with camface's ONNX engine
(`camface.export.onnx_cam.build`, the gradient rules of `camface export model.onnx`). Before any
weight is touched the rebuilt graph gives the original graph's outputs (to float rounding; a test
checks it), so every change a step shows comes from the weights it re-drew.

Weights: the forward pass's float initializers with at least 2 distinct values, each consumed by
a node after the first linear layer (Conv, ConvTranspose, Gemm, MatMul) or by that layer itself,
so input normalisation constants are not weights. Order: by their consumer's position in the
forward pass, from the logits down. Steps (cumulative, as the paper's cascade): "logits" (the
last weight layer), "head" (the other layers between the target and the logits, when any), then
the layers before the target in `FEATURE_STEPS` groups of about equal size, the last reaching the
input. Each tensor's new values are drawn once, from a normal distribution with the tensor's own
mean and standard deviation, seeded by (seed, tensor name): a tensor has the same new values in
every step that includes it, and equal seeds give equal graphs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from camface import graph_spec
from camface.errors import ModelError

FEATURE_STEPS = 6
LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_SANITY = "camface/sanity"


@dataclass(frozen=True)
class Step:
    """One cascade step: its name and every weight it re-draws (ONNX initializers, or Keras
    layers in `sanity_guided`), those of the earlier steps included, in the order they were added."""

    name: str
    weights: tuple[str, ...]


def _onnx():
    try:
        import onnx

        return onnx
    except ImportError as exc:
        raise ModelError("the sanity check rebuilds the CAM graph and needs the onnx package "
                         "(pip install 'camface[keras]' or 'camface[torch]')") from exc


def _target(graph, producer) -> str:
    """The target tensor: `activations` followed back through Identity / Transpose."""
    tensor = graph_spec.OUTPUT_ACTIVATIONS
    while tensor in producer and producer[tensor].op_type in ("Identity", "Transpose"):
        tensor = producer[tensor].input[0]
    return tensor


def _ancestors(outputs, producer) -> set[str]:
    seen, stack = set(), list(outputs)
    while stack:
        tensor = stack.pop()
        if tensor not in seen:
            seen.add(tensor)
            if tensor in producer:
                stack.extend(producer[tensor].input)
    return seen


def forward_model(cam):
    """(forward ModelProto, target tensor name) of a CAM graph `cam` (onnx.ModelProto): the nodes
    and initializers that `probs` and the target depend on; its one input is float32
    `camface/sanity/pixels` [N, H, W, C] (0..255, cast to the uint8 `image` the nodes read) and its
    one output the model's probabilities. Raises ModelError for a graph without those outputs."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    graph = cam.graph
    outputs = {o.name for o in graph.output}
    missing = {graph_spec.OUTPUT_PROBS, graph_spec.OUTPUT_ACTIVATIONS} - outputs
    if missing:
        raise ModelError(f"not a CAM graph: no {', '.join(sorted(missing))} output")
    producer = {o: n for n in graph.node for o in n.output}
    target = _target(graph, producer)
    keep = _ancestors([graph_spec.OUTPUT_PROBS, target], producer)
    pixels, image, probs = f"{_SANITY}/pixels", f"{_SANITY}/image", f"{_SANITY}/probs"
    rename = {graph_spec.INPUT_IMAGE: image, graph_spec.OUTPUT_PROBS: probs}
    nodes = [helper.make_node("Cast", [pixels], [image], to=TensorProto.UINT8)]
    for node in graph.node:
        if any(o in keep for o in node.output):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = [rename.get(x, x) for x in copy.input]
            copy.output[:] = [rename.get(x, x) for x in copy.output]
            nodes.append(copy)
    dims = next(v for v in graph.input if v.name == graph_spec.INPUT_IMAGE).type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    forward = helper.make_graph(
        nodes, "forward", [helper.make_tensor_value_info(pixels, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(probs, TensorProto.FLOAT, None)],
        initializer=[i for i in graph.initializer if i.name in keep])
    model = helper.make_model(forward, opset_imports=cam.opset_import)
    model.ir_version = cam.ir_version
    return model, target


def weight_layers(forward, target: str) -> tuple[list[list[str]], int]:
    """(layers, head): the weight initializers of `forward` grouped by consuming node, from the
    logits down (see the module docstring); the first `head` layers lie between the target and
    the logits."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in forward.graph.initializer}
    nodes = list(forward.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    before_target = _ancestors([target], producer)
    first_linear = next((i for i, n in enumerate(nodes) if n.op_type in LINEAR
                         and any(x in values for x in n.input)), None)
    if first_linear is None:
        raise ModelError("the CAM graph's forward pass has no weights held as initializers (no Conv, "
                         "Gemm or MatMul reads one): the sanity check re-draws initializers; export the "
                         "model so that its weights are initializers (not Constant nodes)")
    after_linear = _descendants(nodes, first_linear)
    layers, head, seen = [], 0, set()
    for index in reversed(range(len(nodes))):
        node = nodes[index]
        if index != first_linear and id(node) not in after_linear:
            continue
        names = [x for x in node.input if x in values and x not in seen and _is_weight(values[x])]
        if names:
            seen.update(names)
            layers.append(names)
            head += not any(o in before_target for o in node.output)
    return layers, head


def _descendants(nodes, start: int) -> set[int]:
    reached = set(nodes[start].output)
    found = set()
    for node in nodes[start + 1:]:
        if any(x in reached for x in node.input):
            found.add(id(node))
            reached.update(node.output)
    return found


def _is_weight(value: np.ndarray) -> bool:
    return value.dtype.kind == "f" and value.size >= 2 and float(np.ptp(value)) > 0


def cascade(layers: list[list[str]], head: int, feature_steps: int = FEATURE_STEPS) -> list[Step]:
    """The cumulative steps over `layers` (from the logits down; the first `head` of them after the
    target)."""
    steps, done = [], []

    def add(name, group):
        done.extend(x for layer in group for x in layer)
        steps.append(Step(name, tuple(done)))

    add("logits", layers[:1])
    if head > 1:
        add("head", layers[1:head])
    features = layers[max(head, 1):]
    count = min(feature_steps, len(features))
    bounds = np.linspace(0, len(features), count + 1).round().astype(int)
    for i in range(count):
        add(f"features {i + 1}/{count}" if i + 1 < count else "all", features[bounds[i]:bounds[i + 1]])
    return steps


class Randomizer:
    """Cascading randomisation of one CAM graph. `steps`: the cascade; `graph(step)` -> the CAM
    graph (onnx.ModelProto, every heatmap the head allows) with that step's weights re-drawn
    (None: none re-drawn), `seed` fixing every draw."""

    def __init__(self, cam, seed: int = 0, feature_steps: int = FEATURE_STEPS):
        from onnx import numpy_helper

        self.forward, self.target = forward_model(cam)
        layers, head = weight_layers(self.forward, self.target)
        self.steps = cascade(layers, head, feature_steps)
        self.seed = int(seed)
        self._values = {i.name: numpy_helper.to_array(i) for i in self.forward.graph.initializer}

    def redrawn(self, name: str) -> np.ndarray:
        """Initializer `name` drawn again: normal, its own mean and standard deviation, seeded
        by (seed, name)."""
        value = self._values[name]
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        return rng.normal(value.mean(), value.std(), value.shape).astype(value.dtype)

    def graph(self, step: Step | None = None):
        onnx = _onnx()
        from onnx import numpy_helper

        from camface.export import onnx_cam, onnx_model

        model = onnx.ModelProto()
        model.CopyFrom(self.forward)
        if step is not None:
            chosen = set(step.weights)
            for init in model.graph.initializer:
                if init.name in chosen:
                    init.CopyFrom(numpy_helper.from_array(self.redrawn(init.name), init.name))
        classifier = onnx_model.describe(onnx_model.prepare(model, where="the CAM graph's forward pass"),
                                         where="the CAM graph's forward pass")
        return onnx_cam.build(classifier, self.target, np.ones(1, np.float32), np.zeros(1, np.float32)).model
