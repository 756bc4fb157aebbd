"""Face-recognition embedders and gallery graphs: the gallery becomes the classes.

An embedder is a forward model whose one output is an embedding float32 [N, D] (ArcFace,
FaceNet, ... or the pooled features of a classifier, `embedding_from`). A gallery holds one
L2-normalised row per enrolled identity, float32 [identities, D]. The gallery graph is the
embedder with a similarity head appended,

    u = e / sqrt(sum(e * e) + EPS)        (L2-normalised embedding, [N, D])
    similarity = u @ gallery.T            (cosine similarity to each identity, [N, identities])

run through the ONNX engine's exporter (`onnx_export.build`) with `similarity` as the logits:
the heatmaps explain d similarity_c / dA (c = `class_index`, -1 = the best match), and every
method, token targets and the self-check come with it. Where the explained similarity saturates
(1 - similarity_c < SATURATED: the face is, nearly exactly, an enrolled photo) its gradient
vanishes and a map of it would be rounding noise; there the graph explains the projection
e . g_c instead (`_saturated_switch`, inside the one graph call; the similarity values do not
change) and `Prediction.saturated` says so. `finish` then makes the contract's
`probs` = softmax(scale * similarity) and adds the `similarity` output (graph_spec).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from camface import __version__, graph_spec, model_kinds
from camface.errors import ModelError, UsageError
from camface.outputs import check_model_file
from camface.export.exporter import ExportOptions
from camface.export.preprocess import Preprocessing

log = logging.getLogger(__name__)

EPS = 1e-12  # inside the square root of the norm: a zero embedding gives 0, not NaN
SCALE = 30.0  # probs = softmax(SCALE * cosine): CosFace / ArcFace train with s = 30..64
# --softmax-scale's range. Above 1000, identities whose cosines differ by 0.1 already get
# probabilities of e^-100 (float32 holds nothing below e^-103): every face is one identity's
# at 100%, and 1e300 became infinity in the float32 graph (probs NaN). Below 0.01 the
# probabilities of identities at cosines 1 and -1 differ by 2%: no identity stands out.
SCALE_RANGE = (0.01, 1000.0)
COSINE = "gallery/cosine"  # the similarity head's output inside the graph (the logits)
PROJECTION = "gallery/projection"  # e . g, the raw embedding on each identity's direction
SATURATED = graph_spec.SATURATED  # 1 - cosine below it: the map explains the projection (`_saturated_switch`)
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
# an ONNX file is one protobuf message, at most 2 GiB; the CAM graph adds nodes, not weights
MAX_GRAPH_BYTES = 2**31 - 2**26


@dataclass(frozen=True)
class Embedder:
    """A loaded embedder. model: forward onnx.ModelProto with one image input and the embedding
    [N, D] as its one output; input_name / layout (NCHW or NHWC) / input_size (H, W) / channels:
    its image input; preprocessing: uint8 crops in `preprocessing.color_order` -> its input."""

    model: object
    source: Path
    input_name: str
    layout: str
    input_size: tuple[int, int]
    channels: int
    dim: int
    preprocessing: Preprocessing

    @property
    def output_name(self) -> str:
        return self.model.graph.output[0].name


def forward_model(path: str | Path, opset: int = 17, safe_mode: bool = True,
                  input_size: tuple[int, int] | None = None):
    """onnx.ModelProto of an .onnx, .pt2 or Keras file, forward only (as `camface export` reads them).
    input_size: (H, W) of an .onnx / .pt2 model whose height and width are dynamic (--input-size)."""
    from camface.export import onnx_model, torch_model

    path = Path(path)
    suffix = path.suffix.lower()
    check_model_file(path)
    if suffix in torch_model.PICKLE_SUFFIXES:
        torch_model.refuse_pickle(path)
    if suffix == ".pt2":
        return torch_model.to_onnx(path, max(opset, torch_model.DEFAULT_OPSET), input_size)
    if suffix in KERAS_SUFFIXES:
        from camface.export import keras_model

        if input_size is not None:
            raise UsageError(f"{path}: --input-size is for .onnx / .pt2 models with a dynamic height and width")
        return keras_to_onnx(keras_model.load_model(path, safe_mode=safe_mode), opset)
    if suffix != ".onnx":
        raise ModelError(model_kinds.not_a_classifier(path) or f"{path}: expected an .onnx, .pt2 or Keras (.keras, .h5) model")
    model = onnx_model.load(path)
    return model if input_size is None else onnx_model.fix_input_size(model, input_size, path)


def keras_to_onnx(model, opset: int = 17):
    """A Keras model (one image input, fixed H, W, C) -> forward onnx.ModelProto by tf2onnx;
    ModelError naming the op and its layer when tf2onnx leaves an op unconverted
    (`convert.by_tf2onnx`, as `camface export` converts a classifier)."""
    import tensorflow as tf
    import tf2onnx

    from camface.export import convert, keras_model

    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or None in shape[1:]:
        raise ModelError(f"model {model.name!r} input has shape {shape}; camface needs a fixed "
                         "(N, H, W, C) image input")
    return convert.by_tf2onnx(
        tf2onnx.convert.from_keras, model, input_signature=[tf.TensorSpec([None, *shape[1:]], tf.float32,
                                                                          name="image_in")],
        opset=opset, layers=keras_model.layer_names(model))


def embedding_from(model, where: object = "model"):
    """A classifier's pooled features as an embedder: `model` (forward onnx.ModelProto) cut at
    the input of the first linear layer (Gemm / MatMul) after its global pooling, flattened to
    [N, K] (a vision transformer's: the first linear layer that reads pooled or class-token
    features [N, C], after its last attention); in an all-convolutional head (a convolution makes one map per class, then global
    pooling: mini-Xception) the global average pool of that convolution's input. ModelError
    when the classifier has neither."""
    import onnx.utils
    from onnx import TensorProto, helper

    from camface.export import onnx_export, onnx_model

    model = onnx_model.prepare(onnx_export.upgrade(model, where), where=where)
    classifier = onnx_model.describe(model, where=where)
    try:
        target, _ = onnx_model.resolve_target(classifier, None)
        tokens = False
    except onnx_model.AttentionBeforeLogits:  # a vision transformer: from its last attention's tokens
        target, tokens = onnx_model.default_token_target(classifier), True
        if target is None:
            raise
    nodes = onnx_model.head(model, target, classifier.logits)
    linears = [n for n in nodes if n.op_type in ("Gemm", "MatMul")]
    if tokens:  # past the attention's and the MLPs' linear layers on tokens [N, T, C]: the pooled (or
        # class-token) features [N, C] that the classifier's own linear layer reads
        dims = onnx_model.shapes(model)
        linears = [n for n in linears if len(dims.get(n.input[0]) or []) == 2]
    linear = next(iter(linears), None)
    producer = {o: n for n in model.graph.node for o in n.output}
    added = []
    if linear is not None:
        features, what = linear.input[0], f"the input of {linear.name or linear.op_type}, the pooled features"
        if len(onnx_model.shapes(model).get(features) or []) != 2:
            added = [helper.make_node("Flatten", [features], ["embedding/flat"], axis=1)]
    elif producer.get(target) is not None and producer[target].op_type == "Conv":
        conv = producer[target]
        features, what = conv.input[0], f"the global average pool of the input of {conv.name or 'Conv'}"
        added = [helper.make_node("GlobalAveragePool", [features], ["embedding/pooled"]),
                 helper.make_node("Flatten", ["embedding/pooled"], ["embedding/flat"], axis=1)]
    else:
        raise ModelError(f"{where}: no linear layer (Gemm / MatMul) after the pooling of {target!r}, nor a "
                         "convolution making it: --embedding-from needs a classifier with pooled features")
    cut = onnx.utils.Extractor(model).extract_model([classifier.input_name], [features])
    if added:
        cut.graph.node.extend(added)
        del cut.graph.output[:]
        cut.graph.output.append(helper.make_tensor_value_info(added[-1].output[0], TensorProto.FLOAT, None))
    log.info("%s: embedding = %s", where, what)
    return onnx_model.prepare(cut, where=where)


def load(path: str | Path, options: ExportOptions, from_classifier: bool = False,
         output: str | None = None) -> Embedder:
    """The embedder in `path` (or the pooled features of the classifier in `path`), checked:
    one image input, one output [N, D]. options: preset / colour order / scale / offset / opset.
    output: of a model with several outputs, the one to use (--model-output): the embedding, or
    with `from_classifier` the class scores."""
    from camface.export import onnx_export, onnx_model

    path = Path(path)
    model = forward_model(path, options.opset, options.safe_mode, options.input_size)
    if output is not None:
        model = onnx_model.keep_output(model, output, path, "--model-output")
    what = "classifier" if from_classifier else "embedder"
    needs = "the class scores" if from_classifier else "the embedding [N, D]"
    if len(model.graph.output) != 1:
        raise ModelError(f"{what} {path}: needs one output, {needs} (it has "
                         f"{[o.name for o in model.graph.output]}); name the one holding {needs} "
                         "with --model-output NAME")
    if from_classifier:
        model = embedding_from(model, where=path)
    model = onnx_model.prepare(onnx_export.upgrade(model, path), where=path)
    outputs = list(model.graph.output)
    dims = onnx_model.shapes(model).get(outputs[0].name) or []
    if len(dims) != 2 or not isinstance(dims[1], int) or dims[1] < 1:
        raise ModelError(f"embedder {path}: output {outputs[0].name!r} is {dims or 'of unknown shape'}; "
                         "camface needs an embedding [N, D] (use --embedding-from for a classifier)")
    described = onnx_model.describe(model, where=path)  # the image input checks
    pre = onnx_export.preprocessing(options, described.channels, f"embedder {path}")
    return Embedder(model, path, described.input_name, described.input_layout, described.input_size,
                    described.channels, int(dims[1]), pre)


def embed(embedder: Embedder, crops: np.ndarray, batch: int = 32, names=None) -> np.ndarray:
    """Embeddings float32 [N, D] of uint8 crops [N, H, W, C] in the embedder's colour order
    (ONNX Runtime on CPU). ModelError when a row holds NaN or infinity, naming the first such
    crop by `names` (one per crop: its photo and person), else by its row."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(embedder.model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    pre = embedder.preprocessing
    out = []
    for start in range(0, len(crops), batch):
        x = crops[start:start + batch].astype(np.float32) * np.asarray(pre.scale, np.float32) + \
            np.asarray(pre.offset, np.float32)
        if embedder.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        out.append(session.run(None, {embedder.input_name: np.ascontiguousarray(x)})[0])
    embeddings = np.concatenate(out) if out else np.zeros((0, embedder.dim), np.float32)
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if len(bad):
        first = names[bad[0]] if names is not None else f"row {bad[0]}"
        raise ModelError(f"embedder {embedder.source.name}: {len(bad)} of {len(crops)} embeddings hold NaN "
                         f"or infinity (first: {first}); check its preprocessing (--preset)")
    return embeddings.astype(np.float32)


