"""The methods that run part of the model again (`camface.methods` HEAD / FORWARD: Ablation-CAM,
Score-CAM) written into a finished CAM graph, whatever made it: tf2onnx (Keras), camface's ONNX
engine, int8 quantisation.

Inside the graph they find three tensors: the target (`activations` followed back through Identity,
Transpose and int8 QDQ nodes to a tensor the logits read), the logits (the input of the Softmax /
Sigmoid that `probs` comes from) and the normalised input (`image` cast, then scaled and offset per
channel: NHWC float32). The head is every node between the target and the logits, the model every
node between the normalised input and the logits (with the nodes that compute a head's indices or
shapes from the batch size of the graph's input, torch.export's as_strided, `x.shape[0]`, which the
clones compute from their own rows); each is cloned, once per chunk of `chunk` variants of every
crop (at most N * chunk rows at a time, so memory does not grow with the number of channels):
unrolled into the graph up to MAX_UNROLLED chunks, beyond that once, into the body of an ONNX Loop
over the chunks. The clones read the graph's own initializers (from the outer scope in a Loop): the
file grows by the clones' nodes only, never by a weight.

`attach` adds them and checks them against the numpy reference (`methods.ModelCalls` around ONNX
Runtime sessions of the same graph's head and model; the reference reruns one variant per chunk,
so that every clone or Loop iteration is run once, and takes the other channels' scores from the
graph, whose map is then checked on all of them: `SampledCalls`), each map's tolerance widened by
what a few ulps of its activations, class logits and scores do to it (`conditioning`, as
export/onnx_verify.py widens the other methods'); `camface export` calls it after the graph's own
self-check. int8 quantisation takes them out (`without`) and adds them back to the
int8 graph (export/int8.py), so Score-CAM runs the int8 features an int8 graph runs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from camface import graph_spec, methods
from camface.errors import ModelError
from camface.export.onnx_builder import GraphBuilder
from camface.export.onnx_ops import OnnxOps, OnnxTensor
from camface.realtime.graph import reads, upstream

log = logging.getLogger(__name__)

PREFIX = "camface/rerun/"  # the names of every node and tensor `add` writes
MODEL_CLONE = f"{PREFIX}model_"  # the names of the nodes of the clones of the whole model
MAX_PASS_BYTES = 2 << 30  # one chunk's largest tensor may hold this much (float32 bytes)
# Passes up to this many chunks are unrolled into the graph, one clone each: in a Loop's body the
# bundled model's forward pass ran 2-3x slower than in the main graph (about what ONNX Runtime's
# basic optimisation level gives the main graph: its layout optimisations seem not to reach
# subgraphs; benchmarks/gradient_free.py, bench --compare-heads). More chunks (ResNet-50's 2048 channels: 128
# Score-CAM chunks) run in a Loop, one clone, so the graph does not grow with the channels.
MAX_UNROLLED = 32
_NORMALISING = ("Cast", "Mul", "Add", "Sub", "Div")
_FINAL = ("Softmax", "Sigmoid")
_TO_ACTIVATIONS = ("Identity", "Transpose", "QuantizeLinear", "DequantizeLinear")  # target -> `activations`


def rerun_names(names) -> tuple[str, ...]:
    """The methods among `names` that run the head or the model again."""
    return tuple(n for n in names if n in methods.METHODS and methods.get(n).reruns)


def asked(heads) -> tuple[str, ...]:
    """The methods that run the model again named in `heads` (ExportOptions.heads; None: the
    default set, in which one that cannot be added is left out instead of failing the export)."""
    return () if heads is None else rerun_names(heads)


@dataclass(frozen=True)
class Anatomy:
    """Where a CAM graph's target, logits and normalised input are, and the nodes between."""

    target: str
    target_perm: tuple[int, ...] | None  # NHWC rows -> the target's layout (None: NHWC)
    logits: str
    num_classes: int
    images: str  # the normalised input, float32 [N, H, W, C]
    image_dims: tuple[int, int, int]
    feature_dims: tuple[int, int, int]
    head_nodes: tuple | None  # None: the head cannot run alone (`head_problem` says why)
    model_nodes: tuple
    shapes: dict  # tensor -> dims, inferred (onnx_model.shapes)
    head_problem: str = ""
    # (tensor, its batch axis): tensors beside the target the head reads, [N, ...] or [T, N, C] (`_sides`)
    head_sides: tuple[tuple[str, int], ...] = ()
    head_shapes: tuple = ()  # (tensor, int64 vector): shapes the head's Reshapes read instead (`_sides`)

    def nodes_for(self, method) -> tuple:
        """The nodes `method` (a methods.Method) runs again: the model's (FORWARD) or the head's
        (HEAD); ModelError when the head cannot run alone (it also reads a tensor computed from the
        input beside the target: a transformer's residual stream or class token at a norm target;
        Score-CAM, which runs the whole model, still can)."""
        if methods.FORWARD in method.needs:
            return self.model_nodes
        if self.head_nodes is None:
            raise ModelError(self.head_problem)
        return self.head_nodes


