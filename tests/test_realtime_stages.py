"""Unit tests of the live loop's stages: frames, crops, the ORT wrapper, rendering, smoothing,
timing, keys, recording and snapshots. Tiny synthetic data; no camera, no display."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from realtime_helpers import TINY_LABELS, FakeCamera, count_frames, tiny_cam_graph

from camface.errors import ModelError, OutputError, SourceError
from camface.realtime.crop import crop_faces, crop_square, square_box
from camface.methods import normalize as normalize_heatmap
from camface.realtime.render import BoxAnnotator, HeatmapAnnotator, Renderer, localisation_box
from camface.realtime.results import Face, FrameResult, Prediction
from camface.outputs import check_output_file, written_beside
from camface.realtime.sinks import VideoSink
from camface.realtime.smooth import Smoother, iou
from camface.realtime.snapshot import SnapshotWriter
from camface.realtime.sources import ImageFolderSource, LiveSource, to_bgr8
from camface.realtime.timing import RateMeter, StageTimer
from camface.realtime.controls import QUIT, RECORD, SNAPSHOT, Controls, apply_key


@pytest.fixture(scope="module")
def tiny_graph_path(tmp_path_factory):
    return tiny_cam_graph(tmp_path_factory.mktemp("graph") / "tiny.onnx")


@pytest.fixture(scope="module")
def tiny_graph(tiny_graph_path):
    from camface.realtime.graph import CamGraph

    return CamGraph(tiny_graph_path, "cpu")


# ------------------------------------------------------------------------------ frames

@pytest.mark.parametrize("image, expected_pixel", [
    (np.full((5, 7), 200, np.uint8), (200, 200, 200)),                  # gray
    (np.full((5, 7, 1), 10, np.uint8), (10, 10, 10)),                   # gray, channel axis
    (np.dstack([np.full((5, 7), v, np.uint8) for v in (1, 2, 3, 255)]), (1, 2, 3)),  # BGRA
    (np.full((5, 7, 3), 65535, np.uint16), (255, 255, 255)),            # 16-bit
    (np.full((5, 7, 3), 0x1234, np.uint16), (0x12, 0x12, 0x12)),
    (np.full((1, 1, 3), 0.5, np.float32), (128, 128, 128)),             # float, 1x1
])
def test_to_bgr8_normalises_frames(image, expected_pixel):
    out = to_bgr8(image)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[:2] == image.shape[:2]
    assert tuple(int(v) for v in out[0, 0]) == expected_pixel
    assert out.flags["C_CONTIGUOUS"]


def test_to_bgr8_rejects_non_images():
    with pytest.raises(ValueError, match="not an image"):
        to_bgr8(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ValueError, match="channels"):
        to_bgr8(np.zeros((4, 4, 2), np.uint8))


# ------------------------------------------------------------------------------ crops

@pytest.mark.parametrize("box, margin", [((10, 20, 30, 30), 0.0), ((10, 20, 31, 40), 0.1),
                                         ((0, 0, 1, 1), 0.5), ((5, 5, 40, 13), 0.25)])
def test_square_box_contains_the_face_and_is_centred(box, margin):
    x, y, side, side2 = square_box(box, margin)
    bx, by, bw, bh = box
    assert side == side2 >= max(bw, bh) * (1 + margin) - 1e-6
    assert x <= bx and y <= by and x + side >= bx + bw and y + side >= by + bh
    assert abs((x + side / 2) - (bx + bw / 2)) <= 1 and abs((y + side / 2) - (by + bh / 2)) <= 1


def test_crop_at_the_border_is_padded_not_shifted():
    frame = np.arange(100, dtype=np.uint8).reshape(10, 10)[:, :, None].repeat(3, axis=2)
    crop = crop_square(frame, (-2, -3, 6, 6))
    assert crop.shape == (6, 6, 3)
    assert (crop[:3] == 0).all() and (crop[:, :2] == 0).all()
    assert crop[3, 2, 0] == frame[0, 0, 0] and crop[5, 5, 0] == frame[2, 3, 0]
    assert (crop_square(frame, (20, 20, 4, 4)) == 0).all()  # entirely outside: all padding


def test_crop_faces_sizes_colour_and_crop_boxes():
    frame = np.zeros((40, 50, 3), np.uint8)
    frame[:, :, 2] = 200  # red in BGR
    faces = (Face((0, 0, 10, 20), 0.9), Face((30, 10, 19, 29), 0.8))
    gray, placed = crop_faces(frame, faces, 0.0, (16, 16), "GRAY")
    assert gray.shape == (2, 16, 16, 1) and gray.dtype == np.uint8
    assert placed[0].crop_box == square_box(faces[0].box, 0.0)
    assert gray[0, 8, 12, 0] == round(0.299 * 200)  # inside the frame: red seen as gray
    assert gray[0, 8, 0, 0] == 0  # left of the frame: padding
    rgb, _ = crop_faces(frame, faces, 0.0, (16, 8), "RGB")
    assert rgb.shape == (2, 16, 8, 3) and rgb[1, 8, 4, 0] == 200 and rgb[1, 8, 4, 2] == 0
    empty, none = crop_faces(frame, (), 0.1, (16, 16), "BGR")
    assert empty.shape == (0, 16, 16, 3) and none == ()
    with pytest.raises(ValueError, match="colour order"):
        crop_faces(frame, faces, 0.0, (16, 16), "YUV")


# ------------------------------------------------------------------------------ graph

def test_graph_reads_metadata_and_runs_a_batch(tiny_graph):
    assert tiny_graph.info.labels == TINY_LABELS and tiny_graph.info.input_size == (32, 32)
    assert tiny_graph.provider == "CPUExecutionProvider"
    assert tiny_graph.methods == ("gradcam", "gradcampp", "cam")
    crops = np.zeros((2, 32, 32, 1), np.uint8)
    crops[0, :16, :16] = 255  # bright top-left: class 0 ("bright") lights it up
    crops[1] = 255
    crops[1, :8, :8] = 0  # dark top-left cell: class 1 ("dark") lights it up
    probs, heat = tiny_graph.run(crops, np.array([0, -1]), "gradcam")
    assert probs[0].argmax() == 1 and probs[1].argmax() == 0  # mostly dark; mostly bright
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(heat[0][:2, :2], 1 / 16, atol=1e-6)  # ReLU(p) / 16 with p = +1
    assert (heat[0][2:] == 0).all()
    np.testing.assert_allclose(heat[1].ravel()[1:], 1 / 16, atol=1e-6)  # predicted "bright"
    assert heat[1][0, 0] == 0
    _, none = tiny_graph.run(crops, np.array([-1, -1]), "none")
    assert none.shape == (2, 0, 0)


def test_heatmap_changes_with_the_explained_class(tiny_graph):
    crops = np.full((1, 32, 32, 1), 255, np.uint8)
    crops[0, 16:, 16:] = 0
    _, bright = tiny_graph.run(crops, np.array([0]), "gradcam")
    _, dark = tiny_graph.run(crops, np.array([1]), "gradcam")
    assert bright[0][0, 0] > 0 and bright[0][3, 3] == 0
    assert dark[0][0, 0] == 0 and dark[0][3, 3] > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(drop_outputs=("gradcam", "activations")), r"missing activations \(it has"),
    (dict(metadata=False), "lacks CAM graph metadata: labels"),
    (dict(labels=("a", "b")), "2 labels in the metadata but the graph returns 3"),
])
def test_graph_refuses_graphs_that_break_the_contract(tmp_path, kwargs, message):
    from camface.realtime.graph import CamGraph

    path = tiny_cam_graph(tmp_path / "bad.onnx", **kwargs)
    with pytest.raises(ModelError, match=message):
        CamGraph(path, "cpu")


def test_graph_missing_and_corrupt_files(tmp_path):
    from camface.realtime.graph import CamGraph

    with pytest.raises(ModelError, match="CAM graph not found: .*nope.onnx"):
        CamGraph(tmp_path / "nope.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ModelError, match="corrupt.onnx is not an ONNX model"):
        CamGraph(corrupt)
    with pytest.raises(ValueError, match="unknown device"):
        CamGraph(corrupt, "tpu")


def test_graph_without_cam_says_why(tmp_path):
    from camface.realtime.graph import CamGraph

    graph = CamGraph(tiny_cam_graph(tmp_path / "nocam.onnx", cam=False), "cpu")
    assert graph.methods == ("gradcam", "gradcampp")
    with pytest.raises(ModelError, match="no 'cam' heatmap.*head is not GAP"):
        graph.run(np.zeros((1, 32, 32, 1), np.uint8), np.array([-1]), "cam")


def test_unusable_gpu_provider_falls_back_to_cpu_with_one_line(tiny_graph_path, caplog):
    import onnxruntime as ort

    from camface.realtime.graph import CamGraph

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider")
    with caplog.at_level(logging.INFO):
        graph = CamGraph(tiny_graph_path, "cuda")
    if graph.provider == "CUDAExecutionProvider":
        pytest.skip("a usable GPU is present")
    assert graph.provider == "CPUExecutionProvider"
    assert [r.message for r in caplog.records if r.levelno == logging.WARNING] == [
        "camface: device 'cuda' is not usable here; running the CAM graph on CPU"]


# ------------------------------------------------------------------------------ rendering

def _result(faces, heatmaps, method="gradcam", probs=None):
    predictions = tuple(Prediction(probs=np.array(probs or [0.7, 0.2, 0.1], np.float32), heatmap=h,
                                   predicted=0, explained=0, method=method) for h in heatmaps)
    return FrameResult(index=0, faces=tuple(faces), predictions=predictions, method=method, labels=TINY_LABELS)


def _frame_copy(prediction, copy_of):
    result = FrameResult(index=0, faces=(Face((0, 0, 4, 4), 0.9),), predictions=(prediction,), method="hirescam")
    return copy_of(result).predictions[0]


@pytest.mark.parametrize("copy_of", [lambda p: pickle.loads(pickle.dumps(p)), copy.deepcopy, copy.copy],
                         ids=["pickle", "deepcopy", "copy"])
@pytest.mark.parametrize("inside_a_frame", [False, True])
def test_a_copied_prediction_keeps_its_arrays_read_only(copy_of, inside_a_frame):
    """Pickling a Prediction (alone or in its FrameResult) or deep-copying it gave back writeable
    arrays, so a caller could change a result that says it is frozen."""
    made = Prediction(probs=np.array([0.7, 0.3], np.float32), heatmap=np.arange(4, dtype=np.float32).reshape(2, 2),
                      predicted=0, explained=1, method="hirescam", similarity=np.array([0.5, 0.1], np.float32),
                      saturated=True)
    copied = _frame_copy(made, copy_of) if inside_a_frame else copy_of(made)
    for name in ("probs", "heatmap", "similarity"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(copied, name)[...] = 0
    assert copied == made and copied.saturated and copied.heatmap.dtype == np.float32


def test_normalize_heatmap():
    np.testing.assert_allclose(normalize_heatmap(np.array([[-1.0, 0.0], [1.0, 2.0]]), "gradcam"),
                               [[0, 0], [0.5, 1]])
    np.testing.assert_allclose(normalize_heatmap(np.array([[-1.0, 0.0], [1.0, 3.0]]), "cam"),
                               [[0, 0.25], [0.5, 1]])
    assert (normalize_heatmap(np.zeros((3, 3)), "gradcam") == 0).all()


def test_localisation_box_is_the_largest_region_above_20_percent():
    heat = np.zeros((20, 20), np.float32)
    heat[2:5, 2:5] = 1.0  # 9 px at the maximum
    heat[10:18, 8:14] = 0.3  # 48 px above 20 % of it: the largest region wins
    heat[0, 19] = 0.1  # below the threshold
    assert localisation_box(heat) == (8, 10, 6, 8)
    assert localisation_box(np.zeros((4, 4), np.float32)) is None


@pytest.mark.parametrize("frame_shape", [(120, 160, 3), (121, 161, 3), (1, 1, 3)])
def test_heatmap_overlay_changes_pixels_only_inside_face_boxes(frame_shape):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, frame_shape, dtype=np.uint8)
    faces = [Face((10, 20, 40, 40), 0.9, crop_box=(6, 16, 48, 48)),
             Face((130, 90, 40, 40), 0.8, crop_box=(126, 86, 48, 48))]  # cut by the border
    heat = np.arange(16, dtype=np.float32).reshape(4, 4)
    before = frame.copy()
    out = HeatmapAnnotator("jet", 0.5).annotate(frame, _result(faces, [heat, heat]))
    assert out is frame  # in place
    inside = np.zeros(frame_shape[:2], bool)
    for f in faces:
        x, y, w, h = f.box
        inside[max(y, 0):y + h, max(x, 0):x + w] = True
    changed = (before != frame).any(axis=2)
    assert not changed[~inside].any()
    if frame_shape[0] > 60:
        assert changed[20:60, 10:50].mean() > 0.5


@pytest.mark.parametrize("small_heat", ["none", "ramp"])
def test_overlapping_faces_each_show_their_own_heatmap(small_heat):
    """Where two face boxes overlap, the second face's heatmap was blended over the first
    face's (already tinted) pixels, so a quarter of the first face's heatmap showed inside the
    second face's box. Now each is blended over the frame as it came: inside the smaller box,
    drawn last, exactly what that face alone gives; outside it, the larger face's."""
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    big = Face((10, 10, 80, 80), 0.9, crop_box=(10, 10, 80, 80))
    small = Face((60, 50, 40, 40), 0.8, crop_box=(60, 50, 40, 40))
    heat = np.arange(16, dtype=np.float32).reshape(4, 4)
    small_map = np.zeros((4, 4), np.float32) if small_heat == "none" else heat.T.copy()

    def drawn(faces, heatmaps):
        return HeatmapAnnotator("jet", 0.5).annotate(frame.copy(), _result(faces, heatmaps))

    both, big_alone, small_alone = drawn([big, small], [heat, small_map]), drawn([big], [heat]), drawn([small], [small_map])
    in_small = np.zeros(frame.shape[:2], bool)
    in_small[50:90, 60:100] = True
    np.testing.assert_array_equal(both[in_small], small_alone[in_small])
    np.testing.assert_array_equal(both[~in_small], big_alone[~in_small])


