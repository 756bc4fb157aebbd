"""ONNX (or .pt2) classifier file -> verified CAM graph with camface metadata: the `export` job
for models that are not Keras. Same contract, metadata and self-check report as the Keras path
(`exporter.export`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from camface import __version__, graph_spec, methods
from camface.errors import ModelError
from camface.export.exporter import ExportOptions, ExportResult
from camface.export.preprocess import Preprocessing
from camface.hashing import sha256_file
from camface.outputs import check_output_file

log = logging.getLogger(__name__)
SUFFIXES = (".onnx", ".pt2")


def preprocessing(options: ExportOptions, channels: int, source: object = "an ONNX or PyTorch model") -> Preprocessing:
    """ONNX files do not record normalisation: a preset or explicit values are required
    (ModelError naming `source`, the model file, otherwise)."""
    if options.preset is None and options.scale is None and options.offset is None:
        raise ModelError(f"{source} does not say how it normalises its input: "
                         "pass --preset (torch = RGB (x/255 - ImageNet mean) / std, tf, unit, "
                         "imagenet-caffe, arcface = RGB (x-127.5)/127.5, facenet = RGB (x-127.5)/128, "
                         "none = raw 0..255) or --scale/--offset "
                         "(and --color-order)")
    return Preprocessing.resolve(channels, options.preset or "none", options.color_order,
                                 options.scale, options.offset)


def upgrade(model, source: object = "model"):
    """The model at opset >= 16 (the MaxPool gradient's ScatterElements add), converted with
    onnx.version_converter when older; below 13 conversion is required (Squeeze, Unsqueeze and
    ReduceSum take their axes as inputs from 13 on), at 13-15 it is tried and skipped if it fails."""
    from onnx import version_converter

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= 16:
        return model
    try:
        converted = version_converter.convert_version(_hardmax_rows(model) if opset < 13 else model, 17)
    except Exception as exc:  # the converter raises several types for ops it cannot convert
        if opset >= 13:
            log.info("%s: kept at opset %d (conversion to 17 fails: %s)", source, opset, exc)
            return model
        raise ModelError(f"{source}: opset {opset} is older than 13 and onnx.version_converter "
                         f"cannot convert it ({exc}); re-export it with opset >= 13") from exc
    return _asymmetric_resizes(model, converted, source) if opset < 11 else converted


def _graphs(graph) -> list:
    """`graph` and every subgraph in it (If branches, Loop and Scan bodies), parents first."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                found += _graphs(sub)
    return found


def _hardmax_rows(model):
    """A copy of `model` (opset < 13) with each Hardmax written as Flatten(axis), Hardmax(axis 1),
    Reshape back: before opset 13 Hardmax reads its input as 2-D [before axis, from axis on],
    from 13 it works along `axis` alone, and onnx.version_converter keeps the node as it is
    (it rewrites Softmax and LogSoftmax so): the converted model's one-hot rows changed. Inside
    If / Loop bodies too, which the converter leaves as they are (prepare() folds a branch the
    shapes decide into the main graph)."""
    import onnx
    from onnx import helper

    if not any(n.op_type == "Hardmax" for g in _graphs(model.graph) for n in g.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for graph in reversed(_graphs(copy.graph)):  # subgraphs first: a parent's rewrite copies them
        nodes = []
        for node in graph.node:
            if node.op_type != "Hardmax":
                nodes.append(node)
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            x, y, stem = node.input[0], node.output[0], f"{node.output[0]}/camface_hardmax"
            nodes += [helper.make_node("Shape", [x], [f"{stem}_shape"]),
                      helper.make_node("Flatten", [x], [f"{stem}_rows"], axis=axis),
                      helper.make_node("Hardmax", [f"{stem}_rows"], [f"{stem}_hot"], name=node.name, axis=1),
                      helper.make_node("Reshape", [f"{stem}_hot", f"{stem}_shape"], [y])]
        del graph.node[:]
        graph.node.extend(nodes)
    return copy


def _resize_scales(graph, outer: dict) -> list[dict]:
    """Per graph of `_graphs(graph)`, in its order: the output of each Resize / Upsample -> its
    scales (None where they are not constant), read from constants of the graph or of the
    graphs around it (`outer`: name -> value)."""
    from types import SimpleNamespace

    from camface.export.onnx_model import constants

    # constants() reads the graph alone: a subgraph as a model's, without copying its weights
    values = {**outer, **constants(SimpleNamespace(graph=graph))}
    found = [{n.output[0]: values.get(n.input[1]) if len(n.input) > 1 else next(
        (a.floats for a in n.attribute if a.name == "scales"), None)
        for n in graph.node if n.op_type in ("Resize", "Upsample")}]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                found += _resize_scales(sub, values)
    return found


def _asymmetric_resizes(before, converted, source: object = "model"):
    """`converted` (in place) with the coordinates of the Resizes that were a Resize (opset 10)
    or Upsample of `before`: those were asymmetric, and a nearest one took the floor of them
    (the ceiling where it shrinks: ONNX Runtime's rule before opset 11); onnx.version_converter
    leaves both to opset 11's defaults (half_pixel, round_prefer_floor), and the converted model
    interpolated other values (a nearest one where a scale is not an integer, as 1.5). Inside
    If / Loop bodies too, which the converter upgrades as the main graph (each subgraph paired
    with its own: branches may reuse names). A nearest one that enlarges one axis and shrinks
    another has no such mode: ModelError."""
    from onnx import helper

    graphs, scaled = _graphs(converted.graph), _resize_scales(before.graph, {})
    if len(graphs) != len(scaled):  # the converter added or dropped a subgraph: paired by name
        scaled = [{k: v for found in scaled for k, v in found.items()}] * len(graphs)
    for graph, scales in zip(graphs, scaled):
        for node in graph.node:
            if node.op_type != "Resize" or node.output[0] not in scales:
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if "coordinate_transformation_mode" not in attrs:
                node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
            if attrs.get("mode", b"nearest") != b"nearest" or "nearest_mode" in attrs:
                continue
            scale = scales[node.output[0]]
            shrinks = scale is not None and any(s < 1 for s in scale)
            if shrinks and any(s > 1 for s in scale):
                raise ModelError(f"{source}: node {node.name!r} (Resize, nearest, opset < 11) enlarges one "
                                 f"axis and shrinks another (scales {list(scale)}), which no mode of opset 11 "
                                 "rounds alike; re-export it with opset >= 11")
            node.attribute.append(helper.make_attribute("nearest_mode", "ceil" if shrinks else "floor"))
    return converted


@dataclass(frozen=True)
class TargetChoice:
    """The target the heatmaps use. classifier: the model, rewritten to read a token target back
    through its grid; tensor: the 4-D map; name: what is recorded (a PyTorch module name when
    the tensor is a module's output, else the tensor's); reason: why it was chosen, in words;
    grid: the token grid (onnx_model.TokenGrid) of a token target, else None."""

    classifier: object
    tensor: str
    name: str
    reason: str
    grid: object = None


# why a default target was chosen, by kind (`camface info` prints it)
REASON_CNN = "default: the last 4-D feature map before global pooling"
REASON_CLASS_SCORES = ("default for an all-convolutional head (SqueezeNet's: a convolution to one channel "
                       "per class, a ReLU, pooled): the feature map that convolution reads, not the class-score "
                       "map (pytorch-grad-cam's choice)")
REASON_LAST_MAP = ("default: the last spatial feature map larger than 1x1 before the logits (no global "
                   "pooling)")
REASON_POOLED_TOKENS = ("default for MLP-Mixer: the tokens the mean over tokens before the head reads, "
                        "on their patch grid (the last spatial map, the patch embedding, is read "
                        "through token mixing)")
REASON_VIT = ("default for ViT/DeiT: the last block's norm1, the tokens the last attention reads "
              "(pytorch-grad-cam's choice)")
REASON_SWIN = ("default for Swin: the last block's norm2, the tokens the MLP after the last "
               "attention reads (pytorch-grad-cam's choice)")


def choose_target(classifier, name: str | None, options: ExportOptions) -> TargetChoice:
    """The target: a spatial map (`onnx_model.resolve_target`), or a transformer's tokens
    [N, T, C] laid out on their patch grid (`onnx_model.with_token_grid`, the classifier
    rewritten to read them back through it). The defaults: the pooled map of a CNN; a ViT's
    (attention before the logits, no map read without it) last attention's input tokens; a
    Swin's (its pooled map follows the last attention) last MLP's input. `name`: a PyTorch
    module name (`blocks.11.norm1`, or TorchScript's `blocks/blocks.11/norm1`), a node name or
    a tensor name."""
    from camface.export import onnx_model

    model = classifier.model
    if name is None:
        try:
            tensor, recorded = onnx_model.resolve_target(classifier, None)
        except onnx_model.AttentionBeforeLogits:
            tokens = onnx_model.default_token_target(classifier)
            if tokens is None:
                raise
            return _on_grid(classifier, tokens, onnx_model.module_name(model, tokens), REASON_VIT,
                            options)
        mlp = onnx_model.default_mlp_target(classifier, tensor)
        if mlp is not None:
            if len(onnx_model.shapes(model).get(mlp) or []) == 3:
                return _on_grid(classifier, mlp, onnx_model.module_name(model, mlp), REASON_SWIN,
                                options)
            return TargetChoice(classifier, mlp, onnx_model.module_name(model, mlp), REASON_SWIN)
        pooled = tensor in onnx_model.pooled_maps(model)
        features = onnx_model.class_score_input(classifier, tensor) if pooled else None
        if features is not None:
            return TargetChoice(classifier, features, onnx_model.module_name(model, features),
                                REASON_CLASS_SCORES)
        tokens = None if pooled else onnx_model.pooled_tokens(classifier, tensor)
        if tokens is not None:
            return _on_grid(classifier, tokens, onnx_model.module_name(model, tokens), REASON_POOLED_TOKENS,
                            options)
        return TargetChoice(classifier, tensor, recorded, REASON_CNN if pooled else REASON_LAST_MAP)
    modules = onnx_model.module_outputs(model)
    nodes = {n.name: n.output[0] for n in model.graph.node if n.output}
    tensor = modules.get(name) or nodes.get(name) or name
    kind = "a PyTorch module name" if name in modules else "a node name" if name in nodes else \
        "a tensor name"
    reason = f"--target-layer {name} ({kind})"
    if len(onnx_model.shapes(model).get(tensor) or []) == 3:
        return _on_grid(classifier, tensor, name, reason, options)
    tensor, recorded = onnx_model.resolve_target(classifier, name)
    folded = onnx_model.folded_weights(model, name, tensor) if name in modules else None
    if folded is not None:
        log.warning("target %s: torch.onnx folded the BatchNorm after this convolution into it (its "
                    "weights are %s, not %s.weight), so the map is the BatchNorm's output, not the "
                    "convolution's; export the model with do_constant_folding=False, or to .pt2, to "
                    "keep them apart", name, folded, name)
        reason += ", the BatchNorm after it folded in"
    again = []
    while name in modules and f"{name}_{len(again) + 1}" in modules:
        again.append(f"{name}_{len(again) + 1}")
    if again:  # TorchScript scopes the calls of a module called again `relu`, `relu_1`, ...
        log.warning("target %s: TorchScript scopes the calls of a module called again %s, %s; unless "
                    "%s, the map is this module's first call's output, where a forward hook keeping "
                    "the latest output and a .pt2 read its last: pass %s for that",
                    name, name, ", ".join(again), " and ".join(again) + (
                        " are modules of their own" if len(again) > 1 else " is a module of its own"),
                    again[-1])
    return TargetChoice(classifier, tensor, recorded, reason)


def _on_grid(classifier, tokens: str, name: str, reason: str, options: ExportOptions) -> TargetChoice:
    from camface.export import onnx_model

    classifier, tokens = onnx_model.batch_first(classifier, tokens)  # [T, N, C] -> [N, T, C]
    grid = onnx_model.token_grid(classifier, tokens, options.token_grid, options.prefix_tokens)
    gridded, target = onnx_model.with_token_grid(classifier, tokens, grid)
    after = f", {grid.suffix} token(s) after the patches" if grid.suffix else ""
    log.info("target %s: tokens %s laid out on a %dx%d grid after %d prefix token(s)%s", name, tokens,
             grid.height, grid.width, grid.prefix, after)
    return TargetChoice(gridded, target, name, reason, grid)


def build(model, options: ExportOptions, source: str = "model", gallery: bool = False):
    """(CAM graph ModelProto, GraphInfo, self-check differences) of a forward onnx.ModelProto.
    gallery: the model is a gallery's similarity head (`export.gallery`), whose one identity
    is a valid gallery (a classifier of one class is refused: `graph_spec.one_class`)."""
    from camface.export import onnx_cam, onnx_model, onnx_rerun, onnx_verify

    if options.fp16:
        raise ModelError("--fp16 is not supported for ONNX / PyTorch models yet")
    onnx_model.check_not_a_cam_graph(model, source)
    model = onnx_model.prepare(upgrade(model, source), where=source)
    onnx_model.name_nodes(model)
    # a model whose own tensors are called `probs`, `image`, ...: renamed, the contract wins
    model, renamed = onnx_model.rename(model, onnx_cam.RESERVED)
    if renamed:
        log.info("%s: tensors renamed inside the CAM graph: %s", source,
                 ", ".join(f"{old} -> {new}" for old, new in renamed.items()))
    if options.class_output is not None:  # first: the two below need the one output
        model = onnx_model.keep_output(model, renamed.get(options.class_output, options.class_output),
                                       source)
    if options.input_size is not None:
        model = onnx_model.fix_input_size(model, options.input_size, source)
    model = onnx_model.free_batch(model, source)
    classifier = onnx_model.settle_shapes(onnx_model.describe(model, where=source))
    if classifier.num_classes < 1:
        raise ModelError(f"{source}: its output has {classifier.num_classes} classes; a classifier needs at least one")
    if (why := graph_spec.one_class(classifier.num_classes, gallery)) is not None:
        raise ModelError(f"{source}: {why}")
    labels = options.labels or tuple(f"class_{i}" for i in range(classifier.num_classes))
    if len(labels) != classifier.num_classes:
        where = f"labels file {options.labels_source}" if options.labels_source else "labels"
        raise ModelError(f"{where}: {len(labels)} labels, but {source} has "
                         f"{classifier.num_classes} classes (one label per line, in class order)")
    pre = preprocessing(options, classifier.channels, source)
    choice = choose_target(classifier, renamed.get(options.target_layer, options.target_layer),
                           options)
    given = [flag for flag, value in (("--token-grid", options.token_grid), ("--prefix-tokens", options.prefix_tokens))
             if value is not None and value != ()]
    if choice.grid is None and given:  # (a CNN's map: they were dropped without a word)
        log.warning("%s ignored: target %s is a feature map, not tokens [N, T, C] to lay out on a grid",
                    " and ".join(given), choice.name)
    classifier = choice.classifier
    heads = None if options.heads is None else tuple(
        h for h in options.heads if h not in (graph_spec.OUTPUT_PROBS, graph_spec.OUTPUT_ACTIVATIONS))
    built = onnx_cam.build(classifier, choice.tensor, pre.scale, pre.offset, heads)
    empty = ()
    if choice.grid is not None:
        built, empty = _without_empty_maps(classifier, choice, built, pre, heads, source)
    info = graph_spec.GraphInfo(
        labels=tuple(labels), input_size=classifier.input_size, color_order=pre.color_order,
        target_layer=choice.name, heatmaps=built.heatmaps, feature_size=built.feature_size,
        normalization=pre.to_metadata(), cam_unavailable_reason=built.cam_unavailable_reason,
        precision="fp32", version=__version__, target_reason=choice.reason,
        token_grid=choice.grid.to_metadata() if choice.grid else {})
    differences = ()
    if options.verify:
        differences = tuple(onnx_verify.check(classifier, built, pre.scale, pre.offset,
                                              source=source))
    wanted = tuple(n for n in _reruns(heads) if n not in empty)
    model, info, rerun_differences = onnx_rerun.attach(built.model, info, wanted, options.verify,
                                                       required=onnx_rerun.asked(heads))
    return model, info, differences + rerun_differences


def _without_empty_maps(classifier, choice: TargetChoice, built, pre, heads, source):
    """(built, the methods left out): `built`, or the CAM graph again without the gradient
    methods, when the logits read none of the token target's patch tokens: a head that reads the
    class token alone, after the last attention (a ViT's final norm, its last block's output),
    has a gradient of exactly 0 at every patch, so every gradient map would be empty; and so
    would Ablation-CAM's (the methods that run the head again from the target: zeroing a
    channel of the patch tokens changes no logit, every weight is 0). ModelError when one of
    them was asked for by name (--heads). Found by running the graph (or one with Grad-CAM
    alone, to probe) on a few random crops: a gradient that the structure zeroes is 0.0 exactly
    on any CPU."""
    import numpy as np

    from camface.export import onnx_cam, onnx_model, onnx_verify

    gradient_maps = [h for h in built.heatmaps if methods.GRADIENTS in methods.get(h).needs]
    head_maps = [h for h in _reruns(heads) if methods.HEAD in methods.get(h).needs]
    if not gradient_maps and not head_maps:
        return built, ()
    try:  # (a head without a gradient rule has no gradient to probe: Ablation-CAM stays)
        probe = built if gradient_maps else onnx_cam.build(classifier, choice.tensor, pre.scale,
                                                           pre.offset, ("gradcam",))
    except ModelError as exc:
        log.debug("the token target's gradient not probed: %s", exc)
        return built, ()
    height, width = classifier.input_size
    images = np.random.default_rng(0).integers(0, 256, (3, height, width, classifier.channels),
                                               dtype=np.uint8)
    try:
        session = onnx_verify._session(onnx_verify._with_outputs(probe.model, [onnx_cam.GRADIENT]))
        gradient = session.run([onnx_cam.GRADIENT], {graph_spec.INPUT_IMAGE: images,
                                                     graph_spec.INPUT_CLASS: np.full(3, -1, np.int64)})[0]
    except Exception as exc:  # ONNX Runtime's own types; the self-check says what fails
        log.debug("the token target's gradient not probed: %s", exc)
        return built, ()
    if np.any(gradient):
        return built, ()
    default = onnx_model.default_token_target(classifier)
    shown = f"; pick a layer before the last attention, such as " \
        f"{onnx_model.module_name(classifier.model, default)} (the default)" if default else ""
    alone = f"the head reads its {choice.grid.prefix} prefix token(s) alone after it; " \
        if choice.grid.prefix else ""
    empty = [f"the gradient maps ({', '.join(gradient_maps)})"] if gradient_maps else []
    empty += [f"{', '.join(head_maps)} (zeroing a channel of the patch tokens changes no logit)"] \
        if head_maps else []
    why = (f"target {choice.name}: the logits read none of its patch tokens ({alone}the gradient "
           f"is 0 at every patch of 3 random crops), so {' and '.join(empty)} would be "
           f"empty{shown}")
    if heads is not None:
        raise ModelError(f"{source}: {why}")
    log.warning("%s; exporting the maps that need neither the gradient nor the head run again", why)
    kept = tuple(h for h in methods.names() if methods.GRADIENTS not in methods.get(h).needs)
    built = onnx_cam.build(classifier, choice.tensor, pre.scale, pre.offset, kept) \
        if gradient_maps else built
    return built, tuple(gradient_maps + head_maps)


def _reruns(heads) -> tuple[str, ...]:
    """The methods that run part of the model again that `heads` (None: the default set) asks."""
    from camface.export import onnx_rerun

    return onnx_rerun.rerun_names(methods.names() if heads is None else heads)


def _program_as_onnx(path: Path, options: ExportOptions):
    """The .pt2 at `path` as ONNX (`torch_model.to_onnx`), exported again without torch.onnx's
    Conv + BatchNorm fusion when --target-layer names a module that the fusion took away: a
    convolution followed by a BatchNorm, whose fused map is named as the BatchNorm (the map would
    be the BatchNorm's output, not the convolution's that pytorch-grad-cam hooks)."""
    from camface.export import onnx_model, torch_model

    opset = max(options.opset, torch_model.DEFAULT_OPSET)
    model = torch_model.to_onnx(path, opset, options.input_size)
    name = options.target_layer
    if name is None or _names(model, name):
        return model
    modules = onnx_model.module_outputs(model)
    if not onnx_model.folded_siblings(model, name, modules, torchscript=False):
        return model  # no fused Conv + BatchNorm beside it: the unknown name is refused as such
    unfused = torch_model.to_onnx(path, opset, options.input_size, fuse=False)
    if not _names(unfused, name):
        return model
    log.info("target %s: torch.onnx's optimiser fuses this convolution and the BatchNorm after it "
             "into one map named as the BatchNorm; %s exported again without that fusion", name, path)
    return unfused


def _names(model, name: str) -> bool:
    """Whether `name` is a PyTorch module, node or tensor of the forward ONNX `model`."""
    from camface.export import onnx_model

    return name in onnx_model.module_outputs(model) or \
        any(n.name == name or name in n.output for n in model.graph.node)


def export(model_path: str | Path, output: str | Path, options: ExportOptions) -> ExportResult:
    """Load (.onnx, or .pt2 through torch.onnx), build, self-check and write."""
    from camface.export import convert, onnx_model, torch_model

    started = time.perf_counter()
    model_path, output = Path(model_path), Path(output)
    suffix = model_path.suffix.lower()
    if suffix in torch_model.PICKLE_SUFFIXES:
        torch_model.refuse_pickle(model_path)
    check_output_file(output, overwrite=True)
    if suffix == ".pt2":
        model = _program_as_onnx(model_path, options)
    else:
        model = onnx_model.load(model_path)
    cam_graph, info, differences = build(model, options, source=str(model_path))
    info = replace(info, source_model=model_path.name, source_sha256=sha256_file(model_path))
    log.info("exported %s at target %s (feature map %dx%d), heatmaps %s", model_path.name,
             info.target_description, *info.feature_size, ", ".join(info.heatmaps))
    if info.cam_unavailable_reason:
        log.info("no CAM: %s", info.cam_unavailable_reason)
    convert.set_metadata(cam_graph, info.to_metadata(),
                         doc=f"camface CAM graph of {model_path.name}, see camface/graph_spec.py")
    quantized = None
    if options.int8:  # on the self-checked float32 graph; ModelError when it disagrees
        from camface.export.int8 import export_int8

        cam_graph, info, quantized = export_int8(cam_graph, info, options)
        convert.set_metadata(cam_graph, info.to_metadata())
    convert.save(cam_graph, output)
    return ExportResult(output, info, differences, time.perf_counter() - started, quantized)
