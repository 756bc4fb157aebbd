"""`camface live`: detect faces, classify them, overlay heatmaps (CAM, Grad-CAM, ...) live.

Top-level imports stay light (no onnxruntime, mediapipe or cv2): `camface --help` imports this.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger(__name__)

LIVE_OPTIONS = ("source", "model", "method", "record", "detector", "detector_runtime", "min_confidence", "max_faces", "margin",
                "device", "smooth", "cam_boxes", "bars", "colormap", "alpha", "snapshot_every", "snapshot_dir",
                "overwrite", "codec", "max_frames", "graph_threads", "detect_workers", "detect_every", "pace",
                "image_seconds", "loop")


def configure(parser: argparse.ArgumentParser) -> None:
    from camface.realtime.config import add_arguments

    add_arguments(parser, *LIVE_OPTIONS[:4])
    parser.add_argument("--show", action=argparse.BooleanOptionalAction, default=None,
                        help="show a window (keys: m method, 0-9 explain class k, a predicted class, "
                             "s snapshot, r record, h HUD, space pause, q/Esc quit); default: when a display "
                             "is available")
    add_arguments(parser, *LIVE_OPTIONS[4:])


def build_config(args: argparse.Namespace):
    """LiveConfig from parsed arguments; bad values raise UsageError naming the flag."""
    from camface.errors import UsageError
    from camface.realtime.config import from_args
    from camface.realtime.window import display_problem

    show = args.show
    problem = display_problem() if show is not False else None
    if show is None:
        show = problem is None
        if problem and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            log.warning("camface: no window (%s); running without one, as --no-show", problem)
    elif show and problem:
        raise UsageError(f"--show needs a display ({problem}); use --no-show")
    return from_args(args, LIVE_OPTIONS, show=show, progress=not show and sys.stderr.isatty())


def main(args: argparse.Namespace) -> int:
    debug = getattr(args, "debug", False)
    os.environ.setdefault("OPENCV_LOG_LEVEL", "DEBUG" if debug else "SILENT")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "32" if debug else "-8")
    config = build_config(args)
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