def test_box_labels_and_hud_draw_where_expected():
    frame = np.zeros((120, 160, 3), np.uint8)
    result = _result([Face((40, 40, 40, 40), 0.9, crop_box=(40, 40, 40, 40))], [np.ones((4, 4), np.float32)])
    BoxAnnotator().annotate(frame, result)
    changed = frame.any(axis=2)
    assert changed[40:80, 40:80].any() and changed[20:40, 40:120].any()  # box, label above it
    assert not changed[85:, :].any()
    from dataclasses import replace
    lines = Renderer().hud_layer.lines(replace(result, dropped=32, fps=250.0, stage_ms={"detect": 2.25},
                                               provider="CPUExecutionProvider"))
    assert lines == ["250 fps | ms: detect 2.2", "gradcam of predicted class | CPU",
                     "32 more face(s) not shown (--max-faces)"]
    hud_frame = np.zeros((120, 160, 3), np.uint8)
    Renderer().hud_layer.annotate(hud_frame, result)
    assert hud_frame[:20, :40].any() and not hud_frame[60:].any()



@pytest.mark.parametrize("annotator", ["labels", "bars"])
@pytest.mark.parametrize("x", [0, 80, 160])  # 160: the face touches the frame's right edge
def test_labels_and_bars_stay_whole_at_the_right_edge(annotator, x):
    """A face at the right edge of the frame had its label (and its --top3 bars and class names)
    drawn from the box's left side on, so they ran out of the frame and were cut: the same
    drawing on a wider frame now inks as many pixels, and nothing moves where there is room."""
    from camface.realtime.render import BarsAnnotator

    face = Face((x, 40, 40, 40), 0.9, crop_box=(x, 40, 40, 40))
    result = _result([face], [np.ones((4, 4), np.float32)])
    drawn = {}
    for width in (200, 400):
        frame = np.full((140, width, 3), 100, np.uint8)
        (BoxAnnotator() if annotator == "labels" else BarsAnnotator()).annotate(frame, result)
        drawn[width] = frame
    # the label above the box, the bars below it (the box's own outline is cut by the edge)
    inked = {width: int((frame[list(range(38)) + list(range(81, 140))] != 100).any(axis=2).sum())
             for width, frame in drawn.items()}
    assert inked[200] == inked[400] > 0
    if x + 40 + 135 <= 200:  # room for the label and the bars: drawn exactly where they were
        np.testing.assert_array_equal(drawn[200], drawn[400][:, :200])


