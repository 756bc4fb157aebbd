"""`camface batch` and what goes wrong around it: videos cut short (reported as incomplete, on
the driver, in summary.json / report.md and by the exit code), and a driver killed while its
Ray workers are still busy (OUT_DIR is locked by one run; workers of a dead run stop and never
publish a file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_batch import batch, clips  # noqa: F401 (clips: a fixture)

ray = pytest.importorskip("ray")
av = pytest.importorskip("av")

FRAMES = 60


def _faststart(source: Path, out: Path) -> Path:
    """`source`'s packets in an MP4 with its index (moov) before the samples, as `ffmpeg
    -movflags faststart` writes it: a cut file still announces every frame."""
    with av.open(str(source)) as inp, av.open(str(out), "w", format="mp4", options={"movflags": "faststart"}) as dst:
        stream = dst.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    return out


@pytest.fixture(scope="module")
def cut_clips(tmp_path_factory):
    """{kind: (cut file, frames the file announces, frames that decode)} for a fragmented MP4
    (the live recorder's) and a faststart MP4 of 60 frames, each cut to 30% of its bytes."""
    import cv2

    from camface.realtime.sample import SampleSource
    from camface.realtime.sinks import VideoSink
    from camface.realtime.sources import VideoFileSource

    folder = tmp_path_factory.mktemp("cut")
    sample = SampleSource(frames=FRAMES, size=(320, 240))
    whole = folder / "whole-fragmented.mp4"
    with VideoSink(whole, 30.0) as sink:
        for i in range(FRAMES):
            sink.write(sample.frame(i))
    files = {"fragmented": whole, "faststart": _faststart(whole, folder / "whole-faststart.mp4")}
    cut = {}
    for kind, path in files.items():
        data = path.read_bytes()
        target = folder / f"cut-{kind}.mp4"
        target.write_bytes(data[:int(len(data) * 0.3)])
        capture = cv2.VideoCapture(str(target))
        announced = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        capture.release()
        with VideoFileSource(target) as source:
            read = len(list(source))
        assert 0 < read < announced, (kind, read, announced)
        cut[kind] = (target, announced, read)
    assert cut["faststart"][1] == FRAMES  # its index survived the cut
    return cut


@pytest.mark.parametrize("segments", [False, True])
def test_a_cut_video_is_reported_incomplete_with_exit_code_3(ray_cluster, cut_clips, tmp_path, capfd, segments):
    from camface.batch.cli import EXIT_INCOMPLETE
    from camface.batch.inputs import video_id

    out = tmp_path / "out"
    paths = [cut_clips[kind][0] for kind in ("faststart", "fragmented")]
    flags = ["--device", "cpu", "--graph-gpus", "0", "--no-progress", "--segment-frames", "20" if segments else "0"]
    assert batch([*paths, "-o", out, *flags]) == EXIT_INCOMPLETE == 3
    err = capfd.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    assert summary["totals"]["incomplete"] == 2 and summary["totals"]["done"] == 2
    for kind in ("faststart", "fragmented"):
        path, announced, read = cut_clips[kind]
        record = next(r for r in summary["videos"] if r["video"] == video_id(path.resolve()))
        assert record["status"] == "done" and record["frames"] == read
        assert record["incomplete"] == {"frames_announced": announced, "frames_read": read,
                                        "reason": "file truncated or damaged: fewer frames decode than its "
                                                  "header announces"}
        said = f"read {read} of {announced} announced frames (file truncated or damaged"
        assert f"camface batch: incomplete: {path}: {said}" in err  # on the driver
        assert f"| incomplete: {said}" in report and f"- {path}: {said}" in report
    # a resume finds nothing to do and still says so
    assert batch([*paths, "-o", out, *flags, "--resume"]) == EXIT_INCOMPLETE


def test_a_failed_video_outranks_an_incomplete_one(ray_cluster, cut_clips, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    argv = [cut_clips["faststart"][0], broken, "-o", tmp_path / "out", "--device", "cpu", "--graph-gpus", "0",
            "--no-progress"]
    assert batch(argv) == 1
    totals = json.loads((tmp_path / "out" / "summary.json").read_text())["totals"]
    assert totals["failed"] == 1 and totals["incomplete"] == 1


# ------------------------------------------------------------------ a killed driver, its workers, a resume


def test_one_run_at_a_time_per_output_folder(tmp_path):
    from camface.batch.owner import RunLock
    from camface.errors import OutputError

    first = RunLock(tmp_path).acquire()
    with pytest.raises(OutputError, match=rf"{tmp_path} is in use by another camface batch run \(pid \d+ on "):
        RunLock(tmp_path).acquire()
    first.release()
    second = RunLock(tmp_path).acquire()  # free again; the first ended cleanly, so no grace wait
    assert second.earlier is None and second.owner.token != first.owner.token
    second.release()


def _disk_full_for(patch, name_part):
    """Path.write_text fails as on a full disk for names holding `name_part`: the file is
    opened (an existing one truncated, as open("w") does) and nothing gets written."""
    import errno

    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if name_part in self.name:
            self.open("w").close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    patch.setattr(Path, "write_text", write_text)


def test_a_full_disk_is_a_one_line_error_and_the_last_report_stays_whole(tmp_path, monkeypatch):
    from camface.batch.inputs import Video
    from camface.batch.owner import OWNER_NAME, RunLock
    from camface.batch.report import write_report
    from camface.batch.state import Outputs
    from camface.errors import OutputError

    outputs = Outputs(tmp_path)
    outputs.make()
    args = (outputs, [Video("/archive/a.mp4", "a-0123abcd")], ("x", "y"), "BGR", "gradcam", "jet", 0.5, {})
    write_report(*args)
    before = {name: (tmp_path / name).read_text() for name in ("summary.json", "report.md")}
    assert "a-0123abcd" in before["report.md"] and "a-0123abcd" in before["summary.json"]
    for name in before:
        with monkeypatch.context() as patch:
            _disk_full_for(patch, Path(name).stem)
            with pytest.raises(OutputError, match=f"cannot write {tmp_path / name}: No space left on device"):
                write_report(*args)
        assert {n: (tmp_path / n).read_text() for n in before} == before  # whole, not emptied
    with monkeypatch.context() as patch:  # the run's lock: refused in one line, the lock free again
        _disk_full_for(patch, OWNER_NAME)
        with pytest.raises(OutputError, match=f"cannot write {tmp_path / OWNER_NAME}: No space left on device"):
            RunLock(tmp_path).acquire()
    lock = RunLock(tmp_path).acquire()
    with monkeypatch.context() as patch:
        _disk_full_for(patch, OWNER_NAME)
        lock.release()  # logged, not raised: it would hide the error that ended the run
    RunLock(tmp_path).acquire().release()  # the flock was dropped all the same
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".camface-run.json",
                                                                                     ".camface-run.lock"]
    # a run killed while writing the report: the next run removes its temporary files
    # (named as camface.outputs.beside names them, which writes the report; or as batch.state.atomic_path)
    killed = [tmp_path / ".report.0123abcd.tmp.md", tmp_path / "report" / ".03-happy.0123abcd.tmp.png",
              tmp_path / ".report.md.4321.partial.md", tmp_path / "report" / ".03-happy.png.4321.partial.png"]
    for path in killed:
        path.write_bytes(b"half")
    assert outputs.clean_partials() == 4 and not any(path.exists() for path in killed)
    assert (tmp_path / "report.md").read_text() == before["report.md"]


def test_a_class_picture_cv2_cannot_write_is_an_error_naming_it_and_the_last_one_stays(tmp_path, monkeypatch):
    """cv2.imwrite says a failure by returning False, raising nothing: the report stops with one
    error naming the picture (not its temporary file), and the earlier picture stays whole."""
    import cv2
    import numpy as np

    from camface.batch.inputs import Video
    from camface.batch.report import write_report
    from camface.batch.state import Outputs
    from camface.errors import OutputError

    outputs = Outputs(tmp_path)
    outputs.make()
    video = Video("/archive/a.mp4", "a-0123abcd")
    outputs.record_path(video.id).write_text(json.dumps({"video": video.id, "path": video.path, "status": "done",
                                                         "frames": 3, "class_counts": {"x": 2}}))
    np.savez(outputs.sums_path(video.id), count=np.array([2, 0]), crop_sum=np.full((2, 8, 8, 3), 200.0),
             heatmap_sum=np.ones((2, 4, 4)))
    args = (outputs, [video], ("x", "y"), "BGR", "gradcam", "jet", 0.5, {})
    write_report(*args)
    picture = tmp_path / "report" / "00-x.png"
    before = picture.read_bytes()
    monkeypatch.setattr(cv2, "imwrite", lambda path, image: False)
    with pytest.raises(OutputError, match=f"cannot write {picture}: the file could not be written"):
        write_report(*args)
    assert picture.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["00-x.png"]


def test_a_record_the_full_disk_refuses_leaves_the_video_not_finished_and_the_run_failed(tmp_path, monkeypatch):
    from camface.batch.cli import exit_code
    from camface.batch.state import Outputs

    outputs = Outputs(tmp_path)
    outputs.make()
    with monkeypatch.context() as patch:
        _disk_full_for(patch, "a-0123abcd")
        record = outputs.write_record("a-0123abcd", {"path": "/archive/a.mp4", "ok": True, "frames": 3}, ("x",))
    assert record["status"] == "failed" and record["stage"] == "record"  # said on the driver, not raised
    assert record["reason"].startswith("cannot write its record ") and "No space left on device" in record["reason"]
    assert outputs.records() == {} and not list(outputs.state.iterdir())  # no record, no temporary file
    totals = {"videos": 2, "done": 1, "failed": 0, "not_finished": 1, "incomplete": 0}
    assert exit_code(totals, interrupted=False) == 1 and exit_code(totals, interrupted=True) == 130
    assert exit_code({**totals, "done": 2, "not_finished": 0}, interrupted=False) == 0


def _driver(tmp_path):
    """A process that takes OUT_DIR and dies with SIGKILL when the test says: (process, Owner)."""
    import subprocess
    import sys

    from camface.batch.owner import Owner

    code = ("import sys, time; from camface.batch.owner import RunLock; "
            "lock = RunLock(sys.argv[1]).acquire(); print(lock.owner.token, flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    token = process.stdout.readline().strip()
    info = json.loads((tmp_path / ".camface-run.json").read_text())
    assert info["token"] == token and info["pid"] == process.pid
    return process, Owner(info["path"], token, info["pid"], info["host"])


def test_a_worker_of_a_killed_driver_publishes_nothing(tmp_path):
    from camface.batch.owner import RunLock, Superseded
    from camface.batch.state import Outputs, write_json

    driver, owner = _driver(tmp_path)
    outputs = Outputs(tmp_path, owner)
    outputs.make()
    write_json(outputs.record_path("a"), {"status": "done"}, outputs.check)  # the driver lives: published
    driver.kill()
    driver.wait()
    with pytest.raises(Superseded, match=rf"its driver \(pid {driver.pid}\) is dead"):
        write_json(outputs.record_path("b"), {"status": "done"}, outputs.check)
    assert sorted(p.name for p in outputs.state.iterdir()) == ["a.json"]  # no temporary file left either
    resume = RunLock(tmp_path).acquire()  # the kernel dropped the dead driver's lock
    assert resume.earlier["token"] == owner.token  # it never released: the resume gives its workers time
    with pytest.raises(Superseded, match="another run owns the output folder now"):
        owner.check()
    resume.release()


def test_a_worker_process_ends_when_its_driver_dies(tmp_path):
    import subprocess
    import sys
    from dataclasses import asdict

    driver, owner = _driver(tmp_path)
    code = ("import sys, json, time; from camface.batch.owner import Owner; "
            "Owner(**json.loads(sys.argv[1])).watch(); print('watching', flush=True); time.sleep(600)")
    worker = subprocess.Popen([sys.executable, "-c", code, json.dumps(asdict(owner))], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "watching"
        assert worker.poll() is None
        driver.kill()
        driver.wait()
        _, err = worker.communicate(timeout=60)  # without the watcher: killed after 60 s, and fails
        assert worker.returncode == 3 and f"stopping: its driver (pid {driver.pid}) is dead" in err
    finally:
        for process in (worker, driver):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_sigkill_of_the_driver_then_resume_at_once_nothing_written_by_the_old_run(ray_cluster, tmp_path):
    """The driver as users run it, joined to the session's cluster, SIGKILLed while its workers
    are busy, then a --resume started at once: the old run's workers write nothing after the
    kill (every record is one the old run had published before it, or the resume's own), no
    temporary file is left, every video is done once."""
    import signal
    import subprocess
    import sys

    from camface.realtime.sample import SampleSource
    from tests.realtime_helpers import write_clip
    from tests.test_batch import rows_of, wait_for

    folder = tmp_path / "archive"
    folder.mkdir()
    sample = SampleSource(frames=6 * 40, size=(320, 240))
    for k in range(6):
        write_clip(folder / f"clip{k}.mp4", [sample.frame(k * 40 + i) for i in range(40)])
    out = tmp_path / "out"
    camface = Path(sys.executable).with_name("camface")
    argv = [str(camface), "batch", str(folder), "-o", str(out), "--device", "cpu", "--graph-gpus", "0",
            "--no-progress", "--segment-frames", "0", "--address", ray_cluster["address"]]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: any((out / "state").glob("[!.]*.json")), run)
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL
    before = {p.name: p.read_text() for p in (out / "state").glob("[!.]*.json")}
    old = json.loads((out / ".camface-run.json").read_text())["token"]

    resume = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr
    assert "ended without releasing" in resume.stderr
    summary = json.loads((out / "summary.json").read_text())
    new = summary["run"]["run"]
    assert new != old and [r["status"] for r in summary["videos"]] == ["done"] * 6
    for path in (out / "state").glob("[!.]*.json"):
        record = json.loads(path.read_text())
        assert path.read_text() == before.get(path.name) or record["run"] == new, (path.name, record["run"])
    assert not list(out.rglob(".*.tmp*"))
    assert json.loads((out / ".camface-run.json").read_text())["token"] is None  # released
    for record in summary["videos"]:
        table = rows_of(out, record["video"])
        keys = list(zip(table.column("frame").to_pylist(), table.column("face").to_pylist()))
        assert len(set(keys)) == len(keys) == record["faces_total"]


# ------------------------------------------------------------------ a worker that fails as a whole


RAY_TEXTS = {  # what Ray 2.60 raises on the driver, shortened: an actor's constructor, a stage's call
    "constructor": ("The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker(Map("
                    "Whole)).__init__()\x1b[39m (pid=1, ip=10.0.0.2)\n  File \"/x/stages.py\", line 1, in __init__\n"
                    "    raise ModelError(\"CAM graph not found: /nfs/g.onnx\")\n"
                    "camface.errors.ModelError: CAM graph not found: /nfs/g.onnx",
                    "ModelError: CAM graph not found: /nfs/g.onnx"),
    "call": ("\x1b[36mray::MapWorker(Map(Render)).submit()\x1b[39m (pid=2)\n  File \"/x/stages.py\", line 2\n"
             "camface.batch.owner.Superseded: not writing to /out: the run has ended\n\n"
             "The above exception was the direct cause of the following exception:\n\n"
             "\x1b[36mray::MapWorker(Map(Render)).submit()\x1b[39m (pid=2)\n"
             "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
             "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\n"
             "To change retry attempts, configure `ray.data.DataContext.get_current()`.",
             "Superseded: not writing to /out: the run has ended"),
    "no traceback": ("The actor died unexpectedly before finishing this task.\n\tclass_name: MapWorker",
                     "The actor died unexpectedly before finishing this task."),
}


@pytest.mark.parametrize("case", list(RAY_TEXTS))
def test_a_ray_error_is_said_in_one_line_by_the_workers_own_error(case):
    from ray.exceptions import RayError

    from camface.batch.pipeline import worker_failure

    text, said = RAY_TEXTS[case]

    class Raised(RayError):
        def __str__(self):
            return text

    assert worker_failure(Raised()) == said
    assert worker_failure(ValueError("x: y")) is None  # not Ray's: raised as it is


def test_a_stage_that_cannot_start_on_a_worker_stops_the_run_with_one_line(ray_cluster, tmp_path):
    """The model is not where a worker looks (a path only the driver's disk has): the actors'
    constructors fail, and the driver got Ray's ActorDiedError, a page of traceback naming no
    option. It is a ClusterError (one line, exit 2) saying the worker's own error."""
    from camface.batch.cluster import ClusterError, plan
    from camface.batch.inputs import Video
    from camface.batch.pipeline import BatchJob, run
    from camface.batch.segments import Unit
    from camface.batch.state import Outputs
    from camface.realtime.config import LiveConfig

    clip = tmp_path / "v.mp4"
    clip.write_bytes(b"x")
    missing = tmp_path / "elsewhere" / "g.onnx"
    job = BatchJob((Video(str(clip), "v-0123abcd"),), str(tmp_path / "out"),
                   LiveConfig(model=missing, method="gradcam", device="cpu"))
    outputs = Outputs(job.out_dir)
    outputs.make()
    with pytest.raises(ClusterError, match=rf"^a Ray worker failed: ModelError: CAM graph not found: {missing};"):
        run(job, plan({"CPU": 2}, graph_gpus=0, videos=1), [Unit("v-0123abcd", str(clip))], outputs, ("x",), False)
    assert outputs.records() == {}


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_ctrl_c_that_ray_turns_into_an_error_of_its_own_still_interrupts_the_run(tmp_path, monkeypatch, signum):
    """Ray's iterator may catch the KeyboardInterrupt (or Terminated) raised in it and raise a
    Ray error instead: the run is interrupted (exit 130, or 143 for SIGTERM, with a summary),
    not failed as a worker's error."""
    import os
    import signal

    from ray.exceptions import RayError

    from camface.batch import pipeline
    from camface.batch.cluster import plan
    from camface.batch.inputs import Video
    from camface.batch.segments import Unit
    from camface.batch.state import Outputs
    from camface.realtime.config import LiveConfig

    class Rows:
        def iter_rows(self):
            try:
                os.kill(os.getpid(), getattr(signal, signum))
                pytest.fail("no signal")
            except BaseException as exc:  # KeyboardInterrupt, Terminated
                raise RayError(f"the streaming executor stopped: {type(exc).__name__}") from exc
            yield {}

    monkeypatch.setattr(pipeline, "build_dataset", lambda *args: Rows())
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest runs as a background job
    outputs = Outputs(tmp_path / "out")
    outputs.make()
    job = pipeline.BatchJob((Video(str(tmp_path / "v.mp4"), "v"),), str(outputs.root), LiveConfig(model=tmp_path))
    result = pipeline.run(job, plan({"CPU": 2}), [Unit("v", str(tmp_path / "v.mp4"))], outputs, ("x",), False)
    assert result.interrupted and result.terminated == (signum == "SIGTERM") and result.finished == []
    assert signal.getsignal(signal.SIGINT) is before  # put back


@pytest.mark.parametrize("segmented", [False, True])
def test_a_video_that_kills_its_worker_fails_alone_and_a_resume_goes_on(ray_cluster, clips, tmp_path, capfd,
                                                                         caplog, segmented):
    """A decoder crash or the OOM killer ends the worker's process on one video: Ray Data retried
    it without end and the run hung. Now it is tried again (then alone on its actor), then that video
    (or segment) is failed with the reason, the others are done, and --resume does only it."""
    import os
    import signal
    import threading

    from camface.batch import pipeline, stages
    from camface.batch.inputs import video_id

    folder, paths = clips
    crashing = video_id(paths[1].resolve())
    segment = 1 if segmented else 0

    class Crashing(stages.Whole):  # defined here: Ray pickles it by value into the workers
        def __call__(self, row):
            if row["video"] == crashing and row["segment"] == segment:
                os._exit(1)
            return super().__call__(row)

    out = tmp_path / "out"
    argv = [*paths, "-o", out, "--device", "cpu", "--graph-gpus", "0", "--no-progress", "--no-record",
            "--segment-frames", "4" if segmented else "0"]
    hung = threading.Timer(240, os.kill, (os.getpid(), signal.SIGINT))  # a hang fails (exit 130), not waits
    hung.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pipeline, "Whole", Crashing)
            code = batch(argv)
    finally:
        hung.cancel()
    err = capfd.readouterr().err
    assert code == 1, err
    summary = json.loads((out / "summary.json").read_text())
    status = {r["video"]: r["status"] for r in summary["videos"]}
    assert status == {video_id(p.resolve()): "failed" if p == paths[1] else "done" for p in paths}
    failed = next(r for r in summary["videos"] if r["video"] == crashing)
    assert failed["reason"].startswith("its worker process died each of the 3 times it was tried")
    assert f"camface batch: failed: {paths[1]}: its worker process died" in err
    assert "Traceback" not in err
    if segmented:
        assert f"{paths[1]} segment 2 of 3 (frames 3-6) failed: its worker process died" in caplog.text
    capfd.readouterr()
    assert batch([*argv, "--resume"]) == 0  # the crash is gone: only that video is done again
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["videos_this_run"] == [crashing]
    assert summary["run"]["units_run"] == (3 if segmented else 1)


STARTUP_DRIVER = """
import os, signal, sys, time
import ray
from camface.batch import cluster
from camface.cli import main
where, signum = sys.argv[1], getattr(signal, sys.argv[2])

def connect(address):  # the signal comes while Ray starts
    os.kill(os.getpid(), signum)
    time.sleep(60)

def init(*args, **kwargs):  # as ray.init does first: SIGTERM exits through its own handler
    signal.signal(signal.SIGTERM, lambda received, frame: sys.exit(received))
    os.kill(os.getpid(), signum)
    time.sleep(60)

if where == "connect":
    cluster.connect = connect
else:
    ray.init = init
sys.exit(main(["batch", *sys.argv[3:]]))
"""


@pytest.mark.parametrize("where, signum, code", [("connect", "SIGINT", 130), ("connect", "SIGTERM", 143),
                                                  ("ray.init", "SIGINT", 130), ("ray.init", "SIGTERM", 143)])
def test_ctrl_c_or_sigterm_while_ray_starts_releases_the_output_folder(clips, tmp_path, where, signum, code):
    """SIGTERM's default ended the driver holding OUT_DIR (and ray.init's handler exited 15): the
    next run waited, saying the earlier one "ended without releasing". Now both release it and
    exit 130 / 143, and write the summary an interrupt later writes (none was written while Ray
    started): interrupted, nothing done in this run."""
    import subprocess
    import sys

    from camface.batch.owner import OWNER_NAME, RunLock

    folder, paths = clips
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", STARTUP_DRIVER, where, signum, str(paths[0]), "-o", str(out),
                          "--device", "cpu", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert run.returncode == code, run.stderr
    assert "camface batch: interrupted; rerun with --resume to finish the 1 video(s) left" in run.stderr
    assert "0 of 1 videos done" in run.stderr and "Ray start not finished" in run.stderr
    assert "Traceback" not in run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["interrupted"] and summary["run"]["videos_this_run"] == []
    assert summary["run"]["units_run"] == summary["run"]["frames_this_run"] == 0
    assert summary["totals"] == {"videos": 1, "done": 0, "failed": 0, "not_finished": 1, "incomplete": 0,
                                 "frames": 0, "faces": 0}
    assert [(r["path"], r["status"]) for r in summary["videos"]] == [(str(paths[0].resolve()), "not finished")]
    assert (out / "report.md").is_file()
    assert json.loads((out / OWNER_NAME).read_text())["token"] is None
    lock = RunLock(out).acquire()
    assert lock.earlier is None  # the next run does not wait for the workers of a killed one
    lock.release()