def normalise(rows: np.ndarray) -> np.ndarray:
    """Rows float [M, D] divided by their L2 norm (as the graph does: sqrt(sum x^2 + EPS))."""
    rows = np.asarray(rows, np.float64)
    return (rows / np.sqrt((rows * rows).sum(axis=-1, keepdims=True) + EPS)).astype(np.float32)


def identity_embeddings(embeddings: np.ndarray, targets: np.ndarray, identities: int) -> np.ndarray:
    """float32 [identities, D]: each identity's L2-normalised mean of its photos' L2-normalised
    embeddings (embeddings [M, D], targets int [M] into 0..identities-1)."""
    units = normalise(embeddings)
    return normalise(np.stack([units[targets == k].mean(axis=0) for k in range(identities)]))


def with_similarity_head(embedder: Embedder, gallery: np.ndarray, unit: bool = True):
    """The embedder's model with the similarity head appended: its one output is COSINE
    [N, identities]. gallery: float32 [identities, D], L2-normalised rows. unit False: the
    embedding is not L2-normalised, the output is its projection e . g onto each row (what
    `camface compare` explains where the cosine saturates, PROJECTION)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    gallery = np.asarray(gallery, np.float32)
    if gallery.ndim != 2 or gallery.shape[1] != embedder.dim:
        raise ModelError(f"the gallery's embeddings are {list(gallery.shape)} but embedder "
                         f"{embedder.source.name} gives D = {embedder.dim}: enrol with the same embedder")
    if not np.isfinite(gallery).all():
        raise ModelError("the gallery's embeddings hold NaN or infinity")
    size = embedder.model.ByteSize() + gallery.nbytes
    if size > MAX_GRAPH_BYTES:
        raise ModelError(f"a gallery of {len(gallery)} identities x D = {gallery.shape[1]} ({gallery.nbytes / 2**30:.2f} GiB) "
                         f"and embedder {embedder.source.name} make a {size / 2**30:.2f} GiB graph, over ONNX's 2 GiB "
                         "file limit: enrol fewer identities per gallery")
    model = onnx.ModelProto()
    model.CopyFrom(embedder.model)
    graph = model.graph
    e = embedder.output_name
    if not unit:
        graph.initializer.append(numpy_helper.from_array(gallery.T.copy(), "gallery/embeddings_t"))
        graph.node.append(helper.make_node("MatMul", [e, "gallery/embeddings_t"], [COSINE], name="gallery/cosine"))
        del graph.output[:]
        graph.output.append(helper.make_tensor_value_info(COSINE, TensorProto.FLOAT, ["N", len(gallery)]))
        return model
    graph.initializer.extend([
        numpy_helper.from_array(gallery.T.copy(), "gallery/embeddings_t"),
        numpy_helper.from_array(np.array([1], np.int64), "gallery/axis"),
        numpy_helper.from_array(np.array(EPS, np.float32), "gallery/eps")])
    graph.node.extend([
        helper.make_node("Mul", [e, e], ["gallery/squares"], name="gallery/squares"),
        helper.make_node("ReduceSum", ["gallery/squares", "gallery/axis"], ["gallery/sum"], keepdims=1,
                         name="gallery/sum"),
        helper.make_node("Add", ["gallery/sum", "gallery/eps"], ["gallery/sum_eps"], name="gallery/sum_eps"),
        helper.make_node("Sqrt", ["gallery/sum_eps"], ["gallery/norm"], name="gallery/norm"),
        helper.make_node("Div", [e, "gallery/norm"], ["gallery/unit"], name="gallery/unit"),
        helper.make_node("MatMul", ["gallery/unit", "gallery/embeddings_t"], ["gallery/cos"], name="gallery/cos"),
        *_saturated_switch(e, "gallery/cos")])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(COSINE, TensorProto.FLOAT, ["N", len(gallery)]))
    return model


def _saturated_switch(e: str, cos: str) -> list:
    """Nodes making COSINE from the cosine `cos` [N, identities] and the raw embedding `e`: the
    same values, but where 1 - cos < SATURATED its gradient is the projection e . g's,

        COSINE = Where(1 - cos < SATURATED, detached(cos) + (e @ G - detached(e @ G)), cos)

    (x - x is exactly 0, so COSINE == cos bit for bit, and ArgMax, probs and the similarity
    output are unchanged). detached(t) = Cast(Cast(t, DOUBLE), FLOAT): the same float32 values,
    but the gradient rules follow float tensors only (onnx_model.differentiable), so none flows
    through it. Saturation per element: the explained identity's, whichever the seed picks."""
    from onnx import TensorProto, helper

    def detached(t: str) -> list:
        return [helper.make_node("Cast", [t], [f"{t}/f64"], to=TensorProto.DOUBLE, name=f"{t}/f64"),
                helper.make_node("Cast", [f"{t}/f64"], [f"{t}/detached"], to=TensorProto.FLOAT,
                                 name=f"{t}/detached")]

    one, limit = "gallery/one", "gallery/saturated_below"
    return [
        helper.make_node("Constant", [], [one], value=helper.make_tensor(one, TensorProto.FLOAT, [], [1.0]),
                         name=one),
        helper.make_node("Constant", [], [limit],
                         value=helper.make_tensor(limit, TensorProto.FLOAT, [], [SATURATED]), name=limit),
        helper.make_node("Sub", [one, cos], ["gallery/gap"], name="gallery/gap"),
        helper.make_node("Less", ["gallery/gap", limit], ["gallery/saturated"], name="gallery/saturated"),
        helper.make_node("MatMul", [e, "gallery/embeddings_t"], [PROJECTION], name=PROJECTION),
        *detached(cos), *detached(PROJECTION),
        helper.make_node("Sub", [PROJECTION, f"{PROJECTION}/detached"], ["gallery/projection_zero"],
                         name="gallery/projection_zero"),
        helper.make_node("Add", [f"{cos}/detached", "gallery/projection_zero"], ["gallery/cos_by_projection"],
                         name="gallery/cos_by_projection"),
        helper.make_node("Where", ["gallery/saturated", "gallery/cos_by_projection", cos], [COSINE],
                         name="gallery/cosine")]