# ------------------------------------------------------------------------------ smoothing

def test_smoother_keeps_ids_and_averages():
    smoother = Smoother(0.5)
    heat_a, heat_b = np.zeros((4, 4), np.float32), np.ones((4, 4), np.float32)
    first = smoother.update(_result([Face((0, 0, 20, 20), 1), Face((50, 50, 20, 20), 1)],
                                    [heat_a, heat_a], probs=[1.0, 0.0, 0.0]))
    assert [f.track_id for f in first.faces] == [0, 1]
    second = smoother.update(_result([Face((52, 50, 20, 20), 1), Face((2, 1, 20, 20), 1)],
                                     [heat_b, heat_b], probs=[0.0, 1.0, 0.0]))
    assert [f.track_id for f in second.faces] == [1, 0]
    np.testing.assert_allclose(second.predictions[0].probs, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(second.predictions[0].heatmap, 0.5)
    third = smoother.update(_result([Face((200, 200, 20, 20), 1)], [heat_a]))
    assert third.faces[0].track_id == 2
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="smoothing factor"):
        Smoother(1.0)


def test_smoother_starts_over_at_a_cut():
    """A cut (a looped source's new pass, a reconnected stream) forgets every track: the next
    frame's probabilities and heatmaps are its own, its faces get new ids."""
    smoother = Smoother(0.5)
    face = Face((0, 0, 20, 20), 1)
    smoother.update(_result([face], [np.zeros((4, 4), np.float32)], probs=[1.0, 0.0, 0.0]))
    smoother.cut()
    np.testing.assert_array_equal(smoother.explain_classes((face,)), [-1])  # no track: the frame's own class
    after = smoother.update(_result([face], [np.ones((4, 4), np.float32)], probs=[0.0, 1.0, 0.0]))
    np.testing.assert_allclose(after.predictions[0].probs, [0.0, 1.0, 0.0])
    np.testing.assert_allclose(after.predictions[0].heatmap, 1.0)
    assert after.faces[0].track_id == 1  # ids keep counting: 0 named the face before the cut
    again = smoother.update(_result([face], [np.zeros((4, 4), np.float32)], probs=[0.0, 0.0, 1.0]))
    assert again.faces[0].track_id == 1  # smoothing goes on from the cut
    np.testing.assert_allclose(again.predictions[0].probs, [0.0, 0.5, 0.5])


