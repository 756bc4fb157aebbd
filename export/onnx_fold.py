"""Fold the If nodes whose condition only the shapes decide: torch.onnx's TorchScript exporter
writes `x.squeeze(1)` of an axis it cannot prove to be 1 as If(Shape(x)[1] == 1, Squeeze,
Identity) (nn.LocalResponseNorm does), and camface follows the main graph only. And fold the
Transpose / Cast / Identity of a weight into the weight (`weight_layouts_folded`).

The condition is evaluated here on the sizes it reads, as ONNX Runtime gives them on zero
inputs of batch 1 and of batch 2 (ONNX's shape inference often leaves the axis open: a Pad
whose pads torch computes, a view(..., -1) of a dynamic batch); a size that differs between
the two is the batch's, unknown. An If is folded only when its condition reads tensors' shapes,
never their values (nor passes an op whose output's size depends on values), and is known.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

# ops whose output's shape depends on their input's values, not only on its shape
_VALUE_SHAPED = ("NonZero", "Unique", "Compress", "Loop", "If", "Scan", "TopK")
# ops whose output's shape depends on the values of inputs after the first (a Reshape's shape, an
# Expand's, a Slice's starts, a Pad's pads, axes given as an input), or of every input (Range,
# ConstantOfShape): those values are read, not only shapes
_SIZED_BY_VALUES = ("Reshape", "Expand", "Tile", "Slice", "Pad", "Resize", "Upsample", "Squeeze", "Unsqueeze",
                    "Split", "OneHot", "CenterCropPad", "Col2Im", "DFT", "STFT", "ReduceSum", "ReduceMean",
                    "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                    "ReduceLogSumExp", "ReduceSumSquare")
_SIZED_BY_ALL_VALUES = ("Range", "ConstantOfShape")
# ops on shape values the evaluator runs: numpy's function of the values
_ELEMENTWISE = {"Equal": np.equal, "Greater": np.greater, "Less": np.less,
                "GreaterOrEqual": np.greater_equal, "LessOrEqual": np.less_equal,
                "And": np.logical_and, "Or": np.logical_or, "Add": np.add, "Sub": np.subtract,
                "Mul": np.multiply}


def _measured(condition: str, producer: dict, values: set[str]) -> set[str] | None:
    """The tensors whose shapes `condition` reads (through Shape / Size), or None where it
    reads a value of the graph's inputs, or passes an op whose output's size hangs on values
    (empty: a constant condition)."""
    stack, seen, measured = [(condition, False)], set(), set()
    while stack:
        name, shaped = stack.pop()
        if (name, shaped) in seen or name in values:
            continue
        seen.add((name, shaped))
        node = producer.get(name)
        if node is None:  # a graph input: its values read, or only its shape
            if not shaped:
                return None
            continue
        if node.op_type in _VALUE_SHAPED:
            return None
        if node.op_type in ("Shape", "Size") and not shaped:
            measured.add(node.input[0])
        below = shaped or node.op_type in ("Shape", "Size")
        for index, x in enumerate(node.input):
            if x:  # a shape read from inputs' values reads those values
                by_value = node.op_type in _SIZED_BY_ALL_VALUES or (index and node.op_type in _SIZED_BY_VALUES)
                stack.append((x, below and not by_value))
    return measured


def _evaluate(node, inputs: list, dims: dict):
    """(values, known mask) of `node`'s first output, None where this evaluator cannot say.
    inputs: (values, mask) per input, None where unknown; dims: tensor -> its sizes, None
    for a size that changes with the batch."""
    from onnx import helper

    op = node.op_type
    if op in ("Shape", "Size"):
        shape = dims.get(node.input[0])
        if shape is None:
            return None
        known = np.array([d is not None for d in shape], bool)
        values = np.array([d or 0 for d in shape], np.int64)
        if op == "Size":
            return np.array(values.prod()), np.array(known.all())
        start = next((a.i for a in node.attribute if a.name == "start"), 0)
        end = next((a.i for a in node.attribute if a.name == "end"), len(shape))
        return values[start:end], known[start:end]
    if not inputs or any(i is None for i in inputs):
        return None
    (a, known), rest = inputs[0], inputs[1:]
    if op == "Not":
        return np.logical_not(a), known
    if op in _ELEMENTWISE:
        b, known_b = rest[0]
        return _ELEMENTWISE[op](a, b), np.logical_and(known, known_b)
    if op == "Gather" and a.ndim == 1 and rest[0][1].all():
        index = rest[0][0].astype(np.int64)
        return a[index], known[index]
    if op == "Cast":
        to = next(x.i for x in node.attribute if x.name == "to")
        return a.astype(helper.tensor_dtype_to_np_dtype(to)), known
    if op in ("Identity", "Squeeze", "Unsqueeze", "Reshape") and a.size == 1:
        shape = () if op == "Squeeze" else (1,)  # a scalar or a one-element vector
        return a.reshape(shape), known.reshape(shape)
    if op == "Concat" and all(v.ndim == 1 for v, _ in inputs):
        return np.concatenate([v for v, _ in inputs]), np.concatenate([k for _, k in inputs])
    return None


def _decide(model, conditions: dict[str, set[str]], constants: dict) -> dict[str, bool]:
    """condition -> its value, where the shapes it reads (as ONNX Runtime gives them on batches
    of 1 and 2) decide it whatever the batch."""
    dims = probe(model, sorted(set().union(*conditions.values())))
    producer = {o: n for n in model.graph.node for o in n.output}
    reads, stack = set(), list(conditions)  # the tensors the conditions are computed from
    while stack:
        name = stack.pop()
        if name not in reads and name in producer:
            reads.add(name)
            if producer[name].op_type not in ("Shape", "Size"):
                stack.extend(producer[name].input)
    known = {name: (np.asarray(v), np.ones(np.shape(v), bool)) for name, v in constants.items()}
    for node in model.graph.node:
        if node.output and node.output[0] in reads and node.output[0] not in known:
            found = _evaluate(node, [known.get(x) for x in node.input], dims)
            if found is not None:
                known[node.output[0]] = found
    decided = {}
    for condition in conditions:
        value, mask = known.get(condition, (None, np.zeros(1, bool)))
        if value is not None and mask.all() and value.size == 1:
            decided[condition] = bool(value.reshape(-1)[0])
    return decided


def fold_static_branches(model, constants: dict) -> bool:
    """Replace (in place) each If of `model`'s main graph whose condition the shapes decide by
    the nodes of the branch taken, its outputs passed on by Identity; whether any was."""
    from onnx import helper

    graph = model.graph
    ifs = [n for n in graph.node if n.op_type == "If"]
    if not ifs:
        return False
    producer = {o: n for n in graph.node for o in n.output}
    conditions = {n.input[0]: _measured(n.input[0], producer, set(constants)) for n in ifs}
    conditions = {c: m for c, m in conditions.items() if m}  # constant ones: left to onnxsim
    decided = _decide(model, conditions, constants) if conditions else {}
    defined = {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer} | \
        {i.name for i in graph.input}
    nodes, folded = [], False
    for node in graph.node:
        choice = decided.get(node.input[0]) if node.op_type == "If" else None
        branch = next((a.g for a in node.attribute
                       if a.name == ("then_branch" if choice else "else_branch")), None)
        inner = set() if branch is None else \
            {o for n in branch.node for o in n.output} | {i.name for i in branch.initializer}
        if choice is None or branch is None or inner & defined:
            nodes.append(node)
            continue
        log.debug("If node %r folded: its condition %r is %s at any batch", node.name,
                  node.input[0], choice)
        nodes.extend(branch.node)
        graph.initializer.extend(branch.initializer)
        nodes.extend(helper.make_node("Identity", [inside.name], [outside],
                                      name=f"{node.name or 'If'}/{outside}")
                     for inside, outside in zip(branch.output, node.output))
        defined |= inner
        folded = True
    if folded:
        del graph.node[:]
        graph.node.extend(nodes)
    return folded


def probe(model, tensors: list[str]) -> dict[str, list]:
    """tensor -> its sizes as ONNX Runtime gives them on zero inputs of batch 1 and 2 (None
    where the two differ); empty where an input has another open dim or the model does not
    run."""
    runs = probe_values(model, tensors)
    if runs is None:
        return {}
    return {name: [a if a == b else None for a, b in zip(one.shape, two.shape)]
            if one.ndim == two.ndim else None for name, one, two in zip(tensors, *runs)}


def probe_values(model, tensors: list[str], sizes: tuple[int, ...] = (1, 2)) -> tuple[list, ...] | None:
    """(values at batch 1, values at batch 2, ... one per `sizes`) of `tensors` as ONNX Runtime
    computes them on zero inputs; None where an input has another open dim or the model does not run."""
    import onnx
    from onnx import helper

    graph = model.graph
    weights = {i.name for i in graph.initializer}
    feeds = []
    for value in graph.input:
        if value.name in weights:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if None in dims[1:]:
            return None
        feeds.append((value.name, dims[1:], helper.tensor_dtype_to_np_dtype(tensor.elem_type)))
    asked = onnx.ModelProto()
    asked.CopyFrom(model)
    del asked.graph.output[:]
    asked.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in tensors)
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(asked.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        runs = [session.run(tensors, {name: np.zeros((n, *dims), dtype)
                                      for name, dims, dtype in feeds}) for n in sizes]
    except Exception as exc:  # ONNX Runtime raises its own types; the Ifs stay
        log.debug("not probed: %s", exc)
        return None
    return tuple(runs)


# ops that only lay a weight out (or cast it) which torch's dynamo exporter leaves in the graph
# with its optimiser off: numpy's function of the value and the node's attributes
_LAYOUTS = {"Transpose": lambda x, a: np.transpose(x, a.get("perm")),
            "Identity": lambda x, a: x,
            "Cast": lambda x, a: x.astype(_np_type(a["to"]))}
_FLOATS = (1, 10, 11)  # onnx.TensorProto.FLOAT, FLOAT16, DOUBLE
# a double cast to float16 stays a Cast: ONNX Runtime rounds it through float32 (twice), numpy once,
# and 1 + 2**-11 + 2**-40 was 1.0 in the model, 1.001 folded
_DOUBLE_TO_HALF = (11, 10)


def _np_type(onnx_type: int):
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(onnx_type)


def weight_layouts_folded(model):
    """`model` with each Transpose, Cast or Identity of an initializer that nothing else reads
    replaced by an initializer of its value, named as its output (a copy; `model` itself when
    there is none). torch's dynamo exporter with optimize=False writes nn.Linear on tokens as
    MatMul(x, Transpose(weight)); camface finds linear layers (a ViT's qkv, a Swin's MLP, CAM's
    class weights) by their constant weights, as optimize=True writes them. An initializer read
    elsewhere stays (the CAM graph's backward transposes the weights its forward reads: folding
    would store them twice), and so does one that is also a graph input (a value it may be fed)."""
    import onnx
    from onnx import helper, numpy_helper

    from camface.export.onnx_model import outer_reads

    graph = model.graph
    inputs = {v.name for v in graph.input}
    outputs = {v.name for v in graph.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for x in node.input:
            readers[x] = readers.get(x, 0) + 1
        for attr in node.attribute:  # a subgraph that reads the weight from the main graph
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                for x in outer_reads(sub):
                    readers[x] = readers.get(x, 0) + 1
    weights = {i.name: i for i in graph.initializer}
    folded, dropped = {}, set()
    for node in graph.node:
        source = node.input[0] if len(node.input) == 1 else ""
        if node.op_type not in _LAYOUTS or source not in weights or source in inputs or \
                readers.get(source) != 1 or source in outputs or node.output[0] in outputs:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Cast" and (attrs.get("to") not in _FLOATS or weights[source].data_type not in _FLOATS
                                       or (weights[source].data_type, attrs["to"]) == _DOUBLE_TO_HALF):
            continue  # a weight cast to float32 (or from it); bfloat16 and integers stay ONNX's to cast
        with np.errstate(over="ignore"):  # a double past float32's range is inf, as ONNX Runtime casts it
            value = _LAYOUTS[node.op_type](numpy_helper.to_array(weights[source]), attrs)
        weights[node.output[0]] = folded[node.output[0]] = numpy_helper.from_array(
            np.ascontiguousarray(value), node.output[0])
        dropped.add(source)
    if not folded:
        return model
    log.debug("%d weight layout(s) folded into their weights", len(folded))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [i for i in copy.graph.initializer if i.name not in dropped]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept + [t for name, t in folded.items() if name not in dropped])
    nodes = [n for n in copy.graph.node if not (n.output and n.output[0] in folded)]
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy
