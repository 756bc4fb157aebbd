"""Plumbing of the live loop's threads: bounded queues that can be stopped, results put back
in frame order, failures carried from worker threads, and signals turned into exceptions.

Nothing here knows about frames or faces: `camface.realtime.loop` builds the pipeline from it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
from collections.abc import Callable

from camface.native import write_to_stderr  # (imported here: never an import inside a signal handler)

END = object()  # sent once by each producer when it has nothing more


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt, so `except Exception` in
    library code cannot swallow it)."""

    exit_code = 143


class Failure:
    """An exception travelling down the pipeline from a worker thread.

    index: the frame a detector failed on; None for the reader (after every frame it read).
    """

    def __init__(self, exc: BaseException, index: int | None = None):
        self.exc = exc
        self.index = index


def put(q: queue.Queue, item, stop: threading.Event | None) -> bool:
    """Put, waiting while the queue is full; False if `stop` was set meanwhile (None: wait
    for room however long it takes)."""
    while True:
        try:
            q.put(item, timeout=0.05)  # a timeout keeps Ctrl-C responsive while waiting
            return True
        except queue.Full:
            if stop is not None and stop.is_set():
                return False


def get(q: queue.Queue, stop: threading.Event | None = None, waiting: Callable[[], None] | None = None):
    """Get, waiting (interruptibly) for an item; END once `stop` is set and nothing comes.
    waiting: called every 0.05 s while nothing comes (a StopRequest's `check`)."""
    while True:
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            if stop is not None and stop.is_set():
                return END
            if waiting is not None:
                waiting()


def in_order(inbox: queue.Queue, producers: int, slots: threading.Semaphore | None = None,
             waiting: Callable[[], None] | None = None):
    """Yield (index, frame, faces, cut) from `producers` detector threads in frame order (each
    item as a producer sent it: a tuple whose first element is the frame index).

    Each producer sends increasing indices and then one END (or a Failure, after which it
    stops); together they cover 0, 1, 2, ... without gaps. A failure is raised once every
    frame before it has been yielded, so nothing already read is lost: a detector's failure
    on frame k after frames 0..k-1, the reader's after every frame it read. `slots` gets one
    release per frame yielded (the reader takes one per frame read: see LiveLoop._read).
    `waiting` is called every 0.05 s while no item comes (`get`).
    """
    pending: dict[int, tuple] = {}
    wanted = ended = 0
    failure: Failure | None = None
    while True:
        while wanted in pending:
            if slots is not None:
                slots.release()
            yield pending.pop(wanted)
            wanted += 1
        if failure is not None and (ended == producers or (failure.index is not None and wanted >= failure.index)):
            raise failure.exc
        if ended == producers:
            return
        item = get(inbox, waiting=waiting)
        if item is END:
            ended += 1
        elif isinstance(item, Failure):
            ended += 1  # its producer has stopped
            earlier = item.index is not None and (failure is None or failure.index is None or item.index < failure.index)
            if failure is None or earlier:
                failure = item
        else:
            pending[item[0]] = item


def acquire(slots: threading.Semaphore, stop: threading.Event) -> bool:
    """Take a slot, waiting while none is free; False if `stop` was set meanwhile."""
    while not slots.acquire(timeout=0.05):
        if stop.is_set():
            return False
    return True


