"""Read a forward-only ONNX classifier: its image input, its logits, its target tensor and the
head between them (the nodes the in-graph gradient differentiates), and CAM's class weights.

Every node lies on the graph as written (local functions inlined first); shapes come from
`onnx.shape_inference`. A PyTorch module name (`layer4`) names a tensor through the node
metadata `pkg.torch.onnx.name_scopes` that torch.onnx's dynamo exporter writes: the module's
output is the last tensor written inside the module and read outside it.

A vision transformer's target is tokens [N, T, C] (`default_token_target`; tokens [T, N, C] are
transposed to [N, T, C] first by `batch_first`): `token_grid` finds
how they lie on the image, `with_token_grid` lays the patches out as an NHWC map that the model
reads back through, and that map is then a target like any spatial map.
"""

from __future__ import annotations

import ast
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camface.errors import ModelError
from camface.outputs import check_model_file

log = logging.getLogger(__name__)

FLOAT = 1  # onnx.TensorProto.FLOAT
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
TOKEN_GRID = "camface.token_grid"  # marks the Reshape that `with_token_grid` lays tokens out by
_POOLS = ("GlobalAveragePool", "GlobalMaxPool")
_FINAL = ("Softmax", "Sigmoid", "LogSoftmax")  # their input is the logits
_SPATIAL_REDUCE = ("ReduceMean", "ReduceMax")
# Ops CAM may look through between the pooling and the linear layer.
_PASS_THROUGH = ("Identity", "Dropout", "Flatten", "Reshape", "Squeeze")
# Ops that pool what they get: after the final activation, they pass probabilities only when
# they pool a 1x1 map (squeeze it).
_POOLING = _POOLS + ("AveragePool", "MaxPool", "ReduceMean", "ReduceMax")
# Ops after the final activation that pass the probabilities as they are when the Cast is to
# float32 (of float32), the Unsqueeze adds an axis after the batch and the Transpose moves only
# axes of size 1 (`_tail_refusal` checks)
_AFTER_FINAL = ("Cast", "Unsqueeze", "Transpose")



class AttentionBeforeLogits(ModelError):
    """The default target: every spatial map reaches the logits only through attention (a vision
    transformer); the exporter then looks for a token target instead."""

@dataclass(frozen=True)
class Classifier:
    """A loaded classifier. input_layout: NCHW or NHWC; logits: the pre-softmax tensor [N, classes];
    final_activation: the op that turns the logits into the model's output (Softmax, Sigmoid,
    LogSoftmax), or "" when the output is the logits."""

    model: object  # onnx.ModelProto, functions inlined, shapes inferred
    input_name: str
    input_layout: str
    input_size: tuple[int, int]
    channels: int
    output_name: str
    logits: str
    final_activation: str
    num_classes: int

    @property
    def opset(self) -> int:
        return next(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx"))


def load(path: str | Path):
    """onnx.ModelProto of `path` with local functions inlined and shapes inferred."""
    import onnx

    path = Path(path)
    check_model_file(path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types for a file that is not ONNX
        raise ModelError(f"{path}: not a loadable ONNX model ({exc})") from exc
    if not model.HasField("graph"):  # an empty file parses: "needs one output (it has [])", "opset 0"
        raise ModelError(f"{path}: not an ONNX model (no graph)")
    check_not_a_cam_graph(model, path)
    check_runtime_reads(model, where=path)
    return prepare(model, where=path)


def check_not_a_cam_graph(model, path) -> None:
    """ModelError when `model` is a CAM graph already (camface's inputs, and its metadata or its
    `probs` output): exporting it again said that the tensors were renamed `model/...`, then that
    it has two inputs and a dozen outputs. `path`: the file, or how a model in memory is named."""
    from camface import graph_spec

    metadata = {p.key: p.value for p in model.metadata_props}
    inputs, outputs = {i.name for i in model.graph.input}, {o.name for o in model.graph.output}
    if {graph_spec.INPUT_IMAGE, graph_spec.INPUT_CLASS} <= inputs and \
            (graph_spec.META_HEATMAPS in metadata or graph_spec.OUTPUT_PROBS in outputs):
        made_from = metadata.get(graph_spec.META_SOURCE_MODEL)
        gallery = graph_spec.META_GALLERY in metadata
        raise ModelError(f"{path} is a CAM graph already (made by camface {'enroll' if gallery else 'export'}"
                         + (f" from {made_from}" if made_from else "") + f"): `camface live --model {path}` runs it "
                         f"and `camface info {path}` shows it; "
                         + ("give the face embedder it was enrolled from (the ONNX model of `camface enroll "
                            "--model`)" if gallery else "export the classifier it was made from to make another"))


def check_runtime_reads(model, where: object = "model") -> None:
    """Raise ModelError, naming the numbers, when ONNX Runtime refuses `model`'s IR version or
    opset: onnx's own defaults can be newer than what the pinned ONNX Runtime reads (onnx 1.23's
    make_model writes IR 14, opset 28; ONNX Runtime 1.31 reads IR 13, opset 26), and the refusal
    came as a traceback from deep inside the self-check. Probed on a one-node model with the same
    stamps, so a big model is not compiled twice; any other refusal is left to the real sessions."""
    import re

    import onnxruntime as ort
    from onnx import TensorProto, helper

    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=opsets or [helper.make_opsetid("", 17)])
    probe.ir_version = model.ir_version
    try:
        ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime's own exception types
        text = str(exc)
        ir = re.search(r"max supported IR version: (\d+)", text)
        if ir:
            raise ModelError(f"{where}: IR version {model.ir_version}, and ONNX Runtime {ort.__version__} reads up to "
                             f"{ir.group(1)}: save it with model.ir_version = {ir.group(1)} (onnx) or export it "
                             "with an older onnx") from exc
        opset = re.search(r"ai\.onnx is till opset (\d+)", text)
        if opset and opsets:
            raise ModelError(f"{where}: opset {opsets[0].version}, and ONNX Runtime {ort.__version__} runs up to "
                             f"opset {opset.group(1)}: convert it with onnx.version_converter.convert_version(model, "
                             f"{opset.group(1)}) or export it at that opset") from exc
        log.debug("%s: the IR/opset probe failed (%s); the self-check will say if the model runs", where, exc)


# Ops whose output is shaped like their first input but whose shape ONNX's inference leaves
# unknown (GroupNormalization: a function whose body depends on its attributes;
# MeanVarianceNormalization: a function with no inference of its own), with every tensor after
# them: their output is given the input's type, and shapes are inferred again.
_SAME_SHAPE_UNINFERRED = ("GroupNormalization", "MeanVarianceNormalization")


def prepare(model, where: object = "model"):
    """Inline local functions and infer shapes (data propagation on, for Reshape targets); an
    If whose condition the shapes decide is replaced by its branch (`onnx_fold`), a pool whose
    ceil_mode window ONNX Runtime drops set to ceil_mode 0 (`onnx_ceil`), a piece of a
    SplitToSequence read by a Slice (`onnx_sequences`); small computations on constants
    (axes, shapes) folded into Constants first, and a weight's Transpose / Cast into the weight
    (`onnx_fold.weight_layouts_folded`)."""
    from onnx import inliner, shape_inference

    if model.functions:
        model = inliner.inline_local_functions(model)
    from camface.export import onnx_ceil
    from camface.export.onnx_fold import fold_static_branches, weight_layouts_folded
    from camface.export.onnx_sequences import sequences_as_slices

    model = _small_constants_folded(weight_layouts_folded(model))
    model = sequences_as_slices(model, constants(model))
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
        while _shape_like_input(inferred) or fold_static_branches(inferred, constants(inferred)):
            inferred = shape_inference.infer_shapes(inferred, data_prop=True)
    except Exception as exc:
        raise ModelError(f"{where}: ONNX shape inference fails ({exc})") from exc
    # inferred again from the model before inference: the shapes inferred with the dropped
    # windows stay in the graph's outputs otherwise. Each pass sets ceil_mode 0 on at least one
    # pool, so the passes end (one that changed nothing, a pool it did not find, repeated itself)
    dropped = onnx_ceil.dropped_windows(inferred, shapes(inferred))
    floored, changed = onnx_ceil.floored(model, dropped) if dropped else (model, 0)
    return prepare(floored, where) if changed else inferred


def _shape_like_input(model) -> bool:
    """Give the outputs of `_SAME_SHAPE_UNINFERRED` ops that have no type their input's (in
    place); whether any was given."""
    graph = model.graph
    known = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]
             if v.type.tensor_type.HasField("shape")}
    given = False
    for node in graph.node:
        out = node.output[0] if node.output else ""
        if node.op_type in _SAME_SHAPE_UNINFERRED and out and out not in known and \
                node.input[0] in known:
            value = graph.value_info.add()
            value.CopyFrom(known[node.input[0]])
            value.name = out
            known[out] = value
            given = True
    return given


def name_nodes(model) -> None:
    """Name every unnamed node of `model` (in place) `<op>:<its first output>`, so that errors
    and logs can name it (ONNX leaves node names optional; a refusal said "node ''")."""
    taken = {n.name for n in model.graph.node}
    for node in model.graph.node:
        if not node.name and node.output:
            name = f"{node.op_type}:{node.output[0]}"
            node.name = name if name not in taken else f"{name}#{len(taken)}"
            taken.add(node.name)


def rename(model, reserved) -> tuple[object, dict[str, str]]:
    """A copy of `model` in which every tensor named in `reserved` (the CAM graph's own names:
    `probs`, `image`, ...) is called `model/<name>` instead, everywhere it appears (nodes and
    their subgraphs, graph inputs and outputs, initializers, value_info); and the old -> new
    names. The model itself is returned when nothing clashes."""
    import onnx

    def names(graph):
        found = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
        found |= {i.name for i in graph.initializer}
        for node in graph.node:
            found.update(node.input)
            found.update(node.output)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    found |= names(sub)
        return found

    taken = names(model.graph)
    clash = sorted(set(reserved) & taken)
    if not clash:
        return model, {}
    mapping = {}
    for name in clash:
        new, index = f"model/{name}", 1
        while new in taken:
            index += 1
            new = f"model/{name}_{index}"
        taken.add(new)
        mapping[name] = new

    def apply(graph):
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            value.name = mapping.get(value.name, value.name)
        for init in graph.initializer:
            init.name = mapping.get(init.name, init.name)
        for node in graph.node:
            node.input[:] = [mapping.get(x, x) for x in node.input]
            node.output[:] = [mapping.get(x, x) for x in node.output]
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    apply(sub)

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    apply(copy.graph)
    return copy, mapping


def shapes(model) -> dict[str, list | None]:
    """Tensor name -> dims (int, dim_param str, or None) for every typed tensor."""
    from onnx import numpy_helper

    found: dict[str, list | None] = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            found[value.name] = None
            continue
        found[value.name] = [d.dim_value if d.HasField("dim_value") else
                             (d.dim_param or None) for d in tensor.shape.dim]
    for init in model.graph.initializer:
        found[init.name] = list(numpy_helper.to_array(init).shape)
    return found


def elem_types(model) -> dict[str, int]:
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def constants(model) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes' values by tensor name."""
    from onnx import numpy_helper

    found = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if (value := constant_node_value(node)) is not None:
            found[node.output[0]] = value
        elif (value := _folded(node, found)) is not None:
            found[node.output[0]] = value
    return found


