"""The one inference worker shared by all clients.

Each round it takes the newest frame of every client that has one (older frames were already
dropped by the client's slot, never queued), detects faces in each with that client's
detector, and explains them all with ONE graph call for the crops of every frame together
(`camface.realtime.explainer.explain_many`; one call per method when clients chose different
ones): the GPU-server case, one batch for everyone. Drawing and encoding happen after, per
client, outside this thread (`Session.finish`), so they overlap the next round.
"""

from __future__ import annotations

import logging
import threading
import time

from camface.realtime.explainer import explain_many
from camface.serve.session import Work

log = logging.getLogger(__name__)


class CountingGraph:
    """A CamGraph that counts its `run` calls and the crops they carried (everything else is
    the graph's own)."""

    def __init__(self, graph):
        self._graph = graph
        self.calls = self.crops = 0

    def run(self, crops, class_index, method):
        self.calls += 1
        self.crops += len(crops)
        return self._graph.run(crops, class_index, method)

    def run_scores(self, crops, class_index, method):
        self.calls += 1
        self.crops += len(crops)
        return self._graph.run_scores(crops, class_index, method)

    def __getattr__(self, name):
        return getattr(self._graph, name)


class InferenceWorker:
    """`start()`, then `wake()` whenever a client has a new frame or has sent one; `deliver(
    session, work)` is called from the worker thread for each frame taken: a Work, or a
    FrameFailed when that client's frame failed. `stop()` joins. Counters: rounds, frames
    (processed), errors (frames failed, and rounds that raised)."""

    def __init__(self, sessions, deliver):
        self._sessions, self._deliver = sessions, deliver  # sessions: () -> list[Session]
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="camface-serve-worker", daemon=True)
        self.rounds = self.frames = self.errors = 0

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=0.1)
            self._wake.clear()
            try:
                self.round()
            except Exception:  # a client's bad luck must not stop everyone's worker
                self.errors += 1
                log.exception("camface serve: inference round failed")

    def round(self) -> int:
        """One round over every client with a new frame; returns the frames processed. A frame
        whose detection or explanation fails is that client's alone: it gets a FrameFailed in
        place of its Work (the server closes it, saying why) and the others' frames go on."""
        taken: list[tuple] = []  # (session, frame, explainer, controls, index, faces, detect ms)
        try:
            for session in self._sessions():
                item = session.take()
                if item is None:
                    continue
                frame, explainer, controls, index = item
                start = time.perf_counter()
                try:
                    faces = session.detect(frame.frame, index)
                except Exception as exc:
                    self._fail(session, "face detection", exc)
                    continue
                taken.append((session, frame, explainer, controls, index, faces,
                              (time.perf_counter() - start) * 1000))
            if not taken:
                return 0
            start = time.perf_counter()
            explained = self._explain(taken)
            classify_ms = (time.perf_counter() - start) * 1000
        except BaseException:  # e.g. KeyboardInterrupt: nothing will be sent for these frames
            for session, *_ in taken:
                session.sent()
            raise
        done = 0
        for (session, frame, _, controls, _, _, detect_ms), result in zip(taken, explained):
            if isinstance(result, FrameFailed):
                self._deliver(session, result)
                continue
            self._deliver(session, Work(frame, result, detect_ms, classify_ms, len(taken), controls.hud))
            done += 1
        self.rounds += 1
        self.frames += done
        return done

    def _explain(self, taken: list[tuple]) -> list:
        """Each taken frame's Explained from ONE call for all; when that call fails, each frame
        alone, so one client's bad frame fails only that client (FrameFailed in its place). A
        client's own step failing (its smoother) fails that client only, without a retry: the
        others' smoothers have taken the frame already and must not take it twice."""
        items = []
        for session, frame, explainer, controls, index, faces, _ in taken:
            fps, hud_ms = session.hud()
            items.append((explainer, frame.frame, faces, controls, index, fps, hud_ms))
        try:
            results = explain_many(items, item_errors=True)
        except Exception as exc:  # a shared step: no smoother has seen the frames yet
            if len(items) == 1:
                return [self._failure(taken[0][0], "explaining faces", exc)]
            results = []
            for item in items:
                try:
                    results += explain_many([item], item_errors=True)
                except Exception as exc:
                    results.append(exc)
        return [self._failure(session, "explaining faces", result) if isinstance(result, Exception) else result
                for (session, *_), result in zip(taken, results)]

    def _failure(self, session, what: str, exc: Exception) -> "FrameFailed":
        self.errors += 1
        log.warning("camface serve: client %d: %s failed: %s: %s", session.id, what, type(exc).__name__, exc)
        return FrameFailed(f"{what} failed: {type(exc).__name__}: {exc}")

    def _fail(self, session, what: str, exc: Exception) -> None:
        self._deliver(session, self._failure(session, what, exc))


class FrameFailed(RuntimeError):
    """Delivered instead of a Work when a client's frame could not be processed: the client is
    closed with this message (1011), its place freed."""
