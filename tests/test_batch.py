"""`camface batch` on Ray: outputs equal `camface live`, order, faults, resume, placement.

One Ray for the whole session (`ray_cluster`, in conftest.py): a two-node cluster on this
machine, the head with 2 CPUs and a node with one (advertised) GPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.realtime_helpers import count_frames, sigint_as_from_a_terminal, write_clip

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

CLIP_FRAMES = 10


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three small clips of the sample's moving faces (different parts of it) and one corrupt file."""
    from camface.realtime.sample import SampleSource

    folder = tmp_path_factory.mktemp("archive")
    sample = SampleSource(frames=3 * CLIP_FRAMES, size=(320, 240))
    paths = [write_clip(folder / f"clip{k}.mp4", [sample.frame(k * CLIP_FRAMES + i) for i in range(CLIP_FRAMES)])
             for k in range(3)]
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return folder, paths


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """A clip long enough to be still in work when the first short one comes back."""
    from camface.realtime.sample import SampleSource

    sample = SampleSource(frames=120, size=(320, 240))
    return write_clip(tmp_path_factory.mktemp("long") / "long.mp4", [sample.frame(i) for i in range(120)])


def batch(argv, on_video=None):
    """Exit code of `camface batch argv` (through the CLI, so errors print and return 2);
    on_video: called on the driver as each video finishes."""
    from camface.batch import cli as batch_cli
    from camface.cli import main

    if on_video is None:
        return main(["batch", *map(str, argv)])
    real = batch_cli.main
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_cli, "main", lambda args: real(args, on_video=on_video))
        return main(["batch", *map(str, argv)])


def live_results(clip, folder, *extra):
    """Every FrameResult `camface live --source clip` hands its writer, in order, and its recording."""
    from camface.cli import main
    from camface.realtime.recorder import Recorder

    seen = []
    handle = Recorder.handle

    def capture(self, item):
        seen.append(item.explained.result)
        handle(self, item)

    recording = folder / f"live-{clip.stem}{'-'.join(('', *extra)).replace('/', '_')}.mp4"  # a flag may be a path
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Recorder, "handle", capture)
        assert main(["live", "--source", str(clip), "--no-show", "--device", "cpu", "--record", str(recording),
                     *extra]) == 0
    return seen, recording


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """live(clip, *flags) -> `live_results`, each computed once per module."""
    folder, cache = tmp_path_factory.mktemp("live"), {}

    def results(clip, *extra):
        if (clip, extra) not in cache:
            cache[clip, extra] = live_results(clip, folder, *extra)
        return cache[clip, extra]

    return results


def drawn(clip, results):
    """The frames of `clip` with `results` drawn as batch draws them (no HUD), uint8 BGR."""
    from camface.realtime.config import DEFAULTS
    from camface.realtime.render import Renderer
    from camface.realtime.sources import VideoFileSource

    renderer = Renderer(DEFAULTS["colormap"], DEFAULTS["alpha"], False, False)
    with VideoFileSource(clip) as source:
        frames = list(source)
    for frame, result in zip(frames, results):
        renderer.annotate(frame, result, hud=False)
    return frames


def decoded(path):
    from camface.realtime.sources import VideoFileSource

    with VideoFileSource(path) as source:
        return list(source)


def rows_of(out, video_id):
    return pq.read_table(out / "rows" / f"{video_id}.parquet")


