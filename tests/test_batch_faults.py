"""`camface batch` and what goes wrong around it: videos cut short (reported as incomplete, on
the driver, in summary.json / report.md and by the exit code), and a driver killed while its
Ray workers are still busy (OUT_DIR is locked by one run; workers of a dead run stop and never
publish a file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_batch import batch

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
