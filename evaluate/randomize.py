"""Cascading model-parameter randomisation of a CAM graph (Adebayo et al., "Sanity checks for
saliency maps", NeurIPS 2018, arXiv:1810.03292, sec. 3.1), on the graph's own weights.

A CAM graph holds the model's forward pass (image -> target activations -> logits -> probs) and,
beside it, the explanation: the in-graph backward pass and the heatmaps. The backward pass uses
the weights too, and an exporter may have folded them into copies there (tf2onnx does: transposed
and batch-norm-unfolded constants), so re-drawing initializers in place would leave the gradient
describing the old model. So `Randomizer` cuts the forward pass out of the graph
(`forward_model`: the nodes that `probs` and the target depend on, from the normalised input on,
the graph's normalisation written again in front of them), re-draws its weights, and writes the explanation again with camface's ONNX engine
(`camface.export.onnx_cam.build`, the gradient rules of `camface export model.onnx`, and
Ablation-CAM / Score-CAM re-running the re-drawn head or model: `onnx_rerun`). Before any
weight is touched the rebuilt graph gives the original graph's outputs (to float rounding; a test
checks it), so every change a step shows comes from the weights it re-drew.

Weights: the learned parameters of the forward pass's layers, held as initializers: the weight
and bias inputs of Conv, ConvTranspose, Gemm and MatMul, the scale and bias of
BatchNormalization, InstanceNormalization and LayerNormalization (a BatchNormalization's running
mean and variance are kept: a drawn variance could be negative), PRelu's slope, and the
initializer operand of an Add, Mul, Sub or Div that follows such a layer through elementwise and
layout ops (a bias, or batch normalisation folded into Mul and Add). A layer is that anchor op
with the parameters that follow it (tf2onnx's Dense is MatMul + Add: one layer). Constants with
fewer than 2 distinct values, input normalisation (no layer before it) and shape inputs (Resize
scales) are not weights. A weight shared by two layers belongs to the later one. Order: by the
anchor's position in the forward pass, from the logits down. Steps (cumulative, as the paper's
cascade): "logits" (the last layer), "head" (the other layers after the target, when any), then
the layers before the target in `FEATURE_STEPS` groups of about equal size, the last ("all")
reaching the input. Each tensor's new values are drawn once (`redraw`), from a normal
distribution with the tensor's own mean and standard deviation, seeded by (seed, the tensor's
position in the cascade: its index in the last step's weights, from the logits down, in graph
order within a layer): a tensor has the same new values in every step that includes it, equal
seeds give equal graphs, and a re-export of the same model gets the same draw (exporters name
initializers afresh on every export: tf2onnx's `functional_1/...` becomes `functional_2_1/...`,
its `const_fold_opt__964` another number; a draw keyed by the name was another draw). float16 and int8 graphs are refused: their weights are not float32 initializers.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from camface import graph_spec, methods
from camface.errors import ModelError
from camface.realtime.graph import upstream

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


def forward_model(cam):
    """(forward ModelProto, target tensor name, scale, offset) of a CAM graph `cam`
    (onnx.ModelProto). forward: the nodes and initializers that `probs` and the target depend on,
    from the model's normalised input on; its one input is that float32 [N, H, W, C] tensor (what
    the graph's normalisation of its uint8 `image` gives: Cast, then Mul / Add / Sub / Div by
    constants, `onnx_rerun.normalising`), its one output the model's probabilities. scale, offset:
    float32 per channel, that normalisation as x * scale + offset, which the rebuilt graph applies
    as the graph does, so that Score-CAM masks the same normalised input. Raises ModelError for a
    graph without those outputs or whose normalisation camface cannot read."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    from camface.export import onnx_model, onnx_rerun

    graph = cam.graph
    outputs = {o.name for o in graph.output}
    missing = {graph_spec.OUTPUT_PROBS, graph_spec.OUTPUT_ACTIVATIONS} - outputs
    if missing:
        raise ModelError(f"not a CAM graph: no {', '.join(sorted(missing))} output")
    values = onnx_model.constants(cam)
    chain = onnx_rerun.normalising(graph, values)
    if not chain or chain[0].op_type != "Cast":
        raise ModelError("the CAM graph's image is not cast to float where camface can find it")
    dims = next(v for v in graph.input if v.name == graph_spec.INPUT_IMAGE).type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    scale, offset = _affine(chain, values, shape[-1])
    producer = {o: n for n in graph.node for o in n.output}
    target = _target(graph, producer)
    keep = upstream(producer, [graph_spec.OUTPUT_PROBS, target])
    normalised, probs = chain[-1].output[0], f"{_SANITY}/probs"
    nodes = []
    for node in graph.node:
        if any(o in keep for o in node.output) and all(node is not n for n in chain):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.output[:] = [probs if x == graph_spec.OUTPUT_PROBS else x for x in copy.output]
            nodes.append(copy)
    read = {x for n in nodes for x in n.input}
    forward = helper.make_graph(
        nodes, "forward", [helper.make_tensor_value_info(normalised, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(probs, TensorProto.FLOAT, None)],
        initializer=[i for i in graph.initializer if i.name in keep and i.name in read])
    model = helper.make_model(forward, opset_imports=cam.opset_import)
    model.ir_version = cam.ir_version
    return model, target, scale, offset


def _affine(chain, values: dict, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), float32 [channels]: the normalisation nodes `chain` (Cast, then Mul / Add /
    Sub / Div of the running tensor and a constant) as x * scale + offset."""
    scale, offset = np.ones(channels), np.zeros(channels)
    tensor = chain[0].output[0]
    for node in chain[1:]:
        if node.op_type != "Cast":
            first = node.input[0] == tensor
            constant = np.asarray(values[node.input[1] if first else node.input[0]], np.float64)
            if constant.size not in (1, channels) or (constant.size > 1 and constant.shape[-1] != channels):
                raise ModelError(f"the CAM graph's normalisation node {node.name!r} ({node.op_type}) reads a "
                                 f"constant of shape {list(constant.shape)}, not one value per channel")
            c = np.broadcast_to(constant.reshape(-1), (channels,))
            if node.op_type == "Mul":
                scale, offset = scale * c, offset * c
            elif node.op_type == "Add":
                offset = offset + c
            elif node.op_type == "Sub":
                scale, offset = (scale, offset - c) if first else (-scale, c - offset)
            elif first:  # Div
                scale, offset = scale / c, offset / c
            else:
                raise ModelError(f"the CAM graph's normalisation node {node.name!r} divides by the image")
        tensor = node.output[0]
    return scale.astype(np.float32), offset.astype(np.float32)


ANCHORS = LINEAR + ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "PRelu")
# op -> input positions that hold learned parameters
PARAMETERS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
              "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
              "PRelu": (1,), "Add": (0, 1), "Mul": (0, 1), "Sub": (0, 1), "Div": (1,)}
# ops a bias or folded scale may follow its layer through
_THROUGH = ("Add", "Mul", "Sub", "Div", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish",
            "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast")


def weight_layers(forward, target: str) -> tuple[list[list[str]], list[list[str]]]:
    """(head, features): the weight initializers of `forward` grouped by layer (see the module
    docstring), each list from the logits down; head: the layers after the target."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in forward.graph.initializer}
    nodes = list(forward.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    position = {id(n): i for i, n in enumerate(nodes)}
    constants = {n.output[0]: n for n in nodes if n.op_type == "Constant"}
    for node in nodes:
        if node.op_type in LINEAR:
            held = [x for x in node.input[1:] if x in constants]
            if held:
                raise ModelError(f"the CAM graph's {node.op_type} node {node.name!r} reads its weights from "
                                 f"Constant node(s) {held}, not initializers: the sanity check re-draws "
                                 "initializers; export the model so that its weights are initializers")
    before_target = upstream(producer, [target])
    groups: dict[int, list[str]] = {}
    seen: set[str] = set()
    for node in reversed(nodes):
        slots = PARAMETERS.get(node.op_type, ())
        names = [x for i, x in enumerate(node.input) if i in slots and x in values and x not in seen
                 and _is_weight(values[x])]
        anchor = _anchor(node, producer, values) if names else None
        if anchor is not None:
            seen.update(names)
            groups.setdefault(position[id(anchor)], []).extend(names)
    if not groups:
        raise ModelError("the CAM graph's forward pass has no weights held as initializers (no Conv, "
                         "Gemm or MatMul reads one): the sanity check re-draws initializers")
    head, features = [], []
    for index in sorted(groups, reverse=True):
        after = not any(o in before_target for o in nodes[index].output)
        (head if after else features).append(groups[index])
    return head, features


def _anchor(node, producer, values):
    """The layer op that `node`'s parameters belong to: `node` itself when it is one, else the
    nearest one its data input comes from through `_THROUGH` ops; None for none (input
    normalisation)."""
    seen = 0
    while node is not None and seen < 64:
        if node.op_type in ANCHORS:
            return node
        if node.op_type not in _THROUGH:
            return None
        data = [x for x in node.input if x and x not in values]
        node = producer.get(data[0]) if data else None
        seen += 1
    return None


def _is_weight(value: np.ndarray) -> bool:
    return value.dtype.kind == "f" and value.size >= 2 and float(np.ptp(value)) > 0


def cascade(head: list, features: list, feature_steps: int = FEATURE_STEPS) -> list[Step]:
    """The cumulative steps over layers (each a list of weight names, from the logits down):
    `head` after the target, `features` before it."""
    steps, done = [], []

    def add(name, group):
        done.extend(x for layer in group for x in layer)
        steps.append(Step(name, tuple(done)))

    layers = head + features
    add("logits", layers[:1])
    if len(head) > 1:
        add("head", head[1:])
    rest = features if head else features[1:]
    count = min(feature_steps, len(rest))
    bounds = np.linspace(0, len(rest), count + 1).round().astype(int)
    for i in range(count):
        add(f"features {i + 1}/{count}" if i + 1 < count else "all", rest[bounds[i]:bounds[i + 1]])
    return steps


def redraw(value: np.ndarray, seed: int, key: str) -> np.ndarray:
    """`value` drawn again: normal, with its own mean and standard deviation, seeded by (seed, key)."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return rng.normal(value.mean(), value.std(), value.shape).astype(value.dtype)


class Randomizer:
    """Cascading randomisation of one float32 CAM graph (onnx.ModelProto). `steps`: the cascade;
    `graph(step)`: the CAM graph with that step's weights re-drawn (None: none), `seed` fixing
    every draw. Raises ModelError for a graph it cannot randomise (float16, int8, weights in
    Constant nodes, a forward pass camface's ONNX engine cannot differentiate)."""

    def __init__(self, cam, seed: int = 0, feature_steps: int = FEATURE_STEPS):
        from onnx import numpy_helper

        from camface.export import onnx_model

        _refuse_reduced_precision(cam)
        self.cam = cam
        forward, self.target, self._scale, self._offset = forward_model(cam)
        where = "the CAM graph's forward pass"
        self._classifier = onnx_model.settle_shapes(onnx_model.describe(onnx_model.prepare(forward, where), where))
        self.forward = self._classifier.model
        head, features = weight_layers(self.forward, self.target)
        self.steps = cascade(head, features, feature_steps)
        self.feature_steps = feature_steps  # the guided cascade (`sanity_guided`) groups its features alike
        self.seed = int(seed)
        self._values = {i.name: numpy_helper.to_array(i) for i in self.forward.graph.initializer}
        self._position = {name: i for i, name in enumerate(self.steps[-1].weights)}

    def redrawn(self, name: str) -> np.ndarray:
        """Initializer `name` drawn again (`redraw`, keyed by its position in the cascade, not by
        its name, which the exporter chose)."""
        return redraw(self._values[name], self.seed, f"cascade/{self._position[name]}")

    def graph(self, step: Step | None = None):
        """The CAM graph (every heatmap the head allows, no metadata) with `step`'s weights re-drawn."""
        import dataclasses

        onnx = _onnx()
        from onnx import numpy_helper

        from camface.export import onnx_cam, onnx_rerun

        model = onnx.ModelProto()
        model.CopyFrom(self.forward)
        chosen = set(step.weights) if step is not None else set()
        for init in model.graph.initializer:
            if init.name in chosen:
                init.CopyFrom(numpy_helper.from_array(self.redrawn(init.name), init.name))
        classifier = dataclasses.replace(self._classifier, model=model)
        built = onnx_cam.build(classifier, self.target, self._scale, self._offset).model
        try:  # Ablation-CAM and Score-CAM: the re-drawn head or model run again (onnx_rerun)
            return onnx_rerun.add(built, methods.names())
        except ModelError:  # too large for them: the sanity check then names what is missing
            return built


def load_graph(path):
    """onnx.ModelProto of a CAM graph file; ModelError naming the file when it cannot be read."""
    from pathlib import Path

    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types for a file that is not ONNX
        raise ModelError(f"{path}: not a loadable ONNX model ({exc})") from exc


def _refuse_reduced_precision(cam) -> None:
    from onnx import TensorProto

    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv") for n in cam.graph.node):
        raise ModelError("this is an int8 CAM graph: the sanity check re-draws float32 weights; run it on "
                         "the float32 graph it was quantized from")
    if any(i.data_type == TensorProto.FLOAT16 for i in cam.graph.initializer):
        raise ModelError("this is a float16 CAM graph: the sanity check re-draws float32 weights; run it "
                         "on a float32 export of the model")
