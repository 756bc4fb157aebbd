"""The live loop's thread plumbing (camface.realtime.threads): results put back in frame order,
failures raised after every frame before them."""

import contextlib
import signal
import subprocess
import sys

import pytest
from realtime_helpers import sigint_as_from_a_terminal

from camface.errors import SourceError
from camface.realtime.threads import END, Failure


def _drain(items, producers):
    """What in_order yields from `items` (and the exception it ends with), in a thread so
    that a regression that waits forever fails instead of hanging the suite."""
    import queue
    import threading

    from camface.realtime.threads import in_order

    inbox = queue.Queue()
    for item in items:
        inbox.put(item)
    out: dict = {"yielded": []}

    def consume():
        try:
            for index, frame, _ in in_order(inbox, producers):
                out["yielded"].append((index, frame))
        except Exception as exc:  # noqa: BLE001 - what the test checks
            out["raised"] = exc

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=60)  # ends a hang only: returns as soon as the consumer is done
    assert not thread.is_alive(), f"in_order still waiting after {out['yielded']}"
    return out["yielded"], out.get("raised")



def run_script(script: str) -> subprocess.CompletedProcess:
    """`script` run by this Python in a child whose SIGINT is as a terminal's (not ignored)."""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          preexec_fn=sigint_as_from_a_terminal)

def test_in_order_puts_detector_results_back_in_frame_order():
    items = [(1, "f1", ()), (3, "f3", ()), (0, "f0", ()), END, (2, "f2", ()), (4, "f4", ()), END]
    yielded, raised = _drain(items, producers=2)
    assert yielded == [(i, f"f{i}") for i in range(5)] and raised is None


def test_in_order_raises_a_failure_after_the_frames_before_it():
    # The reader failed after frame 2: detector A passes the failure on, detector B still
    # delivers frame 2 and ends. Frames 0-2 come out, then the error.
    items = [(1, "f1", ()), (0, "f0", ()), Failure(SourceError("camera 0 disappeared")), (2, "f2", ()), END]
    yielded, raised = _drain(items, producers=2)
    assert yielded == [(0, "f0"), (1, "f1"), (2, "f2")]
    assert isinstance(raised, SourceError) and "camera 0 disappeared" in str(raised)

    # Detector A failed on frame 2 while B still had frame 1: 0 and 1 come out, then the
    # error, without waiting for B to end; frame 3 (after the failure) is not delivered.
    items = [(0, "f0", ()), (3, "f3", ()), Failure(RuntimeError("detector crashed"), index=2), (1, "f1", ())]
    yielded, raised = _drain(items, producers=2)
    assert yielded == [(0, "f0"), (1, "f1")] and isinstance(raised, RuntimeError)


def test_stop_signals_raise_and_are_remembered_until_the_block_ends():
    """Ctrl-C or SIGTERM inside `stop_signals` raises at once and stays asked for: a loop whose
    library caught the first KeyboardInterrupt stops at its next `check()`. The handlers before
    the block come back after it."""
    import os
    import signal

    import pytest

    from camface.realtime.threads import Terminated, stop_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signum, raised in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)):
        with stop_signals() as stop:
            stop.check()  # nothing asked yet
            with pytest.raises(raised):
                os.kill(os.getpid(), signum)
                for _ in range(1000):  # the handler runs between two bytecodes
                    pass
            with pytest.raises(raised):  # swallowed once, asked again
                stop.check()
            assert stop.signum == signum
        assert {s: signal.getsignal(s) for s in before} == before


