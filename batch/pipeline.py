"""The driver: the Ray Data pipeline over the videos, the progress bar, Ctrl-C, the summary.

  from_items(units, one block each) -> Detect (CPU actors) -> Explain (graph actors, GPU when
  planned) -> Render (CPU actors) -> one small row per unit back to the driver

or, when the graph has no GPU (`Plan.fused`), one `Whole` actor per CPU running the three on
each unit in turn. A unit is a whole video or a segment of one (`camface.batch.segments`);
the driver joins a segmented video's parts when its last segment comes back.

Ray Data streams: while a render actor encodes video 1, the graph runs on video 2 and the
detectors decode video 3 and 4. `preserve_order` makes the rows come back in input order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from camface.batch.cluster import ClusterError, Plan
from camface.batch.inputs import Video, stamp
from camface.batch.segments import Unit, done_before, drop_parts, finish, part_record, part_records
from camface.batch.stages import Detect, Explain, Render, Whole
from camface.batch.state import DONE, Outputs, describe_incomplete
from camface.realtime.config import LiveConfig
from camface.realtime.threads import StopRequest, Terminated, stop_signals

log = logging.getLogger(__name__)

# A unit whose worker process dies (a decoder crash, the OOM killer) is tried this many times
# more, then once more alone on its actor (a unit queued on the same actor dies with it), then
# failed: Ray Data's default retries it without end, and the run hangs.
WORKER_RETRIES = 1
ATTEMPTS = WORKER_RETRIES + 2
_DROPPED_LOG = "ray.data._internal.execution.streaming_executor_state"  # says which tasks Ray Data went on without


@dataclass(frozen=True)
class BatchJob:
    """What one `camface batch` run was asked to do: the videos, the output folder, and the
    pipeline's options (`config`, whose `model` is a path every node sees)."""

    videos: tuple[Video, ...]
    out_dir: str
    config: LiveConfig
    record: bool = True
    explained_class: int | None = None
    owner: dict | None = None  # the run that owns out_dir (`camface.batch.owner.Owner.to_dict`)

    @property
    def model(self) -> str:
        return str(self.config.model)

    @cached_property
    def model_digest(self) -> str:
        """What identifies the model among the settings: "sha256:" and the hex digest of its
        bytes, not its path, so a model moved (with the archive) is the same model and one
        replaced at the same path is not; the path itself when the file cannot be read."""
        from camface.hashing import sha256_file

        try:
            return f"sha256:{sha256_file(self.model)}"
        except OSError:
            return self.model

    def settings(self) -> dict:
        """The options that change a unit's outputs, as JSON gives them back: a segment an
        earlier run finished is kept only when they are the same. The drawing options only
        when the videos are drawn (record): without, they draw only the report, redrawn each run."""
        from camface.realtime.carry import every_for

        cfg = self.config
        values = dict(model=self.model_digest, method=cfg.method, record=self.record,
                      detector=cfg.detector, min_confidence=cfg.min_confidence, margin=cfg.margin,
                      max_faces=cfg.max_faces, explained_class=self.explained_class, smooth=cfg.smooth,
                      detector_runtime=cfg.detector_runtime, detect_every=every_for(cfg.detect_every))
        if self.record:
            values.update(colormap=cfg.colormap, alpha=cfg.alpha, cam_boxes=cfg.cam_boxes, bars=cfg.bars)
        return json.loads(json.dumps(values))


@dataclass
class RunResult:
    """What the driver saw. finished: records of the videos done or failed in this run, in order."""

    finished: list[dict] = field(default_factory=list)
    interrupted: bool = False  # by Ctrl-C or SIGTERM
    terminated: bool = False  # by SIGTERM (`ray job stop`, a scheduler's time limit, kill)
    units_run: int = 0  # units handed to the pipeline (segments done in an earlier run are not)
    frames_run: int = 0  # frames of the units run (and done) in this run
    graph_calls_run: int = 0
    first_unit_started: float | None = None  # time.time() the first unit of this run started
    wall_s: float = 0.0
    started_at: float = 0.0  # time.time() when the pipeline was started


def frame_count(path: str) -> int:
    """Frames the container announces (0 when unknown or unreadable), for the progress bar."""
    import cv2

    from camface.native import opencv_path

    capture = cv2.VideoCapture(opencv_path(path))
    try:
        return max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)) if capture.isOpened() else 0
    finally:
        capture.release()