MODES = {  # name: (camface batch flags, camface live flags)
    "whole videos": ((), ()),
    "segments": (("--segment-frames", "4"), ()),  # 10 frames: 0-3, 4-6, 7-9 (near-equal pieces)
    "smoothing": (("--smooth", "0.6"), ("--smooth", "0.6")),
    # key frames 0, 3, 6, 9: segments 4-6 and 7-9 start between them (decoded from 3 and 6)
    "segments, detect every 3": (("--segment-frames", "4", "--detect-every", "3"), ("--detect-every", "3")),
    "every frame": (("--detect-every", "1"), ("--detect-every", "1")),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_outputs_equal_live_order_kept_and_corrupt_reported(ray_cluster, clips, live, tmp_path, mode):
    from camface.batch.rows import heatmaps_of
    from camface.batch.inputs import video_id

    folder, paths = clips
    batch_flags, live_flags = MODES[mode]
    out = tmp_path / "out"
    code = batch([folder, "-o", out, "--device", "cpu", "--graph-gpus", "0", "--no-progress", *batch_flags])
    assert code == 1  # one video failed
    summary = json.loads((out / "summary.json").read_text())
    names = [r["path"].rsplit("/", 1)[1] for r in summary["videos"]]
    assert names == ["broken.mp4", "clip0.mp4", "clip1.mp4", "clip2.mp4"]  # input order
    assert summary["run"]["videos_this_run"] == [r["video"] for r in summary["videos"]]  # came back in order
    broken = summary["videos"][0]
    assert broken["status"] == "failed" and "broken.mp4" in broken["reason"]
    assert summary["totals"] == {**summary["totals"], "videos": 4, "done": 3, "failed": 1}
    assert "broken.mp4" in (out / "report.md").read_text()
    faces_by_class = {}
    for clip in paths:
        vid = video_id(clip.resolve())
        table = rows_of(out, vid)
        results, recording = live(clip, *live_flags)
        assert len(results) == CLIP_FRAMES
        expected = [(r.index, rank, face, p) for r in results
                    for rank, (face, p) in enumerate(zip(r.faces, r.predictions))]
        assert table.num_rows == len(expected) > 0
        assert table.column("frame").to_pylist() == [e[0] for e in expected]  # frame order, none lost or twice
        assert table.column("face").to_pylist() == [e[1] for e in expected]
        assert table.column("box").to_pylist() == [list(e[2].box) for e in expected]
        assert table.column("crop_box").to_pylist() == [list(e[2].crop_box) for e in expected]
        np.testing.assert_allclose(table.column("score").to_numpy(), [e[2].score for e in expected], rtol=1e-6)
        probs = np.array(table.column("probs").to_pylist(), np.float32)
        np.testing.assert_allclose(probs, np.stack([e[3].probs for e in expected]), rtol=1e-5, atol=1e-6)
        heat = heatmaps_of(table)
        np.testing.assert_allclose(heat, np.stack([e[3].heatmap for e in expected]), rtol=1e-5, atol=1e-6)
        assert table.column("predicted").to_pylist() == [e[3].predicted for e in expected]
        assert table.column("explained").to_pylist() == [e[3].explained for e in expected]
        np.testing.assert_allclose(table.column("heatmap_peak").to_numpy(), heat.reshape(len(heat), -1).max(axis=1))
        np.testing.assert_allclose(table.column("timestamp_s").to_numpy(), table.column("frame").to_numpy() / 30.0)
        assert table.column("track_id").to_pylist() == [e[2].track_id for e in expected]
        assert count_frames(out / "videos" / f"{vid}.mp4") == count_frames(recording) == CLIP_FRAMES
        record = next(r for r in summary["videos"] if r["video"] == vid)
        assert record.get("segments", 1) == (3 if mode.startswith("segments") else 1)
        # the annotated video: live's results drawn on the clip, frame by frame (H.264 is lossy)
        want, got = drawn(clip, results), decoded(out / "videos" / f"{vid}.mp4")
        assert len(got) == len(want)
        errors = np.array([[np.abs(a.astype(np.int16) - b).mean() for a in want] for b in got])
        assert errors.diagonal().max() < 8  # the codec's loss (about 2-6 grey levels here)
        assert list(errors.argmin(axis=1)) == list(range(len(got)))  # each frame nearest its own: in order
        for e in expected:
            faces_by_class.setdefault(e[3].explained, []).append(e[3])
    # the report's mean heatmap per class: the mean of the display-normalised heatmaps of live's faces
    from camface.methods import normalize

    labels = summary["labels"]
    for k, predictions in faces_by_class.items():
        entry = summary["classes"][labels[k]]
        assert entry["faces"] == len(predictions)
        mean = np.mean([normalize(p.heatmap, p.method) for p in predictions], axis=0)
        np.testing.assert_allclose(entry["mean_heatmap"], mean, atol=1e-4)
        assert (out / entry["picture"]).is_file()
    assert not (out / "parts").exists()  # joined parts are removed


def test_interrupted_then_resume_does_nothing_twice(ray_cluster, clips, long_clip, tmp_path):
    folder, paths = clips
    out = tmp_path / "out"
    argv = [paths[0], long_clip, paths[1], "-o", out, "--device", "cpu", "--no-progress", "--detect-actors", "1"]

    def stop_after_first(record):
        raise KeyboardInterrupt

    assert batch(argv, on_video=stop_after_first) == 130
    first = json.loads((out / "summary.json").read_text())
    assert first["run"]["interrupted"] and first["videos"][0]["status"] == "done"
    # Actors may have finished more videos before the pipeline stopped. Make the run look like
    # one SIGKILLed while the others were in work: their records (written last) are gone,
    # their rows and videos (renamed into place before) stay, and a partial file lies about.
    first_id = first["videos"][0]["video"]
    for record in first["videos"][1:]:
        (out / "state" / f"{record['video']}.json").unlink(missing_ok=True)
    done = [first_id]
    stamps = {first_id: (out / "state" / f"{first_id}.json").stat().st_mtime_ns}
    (out / "rows" / ".long-0123abcd.1234abcd.tmp.parquet").write_bytes(b"half")
    assert batch(argv) == 2  # without --resume the folder is refused
    assert batch([*argv, "--resume"]) == 0
    second = json.loads((out / "summary.json").read_text())
    redone = second["run"]["videos_this_run"]
    assert set(redone).isdisjoint(done) and sorted(redone + done) == sorted(r["video"] for r in second["videos"])
    assert {v: (out / "state" / f"{v}.json").stat().st_mtime_ns for v in done} == stamps
    assert not list((out / "rows").glob(".*")) and not list((out / "videos").glob(".*"))
    for record in second["videos"]:
        table = rows_of(out, record["video"])
        assert table.num_rows == record["faces_total"]
        keys = list(zip(table.column("frame").to_pylist(), table.column("face").to_pylist()))
        assert len(set(keys)) == len(keys)  # no duplicate rows
    assert batch([*argv, "--resume"]) == 0  # all done: nothing to redo
    assert json.loads((out / "summary.json").read_text())["run"]["videos_this_run"] == []


@pytest.mark.parametrize("inputs, keys", [(["archive/**/*.mp4"], ["archive/day1/clip.mp4", "archive/day2/clip.mp4"]),
                                          (["archive/day1", "archive/day2"], ["day1/clip.mp4", "day2/clip.mp4"])])
def test_an_archive_moved_elsewhere_resumes_without_redoing_anything(ray_cluster, clips, tmp_path, inputs, keys):
    """Ids hashed the absolute path: the archive's folder moved (OUT_DIR and the model with it)
    and resumed there, every video was done again under new ids, its rows beside the earlier
    ones. Now nothing is redone (the model is known by its bytes, not its path), OUT_DIR holds one
    record and one table per video, and the summary names the videos and their outputs where they
    are now (the outputs from OUT_DIR). Rows and records say where the file was when it was explained, and the key (the path
    from the folder above the input) that a move keeps. day1/ and day2/ hold the same file name."""
    import shutil

    from camface.models import EMOTION_ONNX

    folder, paths = clips
    for day, clip in (("day1", paths[0]), ("day2", paths[1])):
        (tmp_path / "site" / "archive" / day).mkdir(parents=True)
        shutil.copy2(clip, tmp_path / "site" / "archive" / day / "clip.mp4")
    shutil.copy2(EMOTION_ONNX, tmp_path / "site" / "model.onnx")
    flags = ["--device", "cpu", "--graph-gpus", "0", "--no-progress", "--no-record"]

    def run(site, *extra):
        assert batch([*(site / spec for spec in inputs), "-o", site / "out", "--model", site / "model.onnx", *flags,
                      *extra]) == 0
        return json.loads((site / "out" / "summary.json").read_text())

    first = run(tmp_path / "site")
    ids = [r["video"] for r in first["videos"]]
    assert len(set(ids)) == 2 and sorted(first["run"]["videos_this_run"]) == sorted(ids)
    old_rows = tmp_path / "site" / "out" / "rows" / f"{min(ids)}.parquet"  # read first: its columns are the folder's
    pq.write_table(pq.read_table(old_rows).drop_columns(["key"]), old_rows)  # as a camface before keys wrote it
    shutil.move(tmp_path / "site", tmp_path / "moved")
    out = tmp_path / "moved" / "out"
    second = run(tmp_path / "moved", "--resume")
    assert second["run"]["videos_this_run"] == [] and [r["video"] for r in second["videos"]] == ids
    was, now = ([str(tmp_path / site / "archive" / day / "clip.mp4") for day in ("day1", "day2")]
                for site in ("site", "moved"))
    assert [r["path"] for r in second["videos"]] == now and [r["key"] for r in second["videos"]] == keys
    assert [r["rows_file"] for r in second["videos"]] == [f"rows/{v}.parquet" for v in ids]  # from OUT_DIR
    assert sorted(p.stem for p in (out / "state").glob("*.json")) == sorted(ids)
    assert sorted(p.stem for p in (out / "rows").glob("*.parquet")) == sorted(ids)
    assert second["totals"]["faces"] == first["totals"]["faces"] > 0
    for record, path, key in zip(second["videos"], was, keys):
        rows = rows_of(out, record["video"])
        assert rows.num_rows == record["faces_total"]
        assert set(rows.column("key").to_pylist()) == {key} and set(rows.column("path").to_pylist()) == {path}
        written = json.loads((out / "state" / f"{record['video']}.json").read_text())
        assert written["key"] == key and written["rows_file"] == f"rows/{record['video']}.parquet"  # from OUT_DIR
        assert (out / written["rows_file"]).is_file()
    import pyarrow.dataset as ds

    folder = ds.dataset(out / "rows").to_table()  # the folder as one table: every row has its key
    assert sorted(set(zip(folder.column("video").to_pylist(), folder.column("key").to_pylist()))) == \
        sorted(zip([r["video"] for r in second["videos"]], keys))


def test_a_half_done_segmented_video_resumes_under_its_earlier_id_after_a_move(ray_cluster, long_clip, tmp_path):
    """A camface whose ids hashed the absolute path cut a video into segments and was killed
    before joining them; the archive (with OUT_DIR and the model) was moved and resumed. The
    video started again under its new id from scratch, its earlier parts left in OUT_DIR/parts/
    for good. Now it goes on under its earlier id: only the missing segment runs, and the joined
    rows all say where the video is now, with its key."""
    import hashlib
    import shutil

    from camface.batch import inputs, pipeline
    from camface.models import EMOTION_ONNX

    clip = tmp_path / "site" / "archive" / "long.mp4"
    clip.parent.mkdir(parents=True)
    shutil.copy2(long_clip, clip)
    shutil.copy2(EMOTION_ONNX, tmp_path / "site" / "model.onnx")
    old = f"long-{hashlib.sha1(str(clip).encode()).hexdigest()[:8]}"

    def argv(site):
        return [site / "archive", "-o", site / "out", "--model", site / "model.onnx", "--device", "cpu",
                "--graph-gpus", "0", "--no-progress", "--no-record", "--segment-frames", "40"]  # 3 segments

    def killed(*args, **kwargs):  # the driver dies when the last segment is back, before joining
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inputs, "video_id", lambda path, key=None: f"{path.stem}-"
                      f"{hashlib.sha1(str(path).encode()).hexdigest()[:8]}")  # as the earlier camface
        patch.setattr(pipeline, "finish", killed)
        assert batch(argv(tmp_path / "site")) == 130
    parts = tmp_path / "moved" / "out" / "parts" / old
    (tmp_path / "site" / "out" / "parts" / old / "00001-40-80.json").unlink()  # segment 1 was still in work
    shutil.move(tmp_path / "site", tmp_path / "moved")
    assert sorted(p.name for p in parts.glob("0*.json")) == ["00000-0-40.json", "00002-80-end.json"]
    assert batch([*argv(tmp_path / "moved"), "--resume"]) == 0
    summary = json.loads((tmp_path / "moved" / "out" / "summary.json").read_text())
    assert summary["run"]["units_run"] == 1 and summary["run"]["frames_this_run"] == 40
    (record,) = summary["videos"]
    assert record["video"] == old and record["status"] == "done" and record["segments"] == 3
    assert not (tmp_path / "moved" / "out" / "parts").exists()
    out = tmp_path / "moved" / "out"
    assert [p.name for p in (out / "state").glob("*.json")] == [f"{old}.json"]
    rows = rows_of(out, old)
    assert rows.num_rows == record["faces_total"] > 0 and sorted(set(rows.column("frame").to_pylist()))[-1] >= 80
    assert set(rows.column("path").to_pylist()) == {str(tmp_path / "moved" / "archive" / "long.mp4")}
    assert set(rows.column("key").to_pylist()) == {"archive/long.mp4"} and record["key"] == "archive/long.mp4"


