"""ONNX (or .pt2) classifier file -> verified CAM graph with camface metadata: the `export` job
for models that are not Keras. Same contract, metadata and self-check report as the Keras path
(`exporter.export`)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from camface import __version__, graph_spec, methods
from camface.errors import ModelError
from camface.export.exporter import ExportOptions, ExportResult
from camface.export.preprocess import Preprocessing
from camface.hashing import sha256_file
from camface.outputs import check_output_file

log = logging.getLogger(__name__)
SUFFIXES = (".onnx", ".pt2")


def preprocessing(options: ExportOptions, channels: int) -> Preprocessing:
    """ONNX files do not record normalisation: a preset or explicit values are required."""
    if options.preset is None and options.scale is None and options.offset is None:
        raise ModelError("an ONNX or PyTorch model does not say how it normalises its input: "
                         "pass --preset (torch = RGB (x/255 - ImageNet mean) / std, tf, unit, "
                         "imagenet-caffe, none = raw 0..255) or --scale/--offset "
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
        return version_converter.convert_version(model, 17)
    except Exception as exc:  # the converter raises several types for ops it cannot convert
        if opset >= 13:
            log.info("%s: kept at opset %d (conversion to 17 fails: %s)", source, opset, exc)
            return model
        raise ModelError(f"{source}: opset {opset} is older than 13 and onnx.version_converter "
                         f"cannot convert it ({exc}); re-export it with opset >= 13") from exc


def choose_target(classifier, name: str | None, options: ExportOptions):
    """(classifier, target tensor, the name recorded): a spatial map (`onnx_model.resolve_target`),
    or a transformer's tokens [N, T, C] laid out on their patch grid (`onnx_model.with_token_grid`,
    the classifier rewritten to read them back through it): the default when the model has
    attention and no spatial map the logits read without it, or a token tensor named by `name`.
    The recorded name says the grid: `blocks.11.norm1 (tokens: 1 + 14x14)`."""
    from camface.export import onnx_model

    tokens = None
    if name is None:
        try:
            return (classifier, *onnx_model.resolve_target(classifier, None))
        except onnx_model.AttentionBeforeLogits:
            tokens = onnx_model.default_token_target(classifier)
            if tokens is None:
                raise
    else:
        tensor = onnx_model.module_outputs(classifier.model).get(name) or next(
            (n.output[0] for n in classifier.model.graph.node if n.name == name and n.output), name)
        if len(onnx_model.shapes(classifier.model).get(tensor) or []) != 3:
            return (classifier, *onnx_model.resolve_target(classifier, name))
        tokens = tensor
    grid = onnx_model.token_grid(classifier, tokens, options.token_grid, options.prefix_tokens)
    gridded, target = onnx_model.with_token_grid(classifier, tokens, grid)
    owners = [m for m, t in onnx_model.module_outputs(classifier.model).items() if t == tokens]
    recorded = name or (min(owners, key=lambda m: m.count(".")) if owners else tokens)
    log.info("target %s: tokens %s laid out on a %dx%d grid after %d prefix token(s)", recorded, tokens,
             grid.height, grid.width, grid.prefix)
    return gridded, target, f"{recorded} (tokens: {grid.prefix} + {grid.height}x{grid.width})"


def build(model, options: ExportOptions, source: str = "model"):
    """(CAM graph ModelProto, GraphInfo, self-check differences) of a forward onnx.ModelProto."""
    from camface.export import onnx_cam, onnx_model, onnx_rerun, onnx_verify

    if options.fp16:
        raise ModelError("--fp16 is not supported for ONNX / PyTorch models yet")
    model = onnx_model.prepare(upgrade(model, source), where=source)
    # a model whose own tensors are called `probs`, `image`, ...: renamed, the contract wins
    model, renamed = onnx_model.rename(model, onnx_cam.RESERVED)
    if renamed:
        log.info("%s: tensors renamed inside the CAM graph: %s", source,
                 ", ".join(f"{old} -> {new}" for old, new in renamed.items()))
    classifier = onnx_model.settle_shapes(onnx_model.describe(model, where=source))
    labels = options.labels or tuple(f"class_{i}" for i in range(classifier.num_classes))
    if len(labels) != classifier.num_classes:
        where = f"labels file {options.labels_source}" if options.labels_source else "labels"
        raise ModelError(f"{where}: {len(labels)} labels, but {source} has "
                         f"{classifier.num_classes} classes (one label per line, in class order)")
    pre = preprocessing(options, classifier.channels)
    classifier, target, target_name = choose_target(classifier, renamed.get(options.target_layer,
                                                                            options.target_layer), options)
    heads = None if options.heads is None else tuple(
        h for h in options.heads if h not in (graph_spec.OUTPUT_PROBS, graph_spec.OUTPUT_ACTIVATIONS))
    built = onnx_cam.build(classifier, target, pre.scale, pre.offset, heads)
    info = graph_spec.GraphInfo(
        labels=tuple(labels), input_size=classifier.input_size, color_order=pre.color_order,
        target_layer=target_name, heatmaps=built.heatmaps, feature_size=built.feature_size,
        normalization=pre.to_metadata(), cam_unavailable_reason=built.cam_unavailable_reason,
        precision="fp32", version=__version__)
    differences = ()
    if options.verify:
        differences = tuple(onnx_verify.check(classifier, built, pre.scale, pre.offset))
    wanted = onnx_rerun.rerun_names(methods.names() if heads is None else heads)
    model, info, rerun_differences = onnx_rerun.attach(built.model, info, wanted, options.verify,
                                                       required=onnx_rerun.asked(heads))
    return model, info, differences + rerun_differences


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
        model = torch_model.to_onnx(model_path, max(options.opset, torch_model.DEFAULT_OPSET))
    else:
        model = onnx_model.load(model_path)
    cam_graph, info, differences = build(model, options, source=str(model_path))
    info = replace(info, source_model=model_path.name, source_sha256=sha256_file(model_path))
    log.info("exported %s at target %s (feature map %dx%d), heatmaps %s", model_path.name,
             info.target_layer, *info.feature_size, ", ".join(info.heatmaps))
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
