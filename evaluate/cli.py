"""`camface evaluate`: which heatmap method is faithful to the model? Deletion / insertion AUC
(RISE) and Average Drop / Increase in Confidence (Grad-CAM++) per method of the CAM graph, beside
the random baseline's, on faces detected and cropped as `camface live` does (or on snapshots).

    camface evaluate                                  # the sample clip, every method
    camface evaluate --source clip.mp4 --methods gradcam,layercam --json scores.json --plot curves.png
    camface evaluate snapshots/                       # crops saved by `camface live` (key s)
    camface evaluate --sanity --json s.json --plot s.png  # + do the maps depend on the model and class?

Everything runs on ONNX Runtime (no TensorFlow); the metrics are camface.evaluate.metrics. `--sanity`
also checks Guided Backprop and Guided Grad-CAM in TensorFlow when the graph's Keras model is at hand.
Top-level imports stay light: `camface --help` imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from camface.errors import CamfaceError, ModelError, UsageError
from camface.outputs import check_model_file, input_path, input_spec, output_file
from camface.realtime.config import add_arguments, from_args

log = logging.getLogger(__name__)

PIPELINE_OPTIONS = ("source", "model", "detector", "detector_runtime", "min_confidence", "margin", "max_faces", "device",
                    "graph_threads")
RANDOM = "random"
EVERY = 5  # --every's default for a clip, camera or stream
FRAMES = 300  # --frames' default for a clip, camera or stream
# what finds and cuts the faces of a --source: snapshots hold crops already cut
SOURCE_ONLY = ("detector", "detector_runtime", "min_confidence", "margin", "max_faces")


def _photos(source: str) -> bool:
    """A folder of images or one image: distinct photos, none to skip and none to cap."""
    from camface.realtime.sources import IMAGE_SUFFIXES, local_spec

    path = Path(local_spec(source))  # file:///data/faces is the folder, as make_source reads it
    return path.is_dir() or (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def default_every(source: str) -> int:
    """--every when it is not given: 1 for a folder of images or an image (distinct photos,
    none to skip), else EVERY (neighbouring video frames are near duplicates)."""
    return 1 if _photos(source) else EVERY


def default_frames(source: str) -> int:
    """--frames when it is not given: every image of a folder, else the first FRAMES frames."""
    return sys.maxsize if _photos(source) else FRAMES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("snapshots", type=input_spec, nargs="*", metavar="SNAPSHOT_DIR",
                        help="snapshot folders saved by `camface live` (or a folder of them): score their "
                             "crops instead of a --source, with the CAM graph they were taken with unless --model")
    parser.add_argument("--source", type=input_spec, default=None,
                        help="video file, folder of images, camera index, stream URL or 'sample' (the bundled "
                             "demo clip); default: sample, unless SNAPSHOT_DIRs are given")
    add_arguments(parser, "model")
    parser.add_argument("--methods", default="all",
                        help="'all' (every heatmap of the graph, the random baseline included) or a "
                             "comma-separated list; the random baseline is always added when the graph has it")
    parser.add_argument("--frames", type=int, default=None,
                        help=f"frames read from --source (default: the first {FRAMES} of a clip, camera or "
                             "stream; every image of a folder)")
    parser.add_argument("--every", type=int, default=None,
                        help=f"score the faces of every N-th frame read (neighbouring video frames are near "
                             f"duplicates; 1: every frame); default: {EVERY} for a clip, camera or stream, 1 for a "
                             "folder of images (each its own photo)")
    parser.add_argument("--steps", type=int, default=16,
                        help="K: deletion / insertion curves remove or reveal 1/K of the pixels per step")
    parser.add_argument("--baseline", choices=("blur", "mean"), default="blur",
                        help="what removed pixels become: the crop blurred (sigma = side/8) or its mean colour")
    parser.add_argument("--json", type=output_file, default=None, metavar="OUT.json", help="write every number here")
    parser.add_argument("--plot", type=output_file, default=None, metavar="OUT.png",
                        help="plot the mean deletion and insertion curves per method (matplotlib)")
    parser.add_argument("--sanity", action="store_true",
                        help="also run the sanity checks of Adebayo et al. 2018: cascading randomisation of "
                             "the graph's weights (logits down) and the random-logit test, per method "
                             "(needs the onnx package); with --plot, the randomisation figure goes to "
                             "OUT-sanity.png")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sanity checks' weight draws and classes")
    parser.add_argument("--keras", type=input_path, default=None, metavar="MODEL",
                        help="with --sanity: the Keras model the graph was exported from (its sha256 checked "
                             "against the graph's record), to check Guided Backprop and Guided Grad-CAM too "
                             "(TensorFlow); default: the graph's source model beside it "
                             "or the bundled one when its sha256 matches, else they are skipped")
    add_arguments(parser, "detector", "detector_runtime", "min_confidence", "margin", "max_faces", "device")
    add_arguments(parser, "graph_threads", graph_threads=0)


def named_methods(spec: str) -> list[str] | None:
    """The method names of --methods `spec` (None for "all"). CamfaceError naming the valid ones
    for an unknown name: the registry knows them, so this is said before the graph loads."""
    from camface import methods

    if spec.strip() == "all":
        return None
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in methods.METHODS]
    if unknown or not wanted:
        raise CamfaceError(f"unknown method {', '.join(unknown) or repr(spec)}; choose from "
                           f"all, {', '.join(methods.METHODS)}")
    return wanted


def resolve_methods(spec: str, available: tuple[str, ...]) -> tuple[str, ...]:
    """The methods to score, in registry order, the random baseline last. CamfaceError naming
    the valid ones for an unknown or absent name."""
    from camface import methods

    wanted = named_methods(spec)
    if wanted is None:
        wanted = list(available)
    else:
        absent = [name for name in wanted if name not in available]
        if absent:
            raise CamfaceError(f"the graph has no {', '.join(absent)} heatmap; it offers "
                               f"{', '.join(available) or 'none'}")
    if not [name for name in wanted if name != RANDOM] and [name for name in available if name != RANDOM]:
        raise CamfaceError(f"--methods {spec}: the random baseline alone is nothing to compare; it is added to "
                           f"the methods named (the graph offers {', '.join(available)}, or 'all')")
    if not [name for name in wanted if name != RANDOM]:
        raise CamfaceError("the graph has no heatmap to evaluate (a graph without gradients?); it offers "
                           f"{', '.join(available) or 'none'}: export it with `camface export`")
    ordered = [name for name in methods.METHODS if name in wanted and name != RANDOM]
    return tuple(ordered + ([RANDOM] if RANDOM in available else []))


def main(args: argparse.Namespace) -> int:
    from camface.export.ranking import quiet_graph_log

    with quiet_graph_log(getattr(args, "debug", False)):  # the table names the provider
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from camface.evaluate import crops as crop_sources
    from camface.evaluate.report import format_table, strict_json, to_json
    from camface.evaluate.scores import Scorer
    from camface.api import load, model_path
    from camface.models import EMOTION_KERAS
    from camface.outputs import check_not_an_input, check_output_file, replace_whole

    if args.snapshots and args.source is not None:
        raise UsageError("give SNAPSHOT_DIRs or --source, not both")
    if args.snapshots:  # they hold the crops already cut: these would be ignored without a word
        from camface.realtime.config import DEFAULTS, FLAGS

        given = [FLAGS[name][0] for name in SOURCE_ONLY if getattr(args, name) != DEFAULTS[name]]
        given += [flag for flag, used in (("--frames", args.frames is not None), ("--every", args.every is not None))
                  if used]
        if given:
            raise UsageError(f"{', '.join(given)}: for faces found in a --source; SNAPSHOT_DIRs hold the crops "
                             "cut when the snapshots were taken")
    if args.seed != 0 and not args.sanity:
        raise UsageError("--seed is for the --sanity checks: add --sanity")
    taken_with = None
    if args.snapshots and getattr(args, "model", None) is None:  # the graph the crops were cut for
        taken_with = crop_sources.snapshot_graph(args.snapshots)
    config = from_args(args, PIPELINE_OPTIONS, method="none", source=args.source or "sample",
                       **({"model": str(taken_with)} if taken_with else {}))
    if taken_with:
        print(f"camface evaluate: scoring with {taken_with}, the CAM graph the snapshots were taken with "
              "(--model picks another)", file=sys.stderr)
    every = args.every if args.every is not None else default_every(config.source)
    frames = args.frames if args.frames is not None else default_frames(config.source)
    for flag, value in (("--frames", frames), ("--every", every)):  # each named, with its value
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.steps < 2:
        raise UsageError(f"--steps must be at least 2, got {args.steps}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.keras is not None and not args.sanity:
        raise UsageError("--keras is for the --sanity checks: add --sanity")
    # what can be checked before the graph (and, with --sanity, TensorFlow) loads
    if args.keras is not None:
        check_keras_file(args.keras)
    named_methods(args.methods)
    from camface.realtime.sources import local_spec

    given = local_spec(args.source) if args.source is not None else None  # file:///x: the path x
    if given is not None and Path(given).is_dir():
        from camface.realtime.snapshot import SNAPSHOT_JSON

        # read as a folder of images, a snapshot's frame, its crops and its figures were all "photos"
        source = Path(given)
        if (source / SNAPSHOT_JSON).is_file() or any(source.glob(f"*/{SNAPSHOT_JSON}")):
            raise UsageError(f"--source {source} holds camface snapshots: give it as SNAPSHOT_DIR (camface evaluate "
                             f"{source}) to score the crops they saved")
    if not args.snapshots:
        from camface.realtime.sources import check_source

        check_source(config.source, "--source")
    sanity_plot = None if args.plot is None or not args.sanity else \
        args.plot.with_name(f"{args.plot.stem}-sanity{args.plot.suffix or '.png'}")
    written = [(flag, out) for flag, out in (("--json", args.json), ("--plot", args.plot),
                                              ("--plot (its sanity figure)", sanity_plot)) if out is not None]
    # the graph read is the bundled one without --model (config.model None), and --sanity may read
    # the bundled Keras model (keras_for_guided): --json naming either wrote over it
    inputs = [*(args.snapshots or ()), model_path(config), getattr(args, "keras", None),
              EMOTION_KERAS if args.sanity and args.keras is None else None,
              given if given and Path(given).exists() else None]
    for flag, out in written:  # fail before minutes of work, and never over an input
        check_output_file(out, overwrite=True)
        check_not_an_input(out, inputs, flag)
    if len({Path(out).absolute() for _, out in written}) < len(written):
        raise UsageError("--json and --plot name the same file; give each its own")
    if args.plot is not None:
        from camface.export.compare import check_figure_output

        check_figure_output(args.plot, "--plot")
    pipeline = load(config=config, cli=True)
    graph_path, graph = pipeline.model_path, pipeline.graph
    pixels = graph.info.input_size[0] * graph.info.input_size[1]
    if args.steps > pixels:  # a step removes or adds at least one pixel
        raise UsageError(f"--steps must be at most {pixels}, the pixels of {graph_path.name}'s "
                         f"{graph.info.input_size[0]}x{graph.info.input_size[1]} input; got {args.steps}")
    names = resolve_methods(args.methods, tuple(graph.info.heatmaps))
    randomizer = guided = None
    if args.sanity:  # fail before minutes of scoring
        if len(graph.info.labels) < 2:  # not at the end of the cascade (sanity._other_classes)
            raise ModelError(f"--sanity: the random-logit test needs at least 2 classes; {graph_path} has "
                             f"{len(graph.info.labels)}")
        if args.keras is None and graph.info.source_model:  # keras_for_guided reads it beside the graph
            for flag, out in written:
                check_not_an_input(out, [graph_path.parent / Path(graph.info.source_model).name], flag)
        randomizer = sanity_randomizer(graph_path, args.seed)
        guided, why_not = keras_for_guided(graph_path, graph.info, args.keras)
        if why_not:
            print(f"camface evaluate: Guided Backprop / Guided Grad-CAM sanity skipped: {why_not}", file=sys.stderr)
    started = time.perf_counter()
    progress = sys.stderr.isatty()
    if args.snapshots:
        crops, frames, source = crop_sources.from_snapshots(args.snapshots, graph.info), None, ", ".join(args.snapshots)
    else:
        from camface.realtime.sources import redact

        crops, frames = crop_sources.from_source(config, graph, frames, every, progress)
        source = redact(config.source)  # the report is shared: no camera's password in it
    detected = time.perf_counter()
    # the scorer's sessions run where the graph's does (a --device that fell back to the CPU is
    # said once, by the graph, not again per session)
    device = "cpu" if graph.provider == "CPUExecutionProvider" else config.device
    scorer = Scorer(graph, device=device, threads=config.graph_threads, progress=progress, steps=args.steps,
                    baseline=args.baseline)
    predicted, probability, scores = scorer.score(crops, names)
    finished = time.perf_counter()
    seconds = {"crops": detected - started, "scores": finished - detected}
    sanity_results = figure = None
    if args.sanity:
        from camface.evaluate import sanity

        with naming(graph_path):
            sanity_results, figure = sanity.check(randomizer, crops, names, threads=config.graph_threads,
                                                  progress=progress, guided=guided)
        seconds["sanity"] = time.perf_counter() - finished
    report = to_json(scores, predicted, probability, graph, source=source, frames=frames,
                     every=None if args.snapshots else every,  # every crop of the snapshots: no frames skipped
                     steps=args.steps, baseline=args.baseline, seconds=seconds)
    if sanity_results is not None:
        report["settings"]["sanity_seed"] = args.seed
        report["sanity"] = {m.method: m.to_json() for m in sanity_results}
    print(format_table(report))
    if args.json is not None:
        text = json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n"
        # a full disk leaves an earlier file whole, not half a JSON (OutputError naming it)
        replace_whole(args.json, lambda partial: partial.write_text(text))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        from camface.evaluate.plot import plot_curves

        plot_curves(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if sanity_plot is not None:
        from camface.evaluate.plot import plot_sanity

        plot_sanity(report, figure, sanity_plot)
        print(f"wrote {sanity_plot}", file=sys.stderr)
    return 0


KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def check_keras_file(path: Path) -> None:
    """ModelError "--keras: ..." when `path` is missing, a folder (it said "not found") or no
    regular file."""
    try:
        check_model_file(path)
    except ModelError as exc:
        raise ModelError(f"--keras: {exc}") from exc


def keras_for_guided(graph_path, info, override):
    """((Keras model, Preprocessing, target layer), "") for the guided sanity checks, or (None, why
    not): `override` (--keras), else the graph's source model beside it, else the bundled Keras
    model when it is the graph's source (sha256). An explicit `override` that cannot be used is
    an error (ModelError)."""
    from camface.errors import ModelError
    from camface.guided.snapshot import Preprocessing, source_mismatch
    from camface.hashing import sha256_file
    from camface.models import EMOTION_KERAS

    if info.gallery:  # its source model is the embedder: its outputs are not the identities
        if override is not None:
            raise ModelError(f"--keras {override}: the graph {graph_path} is a gallery graph; Guided Backprop "
                             "and Guided Grad-CAM explain a classifier's classes, not a similarity")
        return None, "the graph is a gallery graph (its source model is an embedder, not a classifier)"
    if override is not None:
        check_keras_file(override)
        path = override
    else:
        source = Path(info.source_model or "")
        candidates = [Path(graph_path).parent / source.name] if source.suffix.lower() in KERAS_SUFFIXES else []
        candidates.append(EMOTION_KERAS)
        path = next((c for c in candidates if c.is_file() and info.source_sha256
                     and sha256_file(c) == info.source_sha256), None)
        if path is None:
            return None, (f"the graph's source model {info.source_model or '(none recorded)'} is not a Keras "
                          "model found beside it; pass one with --keras")
    if not info.normalization:
        return None, f"the graph {graph_path} records no input normalisation"
    try:
        import keras
    except ImportError:
        if override is not None:
            raise ModelError("--keras needs TensorFlow (pip install 'camface[keras]')") from None
        return None, "TensorFlow/Keras is not installed (pip install 'camface[keras]')"
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for unreadable files
        raise ModelError(f"cannot load Keras model {path}: {exc}") from exc
    why = _mismatch(model, info)
    if why:  # found here, before minutes of scoring, not at the end of the sanity checks
        if override is not None:
            raise ModelError(f"--keras {path}: {why}")
        return None, f"{path}: {why}"
    if override is not None:  # as `camface guided --model` checks a snapshot's: another checkpoint
        if not info.source_sha256:  # of the same layers would give other maps without a word
            log.warning("the graph %s records no source_sha256: cannot check that --keras %s is its model",
                        graph_path, path)
        elif why := source_mismatch(path, info.source_sha256):
            raise ModelError(f"--keras {path}: not the model the graph {graph_path} was exported from "
                             f"({info.source_model or 'its source model'}): {why} recorded in the graph")
    return (model, Preprocessing.from_normalization(info.color_order, info.normalization), info.target_layer), ""


def _mismatch(model, info) -> str:
    """Why Keras `model` cannot be the graph's model (its input, classes or target layer differ;
    "" when it can)."""
    from camface.errors import ModelError
    from camface.guided.gradcam import resolve_layer

    expected, shape = (*info.input_size, info.channels), tuple(model.input_shape[1:])
    if len(shape) != 3 or any(d is not None and d != e for d, e in zip(shape, expected)):
        return (f"the model takes {'x'.join(str(d) for d in shape)} inputs, the graph "
                f"{'x'.join(str(d) for d in expected)} crops")
    if int(model.output_shape[-1]) != len(info.labels):
        return f"the model has {model.output_shape[-1]} classes, the graph {len(info.labels)}"
    try:
        resolve_layer(model, info.target_layer)
    except ModelError as exc:
        return f"the graph's target layer: {exc}"
    return ""


def sanity_randomizer(graph_path, seed: int):
    """The sanity checks' Randomizer of the graph file (ModelError naming the file when it
    cannot be randomised)."""
    from camface.evaluate.randomize import Randomizer, load_graph

    with naming(graph_path):
        return Randomizer(load_graph(graph_path), seed=seed)


@contextlib.contextmanager
def naming(graph_path):
    """A ModelError of the sanity checks (an int8 or float16 graph, no weights to re-draw...)
    names the graph's file, as every other error of `camface evaluate` does."""
    try:
        yield
    except ModelError as exc:
        if str(graph_path) in str(exc):
            raise
        raise ModelError(f"--sanity on {graph_path}: {exc}") from exc
