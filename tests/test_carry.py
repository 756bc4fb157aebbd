"""`--detect-every`: detection on key frames, boxes carried by optical flow in between
(camface.realtime.carry), against detection on every frame, on clips of real faces that move
fast, scale, enter and leave (tests/realtime_helpers.py: `moving_faces_clip`)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from camface.api import face_detector
from camface.models import EMOTION_ONNX
from camface.realtime.carry import (AUTO_EVERY, FLOW_WIDTH, MAX_DOWNSCALE, MAX_MOVE, BoxCarrier, _downscale, _grey,
                                    _median, _moved, _region, every_for, keyframe)
from camface.realtime.config import LiveConfig
from realtime_helpers import carry_accuracy, moving_faces_clip


@pytest.fixture(scope="module")
def detector():
    with face_detector(LiveConfig()) as blazeface:  # the default: full-range, as every front end opens it
        yield blazeface


@pytest.fixture(scope="module")
def clips(detector):
    """name -> (frames, truth or None, every-frame detection)."""
    from camface.realtime.sample import SampleSource

    sample = SampleSource(300)
    out = {"moving 60": moving_faces_clip(60), "moving 120": moving_faces_clip(120),
           "moving 180": moving_faces_clip(180),
           "sample": ([sample.frame(i) for i in range(300)], None)}
    # The same faces twice as large in a 1280x960 frame: boxes of 100-300 px, flow at 1/4-1/8.
    frames, truth = moving_faces_clip(120)
    out["moving 120 at 1280x960"] = ([cv2.resize(f, (1280, 960), interpolation=cv2.INTER_LINEAR) for f in frames],
                                     [{n: tuple(2 * v for v in box) for n, box in t.items()} for t in truth])
    return {name: (frames, truth, [detector.detect(f) for f in frames]) for name, (frames, truth) in out.items()}


def carried(detector, frames, every, start=0, max_move=MAX_MOVE):
    carrier = BoxCarrier(detector, every, max_move)
    return [carrier.detect(frame, index) for index, frame in enumerate(frames[start:], start)], carrier


# clip, N, least fraction of face-frames with IoU >= 0.9 against every-frame detection. The
# detector itself reaches IoU >= 0.9 with its own boxes on the same faces shifted by 2 pixels
# on only 96-98% of them (benchmarks/RESULTS-detect-every.md): the bound for any carrying. With
# re-detection of boxes that moved far (MAX_MOVE), auto meets 95% on the fast clips too.
# The sample gives 95.6% here, but 94.6-95.6% with its frames perturbed by +-1 grey level (3
# seeds): its slow faces sit at the 95% whatever the CPU's rounding, so the suite asks
# 94% of it; the moving clips stay at 95.2-98.3% under the same noise and are held to 95%.
ACCURACY = [("sample", AUTO_EVERY, 0.94), ("moving 60", AUTO_EVERY, 0.95), ("moving 120", AUTO_EVERY, 0.95),
            ("moving 180", AUTO_EVERY, 0.95), ("moving 120", 2, 0.95), ("moving 120", 3, 0.93),
            ("moving 120 at 1280x960", AUTO_EVERY, 0.95)]


@pytest.mark.parametrize("name, every, least", ACCURACY)
def test_carried_boxes_match_detection_on_every_frame(detector, clips, name, every, least):
    frames, truth, every_frame = clips[name]
    boxes, carrier = carried(detector, frames, every)
    accuracy = carry_accuracy(boxes, every_frame, truth)
    assert accuracy["face_frames"] >= len(frames)  # at least one face a frame on average
    assert accuracy["iou90"] >= least
    assert accuracy["late"] <= 3  # a face that appears is boxed within 3 frames
    assert accuracy["stale"] <= 3  # a face that leaves loses its box within 3 frames
    assert carrier.detections == -(-len(frames) // every) + carrier.redetections  # key frames 0, N, 2N, ...
    if name == "sample":  # slow faces: the detector runs on key frames only (and rarely more)
        assert carrier.redetections <= 3 and carrier.detections <= len(frames) // every + 4


def test_fast_faces_are_detected_more_often_slow_ones_on_key_frames(detector, clips):
    """A box carried more than MAX_MOVE of its width from its detection is detected again:
    on the fast clip that is what lifts auto from about 82% to over 95% (ACCURACY)."""
    frames, truth, every_frame = clips["moving 60"]
    rigid, rigid_carrier = carried(detector, frames, AUTO_EVERY, max_move=None)
    moving, moving_carrier = carried(detector, frames, AUTO_EVERY)
    assert rigid_carrier.redetections <= 2 < 10 < moving_carrier.redetections
    assert carry_accuracy(rigid, every_frame, truth)["iou90"] < 0.9 <= carry_accuracy(moving, every_frame,
                                                                                       truth)["iou90"]
    detected = np.array([10.0, 20.0, 50.0, 60.0])  # 40 wide
    assert _moved(detected, detected) == 0.0
    assert _moved(detected, detected + [3, 4, 3, 4]) == pytest.approx(5 / 40)  # the centre moved 5 px
    assert _moved(detected, np.array([8.0, 18.0, 52.0, 62.0])) == pytest.approx(0.1)  # 10% wider


def test_flow_runs_on_a_region_around_each_box_downscaled_to_its_size():
    """A box's flow image covers the box grown by a margin (aligned to the downscale factor,
    clipped to the frame), downscaled by the power of two that leaves the box FLOW_WIDTH to
    2 x FLOW_WIDTH flow pixels wide; its pixels are those of the whole frame's flow image there."""
    assert [_downscale(w) for w in (20, 63, 64, 127, 128, 255, 256, 2000)] == [1, 1, 2, 2, 4, 4, 8, MAX_DOWNSCALE]
    assert all(FLOW_WIDTH <= w / _downscale(w) < 2 * FLOW_WIDTH for w in (64, 100, 128, 200, 255))
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (480, 640, 3), np.uint8)
    for box in ([100.0, 50.0, 300.0, 290.0], [-30.0, 400.0, 90.0, 520.0], [600.0, 10.0, 700.0, 100.0]):
        box = np.array(box)
        factor = _downscale(box[2] - box[0])
        x0, y0, x1, y1 = region = _region(box, factor, frame.shape)
        assert all(v % factor == 0 for v in region) and 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
        assert x0 <= max(box[0], 0) and y0 <= max(box[1], 0) and x1 >= min(box[2], 640) and y1 >= min(box[3], 480)
        assert (x1 - x0) * (y1 - y0) < 0.6 * 640 * 480  # a region, not the frame
        whole = _grey(frame, (0, 0, 640, 480), factor)
        part = _grey(frame, region, factor)
        assert part.shape == ((y1 - y0) // factor, (x1 - x0) // factor)
        assert np.array_equal(part, whole[y0 // factor:y1 // factor, x0 // factor:x1 // factor])
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY).astype(np.float64)
    means = grey.reshape(60, 8, 80, 8).mean(axis=(1, 3))  # 8 x 8 block means
    assert np.abs(_grey(frame, (0, 0, 640, 480), 8) - means).max() <= 1.5  # three halvings, each rounded
    values = rng.normal(size=(25, 2))
    assert np.array_equal(_median(values), np.median(values, axis=0))
    assert np.array_equal(_median(values[:24]), np.median(values[:24], axis=0))


def test_every_frame_is_the_detector_itself(detector, clips):
    frames, _, every_frame = clips["moving 120"]
    boxes, carrier = carried(detector, frames, 1)
    assert boxes == every_frame and carrier.detections == len(frames)


def test_a_popped_in_face_is_boxed_at_the_next_key_frame_and_a_popped_out_one_dropped(detector, clips):
    """Face C of the clip appears at frame 42 and vanishes at frame 90 of 120 (not key frames of
    N=4): boxed from frame 44 (the next key frame), unboxed from frame 92 at the latest."""
    from camface.realtime.smooth import iou

    frames, truth, _ = clips["moving 120"]
    boxes, _ = carried(detector, frames, 4)
    seen = [any(iou(face.box, t["C"]) > 0.3 for face in boxes[i]) if "C" in t else
            any(face.box[0] > 500 and face.box[1] < 200 for face in boxes[i]) for i, t in enumerate(truth)]
    appear, leave = min(i for i, t in enumerate(truth) if "C" in t), max(i for i, t in enumerate(truth) if "C" in t) + 1
    assert (appear, leave) == (42, 90)
    assert not any(seen[:appear]) and all(seen[keyframe(appear, 4) + 4:leave]) and not any(seen[leave + 2:])


def test_heatmaps_stay_on_the_faces(detector, clips):
    """The centroid of every carried face's Grad-CAM, mapped back through its crop box, lies
    inside that face's true box, as it does with detection on every frame."""
    from camface.realtime.explainer import FrameExplainer
    from camface.realtime.graph import CamGraph
    from camface.realtime.smooth import iou
    from camface.realtime.controls import Controls

    frames, truth, _ = clips["moving 120"]
    explainer = FrameExplainer(CamGraph(EMOTION_ONNX, "cpu"))
    for every in (1, AUTO_EVERY):
        boxes, _ = carried(detector, frames, every)
        inside = total = 0
        for index, (frame, faces, true) in enumerate(zip(frames, boxes, truth)):
            result = explainer.explain(frame, faces, Controls("gradcam"), index).result
            for face, prediction in zip(result.faces, result.predictions):
                heat = np.maximum(prediction.heatmap, 0)
                assert heat.sum() > 0
                rows, cols = np.mgrid[0:heat.shape[0], 0:heat.shape[1]] + 0.5
                x, y, side, _ = face.crop_box
                cx = x + (cols * heat).sum() / heat.sum() / heat.shape[1] * side
                cy = y + (rows * heat).sum() / heat.sum() / heat.shape[0] * side
                tx, ty, tw, th = max(true.values(), key=lambda b: iou(b, face.box))
                inside += tx <= cx <= tx + tw and ty <= cy <= ty + th
                total += 1
        assert total > len(frames) and inside == total, every


@pytest.mark.parametrize("start", [1, 4, 7, 50, 91])
def test_a_run_from_the_key_frame_before_gives_the_whole_runs_boxes(detector, clips, start):
    """What makes `camface batch` segments equal live: the state at a key frame depends on
    that frame only, so a segment that decodes from `keyframe(start)` gets the same boxes."""
    frames, _, _ = clips["moving 120"]
    whole, _ = carried(detector, frames, 4)
    first = keyframe(start, 4)
    assert first % 4 == 0 and first <= start < first + 4
    part, _ = carried(detector, frames, 4, start=first)
    assert part[start - first:] == whole[start:]


def test_a_gap_or_a_face_that_vanishes_detects_again(detector, clips):
    frames, _, every_frame = clips["moving 120"]
    carrier = BoxCarrier(detector, 8)
    assert carrier.detect(frames[0], 0) == every_frame[0] and carrier.detections == 1
    carrier.detect(frames[1], 1)
    assert carrier.detections == 1  # carried
    assert carrier.detect(frames[5], 5) == every_frame[5] and carrier.detections == 2  # frames 2-4 missing
    blank = np.full_like(frames[6], 128)  # the faces are gone: the flow finds nothing to follow
    assert carrier.detect(blank, 6) == () and carrier.detections == 3 and carrier.redetections == 1
    assert carrier.detect(blank, 7) == () and carrier.detections == 3  # no boxes: nothing to carry
    carrier.detect(frames[8], 8)  # key frame
    assert carrier.detections == 4
    bigger = cv2.resize(frames[9], (800, 600))  # a stream that changes its size: start over
    assert carrier.detect(bigger, 9) == detector.detect(bigger) and carrier.detections == 5
    carrier.detect(cv2.resize(frames[10], (800, 600)), 10)
    assert carrier.detections == 5  # carried at the new size


class _FakeDetector:
    """Boxes a fixed box (x, y, w, h) clipped to the frame; raises on the calls in `fail_on`."""

    def __init__(self, box, fail_on=()):
        self.box, self.fail_on, self.calls = box, set(fail_on), 0

    def detect(self, frame):
        from camface.realtime.results import Face

        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("detector hiccup")
        x, y, w, h = self.box
        height, width = frame.shape[:2]
        w, h = min(w, width - x), min(h, height - y)
        return (Face(box=(x, y, w, h), score=0.9),) if w > 0 and h > 0 else ()


@pytest.mark.parametrize("height, width", [(1, 64), (2, 64), (3, 300), (7, 300), (5, 5), (480, 3)])
def test_frames_smaller_than_the_downscale_factor_are_carried(height, width):
    """A frame thinner than a box's downscale factor: the factor shrinks to fit the frame, the
    region stays inside it, and the carried boxes stay in the frame."""
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (height, width, 3), np.uint8) for _ in range(6)]
    carrier = BoxCarrier(_FakeDetector((0, 0, 400, 400)), 4)
    for index, frame in enumerate(frames):
        for face in carrier.detect(frame, index):
            x, y, w, h = face.box
            assert 0 <= x < x + w <= width and 0 <= y < y + h <= height
    assert carrier.frames == 6 and carrier.detections >= 2
    assert _downscale(400, (height, width)) <= max(1, min(height, width))
    region = _region(np.array([0.0, 0.0, width, height]), _downscale(400, (height, width)), (height, width))
    assert 0 <= region[0] < region[2] <= width and 0 <= region[1] < region[3] <= height