def test_smoother_explains_the_smoothed_class_while_the_raw_top_class_flickers():
    def frame(box, probs):
        probs = np.array(probs, np.float32)
        top = int(probs.argmax())
        prediction = Prediction(probs=probs, heatmap=np.ones((4, 4), np.float32), predicted=top,
                                explained=top, method="gradcam")
        return FrameResult(index=0, faces=(Face(box, 1.0),), predictions=(prediction,),
                           method="gradcam", labels=TINY_LABELS)

    smoother = Smoother(0.8)
    far = Face((300, 300, 20, 20), 1.0)
    np.testing.assert_array_equal(smoother.explain_classes((Face((0, 0, 20, 20), 1.0), far)), [-1, -1])
    smoother.update(frame((0, 0, 20, 20), [0.1, 0.6, 0.3]))
    second = smoother.update(frame((1, 0, 20, 20), [0.1, 0.3, 0.6]))  # raw top class flips to 2
    np.testing.assert_allclose(second.predictions[0].probs, [0.1, 0.54, 0.36], atol=1e-6)
    assert second.predictions[0].predicted == 1  # the label keeps saying class 1 ...
    # ... so the next frame's heatmap is asked for class 1 too; a new face gets its own (-1)
    np.testing.assert_array_equal(smoother.explain_classes((Face((2, 0, 20, 20), 1.0), far)), [1, -1])


# ------------------------------------------------------------------------------ timing, keys

def test_stage_timer_and_rate_meter():
    timer = StageTimer(("a",), capacity=4)
    for ms in (1, 2, 3, 4, 100):  # ring keeps the last 4
        timer.add("a", ms / 1000)
    stats = timer.stats()["a"]
    assert stats.count == 5 and stats.median_ms == pytest.approx(3.5)
    rate = RateMeter(window=3)
    for t in (0.0, 0.1, 0.2, 0.3, 0.4):
        rate.tick(t)
    assert rate.rolling_fps == pytest.approx(10) and rate.overall_fps == pytest.approx(10)


@pytest.mark.parametrize("key, expected, command", [
    (-1, Controls("gradcam"), None),
    (ord("m"), Controls("gradcampp"), None),
    (ord("3"), Controls("gradcam", explained_class=3), None),
    (ord("9"), Controls("gradcam"), None),  # beyond the 7 classes: ignored
    (ord("h"), Controls("gradcam", hud=False), None),
    (ord("s"), Controls("gradcam"), SNAPSHOT),
    (ord("r"), Controls("gradcam"), RECORD),
    (ord("q"), Controls("gradcam"), QUIT),
    (27, Controls("gradcam"), QUIT),
])
def test_keys(key, expected, command):
    assert apply_key(Controls("gradcam"), key, ("gradcam", "gradcampp", "cam"), 7) == (expected, command)


def test_m_cycles_through_none_and_a_returns_to_predicted():
    controls = Controls("cam", explained_class=2)
    controls, _ = apply_key(controls, ord("m"), ("gradcam", "gradcampp", "cam"), 7)
    assert controls.method == "none"
    controls, _ = apply_key(controls, ord("m"), ("gradcam", "gradcampp", "cam"), 7)
    assert controls.method == "gradcam"
    assert apply_key(controls, ord("a"), ("gradcam",), 7)[0].explained_class is None


# ------------------------------------------------------------------------------ outputs

def test_check_output_file(tmp_path):
    with pytest.raises(OutputError, match="folder .*missing does not exist"):
        check_output_file(tmp_path / "missing" / "out.mp4")
    existing = tmp_path / "out.mp4"
    existing.write_bytes(b"x")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        check_output_file(existing)
    assert check_output_file(existing, overwrite=True) == existing


def test_video_sink_counts_frames_and_handles_odd_and_changing_sizes(tmp_path, caplog):
    path = tmp_path / "odd.mp4"
    with caplog.at_level(logging.WARNING), VideoSink(path, fps=25.0) as sink:
        for i in range(5):
            sink.write(np.full((61, 81, 3), i * 40, np.uint8))
        assert "scaled" not in caplog.text  # the odd row and column are trimmed, not scaled
        sink.write(np.zeros((30, 30, 3), np.uint8))  # another size: resized, said once
        sink.write(np.zeros((30, 30, 3), np.uint8))
    assert sink.frames_written == 7 and count_frames(path) == 7
    assert caplog.text.count("frames of 30x30 are scaled to fit the recording's 80x60") == 1
    capture = cv2.VideoCapture(str(path))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(25.0)
    assert capture.read()[1].shape == (60, 80, 3)