def test_sigterm_stops_the_run_as_ctrl_c_does_with_a_summary(ray_cluster, clips, tmp_path, capfd):
    """`ray job stop`, a scheduler's time limit: SIGTERM says what finished, writes the summary
    and exits 143 (Ray's own handler would exit 15 at once, saying nothing)."""
    import os
    import signal

    folder, paths = clips
    out = tmp_path / "out"
    argv = [paths[0], paths[1], "-o", out, "--device", "cpu", "--graph-gpus", "0", "--no-progress", "--no-record",
            "--detect-actors", "1"]
    handler = signal.getsignal(signal.SIGTERM)

    def terminate(record):
        os.kill(os.getpid(), signal.SIGTERM)

    assert batch(argv, on_video=terminate) == 143
    assert "interrupted; rerun with --resume" in capfd.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["interrupted"] and summary["videos"][0]["status"] == "done"
    assert signal.getsignal(signal.SIGTERM) is handler  # the driver's handler is back
    assert batch([*argv, "--resume"]) == 0


def test_resume_with_other_options_does_the_videos_again(ray_cluster, clips, tmp_path, capfd):
    """A video done with other options (here the heatmap method and drawing) is not kept: the
    report would describe rows, pictures and videos of another method."""
    from camface.batch.inputs import stamp, video_id

    folder, paths = clips
    out, vid = tmp_path / "out", video_id(paths[0].resolve())
    argv = [paths[0], "-o", out, "--device", "cpu", "--graph-gpus", "0", "--no-progress"]
    assert batch([*argv, "--method", "gradcam"]) == 0
    assert (out / "videos" / f"{vid}.mp4").is_file()
    assert json.loads((out / "state" / f"{vid}.json").read_text())["source"] == stamp(paths[0])  # the file read
    assert batch([*argv, "--method", "gradcam", "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["run"]["videos_this_run"] == []  # same options: kept
    capfd.readouterr()
    assert batch([*argv, "--method", "none", "--no-record", "--resume"]) == 0
    assert "videos done with other options (method, record) are done again" in capfd.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["videos_this_run"] == [vid] and summary["method"] == "none"
    assert set(rows_of(out, vid).column("method").to_pylist()) == {"none"}
    assert not (out / "videos" / f"{vid}.mp4").exists()  # the gradcam drawing is gone with its options


def test_segments_killed_before_joining_then_resume_runs_only_what_is_missing(ray_cluster, long_clip, tmp_path):
    from camface.batch import pipeline
    from camface.batch.inputs import video_id

    vid = video_id(long_clip.resolve())
    flags = ["--device", "cpu", "--graph-gpus", "0", "--no-progress"]
    argv = [long_clip, "-o", tmp_path / "out", *flags, "--segment-frames", "40"]  # 120 frames: 3 segments

    def killed(*args, **kwargs):  # the driver dies when the last segment is back, before joining
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "finish", killed)
        assert batch(argv) == 130
    parts = tmp_path / "out" / "parts" / vid
    assert sorted(p.name for p in parts.glob("0*.json")) == ["00000-0-40.json", "00001-40-80.json",
                                                            "00002-80-end.json"]
    (parts / "00001-40-80.json").unlink()  # as if segment 1 was still in work
    (parts / ".00001-40-80.0123abcd.tmp.parquet").write_bytes(b"half")
    assert not (tmp_path / "out" / "state" / f"{vid}.json").exists()
    assert batch(argv) == 2  # unjoined parts: without --resume the folder is refused
    assert batch([*argv, "--resume"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["run"]["units_run"] == 1  # segments 0 and 2 were not done again
    assert summary["run"]["frames_this_run"] == 40
    assert summary["videos"][0]["status"] == "done" and summary["videos"][0]["segments"] == 3
    assert not parts.exists()
    # the same rows as the video in one piece
    assert batch([long_clip, "-o", tmp_path / "whole", *flags, "--segment-frames", "0"]) == 0
    joined, whole = rows_of(tmp_path / "out", vid), rows_of(tmp_path / "whole", vid)
    assert joined.num_rows == whole.num_rows == summary["videos"][0]["faces_total"] > 0
    for column in ("frame", "face", "box", "predicted", "explained"):
        assert joined.column(column).to_pylist() == whole.column(column).to_pylist()
    np.testing.assert_allclose(np.array(joined.column("probs").to_pylist()),
                               np.array(whole.column("probs").to_pylist()), rtol=1e-5, atol=1e-6)
    assert count_frames(tmp_path / "out" / "videos" / f"{vid}.mp4") == 120


def test_parts_of_a_killed_run_go_when_the_resume_does_the_video_whole(ray_cluster, clips, tmp_path):
    """Under other options a resume does a video in one piece: the killed run's parts (and its
    saved split) are garbage then, not kept forever in OUT_DIR/parts/."""
    from camface.batch import pipeline

    folder, paths = clips
    out = tmp_path / "out"
    argv = [paths[0], "-o", out, "--device", "cpu", "--graph-gpus", "0", "--no-progress", "--no-record"]

    def killed(*args, **kwargs):  # the driver dies when the last segment is back, before joining
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "finish", killed)
        assert batch([*argv, "--segment-frames", "4"]) == 130
    assert len(list((out / "parts").glob("*/0*.json"))) == 3
    assert batch([*argv, "--segment-frames", "0", "--method", "none", "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["videos"][0]["status"] == "done" and "segments" not in summary["videos"][0]
    assert not (out / "parts").exists()


def test_parts_left_beside_a_joined_video_go_at_the_next_run(ray_cluster, clips, tmp_path):
    """The driver died after writing a segmented video's record, before removing its parts (or
    the removal failed): they stayed in OUT_DIR/parts/ for good. The next run removes them;
    parts cut under other options (a resume under those goes on from them) stay."""
    from camface.batch import segments
    from camface.batch.inputs import video_id

    folder, paths = clips
    out = tmp_path / "out"
    argv = [paths[0], paths[1], "-o", out, "--device", "cpu", "--graph-gpus", "0", "--no-progress", "--no-record",
            "--segment-frames", "4"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segments, "drop_parts", lambda outputs, video: None)  # the removal failed
        assert batch(argv) == 0
    done, other = (video_id(path.resolve()) for path in paths[:2])
    assert sorted(p.name for p in (out / "parts").iterdir()) == sorted([done, other])
    for saved in (out / "parts" / other).glob("[!.]*.json"):  # as a run killed under other options left them
        value = json.loads(saved.read_text())
        value["settings"]["method"] = "none"
        saved.write_text(json.dumps(value))
    assert batch([*argv, "--resume"]) == 0
    assert [p.name for p in (out / "parts").iterdir()] == [other]
    assert len(list((out / "parts" / other).glob("0*.json"))) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["videos_this_run"] == [] and [r["status"] for r in summary["videos"]] == ["done"] * 2


def test_a_run_killed_before_any_segment_finished_leaves_the_folder_new(ray_cluster, clips, tmp_path):
    """A run killed after it cut a video into segments, before any of them finished, left
    parts/<id>/split.json: every later run without --resume was refused ("holds the outputs of an
    earlier run"), though nothing was done to resume. Such a run starts as in a new folder, the
    leftovers gone; with a finished segment --resume is still asked for."""
    from camface.batch import pipeline
    from camface.batch.inputs import video_id

    folder, paths = clips
    out, vid = tmp_path / "out", video_id(paths[0].resolve())
    argv = [paths[0], "-o", out, "--device", "cpu", "--graph-gpus", "0", "--no-progress", "--no-record",
            "--segment-frames", "4"]

    def killed(*args, **kwargs):  # before any segment came back
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "run", killed)
        assert batch(argv) == 130
    assert [p.name for p in (out / "parts" / vid).iterdir()] == ["split.json"]
    (out / "parts" / vid / "00000-0-4.parquet").write_bytes(b"renamed into place, its record never written")
    gone = [out / "rows" / "gone-0123abcd.parquet", out / "videos" / "gone-0123abcd.mp4"]  # of another video,
    for path in gone:  # whole, not segmented: renamed into place, its record never written
        path.write_bytes(b"unrecorded")
    assert batch(argv) == 0
    assert not any(path.exists() for path in gone)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["videos_this_run"] == [vid] and summary["run"]["units_run"] == 3
    assert summary["videos"][0]["status"] == "done" and summary["videos"][0]["segments"] == 3
    assert not (out / "parts").exists() and rows_of(out, vid).num_rows == summary["videos"][0]["faces_total"] > 0


def test_graph_actors_on_the_gpu_node_detection_on_the_other(ray_cluster, clips, tmp_path):
    folder, paths = clips
    out = tmp_path / "out"
    assert batch([paths[0], "-o", out, "--device", "cpu", "--no-progress", "--no-record"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "1 GPU each" in summary["run"]["plan"]
    record = summary["videos"][0]
    assert record["graph_node"] == ray_cluster["gpu"]
    assert record["detect_node"] == record["render_node"] == ray_cluster["head"]
    assert record["provider"] == "CPUExecutionProvider"


def test_a_swin_graph_from_a_pt2_saved_at_a_fixed_batch_runs_as_live_runs_it(ray_cluster, clips, live, tmp_path):
    """A Swin saved with torch.export at a batch of 1 failed to export (inside torch, at aten.view:
    tests/test_pt2_fixed_batch.py), so batch never had its graph. Exported, its rows on Ray hold
    what `camface live` gives with the same graph: probabilities and token-grid heatmaps."""
    from camface.batch.inputs import video_id
    from camface.batch.rows import heatmaps_of
    from camface.cli import main

    torch = pytest.importorskip("torch")
    from tests.test_onnx_export_models import SIZE, Swin

    torch.manual_seed(0)
    program = tmp_path / "swin.pt2"
    torch.export.save(torch.export.export(Swin(tokens=True).eval(), (torch.zeros(1, 3, SIZE, SIZE),)), str(program))
    graph = tmp_path / "swin.onnx"
    assert main(["export", str(program), "-o", str(graph), "--preset", "unit", "--heads", "gradcam",
                 "--no-rank"]) == 0
    _, paths = clips
    out = tmp_path / "out"
    flags = ("--model", str(graph), "--method", "gradcam")
    assert batch([paths[0], "-o", out, "--device", "cpu", "--graph-gpus", "0", "--no-progress", *flags]) == 0
    table = rows_of(out, video_id(paths[0].resolve()))
    results, _ = live(paths[0], *flags)
    expected = [p for r in results for p in r.predictions]
    assert table.num_rows == len(expected) > 0
    np.testing.assert_allclose(np.array(table.column("probs").to_pylist(), np.float32),
                               np.stack([p.probs for p in expected]), rtol=1e-5, atol=1e-6)
    heat = heatmaps_of(table)
    assert heat.shape[1:] == (4, 4) and np.abs(heat).max() > 0  # Swin's last stage, 4x4 tokens
    np.testing.assert_allclose(heat, np.stack([p.heatmap for p in expected]), rtol=1e-5, atol=1e-6)


def wait_for(condition, process, timeout=90.0):
    """Poll `condition()` every 20 ms until true (returns True) or `process` ended (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return condition()
        time.sleep(0.02)
    raise AssertionError(f"nothing happened in {timeout} s")


def test_real_ctrl_c_then_sigkill_of_the_driver_then_resume(ray_cluster, clips, tmp_path):
    """The driver as users run it, in its own process, joined to the session's cluster: Ctrl-C
    (SIGINT) after the first video says what finished and exits 130; a SIGKILL in the middle
    of a segmented video leaves parts that the next --resume keeps; nothing is done twice."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from camface.batch.inputs import video_id
    from camface.realtime.sample import SampleSource

    folder, paths = clips
    sample = SampleSource(frames=400, size=(320, 240))
    long_clip = write_clip(tmp_path / "long400.mp4", [sample.frame(i) for i in range(400)])
    out = tmp_path / "out"
    camface = Path(sys.executable).with_name("camface")
    argv = [str(camface), "batch", str(paths[0]), str(long_clip), str(paths[1]), "-o", str(out), "--device", "cpu",
            "--graph-gpus", "0", "--no-progress", "--detect-actors", "1", "--segment-frames", "50",
            "--address", ray_cluster["address"]]
    long_id, first_id = video_id(long_clip.resolve()), video_id(paths[0].resolve())

    def start(*extra):
        return subprocess.Popen([*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=sigint_as_from_a_terminal)

    run = start()
    assert wait_for(lambda: (out / "state" / f"{first_id}.json").exists(), run)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "interrupted; rerun with --resume" in err and "1 of 3 videos done" in err

    run = start("--resume")
    parts = out / "parts" / long_id
    if wait_for(lambda: len(list(parts.glob("0*.json"))) >= 2, run):
        run.kill()  # SIGKILL: no handler runs
    run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL  # killed with the long video in work
    kept = len(list(parts.glob("0*.json")))
    assert not (out / "state" / f"{long_id}.json").exists() and kept >= 2

    run = start("--resume")
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["videos"]] == ["done"] * 3
    assert summary["run"]["units_run"] <= 8 - kept + 1  # the long video's kept segments were not redone
    table = rows_of(out, long_id)
    keys = list(zip(table.column("frame").to_pylist(), table.column("face").to_pylist()))
    assert len(set(keys)) == len(keys) == table.num_rows > 0 and max(k[0] for k in keys) == 399
    assert count_frames(out / "videos" / f"{long_id}.mp4") == 400
    assert not list(out.rglob(".*.tmp*"))


@pytest.mark.parametrize("written_by", ["this camface", "an earlier camface"])
def test_summary_names_outputs_from_out_dir_so_it_holds_after_out_dir_moves(tmp_path, written_by):
    """summary.json named each video's outputs (video_file, rows_file) by absolute path: OUT_DIR
    moved or renamed, it named files in the old place (gone, or another run's) until the next run,
    while its class pictures and the records named theirs from OUT_DIR. They are named from
    OUT_DIR too; a record of an earlier camface (absolute paths) is named so in the summary."""
    import shutil

    from camface.batch.inputs import Video
    from camface.batch.report import write_report
    from camface.batch.state import Outputs

    outputs = Outputs(tmp_path / "site" / "out")
    outputs.make()
    video = Video("/archive/a.mp4", "a-0123abcd")
    _done(outputs, video.id, video.path, [1, 2])
    record = json.loads(outputs.record_path(video.id).read_text())
    named = {"video_file": outputs.video(video.id), "rows_file": outputs.parquet(video.id)}
    for path in named.values():
        path.write_bytes(b"output")
    record.update({name: str(path) if written_by == "an earlier camface" else outputs.relative(path)
                   for name, path in named.items()})
    outputs.record_path(video.id).write_text(json.dumps(record))
    write_report(outputs, [video], ("x", "y"), "BGR", "gradcam", "jet", 0.5, {})
    shutil.move(tmp_path / "site", tmp_path / "moved")
    moved = tmp_path / "moved" / "out"
    (entry,) = json.loads((moved / "summary.json").read_text())["videos"]
    assert (entry["video_file"], entry["rows_file"]) == (f"videos/{video.id}.mp4", f"rows/{video.id}.parquet")
    assert all((moved / entry[name]).is_file() for name in named)
    assert entry["path"] == video.path  # the input's own place: outside OUT_DIR, as it is


def _done(outputs, video_id, path, counts, status="done", reason=None):
    """A video's record and class sums as a finished unit leaves them (2 classes, 8x8 crops)."""
    record = {"video": video_id, "path": path, "status": status, "frames": 3,
              "class_counts": {name: n for name, n in zip(("x", "y"), counts) if n}}
    if reason is not None:
        record["reason"] = reason
    outputs.record_path(video_id).write_text(json.dumps(record))
    if status == "done":
        count = np.array(counts)
        np.savez(outputs.sums_path(video_id), count=count,
                 crop_sum=np.ones((2, 8, 8, 3)) * 100 * count[:, None, None, None],
                 heatmap_sum=np.ones((2, 4, 4)) * count[:, None, None])


def test_the_report_escapes_pipes_and_drops_pictures_of_classes_now_without_faces(tmp_path):
    """A `|` in a video's name or a failure's reason is escaped in report.md's table (it cut the
    row into more cells); a class left with no faces after a resume loses its earlier picture."""
    import re

    from camface.batch.inputs import Video
    from camface.batch.report import write_report
    from camface.batch.state import Outputs

    outputs = Outputs(tmp_path)
    outputs.make()
    videos = [Video("/archive/a|b.mp4", "a|b-0123abcd"), Video("/archive/c.mp4", "c-89abcdef")]
    _done(outputs, videos[0].id, videos[0].path, [1, 2])
    _done(outputs, videos[1].id, videos[1].path, [0, 0], status="failed", reason="moov atom | not found\nat 0")
    args = (outputs, videos, ("x", "y"), "BGR", "gradcam", "jet", 0.5, {})
    summary = write_report(*args)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["00-x.png", "01-y.png"]
    assert [summary["classes"][k].get("picture") for k in ("x", "y")] == ["report/00-x.png", "report/01-y.png"]
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 3  # the header and one row per video (a newline in a reason cut the row)
    cells = [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]
    assert [len(row) for row in cells] == [5, 5, 5]
    assert cells[1][0] == r"a\|b-0123abcd" and cells[2][4] == r"failed: moov atom \| not found at 0"
    _done(outputs, videos[0].id, videos[0].path, [3, 0])  # resumed: class y has no faces now
    summary = write_report(*args)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["00-x.png"]
    assert "picture" not in summary["classes"]["y"] and "01-y.png" not in (tmp_path / "report.md").read_text()


def test_a_stale_picture_of_a_class_numbered_past_99_is_dropped_too(tmp_path):
    """report/<k:02d>-<slug>.png has three digits from class 100 (a gallery of 100+ people): the
    picture of such a class now without faces was kept beside the new report."""
    from camface.batch.inputs import Video
    from camface.batch.report import write_report
    from camface.batch.state import Outputs

    labels = tuple(f"p{k}" for k in range(101))
    outputs = Outputs(tmp_path)
    outputs.make()
    video = Video("/archive/a.mp4", "a-0123abcd")

    def done(counts):
        outputs.record_path(video.id).write_text(json.dumps(
            {"video": video.id, "path": video.path, "status": "done", "frames": 3,
             "class_counts": {labels[k]: n for k, n in counts.items()}}))
        count = np.zeros(len(labels), np.int64)
        for k, n in counts.items():
            count[k] = n
        np.savez(outputs.sums_path(video.id), count=count, crop_sum=np.ones((len(labels), 8, 8, 3)) * 100 *
                 count[:, None, None, None], heatmap_sum=np.ones((len(labels), 4, 4)) * count[:, None, None])

    args = (outputs, [video], labels, "BGR", "gradcam", "jet", 0.5, {})
    done({5: 1, 100: 2})
    write_report(*args)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["05-p5.png", "100-p100.png"]
    done({5: 3})  # resumed: class 100 has no faces now
    write_report(*args)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["05-p5.png"]


def test_a_video_done_earlier_with_other_options_is_not_in_the_report_of_a_resume_stopped_before_it(tmp_path):
    """A --resume with another model or method, stopped (Ctrl-C, a record the full disk refused)
    before a video was done again: the report counted the earlier run's outputs as done under this
    run's options, its class means mixing the two models' heatmaps (and failing when their class
    counts differ). Such a video is not finished, saying why; done alike, it counts."""
    from camface.batch.inputs import Video, stamp
    from camface.batch.report import write_report
    from camface.batch.state import Outputs

    outputs = Outputs(tmp_path / "out")
    outputs.make()
    clips = []
    for name in ("a", "b"):
        (tmp_path / f"{name}.mp4").write_bytes(b"x" * 10)
        clips.append(Video(str(tmp_path / f"{name}.mp4"), f"{name}-0123abcd"))
    earlier = {"model": "/m/emotion.onnx", "method": "gradcam"}
    now = {**earlier, "method": "layercam"}
    _done(outputs, clips[0].id, clips[0].path, [1, 2])  # done again by this run
    _done(outputs, clips[1].id, clips[1].path, [4, 0])  # not yet: the earlier run's outputs
    for video, settings in zip(clips, (now, earlier)):
        record = json.loads(outputs.record_path(video.id).read_text())
        outputs.record_path(video.id).write_text(json.dumps({**record, "settings": settings,
                                                             "source": stamp(video.path)}))
    summary = write_report(outputs, clips, ("x", "y"), "BGR", "layercam", "jet", 0.5, {}, now)
    assert [r["status"] for r in summary["videos"]] == ["done", "not finished"]
    assert summary["videos"][1]["reason"] == "done earlier with other options (method); --resume does it again"
    assert summary["totals"] == {**summary["totals"], "done": 1, "not_finished": 1, "faces": 3, "frames": 3}
    assert [summary["classes"][k]["faces"] for k in ("x", "y")] == [1, 2]  # the earlier heatmaps left out
    assert "done earlier with other options (method)" in (outputs.root / "report.md").read_text()
    # another model with three classes: its sums are not added to two classes' (a ValueError)
    summary = write_report(outputs, clips, ("x", "y", "z"), "BGR", "layercam", "jet", 0.5, {},
                           {**earlier, "model": "/m/other.onnx"})
    assert [r["status"] for r in summary["videos"]] == ["not finished"] * 2 and summary["totals"]["faces"] == 0
    assert summary["videos"][0]["reason"].startswith("done earlier with other options (method, model)")
    (tmp_path / "b.mp4").write_bytes(b"y" * 20)  # replaced since it was read
    summary = write_report(outputs, clips, ("x", "y"), "BGR", "gradcam", "jet", 0.5, {}, earlier)
    assert summary["videos"][1]["reason"] == "done earlier from an earlier version of its file; --resume does it again"
    summary = write_report(outputs, clips[:1], ("x", "y"), "BGR", "layercam", "jet", 0.5, {}, now)
    assert summary["totals"]["done"] == 1 and summary["classes"]["y"]["faces"] == 2