# Small computations on constants that torch's dynamo exporter leaves unfolded (optimize=False,
# which camface's own advice asks for): a Reduce's axes as Reshape(Constant, Constant)
_FOLDED_UNARY = {"Identity": lambda x: x, "Neg": np.negative}
_FOLDED_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}
_FOLDED_MAX = 64  # elements: shapes, axes and scalars, not weights


def _folded(node, found: dict) -> np.ndarray | None:
    """The value of `node` (Identity, Neg, Add, Sub, Mul, Reshape, Squeeze, Unsqueeze, Concat,
    Cast, Range) when its inputs are small integer constants in `found`, else None."""
    from onnx import helper

    inputs = [found.get(x) for x in node.input if x]
    if not inputs or len(inputs) != len(node.input) or any(
            v is None or v.size > _FOLDED_MAX or v.dtype.kind not in "iu" for v in inputs):
        return None  # integers only: shapes and axes, never a weight
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op in _FOLDED_UNARY and len(inputs) == 1:
        return _FOLDED_UNARY[op](inputs[0])
    if op in _FOLDED_BINARY and len(inputs) == 2 and inputs[0].dtype == inputs[1].dtype:
        return _FOLDED_BINARY[op](*inputs)
    if op == "Reshape" and len(inputs) == 2 and not attrs.get("allowzero"):
        shape = [d if d != 0 else inputs[0].shape[i] for i, d in enumerate(inputs[1].tolist())]
        return inputs[0].reshape(shape)
    if op in ("Squeeze", "Unsqueeze") and len(inputs) == 2:
        axes = tuple(int(a) for a in inputs[1].reshape(-1))
        return np.squeeze(inputs[0], axes) if op == "Squeeze" else np.expand_dims(inputs[0], axes)
    if op == "Concat":
        return np.concatenate(inputs, axis=int(attrs["axis"]))
    if op == "Cast" and len(inputs) == 1:
        return inputs[0].astype(helper.tensor_dtype_to_np_dtype(int(attrs["to"])))
    if op == "Range" and len(inputs) == 3:
        start, limit, delta = (int(v.item()) for v in inputs)
        # counted before it is made: a constant Range of 2**40 is no shape to fold, and numpy
        # would allocate it first (a delta of 0 is ONNX Runtime's error to give)
        if delta == 0 or -(-(limit - start) // delta) > _FOLDED_MAX:
            return None
        return np.arange(start, limit, delta).astype(inputs[0].dtype)
    return None


def _small_constants_folded(model):
    """`model` with each node `_folded` computes replaced by a Constant of its value (a copy;
    `model` itself when there is none): ONNX's shape inference reads axes and shapes from
    constants, not from a Range or Reshape of them (torch's dynamo exporter, optimize=False)."""
    import onnx
    from onnx import helper, numpy_helper

    found = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes, changed = [], False
    for node in model.graph.node:
        value = constant_node_value(node)
        if value is None and (value := _folded(node, found)) is not None:
            node = helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                    value=numpy_helper.from_array(np.asarray(value)))
            changed = True
        if value is not None:
            found[node.output[0]] = value
        nodes.append(node)
    if not changed:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


# a Constant node's value attribute, in each of its forms: value_int(s) and value_float(s) hold
# what `value` holds as a tensor (the legacy torch exporter and hand-written graphs use both)
_CONSTANT_FORMS = {"value_int": np.int64, "value_ints": np.int64, "value_float": np.float32,
                   "value_floats": np.float32}


def constant_node_value(node) -> np.ndarray | None:
    """The value of `node` when it is a Constant holding a tensor, an int or a float (or a list
    of them: a 1-D tensor; int64, float32), None otherwise (a string, a sparse tensor)."""
    from onnx import helper, numpy_helper

    if node.op_type != "Constant" or len(node.attribute) != 1:
        return None
    attribute = node.attribute[0]
    if attribute.name == "value":
        return numpy_helper.to_array(attribute.t)
    if attribute.name in _CONSTANT_FORMS:
        return np.array(helper.get_attribute_value(attribute), _CONSTANT_FORMS[attribute.name])
    return None


def constant(graph, name: str) -> np.ndarray | None:
    """The value of the initializer or Constant node `name` of `graph` (as `constants`, without
    reading every weight), None when it is neither."""
    from onnx import numpy_helper

    for tensor in graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return constant_node_value(node)
    return None


