"""Helpers for the live-loop tests: a tiny CAM graph that follows camface.graph_spec, built
with onnx.helper (no TensorFlow), and small synthetic clips."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from camface.graph_spec import GraphInfo

TINY_LABELS = ("bright", "dark", "flat")


def tiny_cam_graph(path: Path, color_order: str = "GRAY", size: int = 32, cam: bool = True,
                   drop_outputs: tuple[str, ...] = (), labels: tuple[str, ...] = TINY_LABELS,
                   metadata: bool = True) -> Path:
    """Write a contract-following CAM graph to `path`.

    The crop is scaled to [-1, 1], averaged over channels and over 8x8-pixel cells into a
    4x4 map p; the activations are A_k = w_k * p + b_k with w = (1, -1, 0), b = (0, 0, 0.1),
    logits the spatial mean of A (a CAM head), probs their softmax. For this linear head
    Grad-CAM (eq. 1-2 of arXiv:1610.02391) is ReLU(A_c) / 16 and CAM is A_c, so class 0
    lights up bright cells and class 1 dark cells.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    channels = 1 if color_order == "GRAY" else 3
    k = 3
    cell = size // 4
    weights = np.array([1.0, -1.0, 0.0], np.float32)
    biases = np.array([0.0, 0.0, 0.1], np.float32)
    inits = [
        numpy_helper.from_array(np.array(1 / 127.5, np.float32), "scale"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(biases, "b"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "hw_axes"),
        numpy_helper.from_array(np.array([3], np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], np.int64), "chan_axis"),
        numpy_helper.from_array(np.array(k, np.int64), "depth"),
        numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "onehot_values"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1 / 16, np.float32), "inv_hw"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["x_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x_f", "scale"], ["x_s"]),
        helper.make_node("Sub", ["x_s", "one"], ["x_n"]),
        helper.make_node("Transpose", ["x_n"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("ReduceMean", ["x_nchw", "chan_axis"], ["x_mean"], keepdims=1),
        helper.make_node("AveragePool", ["x_mean"], ["pooled"], kernel_shape=[cell, cell],
                         strides=[cell, cell]),
        helper.make_node("Transpose", ["pooled"], ["p"], perm=[0, 2, 3, 1]),  # [N,4,4,1]
        helper.make_node("Mul", ["p", "w"], ["a_w"]),
        helper.make_node("Add", ["a_w", "b"], ["activations"]),  # [N,4,4,K]
        helper.make_node("ReduceMean", ["activations", "hw_axes"], ["logits"], keepdims=0),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("ArgMax", ["probs"], ["argmax"], axis=1, keepdims=0),
        helper.make_node("Less", ["class_index", "zero"], ["use_pred"]),
        helper.make_node("Where", ["use_pred", "argmax", "class_index"], ["target"]),
        helper.make_node("OneHot", ["target", "depth", "onehot_values"], ["onehot"], axis=-1),
        helper.make_node("Unsqueeze", ["onehot", "hw_axes"], ["onehot_4d"]),  # [N,1,1,K]
        helper.make_node("Mul", ["activations", "onehot_4d"], ["a_sel"]),
        helper.make_node("ReduceSum", ["a_sel", "last_axis"], ["cam"], keepdims=0),  # [N,4,4]
        helper.make_node("Relu", ["cam"], ["cam_pos"]),
        helper.make_node("Mul", ["cam_pos", "inv_hw"], ["gradcam"]),
        helper.make_node("Mul", ["cam_pos", "cam_pos"], ["gradcampp"]),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, channels]),
              helper.make_tensor_value_info("class_index", TensorProto.INT64, ["N"])]
    out_shapes = {"probs": ["N", k], "activations": ["N", 4, 4, k], "gradcam": ["N", 4, 4],
                  "gradcampp": ["N", 4, 4], "cam": ["N", 4, 4]}
    names = [n for n in out_shapes if (cam or n != "cam") and n not in drop_outputs]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, out_shapes[n]) for n in names]
    graph = helper.make_graph(nodes, "tiny_cam", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    if metadata:
        heatmaps = tuple(h for h in ("gradcam", "gradcampp", "cam") if h in names)
        info = GraphInfo(labels=labels, input_size=(size, size), color_order=color_order,
                         target_layer="tiny_conv", heatmaps=heatmaps, feature_size=(4, 4),
                         normalization={"scale": [1 / 127.5], "offset": [-1.0]},
                         cam_unavailable_reason="" if cam else "head is not GAP+dense",
                         source_model="tiny.keras", source_sha256="0" * 64, version="test")
        helper.set_model_props(model, info.to_metadata())
    onnx.save(model, str(path))
    return path


def write_clip(path: Path, frames: list[np.ndarray], fps: float = 30.0) -> Path:
    """Write uint8 BGR frames to an mp4 (mp4v)."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def sigint_as_from_a_terminal() -> None:
    """Popen's preexec_fn for a child the test stops with SIGINT: a shell's background job
    (`pytest &`) ignores SIGINT, and a child that inherits that never sees it (a run with
    --loop, or a server, would go on forever)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def photo_folder(folder: Path, first: np.ndarray, face: np.ndarray) -> Path:
    """`folder` made with three photos in name order: `first`, then `face` and `face` mirrored."""
    folder.mkdir()
    for name, photo in (("00_first.png", first), ("01_face.png", face), ("02_face.png", face[:, ::-1])):
        cv2.imwrite(str(folder / name), photo)
    return folder


def count_frames(path: Path) -> int:
    """Frames OpenCV can decode from `path` (decoding each, not trusting the header)."""
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), f"{path} does not open"
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def frame_times(path: Path) -> list[float]:
    """Presentation times (s) of a video's frames, in decoding order (PyAV)."""
    import av

    with av.open(str(path)) as container:
        return [float(frame.time) for frame in container.decode(video=0)]