def build_dataset(job: BatchJob, plan: Plan, units: list[Unit], labels: tuple[str, ...], alone: bool = False):
    """The lazy Ray Dataset: one output row per unit, {video, unit (JSON), record (JSON)}. A unit
    whose worker process died is left out (`DroppedTasks` says why). alone: each actor holds one
    unit at a time and a call whose actor dies is not retried (the second chance of those lost)."""
    import warnings

    import ray.data as rd

    context = rd.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows of the driver in input order
    context.enable_progress_bars = False  # the driver draws its own bar over videos and frames
    context.print_on_execution_start = False
    context.max_errored_blocks = -1  # a unit whose worker died is left out, the run goes on
    items = [unit.row() for unit in units]
    ds = rd.from_items(items, override_num_blocks=len(items))  # else several videos share one block
    cfg = job.config
    detect = dict(config=cfg, owner=job.owner)
    explain = dict(config=cfg.replace(device=cfg.device if cfg.device != "auto" or plan.graph_gpus else "cpu"),
                   explained_class=job.explained_class, owner=job.owner)
    render = dict(out_dir=job.out_dir, record=job.record, config=cfg, explained_class=job.explained_class,
                  labels=labels, settings=job.settings(), owner=job.owner)
    # Ray Data retries a call whose actor died without end (a video that crashes its decoder
    # hangs the run). Ray 2.60 takes max_task_retries only as a deprecated remote argument.
    retries = dict(max_task_retries=0 if alone else WORKER_RETRIES)
    in_flight = dict(max_tasks_in_flight_per_actor=1) if alone else {}

    def pool(size: int):
        return rd.ActorPoolStrategy(size=min(size, len(units)) if alone else size, **in_flight)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        if plan.fused:
            return ds.map(Whole, compute=pool(plan.detect_actors), num_cpus=plan.detect_cpus,
                          fn_constructor_kwargs=dict(detect=detect, explain=explain, render=render), **retries)
        ds = ds.map(Detect, compute=pool(plan.detect_actors), num_cpus=plan.detect_cpus,
                    fn_constructor_kwargs=detect, **retries)
        graph_resources = dict(num_cpus=plan.graph_cpus)
        if plan.graph_gpus:
            graph_resources["num_gpus"] = plan.graph_gpus
        ds = ds.map(Explain, compute=pool(plan.graph_actors), **graph_resources,
                    fn_constructor_kwargs=explain, **retries)
        return ds.map(Render, compute=pool(plan.render_actors), num_cpus=plan.render_cpus,
                      fn_constructor_kwargs=render, **retries)


def worker_died(exc: BaseException) -> bool:
    """A Ray error saying the worker process itself was lost (killed, crashed, out of memory),
    not an exception raised by camface's code in it."""
    import ray.exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.WorkerCrashedError, rex.OutOfMemoryError, rex.NodeDiedError))


class DroppedTasks(logging.Filter):
    """The errors of the tasks Ray Data went on without (`max_errored_blocks`), kept instead of
    logged (a page of traceback each). A worker that died fails its unit alone (`lost_record`);
    any other error stops the run (`check`), as it did before."""

    def __init__(self):
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.getMessage().startswith("An exception was raised from a task"):
            self.errors.append(record.exc_info[1])
            return False
        return True

    def check(self) -> None:
        for exc in self.errors:
            if not worker_died(exc):
                raise exc

    @contextlib.contextmanager
    def attached(self):
        logger = logging.getLogger(_DROPPED_LOG)
        level = logger.level
        if not logger.isEnabledFor(logging.ERROR):
            logger.setLevel(logging.ERROR)  # else the errors would go unseen
        logger.addFilter(self)
        try:
            yield self
        finally:
            logger.removeFilter(self)
            logger.setLevel(level)


def lost_record(outputs: Outputs, unit: Unit, labels: tuple[str, ...]) -> dict:
    """The failed record of a unit whose worker process died on it each time it was tried (a
    segment's: its part record, the video failing when it is joined)."""
    from camface.batch.segments import part_paths

    reason = (f"its worker process died each of the {ATTEMPTS} times it was tried (a crash in the decoder or "
              "the graph, or the OOM killer; the Ray logs of its node say which)")
    out = {"path": unit.path, "key": unit.key, "ok": False, "error": reason, "stage": "worker"}
    return outputs.write_record(unit.video, out, labels, None if unit.whole else part_paths(outputs, unit)["record"])