def test_snapshot_contents_and_folders_never_collide(tmp_path, tiny_graph):
    writer = SnapshotWriter(tmp_path / "snaps", "clip.mp4", tiny_graph.path, tiny_graph.info)
    frame = np.full((60, 80, 3), 7, np.uint8)
    crops = np.arange(2 * 32 * 32, dtype=np.uint8).reshape(2, 32, 32, 1)
    faces = [Face((1, 2, 30, 30), 0.91, crop_box=(0, 1, 32, 32)), Face((40, 20, 30, 30), 0.5, crop_box=(39, 19, 32, 32))]
    result = _result(faces, [np.ones((4, 4), np.float32)] * 2)
    first = writer.save(frame, crops, result)
    second = writer.save(frame, crops, result)
    assert first.name == "frame_000000" and second.name == "frame_000000-2"
    meta = json.loads((first / "snapshot.json").read_text())
    assert meta["source"] == "clip.mp4" and meta["frame_index"] == 0 and meta["method"] == "gradcam"
    assert meta["labels"] == list(TINY_LABELS) and meta["color_order"] == "GRAY"
    assert meta["model"]["path"] == str(tiny_graph.path.resolve())
    import hashlib
    assert meta["model"]["sha256"] == hashlib.sha256(tiny_graph.path.read_bytes()).hexdigest()
    assert meta["model"]["source_model"] == "tiny.keras"
    face = meta["faces"][1]
    assert face["box"] == [40, 20, 30, 30] and face["score"] == 0.5 and face["predicted"] == 0
    assert face["probs"] == pytest.approx([0.7, 0.2, 0.1]) and face["explained_label"] == "bright"
    np.testing.assert_array_equal(cv2.imread(str(first / face["crop"]), cv2.IMREAD_UNCHANGED), crops[1, :, :, 0])
    np.testing.assert_array_equal(cv2.imread(str(first / "frame.png")), frame)
    with pytest.raises(OutputError, match="does not exist"):
        SnapshotWriter(tmp_path / "no" / "snaps", "x", tiny_graph.path, tiny_graph.info)