def test_a_detection_that_raises_leaves_nothing_to_carry(clips):
    """serve keeps a client's carrier after a failed frame: the next frame must be detected, not
    carried from the boxes before the failure (and the failed call is not counted)."""
    frames, _, _ = clips["moving 120"]
    fake = _FakeDetector((200, 150, 100, 100), fail_on={2})
    carrier = BoxCarrier(fake, 8)
    carrier.detect(frames[0], 0)
    carrier.detect(frames[1], 1)
    assert fake.calls == 1 and carrier.detections == 1  # carried
    with pytest.raises(RuntimeError, match="hiccup"):
        carrier.detect(frames[8], 8)  # key frame: the detector raises
    assert carrier.detections == 1
    faces = carrier.detect(frames[9], 9)
    assert fake.calls == 3 and [f.box for f in faces] == [(200, 150, 100, 100)]  # detected again
    assert carrier.detections == 2 and carrier.redetections == 0
    carrier.detect(frames[10], 10)
    assert fake.calls == 3 and carrier.detections == 2  # carried from frame 9's boxes


@pytest.mark.parametrize("requested, still, workers, every", [
    ("auto", False, 0, AUTO_EVERY), ("auto", True, 0, 1), ("auto", False, 2, 1), ("auto", False, 1, AUTO_EVERY),
    (1, False, 0, 1), (3, True, 0, 3)])
