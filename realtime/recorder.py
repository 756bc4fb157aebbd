"""The writer thread's work: the recording (started and stopped by key r) and snapshots.

The main thread hands over one `Output` per processed frame; the writer encodes it, saves a
snapshot when asked, and finalises the recording whatever happens (the file stays playable).
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camface.errors import OutputError
from camface.realtime.explainer import Explained
from camface.realtime.threads import END
from camface.realtime.timing import StageTimer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    """One processed frame for the writer.

    frame: the annotated uint8 BGR frame, None for a snapshot of a frame handed over before
    (key s pressed while it was on screen). raw: the frame before drawing, when a snapshot is
    due or may be asked for (else None). explained: its crops and result. snapshot: save one.
    toggle: start or stop recording before writing this frame. at: when a camera's frame
    was taken (seconds, any clock; see VideoSink.write), None for files.
    """

    frame: np.ndarray | None
    explained: Explained
    raw: np.ndarray | None = None
    snapshot: bool = False
    toggle: bool = False
    at: float | None = None


class Recorder:
    """Recording and snapshots for one run. first_record: the --record file (None: not
    recording until key r). fps: the source's rate, written into the file. snapshots: a
    SnapshotWriter or None. timer: gets the `encode` and `snapshot` stages. codec: see
    camface.realtime.sinks.

    A recording that key r cannot start (its folder not writable, the encoder refusing the
    file, up to its first frame written) is not started, and one of key r's that fails later (a
    full disk) is stopped and finalised with what it holds: the run goes on, the reason is
    logged as a warning and put on `notices` (strings; the main thread shows them on the HUD).
    The --record file's own failures end the run: it is the job the command was asked for."""

    def __init__(self, first_record: Path | None, fps: float, overwrite: bool, snapshots, timer: StageTimer,
                 codec: str = "auto"):
        self.fps, self.first_record, self.overwrite, self.codec = fps, first_record, overwrite, codec
        self.snapshots, self.timer = snapshots, timer
        self.sink = self._open(first_record, overwrite) if first_record else None
        self.recordings: list[tuple[str, int]] = []  # (path, frames the file holds)
        self.error: BaseException | None = None
        self.error_path: Path | None = None  # the recording `error` happened in (None: not in one)
        self.notices: queue.SimpleQueue = queue.SimpleQueue()  # recordings key r could not start
        self._starting = False  # the sink is key r's and has not written its first frame yet
        self._keyed = False  # the sink is key r's: its failures stop it, not the run

    def _open(self, path: Path, overwrite: bool):
        from camface.realtime.sinks import VideoSink

        return VideoSink(path, self.fps, overwrite, codec=self.codec)

    def _next_path(self) -> Path:
        """The --record name, or a timestamped one, with -2, -3, ... until it is new."""
        base = self.first_record or Path(time.strftime("camface-%Y%m%d-%H%M%S.mp4"))
        candidate, n = base, 1
        while candidate.exists():
            n += 1
            candidate = base.with_name(f"{base.stem}-{n}{base.suffix}")
        return candidate

    def toggle(self) -> None:
        if self.sink is not None:
            self.close_sink()
            log.info("recording stopped")
        else:
            path = self._next_path()
            try:
                self.sink = self._open(path, False)
            except (OutputError, OSError) as exc:
                self._not_started(path, exc)
                return
            self._starting = self._keyed = True
            log.info("recording to %s", self.sink.path)

    def _not_started(self, path: Path, exc: BaseException, removed: str | None = None) -> None:
        """Key r's recording to `path` failed to start with `exc`: say so, in one line with why its
        file was removed (`removed`: VideoSink.removed; a writer that did not open leaves none)."""
        reason = str(exc) if str(path) in str(exc) else f"cannot write {path}: {exc}"
        self._notice(f"recording not started: {reason}", removed)

    def _notice(self, notice: str, removed: str | None) -> None:
        """Log `notice` as a warning and put it on `notices`, with why the file was removed."""
        if removed is not None:
            notice += f"; the file was removed: {removed}"
        log.warning("camface: %s", notice)
        self.notices.put(notice)

    def close_sink(self) -> None:
        """Finalise the recording in progress, if any (idempotent). A failure (a full disk)
        becomes `error` unless one came first: the main thread raises it."""
        sink, self.sink, self._starting, self._keyed = self.sink, None, False, False
        if sink is None:
            return
        try:
            sink.close()
        except Exception as exc:
            if self.error is None:
                self.error, self.error_path = exc, sink.path
            else:
                log.warning("camface: %s", exc)
        if sink.frames_written and sink.frames_kept:  # what the file holds (fewer than written after a
            self.recordings.append((str(sink.kept_in), sink.frames_kept))  # full disk; none: it is removed)

    def _stop_failed(self, exc: BaseException) -> None:
        """Key r's recording failed after its first frame (`exc`: a full disk): finalise it with
        the frames it holds (the sink trims a cut frame), say so, and go on without it."""
        sink, self.sink, self._keyed = self.sink, None, False
        try:
            sink.close(say_removed=False)
        except Exception as error:  # the write's error says why; the file keeps what it can
            log.debug("closing the recording that failed: %s", error)
        kept = sink.frames_kept if sink.frames_written else 0
        if kept:
            self.recordings.append((str(sink.kept_in), kept))
        reason = str(exc) if str(sink.path) in str(exc) else f"writing {sink.path}: {exc}"
        self._notice(f"recording stopped: {reason} ({kept} frames kept)", sink.removed)

    def _drop_unstarted(self, exc: BaseException) -> None:
        sink, self.sink, self._starting, self._keyed = self.sink, None, False, False
        try:
            sink.close(say_removed=False)
        except Exception as error:  # nothing was written; the first error says why
            log.debug("closing the recording that did not start: %s", error)
        self._not_started(sink.path, exc, sink.removed)

    def handle(self, item: Output) -> None:
        if item.toggle:
            self.toggle()
        if self.sink is not None and item.frame is not None:
            with self.timer.stage("encode"):
                try:
                    self.sink.write(item.frame, item.at)
                except (OutputError, OSError) as exc:
                    if self._starting:
                        self._drop_unstarted(exc)  # the encoder opens on the first frame
                    elif self._keyed:
                        self._stop_failed(exc)
                    else:
                        self.error_path = self.sink.path
                        raise
                except BaseException:
                    self.error_path = self.sink.path
                    raise
                else:
                    self._starting = False
        if item.snapshot and self.snapshots is not None and item.raw is not None:
            with self.timer.stage("snapshot"):
                self.snapshots.save(item.raw, item.explained.crops, item.explained.result)

    def run(self, inbox: queue.Queue) -> None:
        """The writer thread: handle items until END; the first error is kept (the main thread
        raises it) and the rest of the queue is drained so the main thread never blocks."""
        try:
            while True:
                item = inbox.get()
                if item is END:
                    return
                if self.error is None:
                    try:
                        self.handle(item)
                    except BaseException as exc:  # reported by the main thread; keep draining
                        self.error = exc
        finally:
            self.close_sink()