# `python -c BLOCK_TF ARGS...` runs `camface ARGS...` with TensorFlow, Keras and tf2onnx made
# unimportable, and fails if any of them got imported anyway.
BLOCK_TF = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
from camface.cli import main
code = main(sys.argv[1:])
assert not any(m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx') for m in sys.modules)
sys.exit(code)
"""


class FakeCamera:
    """A cv2.VideoCapture stand-in: frames at ~200 fps (`good` of them, then nothing, as if
    unplugged; None = forever until released); reports 0 fps like many webcams."""

    def __init__(self, good: int | None = None):
        self.good, self.reads, self.released = good, 0, False

    def isOpened(self):
        return True

    def get(self, prop):
        return 0.0

    def read(self):
        import time

        time.sleep(0.005)
        self.reads += 1
        if self.released or (self.good is not None and self.reads > self.good):
            return False, None
        return True, np.full((48, 64, 3), self.reads % 255, np.uint8)

    def release(self):
        self.released = True


class FakeWindow:
    """Stands in for the OpenCV window: returns one scripted key per shown frame."""

    def __init__(self, keys: str):
        self.keys = list(keys)
        self.shown: list[np.ndarray] = []
        self.closed = False

    def show(self, frame):
        self.shown.append(frame.copy())
        key = self.keys.pop(0) if self.keys else "."
        return -1 if key == "." else ord(key)


# ---------------------------------------------------------------- a clip of real faces that move
# Heads cut from the photos that packages ship (scikit-image's astronaut, matplotlib's Grace
# Hopper), as (x0, y0, x1, y1) in the photo, and the face box MediaPipe finds there (x, y, w, h).
HEADS = {"astronaut": ((113, 7, 336, 230), (173, 67, 103, 103)),
         "hopper": ((86, 50, 446, 410), (166, 130, 199, 199))}


def head_sprites() -> dict[str, tuple[np.ndarray, tuple[float, float, float, float]]]:
    """name -> (head image uint8 BGR, face box inside it as fractions (x, y, w, h) of the head)."""
    from matplotlib import cbook
    from skimage import data

    photos = {"astronaut": np.ascontiguousarray(data.astronaut()[:, :, ::-1]),
              "hopper": cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))}
    sprites = {}
    for name, ((x0, y0, x1, y1), (fx, fy, fw, fh)) in HEADS.items():
        head = photos[name][y0:y1, x0:x1]
        sprites[name] = (head, ((fx - x0) / (x1 - x0), (fy - y0) / (y1 - y0), fw / (x1 - x0), fh / (y1 - y0)))
    return sprites


def face_plan(index: int, frames: int, width: int, height: int) -> list[tuple[str, str, float, float, float]]:
    """The faces of frame `index` as (face, sprite name, face centre x, face centre y, face size), in
    pixels: A (astronaut) sweeps left and right fast (up to ~15 px a frame at 640 wide over 60
    frames) while growing and shrinking 2x; B (Hopper) enters at the right edge at 1/6 of the
    clip and leaves at the left edge; C (astronaut) pops in at 21/60 and out at 45/60 of the clip
    (no fade: the hardest case for boxes carried between detections)."""
    t = index / frames
    s = height / 480
    plan = [("A", "astronaut", width * (0.3 + 0.15 * math.sin(2 * math.pi * t)), height * 0.27,
             s * (120 + 40 * math.sin(4 * math.pi * t)))]
    u = (t - 1 / 6) / (5 / 6 - 1 / 6)
    if 0 <= u <= 1:
        plan.append(("B", "hopper", width * (1.1 - 1.2 * u), height * 0.72, s * 110))
    if round(21 / 60 * frames) <= index < round(45 / 60 * frames):
        plan.append(("C", "astronaut", width * 0.8, height * 0.25, s * 80))
    return plan


def moving_faces_clip(frames: int = 60, size: tuple[int, int] = (640, 480)
                      ) -> tuple[list[np.ndarray], list[dict[str, tuple[int, int, int, int]]]]:
    """(frames uint8 BGR [H, W, 3], per frame the true face boxes {face: (x, y, w, h)} in pixels,
    clipped to the frame, faces named as in `face_plan`); a pure function of its arguments."""
    width, height = size
    sprites = head_sprites()
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.stack([90 + 40 * np.sin(xx / 97.0), 110 + 30 * np.cos(yy / 61.0),
                           120 + 20 * np.sin((xx + yy) / 143.0)], axis=2).astype(np.uint8)
    clip, truth = [], []
    for index in range(frames):
        frame = background.copy()
        boxes = {}
        for face, name, cx, cy, face_size in face_plan(index, frames, width, height):
            head, (fx, fy, fw, fh) = sprites[name]
            head_w = face_size / fw
            head_h = head_w * head.shape[0] / head.shape[1]
            hx, hy = cx - (fx + fw / 2) * head_w, cy - (fy + fh / 2) * head_h
            x0, y0 = int(round(hx)), int(round(hy))
            scaled = cv2.resize(head, (max(1, int(round(head_w))), max(1, int(round(head_h)))),
                                interpolation=cv2.INTER_AREA)
            sx0, sy0 = max(0, -x0), max(0, -y0)
            sx1, sy1 = min(scaled.shape[1], width - x0), min(scaled.shape[0], height - y0)
            if sx1 > sx0 and sy1 > sy0:
                frame[y0 + sy0:y0 + sy1, x0 + sx0:x0 + sx1] = scaled[sy0:sy1, sx0:sx1]
            bx0, by0 = max(0, round(cx - face_size / 2)), max(0, round(cy - face_size / 2))
            bx1, by1 = min(width, round(cx + face_size / 2)), min(height, round(cy + face_size / 2))
            if bx1 > bx0 and by1 > by0:
                boxes[face] = (bx0, by0, bx1 - bx0, by1 - by0)
        clip.append(frame)
        truth.append(boxes)
    return clip, truth


def carry_accuracy(carried: list, detected: list, truth: list[dict] | None = None) -> dict:
    """How boxes carried between detections compare with detection on every frame.

    carried, detected: per frame a tuple of Face (same frames). truth: per frame {face: box}
    or None. Returns {"face_frames": detected faces over all frames, "iou90": fraction of them
    that a carried box overlaps with IoU >= 0.9, "late": the longest run of frames in which a
    face (truth name, or the detected face) is detected but has no carried box with IoU >= 0.3
    (how late an appearing face is boxed), "stale": the longest run of frames holding a carried
    box that no detected box overlaps with IoU >= 0.3 (how long a leaving face keeps its box)}.
    """
    from camface.realtime.smooth import iou

    def best(box, faces):
        return max((iou(box, face.box) for face in faces), default=0.0)

    face_frames = hits = 0
    late_run: dict = {}
    late = stale = stale_run = 0
    for index, (mine, theirs) in enumerate(zip(carried, detected)):
        face_frames += len(theirs)
        hits += sum(best(face.box, mine) >= 0.9 for face in theirs)
        names = truth[index] if truth is not None else {n: f.box for n, f in enumerate(theirs)}
        for name, box in names.items():
            seen = best(box, theirs) >= 0.3
            missing = seen and best(box, mine) < 0.3
            late_run[name] = late_run.get(name, 0) + 1 if missing else 0
            late = max(late, late_run[name])
        stale_run = stale_run + 1 if any(best(face.box, theirs) < 0.3 for face in mine) else 0
        stale = max(stale, stale_run)
    return {"face_frames": face_frames, "iou90": hits / face_frames if face_frames else 1.0,
            "late": late, "stale": stale}


def graph_log_of(command, caplog, argv, debug: bool, error=None) -> tuple[list[str], int]:
    """Run camface `command` (`main`) on `argv` (plus --debug) with the graph's logger at a level
    of its own (INFO: neither WARNING nor unset), expecting exit 2 where `error` (a
    `pytest.raises` context for --debug, which raises rather than prints) is given, else 0.
    Returns (the graph logger's messages, its level after the command); the level is put back."""
    import contextlib
    import logging

    graph_log = logging.getLogger("camface.realtime.graph")
    level = graph_log.level
    graph_log.setLevel(logging.INFO)
    try:
        caplog.set_level(logging.DEBUG)
        with error if error is not None and debug else contextlib.nullcontext():
            code = command([*argv, *(["--debug"] if debug else [])])
            assert code == (2 if error is not None else 0)
        after = graph_log.level
    finally:
        graph_log.setLevel(level)
    return [r.getMessage() for r in caplog.records if r.name == graph_log.name], after
