"""`camface info MODEL.onnx`: what a CAM graph holds (metadata, inputs, outputs).

Reads the file with `onnx` when it is installed, else with ONNX Runtime (the live-loop install).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from camface import graph_spec, model_kinds
from camface.errors import ModelError
from camface.outputs import check_model_file, input_spec


@dataclass(frozen=True)
class GraphSummary:
    path: Path
    metadata: dict[str, str]
    inputs: tuple[tuple[str, str, tuple], ...]  # (name, element type, shape)
    outputs: tuple[tuple[str, str, tuple], ...]
    opset: int | None

    @property
    def info(self) -> graph_spec.GraphInfo:
        """The graph's GraphInfo; raises ModelError (graph_spec.validate) when it is not a
        CAM graph."""
        return graph_spec.validate(self.path, {name: shape for name, _, shape in self.inputs},
                                   {name: shape for name, _, shape in self.outputs},
                                   self.metadata, types={name: kind for name, kind, _ in self.inputs})


def read(path: str | Path) -> GraphSummary:
    """Metadata and signature of an ONNX file. Raises ModelError naming the path."""
    path = Path(path)
    check_model_file(path, "ONNX file")
    model_kinds.check_not_a_video(path)  # before onnx reads it all
    try:
        import onnx
    except ImportError:
        return _read_with_onnxruntime(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: a BlazeFace .tflite, a Keras .h5
        raise ModelError(model_kinds.not_a_graph(path, _first_line(exc))) from exc
    if not model.graph.node:
        raise ModelError(model_kinds.not_a_graph(path, "no graph was found in the protobuf"))

    def signature(values):
        rows = []
        for value in values:
            tensor = value.type.tensor_type
            dims = tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)
            rows.append((value.name, onnx.TensorProto.DataType.Name(tensor.elem_type).lower(), dims))
        return tuple(rows)

    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return GraphSummary(path, {p.key: p.value for p in model.metadata_props}, signature(inputs),
                        signature(model.graph.output), opset)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _read_with_onnxruntime(path: Path) -> GraphSummary:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = _first_line(exc)
        if "INVALID_PROTOBUF" in first or "No graph was found" in first:
            raise ModelError(model_kinds.not_a_graph(path, model_kinds.onnx_runtime_reason(exc))) from exc
        raise ModelError(f"cannot load {path}: {first}") from exc
    meta = session.get_modelmeta().custom_metadata_map

    def signature(values):
        return tuple((v.name, v.type, tuple(v.shape)) for v in values)

    return GraphSummary(path, dict(meta), signature(session.get_inputs()),
                        signature(session.get_outputs()), None)


def format_summary(summary: GraphSummary) -> str:
    """Metadata, inputs and outputs as text (any ONNX file; `main` checks it is a CAM graph)."""
    lines = [f"{summary.path}" + (f" (opset {summary.opset})" if summary.opset else "")]
    lines.append("metadata:")
    width = max((len(k) for k in summary.metadata), default=0)
    for key, value in summary.metadata.items():
        lines.append(f"  {key:<{width}}  {value}")
    for title, rows in (("inputs:", summary.inputs), ("outputs:", summary.outputs)):
        lines.append(title)
        for name, kind, shape in rows:
            lines.append(f"  {name:<18} {kind:<8} [{', '.join(str(d) for d in shape)}]")
    return "\n".join(lines)


def method_lines(summary: GraphSummary, info: graph_spec.GraphInfo) -> list[str]:
    """One line per heatmap the graph offers: its name, title and cost (gradients, K head or
    forward passes per crop for the gradient-free methods that run the model again)."""
    from camface import methods

    shape = next((shape for name, _, shape in summary.outputs if name == graph_spec.OUTPUT_ACTIVATIONS), ())
    channels = shape[-1] if shape else "K"
    return [f"{name:<18} {methods.get(name).title:<22} {methods.get(name).passes(channels)}"
            for name in info.heatmaps if name in methods.METHODS]


def feature_size(summary: GraphSummary, info: graph_spec.GraphInfo) -> tuple:
    """(h, w) of the heatmaps: the metadata's `feature_size`, or, in a graph whose metadata
    lacks it (read as (0, 0)), the last two dimensions of its first heatmap output; ("?", "?")
    when neither says."""
    if all(info.feature_size):
        return tuple(info.feature_size)
    shape = next((shape for name, _, shape in summary.outputs if name in info.heatmaps), ())
    return tuple(shape[-2:]) if len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape[-2:]) \
        else ("?", "?")


def methods_version_line(info: graph_spec.GraphInfo) -> str:
    """The version of the methods' maths that built the graph's maps, against this camface's
    (`camface.methods.VERSION`)."""
    from camface import methods

    if not info.methods_version:
        return f"version not recorded (an older camface; this camface's is {methods.VERSION})"
    if info.methods_version > methods.VERSION:
        return f"version {info.methods_version}, NEWER than this camface's {methods.VERSION} (upgrade camface)"
    if info.methods_version < methods.VERSION:
        return f"version {info.methods_version}, older than this camface's {methods.VERSION}"
    return f"version {info.methods_version} (this camface's)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", type=input_spec, metavar="MODEL.onnx", nargs="?", default=None,
                        help="a CAM graph written by camface export; default: the bundled emotion graph "
                             "(what `camface live` runs by default)")


def main(args: argparse.Namespace) -> int:
    from camface.api import model_path
    from camface.realtime.config import LiveConfig

    summary = read(model_path(LiveConfig(model=args.graph)))  # no MODEL.onnx: the graph live runs
    info = summary.info  # ModelError, one line, when it is not a CAM graph
    from camface.export.ranking import summary_lines as ranking_lines

    method, _ = graph_spec.auto_method(info)
    # before anything is printed: ModelError, one line, for malformed JSON metadata
    ranking = _lines(summary, graph_spec.META_RANKING, ranking_lines, info.ranking, method, graph_spec.ranked_by(info))
    quantization = []
    if info.quantization:
        from camface.export.int8 import summary_lines  # imports numpy only until it quantizes

        quantization = _lines(summary, graph_spec.META_QUANTIZATION, summary_lines, info.quantization)
    print(format_summary(summary))
    height, width = feature_size(summary, info)
    print(f"CAM graph: {info.color_order} {info.input_size[0]}x{info.input_size[1]} crops -> "
          f"{len(info.labels)} {'identities' if info.gallery else 'classes'}; {', '.join(info.heatmaps)} at "
          f"{info.target_description} "
          f"{height}x{width}; {info.precision}")
    print(f"target {info.target_layer}: {info.target_reason or 'not recorded (an older camface)'}")
    print(f"methods' maths: {methods_version_line(info)}")
    print("methods (what each costs beyond the forward pass):")
    for line in method_lines(summary, info):
        print(f"  {line}")
    if quantization:
        print("quantization:")
        for line in quantization:
            print(f"  {line}")
    if info.gallery:
        g = info.gallery
        print(f"gallery: {len(info.labels)} identities, D = {g.get('embedding_dim')}, embedder "
              f"{g.get('embedder', '?')}; probs = softmax({g.get('scale')} * similarity); unknown below "
              f"{info.threshold} ({g.get('threshold_rule', '')})")
    print(f"method ranking (--method auto shows {method}):")
    for line in ranking:
        print(f"  {line}")
    return 0


def _lines(summary: GraphSummary, key: str, lines_of, *args) -> list[str]:
    """`lines_of(*args)`, the text of the metadata `key`; ModelError naming the file, the key and
    what is wrong when its JSON lacks a field or holds the wrong kind of value (a graph edited by
    hand: a ranking without its settings was a KeyError traceback, after half the summary)."""
    try:
        return lines_of(*args)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        what = f"no field {exc.args[0]!r}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise ModelError(f"{summary.path} has malformed CAM graph metadata: {key} ({what}): "
                         f"{summary.metadata.get(key, '')[:200]}") from exc
