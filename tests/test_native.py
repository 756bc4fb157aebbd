"""camface.native.quiet_native_stderr: fd 2 silenced while any block runs, and given back,
whatever the order in which threads enter and leave (camface serve opens and closes
detectors from several threads at once)."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from camface.native import quiet_native_stderr


@contextlib.contextmanager
def fd2_to_file(tmp_path):
    """Point fd 2 at a file inside the test (pytest's own capture moves fd 2 between setup and
    call, so not in a fixture) and put it back after; gives (the file's path, its (st_dev,
    st_ino))."""
    path = tmp_path / "stderr.txt"
    saved = os.dup(2)
    with open(path, "wb") as target:
        os.dup2(target.fileno(), 2)
    try:
        stat = os.fstat(2)
        yield path, (stat.st_dev, stat.st_ino)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def fd2_identity() -> tuple[int, int]:
    stat = os.fstat(2)
    return stat.st_dev, stat.st_ino


def run_threads(*targets) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a thread did not finish"


def test_interleaved_blocks_give_fd2_back_and_silence_while_any_runs(tmp_path):
    """A enters, B enters, A leaves, B leaves: before the fix B "restored" the /dev/null it
    had saved, and the process's stderr was lost for good."""
    with fd2_to_file(tmp_path) as (path, original):
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def a():
            with quiet_native_stderr():
                a_in.set()
                b_in.wait(10)
            a_out.set()

        def b():
            a_in.wait(10)
            with quiet_native_stderr():
                b_in.set()
                a_out.wait(10)
                os.write(2, b"native chatter while B runs\n")  # A has left; B's block still silences
                seen["inside"] = fd2_identity()

        run_threads(a, b)
        assert seen["inside"] != original
        assert fd2_identity() == original
        os.write(2, b"the server's log line\n")
        assert path.read_bytes() == b"the server's log line\n"


def test_detectors_opened_and_closed_from_parallel_threads_give_fd2_back(tmp_path):
    from camface.models import DETECTORS
    from camface.realtime.detect import FaceDetector

    with fd2_to_file(tmp_path) as (path, original):
        start = threading.Barrier(4)
        failures = []

        def client():
            try:
                start.wait(30)
                for _ in range(3):
                    with FaceDetector(DETECTORS["full"], quiet=True):
                        pass
            except Exception as exc:  # noqa: BLE001 (reported below)
                failures.append(exc)

        run_threads(*[client] * 4)
        assert not failures
        assert fd2_identity() == original
        os.write(2, b"shutdown summary\n")
        assert path.read_bytes().endswith(b"shutdown summary\n")


def test_disabled_leaves_fd2_alone(tmp_path):
    with fd2_to_file(tmp_path) as (_, original):
        with quiet_native_stderr(enabled=False):
            assert fd2_identity() == original
        with contextlib.suppress(RuntimeError), quiet_native_stderr():
            assert fd2_identity() != original
            raise RuntimeError("a failure inside the block")
        assert fd2_identity() == original


def test_captured_lines_are_held_back_and_given_to_the_caller(tmp_path):
    """What native code writes to fd 2 inside `native_stderr_captured` is the caller's (x264's
    refusal, put in camface's error), not the terminal's; fd 2 is given back after. Inside a
    silencing block of another thread, the lines stay silenced and the caller gets none."""
    from camface.native import native_stderr_captured

    with fd2_to_file(tmp_path) as (path, original):
        with native_stderr_captured() as said:
            os.write(2, b"x264 [error]: invalid preset 'nope'\n\n")
            assert fd2_identity() != original
        assert said == ["x264 [error]: invalid preset 'nope'"] and fd2_identity() == original
        with quiet_native_stderr(), native_stderr_captured() as nested:
            os.write(2, b"chatter\n")
        assert nested == [] and fd2_identity() == original
        os.write(2, b"the log line\n")
        assert path.read_bytes() == b"the log line\n"


def test_captured_lines_of_another_thread_go_back_to_fd2(tmp_path):
    """fd 2 is the process's: a log line another thread wrote while x264's lines were held back
    was taken for x264's (logged as "libx264: ..." at info level, so lost, or put in the
    encoder's error). Only the lines starting with the prefix are the caller's; the others reach
    fd 2 once it is given back."""
    import threading

    from camface.native import native_stderr_captured

    with fd2_to_file(tmp_path) as (path, original):
        with native_stderr_captured("x264 [") as said:
            os.write(2, b"x264 [error]: invalid preset 'nope'\n")
            writer = threading.Thread(target=os.write, args=(2, b"camface: another thread's warning\n\n"))
            writer.start()
            writer.join()
        assert said == ["x264 [error]: invalid preset 'nope'"] and fd2_identity() == original
        assert path.read_bytes() == b"camface: another thread's warning\n"


def test_captures_of_two_threads_each_get_their_own_lines(tmp_path):
    """`camface serve` opens two clients' encoders at once: the second capture, entering while
    the first held fd 2, got none of its x264 lines and the first got both (one client's error
    naming the other's refusal). Captures take turns: each gets its own line only."""
    import threading

    from camface.native import native_stderr_captured

    second_in, results = threading.Event(), {}

    def second():
        with native_stderr_captured("x264 [") as said:
            os.write(2, b"x264 [error]: second\n")
            second_in.set()
        results["second"] = said

    with fd2_to_file(tmp_path) as (path, original):
        with native_stderr_captured("x264 [") as said:
            os.write(2, b"x264 [error]: first\n")
            thread = threading.Thread(target=second)
            thread.start()
            second_in.wait(timeout=1)  # (it cannot come while this capture holds fd 2: waited out)
        thread.join(timeout=30)
        assert said == ["x264 [error]: first"]
        assert results["second"] == ["x264 [error]: second"] and fd2_identity() == original


def test_tensorflow_start_up_lines_are_silenced_after_the_command_line_starts():
    """TensorFlow 2.21 wrote six lines to fd 2 as it was imported (absl's "All log messages
    before absl::InitializeLog() is called are written to STDERR", oneDNN's, the CUDA stub's),
    whatever TF_CPP_MIN_LOG_LEVEL said, before the first line of every `camface export`, `train`,
    `guided` or `enroll`. The command line silences that import (not with --debug); camface's
    own lines and Python's warnings after it still show."""
    import subprocess
    import sys

    model = Path(__file__).resolve().parents[1] / "models" / "emotion" / "emotion.onnx"
    script = ("import sys, warnings\n"
              "from camface.cli import main\n"
              f"assert main(['info', {str(model)!r}]) == 0\n"
              "assert 'tensorflow' not in sys.modules  # (info never needs it: imported only where needed)\n"
              "import tensorflow\n"
              "print('imported', file=sys.stderr)\n"
              "warnings.warn('a warning after')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines()[0] == "imported" and "UserWarning: a warning after" in run.stderr
    assert "absl" not in run.stderr and "I0000" not in run.stderr