def describe(model, where: object = "model") -> Classifier:
    """The classifier's input, layout and logits. Raises ModelError for what camface cannot
    explain: several inputs/outputs, a non-float or non-image input, a fixed batch dimension."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        several = ("; of several outputs, name the one holding the class scores with "
                   "--class-output NAME") if len(inputs) == 1 else ""
        raise ModelError(f"{where}: camface needs one image input and one output (it has inputs "
                         f"{[v.name for v in inputs]}, outputs {[v.name for v in graph.output]}){several}")
    image, output = inputs[0], graph.output[0]
    dims = shapes(model)[image.name] or []
    if image.type.tensor_type.elem_type != FLOAT or len(dims) != 4:
        import onnx

        kind = onnx.TensorProto.DataType.Name(image.type.tensor_type.elem_type).lower()
        advice = "; convert the model to float32 (camface's graphs keep float32 inputs)" \
            if kind in ("float16", "bfloat16", "double") and len(dims) == 4 else ""
        raise ModelError(f"{where}: input {image.name!r} must be float32 [N, C, H, W] or "
                         f"[N, H, W, C] (it is {kind} {dims}){advice}")
    if isinstance(dims[0], int) and dims[0] > 0:
        raise ModelError(f"{where}: input {image.name!r} has a fixed batch dimension of "
                         f"{dims[0]}; camface graphs take 1 to 32 crops at once. Export it with a "
                         "dynamic batch (torch.export: dynamic_shapes={'x': {0: "
                         "torch.export.Dim('batch', min=1, max=32)}}; torch.onnx.export: "
                         "dynamic_axes; tf2onnx: an input signature with None)")
    if dims[1] in (1, 3) and not (dims[3] in (1, 3)):
        layout, channels, size = "NCHW", dims[1], dims[2:]
    elif dims[3] in (1, 3):
        layout, channels, size = "NHWC", dims[3], dims[1:3]
    else:
        raise ModelError(f"{where}: input {image.name!r} {dims} has no channel axis of 1 or 3")
    if not all(isinstance(d, int) and d > 0 for d in size):
        raise ModelError(f"{where}: input {image.name!r} needs a fixed height and width ({dims}); "
                         "pass the size the model was trained on with --input-size HxW")
    check_inference_mode(model, where)
    check_control_flow(model, where)
    producer = {o: n for n in graph.node for o in n.output}
    final, after = producer.get(output.name), []
    # an Identity (tf2onnx names outputs so), Reshape, Flatten, Cast, Unsqueeze or Transpose
    # after the Softmax leaves it final
    while final is not None and final.op_type in _PASS_THROUGH + _POOLING + _AFTER_FINAL \
            and final.input[0] in producer:
        after.append(final)
        final = producer[final.input[0]]
    activation = final.op_type if final is not None and final.op_type in _FINAL else ""
    logits = final.input[0] if activation else output.name
    dims = shapes(model)
    if activation and after and (any(n.op_type in _POOLING + _AFTER_FINAL for n in after)
                                 or len(dims.get(logits) or []) != 2 or len(dims.get(output.name) or []) != 2):
        model = _logits_squeezed(model, final, after[::-1], where)
        logits = model.graph.node[-2].output[0]
    elif activation and any(n.op_type not in ("Identity", "Dropout") for n in after):
        # [N, classes] -> Reshape / Flatten / Squeeze -> [N, classes]: the output is the
        # probabilities when no node moves the batch or the classes
        _refuse_tail(model, final, after[::-1], where)
    logit_dims = shapes(model).get(logits)
    if not logit_dims or len(logit_dims) != 2 or not isinstance(logit_dims[1], int):
        # [classes, N] (logits.t()): the batch is the dynamic axis, last
        hint = ("; return them with the batch first, not transposed, or name another output with "
                "--class-output") if logit_dims and len(logit_dims) == 2 and isinstance(logit_dims[0], int) else ""
        raise ModelError(f"{where}: the logits {logits!r} must be [N, classes] (they are "
                         f"{logit_dims}{hint})")
    return Classifier(model, image.name, layout, (int(size[0]), int(size[1])), int(channels),
                      output.name, logits, activation, int(logit_dims[1]))


def _logits_squeezed(model, final, after: list, where: object):
    """`model` ending in `final` (Softmax / Sigmoid / LogSoftmax) of its logits, when the nodes
    `after` it (in graph order: pooling, flatten, reshape...) only squeeze axes of size 1 away
    or add them (a Conv(classes, 1) on a 1x1 map -> Softmax -> Flatten: the class scores are the
    map's channels; a Softmax -> Unsqueeze) and cast float32 to float32; rewritten to
    Flatten(logits) -> `final` over the last axis -> the output [N, classes], the last two
    nodes. ModelError naming the nodes (`_refuse_tail`) when they pool or mix the
    probabilities, which no logits then give (a Softmax -> GlobalAveragePool over a 3x3 map: a
    mean of softmaxes), move the batch or the classes, or cast them to another type.

    Reads `final` as opset 13 on defines it (one axis, -1 when not given): every caller gets
    `model` from `onnx_export.upgrade` (opset >= 13, or refused); before 13 a Softmax without
    an axis ran over axes 1.. flattened, so an older model is refused here, not misread."""
    import onnx
    from onnx import helper

    _refuse_tail(model, final, after, where, rewritten=True)
    dims = shapes(model)
    scores, output = final.input[0], model.graph.output[0].name
    shape = dims.get(scores) or []
    passed = " -> ".join(f"{n.name!r} ({n.op_type})" for n in after)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    dropped = {o for n in [final, *after] for o in n.output}
    kept = [n for n in copy.graph.node if not any(o in dropped for o in n.output)]
    taken = {o for n in copy.graph.node for o in n.output} | {i.name for i in copy.graph.initializer}
    logits, index = f"{scores}/logits", 1
    while logits in taken:
        index += 1
        logits = f"{scores}/logits_{index}"
    flatten = helper.make_node("Flatten", [scores], [logits], axis=1, name=f"{final.name}/flatten_logits")
    attrs = {} if final.op_type == "Sigmoid" else {"axis": -1}
    again = helper.make_node(final.op_type, [logits], [output], name=final.name, **attrs)
    for node in (flatten, again):  # in the final's PyTorch module (module_outputs)
        node.metadata_props.extend(final.metadata_props)
    del copy.graph.node[:]
    copy.graph.node.extend(kept + [flatten, again])
    declared = copy.graph.output[0].type.tensor_type
    if declared.HasField("shape") and len(declared.shape.dim) != 2:  # [N, C, 1] or [N, C, 1, 1]: [N, C] now
        batch = onnx.TensorShapeProto.Dimension()
        batch.CopyFrom(declared.shape.dim[0])
        del declared.shape.dim[:]
        declared.shape.dim.extend([batch, onnx.TensorShapeProto.Dimension(dim_value=math.prod(shape[1:]))])
    values = [v for v in copy.graph.value_info if v.name not in dropped]
    del copy.graph.value_info[:]
    copy.graph.value_info.extend(values)
    log.info("%s: its %s's input %s %s, squeezed by %s, is read as the logits [N, %d]", where,
             final.op_type, scores, _symbolic(shape), passed, math.prod(shape[1:]))
    return prepare(copy, where=where)


def _refuse_tail(model, final, after: list, where: object, rewritten: bool = False) -> None:
    """ModelError naming the nodes when `after` (the nodes between `final` and the output, in
    graph order) pool the probabilities, move the batch or the classes (a Reshape of [N, 4] to
    [-1, 2], a Transpose that is not of size-1 axes), cast them to another type, or when
    `final` is no softmax of one axis of them; with `rewritten` (`_logits_squeezed` reads the
    logits before `final` again), also when other nodes read the probabilities."""
    import onnx

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ModelError(f"{where}: opset {opset}: its {final.op_type} {final.name!r} is read as opset 13 defines "
                         "it (one axis, -1 by default); convert the model first (onnx_export.upgrade)")
    dims = shapes(model)
    scores = final.input[0]
    shape = dims.get(scores) or []
    axis = next((a.i for a in final.attribute if a.name == "axis"), -1)
    passed = " -> ".join(f"{n.name!r} ({n.op_type})" for n in after)
    known = len(shape) >= 2 and all(isinstance(d, int) and d > 0 for d in shape[1:])
    why = None
    if not known:
        why = f"its logits {scores!r} have no fixed shape ({_symbolic(shape)})"
    types = elem_types(model)
    for node in after:
        into, out = dims.get(node.input[0]), dims.get(node.output[0])
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if why is None and node.op_type == "Cast" and (types.get(node.input[0]), to) != (FLOAT, FLOAT):
            kinds = [onnx.TensorProto.DataType.Name(t).lower() for t in (types.get(node.input[0]) or 0, to or 0)]
            why = (f"{node.name!r} (Cast) casts the probabilities to {kinds[1]} (from {kinds[0]}); "
                   "camface's probabilities are float32")
        if why is None and (not into or not out):  # a shape inference could not follow
            why = (f"{node.name!r} ({node.op_type}) turns {_symbolic(into or [])} into an unknown "
                   f"shape ({_symbolic(out or [])}): the probabilities may be moved across crops")
        if why is None and not (all(isinstance(d, int) and d > 0 for d in into[1:] + out[1:])
                                and math.prod(into[1:]) == math.prod(out[1:])):
            why = (f"{node.name!r} ({node.op_type}) turns {_symbolic(into)} into {_symbolic(out)}: "
                   "it pools or reshapes the probabilities, and no logits give what comes out")
        if why is None and node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None) \
                or list(range(len(into)))[::-1]
            moved = [a for a in perm if into[a] != 1]  # the batch and the class axes, in their new order
            if perm[0] != 0 or moved != sorted(moved):
                why = (f"{node.name!r} (Transpose) permutes {_symbolic(into)} by {perm}: it reorders "
                       "the class scores (or the batch), which camface does not follow")
    spread = [i for i in range(1, len(shape)) if known and shape[i] != 1]
    if why is None and final.op_type != "Sigmoid" and (len(spread) > 1 or spread and spread[0] != axis % len(shape)):
        why = (f"its {final.op_type} runs over axis {axis} of {_symbolic(shape)}, not over the class "
               "scores alone, so the flattened output is no softmax of them")
    readers = {x for n in model.graph.node if n is not final and n not in after for x in n.input}
    if why is None and rewritten and readers & {o for n in [final, *after] for o in n.output}:
        why = "other nodes read the probabilities before the output"
    if why is not None:
        raise ModelError(f"{where}: its output is the {final.op_type} of {scores!r} (node {final.name!r}) "
                         f"passed through {passed}: {why}; camface explains the logits before the final "
                         f"{final.op_type}: export the model ending in the {final.op_type} of [N, classes] "
                         f"logits, after {after[-1].name!r}")


def fix_input_size(model, size: tuple[int, int], where: object = "model"):
    """A copy of `model` whose image input [N, C, H, W] or [N, H, W, C] has the height and width
    `size` (H, W) where they were dynamic, shapes inferred again; ModelError naming the input
    when it already has another fixed size (or one side fixed at another length). A model whose inputs camface cannot read is returned
    as it is (`describe` says why)."""
    import onnx

    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    dims = shapes(model).get(inputs[0].name) if len(inputs) == 1 else None
    if not dims or len(dims) != 4:
        return model
    axes = (2, 3) if dims[1] in (1, 3) and dims[3] not in (1, 3) else (1, 2)
    fixed = [dims[a] for a in axes]
    if all(isinstance(d, int) and d > 0 for d in fixed):
        if tuple(fixed) != tuple(size):
            raise ModelError(f"{where}: --input-size {size[0]}x{size[1]}: input {inputs[0].name!r} "
                             f"is fixed at {fixed[0]}x{fixed[1]} ({_symbolic(dims)})")
        return model
    for side, dim, value in zip(("height", "width"), fixed, size):  # one side fixed: it must agree
        if isinstance(dim, int) and dim > 0 and dim != value:
            raise ModelError(f"{where}: --input-size {size[0]}x{size[1]}: input {inputs[0].name!r} has a "
                             f"fixed {side} of {dim} ({_symbolic(dims)})")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    image = next(v for v in copy.graph.input if v.name == inputs[0].name)
    for axis, value in zip(axes, size):
        dim = image.type.tensor_type.shape.dim[axis]
        dim.Clear()
        dim.dim_value = int(value)
    del copy.graph.value_info[:]  # inferred from the dynamic size: inferred again
    fixed = prepare(copy, where=where)
    _check_runs_at(fixed, inputs[0].name, size, where)
    return fixed


def _check_runs_at(model, name: str, size: tuple[int, int], where: object) -> None:
    """ModelError when `model` does not run on a zero image at its input `name`'s (fixed) shape:
    a dynamic height and width that the model's own constants do not follow (a vision
    transformer's position embedding fixes its number of tokens), so that no later step fails
    inside ONNX Runtime or takes the tokens left over for class tokens."""
    import onnxruntime as ort

    dims = shapes(model).get(name) or []
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in dims]  # the batch: 1
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the refusal below says it in one line
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        session.run(None, {name: np.zeros(shape, np.float32)})
    except Exception as exc:  # ONNX Runtime raises its own types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{where}: --input-size {size[0]}x{size[1]}: the model does not run at that "
                         f"size (ONNX Runtime: {first}); a model whose constants fix its number "
                         "of tokens (a vision transformer's position embedding) runs only at the "
                         "size it was trained on: pass that size, or export the model with a "
                         "position embedding that follows the input (timm: dynamic_img_size=True)"
                         ) from exc


def free_batch(model, where: object = "model"):
    """`model` with a batch dimension fixed at 1 made dynamic (ONNX model zoos and many
    converters fix it), shapes inferred again, when it then runs crop by crop: a batch of 3
    gives each crop's outputs as it alone does (a model that reshapes by a constant batch of 1,
    or mixes crops, does not: `model` comes back unchanged and `describe` refuses it). Other
    models come back unchanged."""
    import onnx

    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        return model
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[0].HasField("dim_value") or dims[0].dim_value != 1:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in (copy.graph.input[list(model.graph.input).index(inputs[0])], copy.graph.output[0]):
        first = value.type.tensor_type.shape.dim[:1]
        if first and first[0].HasField("dim_value") and first[0].dim_value == 1:
            first[0].Clear()
            first[0].dim_param = "N"
    del copy.graph.value_info[:]  # inferred with a batch of 1: inferred again
    try:
        import onnxruntime as ort

        from camface.export import verify

        copy = prepare(copy, where=where)
        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(copy.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        shape = [d.dim_value for d in dims[1:]]
        crops = np.random.default_rng(0).standard_normal((3, *shape)).astype(np.float32)
        together = session.run(None, {inputs[0].name: crops})[0]
        alone = np.concatenate([session.run(None, {inputs[0].name: crops[i:i + 1]})[0] for i in range(3)])
        atol, rtol = verify.TOLERANCE["fp32"]
        if together.shape != alone.shape or \
                not np.abs(together - alone).max() <= atol + rtol * np.abs(alone).max():
            return model
    except Exception as exc:  # ONNX Runtime or shape inference on the batch it does not take
        log.debug("%s: the batch of 1 stays fixed: %s", where, exc)
        return model
    log.info("%s: its input's batch of 1 made dynamic (it runs crop by crop)", where)
    return copy


def keep_output(model, name: str, where: object = "model", flag: str = "--class-output"):
    """A copy of `model` whose one output is `name` (the class scores of a model that also
    returns an embedding, say; the nodes only the others need stay, unread); ModelError listing
    the outputs when none is called `name`, naming the `flag` that asked for it."""
    import onnx

    names = [o.name for o in model.graph.output]
    if name not in names:
        raise ModelError(f"{where}: {flag} {name!r}: no output of that name (its outputs: "
                         f"{', '.join(names)})")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [o for o in copy.graph.output if o.name == name]
    del copy.graph.output[:]
    copy.graph.output.extend(kept)
    return copy


def check_inference_mode(model, where: object = "model") -> None:
    """ModelError naming the first node left in training mode: a BatchNormalization with
    training_mode=1 (or its running-statistics outputs) normalises each crop by the statistics of
    the batch it came in (one crop alone: every channel 0, the same probabilities whatever the
    face), a Dropout whose training_mode is true or not a constant zeroes random activations on
    every run. Such a model gives no one answer per face; it must be exported in eval mode."""
    values = constants(model)
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and (
                any(a.name == "training_mode" and a.i for a in node.attribute)
                or len([o for o in node.output if o]) > 1):
            why = "normalises by the batch's statistics (training_mode=1)"
        elif node.op_type == "Dropout" and len(node.input) > 2 and node.input[2] and (
                node.input[2] not in values or bool(np.asarray(values[node.input[2]]).any())):
            why = "drops random activations (its training_mode input is not a constant false)"
        else:
            continue
        raise ModelError(f"{where}: {node.op_type} node {node.name!r} is in training mode: it {why}, "
                         "so a face's result depends on the run; export the model in eval mode "
                         "(PyTorch: model.eval() before exporting; Keras: training=False)")


def outer_reads(graph) -> set[str]:
    """Names that `graph` (a subgraph of an If, Loop or Scan, and the subgraphs inside it)
    reads from the graphs around it: what its nodes read that it does not define."""
    defined = {v.name for v in graph.input} | {i.name for i in graph.initializer}
    read: set[str] = set()
    for node in graph.node:
        read.update(x for x in node.input if x and x not in defined)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                read |= outer_reads(sub) - defined
        defined.update(node.output)
    return read


def check_control_flow(model, where: object = "model") -> None:
    """ModelError naming the first If / Loop / Scan node whose subgraph reads a tensor of the
    main graph without taking it as an input: camface's walks over the graph (which tensors the
    logits depend on, the head it differentiates and re-runs, the parts it cuts out) follow the
    nodes' inputs and would lose that tensor's producers."""
    for node in model.graph.node:
        hidden = set()
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                hidden |= outer_reads(sub)
        if hidden:
            shown = ", ".join(sorted(hidden)[:5])
            raise ModelError(f"{where}: {node.op_type} node {node.name!r} reads {shown} inside its "
                             "subgraph: camface follows the main graph only; fold the control flow away "
                             "(python -m onnxsim, or re-export the model without data-dependent branches "
                             "or loops)")


def settle_shapes(classifier: Classifier) -> Classifier:
    """`classifier` with the dims that ONNX shape inference leaves symbolic although they do
    not depend on the batch (a Reshape to a shape computed from Shape ops, as the TorchScript
    exporter writes Swin's patch merging) fixed to what ONNX Runtime gives them on batches of
    1 and 2 zero images; a dim that differs between the two stays symbolic. Unchanged when no
    dim is open or the model does not run (the target's dims are checked later, by name)."""
    import dataclasses

    import onnx
    from onnx import helper

    model = classifier.model
    types = elem_types(model)
    outputs = {o.name for o in model.graph.output}
    open_dims = [v.name for v in model.graph.value_info
                 if v.name not in outputs and types.get(v.name) and
                 any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim[1:])]
    if not open_dims:
        return classifier
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(name, types[name], None)
                              for name in open_dims)
    height, width = classifier.input_size
    image = ((classifier.channels, height, width) if classifier.input_layout == "NCHW"
             else (height, width, classifier.channels))
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # a model that does not run says so later, in one line
        session = ort.InferenceSession(probe.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        runs = [session.run(open_dims, {classifier.input_name: np.zeros((n, *image), np.float32)})
                for n in (1, 2)]
    except Exception as exc:  # ONNX Runtime raises its own types; the shapes stay as inferred
        log.debug("shapes not settled by a probe run: %s", exc)
        return classifier
    settled = {name: (a.shape, b.shape) for name, a, b in zip(open_dims, *runs)}
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.value_info:
        one, two = settled.get(value.name, ((), ()))
        dims = value.type.tensor_type.shape.dim
        if len(one) != len(dims):
            continue
        for dim, a, b in zip(dims, one, two):
            if a == b and not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = int(a)
    return dataclasses.replace(classifier, model=fixed)


# ops whose outputs depend on their inputs' shapes and types only, not on their values; and the
# inputs whose values an op reads, where not all (CastLike's second gives its type only)
_VALUE_FREE = ("Shape", "Size", "EyeLike", "RandomNormalLike", "RandomUniformLike")
_VALUED_INPUTS = {"CastLike": (0,)}


def differentiable(model, start: str, every_input: bool = False) -> set[str]:
    """Float tensors that depend on `start` through the inputs that carry gradient (through
    any float input with `every_input`: what a weight computed from `start` reaches)."""
    from camface.export.onnx_grad import DIFFERENTIABLE_INPUTS

    types = elem_types(model)
    live = {start}
    for node in model.graph.node:
        carry = _VALUED_INPUTS.get(node.op_type) if every_input else \
            DIFFERENTIABLE_INPUTS.get(node.op_type)
        reads = [x for i, x in enumerate(node.input) if carry is None or i in carry]
        if node.op_type in _VALUE_FREE or not any(x in live for x in reads):
            continue
        live.update(o for o in node.output if o and types.get(o, FLOAT) == FLOAT)
    return live


def head(model, target: str, logits: str) -> list:
    """The nodes on a path target -> logits, in graph (topological) order."""
    from camface.export.onnx_grad import DIFFERENTIABLE_INPUTS

    live = differentiable(model, target)
    if logits not in live:
        if logits in differentiable(model, target, every_input=True):
            raise ModelError(f"the logits {logits!r} depend on target {target!r} only through "
                             f"inputs that have no gradient rule: {_weights_from(model, target)}; "
                             "choose a later target layer (--target-layer)")
        narrowed = _not_float32_between(model, target, logits)
        if narrowed:
            raise ModelError(f"the logits {logits!r} depend on target {target!r} only through "
                             f"tensors that are not float32 ({narrowed}); the gradient is float32 "
                             "only: choose a later target layer (--target-layer) or export the "
                             "model in float32")
        raise ModelError(f"the logits {logits!r} do not depend on target {target!r}")
    needed, nodes = {logits}, []
    for node in reversed(model.graph.node):
        if not any(o in needed for o in node.output):
            continue
        carry = DIFFERENTIABLE_INPUTS.get(node.op_type)
        reads = [x for i, x in enumerate(node.input) if (carry is None or i in carry) and x in live]
        if not reads:
            continue
        nodes.append(node)
        needed.update(reads)
    return nodes[::-1]


def _weights_from(model, target: str) -> str:
    """The inputs that depend on `target` but carry no gradient (a convolution's weights, a
    norm's scale, computed from it), as "input 1 ('w') of node 'conv' (Conv), ..."."""
    from camface.export.onnx_grad import DIFFERENTIABLE_INPUTS

    depends = differentiable(model, target, every_input=True)
    found = [f"input {i} ({x!r}) of node {node.name!r} ({node.op_type})"
             for node in model.graph.node
             for i, x in enumerate(node.input)
             if x in depends and i not in DIFFERENTIABLE_INPUTS.get(node.op_type, (i,))]
    return ", ".join(found)


def _not_float32_between(model, target: str, logits: str) -> str:
    """Where `logits` depend on `target` through float16, bfloat16 or double tensors (a head
    cast to half precision) or quantized ones (a QuantizeLinear of a QDQ model): "node 'c'
    (Cast) makes float16 'h', ..."; "" where they do not."""
    import onnx

    types, reached = elem_types(model), {target}
    for node in model.graph.node:
        if node.op_type not in ("Shape", "Size") and any(x in reached for x in node.input):
            reached.update(o for o in node.output if o)
    if logits not in reached:
        return ""
    live = differentiable(model, target, every_input=True)
    return ", ".join(
        f"node {node.name!r} ({node.op_type}) makes "
        f"{onnx.TensorProto.DataType.Name(types[o]).lower()} {o!r}"
        for node in model.graph.node if any(x in live for x in node.input)
        for o in node.output[:1] if o in types and (
            types[o] in (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
            or node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear")))


def _spatial_pool_input(node, dims, values) -> str | None:
    """The input of a global spatial pooling node (NCHW GlobalPool, or a Reduce over H and W)."""
    if node.op_type in _POOLS:
        return node.input[0]
    if node.op_type in _SPATIAL_REDUCE:
        shape = dims.get(node.input[0])
        axes = None
        for attr in node.attribute:
            if attr.name == "axes":
                axes = list(attr.ints)
        if len(node.input) > 1 and node.input[1] in values:
            axes = values[node.input[1]].tolist()
        if shape and len(shape) == 4 and axes is not None:
            if sorted(a % 4 for a in axes) in ([2, 3], [1, 2]):
                return node.input[0]
    return None


def pooled_maps(model) -> set[str]:
    """The tensors that a global spatial pooling reads (GlobalAveragePool, or a Reduce over H, W)."""
    dims, values = shapes(model), constants(model)
    return {p for p in (_spatial_pool_input(n, dims, values) for n in model.graph.node) if p}


def _token_pool_input(model, node, dims, values) -> str | None:
    """The token grid (`with_token_grid`, no prefix tokens) whose tokens [N, h * w, C] `node`
    averages over the token axis, or None."""
    if node.op_type != "ReduceMean" or len(dims.get(node.input[0]) or []) != 3:
        return None
    axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    if len(node.input) > 1 and node.input[1] in values:
        axes = values[node.input[1]].tolist()
    producer = {o: n for n in model.graph.node for o in n.output}
    back = producer.get(node.input[0])
    laid = producer.get(back.input[0]) if back is not None and back.op_type == "Reshape" else None
    if axes is None or [a % 3 for a in axes] != [1] or laid is None or \
            not any(p.key == TOKEN_GRID for p in laid.metadata_props):
        return None
    return back.input[0]


def pooled_tokens(classifier: Classifier, source: str) -> str | None:
    """The tokens [N, T, C] that the last mean over the token axis before the logits reads, when
    they come from `source` (the last spatial map: an MLP-Mixer's patch embedding, its tokens
    mixed by linear layers, not attention, after it), else None."""
    model = classifier.model
    dims, values = shapes(model), constants(model)
    after, before = differentiable(model, source), _ancestors(model, classifier.logits)
    found = None
    for node in model.graph.node:
        if node.op_type != "ReduceMean" or node.input[0] not in after or node.output[0] not in before:
            continue
        axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        if len(node.input) > 1 and node.input[1] in values:
            axes = values[node.input[1]].tolist()
        if len(dims.get(node.input[0]) or []) == 3 and axes is not None and [a % 3 for a in axes] == [1]:
            found = node.input[0]
    return found


def candidates(model, logits: str) -> list[str]:
    """4-D float tensors that the logits depend on, in graph order (tensor names)."""
    dims, types = shapes(model), elem_types(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    ancestors, stack = set(), [logits]
    while stack:
        name = stack.pop()
        if name in ancestors:
            continue
        ancestors.add(name)
        if name in producer:
            stack.extend(producer[name].input)
    return [o for n in model.graph.node for o in n.output
            if o in ancestors and len(dims.get(o) or []) == 4 and types.get(o, FLOAT) == FLOAT]


# Ops that lay a feature map on the image grid whatever their input: ONNX's are NCHW.
_GRID_MAKERS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool")
# Ops whose output keeps the grid (and layout) of an input of the output's shape: elementwise
# maths and normalisations (resizing, and a Concat of channels, below). Softmax, Hardmax (a
# one-hot along an axis, gradient 0), Reshape, Transpose (but NCHW <-> NHWC), Slice, Gather and
# MatMul of two varying tensors (attention) do not: their output is no feature map.
_GRID_KEEPERS = ("Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid",
                 "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Clip", "Abs",
                 "Neg", "Exp", "Log", "Sqrt", "Pow", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan",
                 "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Swish", "Shrink", "ThresholdedRelu",
                 "Reciprocal", "Sign", "Floor", "Ceil", "Round", "Identity", "Dropout", "Cast",
                 "CastLike", "Add", "Sub", "Mul", "Div", "Max", "Min", "Mean", "Sum", "Where",
                 "BatchNormalization", "InstanceNormalization", "LayerNormalization",
                 "GroupNormalization", "MeanVarianceNormalization", "RMSNormalization", "LRN")
_GRID_RESIZERS = ("Resize", "Upsample", "Pad")  # the same grid, another size
_LAYOUT_PERMS = {("NCHW", (0, 2, 3, 1)): "NHWC", ("NHWC", (0, 3, 1, 2)): "NCHW"}


def spatial_maps(classifier: Classifier) -> dict[str, str]:
    """4-D float tensors laid on the image grid -> their layout (NCHW or NHWC), in graph order:
    the outputs of convolutions and pools, what elementwise ops, normalisations, channel-wise
    linear layers (MatMul by a constant on NHWC) and NCHW <-> NHWC transposes make of them; and
    the input of a global spatial pooling whose height and width are the input's divided by one
    stride (`on_grid`) or not fixed yet, whatever made it. No attention tensor [N, heads,
    tokens, dim] is one: Softmax, Reshape, Slice, Gather and MatMul of two tensors break the
    chain."""
    model = classifier.model
    dims, values = shapes(model), constants(model)
    grid = {classifier.input_name: classifier.input_layout}
    for node in model.graph.node:
        pooled = _spatial_pool_input(node, dims, values)
        if pooled is not None and pooled not in grid:
            layout = target_layout(model, pooled)
            size = _hw(dims.get(pooled), layout)
            fixed = all(isinstance(d, int) for d in size)
            if on_grid(classifier, dims.get(pooled), layout) or not fixed:
                grid[pooled] = layout  # pooled over h, w by the model (open dims: feature_dims)
        out = node.output[0] if node.output else ""
        if len(dims.get(out) or []) != 4:
            continue
        # the batch dim may be named differently (N, unk__3): compared without it
        inputs = [x for x in node.input if x in grid and (dims.get(x) or [])[1:] == dims[out][1:]]
        perm = tuple(next((a.ints for a in node.attribute if a.name == "perm"), ()))
        if node.op_type in _GRID_MAKERS:
            grid[out] = "NCHW"
        elif node.op_type in _GRID_KEEPERS and inputs:
            grid[out] = grid[inputs[0]]
        elif node.op_type in _GRID_RESIZERS and node.input[0] in grid:
            grid[out] = grid[node.input[0]]
        elif node.op_type == "Concat" and node.input[0] in grid:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % 4
            if axis == (1 if grid[node.input[0]] == "NCHW" else 3):  # DenseNet: channels
                grid[out] = grid[node.input[0]]
        elif node.op_type == "Transpose" and node.input[0] in grid:
            layout = _LAYOUT_PERMS.get((grid[node.input[0]], perm))
            if layout:
                grid[out] = layout
        elif node.op_type == "MatMul" and node.input[0] in grid and node.input[1] in values \
                and grid[node.input[0]] == "NHWC":
            grid[out] = "NHWC"  # a linear layer over the channels of an NHWC map
        elif node.op_type == "Reshape" and any(p.key == TOKEN_GRID for p in node.metadata_props):
            grid[out] = "NHWC"  # tokens laid on their patch grid by `with_token_grid`
        elif node.op_type == "Reshape" and _channels_last_grid(classifier, dims.get(node.input[0]),
                                                               dims[out]):
            grid[out] = "NHWC"  # Swin: tokens or windows [..., C] put back as a stage [N, h, w, C]
    return {name: layout for name, layout in grid.items() if name != classifier.input_name}


def _channels_last_grid(classifier: Classifier, before, after) -> bool:
    """Whether a Reshape of `before` to 4-D `after` puts tokens or windows back on the image grid
    as [N, h, w, C] (Swin's stages): the channels stay the last axis (a split into attention heads
    changes it) and h, w are the input's divided by one stride."""
    return bool(before) and len(before) >= 3 and isinstance(after[3], int) and \
        before[-1] == after[3] and on_grid(classifier, after, "NHWC")


def _hw(dims, layout: str) -> list:
    """The (height, width) dims of 4-D `dims` in `layout`; [] for other ranks."""
    return list(dims[2:4] if layout == "NCHW" else dims[1:3]) if dims and len(dims) == 4 else []


def on_grid(classifier: Classifier, dims, layout: str) -> bool:
    """Whether 4-D `dims` have a fixed height and width that are the input's divided by one
    stride s (rounded either way)."""
    size = _hw(dims, layout)
    if len(size) != 2 or not all(isinstance(d, int) and d > 0 for d in size):
        return False
    (height, width), (h, w) = classifier.input_size, size
    return any(h in (height // s, -(-height // s)) and w in (width // s, -(-width // s))
               for s in range(1, max(height, width) + 1))


def _symbolic(dims) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims or []) + "]"


def feature_dims(classifier: Classifier, tensor: str, layout: str) -> tuple[int, int, int]:
    """(h, w, channels) of the target `tensor`; ModelError naming it when one is not a fixed
    number after ONNX shape inference (a Reshape computed from Shape ops leaves them symbolic)."""
    dims = shapes(classifier.model).get(tensor) or []
    if len(dims) != 4:
        raise ModelError(f"target {tensor!r} {_symbolic(dims)} is not 4-D")
    h, w, k = (dims[2], dims[3], dims[1]) if layout == "NCHW" else (dims[1], dims[2], dims[3])
    missing = [name for name, d in (("height", h), ("width", w), ("channels", k))
               if not (isinstance(d, int) and d > 0)]
    if missing:
        grid, found = spatial_maps(classifier), shapes(classifier.model)
        known = [t for t in grid if all(isinstance(d, int) for d in _hw(found.get(t), grid[t]))
                 and _hw(found.get(t), grid[t])][-2:]
        shown = f", such as {', '.join(known)}" if known else ""
        raise ModelError(
            f"target {tensor!r} {_symbolic(dims)} ({layout}): its {' and '.join(missing)} "
            "are not fixed after ONNX shape inference (computed at run time from Shape ops); the "
            "CAM graph needs a fixed feature map: re-export the model with static shapes "
            "(torch.onnx.export(..., dynamo=True), or onnxsim) or pick a target whose height "
            f"and width are known with --target-layer{shown}")
    return int(h), int(w), int(k)


def _attention(model, target: str, logits: str):
    """The first node between `target` and the logits that mixes tokens (Softmax, ONNX's
    Attention (opset 23: torch's F.scaled_dot_product_attention), or MatMul / Einsum of two
    tensors that both depend on the target), or None."""
    live = differentiable(model, target)
    for node in head(model, target, logits):
        varying = [x for x in node.input if x in live]
        if (node.op_type == "Softmax" and node.output[0] != logits) or node.op_type == "Attention" or \
                (node.op_type in ("MatMul", "Einsum") and len(varying) > 1):
            return node
    return None


def default_target(classifier: Classifier) -> str:
    """The spatial feature map the heatmaps use when none is named: the input of the last global
    spatial pooling before the logits, else the last spatial map (`spatial_maps`), when its
    height and width are fixed and no attention lies between it and the logits. ModelError
    naming the tensors and what they lack otherwise (a vision transformer's 4-D tensors are
    attention, and its patch embedding is read through attention: token grids come later)."""
    model = classifier.model
    found = candidates(model, classifier.logits)
    if not found:
        raise ModelError(f"no 4-D tensor (N, C, h, w) before the logits {classifier.logits!r}: "
                         "camface explains convolutional classifiers")
    dims, values = shapes(model), constants(model)
    grid = spatial_maps(classifier)
    maps = [t for t in found if t in grid]
    pooled = [_spatial_pool_input(n, dims, values) for n in model.graph.node]
    pooled = [p for p in pooled if p in set(maps)]
    if not maps:
        shown = ", ".join(f"{t} {_symbolic(dims.get(t))}" for t in found[-3:])
        read = set(found)
        attention = next((n for n in _attentions(classifier) if n.output[0] in read), None)
        if attention is not None:  # patches embedded by a linear layer (lucidrains' ViT): tokens only
            raise AttentionBeforeLogits(
                f"no spatial feature map (N, C, h, w) on the image grid before the logits "
                f"{classifier.logits!r}: its patches are embedded without a convolution and read "
                f"through attention ({attention.op_type} node {attention.name!r}); its 4-D tensors "
                f"are reshapes and attention (e.g. {shown}); pass a token target [N, T, C] with "
                "--target-layer")
        raise ModelError(f"no spatial feature map (N, C, h, w) on the image grid before the logits "
                         f"{classifier.logits!r}: its 4-D tensors come from reshapes, transposes "
                         f"or attention, not from convolutions (e.g. {shown}); pass one with "
                         "--target-layer to explain it anyway")
    # an all-convolutional head (Conv to 1x1, then softmax) ends in a 1x1 map: no heatmap
    wide = [t for t in maps if math.prod(d if isinstance(d, int) else 2 for d in _hw(dims.get(t), grid[t])) > 1]
    target = pooled[-1] if pooled else (wide or maps)[-1]
    feature_dims(classifier, target, grid[target])  # ModelError when h, w are symbolic
    mixing = _attention(model, target, classifier.logits)
    if mixing is not None:
        tokens = [t for t in found if t not in grid][-1:]
        shown = "".join(f" such as {t!r} {_symbolic(dims.get(t))}" for t in tokens)
        raise AttentionBeforeLogits(f"no spatial feature map that the logits {classifier.logits!r} read "
                         f"without attention: the last one, {target!r} "
                         f"{_symbolic(dims.get(target))}, passes through {mixing.op_type} node "
                         f"{mixing.name!r}, which mixes tokens (attention); the other 4-D tensors"
                         f"{shown} are tokens and attention, not feature maps (a token target [N, T, C] "
                         f"needs an attention whose tokens lie on a grid); spatial maps: {', '.join(maps[-3:])}; pass one with "
                         "--target-layer to explain it anyway")
    return target


def module_outputs(model) -> dict[str, str]:
    """PyTorch module name -> its output tensor, from `pkg.torch.onnx.name_scopes` (dynamo
    exporter: `layer4.1`) or from node names (TorchScript exporter: `layer4`, `layer4/conv1`)."""
    scopes: dict[str, list[str]] = {}
    for node in model.graph.node:
        value = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), None)
        if value:
            try:
                scopes[node.name] = [s for s in ast.literal_eval(value) if s]
            except (ValueError, SyntaxError):
                continue
        elif node.name.startswith("/"):  # the TorchScript exporter: /layer4/conv1/Conv
            parts = node.name.strip("/").split("/")
            scopes[node.name] = ["/".join(parts[:i + 1]) for i in range(len(parts))]
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for x in node.input:
            readers.setdefault(x, []).append(node)
    outputs = {o.name for o in model.graph.output}
    found: dict[str, str] = {}
    for node in model.graph.node:
        for module in scopes.get(node.name, [])[:-1]:  # the last scope is the op itself
            for out in node.output:
                outside = [r for r in readers.get(out, []) if module not in scopes.get(r.name, [])]
                if outside or out in outputs:
                    found[module] = out  # later nodes overwrite: the module's last output
    # TorchScript's scopes `blocks/blocks.11/norm1` are PyTorch's `blocks.11.norm1` too
    found.update({dotted(m): t for m, t in list(found.items()) if "/" in m and dotted(m) not in found})
    return found


def dotted(scope: str) -> str:
    """PyTorch's module name of a TorchScript scope: `layers/layers.3/blocks/blocks.1/norm2` ->
    `layers.3.blocks.1.norm2` (a child of a Sequential or ModuleList is scoped with its parent's
    scope and its index: `parent.index`, and a Sequential inside it `parent.index.index`, so
    `stages/stages.1/stages.1.2/norm` -> `stages.1.2.norm`)."""
    parts: list[str] = []
    previous = ""
    for part in scope.split("/"):
        parts.append(part[len(previous) + 1:] if previous and part.startswith(previous + ".") else part)
        previous = part
    return ".".join(parts)


def _scope_part(segments: list[str]) -> str:
    """TorchScript's scope of the module `segments` (its PyTorch name, split at the dots) as
    its caller's scope extends it: from its last name that is no index (`proj` for
    `patch_embed.proj`, `blocks.0` for `blocks.0`, `seq.1.0` for `seq.1.0`)."""
    last = max((i for i, part in enumerate(segments) if not part.isdigit()), default=0)
    return ".".join(segments[last:])


def scoped_as(name: str, modules: dict[str, str]) -> list[str]:
    """The TorchScript module scopes (`module_outputs`' keys, as PyTorch names) that the PyTorch
    module `name` has when a forward above its parent's calls it (`self.patch_embed.proj(x)` in
    the model's forward: scoped `proj`, not `patch_embed/proj`): each scope's parts name `name`
    or its ancestors, in order, the last one `name` itself."""
    segments = name.split(".")
    forms = [_scope_part(segments[:k]) for k in range(1, len(segments) + 1)]
    found = []
    for module in modules:
        parts = module.split("/")
        if parts[-1] != forms[-1] or dotted(module) == name:
            continue
        ancestors = iter(forms[:-1])
        if all(any(part == form for form in ancestors) for part in parts[:-1]):
            found.append(dotted(module))
    return list(dict.fromkeys(found))


def folded_weights(model, module: str, tensor: str) -> str | None:
    """The weights' name when `tensor`, the output of the PyTorch module `module`, comes from a
    Conv of that module whose weights torch.onnx's TorchScript exporter made anew (`onnx::Conv_12`,
    not `module.weight`) while it kept other parameters' names: in eval mode it folds the
    BatchNorm after a convolution into it, so the tensor is the BatchNorm's output, not the
    convolution's. Else None."""
    node = next((n for n in model.graph.node if tensor in n.output), None)
    if node is None or node.op_type != "Conv" or len(node.input) < 2 or not node.name.startswith("/"):
        return None
    if dotted("/".join(node.name.strip("/").split("/")[:-1])) != module:
        return None  # a block around the convolution: its output is the block's
    names = {i.name for i in model.graph.initializer}
    weights = node.input[1]
    kept = any(n.endswith(".weight") for n in names)
    return weights if kept and weights in names and weights.startswith("onnx::") else None


def folded_siblings(model, name: str, modules: dict[str, str], torchscript: bool) -> list[str]:
    """The modules beside `name` (the same parent) whose map is a convolution and the BatchNorm
    after it folded into one: TorchScript's exporter names it as the convolution
    (`folded_weights`), a .pt2's optimiser as the BatchNorm (its Conv node's last scope is
    `_native_batch_norm_legit_no_training`)."""
    parent = name.rpartition(".")[0]
    if torchscript:
        return [m for m, t in modules.items() if "/" not in m and m != name
                and m.rpartition(".")[0] == parent and folded_weights(model, m, t)]
    found = []
    for node in model.graph.node:
        value = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), None)
        if node.op_type != "Conv" or not value:
            continue
        try:
            scopes = [s for s in ast.literal_eval(value) if s]
        except (ValueError, SyntaxError):
            continue
        if len(scopes) >= 2 and scopes[-1].startswith("_native_batch_norm") and \
                scopes[-2].rpartition(".")[0] == parent and scopes[-2] in modules:
            found.append(scopes[-2])
    return list(dict.fromkeys(found))


def module_name(model, tensor: str) -> str:
    """The PyTorch module whose output `tensor` is (the outermost, as PyTorch spells it:
    `blocks.11.norm1`), else the tensor's own name."""
    owners = [m for m, t in module_outputs(model).items() if t == tensor]
    plain = [m for m in owners if "/" not in m] or owners
    return min(plain, key=lambda m: (m.count("."), len(m))) if plain else tensor


def resolve_target(classifier: Classifier, name: str | None) -> tuple[str, str]:
    """(tensor, the name to record) for a tensor name, a node name or a PyTorch module name;
    None picks `default_target`. ModelError listing the candidates for an unknown name: the
    spatial maps (all 4-D tensors when none is) and a transformer's token modules [N, T, C]."""
    model = classifier.model
    if name is None:
        tensor = default_target(classifier)
        return tensor, module_name(model, tensor)
    found = candidates(model, classifier.logits)
    modules = module_outputs(model)
    nodes = {n.name: n.output[0] for n in model.graph.node if n.output}
    # a module first: a .pt2's tensors are named after their ops, so `relu` is also the tensor
    # of the first call of a module `relu` called twice, whose output is its last call's
    for tensor in (modules.get(name), name if name in found else None, nodes.get(name)):
        if tensor is not None and tensor in found:
            if tensor not in spatial_maps(classifier):
                producer = next((n for n in model.graph.node if tensor in n.output), None)
                log.warning("target %s (%s %s) is no spatial feature map on the image grid: its "
                            "heatmaps span its last two axes, not the image", name,
                            producer.op_type if producer else "input",
                            _symbolic(shapes(model).get(tensor)))
            return tensor, name
    maps = spatial_maps(classifier)
    found = [t for t in found if t in maps] or found  # attention and other 4-D tensors are no maps
    dims = shapes(model)
    counts = {_attended_tokens(n, dims) for n in _attentions(classifier)}
    tokens = {t for t in modules.values() if len(dims.get(t) or []) == 3 and dims[t][1] in counts}
    module_names = [m for m, t in modules.items() if t in set(found) or t in tokens and "/" not in m]
    shown = (module_names + found)[-40:]
    known = name in modules or name in nodes or name in shapes(model)
    what = "a 4-D tensor or tokens [N, T, C]" if tokens else "a 4-D tensor"
    tensor = modules.get(name) or nodes.get(name) or name
    rank = len(shapes(model).get(tensor) or [])
    if not known:
        import difflib

        named = [n for n, t in nodes.items() if t in set(found)] + module_names + found
        torchscript = not any(p.key == NAME_SCOPES for n in model.graph.node for p in n.metadata_props)
        scoped = scoped_as(name, modules) if torchscript else []
        fused = folded_siblings(model, name, modules, torchscript)
        parent = name.rpartition(".")[0] or "the model"
        close = difflib.get_close_matches(name, list(dict.fromkeys(named)), n=3, cutoff=0.6)
        # a Keras layer's name (a Keras embedder of enroll / compare, converted by tf2onnx): the ops
        # right in its scope name its tensors, `model_1/add_3_1/Add:0` for layer add_3 (`_1`: called
        # again), the layer's output the last of them (not `layer/depthwise/...` inside it)
        keras_scoped = [t for t in found if "/" not in name and t.count("/") >= 1
                        and re.fullmatch(re.escape(name) + r"(_\d+)?", t.split("/")[-2])]
        close = list(dict.fromkeys(keras_scoped[-1:] + close))
        notes = [f"TorchScript's exporter scopes a module by the forward that calls it: {name}, called "
                 f"from an ancestor's forward, not its parent's, is scoped {' or '.join(map(repr, scoped))}; "
                 "pass that name, or export the model to .pt2, which keeps PyTorch's names"] if scoped else \
            [f"did you mean {' or '.join(close)}?"] if close else []
        if fused and not scoped:
            notes.append(f"torch.onnx folded each BatchNorm of {parent} into the convolution before it, "
                         f"whose name the fused map keeps: {', '.join(fused)}; export with "
                         "do_constant_folding=False to keep them apart" if torchscript else
                         f"torch.onnx's optimiser folded each convolution of {parent} and the BatchNorm "
                         f"after it into one map, named as the BatchNorm: {', '.join(fused)}; export with "
                         "optimize=False, or to .pt2, to keep them apart")
        why = f"no tensor, node or module named {name!r}" + (f" ({'; '.join(notes)})" if notes else "")
    elif tensor == classifier.input_name:
        why = f"{name!r} is the model's input, not a layer"
    elif (rank == 4 or rank == 3 and tokens) and tensor not in _ancestors(model, classifier.logits):
        why = (f"the logits {classifier.logits!r} do not depend on {name!r} "
               f"{_symbolic(shapes(model).get(tensor))}: it is no target layer")
    else:
        why = f"{name!r} {_symbolic(shapes(model).get(tensor))} is not {what} before the logits"
    raise ModelError(f"{why}; candidate target layers: {', '.join(shown)}")


def target_layout(model, tensor: str, grid: dict[str, str] | None = None) -> str:
    """NCHW or NHWC for a 4-D tensor: its layout in `grid` (`spatial_maps`) when there, else
    from the ops that read or write it (ONNX's Conv and pools are NCHW; a Transpose to or from
    NHWC, or a Reduce over axes 1, 2, tells the other)."""
    if grid and tensor in grid:
        return grid[tensor]
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for x in node.input:
            readers.setdefault(x, []).append(node)
    dims, values = shapes(model), constants(model)
    seen, stack = set(), [tensor]
    elementwise = ("Relu", "Add", "Mul", "Sub", "Div", "Identity", "Sigmoid", "Clip",
                   "LeakyRelu", "HardSwish", "Tanh")
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in readers.get(name, []):
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if node.op_type in ("Conv", "BatchNormalization", "MaxPool", "AveragePool", *_POOLS):
                return "NCHW"
            if (node.op_type == "MatMul" and node.input[0] == name and node.input[1] in values) or \
                    (node.op_type == "LayerNormalization" and
                     next((a.i for a in node.attribute if a.name == "axis"), -1) in (-1, 3)):
                return "NHWC"  # a linear layer or a LayerNorm over the channels, last (Swin)
            if node.op_type == "Transpose" and perm in ([0, 3, 1, 2], [0, 2, 3, 1]):
                return "NHWC" if perm == [0, 3, 1, 2] else "NCHW"
            if _spatial_pool_input(node, dims, values) == name:
                axes_nhwc = [a for a in node.attribute if a.name == "axes"]
                axes = list(axes_nhwc[0].ints) if axes_nhwc else values.get(
                    node.input[1], np.array([])).tolist()
                return "NHWC" if sorted(a % 4 for a in axes) == [1, 2] else "NCHW"
            if node.op_type in elementwise:
                stack.extend(node.output)
        node = producer.get(name)
        if node is not None and node.op_type in ("Conv", "MaxPool", "AveragePool",
                                                 "BatchNormalization"):
            return "NCHW"
    return "NCHW"


def cam_weights(classifier: Classifier, target: str, head_nodes: list) -> tuple[np.ndarray | None, str]:
    """CAM's class weights W [classes, K] (arXiv:1512.04150 eq. 2, biases left out) when the head
    is global average pooling (or the mean of a token grid's tokens, no prefix tokens) -> one
    linear layer (Gemm or MatMul with constant weights), else (None, the reason)."""
    model = classifier.model
    dims, values = shapes(model), constants(model)
    core = [n for n in head_nodes if n.op_type not in _PASS_THROUGH]
    first = core[0] if core else None
    if first is None or first.op_type not in ("GlobalAveragePool", "ReduceMean") or \
            target not in (_spatial_pool_input(first, dims, values),
                           _token_pool_input(model, first, dims, values)):
        kind = first.op_type if first is not None else "nothing"
        return None, (f"CAM needs global average pooling right after the target {target!r}; "
                      f"found {kind}")
    rest = core[1:]
    if rest and rest[-1].op_type == "Add" and len(rest) == 2:
        rest = rest[:1]  # MatMul + bias
    if len(rest) == 1 and rest[0].op_type in ("Gemm", "MatMul"):
        node = rest[0]
        if node.input[1] in values:
            weights = np.asarray(values[node.input[1]], np.float32)
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            plain = not any((a.name == "transA" and a.i) or (a.name == "alpha" and a.f != 1.0)
                            for a in node.attribute)
            if weights.ndim == 2 and plain:
                return (weights if trans_b else weights.T), ""
    if len(rest) == 1 and rest[0].op_type == "Conv" and rest[0].input[1] in values:
        # a 1x1 convolution of the pooled [N, K, 1, 1] map (an all-convolutional head)
        weights = np.asarray(values[rest[0].input[1]], np.float32)
        if weights.ndim == 4 and weights.shape[2:] == (1, 1) and \
                all(a.i == 1 for a in rest[0].attribute if a.name == "group"):
            return weights[:, :, 0, 0], ""
    names = " -> ".join(f"{n.name} ({n.op_type})" for n in rest) or "nothing"
    return None, (f"the head after global average pooling is not one linear layer ({names}); "
                  "CAM needs GAP -> Gemm/MatMul/1x1 Conv -> softmax")


@dataclass(frozen=True)
class TokenGrid:
    """How a transformer's tokens [N, T, C] lie on the image: T = prefix + height * width +
    suffix, the prefix tokens (class, distillation, registers) first, then the patches row by
    row, then the suffix tokens (registers packed after the patches, as lucidrains' SimpleViT
    does)."""

    prefix: int
    height: int
    width: int
    suffix: int = 0

    def to_metadata(self) -> dict[str, int]:
        """graph_spec's META_TOKEN_GRID: prefix, height, width, and suffix when there is one."""
        found = {"prefix": self.prefix, "height": self.height, "width": self.width}
        return {**found, "suffix": self.suffix} if self.suffix else found


# More tokens beside the patches than this are not taken for class/distillation/register tokens: a
# class token and up to 16 registers ("Vision Transformers Need Registers" trained up to 16, lightly's
# CAPI ViT-B has 16, UNI2-h 8 + a class token, DINOv2 / DINOv3 4 + 1). The guesses without a patch
# embedding (a square, the patches that tile the input) try the fewest extra tokens first.
MAX_PREFIX = 17


def _ancestors(model, tensor: str) -> set[str]:
    producer = {o: n for n in model.graph.node for o in n.output}
    seen, stack = set(), [tensor]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(producer[name].input if name in producer else [])
    return seen


def _patch_offset(classifier: Classifier, tokens: str, count: int, patches: int) -> int | None:
    """How many tokens come before the patches in `tokens` [N, count, C]: read from the last
    Concat along the token axis (the first of tokens [T, N, C] laid out by `batch_first`) that
    makes `count` tokens before them, as the sum of the token
    counts of its inputs before the one input of `patches` tokens computed from the image
    (the others are learned tokens: class, distillation, registers; DINOv2's class token sliced
    off the patches counts as one of them). None when no such Concat says it."""
    model, dims = classifier.model, shapes(classifier.model)
    live, ancestors = differentiable(model, classifier.input_name), _ancestors(model, tokens)

    def token_axis(node) -> int | None:  # 1 of tokens [N, T, C], 0 of [T, N, C] (`batch_first`)
        shape, axis = dims.get(node.output[0]) or [], next((a.i for a in node.attribute if a.name == "axis"), 0)
        if len(shape) != 3 or axis % 3 not in (0, 1) or shape[axis % 3] != count:
            return None
        return axis % 3 if axis % 3 == 1 or shape[1] != count else None

    joins = [n for n in model.graph.node if n.op_type == "Concat" and n.output[0] in ancestors
             and token_axis(n) is not None]
    if not joins:
        return None
    axis = token_axis(joins[-1])
    sizes = [(dims.get(x) or [None, None])[axis] for x in joins[-1].input]
    if not all(isinstance(d, int) for d in sizes):
        return None
    carriers = [i for i, x in enumerate(joins[-1].input) if x in live and sizes[i] == patches]
    return sum(sizes[:carriers[0]]) if len(carriers) == 1 else None


def token_grid(classifier: Classifier, tokens: str, grid: tuple[int, int] | None = None,
               prefix: int | None = None) -> TokenGrid:
    """The grid of `tokens` [N, T, C]: height and width those of the patch embedding (the last
    spatial map the tokens come from: the input's size divided by its stride), or `grid`
    (--token-grid); the prefix T - h * w, or `prefix` (--prefix-tokens). ModelError when the
    tensor is no [N, T, C] (attention [N, heads, T, T] is 4-D) or its T is no prefix + h * w."""
    found = shapes(classifier.model)
    dims = found.get(tokens) or []
    if len(dims) != 3 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise ModelError(f"{tokens!r} {_symbolic(dims)} is no token tensor [N, tokens, channels] "
                         "with a fixed number of tokens and channels")
    count = dims[1]
    probed = _probe(classifier, [tokens])
    rows = int(probed[tokens].shape[0]) if probed is not None else None
    if rows not in (None, 1):
        raise ModelError(f"the tokens {tokens!r} {_symbolic(dims)} hold {rows} rows per image: they "
                         f"are windows of {count} tokens (Swin's window attention: [N * windows, "
                         "window tokens, C]), not the image's tokens; pick a layer where the windows "
                         "are put back on the image, such as a block's norm2 (Swin's default)")
    how = "given"
    maps, before = spatial_maps(classifier), _ancestors(classifier.model, tokens)
    sources = [t for t in maps if t in before
               and all(isinstance(d, int) for d in _hw(found.get(t), maps[t]))]
    # the last map whose grid the tokens make, less a prefix (Swin's last stage, not its
    # patch embedding); else the last one, named in the refusal
    fitting = [t for t in sources if 0 <= count - math.prod(_hw(found[t], maps[t])) <= MAX_PREFIX
               and prefix in (None, count - math.prod(_hw(found[t], maps[t])))]
    source = None  # the patch embedding the grid comes from
    if grid is not None and fitting:
        source = fitting[-1]
        embedded = tuple(_hw(found[fitting[-1]], maps[fitting[-1]]))
        if tuple(int(d) for d in grid) != embedded and math.prod(grid) == math.prod(embedded):
            # the same number of tokens on another grid: a transposed --token-grid lays the
            # maps out wrongly (rows as columns) and nothing else would say so
            log.warning("--token-grid %dx%d differs from the %dx%d grid of the patch embedding %r "
                        "(height x width): the maps follow --token-grid", *grid, *embedded,
                        fitting[-1])
    if grid is None:
        sources = fitting or sources
        # a guess keeps fewer extra tokens than patches (16 tokens on a 32x48 input are no 2x3
        # grid of 16-px patches behind 10 registers)
        squares = [(p, math.isqrt(count - p)) for p in range(min(MAX_PREFIX, count - 1) + 1)
                   if math.isqrt(count - p) ** 2 == count - p and prefix in (None, p) and (prefix == p or p < count - p)]
        if sources:
            source = sources[-1]
            grid = tuple(_hw(found[sources[-1]], maps[sources[-1]]))
            how = f"the patch embedding {sources[-1]!r}"
        elif squares and classifier.input_size[0] == classifier.input_size[1]:
            grid, how = (squares[0][1],) * 2, "a square"
        elif classifier.input_size[0] != classifier.input_size[1]:
            # a non-square input: the grid of patches s x s that tile it (the fewest extra tokens)
            height, width = classifier.input_size
            tiles = [(height // s, width // s) for p in range(min(MAX_PREFIX, count - 1) + 1)
                     if prefix in (None, p) and (prefix == p or p < count - p) for s in range(1, min(height, width) + 1)
                     if height % s == 0 and width % s == 0 and (height // s) * (width // s) == count - p]
            if tiles:
                grid, how = tiles[0], f"the patches that tile the {height}x{width} input"
    if grid is None:
        shape = "no square" if classifier.input_size[0] == classifier.input_size[1] else \
            "no patches that tile the input"
        raise ModelError(f"the tokens {tokens!r} {_symbolic(dims)} form no grid that camface "
                         f"recognises (no patch embedding before them, {shape}); pass "
                         "--token-grid HxW and --prefix-tokens N")
    height, width = int(grid[0]), int(grid[1])
    # the extra tokens go first, unless the Concat that adds them puts some after the patches
    offset = _patch_offset(classifier, tokens, count, height * width)
    if prefix is None:
        prefix = count - height * width if offset is None else offset
    prefix = int(prefix)
    suffix = count - height * width - prefix if offset == prefix else 0
    if height <= 0 or width <= 0 or not 0 <= prefix <= MAX_PREFIX or \
            not 0 <= suffix <= MAX_PREFIX - prefix or prefix + height * width + suffix != count:
        raise ModelError(f"the tokens {tokens!r} {_symbolic(dims)} are not {prefix} prefix "
                         f"tokens + a {height}x{width} grid ({how}): {count} != {prefix} + "
                         f"{height * width}{f' + {suffix} after the patches' if suffix else ''}; "
                         f"pass --token-grid HxW and --prefix-tokens N (at most {MAX_PREFIX} prefix "
                         "tokens)")
    if source is not None and tuple(_hw(found[source], maps[source])) == (height, width):
        _check_patch_order(classifier, tokens, source, maps[source], (height, width))
    return TokenGrid(prefix, height, width, suffix)


def _probe(classifier: Classifier, names: list[str]) -> dict[str, np.ndarray] | None:
    """The tensors `names` when the model runs one image of uniform noise in [0, 1) (seed 0);
    None when the model does not run here (the self-check says why later)."""
    import onnx
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(classifier.model)
    types, outputs = elem_types(probe), {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(name, types.get(name, FLOAT), None)
                              for name in dict.fromkeys(names) if name not in outputs)
    height, width = classifier.input_size
    image = ((1, classifier.channels, height, width) if classifier.input_layout == "NCHW"
             else (1, height, width, classifier.channels))
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(probe.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        noise = np.random.default_rng(0).random(image, dtype=np.float32)
        return dict(zip(names, session.run(names, {classifier.input_name: noise})))
    except Exception as exc:  # ONNX Runtime raises its own types
        log.debug("%s not probed: %s", ", ".join(names), exc)
        return None


_LAYOUT_OPS = ("Reshape", "Flatten", "Transpose", "Identity", "Squeeze", "Unsqueeze")


def _check_patch_order(classifier: Classifier, tokens: str, source: str, layout: str,
                       grid: tuple[int, int]) -> None:
    """ModelError when the patch tokens [N, h * w, C] that only reshapes and transposes make of
    the patch embedding `source` take the patches column by column: camface lays tokens out
    row by row (x.flatten(2).transpose(1, 2), as ViT, DeiT and Swin do). Checked on one run:
    such ops copy values, so the tokens equal the map's values in one order exactly."""
    model, dims = classifier.model, shapes(classifier.model)
    producer = {o: n for n in model.graph.node for o in n.output}
    height, width = grid
    ancestors = _ancestors(model, tokens)
    carriers = []  # (tensor, its token axis: 0 of patches [h * w, N, C] (`batch_first`), else 1)
    for node in model.graph.node:
        out = node.output[0] if node.output else ""
        shape = dims.get(out) or []
        if out not in ancestors or len(shape) != 3 or height * width not in shape[:2]:
            continue
        walk = out
        while walk in producer and producer[walk].op_type in _LAYOUT_OPS and walk != source:
            walk = producer[walk].input[0]
        if walk == source:
            carriers.append((out, 1 if shape[1] == height * width else 0))
    if not carriers:
        return
    carrier, axis = carriers[-1]  # the nearest the tokens (x.flatten(2) is [N, C, h * w] before)
    found = _probe(classifier, [source, carrier])
    if found is None:
        return
    patches, laid = found[carrier][0] if axis else found[carrier][:, 0], found[source][0]
    laid = laid.transpose(1, 2, 0) if layout == "NCHW" else laid  # [h, w, C]
    if laid.shape[:2] != (height, width) or patches.shape != (height * width, laid.shape[2]):
        return
    if not np.array_equal(patches, laid.reshape(height * width, -1)) and \
            np.array_equal(patches, laid.transpose(1, 0, 2).reshape(height * width, -1)):
        raise ModelError(f"the patch tokens {carrier!r} of {tokens!r} come column by column from "
                         f"the patch embedding {source!r} (token i is patch (i % {height}, i // "
                         f"{height}) of the {height}x{width} grid); camface lays tokens out row by "
                         "row, as ViT, DeiT and Swin flatten them (x.flatten(2).transpose(1, 2)): "
                         "flatten the patches row by row in the model before exporting it")


def with_token_grid(classifier: Classifier, tokens: str, grid: TokenGrid) -> tuple[Classifier, str]:
    """(the classifier rewritten, the grid tensor): the patch tokens of `tokens` [N, T, C] laid
    out as an NHWC map [N, h, w, C] that the model's own readers of `tokens` read back through
    (prefix tokens, then the map reshaped to [N, h * w, C], then the suffix tokens). The values
    are the model's; the map is a target like any spatial map: its gradient is the tokens'
    gradient, rearranged."""
    import dataclasses

    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(classifier.model)
    graph = model.graph
    channels = shapes(model)[tokens][2]
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer}

    def fresh(hint):
        name, index = f"{tokens}/{hint}", 1
        while name in taken:
            index += 1
            name = f"{tokens}/{hint}_{index}"
        taken.add(name)
        return name

    def ints(hint, values):
        name = fresh(hint)
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    axis, count = ints("token_axis", [1]), grid.prefix + grid.height * grid.width
    patches, laid, back, joined = fresh("patches"), fresh("grid"), fresh("patches_back"), \
        fresh("tokens_back")
    added = [helper.make_node("Slice", [tokens, ints("first_patch", [grid.prefix]),
                                        ints("token_count", [count]), axis], [patches],
                              name=fresh("slice_patches")),
             helper.make_node("Reshape", [patches, ints("grid_shape", [-1, grid.height,
                                                                       grid.width, channels])],
                              [laid], name=fresh("reshape_grid")),
             helper.make_node("Reshape", [laid, ints("patches_shape", [-1, grid.height
                                                                       * grid.width, channels])],
                              [back], name=fresh("reshape_back"))]
    added[1].metadata_props.add(key=TOKEN_GRID, value=f"{grid.prefix}+{grid.height}x{grid.width}")
    parts = [back]
    if grid.prefix:
        parts.insert(0, fresh("prefix"))
        added.append(helper.make_node("Slice", [tokens, ints("zero", [0]), added[0].input[1], axis],
                                      [parts[0]], name=fresh("slice_prefix")))
    if grid.suffix:
        parts.append(fresh("suffix"))
        added.append(helper.make_node("Slice", [tokens, added[0].input[2],
                                                ints("all_tokens", [count + grid.suffix]), axis],
                                      [parts[-1]], name=fresh("slice_suffix")))
    if len(parts) > 1:
        added.append(helper.make_node("Concat", parts, [joined], axis=1, name=fresh("concat_tokens")))
    else:
        joined = back
    nodes = list(graph.node)
    at = next((i + 1 for i, n in enumerate(nodes) if tokens in n.output), 0)
    for node in nodes[at:]:
        node.input[:] = [joined if x == tokens else x for x in node.input]
    del graph.node[:]
    graph.node.extend(nodes[:at] + added + nodes[at:])
    return dataclasses.replace(classifier, model=prepare(model, where="the token grid")), laid


def _attentions(classifier: Classifier) -> list:
    """The self-attentions of T tokens to T tokens, in graph order: Softmax nodes of attention
    probabilities [N, heads, T, T] (not the model's own output), and ONNX's Attention nodes
    (opset 23: torch's dynamo exporter writes one for each F.scaled_dot_product_attention; their
    probabilities stay inside the op) whose queries and keys number the same T
    (`_attended_tokens`). Each user reads only the node's inputs, its first output and T."""
    dims = shapes(classifier.model)
    found = []
    for node in classifier.model.graph.node:
        if node.op_type == "Softmax":
            shape = dims.get(node.output[0]) or []
            if node.output[0] != classifier.output_name and len(shape) == 4 and shape[2] == shape[3]:
                found.append(node)
        elif node.op_type == "Attention" and _attended_tokens(node, dims) is not None:
            found.append(node)
    return found


def _attended_tokens(node, dims) -> int | str | None:
    """T of a self-attention node from `_attentions`: a Softmax's last axis [N, heads, T, T], an
    Attention's query length (Q [N, heads, T, head size] or [N, T, hidden]) when its keys
    (K, of the same rank) number the same; None when they do not (cross-attention) or are unknown."""
    if node.op_type == "Softmax":
        return dims[node.output[0]][3]
    query, key = (dims.get(x) or [] for x in node.input[:2])
    if len(query) != len(key) or len(query) not in (3, 4):
        return None
    axis = len(query) - 2
    return query[axis] if query[axis] == key[axis] else None


# Elementwise activations between an all-convolutional head's class-score convolution and its
# global pooling (SqueezeNet's ReLU)
_SCORE_ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Clip", "HardSwish",
                      "Softplus", "Identity", "Dropout")


def class_score_input(classifier: Classifier, target: str) -> str | None:
    """When `target`, the map the global pooling reads, holds the class scores themselves (an
    all-convolutional head: a convolution to one channel per class, an activation (ReLU), the
    pooling, then only reshapes to the logits, as SqueezeNet's and NiN's), the feature map that
    convolution reads (SqueezeNet's `features`, pytorch-grad-cam's choice; the score map's
    channels are classes, not features); else None. Without an activation between the
    convolution and the pooling (the bundled emotion model's conv2d_7 -> GAP) the class-score
    map stays: its class channel is exactly CAM of the map before, the study's choice."""
    model = classifier.model
    dims, values = shapes(model), constants(model)
    nodes = head(model, target, classifier.logits)
    pools = [n for n in nodes if _spatial_pool_input(n, dims, values) == target]
    if len(pools) != 1 or any(n.op_type not in _PASS_THROUGH for n in nodes if n is not pools[0]):
        return None  # a linear layer (or anything else) after the pooling: the map holds features
    producer = {o: n for n in model.graph.node for o in n.output}
    node, activations = producer.get(target), 0
    while node is not None and node.op_type in _SCORE_ACTIVATIONS:
        activations += node.op_type not in ("Identity", "Dropout")
        node = producer.get(node.input[0])
    grid = spatial_maps(classifier)
    if not activations or node is None or node.op_type != "Conv" or len(node.input) < 2 \
            or node.input[1] not in values or any(a.name == "group" and a.i != 1 for a in node.attribute) \
            or values[node.input[1]].shape[0] != classifier.num_classes:
        return None
    source = node.input[0]
    while source in producer and producer[source].op_type in ("Identity", "Dropout"):
        source = producer[source].input[0]
    size = _hw(dims.get(source), grid.get(source, "NCHW"))
    if source not in grid or len(size) != 2 or not all(isinstance(d, int) for d in size) or \
            math.prod(size) <= 1:
        return None
    return source


def default_mlp_target(classifier: Classifier, target: str) -> str | None:
    """A hierarchical transformer's default target: the tokens that the MLP after the last
    attention reads (Swin's layers[-1].blocks[-1].norm2, pytorch-grad-cam's choice), [N, h * w, C]
    or an NHWC stage [N, h, w, C], when the default map `target` (the pooled one) follows the last
    attention with no convolution between; None otherwise (CNNs, and hybrids such as MobileViT,
    whose convolutions read their attention's output)."""
    model = classifier.model
    attentions = _attentions(classifier)
    if not attentions:
        return None
    after, before = differentiable(model, attentions[-1].output[0]), _ancestors(model, target)
    between = [n for n in model.graph.node if any(x in after for x in n.input)
               and any(o in before for o in n.output)]
    if not before & after or any(n.op_type in _GRID_MAKERS for n in between):
        return None
    values = constants(model)
    linear = [n for n in between if n.op_type in ("MatMul", "Gemm") and n.input[1] in values]
    # the attention's output projection, then the MLP's first layer
    return linear[1].input[0] if len(linear) >= 2 else None


def default_token_target(classifier: Classifier) -> str | None:
    """A vision transformer's default target: the tokens [N, T, C] that the last attention's
    queries, keys and values are computed from (the input of its qkv linear layer: ViT and
    DeiT's blocks[-1].norm1), or [T, N, C] where the qkv layer reads tokens first
    (nn.MultiheadAttention: the tokens [N, T, C] it transposes with batch_first=True, the
    previous encoder layer's output; `batch_first` lays [T, N, C] out as [N, T, C]); None when
    the model has no attention [N, heads, T, T]."""
    model = classifier.model
    dims = shapes(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    attentions = _attentions(classifier)
    if not attentions:
        return None
    count = _attended_tokens(attentions[-1], dims)
    values = constants(model)
    seen, queue = set(), list(attentions[-1].input)
    while queue:  # breadth first: the nearest linear layer of tokens, q, k and v's
        name = queue.pop(0)
        if name in seen or name not in producer:
            continue
        seen.add(name)
        node = producer[name]
        if node.op_type in ("Shape", "Size"):
            # sizes, not values: nn.MultiheadAttention's views read the shape of its input, which
            # would lead back past it to the previous block's MLP
            continue
        weight = node.input[1] if len(node.input) > 1 else ""
        while weight in producer and producer[weight].op_type == "Identity":
            weight = producer[weight].input[0]  # a weight shared with an equal layer (nn.TransformerEncoder's copies)
        if node.op_type in ("MatMul", "Gemm") and weight in values:
            shape = dims.get(node.input[0]) or []
            if len(shape) == 3 and shape[1] == count:
                return node.input[0]
            if len(shape) == 3 and shape[0] == count:  # [T, N, C]: nn.MultiheadAttention's layout
                before = producer.get(node.input[0])
                if before is not None and before.op_type == "Transpose" and \
                        _perm(before) == [1, 0, 2] and (dims.get(before.input[0]) or [None] * 3)[1] == count:
                    return before.input[0]  # batch_first=True: the tokens [N, T, C] it was given
                return node.input[0]
        queue.extend(node.input)
    return None


def _perm(node) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def tokens_first(classifier: Classifier, tokens: str) -> bool:
    """Whether `tokens` are laid out [T, N, C], the token axis first (nn.TransformerEncoder and
    nn.MultiheadAttention with batch_first=False): their first axis is fixed and their second
    the batch (symbolic), or their first is the token count T of an attention and their second
    is not."""
    dims = shapes(classifier.model).get(tokens) or []
    if len(dims) != 3:
        return False
    counts = {_attended_tokens(n, shapes(classifier.model)) for n in _attentions(classifier)}
    return isinstance(dims[0], int) and (not isinstance(dims[1], int) or dims[0] in counts and dims[1] not in counts)


def batch_first(classifier: Classifier, tokens: str) -> tuple[Classifier, str]:
    """(the classifier, the tokens [N, T, C]): `tokens` themselves when they are [N, T, C]; when
    they are [T, N, C] (`tokens_first`), the classifier rewritten to transpose them to [N, T, C]
    and its readers to read them back through a second transpose (the same values), and that
    [N, T, C] tensor, which `token_grid` and `with_token_grid` take as any other."""
    import dataclasses

    import onnx
    from onnx import helper

    if not tokens_first(classifier, tokens):
        return classifier, tokens
    model = onnx.ModelProto()
    model.CopyFrom(classifier.model)
    graph = model.graph
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer}
    names = []
    for hint in ("batch_first", "tokens_first"):
        name, index = f"{tokens}/{hint}", 1
        while name in taken:
            index += 1
            name = f"{tokens}/{hint}_{index}"
        taken.add(name)
        names.append(name)
    added = [helper.make_node("Transpose", [tokens], [names[0]], perm=[1, 0, 2], name=names[0]),
             helper.make_node("Transpose", [names[0]], [names[1]], perm=[1, 0, 2], name=names[1])]
    nodes = list(graph.node)
    at = next((i + 1 for i, n in enumerate(nodes) if tokens in n.output), 0)
    for node in nodes[at:]:
        node.input[:] = [names[1] if x == tokens else x for x in node.input]
    del graph.node[:]
    graph.node.extend(nodes[:at] + added + nodes[at:])
    return dataclasses.replace(classifier, model=prepare(model, where="the token layout")), names[0]