def test_what_auto_means(requested, still, workers, every):
    assert every_for(requested, still, workers) == every


def test_misuse_is_refused(detector):
    with pytest.raises(ValueError, match="detect every must be >= 1"):
        BoxCarrier(detector, 0)
    with pytest.raises(ValueError, match="--detect-every must be auto or an integer >= 1"):
        LiveConfig(detect_every=0)
    with pytest.raises(ValueError, match="--detect-every must be auto"):
        LiveConfig(detect_every="often")
    with pytest.raises(ValueError, match="--detect-workers above 1 needs --detect-every 1"):
        LiveConfig(detect_every=3, detect_workers=2)
    assert LiveConfig(detect_every="auto", detect_workers=2).detect_workers == 2


def test_every_front_end_takes_the_option(capsys):
    """live runs with it and says what it did; bench, serve and batch take the flag."""
    from camface.cli import main
    from camface.realtime.loop import LiveLoop

    loop = LiveLoop(LiveConfig(source="sample", max_frames=9, detect_every=3))
    summary = loop.run()
    assert summary.frames == 9 and summary.detections == 3 and summary.detect_every == 3
    assert "detector on 3 of 9 frames, boxes carried on the others" in summary.line()
    for command in ("live", "bench", "serve", "batch"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "--detect-every N|auto" in out and "--detector-runtime {onnx,mediapipe}" in out, command
    with pytest.raises(SystemExit):
        main(["live", "--detect-every", "x"])
    assert "--detect-every" in capsys.readouterr().err


@pytest.mark.parametrize("scene", ["astronaut", "grace_hopper", "coffee", "black"])
def test_a_scene_cut_is_detected_not_carried(detector, scene):
    """A cut between key frames (the sample's faces, then a photo of the same size): the carried
    boxes' points fail the forward-backward check, so the detector runs on the new scene and
    its faces (or none) are what the frame gets; no box from before the cut survives."""
    from matplotlib import cbook
    from skimage import data

    from camface.realtime.sample import SampleSource

    before = SampleSource(300).frame(0)
    height, width = before.shape[:2]
    photos = {"astronaut": lambda: np.ascontiguousarray(data.astronaut()[:, :, ::-1]),
              "grace_hopper": lambda: cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))),
              "coffee": lambda: np.ascontiguousarray(data.coffee()[:, :, ::-1]),
              "black": lambda: np.zeros_like(before)}
    after = np.ascontiguousarray(cv2.resize(photos[scene](), (width, height), interpolation=cv2.INTER_AREA))
    carrier = BoxCarrier(detector, AUTO_EVERY)
    assert len(carrier.detect(before, 0)) >= 1
    assert carrier.detect(after, 1) == detector.detect(after)
    assert carrier.redetections == 1 and carrier.detections == 2