@contextlib.contextmanager
def sigterm_raises():
    """While the block runs, SIGTERM raises Terminated in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequest:
    """The stop signal received inside `stop_signals` (0: none yet). `check()` raises it again:
    a loop calls it at each step, so the run stops even where library code caught the first
    KeyboardInterrupt (one raised inside a finaliser or a library's own handler is lost)."""

    def __init__(self):
        self.signum = 0

    def check(self) -> None:
        if self.signum == signal.SIGTERM:
            raise Terminated()
        if self.signum:
            raise KeyboardInterrupt()


def _set_back(previous: dict[int, object]) -> None:
    """Set each signal's handler back to `previous`'s, every one of them even when a signal's
    handler raises meanwhile: signal.signal runs the pending handlers before it sets its own, so
    a SIGINT taken (KeyboardInterrupt) once SIGINT's handler was back would leave SIGTERM's
    block handler in place for good (every later SIGTERM swallowed, or deferred to no one). The
    first exception a handler raised is raised once all are back."""
    raised = None
    for s, handler in previous.items():
        for _ in range(len(previous) + 1):  # (each signal's pending handler runs once)
            try:
                signal.signal(s, handler)
                break
            except BaseException as exc:
                raised = raised or exc
    if raised is not None:
        raise raised


@contextlib.contextmanager
def stop_signals():
    """While the block runs, SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated in
    the main thread, and either is remembered in the StopRequest yielded."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def on_signal(signum, frame):
        request.signum = request.signum or signum
        request.check()

    previous: dict[int, object] = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, on_signal)
        yield request
    finally:
        _set_back(previous)


FORCE_AFTER = 3  # signals inside `signals_held` that end the process without waiting more
UNFINISHED = "camface: stopped without finishing"


class Held(StopRequest):
    """The handler of SIGINT/SIGTERM while a run goes on and then finishes what it started (the
    recording), set by `stop_then_held` and `signals_held`. Until the run is stopped, the first
    signal stops it: KeyboardInterrupt or Terminated raised at once, and again by `check()`.
    Every signal after that one, or after `finishing` is set, is held: ignored, except that the
    FORCE_AFTER-th held one ends the process at once, `forced` written to stderr first (a
    callable: the line it gives then, as things stand at that moment), with the signal's exit
    code (130, 143).

    One handler for both parts, in place from the start: a second Ctrl-C handled after the
    first had raised, before the finishing block had put a holding handler in place, raised
    KeyboardInterrupt in the middle of the finishing (the writer not joined, the recording not
    finished, no summary)."""

    def __init__(self, forced: str | Callable[[], str] = UNFINISHED, finishing: bool = False):
        super().__init__()
        self.forced = forced
        self.finishing = finishing  # set: every signal is held (the run is finishing)
        self.held: list[int] = []  # the signals held so far

    def __call__(self, signum, frame) -> None:
        if self.finishing or self.signum:
            self._hold(signum)
            return
        self.signum = signum
        self.check()

    def _hold(self, signum: int) -> None:
        self.held.append(signum)
        if len(self.held) < FORCE_AFTER:
            return
        try:
            line = self.forced() if callable(self.forced) else self.forced
        except Exception:  # (never in the way of the exit)
            line = UNFINISHED
        # to the stderr the user sees, even while an encoder's fd-2 capture holds fd 2 (a writer
        # stuck in it): the line was written into the capture's file, which the exit drops
        write_to_stderr(f"\n{line} ({len(self.held)} signals while it finished)\n".encode(errors="replace"))
        os._exit(128 + signum)


@contextlib.contextmanager
def _handled_by(handler: Held, keep_ignored: bool = False):
    """While the block runs, `handler` takes SIGINT and SIGTERM (in the main thread; elsewhere
    nothing is set); keep_ignored: a signal ignored before the block (SIG_IGN: a job started in
    the background by a shell, `nohup`) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield handler
        return
    previous: dict[int, object] = {}
    try:  # set one by one inside the try: a signal between the two must not leave one ignored
        for s in (signal.SIGINT, signal.SIGTERM):
            if keep_ignored and signal.getsignal(s) is signal.SIG_IGN:
                continue
            previous[s] = signal.signal(s, handler)
        yield handler
    finally:
        _set_back(previous)


def stop_then_held(forced: str | Callable[[], str] = UNFINISHED):
    """While the block runs, the first SIGINT raises KeyboardInterrupt and the first SIGTERM
    Terminated in the main thread, and every later one is held (`Held`, yielded): the block's
    own finishing (its `except` and `finally`) is never cut by a second signal, however soon
    after the first it comes. Set `finishing` on the object yielded as the finishing starts
    without a signal (the end of input, an error): signals are held from then on. A loop calls
    its `check()` at each step: a first KeyboardInterrupt caught by library code still stops it.
    A signal ignored before the block stays ignored (the run never stopped by it, as before)."""
    return _handled_by(Held(forced), keep_ignored=True)


def signals_held(forced: str | Callable[[], str] = UNFINISHED):
    """Hold off SIGINT/SIGTERM while the block runs (finalising the recording must finish):
    they are ignored, except that the FORCE_AFTER-th one ends the process at once, `forced`
    written to stderr first (a callable: the line it gives then, as things stand at that
    moment), with the signal's exit code (130, 143). A writer stuck on its file
    (a network mount that hangs) otherwise left a process that only SIGKILL ends; pressing
    Ctrl-C three times is the way out, as in docker. A single SIGTERM still waits: finishing
    the recording comes first, and a supervisor's SIGKILL is its escalation."""
    return _handled_by(Held(forced, finishing=True))


@contextlib.contextmanager
def signals_deferred():
    """SIGINT/SIGTERM that arrive while the block runs take effect when it ends, through the
    handlers in place then (as if they came then): a step that must happen whole (a frame
    handed to the writer and counted) is not cut in two. The block should be short, or wait
    only on something that moves on by itself (the writer's queue): the signal waits for it.
    A second signal takes effect at once, through the handlers in place before the block: a
    block stuck waiting (a writer hung on its file) can still be interrupted, as a second Ctrl-C
    does elsewhere. A signal that came while the block raised is dropped: the block's exception
    ends the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, object] = {}

    def defer(signum, frame) -> None:
        if received:  # the second: the previous handlers take it now
            _set_back(previous)
            signal.raise_signal(signum)
        received.append(signum)

    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, defer)
        yield
    finally:
        _set_back(previous)
    if received:
        signal.raise_signal(received[0])  # its handler (KeyboardInterrupt, Terminated) raises here


@contextlib.contextmanager
def opencv_single_threaded():
    """OpenCV's own worker threads only add contention: the pipeline's stages already run
    in parallel, one thread each."""
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