def test_signals_held_restores_ctrl_c_when_interrupted_while_setting_up(monkeypatch):
    """A SIGTERM handled between ignoring SIGINT and ignoring SIGTERM used to leave SIGINT
    ignored for the rest of the process (every later Ctrl-C lost)."""
    import signal

    import pytest

    from camface.realtime import threads

    before = signal.getsignal(signal.SIGINT)
    real = signal.signal

    def interrupted(signum, handler):
        if signum == signal.SIGTERM:
            raise threads.Terminated()  # as the SIGTERM handler would, arriving here
        return real(signum, handler)

    monkeypatch.setattr(threads.signal, "signal", interrupted)
    with pytest.raises(threads.Terminated):
        with threads.signals_held():
            pass
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("signals, raised_inside", [
    ((signal.SIGINT,), False),  # one: deferred to the block's end
    ((signal.SIGTERM,), False),
    ((signal.SIGINT, signal.SIGINT), True),  # a second: at once (a block stuck waiting is interrupted)
    ((signal.SIGTERM, signal.SIGINT), True),
])
def test_signals_deferred_takes_one_signal_at_the_end_and_a_second_at_once(signals, raised_inside):
    from camface.realtime import threads

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    steps: list[str] = []
    with threads.sigterm_raises(), pytest.raises((KeyboardInterrupt, threads.Terminated)) as caught:
        with threads.signals_deferred():
            for signum in signals:
                signal.raise_signal(signum)
                steps.append("after signal")
            steps.append("block ended")
    assert steps == (["after signal"] if raised_inside else ["after signal", "block ended"])
    assert isinstance(caught.value, KeyboardInterrupt if signals[-1 if raised_inside else 0] == signal.SIGINT
                      else threads.Terminated)
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("block", ["signals_deferred", "stop_signals", "signals_held", "stop_then_held"])
def test_signal_blocks_set_every_handler_back_when_a_signal_is_taken_meanwhile(monkeypatch, block):
    """signal.signal runs the pending handlers before it sets its own: a SIGINT taken while the
    block's handlers were set back, once SIGINT's was back, raised KeyboardInterrupt before
    SIGTERM's was, leaving the block's own SIGTERM handler in place for good (deferring every
    later SIGTERM to no one, raising into a finished loop, or ignoring it). Both are set back,
    and the KeyboardInterrupt still raised."""
    from camface.realtime import threads

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    real, taken = signal.signal, []

    def pending_sigint(signum, handler):
        if signum == signal.SIGTERM and handler is before[signal.SIGTERM] and not taken:
            taken.append(signum)
            raise KeyboardInterrupt()  # SIGINT's handler (its own again), run before SIGTERM's is set
        return real(signum, handler)

    monkeypatch.setattr(threads.signal, "signal", pending_sigint)
    with pytest.raises(KeyboardInterrupt):
        with getattr(threads, block)():
            pass
    monkeypatch.undo()
    assert taken and {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("signals, code", [((signal.SIGINT, signal.SIGINT), 0),
                                           ((signal.SIGINT, signal.SIGTERM, signal.SIGINT), 130),
                                           ((signal.SIGTERM,) * 3, 143)])
def test_signals_held_end_the_process_on_the_third_signal(signals, code):
    """Finishing the recording holds signals off; a writer stuck on its file then left a process
    that only SIGKILL ended (Ctrl-C did nothing). Two signals are still held off; the third ends
    the process at once with its exit code, the caller's line said first."""
    script = ("import signal, sys\n"
              "from camface.realtime.threads import signals_held\n"
              "with signals_held('camface: stopped without finishing'):\n"
              f"    for s in {[int(s) for s in signals]}:\n"
              "        signal.raise_signal(s)\n"
              "print('finished')\n")
    run = run_script(script)
    assert run.returncode == code, run.stderr
    if code:
        assert run.stdout == "" and run.stderr.strip() == "camface: stopped without finishing (3 signals while it finished)"
    else:
        assert run.stdout == "finished\n" and run.stderr == ""


def test_signals_held_end_the_process_even_where_stderr_is_gone():
    """The forced exit wrote its line first, and a stderr whose reader had gone (`camface live
    2>&1 | head`, a closed terminal) made that write raise BrokenPipeError in the handler: the
    process did not exit but raised into the finishing run, which then waited on the stuck
    writer for ever. The line is dropped; the process still ends with the signal's code."""
    script = ("import os, signal\n"
              "from camface.realtime.threads import signals_held\n"
              "read, write = os.pipe()\n"
              "os.close(read)\n"
              "os.dup2(write, 2)  # a pipe nobody reads: writes fail with EPIPE\n"
              "with signals_held('camface: stopped without finishing'):\n"
              "    for _ in range(3):\n"
              "        signal.raise_signal(signal.SIGINT)\n"
              "print('finished')\n")
    run = run_script(script)
    assert (run.returncode, run.stdout) == (130, "")


def test_stop_then_held_raises_the_first_signal_and_holds_the_rest():
    """The live loop's signals: the first Ctrl-C (or SIGTERM) raises at once and stays asked for
    (`check()`); every later one is held from the moment the first was handled, so the run's
    finishing is never cut by a second that came before it could hold them. The handlers before
    the block come back after it."""
    import os

    from camface.realtime.threads import Terminated, stop_then_held

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for first, raised in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)):
        steps = []
        with stop_then_held() as signals:
            signals.check()  # nothing asked yet
            with pytest.raises(raised):
                os.kill(os.getpid(), first)
                for _ in range(1000):  # the handler runs between two bytecodes
                    pass
            for later in (signal.SIGINT, signal.SIGTERM):
                signal.raise_signal(later)
                steps.append(later)
            with pytest.raises(raised):  # the first, asked again
                signals.check()
        assert steps == [signal.SIGINT, signal.SIGTERM] and signals.held == steps and signals.signum == first
        assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("finishing", [False, True])