def _producers(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


def _descendants(graph, start: set[str]) -> set[str]:
    live = set(start)
    for node in graph.node:
        if any(x in live for x in reads(node)):
            live.update(node.output)
    return live


def _open_batch(shapes: dict | None, name: str) -> bool:
    """Whether `name`'s first dimension is named but not fixed (inferred dims; a scalar, or a tensor
    whose shape inference left unknown, has none)."""
    dims = (shapes or {}).get(name) or [None]
    return isinstance(dims[0], str)


def _open(shapes: dict | None, name: str) -> bool:
    """Whether one of `name`'s dimensions is named but not fixed (inferred dims): the batch of a
    tensor [N, ...], or of one that holds it on another axis (the residual stream [T, N, C] of an
    nn.TransformerEncoder with batch_first=False); which axis is the batch, `_sides` tells."""
    return any(isinstance(d, str) for d in (shapes or {}).get(name) or ())


def between(graph, start: str, end: str, shapes: dict | None = None, sides: list | None = None,
            batches: list | None = None) -> tuple:
    """The nodes that depend on `start` and that `end` depends on, in graph order. Raises
    ModelError when one of them also reads a tensor computed from the graph's inputs some other
    way (its batch would not be the clone's), unless that tensor depends on them only through
    their batch size (`_from_batch`; shapes: tensor -> inferred dims): then the nodes computing
    it are among those returned, reading the batch size of `start` instead. With a list `sides`,
    such a tensor with an open dimension (a transformer's class token or residual stream beside
    a norm target, [N, ...] or [T, N, C]), or that a Reshape reads as its shape (Swin's `view(n, h, w, c)` of
    another tensor's sizes), is appended to it instead, for `_sides` to judge. With a list
    `batches`, the batch size may also be read from a tensor whose open first dimension shape
    inference named otherwise than `start`'s (a Swin .pt2's as_strided indices, counted from the
    input's batch where the target's is unk__30): those tensors are appended to it, for `_sides`
    to check with ONNX Runtime that their first dimension is `start`'s."""
    live = _descendants(graph, {start})
    producer = _producers(graph)
    needed, stack = set(), [end]
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if tensor in needed or tensor == start or node is None or tensor not in live:
            continue
        needed.add(tensor)
        stack.extend(reads(node))
    nodes = tuple(n for n in graph.node if any(o in needed for o in n.output))
    inputs = _descendants(graph, {i.name for i in graph.input})
    sized = {}
    for node in nodes:
        outside = [x for x in reads(node) if x not in live and x in inputs]
        found = _from_batch(graph, outside, start, shapes, inputs, batches) if outside and shapes else None
        # ONNX's inference names the batch afresh after some ops (unk__1, unk__4): which open
        # dimension is the batch, ONNX Runtime says (`anatomy`: `_sides`)
        if outside and found is None and sides is not None and _open_batch(shapes, start) \
                and all(_open(shapes, x) or (node.op_type == "Reshape" and x == node.input[1])
                        for x in outside):
            sides.extend(x for x in outside if x not in sides)
            continue
        if outside and found is None:
            raise ModelError(f"node {node.name!r} ({node.op_type}) between {start!r} and {end!r} also reads "
                             f"{outside[0]!r}, computed from the graph's input without passing through "
                             f"{start!r}: it cannot be run again on modified copies")
        sized.update(found or {})
    if not sized:
        return nodes
    order = {id(n): i for i, n in enumerate(graph.node)}
    return tuple(n for _, n in sorted([*sized.items(), *((order[id(n)], n) for n in nodes)], key=lambda x: x[0]))


def _from_batch(graph, tensors, start: str, shapes: dict, inputs: set, batches: list | None = None) -> dict | None:
    """{position in the graph: node} computing `tensors` from the graph's input through its batch
    size alone, read by a Shape of a tensor whose first dimension is `start`'s (same symbol):
    Shape with start 0, end 1 (torch.export writes a reshape after global pooling as a Gather
    whose indices count the rows from the input's Shape), or a Shape from 0 (any end, the whole
    shape) whose first element a Gather (constant indices all 0: 0, [0], or their negative form
    -rank; axis 0) or a Slice (0:1, or -rank:1, of axis 0) takes, through Casts (the legacy torch
    exporter's and hand-written `x.shape[0]`, tf2onnx's `tf.shape(x)[0]`); their constants
    initializers or Constant nodes (`value`, `value_int`, `value_ints`). Those Shape nodes are
    copied to read `start` (the batch of a rerun is that of its rows: the clone computes what the
    model computes on that many inputs), the nodes after them kept as they are; None when one of
    `tensors` depends on the input in any other way (another element of a shape: the channels,
    the image size). With a list `batches`, a Shape of a tensor whose first dimension is open
    but named otherwise than `start`'s (also open) counts too, that tensor appended to `batches`
    when all of `tensors` are found (`between`)."""
    from onnx import NodeProto

    from camface.export import onnx_model

    batch = (shapes.get(start) or [None])[0]
    where = {o: (i, n) for i, n in enumerate(graph.node) for o in n.output}
    assumed = []  # the tensors whose open first dimension is taken for `start`'s

    def batch_shape(index, node, whole: bool):
        """{index: node reading `start`} when `node` is a Shape from 0 (to 1 unless `whole`) of a
        tensor of the batch; else None."""
        bounds = {a.name: a.i for a in node.attribute}
        if node.op_type != "Shape" or batch is None or bounds.get("start", 0) != 0 or \
                not (whole or bounds.get("end") == 1):
            return None
        if (shapes.get(node.input[0]) or [None])[0] != batch:
            # ONNX's inference names the batch afresh after some ops: ONNX Runtime says (`_sides`)
            if batches is None or not (_open_batch(shapes, start) and _open_batch(shapes, node.input[0])):
                return None
            assumed.append(node.input[0])
        copy = NodeProto()
        copy.CopyFrom(node)
        copy.input[0] = start
        return {index: copy}

    def first_of_shape(node):
        """{index: node} of the Shape of a tensor of the batch whose first element `node` (Gather,
        Slice) takes, and of the Casts between; None when it is not that."""
        length = (shapes.get(node.input[0]) or [None])[0] if node.input else None
        if not _takes_first(node, lambda name: onnx_model.constant(graph, name), length):
            return None
        found, tensor = {}, node.input[0]
        while tensor in where and where[tensor][1].op_type == "Cast":
            index, cast = where[tensor]
            found[index], tensor = cast, cast.input[0]
        shape = batch_shape(*where[tensor], whole=True) if tensor in where else None
        return None if shape is None else {**found, **shape}

    found, stack, seen = {}, list(tensors), set()
    while stack:
        tensor = stack.pop()
        if tensor in seen or tensor not in inputs:
            continue
        seen.add(tensor)
        if tensor not in where:
            return None  # the graph's input itself
        index, node = where[tensor]
        if node.op_type == "Shape":
            shape = batch_shape(index, node, whole=False)
            if shape is None:
                return None
            found.update(shape)
            continue
        first = first_of_shape(node)
        found[index] = node
        if first is not None:
            found.update(first)
            continue
        stack.extend(reads(node))
    if batches is not None:
        batches.extend(x for x in assumed if x not in batches)
    return found


def _takes_first(node, value, length=None) -> bool:
    """Whether `node` takes the first element of a 1-D tensor (a shape) of `length` elements
    (an int when known): Gather of constant indices 0 or [0] on axis 0, or Slice 0:1 (step 1)
    of axis 0, its bounds inputs (opset 10+) or attributes (before); index and start 0 may be
    written -length. value: tensor name -> its constant value, or None."""
    first = (0, -length) if isinstance(length, int) and length > 0 else (0,)
    attributes = {a.name: (list(a.ints) if a.ints else a.i) for a in node.attribute}

    def constant(position, default=None):
        name = node.input[position] if len(node.input) > position else ""
        if not name:
            return default
        found = value(name)
        return None if found is None else np.asarray(found).reshape(-1).tolist()

    if node.op_type == "Gather":
        indices = constant(1)
        return attributes.get("axis", 0) in (0, -1) and bool(indices) and all(i in first for i in indices)
    if node.op_type != "Slice":
        return False
    if len(node.input) > 1:
        bounds = [constant(1), constant(2), constant(3, [0]), constant(4, [1])]
    else:
        bounds = [attributes.get("starts"), attributes.get("ends"), attributes.get("axes", [0]), [1]]
    return bounds[0] in [[i] for i in first] and bounds[1] == [1] and bounds[2] in ([0], [-1]) and bounds[3] == [1]


def normalising(graph, values: dict) -> list:
    """The nodes that turn a CAM graph's uint8 `image` into the model's normalised float input
    (Cast, then Mul / Add / Sub / Div by constants), in order: from `image`, each the only reader
    of the previous one's output. values: the graph's constants (onnx_model.constants)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    chain, tensor = [], graph_spec.INPUT_IMAGE
    while True:
        users = consumers.get(tensor, [])
        step = users[0] if len(users) == 1 else None
        if step is None or step.op_type not in _NORMALISING or \
                any(x != tensor and x not in values for x in step.input):
            return chain
        chain.append(step)
        tensor = step.output[0]


def anatomy(model) -> Anatomy:
    """The target, logits and normalised input of a CAM graph (onnx.ModelProto, shapes
    inferred). Raises ModelError naming what is missing."""
    from camface.export import onnx_model

    graph = model.graph
    producer = _producers(graph)
    names = {o.name for o in graph.output}
    if not {graph_spec.OUTPUT_PROBS, graph_spec.OUTPUT_ACTIVATIONS} <= names:
        raise ModelError("not a CAM graph: it needs `probs` and `activations` outputs")
    probs = graph_spec.OUTPUT_PROBS
    # through what a model may write after its Softmax (tf2onnx's output Identity, a Reshape)
    while probs in producer and producer[probs].op_type in ("Identity", "Reshape", "Flatten", "Squeeze"):
        probs = producer[probs].input[0]
    final = producer.get(probs)
    if final is None or final.op_type not in _FINAL:
        raise ModelError(f"the CAM graph's probs come from {final.op_type if final else 'nowhere'}, "
                         f"not from {' or '.join(_FINAL)} of the logits")
    logits = final.input[0]
    # the target: the first tensor behind `activations` (through layout and int8 QDQ nodes) that
    # the logits read
    before_logits = upstream(producer, [logits])
    target, perm = graph_spec.OUTPUT_ACTIVATIONS, None
    while target not in before_logits:
        node = producer.get(target)
        if node is None or node.op_type not in _TO_ACTIVATIONS:
            raise ModelError(f"the CAM graph's activations come from {node.op_type if node else 'nowhere'} "
                             "rather than from a tensor the logits read")
        if node.op_type == "Transpose":
            forward = [list(a.ints) for a in node.attribute if a.name == "perm"][0]
            perm = tuple(int(i) for i in np.argsort(forward))
        target = node.input[0]
    chain = normalising(graph, onnx_model.constants(model))
    images = chain[-1].output[0] if chain else graph_spec.INPUT_IMAGE
    if images == graph_spec.INPUT_IMAGE:
        raise ModelError("the CAM graph's image is not cast to float where camface can find it")
    shapes = onnx_model.shapes(onnx_model.prepare(model, where="the CAM graph"))

    def dims(name, what):
        found = shapes.get(name) or []
        if len(found) != 4 or not all(isinstance(d, int) for d in found[1:]):
            raise ModelError(f"the CAM graph's {what} {name!r} has no static [N, h, w, C] shape ({found})")
        return tuple(int(d) for d in found[1:])

    image_dims = dims(images, "normalised input")
    feature_dims = dims(graph_spec.OUTPUT_ACTIVATIONS, "activations")
    num_classes = (shapes.get(graph_spec.OUTPUT_PROBS) or [None, None])[-1]
    if not isinstance(num_classes, int):
        raise ModelError("the CAM graph's probs have no static number of classes")
    sides, batches, fixed = [], [], ()
    try:
        head_nodes, head_problem = between(graph, target, logits, shapes, sides, batches), ""
        sides, fixed = _sides(model, target, sides, head_nodes, batches)
    except ModelError as exc:
        head_nodes, head_problem, sides = None, str(exc), []
    return Anatomy(target, perm, logits, num_classes, images, image_dims, feature_dims,
                   head_nodes, between(graph, images, logits), shapes, head_problem, tuple(sides), fixed)


def _sides(model, target: str, sides: list, head_nodes, batches=()) -> tuple[list, tuple]:
    """(((tensor, batch axis), ...), ((tensor, int64 vector), ...)) that the head's clones read
    beside their rows, from `between`'s `sides`, as ONNX Runtime computes them on 1 and on 2 crops
    (where `between`'s `batches`, the tensors whose batch size the head's clones read from their
    own rows instead, must have the target's first dimension, 1, 2, then 3 on 3 crops):
    - a tensor one of whose axes is the batch (1 long on 1 crop, 2 on 2, the others alike: the
      first of [N, ...], the second of an nn.TransformerEncoder's residual stream [T, N, C] with
      batch_first=False), each crop's slice along it its own (on two zero crops both are the one
      crop's: a ViT's class token, the residual stream beside a norm target; not indices that
      count the rows): each crop's value in the graph's forward pass, repeated along that axis
      for each of its variants, as a forward hook replacing the target's output leaves it
      (`OnnxModelOps._pass`);
    - a shape that only Reshapes read, whose one element that changes with the batch is the
      batch (1, then 2), no other -1: that element is -1 in the clones' copy, so they reshape
      their own rows (Swin's `view(n, h, w, c)`).
    Raises ModelError naming the first other one: it cannot run again on modified copies."""
    if not sides and not batches:
        return [], ()
    from camface.export.onnx_fold import probe_values

    # 3 crops too when a batch size is read: rows that are the batch on 1 and 2 crops only (x[:2]'s)
    sizes = (1, 2, 3) if batches else (1, 2)
    runs = probe_values(model, [target, *sides, *batches], sizes)
    if runs is None:
        raise ModelError(f"the head after {target!r} also reads {[*sides, *batches][0]!r}, computed beside it from "
                         "the graph's input, and the graph did not run on zeros to say how: it cannot be run again "
                         "on modified copies")
    ones, twos, *more = ({name: v for name, v in zip([target, *sides, *batches], run)} for run in runs)
    for name in batches:
        # the indices the head computes from this tensor's batch size are the clones' when it is
        # the target's: a Swin's window count (N * windows rows) is not
        found = [v[name].shape[0] if v[name].ndim else None for v in (ones, twos, *more)]
        if found != list(sizes) or found != [v[target].shape[0] if v[target].ndim else None
                                             for v in (ones, twos, *more)]:
            raise ModelError(f"the head after {target!r} reads the batch size of {name!r}, which is not the "
                             f"target's ({found[0]} rows on 1 crop, {found[1]} on 2, {found[2]} on 3): it cannot be "
                             "run again on modified copies")
    rows, fixed = [], []
    for name in [target, *sides]:
        one, two = ones[name], twos[name]
        as_shape = all(n.op_type == "Reshape" and list(n.input).index(name) == 1
                       for n in head_nodes if name in n.input)
        changed = np.flatnonzero(one != two) if one.shape == two.shape else None
        # the crop's own rows: on two zero crops, each row is the one crop's (an index tensor that
        # counts the rows, torch.export's as_strided after Swin's permute, is not: its clones would
        # all read the first row)
        axis = _batch_axis(one, two)
        follows = axis == 0 if name == target else axis is not None
        if follows and name != target and not _one_crops_rows(np.moveaxis(one, axis, 0)[0],
                                                               np.moveaxis(two, axis, 0)):
            raise ModelError(f"the head after {target!r} also reads {name!r}, computed beside it from the graph's "
                             "input, whose rows on two identical crops differ from the one crop's (it counts the "
                             "rows, as torch.export's as_strided indices do): it cannot be run again on modified "
                             "copies")
        if follows:
            if name != target:
                rows.append((name, axis))
        elif (name != target and as_shape and one.ndim == 1 and one.dtype == np.int64 and changed is not None
              and len(changed) == 1 and (one[changed[0]], two[changed[0]]) == (1, 2) and -1 not in one):
            vector = one.copy()
            vector[changed[0]] = -1
            fixed.append((name, vector))
        else:
            raise ModelError(f"the head after {target!r} also reads {name!r}, computed beside it from the graph's "
                             f"input, neither the crop's own rows (shape {list(one.shape)} on 1 crop, "
                             f"{list(two.shape)} on 2) nor a shape of them: it cannot be run again on modified "
                             "copies")
    return rows, tuple(fixed)


def _batch_axis(one, two) -> int | None:
    """The axis that holds the crops of a tensor computed on 1 crop (`one`) and on 2 (`two`):
    the only one 1 long, then 2, every other axis alike; None when there is no such axis, or
    several (a scalar, a shape, a tensor whose size grows otherwise with the batch)."""
    if one.ndim != two.ndim or not one.ndim:
        return None
    grown = [a for a in range(one.ndim) if (one.shape[a], two.shape[a]) == (1, 2)]
    alike = all(one.shape[a] == two.shape[a] for a in range(one.ndim) if a not in grown)
    return grown[0] if len(grown) == 1 and alike else None


def _one_crops_rows(row, rows) -> bool:
    """Whether both rows [2, ...] (two identical crops) are `row` (the one crop's): integers
    exactly (indices that count the rows differ by a row's size), floats up to rounding (ONNX
    Runtime's kernels may add a batch of 2 in another order than a batch of 1)."""
    if not np.issubdtype(row.dtype, np.floating):
        return bool(np.array_equal(rows[0], row) and np.array_equal(rows[1], row))
    scale = float(np.abs(row).max(initial=0.0))
    return bool(np.allclose(rows, row[None], rtol=1e-5, atol=1e-6 * max(scale, 1.0)))


def pass_bytes(shapes: dict, nodes, chunk: int) -> tuple[int, str, list]:
    """(bytes, tensor, dims): the largest float32 tensor of one chunk's pass through `nodes`
    (shapes: tensor -> dims)."""
    worst = (0, "", [])
    for node in nodes:
        for out in node.output:
            found = shapes.get(out) or []
            if found and all(isinstance(d, int) for d in found[1:]):
                size = 4 * chunk * math.prod(found[1:])
                if size > worst[0]:
                    worst = (size, out, found)
    return worst


def scores_tensor(method: str) -> str:
    """The graph tensor holding a HEAD / FORWARD method's per-variant scores [N, K] (not an
    output: `check` reads it to check the passes on a sample of the variants)."""
    return f"{PREFIX}{method}/scores"


class OnnxModelOps(OnnxOps):
    """`methods.ModelOps` as ONNX nodes: head / forward as Loops over chunks of variants whose
    bodies hold clones of the graph's own head / model nodes. `method`: the method being built,
    whose scores are named `scores_tensor(method)`."""

    def __init__(self, builder: GraphBuilder, parts: Anatomy, chosen_one_hot: str, class_logit: str):
        self.b, self.parts, self.one_hot_classes = builder, parts, chosen_one_hot
        self.images = OnnxTensor(builder, parts.images, shape=(None, *parts.image_dims))
        self.class_logit = OnnxTensor(builder, class_logit)
        self.method = ""

    def head(self, variants, count, chunk):
        return self._named(self._loop(self.parts.head_nodes, self.parts.target, self.parts.feature_dims,
                                      self.parts.target_perm, variants, count, chunk, "head",
                                      self.parts.head_sides, self.parts.head_shapes))

    def forward(self, variants, count, chunk):
        return self._named(self._loop(self.parts.model_nodes, self.parts.images, self.parts.image_dims, None,
                                      variants, count, chunk, "model"))

    def _named(self, scores):
        """`scores` renamed `scores_tensor(self.method)`: the output of the node just made, which
        nothing reads yet (no node added: a graph's nodes stay those of one without the names)."""
        if not self.method:
            return scores
        producer = next(n for n in reversed(self.b.nodes) if scores.name in n.output)
        name = scores_tensor(self.method)
        producer.output[list(producer.output).index(scores.name)] = name
        return OnnxTensor(self.b, name)

    def _loop(self, nodes, start, dims, perm, variants, count, chunk, what, sides=(), shapes=()):
        """[N, count] scores: the passes unrolled into the graph (one clone per chunk) up to
        MAX_UNROLLED chunks, else an ONNX Loop over chunks (one clone in its body)."""
        b, count, chunk = self.b, int(count), int(chunk)
        trips = math.ceil(count / chunk)
        if trips <= MAX_UNROLLED:
            parts = []
            for first in range(0, count, chunk):
                k = b.const(np.arange(first, min(first + chunk, count)), np.int64)
                parts.append(self._pass(nodes, start, dims, perm, variants, k, min(chunk, count - first), what,
                                        sides, shapes))
            return OnnxTensor(b, parts[0] if len(parts) == 1 else b.op("Concat", parts, axis=1))
        return self._scan(nodes, start, dims, perm, variants, count, chunk, what, sides, shapes)

    def _pass(self, nodes, start, dims, perm, variants, k: str, size: int, what, sides=(), shapes=()) -> str:
        """Scores [N, size] of the variants `k` (int64 [size]): one clone of `nodes`, reading each
        of `sides` ((tensor, batch axis)) repeated `size` times per crop along its batch axis
        (crop after crop, as the variants' rows), and `shapes` ((tensor, int64 vector)) as those
        vectors."""
        from onnx import helper

        b = self.b
        batch = variants(OnnxTensor(b, k))
        rows = b.op("Reshape", [batch.name, b.ints([-1, *dims])])
        if perm is not None:
            rows = b.op("Transpose", [rows], perm=list(perm))
        renamed = {start: rows, **{name: b.const(vector, np.int64) for name, vector in shapes}}
        for side, axis in sides:
            # [..., N, ...] -> [..., N, size, ...] -> [..., N * size, ...]
            rank = len(self.parts.shapes[side])
            repeated = b.op("Tile", [b.unsqueeze(side, [axis + 1]),
                                     b.ints([1] * (axis + 1) + [size] + [1] * (rank - axis - 1))])
            shape = b.op("Shape", [side])
            sizes = [b.op("Slice", [shape, b.ints([0]), b.ints([axis])])] if axis else []
            sizes.append(b.ints([-1]))
            if axis + 1 < rank:
                sizes.append(b.op("Slice", [shape, b.ints([axis + 1]), b.ints([rank])]))
            renamed[side] = b.op("Reshape", [repeated, b.op("Concat", sizes, axis=0) if len(sizes) > 1 else sizes[0]])
        for node in nodes:
            copy = helper.make_node(node.op_type, [renamed.get(x, x) for x in node.input],
                                    [renamed.setdefault(o, b.name(f"{what}_{node.op_type.lower()}")) if o else ""
                                     for o in node.output], name=b.name(what), domain=node.domain)
            copy.attribute.extend(node.attribute)
            b.nodes.append(copy)
        logits = b.op("Reshape", [renamed[self.parts.logits], b.ints([-1, size, self.parts.num_classes])])
        return b.reduce("ReduceSum", b.op("Mul", [logits, b.unsqueeze(self.one_hot_classes, [1])]), [2], False)

    def _scan(self, nodes, start, dims, perm, variants, count, chunk, what, sides=(), shapes=()):
        from onnx import TensorProto, helper

        b = self.b
        outer, b.nodes = b.nodes, []
        iteration, condition = b.name("iteration"), b.name("condition")
        first = b.op("Mul", [iteration, b.const(chunk, np.int64)])
        k = b.op("Min", [b.op("Add", [first, b.const(np.arange(chunk), np.int64)]),
                         b.const(count - 1, np.int64)])  # the last chunk repeats the last variant
        scores = b.op("Transpose", [self._pass(nodes, start, dims, perm, variants, k, chunk, what, sides, shapes)],
                      perm=[1, 0])  # [chunk, N]
        done = b.op("Identity", [condition])
        body = helper.make_graph(
            b.nodes, b.name(f"{what}_chunk"),
            [helper.make_tensor_value_info(iteration, TensorProto.INT64, []),
             helper.make_tensor_value_info(condition, TensorProto.BOOL, [])],
            [helper.make_tensor_value_info(done, TensorProto.BOOL, []),
             helper.make_tensor_value_info(scores, TensorProto.FLOAT, [chunk, None])])
        b.nodes = outer
        trips = math.ceil(count / chunk)
        stacked = b.op("Loop", [b.const(trips, np.int64), ""], body=body, hint=f"{what}_loop")  # [trips, chunk, N]
        flat = b.op("Reshape", [stacked, b.ints([trips * chunk, -1])])
        kept = b.op("Slice", [flat, b.ints([0]), b.ints([count]), b.ints([0])])
        return OnnxTensor(b, b.op("Transpose", [kept], perm=[1, 0]))  # [N, count]


def add(model, names, parts: Anatomy | None = None):
    """A copy of the CAM graph `model` with the HEAD / FORWARD methods `names` as outputs
    [N, h, w] (already present ones are left as they are). Raises ModelError when one pass of a
    method's chunk would hold a tensor over MAX_PASS_BYTES."""
    import onnx
    from onnx import TensorProto, helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    model = copy
    names = [n for n in rerun_names(names) if n not in {o.name for o in model.graph.output}]
    if not names:
        return model
    parts = parts or anatomy(model)
    for name in names:
        check_size(model, parts, name)
    graph = model.graph
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer} | \
        {i.name for i in graph.input} | {n.name for n in graph.node}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    b = GraphBuilder(opset, prefix=PREFIX, taken=taken)
    predicted = b.op("ArgMax", [parts.logits], axis=-1, keepdims=0)
    chosen = b.op("Where", [b.op("Less", [graph_spec.INPUT_CLASS, b.const(0, np.int64)]), predicted,
                            graph_spec.INPUT_CLASS])
    one_hot = b.op("OneHot", [chosen, b.const(parts.num_classes, np.int64), b.const([0.0, 1.0])], axis=-1)
    class_logit = b.reduce("ReduceSum", b.op("Mul", [parts.logits, one_hot]), [1], True)
    ops = OnnxModelOps(b, parts, one_hot, class_logit)
    a = OnnxTensor(b, graph_spec.OUTPUT_ACTIVATIONS, shape=(None, *parts.feature_dims))
    for name in names:
        ops.method = name
        heatmap = methods.get(name).compute(ops, a, None, None)
        b.op("Identity", [heatmap.name], outputs=[name])
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.initializers)
    h, w, _ = parts.feature_dims
    graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", h, w]) for n in names)
    onnx.checker.check_model(model)
    return model


def check_size(model, parts: Anatomy, name: str) -> None:
    """ModelError when one chunk of `name`'s passes would hold a tensor over MAX_PASS_BYTES."""
    method = methods.get(name)
    nodes = parts.nodes_for(method)
    size, tensor, dims = pass_bytes(parts.shapes, nodes, method.chunk)
    if size > MAX_PASS_BYTES:
        raise ModelError(f"{name}: one pass of {method.chunk} variants per crop holds tensor {tensor!r} "
                         f"[{method.chunk} x {', '.join(str(d) for d in dims[1:])}] = {size / 2**30:.1f} GiB "
                         f"per crop, over the {MAX_PASS_BYTES / 2**30:.0f} GiB a pass may take; this model is "
                         f"too large for {name} (leave it out of --heads)")


def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class SampledCalls(methods.ModelCalls):
    """`methods.ModelCalls` that runs the head / model on a sample of the variants only: one per
    chunk of the graph's passes (a different place in each chunk; the last variant too, which a
    Loop's last chunk repeats), the other variants' scores taken from the graph (`graph_scores`
    [N, K]). The method's numpy maths then run on those scores, so its map checks the graph's
    weighting of every channel, while `sampled` ({method: (graph's, reference's) scores at the
    sampled variants}) checks the passes themselves: every clone (unrolled) or Loop iteration
    is run at least once, for a fraction 1 / chunk of the reference's cost."""

    def __init__(self, *args, graph_scores: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.graph_scores, self.method, self.sampled = graph_scores, "", {}
        self.scores = {}  # {method: the scores [N, K] its reference's maths weighed}

    def _scores(self, logits_of, variants, count, chunk):
        count, chunk = int(count), int(chunk)
        if self.method not in self.graph_scores:  # int8, or a graph made before the scores were named: all
            # of them, one variant per run as below (batched as the graph's clones are, a head that
            # computed every row from the first would agree with itself)
            self.scores[self.method] = super()._scores(logits_of, variants, count, 1)
            return self.scores[self.method]
        graph = np.asarray(self.graph_scores[self.method], np.float32)
        picked = sorted({first + (first // chunk) % min(chunk, count - first) for first in range(0, count, chunk)}
                        | {count - 1})
        # one variant per run, N rows, as the model runs: a head (the graph's clones and the cut-out
        # session alike) that computed every row of a larger batch from its first (a Swin .pt2 at
        # its LayerNorm target gave every ablated channel channel 0's score) would agree with itself
        reference = super()._scores(logits_of, lambda k: variants(np.asarray(picked, np.int64)[k]), len(picked), 1)
        self.sampled[self.method] = (graph[:, picked], reference)
        full = graph.copy()
        full[:, picked] = reference
        self.scores[self.method] = full
        return full


class GivenScores(methods.NumpyOps):
    """`methods.ModelOps` whose head / forward return the given scores [N, K] without running
    anything: a HEAD / FORWARD method's maths after its passes (images: [N, H, W, C],
    class_logit: [N, 1])."""

    def __init__(self, images, class_logit, scores):
        self.images, self.class_logit, self._given = images, class_logit, scores

    def head(self, variants, count, chunk):
        return self._given

    forward = head


def conditioning(name: str, activations, calls: SampledCalls, reference) -> float:
    """What rounding alone can do to method `name`'s map, as `onnx_verify` judges the other
    methods' maps: CONDITIONING x the largest change of its maths (`reference`, [N, h, w]) when
    the quantities it is computed from, the activations [N, h, w, K], each crop's class logit
    and the passes' scores, move by a few ulps (`onnx_verify.ulp_perturbed`, NOISE_PROBES
    draws). A map that is a small difference of large terms (Ablation-CAM where the weighted
    channels cancel: ReLU(sum_k w_k A_k) near 0 from terms w_k A_k near 1) is judged by what
    rounding makes of those terms, not by its own tiny peak; a well-conditioned one gets almost
    nothing added."""
    from camface.export import onnx_verify

    method = methods.get(name)
    worst = 0.0
    for seed in range(onnx_verify.NOISE_PROBES):
        moved = GivenScores(calls.images, onnx_verify.ulp_perturbed(calls.class_logit, 3 * seed + 2),
                            onnx_verify.ulp_perturbed(calls.scores[name], 3 * seed + 3))
        change = method.reference(onnx_verify.ulp_perturbed(activations, 3 * seed + 1), model=moved) - reference
        worst = max(worst, float(np.abs(change).max(initial=0.0)))
    return onnx_verify.CONDITIONING * worst


def reference_calls(model, parts: Anatomy, images, class_index, names=()):
    """(outputs of the graph incl. the normalised images, methods.ModelCalls): the numpy reference
    of the HEAD / FORWARD methods around ONNX Runtime sessions of the graph's own head (target ->
    logits) and model (normalised input -> logits), cut out with onnx.utils. names: the methods
    whose scores the graph names (`scores_tensor`): their reference reruns a sample of the
    variants (`SampledCalls`), the others' all of them (each on its own, as the sampled)."""
    import onnx
    import onnx.utils
    from onnx import TensorProto, helper

    from camface.export import onnx_model

    prepared = onnx_model.prepare(model, where="the CAM graph")
    extractor = onnx.utils.Extractor(prepared)
    whole = _session(extractor.extract_model([parts.images], [parts.logits]))
    head = None
    if parts.head_nodes is not None:
        # the head reads the batch size of the target where the graph reads its input's
        # (`_from_batch`), in a copy: the same Shape may also give the model its input's other
        # dimensions, or a batch size that the target itself depends on
        sized = {n.output[0] for n in parts.head_nodes if n.op_type == "Shape" and n.input[0] == parts.target}
        if sized:
            rewired = onnx.ModelProto()
            rewired.CopyFrom(prepared)
            for node in rewired.graph.node:
                if node.op_type == "Shape" and node.output[0] in sized:
                    node.input[0] = parts.target
            extractor = onnx.utils.Extractor(rewired)
        fixed = [name for name, _ in parts.head_shapes]
        sides = [name for name, _ in parts.head_sides]
        head = _session(extractor.extract_model([parts.target, *sides, *fixed], [parts.logits]))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    made = {o for n in model.graph.node for o in n.output}
    names = tuple(name for name in names if scores_tensor(name) in made)
    probe.graph.output.extend([helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                               for name in (parts.images, *map(scores_tensor, names))])
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name, _ in parts.head_sides)  # any type
    session = _session(probe)
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {graph_spec.INPUT_IMAGE: images, graph_spec.INPUT_CLASS: class_index})))
    graph_scores = {name: got.pop(scores_tensor(name)) for name in names}
    sides = {name: (got.pop(name), axis) for name, axis in parts.head_sides}
    perm = parts.target_perm

    def run_head(rows):
        rows = rows if perm is None else np.ascontiguousarray(rows.transpose(perm))
        # each crop's tensors beside the target, once per variant along their batch axis (rows: crop after crop)
        feeds = {name: np.repeat(value, len(rows) // value.shape[axis], axis=axis)
                 for name, (value, axis) in sides.items()}
        return head.run(None, {parts.target: rows, **feeds, **dict(parts.head_shapes)})[0]

    def run_model(rows):
        return whole.run(None, {parts.images: rows})[0]

    inputs = (None if head is None else run_head, run_model, got[parts.images], got[graph_spec.OUTPUT_ACTIVATIONS],
              class_index)
    return got, SampledCalls(*inputs, graph_scores=graph_scores)


def check(model, names, input_size, channels, num_classes, batch: int = 1, precision: str = "fp32"):
    """verify.Difference per method `names`: the graph's heatmaps against the numpy reference on
    its own head and model (`reference_calls`), on `batch` smooth random crops. Raises
    ModelError naming the methods over tolerance (verify.TOLERANCE of `precision`)."""
    from camface.export import verify

    parts = anatomy(model)
    images, classes = verify.sample_batch(input_size, channels, num_classes, batch)
    # int8: the graph's quantised passes and the reference's cut-out model fuse their Q/DQ pairs
    # differently, so single scores differ by several percent (6% of the largest on a trained
    # MobileNetV2) where the maps, which weigh them all, agree: check every variant's pass through
    # the map only, as before scores were sampled
    got, calls = reference_calls(model, parts, images, classes, () if precision == "int8" else names)
    reference = {}
    activations = got[graph_spec.OUTPUT_ACTIVATIONS]
    for name in names:
        calls.method = name
        reference[name] = methods.get(name).reference(activations, model=calls)
    from camface.export.onnx_verify import Check

    # each map's tolerance widened by what rounding can do to it (`conditioning`), as the other
    # methods' (onnx_verify); the scores themselves are well scaled (the logits')
    sensitivity = {name: conditioning(name, activations, calls, reference[name]) for name in names}
    sampled = {f"{name} scores ({s[0].shape[1]} sampled)": s for name, s in calls.sampled.items()}
    differences = [Check(d.output, d.max_abs, d.reference_max, d.allowed, d.sensitivity) for d in (
        verify.compare(got, reference, precision, sensitivity)
        + verify.compare({k: g for k, (g, _) in sampled.items()}, {k: r for k, (_, r) in sampled.items()},
                         precision))]
    failed = [d for d in differences if not d.ok]
    if failed:
        raise ModelError("the gradient-free methods disagree with their numpy reference: "
                         + "; ".join(str(d) for d in failed))
    return differences


def without(model, info: graph_spec.GraphInfo):
    """(the CAM graph without its HEAD / FORWARD methods' outputs and nodes, its info, their
    names): what int8 quantises (export/int8.py), `attach` adding them back after."""
    import onnx

    from camface.realtime.graph import prune

    names = rerun_names(info.heatmaps)
    if not names:
        return model, info, names
    kept = [o.name for o in model.graph.output if o.name not in names]
    pruned = onnx.load_from_string(prune(model.SerializeToString(), kept))
    info = replace(info, heatmaps=tuple(h for h in info.heatmaps if h not in names))
    del pruned.metadata_props[:]
    for key, value in info.to_metadata().items():
        entry = pruned.metadata_props.add()
        entry.key, entry.value = key, str(value)
    return pruned, info, names


def attach(model, info: graph_spec.GraphInfo, names, verify: bool = True, required: tuple[str, ...] = ()):
    """(graph with the HEAD / FORWARD methods `names` added, info with them in its heatmaps,
    differences of their self-check). A method that cannot be added (its pass too large, a node
    that cannot be cloned) is left out with a log line, unless it is in `required` (the ones the
    user asked for by name): then the ModelError stands."""
    present = {o.name for o in model.graph.output}
    names = tuple(n for n in rerun_names(names) if n not in present)
    added = []
    if names:
        parts = None
        for name in names:
            try:
                parts = parts or anatomy(model)
                check_size(model, parts, name)
                added.append(name)
            except ModelError as exc:
                if name in required:
                    raise
                log.warning("%s left out: %s", name, exc)
        if added:
            model = add(model, added, parts)
    heatmaps = tuple(h for h in graph_spec.heatmap_outputs() if h in info.heatmaps or h in added)
    info = replace(info, heatmaps=heatmaps)
    differences = ()
    if verify and added:
        differences = tuple(check(model, added, info.input_size, info.channels, len(info.labels),
                                  precision=info.precision))
    return model, info, differences
