"""The `camface` command: one subcommand per job.

Each subcommand lives beside the stage it drives and exposes two functions:
`configure(parser)` adds its flags, and `main(args) -> int` runs it. Modules named here
must keep their top-level imports light (no TensorFlow, no onnxruntime) so that
`camface --help` stays fast; heavy imports happen inside `main`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from camface import __version__
from camface.errors import CamfaceError
from camface.extras import check_command, install_hint
from camface.realtime.threads import Terminated  # (light: signal and threading only)

# name -> (module, one-line help). Modules are imported only when needed.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "live": ("camface.realtime.cli", "run the live loop: detect faces, classify, overlay heatmaps"),
    "export": ("camface.export.cli", "export a Keras, ONNX or PyTorch classifier to a CAM graph"),
    "info": ("camface.export.info", "print what a CAM graph (.onnx) holds"),
    "guided": ("camface.guided.cli", "Guided Backprop / Guided Grad-CAM figures from snapshots"),
    "bench": ("camface.realtime.bench.cli", "frames per second and per-stage latency"),
    "train": ("camface.models.train", "train a face classifier on your photos, export it"),
    "serve": ("camface.serve.cli", "serve the live demo to web browsers (camera in the page)"),
    "batch": ("camface.batch.cli", "explain a whole video archive, on one machine or a Ray cluster"),
    "enroll": ("camface.export.enroll", "enrol photos of people with a face-recognition model: a gallery graph"),
    "compare": ("camface.export.compare", "same person? cosine similarity of two faces and the maps behind it"),
    "evaluate": ("camface.evaluate.cli", "faithfulness of each heatmap method: deletion/insertion AUC, average drop"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (None, False) or the
    help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default:" in text.lower():
            return text
        return super()._get_help_string(action)


def _available() -> dict[str, object]:
    """Subcommand modules that exist in this install (later features may be absent)."""
    found = {}
    for name, (module_name, _) in SUBCOMMANDS.items():
        try:
            found[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="camface",
        description="Real-time class-activation maps for face classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"camface {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _available().items():
        sub_parser = sub.add_parser(
            name,
            help=SUBCOMMANDS[name][1],
            description=SUBCOMMANDS[name][1],
            formatter_class=_HelpFormatter,
        )
        sub_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help="show tracebacks and debug logs")
        module.configure(sub_parser)
        sub_parser.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the subcommand, and return its exit code.

    A `CamfaceError` is printed as one line (`camface: error: ...`) with its exit code, and so
    is a module of an optional extra that is not installed (exit 2, naming the extra);
    `--debug` shows the traceback instead.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    if not args.debug:  # (--debug shows everything TensorFlow and OpenCV say)
        from camface.native import quiet_opencv_logs, quiet_tensorflow_import

        quiet_tensorflow_import()
        quiet_opencv_logs()
    try:
        check_command(args.command)
        return int(args._main(args) or 0)
    except CamfaceError as exc:
        if args.debug:
            raise
        print(f"camface: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        hint = install_hint(exc)
        if hint is None or args.debug:
            raise
        print(f"camface: error: camface {args.command} {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Terminated:  # SIGTERM in a command's live loop (bench's live row; live takes its own)
        return Terminated.exit_code


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