def test_stop_then_held_holds_every_signal_once_finishing(finishing):
    """A run that ended by itself (the end of input, an error) sets `finishing`: a signal then is
    held, not raised into the finishing."""
    from camface.realtime.threads import stop_then_held

    with pytest.raises(KeyboardInterrupt) if not finishing else contextlib.nullcontext():
        with stop_then_held() as signals:
            signals.finishing = finishing
            signal.raise_signal(signal.SIGINT)
    assert signals.held == ([signal.SIGINT] if finishing else []) and signals.signum == (0 if finishing else 2)



def test_stop_then_held_leaves_an_ignored_signal_ignored():
    """A run started in the background by a shell (SIGINT ignored) was never stopped by SIGINT:
    it still is not."""
    from camface.realtime.threads import stop_then_held

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_then_held() as signals:
            signal.raise_signal(signal.SIGINT)
            signals.check()
        assert (signals.signum, signals.held) == (0, []) and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)

def test_stop_then_held_ends_the_process_on_the_third_signal_after_the_stop():
    """The stop, then two held signals; the third held one ends the process with its code and
    the line as it is then."""
    script = ("import signal\n"
              "from camface.realtime.threads import stop_then_held\n"
              "with stop_then_held('first line') as signals:\n"
              "    try:\n"
              "        signal.raise_signal(signal.SIGINT)\n"
              "    except KeyboardInterrupt:\n"
              "        signals.forced = lambda: 'camface: the line said at the exit'\n"
              "        for s in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):\n"
              "            signal.raise_signal(s)\n"
              "print('finished')\n")
    run = run_script(script)
    assert (run.returncode, run.stdout) == (143, "")
    assert run.stderr.strip() == "camface: the line said at the exit (3 signals while it finished)"


def test_the_forced_exit_line_is_seen_while_a_stuck_writer_captures_fd_2():
    """The writer stuck while an encoder's fd-2 capture was open (`native_stderr_captured`: a
    hang as the encoder opened): the forced exit's line went into the capture's file, which the
    exit dropped, so Ctrl-C pressed three times ended the run without a word. It goes to the
    stderr the process had."""
    script = ("import signal, threading\n"
              "from camface.native import native_stderr_captured\n"
              "from camface.realtime.threads import signals_held\n"
              "capturing = threading.Event()\n"
              "def stuck_writer():\n"
              "    with native_stderr_captured('x264 ['):\n"
              "        capturing.set()\n"
              "        threading.Event().wait()  # a file system that hangs\n"
              "threading.Thread(target=stuck_writer, daemon=True).start()\n"
              "capturing.wait()\n"
              "with signals_held('camface: stopped without finishing'):\n"
              "    for _ in range(3):\n"
              "        signal.raise_signal(signal.SIGINT)\n"
              "print('finished')\n")
    run = run_script(script)
    assert (run.returncode, run.stdout) == (130, "")
    assert run.stderr.strip() == "camface: stopped without finishing (3 signals while it finished)"
