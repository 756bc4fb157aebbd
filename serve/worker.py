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
    session, work)` is called from the worker thread for each processed frame. `stop()` joins.
    Counters: rounds, frames (processed), errors."""

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
        """One round over every client with a new frame; returns the frames processed."""
        taken: list[tuple] = []  # (session, frame, explainer, controls, index, faces, detect ms)
        for session in self._sessions():
            item = session.take()
            if item is None:
                continue
            frame, explainer, controls, index = item
            start = time.perf_counter()
            try:
                faces = session.detect(frame.frame, index)
            except BaseException:
                session.sent()
                for other, *_ in taken:
                    other.sent()
                raise
            taken.append((session, frame, explainer, controls, index, faces, (time.perf_counter() - start) * 1000))
        if not taken:
            return 0
        try:
            items = []
            for session, frame, explainer, controls, index, faces, _ in taken:
                fps, hud_ms = session.hud()
                items.append((explainer, frame.frame, faces, controls, index, fps, hud_ms))
            start = time.perf_counter()
            explained = explain_many(items)
            classify_ms = (time.perf_counter() - start) * 1000
        except BaseException:
            for session, *_ in taken:
                session.sent()  # nothing will be sent for these frames: free their places
            raise
        for (session, frame, _, controls, _, _, detect_ms), done in zip(taken, explained):
            self._deliver(session, Work(frame, done, detect_ms, classify_ms, len(taken), controls.hud))
        self.rounds += 1
        self.frames += len(taken)
        return len(taken)
