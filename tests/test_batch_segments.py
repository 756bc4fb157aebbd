"""`camface batch`'s units of work without Ray: the split into segments, reading a frame range,
joining parts, and smoothing computed across frames as the live loop computes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.realtime_helpers import write_clip


def videos(*ids):
    from camface.batch.inputs import Video

    return [Video(f"/archive/{i}.mp4", i) for i in ids]


def covers(units, frames):
    """The units of each video are contiguous, start at 0 and the last runs to the end."""
    by_video = {}
    for unit in units:
        by_video.setdefault(unit.video, []).append(unit)
    for parts, count in zip(by_video.values(), frames):
        assert [u.segment for u in parts] == list(range(len(parts)))
        assert all(u.segments == len(parts) for u in parts)
        assert parts[0].start == 0 and parts[-1].stop is None
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    return {v: len(p) for v, p in by_video.items()}


def test_automatic_split_cuts_only_when_actors_would_idle():
    from camface.batch.segments import MIN_SEGMENT_FRAMES, split

    # one long video, 8 actors: 16 units of 1500 frames
    units, reason = split(videos("long"), [24_000], 8, None, smooth=False)
    assert covers(units, [24_000]) == {"long": 16} and "1 of 1 videos cut" in reason
    assert {u.stop - u.start for u in units[:-1]} == {1500}
    # eight 300-frame clips on 2 actors: whole videos (each is shorter than a segment would be)
    units, reason = split(videos(*"abcdefgh"), [300] * 8, 2, None, smooth=False)
    assert all(u.whole for u in units) and len(units) == 8 and reason.startswith("whole videos")
    # one 400-frame video on 2 actors: two segments would be under the minimum; the reason says so
    units, reason = split(videos("a"), [400], 2, None, smooth=False)
    assert units[0].whole and reason.startswith(f"whole videos (none longer than {2 * MIN_SEGMENT_FRAMES - 1} frames")
    units, reason = split(videos("a"), [400], 2, 500, smooth=False)
    assert units[0].whole and reason.startswith("whole videos (none longer than 500 frames; --segment-frames")
    # never below the minimum, even with many actors
    units, _ = split(videos("a"), [2 * MIN_SEGMENT_FRAMES + 10], 64, None, smooth=False)
    assert covers(units, [0]) == {"a": 2} and units[0].stop - units[0].start >= MIN_SEGMENT_FRAMES
    # three long videos on 2 actors: whole, the third would run alone; halves balance
    units, _ = split(videos("a", "b", "c"), [3000] * 3, 2, None, smooth=False)
    assert covers(units, [3000] * 3) == {"a": 2, "b": 2, "c": 2}
    # a file announcing no frame count stays whole
    units, _ = split(videos("a", "b"), [0, 10_000], 4, None, smooth=False)
    assert units[0].whole and covers(units[1:], [10_000]) == {"b": 8}


def test_explicit_split_whole_videos_and_smoothing():
    from camface.batch.segments import split

    units, _ = split(videos("a", "b"), [10, 3], 2, 4, smooth=False)
    assert [(u.video, u.start, u.stop) for u in units] == [("a", 0, 3), ("a", 3, 7), ("a", 7, None), ("b", 0, None)]
    units, reason = split(videos("a"), [10_000], 2, 0, smooth=False)
    assert units[0].whole and "--segment-frames 0" in reason
    units, reason = split(videos("a"), [10_000], 16, None, smooth=True)
    assert units[0].whole and "--smooth" in reason


def test_unit_survives_a_ray_data_row():
    from camface.batch.segments import Unit

    for unit in (Unit("v", "/p.mp4"), Unit("v", "/p.mp4", 2, 3, 20, None), Unit("v", "/p.mp4", 0, 3, 0, 10)):
        assert Unit.from_row(unit.row()) == unit
    assert Unit("v", "/p.mp4", 1, 3, 10, None).name == "00001-10-end"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from camface.realtime.sample import SampleSource

    sample = SampleSource(frames=40, size=(160, 120))
    return write_clip(tmp_path_factory.mktemp("range") / "clip.mp4", [sample.frame(i) for i in range(40)])


def frames_of(clip, start=0, stop=None):
    from camface.realtime.sources import VideoFileSource

    with VideoFileSource(clip, start, stop) as source:
        return list(source)


def test_frame_ranges_are_exactly_the_frames_of_the_whole_file(clip):
    whole = frames_of(clip)
    assert len(whole) == 40
    for start, stop in ((0, 7), (7, 23), (23, None), (39, None), (13, 14)):
        part = frames_of(clip, start, stop)
        assert len(part) == (stop or 40) - start
        assert all(np.array_equal(a, b) for a, b in zip(part, whole[start:stop]))
    assert frames_of(clip, 45, None) == [] and frames_of(clip, 40, 50) == []  # past the end: none, no error


def test_frame_range_when_the_seek_misses_reads_up_to_it(clip, monkeypatch):
    import cv2

    from camface.realtime import sources

    real = cv2.VideoCapture

    class NoSeek:  # a backend whose seek lands 3 frames late
        def __init__(self, *args):
            self.capture = real(*args)

        def set(self, prop, value):
            return self.capture.set(prop, value + 3 if prop == cv2.CAP_PROP_POS_FRAMES else value)

        def __getattr__(self, name):
            return getattr(self.capture, name)

    whole = frames_of(clip)
    monkeypatch.setattr(sources.cv2, "VideoCapture", NoSeek)
    part = frames_of(clip, 17, 25)
    assert len(part) == 8 and all(np.array_equal(a, b) for a, b in zip(part, whole[17:25]))


def test_bad_frame_range_names_the_file():
    from camface.realtime.sources import VideoFileSource

    with pytest.raises(ValueError, match="clip.mp4"):
        VideoFileSource("clip.mp4", 10, 5)


def test_concatenate_joins_parts_in_order_and_refuses_unlike_parts(tmp_path):
    from camface.batch.segments import concatenate, join_videos
    from camface.realtime.sinks import VideoSink
    from camface.realtime.sources import VideoFileSource

    rng = np.random.default_rng(0)
    frames = [np.full((96, 128, 3), 10 * i, np.uint8) + rng.integers(0, 5, (96, 128, 3), dtype=np.uint8)
              for i in range(12)]
    parts = []
    for k, (a, b) in enumerate(((0, 5), (5, 9), (9, 12))):
        with VideoSink(tmp_path / f"p{k}.mp4", 30.0) as sink:
            for frame in frames[a:b]:
                sink.write(frame)
        parts.append(tmp_path / f"p{k}.mp4")
    concatenate(parts, tmp_path / "all.mp4")
    with VideoFileSource(tmp_path / "all.mp4") as source:
        got = list(source)
        assert source.info.fps == pytest.approx(30.0)
    assert len(got) == 12
    assert [int(round(g.mean() / 10)) for g in got] == list(range(12))  # each frame where it belongs
    with VideoSink(tmp_path / "other.mp4", 30.0) as sink:
        sink.write(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="other.mp4"):
        concatenate([parts[0], tmp_path / "other.mp4"], tmp_path / "bad.mp4")
    join_videos([parts[0], tmp_path / "other.mp4"], tmp_path / "mixed.mp4", 30.0)  # encoded again instead
    with VideoFileSource(tmp_path / "mixed.mp4") as source:
        mixed = list(source)
    assert len(mixed) == 6 and mixed[-1].mean() < 8 and abs(mixed[2].mean() - got[2].mean()) < 3


def test_resume_keeps_a_split_and_parts_only_under_the_same_settings(tmp_path):
    from camface.batch.segments import Unit, done_before, keep_splits, part_paths
    from camface.batch.state import Outputs, write_json

    outputs = Outputs(tmp_path)
    outputs.make()
    settings = {"method": "gradcam", "alpha": 0.5}
    first = [Unit("v", "/v.mp4", k, 3, a, b) for k, (a, b) in enumerate(((0, 100), (100, 200), (200, None)))]
    assert keep_splits(outputs, first, settings) == first  # saved
    later = [Unit("v", "/v.mp4", k, 2, a, b) for k, (a, b) in enumerate(((0, 150), (150, None)))]
    assert keep_splits(outputs, later, settings) == first  # cut as the earlier run cut it
    assert keep_splits(outputs, later, {**settings, "alpha": 0.3}) == later  # other options: cut anew
    paths = part_paths(outputs, first[1])
    write_json(paths["record"], {"status": "done", "settings": settings, "frames": 100})
    assert done_before(outputs, first[1], settings)
    assert not done_before(outputs, first[1], {**settings, "method": "layercam"})
    assert not done_before(outputs, first[0], settings)  # no record
    write_json(paths["record"], {"status": "failed", "settings": settings})
    assert not done_before(outputs, first[1], settings)


def test_resume_redoes_what_was_read_from_a_file_that_changed_since(tmp_path):
    """A cut file copied again whole (or any file replaced) after its video was done: --resume
    does it again, whole or segment by segment; parts read from two versions never join."""
    from camface.batch.inputs import Video, stamp
    from camface.batch.pipeline import changed_since, videos_to_do
    from camface.batch.segments import Unit, done_before, finish, part_paths
    from camface.batch.state import Outputs, write_json

    outputs = Outputs(tmp_path / "out")
    outputs.make()
    settings = {"method": "gradcam"}
    clip = tmp_path / "cut.mp4"
    clip.write_bytes(b"x" * 100)
    video = Video(str(clip), "cut-0123abcd")
    units = [Unit(video.id, video.path, 0, 2, 0, 50), Unit(video.id, video.path, 1, 2, 50, None)]
    read = {"status": "done", "settings": settings, "source": stamp(clip)}
    write_json(outputs.record_path(video.id), read)
    part_paths(outputs, units[1])["record"].parent.mkdir(parents=True)
    write_json(part_paths(outputs, units[1])["record"], read)
    assert videos_to_do(outputs, [video], settings) == [] and done_before(outputs, units[1], settings)
    assert changed_since(outputs, [video], settings) == ([], 0)
    clip.write_bytes(b"x" * 200)  # copied again, whole
    assert videos_to_do(outputs, [video], settings) == [video] and not done_before(outputs, units[1], settings)
    assert changed_since(outputs, [video], settings) == ([], 1)
    assert changed_since(outputs, [video], {"method": "layercam"}) == (["method"], 1)
    write_json(part_paths(outputs, units[0])["record"], {**read, "source": stamp(clip)})  # the new version
    record = finish(outputs, units, ("x",), False)
    assert record["status"] == "failed" and record["reason"] == f"{clip} changed while its segments were explained"


def _render_payload(faces: int, classes: int = 7) -> dict:
    """A Render payload of `faces` frames with one face each, 64x64 grey crops (the bundled graph's)."""
    from camface.realtime.results import Face

    rng = np.random.default_rng(0)
    return {"path": "/archive/v.mp4", "fps": 30.0, "frames": faces, "counts": np.ones(faces, np.int64),
            "faces": [(Face((10, 10, 40, 40), 0.9, (5, 5, 50, 50)),)] * faces, "dropped": [0] * faces,
            "probs": rng.random((faces, classes)).astype(np.float32),
            "heatmaps": rng.random((faces, 8, 8)).astype(np.float32), "class_index": np.full(faces, -1, np.int64),
            "provider": "CPUExecutionProvider", "crops": rng.integers(0, 256, (faces, 64, 64, 1), np.uint8)}


def test_class_sums_of_a_long_video_need_no_float64_copy_of_its_crops(tmp_path):
    """The render stage sums each class's crops for the report: exactly, and without a float64
    copy of every crop of the unit (8x their bytes: 3.5 GB for an hour of one face at 30 fps)."""
    import tracemalloc

    from camface.batch.state import Outputs, write_video_outputs

    outputs, labels = Outputs(tmp_path), tuple("abcdefg")
    outputs.make()
    write_video_outputs(outputs, "warm", _render_payload(4), None, "gradcam", None, labels)  # imports done
    out = _render_payload(2000)
    crops, explained = out["crops"], out["probs"].argmax(axis=1)
    tracemalloc.start()
    try:
        write_video_outputs(outputs, "v", out, None, "gradcam", None, labels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * crops.nbytes  # was 9.5x
    with np.load(outputs.sums_path("v")) as sums:
        np.testing.assert_array_equal(sums["count"], np.bincount(explained, minlength=len(labels)))
        np.testing.assert_array_equal(sums["crop_sum"], [crops[explained == k].astype(np.float64).sum(axis=0)
                                                         for k in range(len(labels))])


def test_settings_name_what_changes_the_boxes():
    """A part made with the other detector runtime, or another detection period, is not kept
    by a resume; `auto` is stored as the period it stands for (4 for videos), so it matches 4."""
    from camface.batch.pipeline import BatchJob
    from camface.realtime.carry import AUTO_EVERY
    from camface.realtime.config import LiveConfig

    def settings(**options):
        return BatchJob((), "out", LiveConfig(model=Path("g.onnx"), **options)).settings()

    assert settings()["detect_every"] == AUTO_EVERY and settings() == settings(detect_every=AUTO_EVERY)
    assert settings() != settings(detect_every=1)
    assert settings(detector_runtime="onnx") != settings(detector_runtime="mediapipe")


# ---------------------------------------------------------------- smoothing across frames


class FlickerGraph:
    """A CAM graph whose top class flickers with the crop's brightness (0 bright, 1 dark), so
    that smoothing explains class 0 on dark frames; heatmaps say which class they explain."""

    def __init__(self):
        from camface.graph_spec import GraphInfo

        self.info = GraphInfo(labels=("a", "b", "c"), input_size=(8, 8), color_order="BGR", target_layer="x",
                              heatmaps=("gradcam",))
        self.methods, self.provider, self.path = ("gradcam",), "CPUExecutionProvider", Path("flicker.onnx")
        self.seen: list[np.ndarray] = []
        self.overridden = 0  # crops explained with a class that is not their top one

    def run(self, crops, class_index, method):
        assert method in ("gradcam", "none")
        self.seen.append(np.array(class_index))
        m = crops.reshape(len(crops), -1).mean(axis=1) / 255.0
        bright = (m > 0.5)[:, None]
        probs = np.where(bright, [0.55, 0.40, 0.05], [0.42, 0.53, 0.05]) + 0.01 * m[:, None]
        probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
        explained = np.where(class_index < 0, probs.argmax(axis=1), class_index)
        self.overridden += int(np.sum(explained != probs.argmax(axis=1)))
        heat = explained[:, None, None] * 10.0 + m[:, None, None] + np.zeros((1, 2, 2))
        return probs, (heat if method != "none" else np.zeros((len(crops), 0, 0))).astype(np.float32)


@pytest.mark.parametrize("method", ["gradcam", "none"])
def test_smoothing_across_frames_equals_the_live_explainer_frame_by_frame(method):
    from camface.realtime.explainer import FrameExplainer, crop_for_graph, frame_result, run_graph_smoothed
    from camface.realtime.results import Face
    from camface.realtime.smooth import Smoother
    from camface.realtime.controls import Controls

    frames, faces = [], []
    for i in range(12):
        frame = np.full((64, 96, 3), 200 if i % 2 == 0 else 40, np.uint8)
        faces.append((Face((8, 8, 24, 24), 0.9),) + ((Face((60, 30, 20, 20), 0.8),) if 3 <= i < 8 else ()))
        frames.append(frame)
    live_graph = FlickerGraph()
    explainer = FrameExplainer(live_graph, margin=0.1, max_faces=8, smooth=0.8)
    live = [explainer.explain(f, d, Controls(method), i).result for i, (f, d) in enumerate(zip(frames, faces))]
    assert live_graph.overridden >= 4  # dark frames explain the smoothed class 0: the case that needs care

    graph = FlickerGraph()
    kept, crops = [], []
    for frame, found in zip(frames, faces):
        k, c, _ = crop_for_graph(frame, found, 0.1, 8, graph.info)
        kept.append(k)
        crops.append(c)
    probs, heat, _, class_index, calls = run_graph_smoothed(graph, np.concatenate(crops), kept, method, 0.8)
    if method == "none":  # no heatmap to compute again, but the classes said are the smoothed ones
        assert calls == 1
    else:
        assert calls == 2 and len(graph.seen[1]) == live_graph.overridden  # only those again
    smoother, start, batch = Smoother(0.8), 0, []
    for i, found in enumerate(kept):
        stop = start + len(found)
        batch.append(smoother.update(frame_result(i, found, probs[start:stop], heat[start:stop],
                                                  class_index[start:stop], 0, method, None, graph.info.labels,
                                                  graph.provider)))
        start = stop
    for a, b in zip(live, batch):
        assert [f.track_id for f in a.faces] == [f.track_id for f in b.faces]
        assert [f.box for f in a.faces] == [f.box for f in b.faces]
        for p, q in zip(a.predictions, b.predictions):
            assert (p.predicted, p.explained) == (q.predicted, q.explained)
            np.testing.assert_allclose(p.probs, q.probs, rtol=1e-6)
            np.testing.assert_allclose(p.heatmap, q.heatmap, rtol=1e-6)


def test_a_video_joined_from_parts_written_before_a_move_says_where_it_is_now(tmp_path):
    """A segmented video resumed after its archive moved: parts written before the move named the
    old path (those of an earlier camface had no key column), parts written after it the new one,
    and the joined table mixed them. Its rows all say where the video is now, with its key."""
    import pyarrow.parquet as pq

    from camface.batch.segments import Unit, finish, part_paths
    from camface.batch.state import Outputs, write_video_outputs

    outputs, labels = Outputs(tmp_path / "out"), tuple("abcdefg")
    outputs.make()
    now, key = "/moved/archive/v.mp4", "archive/v.mp4"
    units = [Unit("v-0123abcd", now, 0, 2, 0, 3, key), Unit("v-0123abcd", now, 1, 2, 3, None, key)]
    for unit, path, frames in ((units[0], "/site/archive/v.mp4", 3), (units[1], now, 2)):
        paths = part_paths(outputs, unit)
        paths["record"].parent.mkdir(parents=True, exist_ok=True)
        out = {**_render_payload(frames), "path": path, "start": unit.start, "ok": True, "key": unit.key}
        write_video_outputs(outputs, unit.video, out, None, "gradcam", None, labels, paths=paths)
        outputs.write_record(unit.video, out, labels, paths["record"])
    old = part_paths(outputs, units[0])["rows"]
    pq.write_table(pq.read_table(old).drop_columns(["key"]), old)  # as an earlier camface wrote it
    record = finish(outputs, units, labels, False)
    assert record["status"] == "done" and record["path"] == now and record["key"] == key
    rows = pq.read_table(outputs.parquet("v-0123abcd"))
    assert rows.column("frame").to_pylist() == [0, 1, 2, 3, 4]
    assert set(rows.column("path").to_pylist()) == {now} and set(rows.column("key").to_pylist()) == {key}


def test_a_model_is_known_by_its_bytes_not_its_path(tmp_path):
    """--resume compared the model's absolute path (and size and modification time): a model
    moved with the archive had every video done again. It compares the model's sha256: a copy
    elsewhere under another name is the same model; other bytes at the same path, size and
    modification time are another, and the videos done with it are done again."""
    import os

    from camface.batch.inputs import Video, stamp
    from camface.batch.pipeline import BatchJob, changed_since, videos_to_do
    from camface.batch.state import Outputs, write_json
    from camface.realtime.config import LiveConfig

    def settings(model):
        return BatchJob((), "out", LiveConfig(model=model)).settings()

    first, moved = tmp_path / "site" / "model.onnx", tmp_path / "moved" / "renamed.onnx"
    for path in (first, moved):
        path.parent.mkdir()
        path.write_bytes(b"graph one" * 100)
    os.utime(moved, ns=(0, 10**18))
    clip = tmp_path / "v.mp4"
    clip.write_bytes(b"x")
    video, outputs = Video(str(clip), "v-0123abcd"), Outputs(tmp_path / "out")
    outputs.make()
    write_json(outputs.record_path(video.id), {"status": "done", "settings": settings(first), "source": stamp(clip)})
    assert settings(moved) == settings(first) and videos_to_do(outputs, [video], settings(moved)) == []
    before = first.stat()
    first.write_bytes(b"graph two" * 100)  # another model, same size, its time set back
    os.utime(first, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert settings(first) != settings(moved)
    assert videos_to_do(outputs, [video], settings(first)) == [video]
    assert changed_since(outputs, [video], settings(first)) == (["model"], 0)


def test_what_an_earlier_camface_did_with_the_same_model_is_kept(tmp_path):
    """OUT_DIR of a camface that named the model by its path, size and modification time: once
    the model was known by its bytes, every video and segment it did counted as done with another
    model (all done again; a resume over fewer inputs refused). The model still there as it was is
    the same model; changed since, it is another, and they are done again as before."""
    import os

    from camface.batch.inputs import Video, stamp
    from camface.batch.pipeline import BatchJob, changed_since, done_otherwise, videos_to_do
    from camface.batch.segments import Unit, done_before, keep_splits, part_paths
    from camface.batch.state import Outputs, write_json
    from camface.realtime.config import LiveConfig

    model, clip = tmp_path / "model.onnx", tmp_path / "v.mp4"
    model.write_bytes(b"graph" * 100)
    clip.write_bytes(b"x")
    now = BatchJob((), "out", LiveConfig(model=model)).settings()
    older = {**now, "model": str(model), "model_size": 500, "model_mtime_ns": model.stat().st_mtime_ns}
    outputs, video = Outputs(tmp_path / "out"), Video(str(clip), "v-0123abcd")
    outputs.make()
    units = [Unit(video.id, video.path, 0, 2, 0, 50, video.key), Unit(video.id, video.path, 1, 2, 50, None, video.key)]
    write_json(outputs.record_path(video.id), {"status": "done", "settings": older, "source": stamp(clip)})
    write_json(outputs.record_path("gone-0123abcd"), {"status": "done", "settings": older, "path": "/a/gone.mp4"})
    part_paths(outputs, units[1])["record"].parent.mkdir(parents=True)
    write_json(part_paths(outputs, units[1])["record"], {"status": "done", "settings": older, "source": stamp(clip)})
    write_json(outputs.parts / video.id / "split.json", {"settings": older, "bounds": [[0, 50], [50, None]]})
    assert videos_to_do(outputs, [video], now) == [] and done_otherwise(outputs, [video], now) == ([], [])
    assert done_before(outputs, units[1], now)
    assert keep_splits(outputs, [Unit(video.id, video.path, key=video.key)], now) == units
    os.utime(model, ns=(0, 10**18))  # another model, as the earlier camface saw it
    assert videos_to_do(outputs, [video], now) == [video] and not done_before(outputs, units[1], now)
    assert changed_since(outputs, [video], now) == (["model"], 0)
    assert done_otherwise(outputs, [video], now) == (["/a/gone.mp4"], ["model"])


def test_rows_of_an_earlier_camface_get_the_columns_it_lacked_so_the_folder_reads_as_one_table(tmp_path):
    """Rows files an earlier camface wrote have no `key` column (the oldest no `similarity`
    either), beside files of this one that do: OUT_DIR/rows read as one table (pyarrow.dataset,
    read_table) takes the first file's columns, so the key was dropped from every row when an old
    file came first, and null in the old files' rows otherwise. A run over OUT_DIR rewrites the old
    files whole, the key of each video among its inputs filled in (else its record's, else null),
    similarity null (not recorded); every other value as it was."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from camface.batch.rows import schema, upgrade_rows
    from camface.batch.state import Outputs, write_video_outputs

    outputs, labels = Outputs(tmp_path / "out"), tuple("abcdefg")
    outputs.make()
    videos = {"a-old": ("day1/a.mp4", 3, ["key"]), "b-new": ("day1/b.mp4", 2, []),
              "c-oldest": ("day2/c.mp4", 2, ["key", "similarity"]), "d-gone": (None, 1, ["key"])}
    written = {}
    for video_id, (key, frames, dropped) in videos.items():
        out = {**_render_payload(frames), "ok": True, "key": key or "day9/d.mp4", "path": f"/archive/{video_id}.mp4"}
        write_video_outputs(outputs, video_id, out, None, "gradcam", None, labels)
        path = outputs.parquet(video_id)
        pq.write_table(pq.read_table(path).drop_columns(dropped), path)  # as an earlier camface wrote it
        written[video_id] = pq.read_table(path)
    before = ds.dataset(outputs.rows).to_table()
    assert "key" not in before.column_names  # the old file a-old came first: no row had its key

    keys = {video_id: key for video_id, (key, *_) in videos.items() if key is not None}  # d-gone: not an input
    rewritten = upgrade_rows(outputs, keys)
    assert [p.stem for p in rewritten] == ["a-old", "c-oldest", "d-gone"]
    assert upgrade_rows(outputs, keys) == []  # once
    assert not [p for p in outputs.rows.iterdir() if p.name.startswith(".")]  # no temporary file left
    for table in (ds.dataset(outputs.rows).to_table(), pq.read_table(outputs.rows)):
        assert table.schema.names == schema().names and table.num_rows == 8
        by_video = {}
        for video, key in zip(table.column("video").to_pylist(), table.column("key").to_pylist()):
            by_video.setdefault(video, set()).add(key)
        assert by_video == {"a-old": {"day1/a.mp4"}, "b-new": {"day1/b.mp4"}, "c-oldest": {"day2/c.mp4"},
                            "d-gone": {None}}
    for video_id, earlier in written.items():
        now = pq.read_table(outputs.parquet(video_id))
        for name in earlier.column_names:
            assert now.column(name).to_pylist() == earlier.column(name).to_pylist(), (video_id, name)
    assert pq.read_table(outputs.parquet("c-oldest")).column("similarity").to_pylist() == [None, None]
    assert pq.read_table(outputs.parquet("a-old")).column("similarity").to_pylist() == [[], [], []]


@pytest.mark.parametrize("hashed, key", [
    ("archive/day1/clip.mp4", "archive/day1/clip.mp4"),  # the key its id was made from: a glob's
    ("day1/clip.mp4", "day1/clip.mp4"),  # a folder's
    ("/site/archive/day1/clip.mp4", None),  # an id an earlier camface hashed from the absolute path
    ("elsewhere/clip.mp4", None),  # not a part of the recorded path
])
def test_a_resume_fills_the_key_of_rows_of_videos_not_among_its_inputs_from_their_id(tmp_path, hashed, key):
    """Rows written before rows had a key column, of a video that a --resume does not name (its
    key is not among the inputs) and whose record, as old, has no key either, got a null key. The
    id was made from the key: the key is the trailing part of the recorded path whose digest the id
    carries. An id an earlier camface hashed from the absolute path names no input: null still."""
    import pyarrow.parquet as pq

    from camface.batch.inputs import video_id
    from camface.batch.rows import upgrade_rows
    from camface.batch.state import Outputs, write_json, write_video_outputs

    clip = Path("/site/archive/day1/clip.mp4")
    vid = video_id(clip, hashed)
    outputs, labels = Outputs(tmp_path / "out"), tuple("abcdefg")
    outputs.make()
    write_video_outputs(outputs, vid, {**_render_payload(2), "ok": True, "path": str(clip)}, None, "gradcam", None,
                        labels)
    path = outputs.parquet(vid)
    pq.write_table(pq.read_table(path).drop_columns(["key"]), path)  # as a camface before keys wrote them
    write_json(outputs.record_path(vid), {"video": vid, "path": str(clip), "status": "done"})  # no key
    assert upgrade_rows(outputs, {"other-0123abcd": "x/other.mp4"}) == [path]
    table = pq.read_table(path)
    assert table.num_rows == 2 and table.column("key").to_pylist() == [key, key]


def test_parts_holding_no_result_go_and_leave_the_folder_new(tmp_path):
    """A run killed before any segment finished left parts/<id>/split.json (and maybe parts whose
    record, written last, never was): every later run without --resume was refused as if OUT_DIR
    held an earlier run's outputs. It holds no result: the folder is taken as new and the leftovers
    go; a segment's part record, done or failed, still needs --resume."""
    from camface.batch.cli import _check_out_dir
    from camface.batch.segments import Unit, drop_unused_parts, keep_splits, part_paths
    from camface.batch.state import Outputs, write_json
    from camface.errors import OutputError

    out = tmp_path / "out"
    outputs = Outputs(out)
    outputs.make()
    units = [Unit("v-0123abcd", "/a/v.mp4", k, 2, a, b) for k, (a, b) in enumerate(((0, 50), (50, None)))]
    keep_splits(outputs, units, {"method": "gradcam"})
    part_paths(outputs, units[0])["rows"].write_bytes(b"rows, renamed before the record")
    outputs, lock = _check_out_dir(out, resume=False)
    lock.release()
    assert drop_unused_parts(outputs) == 1 and not outputs.parts.exists()
    keep_splits(outputs, units, {"method": "gradcam"})
    write_json(part_paths(outputs, units[1])["record"], {"status": "failed", "settings": {"method": "gradcam"}})
    with pytest.raises(OutputError, match="holds the outputs of an earlier run; pass --resume"):
        _check_out_dir(out, resume=False)
    assert drop_unused_parts(outputs) == 0 and len(list(outputs.parts.glob("*/*"))) == 2


@pytest.mark.parametrize("written_by", ["this camface", "an earlier camface"])
def test_records_name_their_outputs_from_out_dir_so_a_moved_out_dir_still_finds_them(tmp_path, written_by):
    """Records kept the absolute paths of a video's outputs (video_file, rows_file): OUT_DIR moved
    elsewhere, they named files in the old place (gone, or another run's there now). They are
    paths from OUT_DIR; the absolute ones of an earlier camface are read as the same files of
    OUT_DIR where it is now."""
    import json
    import shutil

    from camface.batch.inputs import Video
    from camface.batch.report import now
    from camface.batch.state import Outputs, write_json, write_video_outputs

    video, labels = Video("/archive/v.mp4", "v-0123abcd"), tuple("abcdefg")
    outputs = Outputs(tmp_path / "site" / "out")
    outputs.make()
    outputs.video(video.id).write_bytes(b"annotated")
    out = {**_render_payload(2), "ok": True, "path": video.path, "video_file": str(outputs.video(video.id))}
    write_video_outputs(outputs, video.id, out, None, "gradcam", None, labels)
    outputs.write_record(video.id, out, labels)
    record = json.loads(outputs.record_path(video.id).read_text())
    assert (record["video_file"], record["rows_file"]) == (f"videos/{video.id}.mp4", f"rows/{video.id}.parquet")
    if written_by == "an earlier camface":
        record.update(video_file=str(outputs.video(video.id)), rows_file=str(outputs.parquet(video.id)))
        write_json(outputs.record_path(video.id), record)
    shutil.move(tmp_path / "site", tmp_path / "moved")
    moved = Outputs(tmp_path / "moved" / "out")
    record = moved.read_record(video.id)
    for name, path in (("video_file", moved.video(video.id)), ("rows_file", moved.parquet(video.id))):
        assert moved.file(record[name]) == path and path.is_file()
        assert now(moved, video, record)[name] == path.relative_to(moved.root).as_posix()
    part = tmp_path / "site" / "out" / "parts" / video.id / "00000-0-50.mp4"  # a part record's, as then
    assert moved.file(str(part)) == moved.parts / video.id / part.name


def test_outputs_a_killed_run_never_recorded_go_so_they_are_not_read_as_rows(tmp_path):
    """A run killed after renaming a video's outputs into place, before its record (written last),
    left them: the video is not finished, yet its rows lay in OUT_DIR/rows, read with the rest as
    one table, for good when a later run did not name it. The next run removes them; a video with
    a record (even one that cannot be read) keeps its outputs, and so does a file not named by an id."""
    from camface.batch.state import Outputs, write_json, write_video_outputs

    outputs, labels = Outputs(tmp_path / "out"), tuple("abcdefg")
    outputs.make()
    for vid in ("kept-0123abcd", "killed-0123abcd", "damaged-0123abcd"):
        write_video_outputs(outputs, vid, {**_render_payload(2), "ok": True}, None, "gradcam", None, labels)
        outputs.video(vid).write_bytes(b"annotated")
    write_json(outputs.record_path("kept-0123abcd"), {"video": "kept-0123abcd", "status": "done"})
    outputs.record_path("damaged-0123abcd").write_text("{")
    (outputs.rows / "notes.parquet").write_bytes(b"the user's")
    assert outputs.drop_unrecorded() == 3
    assert sorted(p.name for p in outputs.rows.iterdir()) == ["damaged-0123abcd.parquet", "kept-0123abcd.parquet",
                                                              "notes.parquet"]
    assert sorted(p.stem for p in outputs.videos.iterdir()) == ["damaged-0123abcd", "kept-0123abcd"]
    assert sorted(p.name for p in outputs.state.glob("*.npz")) == ["damaged-0123abcd.npz", "kept-0123abcd.npz"]
    assert outputs.drop_unrecorded() == 0


@pytest.mark.parametrize("named", ["absolute", "relative", "link"])
def test_an_input_video_in_out_dir_videos_named_like_an_id_is_not_removed_as_unrecorded(tmp_path, monkeypatch,
                                                                                          named):
    """A video the user keeps in OUT_DIR/videos whose name reads as an id (clip-20240101.mp4: 8 hex
    digits) is an input of the run, not an output a killed run left: drop_unrecorded removed it before
    the run read it. Given as this run's inputs (absolute, relative to the working folder, or through
    a link to it), it stays; an unrecorded output beside it still goes."""
    from camface.batch.state import Outputs

    outputs = Outputs(tmp_path / "out")
    outputs.make()
    mine, left = outputs.videos / "clip-20240101.mp4", outputs.videos / "gone-0123abcd.mp4"
    mine.write_bytes(b"the user's video")
    left.write_bytes(b"a killed run's")
    monkeypatch.chdir(tmp_path)
    if named == "link":
        (tmp_path / "link.mp4").symlink_to(mine)
    given = {"absolute": str(mine), "relative": "out/videos/clip-20240101.mp4", "link": "link.mp4"}[named]
    assert outputs.drop_unrecorded([given]) == 1
    assert mine.read_bytes() == b"the user's video" and not left.exists()


@pytest.mark.parametrize("state_before", [False, True])
def test_a_folder_no_batch_run_used_loses_nothing_as_unrecorded(tmp_path, state_before):
    """`-o` pointed at a folder of the user's own with a videos/ sub-folder: its files named like
    ids (take-0123abcd.mp4) were removed as a killed run's leftovers. Only a folder a camface batch
    run used (its state/ folder there before this run) has leftovers to drop."""
    from camface.batch.cli import _check_out_dir

    out = tmp_path / "mine"
    (out / "videos").mkdir(parents=True)
    if state_before:
        (out / "state").mkdir()
    video = out / "videos" / "take-0123abcd.mp4"
    video.write_bytes(b"the user's")
    outputs, lock = _check_out_dir(out, resume=False)
    try:
        assert outputs.drop_unrecorded() == int(state_before)
        assert video.exists() != state_before
    finally:
        lock.release()
