"""`camface batch INPUT... -o OUT_DIR`: explain a whole video archive on one machine or a Ray cluster.

Top-level imports stay light (no ray, cv2 or onnxruntime): `camface --help` imports this.
Exit codes: 0 every video explained, 1 some failed (see summary.json), 2 bad input or cluster,
3 every video explained but some only in part (a file truncated or damaged: its record says
"incomplete", frames announced and read, and why), 130 interrupted by Ctrl-C, 143 by SIGTERM
(rerun with --resume).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_INCOMPLETE = 3  # every video explained, some only up to where their file ends early
# Resident memory per actor, measured with the bundled emotion model on 320x240 clips (peak RSS:
# whole pipeline 486 MiB, detect 396, graph on CPU 345, render 325; the driver 303; a local Ray's
# own processes ~1 GB). A unit's crops and heatmaps (~4.5 kB per face per frame) come on top.
STAGE_MEMORY_GB = {"whole": 0.5, "detect": 0.4, "graph": 0.35, "render": 0.35}

MIN_GPU_SHARE = 0.0001  # Ray's resource precision: a smaller request is an error inside the pipeline
SHARED_OPTIONS = ("model", "method", "detector", "detector_runtime", "min_confidence", "max_faces", "margin", "smooth", "device",
                  "cam_boxes", "bars", "colormap", "alpha", "graph_threads", "detect_every")


def configure(parser: argparse.ArgumentParser) -> None:
    from camface.realtime.config import add_arguments
    from camface.outputs import input_spec, output_path

    parser.epilog = (f"exit codes: 0 every video explained; 1 some failed; 2 bad input or cluster; "
                     f"{EXIT_INCOMPLETE} every video explained, some only in part (a file truncated or damaged: "
                     "report.md says which, frames announced and read); 130 interrupted (143: by SIGTERM; rerun with --resume). "
                     f"Memory: ~{STAGE_MEMORY_GB['whole']} GB per worker (--detect-actors caps them), ~0.3 GB for "
                     "this driver, ~1 GB for a local Ray's own processes")

    parser.add_argument("inputs", type=input_spec, nargs="+", metavar="INPUT",
                        help="video files, folders of videos, glob patterns (quoted); on a cluster, paths every "
                             "node sees")
    parser.add_argument("-o", "--out", type=output_path, required=True, metavar="OUT_DIR",
                        help="output folder: videos/, rows/ (Parquet), summary.json, report.md")
    add_arguments(parser, *SHARED_OPTIONS[:2])
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                        help="write each annotated video to OUT_DIR/videos/")
    add_arguments(parser, *SHARED_OPTIONS[2:])
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join: 'auto', HOST:PORT or ray://HOST:PORT; default: RAY_ADDRESS if "
                             "set, else a local Ray on this machine's cores")
    parser.add_argument("--graph-gpus", type=float, default=None, metavar="F",
                        help="GPUs per graph actor (fractions of 0.0001 to 1 share one GPU; above 1 a whole number); "
                             "default: 1 if the cluster has a GPU, else 0 (CPU)")
    parser.add_argument("--graph-actors", type=int, default=1, metavar="N",
                        help=f"CAM graph actors (separate stages only; ~{STAGE_MEMORY_GB['graph']} GB each)")
    parser.add_argument("--detect-actors", type=int, default=0, metavar="N",
                        help="the most workers running at once: where one actor runs every stage (the default "
                             f"without a GPU) those actors, ~{STAGE_MEMORY_GB['whole']} GB of memory each; with "
                             f"separate stages the detection actors (~{STAGE_MEMORY_GB['detect']} GB each). Lower N "
                             "where memory is short. 0 = one per CPU (with --split-stages: the CPUs left over), at "
                             "most one per unit")
    parser.add_argument("--render-actors", type=int, default=0, metavar="N",
                        help=f"render + encode actors (separate stages only; ~{STAGE_MEMORY_GB['render']} GB "
                             "each); 0 = 0.375 per CPU when recording, 1/16 per CPU without")
    parser.add_argument("--split-stages", action=argparse.BooleanOptionalAction, default=None,
                        help="run detection, the graph and rendering in separate actor pools; default: when the "
                             "graph gets GPUs (else one actor per CPU runs all three on whole videos)")
    parser.add_argument("--segment-frames", type=int, default=None, metavar="N",
                        help="cut videos into segments of at most N frames so one video uses several actors; "
                             "0 = whole videos; default: automatic (two units per detection actor, segments of "
                             "at least 300 frames; whole videos with --smooth)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a run in OUT_DIR: skip videos already done, redo the rest")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar over videos and frames; default: when stderr is a terminal")


def _check_out_dir(out: Path, resume: bool):
    """(Outputs, the RunLock held on OUT_DIR): the folder made, writable, not in use by another
    run, and holding no earlier run's outputs unless resuming: no record, no segment's part
    record. A run killed before it finished anything (a segmented video's saved split, parts
    whose record was never written) left nothing to resume: the folder is taken as new, and
    `segments.drop_unused_parts` removes those leftovers."""
    from camface.batch.owner import RunLock
    from camface.batch.state import Outputs
    from camface.errors import OutputError

    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write to output folder {out}: it is a file")
    outputs = Outputs(out)
    outputs.used = outputs.state.is_dir()  # a camface batch run made it: its leftovers may be dropped
    try:
        outputs.make()
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc}") from exc
    if not os.access(out, os.W_OK):
        raise OutputError(f"cannot write to output folder {out}: permission denied")
    lock = RunLock(out).acquire()
    unjoined = any(outputs.parts.glob("*/[0-9]*.json"))  # segments' part records (a split alone: none)
    if (outputs.records() or unjoined) and not resume:
        lock.release()
        raise OutputError(f"{out} holds the outputs of an earlier run; pass --resume to continue it, "
                          "or choose another folder")
    outputs.owner = lock.owner
    return outputs, lock


def main(args: argparse.Namespace, on_video=None) -> int:
    from camface.errors import UsageError
    from camface.realtime.config import from_args

    for flag, value in (("--graph-actors", args.graph_actors), ("--detect-actors", args.detect_actors),
                        ("--render-actors", args.render_actors), ("--segment-frames", args.segment_frames)):
        if value is not None and value < (1 if flag == "--graph-actors" else 0):
            raise UsageError(f"{flag} must be >= {1 if flag == '--graph-actors' else 0}, got {value}")
    if args.graph_gpus is not None and not 0 <= args.graph_gpus < math.inf:  # NaN too
        raise UsageError(f"--graph-gpus must be a number >= 0, got {args.graph_gpus}")
    if args.graph_gpus and not (args.graph_gpus >= MIN_GPU_SHARE and (args.graph_gpus <= 1 or args.graph_gpus.is_integer())):
        # Ray refuses both inside the pipeline, after OUT_DIR is made and Ray is started
        raise UsageError(f"--graph-gpus {args.graph_gpus:g}: a share of a GPU is a fraction from {MIN_GPU_SHARE:g} "
                         "to 1, and more than one GPU per actor a whole number")
    if args.graph_gpus and args.split_stages is False:
        raise UsageError(f"--graph-gpus {args.graph_gpus:g} puts the graph in its own actors on GPUs, which "
                         "--no-split-stages rules out; drop one of them")
    config = from_args(args, SHARED_OPTIONS)
    if config.smooth and args.segment_frames:
        raise UsageError("--segment-frames cannot be used with --smooth: smoothing carries each face's "
                         "state from frame to frame through the whole video")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    from camface.api import load, model_path
    from camface.batch.cluster import check_reachable
    from camface.batch.inputs import check_one_opens, find_videos
    from camface.realtime.graph import check_graph_path

    if args.out.exists() and not args.out.is_dir():  # said after the model had loaded
        from camface.errors import OutputError

        raise OutputError(f"cannot write to output folder {args.out}: it is a file")
    videos = find_videos(args.inputs, args.out)
    # Bad input fails before OUT_DIR is made, the cheap checks first: the model's path, the
    # cluster's address, then whether any input opens as a video (with none, the model loaded
    # and Ray started only to fail every video), then the model itself.
    check_graph_path(model_path(config))
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
    check_one_opens(videos)
    with load(config=config, device="cpu", cli=True) as opened:  # fail on a bad model before Ray starts; labels for the report
        graph, model = opened.graph, str(opened.model_path.resolve())
        config = config.replace(method=opened.config.method, model=Path(model))  # "auto" -> a heatmap
    from camface.realtime.threads import Terminated, stop_signals

    outputs, lock = _check_out_dir(args.out, args.resume)
    try:
        # Ctrl-C and SIGTERM while Ray starts or the frames are counted end the run here (the
        # pipeline catches its own); SIGTERM's default would end the process holding OUT_DIR.
        with contextlib.ExitStack() as signals:
            signals.enter_context(stop_signals())
            return _run(args, config, graph, videos, outputs, lock, on_video, signals)
    except (KeyboardInterrupt, Terminated) as exc:  # before _run's own (its checks), or while the summary was written
        print(f"camface batch: interrupted; {args.out} released, no summary written; rerun with --resume",
              file=sys.stderr)
        return Terminated.exit_code if isinstance(exc, Terminated) else 130
    finally:
        lock.release()  # the run has ended: any worker still alive stops, and writes nothing


def _run(args: argparse.Namespace, config, graph, videos, outputs, lock, on_video, signals) -> int:
    from camface.batch import cluster, pipeline, segments
    from camface.batch.owner import ORPHAN_GRACE_S
    from camface.batch.report import write_report
    from camface.batch.rows import upgrade_rows
    from camface.batch.state import describe_incomplete
    from camface.errors import OutputError
    from camface.realtime.threads import Terminated

    videos = pipeline.earlier_ids(outputs, videos)  # done under an id hashing its absolute path
    job = pipeline.BatchJob(videos=tuple(videos), out_dir=str(args.out.resolve()),
                            config=config, record=args.record,
                            owner=lock.owner.to_dict())
    others, changed = pipeline.done_otherwise(outputs, videos, job.settings())
    if others:  # a resume with other options over other inputs: two runs' rows side by side
        raise OutputError(f"{args.out} holds {len(others)} video(s) done with other options "
                          f"({', '.join(changed) or 'unknown'}) that are not among the inputs, e.g. {others[0]}; "
                          "their rows would lie beside this run's: name them too (they are done again) or "
                          "choose another folder")
    # Ctrl-C or SIGTERM from here until the pipeline runs (it catches its own): the same summary
    # as an interrupt later, nothing done in this run
    result = pipeline.RunResult(interrupted=True)
    plan = unit_reason = ray_start_s = None
    started = False
    try:
        if lock.earlier is not None:  # killed: its workers may live on; they stop once they see the new owner
            print(f"camface batch: the run of pid {lock.earlier.get('pid')} on {lock.earlier.get('host')} ended "
                  f"without releasing {args.out}; giving its workers {ORPHAN_GRACE_S:g} s to stop", file=sys.stderr)
            time.sleep(ORPHAN_GRACE_S)
        removed = outputs.clean_partials() + outputs.drop_unrecorded(video.path for video in videos)
        segments.drop_unused_parts(outputs)  # joined by a run that died before removing them, or holding no result
        # rows of an earlier camface lack columns (key): OUT_DIR/rows read as one table dropped them
        upgraded = upgrade_rows(outputs, {video.id: video.key for video in videos})
        todo = pipeline.videos_to_do(outputs, videos, job.settings())
        if args.resume:
            changed, files = pipeline.changed_since(outputs, videos, job.settings())
            print(f"camface batch: resuming: {len(videos) - len(todo)} of {len(videos)} videos already done"
                  + (f"; videos done with other options ({', '.join(changed)}) are done again" if changed else "")
                  + (f"; {files} video file(s) changed since they were done are done again" if files else "")
                  + (f"; removed {removed} file(s) a killed run left unfinished" if removed else "")
                  + (f"; rewrote {len(upgraded)} rows file(s) of an earlier camface with the columns it lacked "
                     "(key)" if upgraded else ""), file=sys.stderr)
        start = time.perf_counter()
        started = cluster.connect(args.address)
        import ray

        from camface.realtime.threads import stop_signals

        signals.enter_context(stop_signals())  # over the SIGTERM handler ray.init put in place (sys.exit)
        ray_start_s = time.perf_counter() - start
        resources = ray.cluster_resources()
        planned = dict(graph_gpus=args.graph_gpus, detect_actors=args.detect_actors, render_actors=args.render_actors,
                       graph_actors=args.graph_actors, split=args.split_stages, record=args.record)
        actors = cluster.plan(resources, **planned).detect_actors  # before the cap of one per unit
        announced = {v.id: pipeline.frame_count(v.path) for v in todo}
        units, unit_reason = segments.split(todo, [announced[v.id] for v in todo], actors, args.segment_frames,
                                            bool(config.smooth))
        settings = job.settings()
        units = segments.keep_splits(outputs, units, settings)  # a resume cuts as the killed run did
        plan = cluster.plan(resources, **planned,
                            videos=sum(not segments.done_before(outputs, u, settings) for u in units))
        print(f"camface batch: {plan.describe()}; unit of work: {unit_reason}", file=sys.stderr)
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        result = pipeline.run(job, plan, units, outputs, graph.info.labels, progress, announced, on_video)
    except (KeyboardInterrupt, Terminated) as exc:
        result.interrupted, result.terminated = True, isinstance(exc, Terminated)
    finally:
        if started:
            import ray

            ray.shutdown()
        outputs.clean_partials()  # nothing of this run is in flight now; a dead run's leftovers go too
    frames = result.frames_run  # of the units run now (a resumed video's earlier segments are not)
    run_info = {"plan": plan and plan.describe(), "units": unit_reason, "units_run": result.units_run,
                "run": lock.owner.token, "ray_start_s": None if ray_start_s is None else round(ray_start_s, 3),
                "wall_s": round(result.wall_s, 3),
                "frames_this_run": frames, "fps": round(frames / result.wall_s, 2) if result.wall_s else 0.0,
                "videos_this_run": [r["video"] for r in result.finished], "interrupted": result.interrupted,
                "graph_calls": result.graph_calls_run,
                "first_video_started_s": round((result.first_unit_started or result.started_at)
                                               - result.started_at, 3)}
    summary = write_report(outputs, videos, graph.info.labels, graph.info.color_order, config.method,
                           config.colormap, config.alpha, run_info, job.settings())
    totals = summary["totals"]
    ray_start = "not finished" if ray_start_s is None else f"{ray_start_s:.1f} s"
    print(f"camface batch: {totals['done']} of {totals['videos']} videos done, {totals['failed']} failed, "
          f"{totals['not_finished']} not finished, {totals['incomplete']} incomplete; {frames} frames in "
          f"{result.wall_s:.1f} s "
          f"({run_info['fps']:.0f} fps; Ray start {ray_start}); report: {args.out / 'report.md'}",
          file=sys.stderr)
    for record in summary["videos"]:
        if record["status"] == "failed":
            print(f"camface batch: failed: {record['path']}: {record.get('reason')}", file=sys.stderr)
        elif "incomplete" in record:
            print(f"camface batch: incomplete: {record['path']}: {describe_incomplete(record)}", file=sys.stderr)
    if result.interrupted:
        print(f"camface batch: interrupted; rerun with --resume to finish the {totals['videos'] - totals['done']} "
              "video(s) left", file=sys.stderr)
    return exit_code(totals, result.interrupted, result.terminated)


def exit_code(totals: dict, interrupted: bool, terminated: bool = False) -> int:
    """The run's exit code from the summary's totals (see the module doc). A video left
    without a record by a run that was not interrupted (its record could not be written)
    failed."""
    if interrupted:
        return 143 if terminated else 130
    if totals["failed"] or totals["not_finished"]:
        return 1
    return EXIT_INCOMPLETE if totals["incomplete"] else 0
