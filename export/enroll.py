"""`camface enroll PEOPLE_DIR --model EMBEDDER -o gallery.onnx`: photos of people -> a gallery graph.

PEOPLE_DIR holds one folder per person (its name is the label). Each photo's face is detected
and cropped as `camface live` crops it (`models.dataset.prepare_crops`, as `camface train`);
photos with no face or several faces are skipped and counted. Each identity's embedding is the
L2-normalised mean of its photos' L2-normalised embeddings (`gallery.identity_embeddings`).

Written: OUT.onnx (the gallery graph, graph_spec's contract with `similarity`), and beside it
OUT.npz (`embeddings` float32 [identities, D], `labels`, `photos` and `photo_labels`: the photos
used and their identity index, `photo_embeddings` float32 [photos, D]), OUT.enroll.json (the
report: photos used / skipped per identity, leave-one-out accuracy, threshold) and
OUT.similarity.png (photo-by-photo cosine similarities, identities in blocks).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from camface.errors import SourceError, UsageError
from camface.outputs import input_spec, output_file

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    from camface.export.cli import add_shape_arguments
    from camface.export.preprocess import add_input_arguments

    parser.add_argument("people", type=input_spec, metavar="PEOPLE_DIR", help="one folder of photos per person; the folder "
                                                              "name is the label")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=input_spec, metavar="EMBEDDER", help="face-recognition model (.onnx, .pt2 or Keras) "
                                                           "whose one output is an embedding [N, D]")
    which.add_argument("--embedding-from", type=input_spec, metavar="MODEL",
                       help="a classifier (.onnx, .pt2 or Keras, e.g. from `camface train`): its pooled "
                            "features, the input of its first linear layer, are the embedding")
    parser.add_argument("-o", "--output", type=output_file, required=True, metavar="OUT.onnx", help="the gallery graph to write")
    add_input_arguments(parser, "input normalisation and colour order of the embedder (required unless "
                                "--scale/--offset): arcface = RGB (x-127.5)/127.5; facenet = RGB (x-127.5)/128; "
                                "see `camface export --help` for the others")
    parser.add_argument("--target-layer", metavar="NAME", default=None,
                        help="tensor, node or PyTorch module whose activations the maps use (default: the "
                             "last spatial feature map before global pooling, or a transformer's tokens)")
    add_shape_arguments(parser)
    parser.add_argument("--model-output", metavar="NAME", default=None,
                        help="a model with several outputs (a dict such as {embedding, logits}): the one to use, "
                             "the embedding [N, D] (--model) or the class scores (--embedding-from)")
    parser.add_argument("--threshold", type=float, default=None, metavar="T",
                        help="cosine similarity below which a face is unknown (default: the equal-error point "
                             "of the gallery's leave-one-out scores)")
    parser.add_argument("--softmax-scale", type=float, default=None, metavar="S",
                        help="probs = softmax(S * similarity), S in [0.01, 1000] (default: 30, as CosFace/ArcFace "
                             "train)")
    parser.add_argument("--no-detect", action="store_true", help="photos are face crops already: resize only")
    parser.add_argument("--no-rank", action="store_true",
                        help="record no method ranking (default: rank the methods on the enrolled faces)")
    parser.add_argument("--rank-seconds", type=float, default=30.0, metavar="S",
                        help="time budget of that ranking (0 = no limit)")
    parser.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="Keras: allow Lambda layers (RUNS PYTHON CODE FROM THE MODEL FILE)")
    parser.add_argument("--no-verify", action="store_true", help="skip the graph's self-check")


def scan_people(people_dir: Path) -> dict[str, list[Path]]:
    """Identity -> its image files (sorted), one identity per sub-folder. SourceError naming the
    folder when PEOPLE_DIR is missing, holds no person folder, or a person folder holds no image,
    one warning (how many, one name) for photos lying loose in PEOPLE_DIR beside the folders,
    and naming both when two folders' names differ only in case or Unicode normalisation
    ("alice" / "Alice", "José" composed / decomposed): shown alike, they would be two identities
    that the live label cannot tell apart (and one folder on a case-insensitive file system).
    Letters are compared by `str.lower` of the NFC form, not `str.casefold`, which folds distinct
    names together ("Strauß" and "Strauss")."""
    import unicodedata

    from camface.realtime.sources import IMAGE_SUFFIXES

    people_dir = Path(people_dir)
    if not people_dir.is_dir():
        raise SourceError(f"PEOPLE_DIR {people_dir} is not a folder")
    people: dict[str, list[Path]] = {}
    for folder in sorted(p for p in people_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not files:
            raise SourceError(f"person folder {folder} holds no photos ({', '.join(sorted(IMAGE_SUFFIXES))})")
        people[folder.name] = files
    seen: dict[str, str] = {}
    for name in people:
        key = unicodedata.normalize("NFC", name).lower()
        if key in seen:
            raise SourceError(f"person folders {people_dir / seen[key]} and {people_dir / name} differ only in case "
                              "or Unicode normalisation: merge them into one folder, or rename one")
        seen[key] = name
    loose = sorted((p for p in people_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith(".")), key=lambda p: p.name)
    if not people:
        also = f" ({len(loose)} photos lie in it loose, e.g. {loose[0].name})" if loose else ""
        raise SourceError(f"PEOPLE_DIR {people_dir} holds no person folders{also}: put each person's photos in "
                          f"its own sub-folder (e.g. {people_dir}/alice/*.jpg, {people_dir}/bob/*.jpg)")
    if loose:
        log.warning("camface: %d photo%s directly in PEOPLE_DIR %s (e.g. %s) %s ignored: photos must be in one "
                    "folder per person (e.g. %s/alice/*.jpg)", len(loose), "s" if len(loose) > 1 else "",
                    people_dir, loose[0].name, "are" if len(loose) > 1 else "is", people_dir)
    return people


def face_crops(people_dir: Path, people: dict[str, list[Path]], input_size: tuple[int, int], color_order,
               detect: bool = True):
    """(crops uint8 [M, H, W, C] in `color_order`, targets int64 [M], photos used [M], counts
    {identity: {status: n}}): one crop per usable photo, cropped as live (LiveConfig's detector,
    confidence and margin). SourceError naming the folder of an identity with no usable face."""
    import tempfile

    import cv2

    from camface.api import face_detector
    from camface.color_order import ColorOrder
    from camface.models import dataset
    from camface.native import opencv_path
    from camface.realtime.config import LiveConfig

    live = LiveConfig()
    height, width = input_size
    settings = dataset.CropSettings(size=max(height, width), detect=detect,
                                    detector=live.detector if detect else "",
                                    margin=live.margin if detect else 0.0,
                                    min_confidence=live.min_confidence if detect else 0.0)
    with tempfile.TemporaryDirectory(prefix="camface-enroll-") as cache:
        photos = dataset.prepare_crops(people_dir, people, Path(cache), settings, open_cropper=lambda: (
            dataset.LiveCropper(face_detector(live), live.margin, settings.size)))
        counts = dataset.count_statuses(photos)
        for photo in photos:
            if photo.status == dataset.UNREADABLE:
                log.warning("skipping %s: %s", photo.source, photo.why)
        # a copy of a photo (the same face crop, pixel for pixel) counted twice in its person's mean
        # and matched against its twin in the leave-one-out check (a genuine score of 1, which moves
        # the threshold); in two person folders, one face under two names: as `camface train` does
        photos, copies = dataset.drop_duplicates(photos, "person")
        for copy, first in copies:
            log.warning("%s is a copy of %s: used once", copy, first)
        labels = list(people)
        for label in labels:
            if not counts.get(label, {}).get(dataset.OK):
                c = counts.get(label, {})
                raise SourceError(f"person folder {Path(people_dir) / label} has no usable face photo ("
                                  + ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in c.items() if n) + ")")
        used = [p for p in photos if p.status == dataset.OK]
        bgr = [cv2.imread(opencv_path(p.crop), cv2.IMREAD_COLOR) for p in used]
    bgr = np.stack([b if b.shape[:2] == (height, width) else cv2.resize(b, (width, height),
                                                                        interpolation=cv2.INTER_AREA)
                    for b in bgr])
    crops = ColorOrder.of(color_order).from_bgr(bgr)
    targets = np.array([labels.index(p.label) for p in used], np.int64)
    return crops, targets, [p.source for p in used], counts


def main(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from camface.export.cli import check_graph_output, check_numbers
    from camface.export.exporter import ExportOptions

    check_graph_output(Path(args.output), Path(args.model or args.embedding_from))
    check_numbers(args)
    options = ExportOptions(
        target_layer=args.target_layer, preset=args.preset, color_order=args.color_order,
        scale=tuple(args.scale) if args.scale else None, offset=tuple(args.offset) if args.offset else None,
        opset=args.opset, verify=not args.no_verify, safe_mode=not args.unsafe_load, input_size=args.input_size,
        token_grid=args.token_grid, prefix_tokens=args.prefix_tokens)
    from camface.export import ranking

    with ranking.quiet_graph_log(getattr(args, "debug", False)):
        result = enroll(Path(args.people), Path(args.model or args.embedding_from), Path(args.output), options,
                        from_classifier=args.embedding_from is not None, threshold=args.threshold,
                        softmax_scale=args.softmax_scale, detect=not args.no_detect,
                        rank_seconds=None if args.no_rank else args.rank_seconds, model_output=args.model_output)
    for line in summary_lines(result):
        print(line)
    return 0


def enroll(people_dir: Path, model: Path, output: Path, options, from_classifier: bool = False,
           threshold: float | None = None, softmax_scale: float | None = None, detect: bool = True,
           rank_seconds: float | None = None, model_output: str | None = None) -> dict:
    """Enrol PEOPLE_DIR with the embedder in `model`; writes the files the module docstring lists
    and returns the report (as written to OUT.enroll.json)."""
    from camface.export import convert, gallery, ranking
    from camface.export.exporter import ExportResult
    from camface.export.threshold import equal_error_threshold, leave_one_out
    from camface.outputs import check_output_file, writing, written_beside

    started = time.perf_counter()
    low, high = gallery.SCALE_RANGE
    if softmax_scale is not None and not low <= softmax_scale <= high:  # (nan is in no range)
        raise UsageError(f"--softmax-scale must be in [{low:g}, {high:g}], got {softmax_scale:g}")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")
    check_output_file(output, overwrite=True)
    _check_outside_the_photos(output, Path(people_dir))
    people = scan_people(people_dir)
    embedder = gallery.load(model, options, from_classifier, model_output)
    labels = list(people)
    crops, targets, used, counts = face_crops(people_dir, people, embedder.input_size,
                                              embedder.preprocessing.color_order, detect)
    embeddings = gallery.embed(embedder, crops, names=[f"{path} ({labels[k]})" for path, k in zip(used, targets)])
    identities = gallery.identity_embeddings(embeddings, targets, len(labels))
    loo = leave_one_out(embeddings, targets, len(labels))
    chosen, rule = equal_error_threshold(loo.genuine, loo.impostor)
    if threshold is not None:
        chosen, rule = float(threshold), "--threshold"
    photos = {label: int((targets == k).sum()) for k, label in enumerate(labels)}
    meta = {"scale": float(softmax_scale or gallery.SCALE), "threshold": round(chosen, 6), "threshold_rule": rule,
            "photos": photos}
    graph, info, differences = gallery.build(embedder, identities, labels, options, meta)
    beside = beside_paths(output)
    # all four written beside their names, renamed over them only when all are done: a failure
    # (the ranking, the figure, Ctrl-C) leaves no graph without its gallery and report, and an
    # earlier run's four files as they were
    with written_beside(output, *beside.values()) as (staged_graph, *staged):
        staging = dict(zip(beside, staged))
        convert.save(graph, staged_graph)
        result = ExportResult(staged_graph, info, differences, time.perf_counter() - started)
        result = ranking.record(result, None, rank_seconds or 0, crops=None if rank_seconds is None else crops,
                                settings={"source": str(people_dir)}, name=output)
        with writing(staging["npz"]):
            np.savez(staging["npz"], embeddings=identities, labels=np.array(labels),
                     photos=np.array([str(p) for p in used]), photo_labels=targets, photo_embeddings=embeddings)
        report = {
            "model": str(model), "embedding_from": from_classifier, "graph": str(output),
            "identities": labels, "embedding_dim": embedder.dim,
            "photos": {label: {**counts[label], "used": photos[label]} for label in labels},
            "leave_one_out": {"accuracy": loo.accuracy, "identified": int((loo.predicted >= 0).sum()),
                              "genuine_mean": float(loo.genuine.mean()) if len(loo.genuine) else None,
                              "impostor_mean": float(loo.impostor.mean()) if len(loo.impostor) else None},
            "threshold": meta["threshold"], "threshold_rule": rule, "softmax_scale": meta["scale"],
            "target_layer": info.target_layer, "method_ranking": result.info.ranking,
            "seconds": round(time.perf_counter() - started, 2),
        }
        drawn = similarity_figure(gallery.normalise(embeddings), targets, labels, staging["figure"],
                                  f"{model.name}: leave-one-out accuracy "
                                  + ("n/a" if loo.accuracy is None else f"{loo.accuracy:.2f}")
                                  + f", threshold {chosen:.3f}")
        if drawn is None:
            log.warning("no matplotlib: %s not drawn", beside["figure"])
        # the files written (no figure without matplotlib: an earlier run's is removed)
        report["files"] = {name: str(path) for name, path in beside.items() if name != "figure" or drawn is not None}
        with writing(staging["report"]):
            staging["report"].write_text(json.dumps(report, indent=1, allow_nan=False))
    return report


def _check_outside_the_photos(output: Path, people_dir: Path) -> None:
    """UsageError when OUT's figure (a .png) would land in a person's folder of PEOPLE_DIR (the next
    enrolment would read it as one of that person's photos, then write over it)."""
    figure, root = beside_paths(output)["figure"].resolve(), people_dir.resolve()
    if figure.parent != root and figure.is_relative_to(root):
        person = root / figure.relative_to(root).parts[0]
        raise UsageError(f"-o {output} is inside the person folder {person}: its figure {figure.name} would be "
                         f"read as one of that person's photos; write the gallery outside {people_dir}")


def beside_paths(output: Path) -> dict[str, Path]:
    """The files written beside OUT.onnx, named after it without its last suffix only
    (a.b.onnx -> a.b.npz, a.b.enroll.json, a.b.similarity.png)."""
    return {"npz": output.with_name(output.stem + ".npz"), "report": output.with_name(output.stem + ".enroll.json"),
            "figure": output.with_name(output.stem + ".similarity.png")}


FIGURE_PHOTOS = 2000  # more photos: an evenly spaced sample of this many (M x M grew to 1.6 GB at 20 000)
FIGURE_LABELS = 60  # more identities: no names on the axes (they overlapped into a black band)


def similarity_figure(units: np.ndarray, targets: np.ndarray, labels, path: Path, title: str) -> Path | None:
    """Photo-by-photo cosine similarities (units: L2-normalised [M, D], targets int [M] sorted
    by identity) as an image, one block per identity, labelled (up to FIGURE_LABELS
    identities). Over FIGURE_PHOTOS photos, an evenly spaced sample of them, said in the title.
    Returns `path`, or None when matplotlib is not installed (nothing written)."""
    from camface.evaluate.plot import _save

    if len(units) > FIGURE_PHOTOS:
        kept = np.linspace(0, len(units) - 1, FIGURE_PHOTOS).round().astype(int)
        title = f"{title}\n{FIGURE_PHOTOS} of {len(units)} photos, evenly spaced"
        units, targets = units[kept], targets[kept]

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    matrix = units @ units.T
    side = min(10.0, 3.0 + 0.08 * len(units))
    figure, ax = plt.subplots(figsize=(side + 1.2, side))
    shown = ax.imshow(matrix, cmap="viridis", vmin=-1, vmax=1)
    edges = np.flatnonzero(np.diff(targets)) + 0.5 if len(labels) <= FIGURE_LABELS else []
    for edge in edges:
        ax.axhline(edge, color="white", lw=0.8)
        ax.axvline(edge, color="white", lw=0.8)
    if len(labels) <= FIGURE_LABELS:
        present = [k for k in range(len(labels)) if (targets == k).any()]
        centres = [float(np.flatnonzero(targets == k).mean()) for k in present]
        ax.set_xticks(centres, [labels[k] for k in present], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(centres, [labels[k] for k in present], fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(shown, ax=ax, label="cosine similarity")
    ax.set_title(title, fontsize=9)
    return _save(figure, path, dpi=100)


def summary_lines(report: dict) -> list[str]:
    """What `camface enroll` prints: per identity photos used / skipped, accuracy, threshold, files."""
    lines = [f"wrote {report['graph']}: {len(report['identities'])} identities, D = {report['embedding_dim']}, "
             f"target {report['target_layer']} ({report['seconds']:.1f} s)"]
    for label, c in report["photos"].items():
        skipped = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in c.items() if s not in ("ok", "used") and n)
        lines.append(f"  {label}: {c['used']} photo(s) used" + (f", skipped {skipped}" if skipped else ""))
    loo = report["leave_one_out"]
    accuracy = "n/a (no identity has 2 photos)" if loo["accuracy"] is None else f"{loo['accuracy']:.3f}"
    lines.append(f"  leave-one-out identification accuracy: {accuracy} ({loo['identified']} photos)")
    lines.append(f"  unknown below cosine similarity {report['threshold']:.3f} ({report['threshold_rule']})")
    if len(report["identities"]) == 1:
        lines.append("  one identity: probs (a softmax over one class) is 1 for every face; the cosine similarity "
                     "and the threshold tell this person from anyone else")
    from camface.export.ranking import summary_lines as ranking_lines

    lines += [f"  ranking {line}" for line in ranking_lines(report["method_ranking"])]
    files = report["files"]
    lines.append(f"  gallery {files['npz']}, report {files['report']}"
                 + (f", similarity matrix {files['figure']}" if "figure" in files else ", no similarity matrix"))
    return lines