def finish(cam_graph, scale: float):
    """The CAM graph `onnx_export.build` made of `with_similarity_head`'s model, made a gallery
    graph: `probs` = softmax(scale * similarity) (the build wrote softmax(similarity)) and the
    `similarity` output [N, identities] added."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(cam_graph)
    graph = model.graph
    index, softmax = next(((i, n) for i, n in enumerate(graph.node)
                           if n.op_type == "Softmax" and n.input[0] == COSINE), (None, None))
    if softmax is None:
        raise ModelError("the gallery graph has no softmax of its similarities (camface bug)")
    graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), "gallery/scale"))
    scaled = helper.make_node("Mul", [COSINE, "gallery/scale"], ["gallery/scaled"], name="gallery/scaled")
    softmax.input[0] = "gallery/scaled"
    graph.node.insert(index, scaled)
    graph.node.append(helper.make_node("Identity", [COSINE], [graph_spec.OUTPUT_SIMILARITY],
                                       name="gallery/similarity"))
    identities = next(o for o in graph.output if o.name == graph_spec.OUTPUT_PROBS) \
        .type.tensor_type.shape.dim[1].dim_value
    graph.output.append(helper.make_tensor_value_info(graph_spec.OUTPUT_SIMILARITY, TensorProto.FLOAT,
                                                      ["N", identities]))
    onnx.checker.check_model(model)
    return model


def build(embedder: Embedder, gallery: np.ndarray, labels, options: ExportOptions, gallery_meta: dict,
          unit: bool = True):
    """(gallery graph ModelProto with metadata, GraphInfo, self-check differences).
    gallery: float32 [identities, D], L2-normalised rows, one per label; gallery_meta: the
    META_GALLERY value without the scale and embedder fields (threshold, photos, ...). unit:
    see `with_similarity_head` (False: `similarity` is the projection, for compare only)."""
    from camface.export import convert, onnx_export
    from camface.hashing import sha256_file

    labels = tuple(labels)
    if len(labels) != len(gallery):
        raise ModelError(f"{len(labels)} labels for {len(gallery)} gallery embeddings")
    scale = float(gallery_meta.get("scale", SCALE))
    model = with_similarity_head(embedder, gallery, unit)
    cam_graph, info, differences = onnx_export.build(model, replace(options, labels=labels),
                                                     source=str(embedder.source), gallery=True)
    cam_graph = finish(cam_graph, scale)
    meta = {"scale": scale, "embedding_dim": embedder.dim, "embedder": embedder.source.name,
            "embedder_sha256": sha256_file(embedder.source), **gallery_meta,
            **({"saturated_below": SATURATED} if unit else {})}  # the graph has `_saturated_switch`
    info = replace(info, gallery=meta, source_model=embedder.source.name,
                   source_sha256=meta["embedder_sha256"], version=__version__)
    convert.set_metadata(cam_graph, info.to_metadata(),
                         doc=f"camface gallery graph of {embedder.source.name}, see camface/graph_spec.py")
    return cam_graph, info, differences
