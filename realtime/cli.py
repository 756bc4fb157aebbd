"""`camface live`: detect faces, classify them, overlay CAM / Grad-CAM / Grad-CAM++ live.

Top-level imports stay light (no onnxruntime, mediapipe or cv2): `camface --help` imports this.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcampp", "cam", "none")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default=None,
                        help="camera index (0), video file, folder of images, stream URL (rtsp/http) or "
                             "'sample' (a bundled demo clip); default: camera 0 if it opens, else sample")
    parser.add_argument("--model", type=Path, default=None,
                        help="CAM graph (.onnx) made by `camface export`; default: the bundled emotion graph")
    parser.add_argument("--method", choices=METHODS, default="gradcam",
                        help="heatmap to overlay (key m cycles in the window)")
    parser.add_argument("--record", type=Path, default=None, metavar="OUT.mp4",
                        help="write the annotated frames to this mp4, at the source's frame rate")
    parser.add_argument("--show", action=argparse.BooleanOptionalAction, default=None,
                        help="show a window (keys: m method, 0-9 explain class k, a predicted class, "
                             "s snapshot, r record, h HUD, q/Esc quit); default: when a display is available")
    parser.add_argument("--detector", choices=("short", "full"), default="full",
                        help="BlazeFace model: full-range (faces up to ~5 m) or short-range (faster, faces within ~2 m)")
    parser.add_argument("--min-confidence", type=float, default=0.5, help="face detector score threshold")
    parser.add_argument("--max-faces", type=int, default=8,
                        help="classify at most this many faces per frame, the largest (1-32)")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="crop margin around each face box, as a fraction of the box's longer side")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "tensorrt"), default="auto",
                        help="ONNX Runtime provider; auto tries TensorRT, CUDA, then CPU")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="temporal smoothing of heatmaps and probabilities, weight of the past in [0, 1)")
    parser.add_argument("--cam-boxes", action="store_true",
                        help="draw the CAM paper's localisation box: bounding box of the largest region "
                             "above 20%% of the heatmap's maximum")
    parser.add_argument("--top3", action="store_true", help="draw each face's three most probable classes as bars")
    parser.add_argument("--colormap", default="jet", help="OpenCV colormap for heatmaps (jet, turbo, inferno, ...)")
    parser.add_argument("--alpha", type=float, default=0.45, help="heatmap opacity in [0, 1]")
    parser.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                        help="save a snapshot every N frames (0: only with key s)")
    parser.add_argument("--snapshot-dir", type=Path, default=Path("snapshots"),
                        help="folder for snapshots (one sub-folder per snapshot; read by `camface guided`)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --record file")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N", help="stop after N frames")
    parser.add_argument("--graph-threads", type=int, default=1, metavar="N",
                        help="ONNX Runtime intra-op threads on CPU: 1 leaves the other core to the "
                             "detector; 0 = all cores (faster for large graphs such as ResNet50)")
    parser.add_argument("--detect-workers", type=int, default=0, metavar="N",
                        help="face detectors running side by side on consecutive frames (each one "
                             "MediaPipe instance on one core): more frames per second, not less "
                             "latency; 0 = one per core, at most 2, for files, folders and sample; 1 for "
                             "cameras and streams and with --graph-threads 0")


def build_config(args: argparse.Namespace):
    """LiveConfig from parsed arguments; bad values raise ValueError naming the flag."""
    from camface.realtime.loop import LiveConfig
    from camface.realtime.render import COLORMAPS
    from camface.realtime.window import display_available

    if args.colormap not in COLORMAPS:
        raise ValueError(f"--colormap {args.colormap!r} unknown; choose from {', '.join(sorted(COLORMAPS))}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.graph_threads < 0:
        raise ValueError(f"--graph-threads must be >= 0, got {args.graph_threads}")
    if not 0.0 <= args.smooth < 1.0:
        raise ValueError(f"--smooth must be in [0, 1), got {args.smooth}")
    show = args.show
    if show is None:
        show = display_available()
    elif show and not display_available():
        raise ValueError("--show needs a display (DISPLAY / WAYLAND_DISPLAY is not set); use --no-show")
    return LiveConfig(
        source=args.source, model=args.model, method=args.method, record=args.record, show=show,
        detector=args.detector, min_confidence=args.min_confidence, max_faces=args.max_faces,
        margin=args.margin, device=args.device, smooth=args.smooth, cam_boxes=args.cam_boxes,
        bars=args.top3, colormap=args.colormap, alpha=args.alpha, snapshot_every=args.snapshot_every,
        snapshot_dir=args.snapshot_dir, overwrite=args.overwrite, max_frames=args.max_frames,
        graph_threads=args.graph_threads, detect_workers=args.detect_workers,
        progress=not show and sys.stderr.isatty(),
        quiet_native=not getattr(args, "debug", False),
    )


def main(args: argparse.Namespace) -> int:
    debug = getattr(args, "debug", False)
    os.environ.setdefault("OPENCV_LOG_LEVEL", "DEBUG" if debug else "SILENT")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "32" if debug else "-8")
    try:
        config = build_config(args)
    except ValueError as exc:
        print(f"camface live: error: {exc}", file=sys.stderr)
        return 2
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_DEBUG if debug else cv2.utils.logging.LOG_LEVEL_SILENT)
    from camface.realtime.loop import LiveLoop, Terminated, sigterm_raises

    loop = LiveLoop(config)
    try:
        with sigterm_raises():  # also while models load and the source opens
            loop.run()
        return 0
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return Terminated.exit_code
    finally:
        if loop.summary is not None:
            print(loop.summary.line(), file=sys.stderr)
