"""BlazeFace on ONNX Runtime (camface.realtime.blazeface) against MediaPipe Tasks' FaceDetector
on the same bundled models: the same faces and boxes on real faces, none on an empty image;
and its pieces (anchors, decoding, weighted NMS, letterbox) on hand-computed arrays."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from camface.api import face_detector
from camface.errors import ModelError, UsageError
from camface.models import DETECTORS, DETECTORS_ONNX
from camface.realtime.blazeface import ANCHORS, OnnxFaceDetector, anchor_centers, decode, letterbox, weighted_nms
from camface.realtime.config import LiveConfig
from camface.realtime.detect import FaceDetector
from realtime_helpers import moving_faces_clip


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    """uint8 BGR images: the photos packages ship, sample and moving-faces frames, no face."""
    from matplotlib import cbook
    from skimage import data

    from camface.realtime.sample import SampleSource

    sample = SampleSource(300)
    moving = moving_faces_clip(60)[0]
    out = {"astronaut": np.ascontiguousarray(data.astronaut()[:, :, ::-1]),
           "grace_hopper": cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))),
           "empty": np.full((480, 640, 3), 127, np.uint8)}
    out |= {f"sample {i}": sample.frame(i) for i in (0, 75, 150, 225)}
    out |= {f"moving {i}": moving[i] for i in (0, 15, 25, 30, 40, 59)}
    return out


@pytest.mark.parametrize("name", ["short", "full"])
def test_same_faces_as_mediapipe(name, images):
    with FaceDetector(DETECTORS[name]) as tasks, OnnxFaceDetector(DETECTORS_ONNX[name]) as onnx:
        faces_seen = 0
        for label, image in images.items():
            expected, got = tasks.detect(image), onnx.detect(image)
            assert len(got) == len(expected), label
            for want, have in zip(expected, got):  # both largest first
                assert iou(want.box, have.box) >= 0.95, (label, want.box, have.box)
                assert have.score == pytest.approx(want.score, abs=0.01), label
            faces_seen += len(expected)
    assert faces_seen >= 10  # the images hold faces for both models
    with pytest.raises(UsageError, match="outside its `with` block"):
        onnx.detect(images["empty"])


def test_empty_image_has_no_face(images):
    with OnnxFaceDetector(DETECTORS_ONNX["full"]) as onnx:
        assert onnx.detect(images["empty"]) == ()
        assert onnx.detect(np.zeros((48, 64, 3), np.uint8)) == ()


def test_the_config_picks_the_runtime():
    assert isinstance(face_detector(LiveConfig()), OnnxFaceDetector)
    assert isinstance(face_detector(LiveConfig(detector_runtime="mediapipe")), FaceDetector)
    assert face_detector(LiveConfig(detector="short")).model_path == DETECTORS_ONNX["short"]
    with pytest.raises(UsageError, match="--detector-runtime must be one of onnx, mediapipe"):
        LiveConfig(detector_runtime="tflite")


def test_anchors_are_mediapipes():
    short, full = anchor_centers(ANCHORS[128]), anchor_centers(ANCHORS[192])
    assert short.shape == (896, 2) and full.shape == (2304, 2)
    # short-range: 16x16 cells of 2 anchors (stride 8), then 8x8 cells of 6 (three stride-16 layers)
    np.testing.assert_allclose(short[:3], [[0.5 / 16, 0.5 / 16]] * 2 + [[1.5 / 16, 0.5 / 16]])
    np.testing.assert_allclose(short[512:519], [[0.5 / 8, 0.5 / 8]] * 6 + [[1.5 / 8, 0.5 / 8]])
    np.testing.assert_allclose(short[-1], [7.5 / 8, 7.5 / 8])
    np.testing.assert_allclose(full[[0, 1, 48, -1]], [[0.5 / 48, 0.5 / 48], [1.5 / 48, 0.5 / 48],
                                                      [0.5 / 48, 1.5 / 48], [47.5 / 48, 47.5 / 48]])


def test_decode_by_hand():
    anchors = np.array([[0.25, 0.5], [0.75, 0.5], [0.5, 0.5]], np.float32)
    raw = np.zeros((3, 16), np.float32)
    raw[0, :4] = [12.8, -6.4, 32, 64]  # centre moved by (0.1, -0.05), size 0.25 x 0.5 of a 128 input
    raw[1, :4] = [0, 0, -1, 10]  # negative width: dropped
    logits = np.array([1e4, 3.0, -2.0], np.float32)  # clipped at 100: score 1; 3 -> 0.953; -2 -> 0.119
    boxes, scores = decode(raw, logits, anchors, 128, 0.5)
    np.testing.assert_allclose(boxes, [[0.35 - 0.125, 0.45 - 0.25, 0.35 + 0.125, 0.45 + 0.25]], atol=1e-6)
    np.testing.assert_allclose(scores, [1.0])
    _, scores = decode(raw, logits, anchors, 128, 0.1)
    np.testing.assert_allclose(scores, [1.0, 1 / (1 + np.exp(2.0))], rtol=1e-6)


def test_weighted_nms_by_hand():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 40]], np.float32)
    scores = np.array([0.9, 0.6, 0.8, 0.7], np.float32)
    out, out_scores = weighted_nms(boxes, scores, 0.3)
    # box 1 overlaps box 0 at IoU 9/11 -> merged, weights 0.9 and 0.6; box 3 at IoU 0.25 stays
    np.testing.assert_allclose(out, [[0.4, 0, 10.4, 10], [20, 20, 30, 30], [0, 0, 10, 40]], atol=1e-5)
    np.testing.assert_allclose(out_scores, [0.9, 0.8, 0.7])
    assert weighted_nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))[0].shape == (0, 4)


def test_letterbox_centres_the_frame_in_a_black_square():
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, :, 2] = 255  # red in BGR
    tensor, x0, y0, side = letterbox(frame, 128)
    assert tensor.shape == (1, 128, 128, 3) and tensor.dtype == np.float32
    assert (x0, y0, side) == (0.0, -50.0, 200.0)
    np.testing.assert_allclose(tensor[0, 64, 64], [1, -1, -1])  # RGB in [-1, 1]
    np.testing.assert_allclose(tensor[0, 5, 64], [-1, -1, -1])  # the padding above the frame
    np.testing.assert_allclose(tensor[0, 122, 64], [-1, -1, -1])


def test_misuse(tmp_path):
    with pytest.raises(ModelError, match="face detector model not found: .*nowhere.onnx"):
        OnnxFaceDetector(tmp_path / "nowhere.onnx").__enter__()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load face detector .*broken.onnx"):
        OnnxFaceDetector(broken).__enter__()
    import onnx
    from onnx import TensorProto, helper

    other = tmp_path / "other.onnx"  # NCHW 224 input, one output: not BlazeFace
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 224, 224])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), other)
    with pytest.raises(ModelError, match="other.onnx: input .* not a BlazeFace model's"):
        OnnxFaceDetector(other).__enter__()


def test_frame_box_clips_the_edges_by_hand():
    """A box partly out of the frame keeps its inner edges: cut at 0, not moved inside (MediaPipe
    bounds corner and size each, which moves a box out on the left or top inside, whole)."""
    from camface.realtime.blazeface import frame_box

    # 200 x 100 frame letterboxed into the square x0 = 0, y0 = -50, side 200 (binary fractions: exact)
    assert frame_box((0.25, 0.25, 0.75, 0.75), 0.0, -50.0, 200.0, 200, 100) == (50, 0, 100, 100)
    assert frame_box((0.25, 0.375, 0.5, 0.625), 0.0, -50.0, 200.0, 200, 100) == (50, 25, 50, 50)
    assert frame_box((-0.125, 0.375, 0.125, 0.625), 0.0, -50.0, 200.0, 200, 100) == (0, 25, 25, 50)  # half out left
    assert frame_box((0.375, 0.125, 0.625, 0.375), 0.0, -50.0, 200.0, 200, 100) == (75, 0, 50, 25)  # half out top
    assert frame_box((0.875, 0.625, 1.125, 0.875), 0.0, -50.0, 200.0, 200, 100) == (175, 75, 25, 25)  # right, bottom
    assert frame_box((-0.375, 0.375, -0.125, 0.625), 0.0, -50.0, 200.0, 200, 100) is None  # wholly outside
    assert frame_box((0.375, 0.0, 0.625, 0.25), 0.0, -50.0, 200.0, 200, 100) is None


@pytest.mark.parametrize("runtime", ["onnx", "mediapipe"])
def test_a_face_out_of_the_left_or_top_edge_gets_the_visible_part(images, runtime):
    """The astronaut and Grace Hopper with 20% or 40% of their face cut off at the left or the
    top: the box ends where the face does (the full image's box less the cut), within 20% of
    the face's size (the detector's own box changes on a cut face: up to 15% measured; the
    mediapipe runtime's corner is estimated from keypoints); MediaPipe's own box ran a whole
    face's width from the edge, 20-40% too far. Both runtimes agree to IoU 0.7."""
    boxes_seen = 0
    with face_detector(LiveConfig(detector_runtime=runtime)) as detector, OnnxFaceDetector(DETECTORS_ONNX["full"]) as onnx:
        for name in ("astronaut", "grace_hopper"):
            image = images[name]
            (x, y, w, h), = [f.box for f in detector.detect(image)]
            for fraction in (0.2, 0.4):
                for axis in ("left", "top"):
                    if axis == "left":
                        cut = int(x + fraction * w)
                        part, end, size = image[:, cut:], x + w - cut, w
                    else:
                        cut = int(y + fraction * h)
                        part, end, size = image[cut:], y + h - cut, h
                    faces = detector.detect(np.ascontiguousarray(part))
                    if not faces:  # 40% of the astronaut's face cut at the top: too little for the detector
                        continue
                    px, py, pw, ph = faces[0].box
                    assert (px if axis == "left" else py) == 0, (name, fraction, axis)
                    got = px + pw if axis == "left" else py + ph
                    assert abs(got - end) <= 0.2 * size, (name, fraction, axis, faces[0].box, end)
                    assert iou(faces[0].box, onnx.detect(np.ascontiguousarray(part))[0].box) >= 0.7
                    boxes_seen += 1
    assert boxes_seen >= 7