@pytest.mark.parametrize("fails", ["crop", "json"])
def test_a_snapshot_that_fails_midway_leaves_no_half_snapshot(tmp_path, tiny_graph, monkeypatch, fails):
    """A snapshot whose crop could not be written left its folder with frame.png alone, and one
    whose snapshot.json hit a full disk left half a JSON file that `camface guided snaps/` then
    took for a snapshot and failed to read. Now the folder goes and the error names the file."""
    import errno

    from camface.realtime import snapshot as snapshot_module
    from camface.realtime.snapshot import find_snapshots

    snaps = tmp_path / "snaps"
    writer = SnapshotWriter(snaps, "clip.mp4", tiny_graph.path, tiny_graph.info)
    frame = np.full((60, 80, 3), 7, np.uint8)
    crops = np.zeros((2, 32, 32, 1), np.uint8)
    faces = [Face((1, 2, 30, 30), 0.9, crop_box=(0, 1, 32, 32)), Face((40, 20, 30, 30), 0.5, crop_box=(39, 19, 32, 32))]
    result = _result(faces, [np.ones((4, 4), np.float32)] * 2)
    first = writer.save(frame, crops, result)
    if fails == "crop":
        imwrite = cv2.imwrite
        monkeypatch.setattr(snapshot_module.cv2, "imwrite",
                            lambda path, image: False if path.endswith("face_01.png") else imwrite(path, image))
        message = "cannot write .*frame_000000-2/face_01.png"
    else:
        write_text = Path.write_text

        def disk_fills(path, text, *args, **kwargs):
            write_text(path, text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(Path, "write_text", disk_fills)
        message = "cannot write .*frame_000000-2/snapshot.json: No space left on device"
    with pytest.raises(OutputError, match=message):
        writer.save(frame, crops, result)
    assert [p.name for p in snaps.iterdir()] == [first.name] and find_snapshots([snaps]) == [first]
    assert writer.count == 1 and writer.last == first
    monkeypatch.undo()
    assert writer.save(frame, crops, result).name == "frame_000000-2"


# ---- regressions found in review of the live loop

@pytest.mark.parametrize("char", ["\u00b2", "\u00b3", "\u00b9"])  # ² (AZERTY top-left key), ³, ¹
def test_superscript_digit_keys_are_ignored_not_a_crash(char):
    """cv2.waitKey returns the low byte of the key (Latin-1): '²'.isdigit() is True but
    int('²') raises ValueError, which used to stop the live loop."""
    controls = Controls(method="gradcam", explained_class=1)
    assert apply_key(controls, ord(char), ("gradcam",), 7) == (controls, None)
    assert apply_key(controls, ord("2"), ("gradcam",), 7) == (Controls("gradcam", explained_class=2), None)


def test_live_source_interrupted_while_opening_releases_the_camera(monkeypatch):
    """Ctrl-C while the camera's frame rate is being measured: `with` never calls __exit__
    for a failed __enter__, so __enter__ itself must stop the reader thread and release."""
    camera = FakeCamera()

    def interrupted(self, frames=10):
        raise KeyboardInterrupt

    monkeypatch.setattr(LiveSource, "_measure_fps", interrupted)
    source = LiveSource(0, timeout_s=0.5, opener=lambda target, timeout: camera)
    with pytest.raises(KeyboardInterrupt):
        with source:
            pass
    assert camera.released
    assert source._thread is not None and not source._thread.is_alive()


@pytest.mark.parametrize("error, message", [
    (cv2.error("VIDEOIO(V4L2): select() failed"), r"camera 0 stopped delivering frames after 20 frames"),
    (RuntimeError("driver gone"), r"camera 0 failed after 20 frames: driver gone"),
])
def test_a_camera_whose_read_raises_ends_with_what_happened(error, message):
    """A backend's read error counts as a failed read (a stream would reconnect); anything else
    ends the iteration with its message at once. The reader thread died with a traceback and
    the loop waited out its time-out, then said the camera "delivered no frame"."""

    class Breaks(FakeCamera):
        def read(self):
            if self.reads >= 20:
                raise error
            return super().read()

    frames = 0
    with pytest.raises(SourceError, match=message):
        with LiveSource(0, timeout_s=5.0, opener=lambda target, timeout: Breaks()) as source:
            for _ in source:
                frames += 1
    assert 0 < frames <= 20


def test_face_detector_failing_warm_up_is_closed(monkeypatch):
    """An error (or Ctrl-C) in the warm-up detection inside __enter__ left MediaPipe's
    detector open: it must be closed explicitly."""
    from camface.models import DETECTORS
    from camface.realtime.detect import FaceDetector

    def interrupted(self, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(FaceDetector, "detect", interrupted)
    detector = FaceDetector(DETECTORS["short"])
    with pytest.raises(KeyboardInterrupt):
        with detector:
            pass
    assert detector._detector is None


def test_image_folder_skips_images_of_unsupported_type(tmp_path, caplog):
    """A signed 16-bit TIFF in a folder raised a bare ValueError (no file named) and stopped
    the run; like an unreadable file it is skipped with a warning naming it."""
    cv2.imwrite(str(tmp_path / "01.png"), np.full((6, 8, 3), 50, np.uint8))
    cv2.imwrite(str(tmp_path / "02.tiff"), np.full((6, 8), 200, np.int16))
    cv2.imwrite(str(tmp_path / "03.png"), np.full((6, 8, 3), 90, np.uint8))
    with caplog.at_level(logging.WARNING), ImageFolderSource(tmp_path) as source:
        frames = list(source)
    assert [int(f[0, 0, 0]) for f in frames] == [50, 90]
    assert "02.tiff" in caplog.text


def test_image_folder_says_why_a_file_was_skipped(tmp_path, caplog, monkeypatch):
    from camface.realtime import sources

    cv2.imwrite(str(tmp_path / "01.png"), np.full((6, 8, 3), 50, np.uint8))
    (tmp_path / "02.png").write_bytes(b"not a png")
    (tmp_path / "03.png").write_bytes(b"")
    readable = os.access
    cv2.imwrite(str(tmp_path / "04.png"), np.full((6, 8, 3), 70, np.uint8))
    monkeypatch.setattr(sources.os, "access", lambda path, mode: readable(path, mode) and Path(path).name != "03.png")
    with caplog.at_level(logging.WARNING), ImageFolderSource(tmp_path) as source:
        frames = iter(source)
        next(frames)
        (tmp_path / "04.png").unlink()  # deleted while the run goes on: it was "permission denied"
        assert list(frames) == []
    assert "02.png: not an image OpenCV can read" in caplog.text
    assert "03.png: permission denied" in caplog.text  # (root reads anything: the check is faked here)
    assert "04.png: it is gone (deleted or moved since the folder was listed)" in caplog.text


def test_a_folder_that_cannot_be_listed_is_a_source_error_naming_it(tmp_path, monkeypatch, capsys):
    """A folder without read permission raised PermissionError from its listing: a traceback
    and exit 1 from `camface live`, not the one line and exit 2 of other bad sources."""
    import errno

    from camface.cli import main

    real = Path.iterdir

    def refused(path):  # root lists any folder: as chmod 000 does for a user
        if path == tmp_path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)

    monkeypatch.setattr(Path, "iterdir", refused)
    with pytest.raises(SourceError, match=f"cannot list folder {re.escape(str(tmp_path))}: Permission denied"):
        ImageFolderSource(tmp_path).__enter__()
    assert main(["live", "--source", str(tmp_path), "--no-show"]) == 2
    assert f"camface: error: --source: cannot list folder {tmp_path}: Permission denied" in capsys.readouterr().err


def test_a_jpeg_cut_short_is_named(tmp_path, caplog, astronaut_bgr):
    """OpenCV decodes a JPEG that ends early without an error, its lower rows grey, and libjpeg's
    own line names no file: the folder warns by name. Whole JPEGs (baseline, progressive, with
    an EXIF thumbnail's own end marker before the image) and other formats are not named."""
    from PIL import Image

    from camface.realtime.sources import cut_short

    whole = cv2.imencode(".jpg", astronaut_bgr)[1].tobytes()
    progressive = cv2.imencode(".jpg", astronaut_bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    photo = Image.fromarray(astronaut_bgr[:, :, ::-1])
    photo.save(tmp_path / "thumbnail.jpg", exif=_exif_with_thumbnail(astronaut_bgr))
    (tmp_path / "01.jpg").write_bytes(whole)
    (tmp_path / "02.jpg").write_bytes(whole[:len(whole) * 3 // 4])
    (tmp_path / "03.jpg").write_bytes(progressive)
    (tmp_path / "04.jpg").write_bytes(progressive[:len(progressive) - 2000])
    cv2.imwrite(str(tmp_path / "05.png"), astronaut_bgr)
    thumbnail_cut = (tmp_path / "thumbnail.jpg").read_bytes()
    assert thumbnail_cut.count(b"\xff\xd9") == 2  # the thumbnail's end marker, then the image's
    (tmp_path / "06.jpg").write_bytes(thumbnail_cut[:len(thumbnail_cut) - 5000])
    named = {p.name for p in tmp_path.iterdir() if cut_short(p)}
    assert named == {"02.jpg", "04.jpg", "06.jpg"}
    with caplog.at_level(logging.WARNING), ImageFolderSource(tmp_path) as source:
        frames = list(source)
    assert len(frames) == 7  # named, still shown: the upper part may hold the faces
    assert frames[1][-20:].std() < 1.0 and frames[0][-20:].std() > 10  # the cut one: grey rows
    for name in ("02.jpg", "04.jpg", "06.jpg"):
        assert f"{name}: a JPEG cut short" in caplog.text
    assert "01.jpg:" not in caplog.text and "thumbnail.jpg:" not in caplog.text


def _exif_with_thumbnail(bgr) -> bytes:
    """EXIF bytes carrying a small JPEG (its own start, scan and end markers) ahead of the main
    image's, as cameras embed a thumbnail."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 1
    return exif.tobytes() + cv2.imencode(".jpg", cv2.resize(bgr, (64, 64)))[1].tobytes()


def test_image_folder_turns_photos_upright_and_keeps_depth_and_alpha_as_before(tmp_path):
    """A phone's portrait JPEG is stored on its side with an EXIF orientation: it comes in as
    viewers show it (faces upright). 16-bit and BGRA images still reach to_bgr8 as stored."""
    from PIL import Image

    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:, :50] = 255  # white on the left as stored
    photo = Image.fromarray(wide[:, :, ::-1])
    exif = photo.getexif()
    exif[0x0112] = 6  # stored rotated: show it turned 90 degrees clockwise
    photo.save(tmp_path / "01.jpg", exif=exif.tobytes())
    cv2.imwrite(str(tmp_path / "02.png"), np.full((6, 8, 3), 0x1234, np.uint16))
    cv2.imwrite(str(tmp_path / "03.png"), np.dstack([np.full((6, 8), v, np.uint8) for v in (1, 2, 3, 128)]))
    with ImageFolderSource(tmp_path) as source:
        upright, deep, alpha = list(source)
    assert upright.shape == (200, 100, 3)  # tall, as shown
    assert upright[:40].mean() > 240 and upright[-40:].mean() < 15  # the left white band is now the top
    assert deep.shape == (6, 8, 3) and int(deep[0, 0, 0]) == 0x12  # the top 8 bits, as before
    assert alpha.shape == (6, 8, 3) and tuple(int(v) for v in alpha[0, 0]) == (1, 2, 3)


@pytest.mark.parametrize("suffix", [".jfif", ".jpe", ".JFIF"])
def test_a_jfif_or_jpe_photo_is_an_image_turned_upright(tmp_path, suffix):
    """`.jfif` / `.jpe` (JPEG's other suffixes: browsers save .jfif) went to FFmpeg as a video,
    which ignores the EXIF orientation, and enroll / train skipped them: they are images, read
    upright, by every command (one list: sources.IMAGE_SUFFIXES)."""
    from PIL import Image

    from camface.export.enroll import scan_people
    from camface.models.dataset import IMAGE_SUFFIXES as dataset_suffixes
    from camface.realtime.sources import IMAGE_SUFFIXES, make_source

    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:, :50] = 255
    photo = Image.fromarray(wide)
    exif = photo.getexif()
    exif[0x0112] = 6
    (tmp_path / "alice").mkdir()
    path = tmp_path / "alice" / f"portrait{suffix}"
    photo.save(path, format="JPEG", exif=exif.tobytes())
    source = make_source(str(path))
    assert isinstance(source, ImageFolderSource)
    with source:
        (upright,) = list(source)
    assert upright.shape == (200, 100, 3) and upright[:40].mean() > 240 and upright[-40:].mean() < 15
    assert scan_people(tmp_path) == {"alice": [path]}
    assert dataset_suffixes is IMAGE_SUFFIXES


# ---- the graph runs only what the method needs

def test_graph_runs_a_pruned_session_per_method_with_the_same_values(tiny_graph_path, monkeypatch):
    """ONNX Runtime runs every node whatever outputs are asked for: CamGraph runs each method on
    the graph pruned to probs + that heatmap, with the whole graph's values; without `onnx` it
    runs the whole graph."""
    import sys

    from camface.realtime.graph import CamGraph

    crops = np.random.default_rng(4).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    classes = np.array([-1, 0, 1], np.int64)
    graph = CamGraph(tiny_graph_path, "cpu")
    feeds = {"image": crops, "class_index": classes}
    whole = dict(zip(["probs", "gradcam", "cam"], graph.session.run(["probs", "gradcam", "cam"], feeds)))
    for method in ("gradcam", "cam", "none"):
        probs, heatmaps = graph.run(crops, classes, method)
        np.testing.assert_allclose(probs, whole["probs"], rtol=1e-6)
        if method != "none":  # a pruned graph may fuse other nodes (other kernels): float32 rounding on the map's scale
            np.testing.assert_allclose(heatmaps, whole[method], rtol=1e-5, atol=1e-6 * np.abs(whole[method]).max())
        session, _ = graph._session_for(method)
        assert session is not graph.session
        assert {o.name for o in session.get_outputs()} == {"probs"} | ({method} if method != "none" else set())
    monkeypatch.setitem(sys.modules, "onnx", None)  # a core install without the onnx package
    bare = CamGraph(tiny_graph_path, "cpu")
    probs, heatmaps = bare.run(crops, classes, "gradcam")
    assert bare._session_for("gradcam")[0] is bare.session
    np.testing.assert_allclose(heatmaps, whole["gradcam"], rtol=1e-6)  # the very session `whole` ran


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="X displays as on Linux")
def test_a_display_that_does_not_answer_opens_no_window(monkeypatch, capsys, caplog):
    """A DISPLAY left over from a closed session: OpenCV's Qt would abort the process (exit 134,
    no summary). live runs without a window instead, and --show is one error line."""
    import socket

    from camface.cli import main as camface_main
    from camface.realtime.window import display_problem

    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    if port <= 6000:
        server.close()
        pytest.skip("no TCP port above 6000 to stand for an X display")
    display = f"127.0.0.1:{port - 6000}.0"
    monkeypatch.setenv("DISPLAY", display)
    assert display_problem() is None  # an X server would answer there
    server.close()
    assert display_problem() == f"no X server answers on DISPLAY={display}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a local display, as Xvfb serves it
    number = 40000 + os.getpid() % 20000
    abstract.bind(f"\0/tmp/.X11-unix/X{number}")
    abstract.listen()
    monkeypatch.setenv("DISPLAY", f":{number}")
    assert display_problem() is None
    abstract.close()
    assert display_problem() == f"no X server answers on DISPLAY=:{number}"
    monkeypatch.delenv("DISPLAY")
    assert display_problem() == "DISPLAY / WAYLAND_DISPLAY is not set"

    monkeypatch.setenv("DISPLAY", display)  # nothing there any more
    assert camface_main(["live", "--source", "sample", "--show", "--max-frames", "1"]) == 2
    assert f"--show needs a display (no X server answers on DISPLAY={display})" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING):
        assert camface_main(["live", "--source", "sample", "--max-frames", "2", "--detect-every", "1"]) == 0
    assert f"no window (no X server answers on DISPLAY={display})" in caplog.text
    assert "; 2 frames, " in capsys.readouterr().err


def test_rates_below_ten_fps_are_not_printed_as_zero():
    """A folder's images held 2 s each pass at 0.5 fps: the summary line and the HUD said 0 fps."""
    from camface.realtime.render import HudAnnotator
    from camface.realtime.summary import RunSummary
    from camface.realtime.timing import fps_text

    assert [fps_text(f) for f in (0.0, 0.5, 0.333, 2.94, 9.96, 30.2, 112.4)] == \
        ["0", "0.5", "0.33", "2.9", "10", "30", "112"]
    summary = RunSummary(frames=3, faces=6, dropped=0, fps=0.5, wall_s=6.0, stages={}, provider="CPU",
                         source="photos", pace_fps=0.5, still=True)
    assert "; 3 frames, 2.0 faces/frame, 0.5 fps (each image held 2 s)" in summary.line()
    one = RunSummary(frames=1, faces=1, dropped=0, fps=0.0, wall_s=0.1, stages={}, provider="CPU",
                     source="photo.jpg", pace_fps=0.5, still=True)  # one photo: "1 frames, ... 0 fps" before
    assert "; 1 frame, 1.0 faces/frame, no rate (one frame)" in one.line() and "fps" not in one.line()
    hud = HudAnnotator().lines(FrameResult(index=2, faces=(), predictions=(), dropped=0, method="gradcam",
                                           explained_class=None, labels=("a",), fps=0.5, stage_ms={},
                                           provider="CPUExecutionProvider", pace_fps=0.5))
    assert hud[0] == "0.5 fps shown (paced to 0.5)"


@pytest.mark.parametrize("error", [None, OSError, KeyboardInterrupt])
def test_written_beside_replaces_the_files_whole_or_not_at_all(tmp_path, error):
    """The files of one command (enroll's graph, gallery, report and figure; train's and export's
    graph) are written beside their names and renamed when all are done: a failure leaves the
    earlier files as they were and nothing beside them; a file the command did not write this
    time (a figure without matplotlib) leaves no earlier one beside the new ones."""
    finals = [tmp_path / "g.onnx", tmp_path / "g.npz", tmp_path / "g.png"]
    for final in finals:
        final.write_text(f"earlier {final.name}")
    with pytest.raises(error) if error else contextlib.nullcontext():
        with written_beside(*finals) as staged:
            assert [p.parent for p in staged] == [tmp_path] * 3 and [p.suffix for p in staged] == [".onnx", ".npz", ".png"]
            staged[0].write_text("new graph")
            staged[1].write_text("new gallery")
            if error:
                raise error("stopped")
    left = {p.name: p.read_text() for p in tmp_path.iterdir()}
    if error:
        assert left == {final.name: f"earlier {final.name}" for final in finals}
    else:
        assert left == {"g.onnx": "new graph", "g.npz": "new gallery"}


@pytest.mark.parametrize("raise_in_block, kind, message", [
    (lambda staged: OutputError(f"cannot write {staged[0]}: No space left on device"), OutputError,
     "cannot write {0}: No space left on device"),
    (lambda staged: ModelError(f"{staged[0]}: not a CAM graph"), ModelError, "{0}: not a CAM graph"),
    (lambda staged: OSError(28, "No space left on device", str(staged[1])), OutputError,
     "cannot write {1}: No space left on device"),
])
def test_an_error_of_a_file_written_beside_names_the_file_asked_for(tmp_path, raise_in_block, kind, message):
    """enroll, train and export write beside their outputs: a failure there (a full disk, a
    ranking that cannot load the graph) named the hidden temporary file (.g.onnx.1234.partial.onnx),
    not the -o path the user gave; it now names that path, and nothing is left beside it."""
    finals = [tmp_path / "g.onnx", tmp_path / "g.npz"]
    with pytest.raises(kind) as raised:
        with written_beside(*finals) as staged:
            staged[0].write_text("half")
            raise raise_in_block(staged)
    assert str(raised.value) == message.format(*finals)
    assert list(tmp_path.iterdir()) == []


def test_an_error_naming_no_file_written_beside_passes_unchanged(tmp_path):
    error = OSError(28, "No space left on device")
    with pytest.raises(OSError) as raised:
        with written_beside(tmp_path / "g.onnx"):
            raise error
    assert raised.value is error


def test_an_error_renamed_by_written_beside_keeps_its_type_and_attributes(tmp_path):
    """A camface error whose message names the temporary file is raised again renamed, not
    rebuilt: an error whose class takes more than the message (evaluate's NoFaces) stays whole."""
    from camface.evaluate.crops import NoFaces

    final = tmp_path / "g.onnx"
    with pytest.raises(NoFaces) as raised:
        with written_beside(final) as (staged,):
            raise NoFaces(f"no faces found for {staged}", 7)
    assert str(raised.value) == f"no faces found for {final}" and raised.value.frames == 7


@pytest.mark.parametrize("fails, said", [
    ("open elsewhere", "No such file or directory: '{folder}/g.npz/g.npz'"),  # about another file: as it is
    ("OSError naming it", "cannot write {folder}/g.npz: No space left on device"),  # numpy's open() on a full disk
    ("OutputError naming it", "cannot write {folder}/g.onnx: disk full"),  # convert.save's
    ("ModelError naming it", "CAM graph g.onnx: corrupt"),  # its name alone (CamGraph's log and errors)
])
def test_written_beside_errors_name_the_finals_never_a_temporary_file(tmp_path, fails, said):
    import errno

    from camface.errors import CamfaceError, ModelError, OutputError

    finals = [tmp_path / "g.onnx", tmp_path / "g.npz"]
    with pytest.raises((OSError, CamfaceError)) as caught:
        with written_beside(*finals) as (graph, gallery):
            if fails == "open elsewhere":
                open(tmp_path / "g.npz" / "g.npz")
            elif fails == "OSError naming it":
                raise OSError(errno.ENOSPC, "No space left on device", str(gallery))
            elif fails == "OutputError naming it":
                raise OutputError(f"cannot write {graph}: disk full")
            else:
                raise ModelError(f"CAM graph {graph.name}: corrupt")
    assert said.format(folder=tmp_path) in str(caught.value) and ".partial" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("names_a_file", [False, True])
def test_an_error_naming_no_file_while_writing_a_final_names_that_final(tmp_path, names_a_file):
    """`writing(path)` around a write inside written_beside: a full disk naming no file (write()
    as numpy's savez and Path.write_text raise it) names the final being written; an OSError
    about another file (an input) passes as it is."""
    import errno

    from camface.outputs import writing

    finals = [tmp_path / "g.onnx", tmp_path / "g.npz"]
    other = tmp_path / "input.png"
    with pytest.raises((OSError, OutputError)) as raised:
        with written_beside(*finals) as (graph, gallery):
            with writing(gallery):
                raise OSError(errno.ENOSPC, "No space left on device", *([str(other)] if names_a_file else []))
    if names_a_file:
        assert not isinstance(raised.value, OutputError) and raised.value.filename == str(other)
    else:
        assert isinstance(raised.value, OutputError)
        assert str(raised.value) == f"cannot write {finals[1]}: No space left on device"
    assert list(tmp_path.iterdir()) == []