def run(job: BatchJob, plan: Plan, units: list[Unit], outputs: Outputs, labels: tuple[str, ...],
        progress: bool, frames: dict[str, int] | None = None, on_video=None) -> RunResult:
    """Run the pipeline on the videos of `units` (all units of each, in order; a segment done
    in an earlier run, with its part record, is not run again) and join segmented videos;
    `on_video(record)` is called on the driver as each video finishes (tests interrupt
    there). frames: per video id the frames its file announces, for the progress bar. Ctrl-C
    or SIGTERM stops the pipeline: the result says interrupted (and terminated: by SIGTERM)."""
    result = RunResult()
    if not units:
        return result
    started = time.perf_counter()
    result.started_at = time.time()
    by_video: dict[str, list[Unit]] = {}
    for unit in units:
        by_video.setdefault(unit.video, []).append(unit)
    settings = job.settings()
    done = {u for u in units if done_before(outputs, u, settings)}
    left = {video: sum(u not in done for u in parts) for video, parts in by_video.items()}
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum((frames or {}).get(v, 0) for v in by_video)
        initial = sum((part_record(outputs, u) or {}).get("frames", 0) for u in done)
        bar = tqdm(total=total or None, initial=initial, unit="frame", file=sys.stderr, mininterval=0.5,
                   leave=False, desc=f"videos 0/{len(by_video)}")

    def say(message: str) -> None:
        bar.write(message, file=sys.stderr) if bar is not None else log.warning(message)

    def finished(record: dict) -> None:
        result.finished.append(record)
        if bar is not None:
            bar.set_description(f"videos {len(result.finished)}/{len(by_video)}")
        message = None
        if record["status"] != DONE:
            message = f"camface batch: {record['path']} failed: {record.get('reason')}"
        elif "incomplete" in record:  # the worker's "ended early" warning stays in the worker's log
            message = f"camface batch: {record['path']} incomplete: {describe_incomplete(record)}"
        if message is not None:
            say(message)
        if on_video is not None:
            on_video(record)

    seen: set[Unit] = set()

    def take(row: dict) -> None:
        """One unit's row back from the pipeline."""
        stop.check()
        dropped.check()
        unit = Unit.from_row(json.loads(row["unit"]))
        seen.add(unit)
        record = json.loads(row["record"])  # the video's record, or a segment's part record
        if record["status"] == DONE:
            result.frames_run += record.get("frames", 0)
            result.graph_calls_run += record.get("graph_calls", 0)
        if "started_at" in record:
            result.first_unit_started = min(result.first_unit_started or record["started_at"], record["started_at"])
        if bar is not None:
            bar.update(record.get("frames", 0) if record["status"] == DONE else 0)
        left[unit.video] -= 1
        if unit.whole:
            drop_parts(outputs, unit.video)  # a killed run's, cut under other options
            finished(record)
            return
        if record["status"] != DONE:  # said now; the video fails when its last segment is back
            say(segment_failed(unit, record))
        if not left[unit.video]:  # the video's last segment: join its parts
            finished(finish(outputs, by_video[unit.video], labels, job.record))

    rows = None
    signals = contextlib.ExitStack()
    stop = StopRequest()  # none yet
    dropped = DroppedTasks()
    try:
        # SIGTERM: not Ray's handler (sys.exit): the run stops as on Ctrl-C. Both are remembered
        # and checked at every row, in case Ray's code caught the first KeyboardInterrupt.
        stop = signals.enter_context(stop_signals())
        signals.enter_context(dropped.attached())
        for video, parts in by_video.items():  # every segment done in an earlier run: join them
            if not left[video]:
                finished(finish(outputs, parts, labels, job.record))
        todo = [u for u in units if u not in done]
        result.units_run = len(todo)
        if todo:
            rows = iter(build_dataset(job, plan, todo, labels).iter_rows())  # a generator: close() stops it
        for row in rows or ():
            take(row)
        lost = [u for u in todo if u not in seen]
        if lost:  # a worker died on them, or on a unit queued on the same actor: once more, each alone
            stop.check()
            dropped.check()
            rows = iter(build_dataset(job, plan, lost, labels, alone=True).iter_rows())
            for row in rows:
                take(row)
        stop.check()
        dropped.check()
        for unit in (u for u in lost if u not in seen):  # its worker died each time: it fails alone
            record = lost_record(outputs, unit, labels)
            left[unit.video] -= 1
            if unit.whole:
                drop_parts(outputs, unit.video)
                finished(record)
            else:
                say(segment_failed(unit, record))
                if not left[unit.video]:
                    finished(finish(outputs, by_video[unit.video], labels, job.record))
    except (KeyboardInterrupt, Terminated) as exc:
        result.interrupted, result.terminated = True, isinstance(exc, Terminated)
    except Exception as exc:
        if not stop.signum:  # else Ray's code caught the Ctrl-C or SIGTERM and raised an error of its own
            why = worker_failure(exc)
            if why is None:
                raise
            raise ClusterError(f"a Ray worker failed: {why}; the run stopped (on a cluster, --model and the "
                               "inputs must be paths every node sees; --resume continues)") from exc
        result.interrupted, result.terminated = True, stop.signum == signal.SIGTERM
    finally:
        signals.close()
        close = getattr(rows, "close", None) if rows is not None else None
        if close is not None:
            close()  # GeneratorExit into Ray Data's iterator: it shuts its streaming executor down
        if bar is not None:
            bar.close()
        result.wall_s = time.perf_counter() - started
    return result


def segment_failed(unit: Unit, record: dict) -> str:
    return (f"camface batch: {unit.path} segment {unit.segment + 1} of {unit.segments} "
            f"(frames {unit.start}-{'end' if unit.stop is None else unit.stop - 1}) failed: {record.get('reason')}")


