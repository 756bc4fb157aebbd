"""`camface compare A.jpg B.jpg --model EMBEDDER [-o figure.png]`: same person? and what made the
model say so.

Each photo's one face is detected and cropped as `camface live` crops it. The cosine similarity
of their embeddings answers the first question; for the second, a two-identity gallery graph
(`gallery.build`, the rows A's and B's L2-normalised embeddings) explains A's similarity to B's
embedding and B's to A's: each face's map says which of its regions raise its similarity to the
other face. One figure: the two crops under their maps, the similarity in the title.

Saturated similarity (1 - cosine < SATURATED: the same photo twice, or two copies of it): the
cosine is at its maximum, where its gradient, (u_B - cos u_A) / |e_A| . de_A/dA, vanishes; a
float32 map of it is rounding noise (tests: moving B's embedding by two ulps turned its normalised
map into another). There the maps explain the projection e_A . u_B of A's raw embedding onto B's
direction instead (its gradient u_B . de_A/dA does not vanish): which regions the embedding that
makes the match rests on. `Comparison.target` says which, and the printed line and the figure
say so.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camface.errors import SourceError, UsageError
from camface.export.gallery import SATURATED  # 1 - cosine below it: the maps explain the projection
from camface.outputs import input_spec, output_file

log = logging.getLogger(__name__)
COSINE, PROJECTION = "cosine", "projection"  # what the maps explain (Comparison.target)


@dataclass(frozen=True)
class Comparison:
    """similarity: cosine of the two embeddings; crops: uint8 [2, H, W, C] in the embedder's
    colour order; maps: float32 [2, h, w], unnormalised, of `method`: maps[0] explains A's
    similarity to B, maps[1] B's to A; names: the two photos' file names. target: COSINE, or
    PROJECTION where the similarity is saturated (module docstring): then the maps explain
    e_A . u_B and e_B . u_A."""

    similarity: float
    crops: np.ndarray
    maps: np.ndarray
    method: str
    names: tuple[str, str]
    color_order: str
    target: str = COSINE

    @property
    def note(self) -> str:
        """What the maps explain, when it is not the cosine; "" otherwise."""
        if self.target == COSINE:
            return ""
        return (f"the similarity is saturated (1 - cosine < {SATURATED:g}), where its gradient vanishes: the maps "
                "explain each face's embedding projected on the other's direction instead")


def configure(parser: argparse.ArgumentParser) -> None:
    from camface import methods
    from camface.export.cli import add_shape_arguments
    from camface.export.preprocess import add_input_arguments

    parser.add_argument("photos", type=input_spec, nargs=2, metavar="PHOTO", help="two photos, one face in each")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=input_spec, metavar="EMBEDDER", help="face-recognition model (.onnx, .pt2 or Keras) "
                                                           "whose one output is an embedding [N, D]")
    which.add_argument("--embedding-from", type=input_spec, metavar="MODEL",
                       help="a classifier whose pooled features are the embedding (as `camface enroll`)")
    parser.add_argument("-o", "--output", type=output_file, metavar="FIGURE.png", default=None,
                        help="write the figure (the crops under their maps) here")
    add_input_arguments(parser, "the embedder's input normalisation (arcface, facenet, ...; see `camface enroll`)")
    parser.add_argument("--target-layer", metavar="NAME", default=None,
                        help="layer whose activations the maps use (default: as `camface export`)")
    add_shape_arguments(parser)
    parser.add_argument("--model-output", metavar="NAME", default=None,
                        help="a model with several outputs (a dict such as {embedding, logits}): the one to use, "
                             "the embedding [N, D] (--model) or the class scores (--embedding-from)")
    # the methods offered for display: the random baseline is no explanation of the match
    parser.add_argument("--method", default="gradcam", choices=methods.names(display_only=True),
                        help="heatmap method of the maps")
    parser.add_argument("--threshold", type=float, default=None, metavar="T",
                        help="say 'same person' at cosine similarity >= T (e.g. a gallery's threshold)")
    parser.add_argument("--no-detect", action="store_true", help="the photos are face crops already")


def main(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from camface.export.exporter import ExportOptions

    if args.threshold is not None and not -1.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold is a cosine similarity in [-1, 1], got {args.threshold}")
    if args.output:  # before the work: the figure's folder and format, and not over a photo or the model
        from camface.outputs import check_not_an_input

        check_figure_output(Path(args.output))
        check_not_an_input(Path(args.output), [*args.photos, args.model or args.embedding_from], "-o")
    options = ExportOptions(target_layer=args.target_layer, preset=args.preset, color_order=args.color_order,
                            scale=tuple(args.scale) if args.scale else None,
                            offset=tuple(args.offset) if args.offset else None, verify=False,
                            input_size=args.input_size, token_grid=args.token_grid,
                            prefix_tokens=args.prefix_tokens)
    result = compare(Path(args.photos[0]), Path(args.photos[1]), Path(args.model or args.embedding_from),
                     options, args.method, from_classifier=args.embedding_from is not None,
                     detect=not args.no_detect, model_output=args.model_output)
    verdict = "" if args.threshold is None else \
        (" (same person" if result.similarity >= args.threshold else " (different people") + \
        f" at threshold {args.threshold:g})"
    print(f"cosine similarity {result.names[0]} - {result.names[1]}: {result.similarity:.3f}{verdict}")
    if result.note:
        print(result.note)
    if args.output:
        path = figure(result, Path(args.output), verdict)
        print(f"wrote {path}")
    return 0


def check_figure_output(path: Path, flag: str = "-o") -> None:
    """UsageError/OutputError naming `path` (and its `flag`) when matplotlib cannot write a
    figure there."""
    from matplotlib.figure import Figure

    from camface.outputs import check_output_file

    check_output_file(path, overwrite=True)
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise UsageError(f"{flag} {path}: a figure is one of {', '.join('.' + f for f in sorted(formats))}")


def read_photos(paths) -> list[np.ndarray]:
    """The photos at `paths`, uint8 BGR [H, W, 3]; SourceError naming the first that is missing
    or cannot be decoded."""
    from camface.models.dataset import read_photo

    images = []
    for path in paths:
        if not Path(path).is_file():
            why = "it is a folder; give an image file" if Path(path).is_dir() else "no such file"
            raise SourceError(f"cannot read the photo {path}: {why}")
        image, why = read_photo(path)
        if image is None:
            raise SourceError(f"cannot read the photo {path}: {why}")
        images.append(image)
    return images


def one_face(path: Path, image: np.ndarray, cropper, input_size: tuple[int, int], color_order: str,
             detect: bool) -> np.ndarray:
    """uint8 [H, W, C] crop of the one face of `image` (uint8 BGR, the photo at `path`), in
    `color_order`; SourceError naming the photo when it holds no face or several."""
    import cv2

    from camface.color_order import ColorOrder
    from camface.models.dataset import resize_square

    height, width = input_size
    if detect:
        crops = cropper.crop_faces(image)
        if len(crops) != 1:
            raise SourceError(f"{path}: {'no face' if not crops else f'{len(crops)} faces'} found; "
                              "compare needs one face per photo (crop it, or --no-detect for a face crop)")
        crop = crops[0]
    else:
        crop = resize_square(image, max(height, width))
    if crop.shape[:2] != (height, width):
        crop = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)
    return ColorOrder.of(color_order).from_bgr(crop[None])[0]


def compare(a: Path, b: Path, model: Path, options, method: str = "gradcam", from_classifier: bool = False,
            detect: bool = True, model_output: str | None = None) -> Comparison:
    """The comparison of photos `a` and `b` by the embedder in `model` (see the module docstring)."""
    import contextlib


    from camface.api import face_detector
    from camface.export import gallery
    from camface.models.dataset import LiveCropper
    from camface.realtime.config import LiveConfig

    images = read_photos((a, b))  # before the embedder loads (TensorFlow, for a Keras one)
    embedder = gallery.load(model, options, from_classifier, model_output)
    order = embedder.preprocessing.color_order
    live = LiveConfig()
    with contextlib.ExitStack() as stack:
        cropper = stack.enter_context(LiveCropper(face_detector(live), live.margin, max(embedder.input_size))) \
            if detect else None
        crops = np.stack([one_face(p, image, cropper, embedder.input_size, order, detect)
                          for p, image in zip((a, b), images)])
    rows = gallery.normalise(gallery.embed(embedder, crops, names=[str(a), str(b)]))
    similarity = float(np.clip(rows[0].astype(np.float64) @ rows[1].astype(np.float64), -1.0, 1.0))
    target = PROJECTION if 1.0 - similarity < SATURATED else COSINE
    maps = explain(embedder, options, crops, rows, method, target, _names(a, b))
    return Comparison(similarity, crops, maps, method, _names(a, b), str(order), target)


def explain(embedder, options, crops: np.ndarray, rows: np.ndarray, method: str, target: str = COSINE,
            names: tuple[str, str] = ("A", "B")) -> np.ndarray:
    """float32 [2, h, w] maps of `method`: crops[0]'s `target` (COSINE or PROJECTION) to rows[1]
    and crops[1]'s to rows[0] (embedder: gallery.Embedder; options: its ExportOptions). crops: uint8 [2, H, W, C] in the embedder's colour order; rows:
    float32 [2, D], L2-normalised embeddings. ModelError when the graph cannot make `method`."""
    from dataclasses import replace

    import onnxruntime as ort

    from camface import graph_spec
    from camface.export import gallery

    graph, info, _ = gallery.build(embedder, rows, names, replace(options, heads=(method,)), {},
                                   unit=target == COSINE)
    if method not in info.heatmaps:
        from camface.errors import ModelError

        why = info.cam_unavailable_reason or "its head does not allow it"
        raise ModelError(f"{embedder.source.name}: no {method!r} map of its similarity ({why}); "
                         "choose another --method")
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    session = ort.InferenceSession(graph.SerializeToString(), session_options, providers=["CPUExecutionProvider"])
    (maps,) = session.run([method], {graph_spec.INPUT_IMAGE: crops,
                                     graph_spec.INPUT_CLASS: np.array([1, 0], np.int64)})  # A to B, B to A
    return maps


def _names(a: Path, b: Path) -> tuple[str, str]:
    """The photos' file names, with their folders when the names alone are the same (a photo
    in the working folder keeps its bare name)."""
    if a.name != b.name:
        return a.name, b.name
    first, second = (f"{p.parent.name}/{p.name}" if p.parent.name else p.name for p in (a, b))
    return first, second


def figure(result: Comparison, path: Path, verdict: str = "") -> Path:
    """The two crops, each with its map over it, side by side; the similarity in the title."""
    from camface.color_order import ColorOrder
    from camface.evaluate.plot import _save
    from camface.realtime.overlay import overlay

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ColorOrder.of(result.color_order)
    fig, axes = plt.subplots(1, 4, figsize=(10, 3.1))
    for i, other in ((0, 1), (1, 0)):
        bgr = order.to_bgr(result.crops[i:i + 1])[0]
        shown = overlay(bgr, result.maps[i], result.method)
        axes[2 * i].imshow(bgr[:, :, ::-1])
        axes[2 * i].set_title(result.names[i], fontsize=8)
        axes[2 * i + 1].imshow(shown[:, :, ::-1])
        why = "why similar to" if result.target == COSINE else "embedding along"
        axes[2 * i + 1].set_title(f"{result.method}: {why}\n{result.names[other]}", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    saturated = "" if result.target == COSINE else "\n(saturated: the maps explain each embedding's projection " \
        "on the other's direction)"
    fig.suptitle(f"cosine similarity {result.similarity:.3f}{verdict}{saturated}", fontsize=10)
    return _save(fig, path, dpi=110)