def worker_failure(exc: BaseException) -> str | None:
    """What a Ray error raised on the driver says went wrong in a worker (a stage's constructor:
    the model not found on that node; a stage raising), as 'ModelError: CAM graph not found:
    PATH', else None: not a Ray error. Ray passes the worker's exception as a traceback in its
    text (the exception object itself is not kept when an actor's constructor fails)."""
    import ray.exceptions

    if not isinstance(exc, ray.exceptions.RayError):
        return None
    raised = [match for line in str(exc).splitlines()
              if (match := _RAISED.match(line)) and not match[1].startswith("ray.")]
    if not raised:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return f"{raised[-1][1].rsplit('.', 1)[-1]}: {raised[-1][2]}"


_RAISED = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*): (.+)$")  # a traceback's last line: NAME: message


def earlier_ids(outputs: Outputs, videos: list[Video]) -> list[Video]:
    """`videos`, each without a record or parts in `outputs` under its id taking the id of the one
    'done' record, or segmented video with 'done' parts (cut by a run killed before it joined them),
    there, not of another input, of a file of its name, size and modification time: the same video,
    done by a camface whose ids hashed the absolute path (before an archive was moved, or camface
    upgraded). Else a --resume would do it again under the new id, its earlier rows left beside the
    new ones, or its segments done again from the start, its earlier parts left behind. A match that
    is not one to one is left alone."""
    records = outputs.records()
    ours = {video.id for video in videos}
    earlier: dict[tuple, set[str]] = {}
    for video_id, record in [*records.items(), *part_records(outputs)]:
        if video_id not in ours and record.get("status") == DONE and record.get("source") and record.get("path"):
            source = record["source"]
            earlier.setdefault((Path(record["path"]).name, source.get("size"), source.get("mtime_ns")), set()).add(video_id)
    if not earlier:
        return list(videos)
    wanted: dict[tuple, list[Video]] = {}
    for video in videos:
        source = stamp(video.path)
        if video.id not in records and not (outputs.parts / video.id).is_dir() and source is not None:
            wanted.setdefault((Path(video.path).name, source["size"], source["mtime_ns"]), []).append(video)
    adopted = {match[0]: next(iter(earlier[key])) for key, match in wanted.items()
               if len(match) == 1 and len(earlier.get(key, ())) == 1}
    return [replace(video, id=adopted[video]) if video in adopted else video for video in videos]


def videos_to_do(outputs: Outputs, videos: list[Video], settings: dict) -> list[Video]:
    """The videos without a 'done' record made with these `settings` (`BatchJob.settings`)
    from the file as it is now: failed ones are tried again, and so are those done with other
    options (another model, method, detector, drawing...), so that every video of a report is
    explained alike, and those whose file changed since (replaced, or a cut file copied again)."""
    records = outputs.records()
    return [v for v in videos if not done_alike(records.get(v.id), settings, v.path)]


def done_alike(record: dict | None, settings: dict, path: str) -> bool:
    return (bool(record) and record.get("status") == DONE and record.get("settings") == settings
            and record.get("source") == stamp(path))


def changed_since(outputs: Outputs, videos: list[Video], settings: dict) -> tuple[list[str], int]:
    """Why 'done' records of `videos` are not kept, for the driver to say: the options (keys
    of `settings`) that differ, and how many of the files changed since they were read."""
    records = outputs.records()
    changed: set[str] = set()
    files = 0
    for video in videos:
        record = records.get(video.id) or {}
        if record.get("status") != DONE:
            continue
        changed |= options_changed(record, settings)
        files += record.get("source") != stamp(video.path)
    return sorted(changed), files


def done_otherwise(outputs: Outputs, videos: list[Video], settings: dict) -> tuple[list[str], list[str]]:
    """The videos done in `outputs` with other options that are not among `videos` (their paths,
    in id order), and those options: a run with `settings` would not do them again, and their
    rows would lie in OUT_DIR/rows beside its own."""
    ours = {video.id for video in videos}
    paths, changed = [], set()
    for video_id, record in outputs.records().items():
        if video_id not in ours and record.get("status") == DONE and record.get("settings") != settings:
            paths.append(record.get("path", video_id))
            changed |= options_changed(record, settings)
    return paths, sorted(changed)


def options_changed(record: dict, settings: dict) -> set[str]:
    """The options (keys of `settings`) a record was made with otherwise."""
    if record.get("settings") == settings:
        return set()
    earlier = record.get("settings") or {}
    # the drawing options are stored only with record: a change of record names record alone
    keys = settings.keys() & earlier.keys() if earlier.get("record") != settings.get("record") \
        else settings.keys() | earlier.keys()
    return {key for key in keys if earlier.get(key) != settings.get(key)}
