"""`camface.load()`: the Python API on real photos (two faces side by side) and a clip; its
numbers against `camface live`'s; JSON; Jupyter; misuse; resources released."""

import json
import logging
import re
import subprocess
from dataclasses import replace
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from realtime_helpers import tiny_cam_graph, write_clip

import camface
from camface.graph_spec import auto_method
from camface.cli import main as camface_main
from camface.errors import CamfaceError, ModelError, UsageError
from camface.realtime.explainer import crop_for_graph

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@pytest.fixture(scope="module")
def two_faces(astronaut_bgr) -> np.ndarray:
    """scikit-image's astronaut beside matplotlib's Grace Hopper, 512 pixels high, uint8 BGR
    [512, 949, 3]. MediaPipe finds Hopper at about (653, 116, 168, 168), the astronaut at
    about (175, 73, 102, 102)."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
    hopper = cv2.resize(hopper, (round(hopper.shape[1] * 512 / hopper.shape[0]), 512), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(np.hstack([astronaut_bgr, hopper]))


@pytest.fixture(scope="module")
def cam():
    with camface.load(device="cpu", method="hirescam") as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def clip(tmp_path_factory, two_faces) -> Path:
    """8 frames: the two-face photo, shifted 4 pixels right per frame."""
    frames = [np.ascontiguousarray(np.roll(two_faces, 4 * i, axis=1)[:, :944]) for i in range(8)]
    return write_clip(tmp_path_factory.mktemp("clip") / "two.mp4", frames)


def test_two_faces_are_found_classified_and_explained(cam, two_faces):
    result = cam.explain(two_faces)
    assert len(result.faces) == len(result.predictions) == 2
    hopper, astronaut = result.faces  # largest first
    assert np.allclose(hopper.box, (653, 116, 168, 168), atol=12)
    assert np.allclose(astronaut.box, (175, 73, 102, 102), atol=12)
    assert result.labels == EMOTIONS and result.method == "hirescam"
    assert [EMOTIONS[p.predicted] for p in result.predictions] == ["neutral", "happy"]
    for prediction in result.predictions:
        assert prediction.probs.dtype == np.float32 and prediction.probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert prediction.heatmap.shape == (8, 8) and prediction.heatmap.max() > 0
        assert prediction.explained == prediction.predicted and prediction.method == "hirescam"
    assert cam.explain(np.zeros((120, 160, 3), np.uint8)).faces == ()  # no face: an empty result


def test_explained_class_and_method_per_call(cam, two_faces):
    result = cam.explain(two_faces, method="gradcam", explained_class=0)
    assert result.method == "gradcam" and result.explained_class == 0
    assert [p.explained for p in result.predictions] == [0, 0]
    assert [p.predicted for p in result.predictions] == [6, 3]


def test_explain_crops_equals_explain_on_the_same_crops(cam, two_faces):
    result = cam.explain(two_faces)
    _, crops, _ = crop_for_graph(two_faces, result.faces, cam.config.margin, cam.config.max_faces, cam.graph.info)
    maps = cam.explain_crops(crops, method="hirescam")
    for got, want in zip(maps, result.predictions):
        np.testing.assert_allclose(got.probs, want.probs, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got.heatmap, want.heatmap, rtol=1e-5, atol=1e-6)
    fear = cam.explain_crops(crops, method="gradcam", class_index=2)
    assert [p.explained for p in fear] == [2, 2] and [p.predicted for p in fear] == [6, 3]
    assert cam.explain_crops(crops[:0]) == ()


def test_annotate_returns_a_new_picture_drawn_over_the_faces_only(cam, two_faces):
    before = two_faces.copy()
    result = cam.explain(two_faces)
    picture = cam.annotate(two_faces, result)
    np.testing.assert_array_equal(two_faces, before)  # not drawn in place
    assert picture.shape == two_faces.shape and picture.dtype == np.uint8
    changed = np.abs(picture.astype(int) - two_faces).sum(axis=2) > 0
    x, y, w, h = result.faces[0].box
    assert changed[y + 10:y + h - 10, x + 10:x + w - 10].mean() > 0.5  # the heatmap covers the face
    assert not changed[400:, 300:600].any()  # nothing drawn far from the faces
    decoded = cv2.imdecode(np.frombuffer(picture._repr_png_(), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decoded, picture)  # Jupyter shows exactly this picture


def test_the_hud_of_an_api_result_claims_no_frame_rate(cam, two_faces):
    """`explain` times nothing (fps 0, no stages): annotate(hud=True) drew "0 fps" over the frame."""
    result = cam.explain(two_faces)
    lines = cam.renderer.hud_layer.lines(result)
    assert lines == [f"{result.method} of predicted class | CPU"], lines
    timed = cam.renderer.hud_layer.lines(replace(result, fps=24.0, stage_ms={"classify": 1.5}))
    assert timed[0] == "24 fps | ms: classify 1.5" and timed[1:] == lines  # as live draws it
    picture, plain = cam.annotate(two_faces, result, hud=True), cam.annotate(two_faces, result)
    assert (picture[:40, :300] != plain[:40, :300]).any()  # the HUD's method line is drawn


def test_results_show_their_probability_bars_in_jupyter(cam, two_faces):
    result = cam.explain(two_faces)
    page = result._repr_html_()
    assert page.count("<tr>") == 2 and "heatmap hirescam" in page
    neutral = result.predictions[0].probs[6]
    assert f"width:{100 * neutral:.0f}px" in page and "neutral</span>" in page


def test_to_dict_round_trips_through_json(cam, two_faces):
    result = cam.explain(two_faces)
    data = result.to_dict()
    again = json.loads(json.dumps(data))
    assert again == data
    face = again["faces"][0]
    assert face["predicted_label"] == "neutral" and face["box"] == list(result.faces[0].box)
    assert set(face) >= {"box", "crop_box", "score", "track_id", "probs", "predicted", "explained",
                         "predicted_label", "explained_label", "method", "heatmap"}
    back = camface.FrameResult.from_dict(again)
    assert back.faces == result.faces and back.labels == result.labels
    for got, want in zip(back.predictions, result.predictions):
        np.testing.assert_array_equal(got.probs, want.probs)  # float32 survives JSON exactly
        np.testing.assert_array_equal(got.heatmap, want.heatmap)
        assert (got.predicted, got.explained, got.method) == (want.predicted, want.explained, want.method)
    assert back == result and back.predictions == result.predictions  # compared by value, arrays included
    brighter = back.predictions[0].heatmap + 1
    assert replace(back, predictions=(replace(back.predictions[0], heatmap=brighter), back.predictions[1])) != result
    assert back.predictions[0] != back.predictions[1] and back.predictions[0] != "a prediction"


def test_process_video_yields_every_frame_with_both_faces(cam, clip):
    seen = [(result.index, len(result.faces), frame.shape) for result, frame in cam.process_video(clip)]
    assert seen == [(i, 2, (512, 944, 3)) for i in range(8)]
    assert len(list(cam.process_video(str(clip), max_frames=3))) == 3


def test_explain_equals_camface_live_for_the_same_frames(tmp_path, clip):
    snapshots = tmp_path / "snaps"
    snapshots.mkdir()
    assert camface_main(["live", "--source", str(clip), "--no-show", "--device", "cpu", "--method", "gradcampp",
                         "--detect-every", "1", "--snapshot-every", "1", "--snapshot-dir", str(snapshots)]) == 0
    live = {}
    for meta_path in snapshots.glob("*/snapshot.json"):
        meta = json.loads(meta_path.read_text())
        live[meta["frame_index"]] = meta["faces"]
    assert sorted(live) == list(range(8))
    capture = cv2.VideoCapture(str(clip))
    with camface.load(device="cpu", method="gradcampp") as api:
        for index in range(8):
            ok, frame = capture.read()
            assert ok
            result = api.explain(frame)
            assert [list(f.box) for f in result.faces] == [f["box"] for f in live[index]]
            for prediction, face in zip(result.predictions, live[index]):
                np.testing.assert_allclose(prediction.probs, face["probs"], atol=1e-6)
                assert prediction.predicted == face["predicted"]
    capture.release()


def test_process_video_equals_camface_live_with_carried_boxes(tmp_path, clip):
    """The default --detect-every auto carries boxes between key frames; process_video does as
    live does, frame for frame."""
    snapshots = tmp_path / "snaps"
    snapshots.mkdir()
    assert camface_main(["live", "--source", str(clip), "--no-show", "--device", "cpu", "--method", "gradcam",
                         "--snapshot-every", "1", "--snapshot-dir", str(snapshots)]) == 0
    live = {}
    for meta_path in snapshots.glob("*/snapshot.json"):
        meta = json.loads(meta_path.read_text())
        live[meta["frame_index"]] = meta["faces"]
    with camface.load(device="cpu", method="gradcam") as api:
        seen = 0
        for result, _ in api.process_video(clip):
            assert [list(f.box) for f in result.faces] == [f["box"] for f in live[result.index]]
            for prediction, face in zip(result.predictions, live[result.index]):
                np.testing.assert_allclose(prediction.probs, face["probs"], atol=1e-6)
            seen += 1
    assert seen == len(live) == 8


@pytest.mark.parametrize("options, every", [({}, 4), ({"detect_workers": 2}, 1), ({"detect_every": 3}, 3)])
def test_process_video_resolves_auto_as_live_does(clip, monkeypatch, options, every):
    """auto is N = 4 for a video, and 1 when several detectors side by side were asked for (live
    cannot carry boxes across detector threads, so neither does process_video)."""
    from camface.realtime import carry
    from camface.realtime.carry import every_for

    periods, original = [], carry.BoxCarrier.__init__

    def spy(self, detector, n=1, *args, **kwargs):
        periods.append(n)
        original(self, detector, n, *args, **kwargs)

    monkeypatch.setattr(carry.BoxCarrier, "__init__", spy)
    with camface.load(device="cpu", **options) as api:
        assert len(list(api.process_video(clip, max_frames=2))) == 2
    assert periods == [every] == [every_for(api.config.detect_every, False, api.config.detect_workers)]


def test_process_video_detects_a_new_pass_or_reconnection_as_live_does(clip, monkeypatch):
    """A source that starts again (a LoopingSource's pass, a stream's reconnection: its `passes`
    grows) does not follow the frame before: process_video has the carrier detect it, as the live
    loop's reader does, instead of carrying boxes across."""
    from camface.realtime import carry
    from camface.realtime.pace import LoopingSource
    from camface.realtime.sources import VideoFileSource

    cuts, original = [], carry.BoxCarrier.detect

    def spy(self, frame, index, cut=False):
        cuts.append(cut)
        return original(self, frame, index, cut)

    monkeypatch.setattr(carry.BoxCarrier, "detect", spy)
    with camface.load(device="cpu", method="gradcam") as api:
        assert len(list(api.process_video(LoopingSource(VideoFileSource(clip)), max_frames=12))) == 12
    assert cuts == [index == 8 for index in range(12)]  # the clip's 8 frames, then the second pass

def test_process_video_smooths_a_new_pass_afresh(clip):
    """Smoothing carried the averages and tracks of a pass's last frames into the next pass's
    first frame (a reconnected stream's, likewise): the frame after a cut now starts over, as its
    detection does, so it is explained as the first pass's first frame (the same image) was."""
    from camface.realtime.pace import LoopingSource
    from camface.realtime.sources import VideoFileSource

    with camface.load(device="cpu", method="gradcam", smooth=0.6) as api:
        results = [result for result, _ in api.process_video(LoopingSource(VideoFileSource(clip)), max_frames=10)]
    first, again = results[0], results[8]  # the clip's 8 frames, then the second pass
    assert len(first.faces) == len(again.faces) == 2
    before = {face.track_id for result in results[:8] for face in result.faces}
    assert not before & {face.track_id for face in again.faces}  # new tracks, not those before the cut
    for a, b in zip(first.predictions, again.predictions):
        np.testing.assert_allclose(b.probs, a.probs, atol=1e-5)
        np.testing.assert_allclose(b.heatmap, a.heatmap, atol=1e-4 * max(1.0, float(np.abs(a.heatmap).max())))
    assert {face.track_id for face in results[9].faces} == {face.track_id for face in again.faces}


@pytest.mark.parametrize("frame, message", [
    (np.zeros((64, 64, 3), np.float32), "uint8 BGR .* got dtype float32"),
    (np.zeros((64, 64), np.uint8), r"got shape \(64, 64\)"),
    (np.zeros((64, 64, 4), np.uint8), r"got shape \(64, 64, 4\)"),
    ([[0, 0, 0]], "numpy array.* got list"),
])
def test_a_bad_frame_is_a_clear_error(cam, frame, message):
    with pytest.raises(UsageError, match=message):
        cam.explain(frame)


def test_bad_crops_and_classes_are_clear_errors(cam):
    with pytest.raises(UsageError, match=r"crops must be uint8 \[N, 64, 64, 1\] \(GRAY\), got uint8 \(2, 64, 64, 3\)"):
        cam.explain_crops(np.zeros((2, 64, 64, 3), np.uint8))
    for bad, got in [([np.zeros((64, 64, 1), np.uint8)], r"list \(a numpy array: np.stack\(crops\)\)$"),
                     (None, "NoneType$")]:  # were 'got list None', 'got NoneType None'
        with pytest.raises(UsageError, match=r"crops must be uint8 \[N, 64, 64, 1\] \(GRAY\), got " + got):
            cam.explain_crops(bad)
    with pytest.raises(UsageError, match="class_index 7 out of range 0..6"):
        cam.explain_crops(np.zeros((1, 64, 64, 1), np.uint8), class_index=7)
    with pytest.raises(UsageError, match="explained_class 9 out of range"):
        cam.explain(np.zeros((64, 64, 3), np.uint8), explained_class=9)
    crops = np.zeros((2, 64, 64, 1), np.uint8)
    for bad, message in [(1.7, "class_index must be an integer or 2 integers, got 1.7"),
                         ("1", "class_index must be an integer or 2 integers, got '1'$"),  # no labels.index('1')
                         ([1, 2, 3], r"class_index must be an integer or 2 integers, got \[1, 2, 3\]"),
                         (True, "class_index must be an integer"), (2 ** 70, "class_index 1180591620717411303424 out"),
                         (-2, r"class_index -2 out of range 0..6 or -1 \(the predicted class\)")]:
        with pytest.raises(UsageError, match=message):
            cam.explain_crops(crops, class_index=bad)
    assert [p.explained for p in cam.explain_crops(crops, class_index=np.array([2, 5]))] == [2, 5]
    for huge in (np.array([2 ** 64 - 1, 0], np.uint64), np.array(2 ** 64 - 1, np.uint64)):  # -1 cast to int64
        with pytest.raises(UsageError, match="class_index .* out of range 0..6"):
            cam.explain_crops(crops, class_index=huge)
    for bad in (1.5, "1", -1):
        with pytest.raises(UsageError, match="explained_class"):
            cam.explain(np.zeros((64, 64, 3), np.uint8), explained_class=bad)
    for bad, message in [("happy", r"explained_class must be an integer, got 'happy' \(a class index: "
                                   r"pipeline.labels.index\('happy'\)\)"),  # was 'an integer or 1 integers'
                         (2.0, "explained_class must be an integer, got 2.0$")]:
        with pytest.raises(UsageError, match=message):
            cam.explain(np.zeros((64, 64, 3), np.uint8), explained_class=bad)
    result = cam.explain(np.zeros((64, 64, 3), np.uint8), explained_class=np.int64(2))
    assert type(result.explained_class) is int and json.dumps(result.to_dict())  # JSON-ready


@pytest.mark.parametrize("bad, hint", [([3], True), ((3,), True), (np.array([3]), True), ([[1], [2, 3]], False)])
def test_explain_takes_one_class_not_a_list_of_one(cam, bad, hint):
    """`explain(frame, explained_class=[3])` was taken as class 3 without a word (a list of one
    passed the per-crop check that explain_crops needs); a ragged list was numpy's traceback."""
    hint = " (one class for every face; explain_crops takes one per crop)" if hint else ""  # not for a ragged list
    with pytest.raises(UsageError, match=f"^explained_class must be an integer, got {re.escape(repr(bad) + hint)}$"):
        cam.explain(np.zeros((64, 64, 3), np.uint8), explained_class=bad)
    assert cam.explain(np.zeros((64, 64, 3), np.uint8), explained_class=np.array(3)).explained_class == 3  # 0-d
    assert [p.explained for p in cam.explain_crops(np.zeros((1, 64, 64, 1), np.uint8), class_index=[3])] == [3]


@pytest.mark.parametrize("class_index", [[], (), np.zeros(0, np.int64), None, 3])
def test_no_crops_with_no_classes_give_no_predictions(cam, class_index):
    """Zero crops (a frame without faces) and their per-crop classes, an empty list built the
    same way: `np.asarray([])` is float64, and was refused as 'must be an integer or 0 integers'."""
    assert cam.explain_crops(np.zeros((0, 64, 64, 1), np.uint8), class_index=class_index) == ()


def test_a_method_the_graph_lacks_is_a_clear_error(cam, tmp_path):
    with pytest.raises(ModelError, match=r"emotion.onnx has no 'cam' heatmap \(CAM needs global average pooling"):
        cam.explain_crops(np.zeros((1, 64, 64, 1), np.uint8), method="cam")
    with pytest.raises(ModelError, match="has no 'cam' heatmap"):
        camface.load(device="cpu", method="cam")


def test_explain_crops_takes_auto_and_names_only_the_bad_method(cam):
    crops = np.zeros((1, 64, 64, 1), np.uint8)
    auto, = cam.explain_crops(crops, method="auto")  # the graph's most faithful method, as explain's
    top, = cam.explain_crops(crops, method="gradcamelementwise")
    assert auto.method == top.method == auto_method(cam.graph.info)[0] == "gradcamelementwise"
    np.testing.assert_array_equal(auto.heatmap, top.heatmap)
    with pytest.raises(ModelError, match="has no 'bogus' heatmap; it offers") as caught:
        cam.explain_crops(crops, method="bogus")
    assert "global average pooling" not in str(caught.value)  # CAM's reason is said for 'cam' only
    with pytest.raises(UsageError, match="method must be a heatmap name"):
        cam.explain_crops(crops, method=3)


@pytest.mark.parametrize("configured", ["auto", "hirescam"])
def test_auto_is_said_once_per_model_not_per_call(caplog, two_faces, configured):
    """explain(method="auto") logged the method it chose on every call (every frame)."""
    crops = np.zeros((1, 64, 64, 1), np.uint8)
    with caplog.at_level(logging.INFO, logger="camface"):
        with camface.load(device="cpu", method=configured) as api:
            for _ in range(3):
                auto, = api.explain_crops(crops, method="auto")
                assert api.explain(two_faces, method="auto").method == auto.method
            assert api.explain_crops(crops)[0].method == configured.replace("auto", auto.method)
    said = [r.getMessage() for r in caplog.records if "shows" in r.getMessage()]
    assert said == [f"camface: method='auto' shows {auto.method}, the most faithful method of emotion.onnx "
                    "(`camface info` shows the ranking)"]  # load's keyword, not the flag --method auto


@pytest.mark.parametrize("api, auto, pick", [
    (True, "method='auto'", "method='NAME'"),  # camface.load: its keyword
    (False, "--method auto", "--method NAME"),  # camface live, bench, serve...: the flag
])
def test_the_unranked_fallback_names_the_option_as_its_caller_spells_it(tmp_path, caplog, api, auto, pick):
    """check_method's fallback warning said `--method auto` to callers of the Python API."""
    from camface.realtime.explainer import check_method
    from camface.realtime.graph import CamGraph

    graph = CamGraph(tiny_cam_graph(tmp_path / "g.onnx"), "cpu")
    assert not graph.info.ranking and not graph.info.gallery
    with caplog.at_level(logging.WARNING, logger="camface"):
        method = check_method(graph, "auto", api=api)
    assert caplog.messages == [
        f"camface: {auto} shows {method} on g.onnx: it records no method ranking (made by an older camface, "
        f"or not by `camface export`); `camface export` ranks the methods, {pick} picks one"]


@pytest.mark.parametrize("cli", [False, True])
def test_load_names_options_as_the_command_line_for_the_front_ends(tmp_path, caplog, cli):
    """The front ends (camface live, serve, ...) open their pipeline with load(cli=True): their
    users typed flags, and the messages name those."""
    with pytest.raises(UsageError, match="^--alpha must be" if cli else "^alpha must be"):
        camface.load(tiny_cam_graph(tmp_path / "g.onnx"), alpha=3.0, cli=cli)
    with caplog.at_level(logging.WARNING, logger="camface"):
        with camface.load(tiny_cam_graph(tmp_path / "g.onnx"), device="cuda", cli=cli) as opened:
            assert opened.graph.provider == "CPUExecutionProvider"
    assert f"{'--method auto' if cli else 'method=' + repr('auto')} shows" in caplog.text
    assert "camface: device 'cuda' is not usable here" in caplog.text  # either caller's spelling


@pytest.mark.parametrize("api, said", [(True, "source is empty"), (False, "--source is empty")])
def test_a_sources_message_names_the_option_as_its_caller_spells_it(api, said):
    from camface.errors import SourceError
    from camface.realtime.sources import make_source

    with pytest.raises(SourceError, match=f"^{said} "):
        make_source(" ", api=api)


def test_the_hud_names_max_faces_as_its_caller_spells_it(tmp_path, two_faces):
    from camface.realtime.render import HudAnnotator

    with camface.load(device="cpu", max_faces=1) as opened:
        result = opened.explain(two_faces)
    assert result.dropped == 1
    assert opened.renderer.hud_layer.lines(result)[-1] == "1 more face(s) not shown (max_faces)"
    assert HudAnnotator().lines(result)[-1] == "1 more face(s) not shown (--max-faces)"


def _binary_graph(path: Path) -> Path:
    """The tiny graph (realtime_helpers) with a binary classifier's head: probs = sigmoid of the
    first logit, [N, 1], one label "bright" (is the crop bright?)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(tiny_cam_graph(path, labels=("bright",))))
    nodes = model.graph.node
    softmax = next(i for i, node in enumerate(nodes) if node.op_type == "Softmax")
    nodes.insert(softmax, helper.make_node("Slice", ["logits", "first", "second", "axis_1"], ["logit_0"]))
    nodes[softmax + 1].CopyFrom(helper.make_node("Sigmoid", ["logit_0"], ["probs"]))
    for value, name in ((0, "first"), (1, "second"), (1, "axis_1")):
        model.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    probs = next(output for output in model.graph.output if output.name == "probs")
    probs.CopyFrom(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 1]))
    onnx.save(model, str(path))
    return path


def test_a_binary_classifier_s_graph_is_refused_at_load(tmp_path):
    """A graph with one class (a single sigmoid unit: "is bright?") named every face "bright", a
    dark one too (the argmax of one probability is 0). Every front end loads through
    `camface.load`: it now refuses such a graph, naming it and how to make a two-class one."""
    from camface.realtime.graph import CamGraph

    path = _binary_graph(tmp_path / "binary.onnx")
    dark = np.zeros((1, 32, 32, 1), np.uint8)
    probs, _ = CamGraph(path, "cpu").run(dark, np.array([-1]), "gradcam")
    assert probs.shape == (1, 1) and probs[0, 0] < 0.5  # "not bright", which argmax cannot say
    with pytest.raises(ModelError, match=rf"{re.escape(str(path))}: its output has 1 class \(a binary classifier's "
                                         r"single sigmoid .* Dense\(2, softmax\) head with kernel \[-w/2, w/2\]"):
        camface.load(path, device="cpu")
    assert camface_main(["live", "--model", str(path), "--source", "sample", "--no-show", "--max-frames", "1"]) == 2


class _CountingSource:
    """A camface source over `frames` that counts the frames taken from it."""

    def __init__(self, frames):
        from camface.realtime.sources import SourceInfo

        self.frames, self.taken, self.entered = frames, 0, False
        self.info = SourceInfo("counting", 30.0, len(frames), live=False)

    def __enter__(self):
        self.entered = True
        return self

    def __exit__(self, *exc):
        self.entered = False

    def __iter__(self):
        for frame in self.frames:
            self.taken += 1
            yield frame


def test_process_video_checks_its_arguments_at_once_and_reads_no_frame_beyond(two_faces):
    with camface.load(device="cpu") as api:
        for bad in (None, 1.5, b"sample", two_faces, [two_faces], True):
            with pytest.raises(UsageError, match="source must be a video file, a folder of images"):
                api.process_video(bad)
        for bad in (0, 2.5, "3", True):
            with pytest.raises(UsageError, match="max_frames must be an integer >= 1"):
                api.process_video("sample", max_frames=bad)
        counting = _CountingSource([two_faces] * 5)
        assert len(list(api.process_video(counting, max_frames=2))) == 2
        assert counting.taken == 2 and not counting.entered  # read no frame more, and closed
        frames = api.process_video(_CountingSource([two_faces] * 5))
        next(frames)
        with pytest.raises(UsageError, match="result must be the FrameResult of `explain`"):
            api.annotate(two_faces, None)
    with pytest.raises(UsageError, match="this camface pipeline is closed"):
        next(frames)  # closed while iterating
    for call in (lambda: api.process_video("sample"), lambda: api.face_detector(),
                 lambda: api.annotate(two_faces, None)):
        with pytest.raises(UsageError, match="this camface pipeline is closed"):
            call()
    with camface.load(device="cpu", max_frames=3) as api:  # the pipeline's max_frames, as live's
        counting = _CountingSource([two_faces] * 5)
        assert [r.index for r, _ in api.process_video(counting)] == [0, 1, 2] and counting.taken == 3
        assert len(list(api.process_video(_CountingSource([two_faces] * 5), max_frames=4))) == 4  # the call's wins



@pytest.mark.parametrize("name", ["sample", "0"])
def test_process_video_reads_a_path_named_like_sample_or_a_camera_index_as_that_path(cam, tmp_path, monkeypatch,
                                                                                     name):
    """A Path is a file or a folder: Path("sample") played the bundled clip, not the folder
    `sample` beside the script, and Path("0") opened camera 0 (Path("./0") is "0" too)."""
    monkeypatch.chdir(tmp_path)
    frames = [np.full((48, 64, 3), 40 * k, np.uint8) for k in range(3)]
    if name == "sample":
        (tmp_path / name).mkdir()
        for k, frame in enumerate(frames):
            cv2.imwrite(str(tmp_path / name / f"{k}.png"), frame)
    else:
        write_clip(tmp_path / "clip.mp4", frames).rename(tmp_path / name)
    got = [frame for _, frame in cam.process_video(Path(name), max_frames=10)]
    assert len(got) == 3 and all(frame.shape == (48, 64, 3) for frame in got)
    assert [int(frame.mean() / 40 + 0.5) for frame in got] == [0, 1, 2]


class _FramesOnly:
    """A source object as process_video checks one (enter, exit, iterate), with no `info`."""

    def __init__(self, frames):
        self.frames = frames

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def __iter__(self):
        return iter(self.frames)


def test_process_video_takes_a_source_object_without_info(cam, two_faces):
    """process_video took the object (it has __enter__, __exit__ and __iter__), then failed at
    its first frame with AttributeError: 'info' (read for a folder's stills only)."""
    results = [result for result, _ in cam.process_video(_FramesOnly([two_faces] * 2))]
    assert [r.index for r in results] == [0, 1] and all(len(r.faces) == 2 for r in results)


@pytest.mark.parametrize("where", ["load", "process_video"])
def test_a_max_frames_beyond_any_source_reads_every_frame(clip, where):
    """max_frames=2**63 and beyond (a 'no limit' number) was islice's ValueError at the first frame."""
    huge = 2 ** 64
    with camface.load(device="cpu", **({"max_frames": huge} if where == "load" else {})) as pipeline:
        frames = pipeline.process_video(clip, **({"max_frames": huge} if where == "process_video" else {}))
        assert [result.index for result, _ in frames] == list(range(8))


@pytest.mark.parametrize("max_frames", [np.int64(2), np.uint8(2)])
def test_process_video_takes_a_numpy_integer_max_frames(cam, two_faces, max_frames):
    """A count computed with numpy (np.int64) was refused as 'max_frames must be an integer',
    which it is; load(max_frames=np.int64(2)) takes it."""
    counting = _CountingSource([two_faces] * 4)
    assert [r.index for r, _ in cam.process_video(counting, max_frames=max_frames)] == [0, 1]
    assert counting.taken == 2


@pytest.mark.parametrize("bad, message", [
    (lambda f: f.astype(np.float32), r"frame 1 of _CountingSource must be uint8 BGR .* got dtype float32"),
    (lambda f: f[:, :, 0], r"frame 1 of _CountingSource must be uint8 BGR \[H, W, 3\]; got shape \(512, 949\)"),
    (lambda f: f.tolist(), "frame 1 of _CountingSource must be a numpy array.* got list"),
])
def test_a_source_objects_bad_frame_is_a_clear_error(cam, two_faces, bad, message):
    """A user's source object is not one of camface's: its frames are checked as `explain`'s
    (a float frame was explained as if it were uint8, a grayscale one failed inside OpenCV)."""
    frames = cam.process_video(_CountingSource([two_faces, bad(two_faces), two_faces]))
    result, frame = next(frames)
    assert result.index == 0 and len(result.faces) == 2 and frame.dtype == np.uint8
    with pytest.raises(UsageError, match=message):
        next(frames)


@pytest.mark.parametrize("call, error, message", [
    (lambda: camface.load("no/such/model.onnx"), ModelError, "CAM graph not found: no/such/model.onnx"),
    # options are named as load's keywords (they were named as the command line's flags, --max-faces)
    (lambda: camface.load(device="gpu"), UsageError, "^device must be one of"),
    (lambda: camface.load(alpha=2.0), UsageError, r"^alpha must be in \[0, 1\], got 2.0"),
    (lambda: camface.load(colour_map="jet"), UsageError, "unknown option colour_map; LiveConfig has"),
    (lambda: camface.load(max_faces="3"), UsageError, r"^max_faces must be an integer, got '3' \(str\)"),
    (lambda: camface.load(max_faces=2.5), UsageError, "^max_faces must be an integer, got 2.5"),
    (lambda: camface.load(margin=None), UsageError, "^margin must be a number, got None"),
    (lambda: camface.load(colormap=["jet"]), UsageError, r"^colormap must be a string, got \['jet'\]"),
    (lambda: camface.load(colormap="jett"), UsageError, "^colormap 'jett' unknown; choose from"),
    (lambda: camface.load(method="bogus"), UsageError, "^method 'bogus' unknown; choose from"),
    (lambda: camface.load(graph_threads=1.5), UsageError, "^graph_threads must be an integer"),
    (lambda: camface.load(detect_workers=2, detect_every=3), UsageError,
     "^detect_workers above 1 needs detect_every=1 "),
    (lambda: camface.load(config=camface.LiveConfig(max_faces=3), max_faces=0), UsageError,
     r"^max_faces must be 1\.\.32 \(the graph's batch range\), got 0"),
    (lambda: camface.load(config={"max_faces": 2}), UsageError, "config must be a LiveConfig"),
    (lambda: camface.load(123), UsageError, "model must be a path"),
    (lambda: camface.load(timer=5), UsageError, "timer must be a camface.realtime.timing.StageTimer"),
])
def test_bad_load_arguments_are_clear_errors(call, error, message):
    with pytest.raises(error, match=message) as caught:
        call()
    assert isinstance(caught.value, CamfaceError)


@pytest.mark.parametrize("option, value, expected", [
    ("detect_every", np.int64(2), 2),  # was refused: 'must be auto or an integer >= 1, got np.int64(2)'
    ("cam_boxes", np.True_, True),  # was refused: 'must be True or False, got np.True_ (bool)'
    ("max_frames", np.int64(5), 5), ("margin", np.float32(0.25), 0.25), ("method", np.str_("hirescam"), "hirescam"),
])
def test_numpy_scalars_are_taken_as_the_python_values_they_hold(two_faces, option, value, expected):
    with camface.load(device="cpu", **{option: value}) as pipeline:
        assert getattr(pipeline.config, option) == expected
        assert type(getattr(pipeline.config, option)) is type(expected)  # JSON-ready, as a Python value
        assert len(pipeline.explain(two_faces).faces) == 2
    assert camface.LiveConfig(detect_every=np.int64(3)).detect_every == 3  # a config built in code too


def test_a_closed_pipeline_says_so(two_faces):
    with camface.load(device="cpu") as closed:
        closed.explain(two_faces)
    with pytest.raises(UsageError, match="closed"):
        closed.explain(two_faces)


@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
def test_a_pipeline_is_not_pickled_or_copied(two_faces, how):
    """Pickling was ONNX Runtime's 'cannot pickle InferenceSession'; copy.copy shared the
    detector, and closing the copy closed it under the original (RuntimeError at its next frame)."""
    import copy
    import pickle

    call = {"pickle": pickle.dumps, "copy": copy.copy, "deepcopy": copy.deepcopy}[how]
    with camface.load(device="cpu") as pipeline:
        pipeline.explain(two_faces)
        with pytest.raises(TypeError, match=r"^a camface Pipeline cannot be pickled or copied .*camface.load\(\) in "
                                            "each process or thread"):
            call(pipeline)
        assert len(pipeline.explain(two_faces).faces) == 2  # still open, its detector too


# Run in a fresh process: what other tests left loaded (TensorFlow's allocators and thread pools)
# moves RSS by tens of MB on its own.
CYCLES = 15
OPEN_AND_CLOSE = """
import ctypes, gc, json, os, sys
from pathlib import Path
import cv2
import camface

frame = cv2.imread(sys.argv[1])
kept = []  # closed pipelines stay referenced: closing, not garbage collection, must free them


def memory_mb():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed native memory back to the system first
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def cycle():
    with camface.load(device="cpu") as pipeline:
        assert len(pipeline.explain(frame).faces) == 2
    kept.append(pipeline)


for _ in range(5):  # first-use allocations (ONNX Runtime, MediaPipe, OpenCV) come first
    cycle()
before = (len(os.listdir("/proc/self/fd")), memory_mb())
for _ in range(int(sys.argv[2])):
    cycle()
print(json.dumps({"before": before, "after": (len(os.listdir("/proc/self/fd")), memory_mb())}))
"""


def test_opening_and_closing_15_times_releases_detector_and_graph(two_faces, tmp_path):
    photo = tmp_path / "two.png"
    cv2.imwrite(str(photo), two_faces)
    done = subprocess.run([sys.executable, "-c", OPEN_AND_CLOSE, str(photo), str(CYCLES)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    (fds, rss), (fds_after, rss_after) = measured["before"], measured["after"]
    assert fds_after == fds
    # one pipeline left open holds about 17 MB (measured: its ONNX Runtime sessions 9 MB, the
    # MediaPipe detector and the rest 8 MB): 15 of them kept would be 120 MB or more, either part
    # alone over 100; allocator noise is a few
    assert rss_after - rss < 20


LEFT_OPEN = """
import sys

import cv2

import camface

pipeline = camface.load(device="cpu", detector_runtime=sys.argv[2])
assert len(pipeline.explain(cv2.imread(sys.argv[1])).faces) == 2
dropped = camface.load(device="cpu", detector_runtime=sys.argv[2])
assert len(dropped.explain(cv2.imread(sys.argv[1])).faces) == 2
del dropped
print("done")
"""


@pytest.mark.parametrize("runtime", ["mediapipe", "onnx"])
def test_a_pipeline_left_open_or_dropped_closes_its_detector_quietly(two_faces, tmp_path, runtime):
    """A script that never closes its pipeline: MediaPipe's detector was left to the
    interpreter's teardown, where its __del__ printed 'Exception ignored ... TypeError:
    'NoneType' object is not callable' with a traceback."""
    photo = tmp_path / "two.png"
    cv2.imwrite(str(photo), two_faces)
    done = subprocess.run([sys.executable, "-c", LEFT_OPEN, str(photo), runtime], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-2000:]


def test_explain_from_two_threads_is_one_stream(two_faces):
    """One pipeline shared by two threads: each frame gets its own index (two threads read the
    same index while the first was still in the graph) and the smoother's tracks are updated one
    frame at a time."""
    import threading
    import time

    with camface.load(device="cpu", smooth=0.5) as api:
        explainer, original = api.explainer, api.explainer.explain

        def slow(*args, **kwargs):  # widens the window between reading the index and counting it
            explained = original(*args, **kwargs)
            time.sleep(0.05)
            return explained

        explainer.explain = slow
        results, errors = [], []

        def work(frame):
            try:
                results.extend(api.explain(frame) for _ in range(3))
            except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(frame,)) for frame in (two_faces, two_faces[:, ::-1])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert sorted(result.index for result in results) == list(range(6))
    assert all(len(result.faces) == 2 for result in results)


def test_methods_first_called_from_threads_at_once_leave_stdout_alone(cam, monkeypatch):
    """Each method's session is made on its first call, with stdout redirected around it: two
    threads making theirs at once each put back what they found, and sys.stdout stayed a
    StringIO (every later print lost, the process looked dead). Their maps are the single
    thread's, and each method's session is made once."""
    import sys
    import threading
    import time

    import onnxruntime

    crops = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 1), np.uint8)
    methods = ("gradcam", "layercam", "xgradcam")
    expected = {method: cam.explain_crops(crops, method=method) for method in methods}
    made, session = [], onnxruntime.InferenceSession

    def slow_session(*args, **kwargs):  # widens the window in which stdout is redirected
        made.append(threading.get_ident())
        time.sleep(0.2)
        return session(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", slow_session)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # put back after the test, should it fail
    before, results = sys.stdout, {}
    with camface.load(device="cpu", method="hirescam") as fresh:
        made.clear()  # its loading's sessions
        threads = [threading.Thread(target=lambda m=method: results.setdefault(m, fresh.explain_crops(crops, method=m)))
                   for method in methods * 2]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sys.stdout is before
    assert len(made) == len(methods)  # one session per method, not one per thread
    for method in methods:
        for want, got in zip(expected[method], results[method]):
            np.testing.assert_allclose(got.heatmap, want.heatmap, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key, value, message", [
    ("input_size", "[48, 48]", r"its 'image' input is \[N, 64, 64, 1\] but its metadata says \[N, 48, 48, 1\]"),
    ("color_order", "RGB", r"'image' input is \[N, 64, 64, 1\] but .* \[N, 64, 64, 3\] .*color_order RGB"),
    ("input_size", "[64]", r"malformed CAM graph metadata: input_size must be \[height, width\]"),
    ("input_size", "64", "malformed CAM graph metadata: input_size must be a JSON list of int, got 64"),
    ("labels", '"happy"', 'malformed CAM graph metadata: labels must be a JSON list of str, got "happy"'),
    ("heatmaps", '"gradcam"', "heatmaps must be a JSON list of str"),
    ("heatmaps", "[]", "its metadata lists no heatmap this camface knows"),
    ("method_ranking", '["gradcam"]', "malformed CAM graph metadata: method_ranking must be a JSON object"),
    ("feature_size", '"8x8"', "feature_size must be a JSON list of int"),
    # "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)", no key named
    ("labels", "{bad json", r"malformed CAM graph metadata: labels is not JSON \(Expecting property name .*\): "
                            r"\{bad json$"),
])
def test_a_graph_whose_metadata_disagrees_is_a_clear_error(tmp_path, key, value, message):
    """Metadata that an older or a hand-edited export got wrong is refused at load with the file
    named, not at the first face inside ONNX Runtime ('Got invalid dimensions for input: image')
    or as an AttributeError ('list' object has no attribute 'get')."""
    import onnx

    from camface.models import EMOTION_ONNX

    model = onnx.load(str(EMOTION_ONNX))
    entry, = (p for p in model.metadata_props if p.key == key)
    entry.value = value
    edited = tmp_path / "edited.onnx"
    onnx.save(model, str(edited))
    with pytest.raises(ModelError, match=f"{edited}.*{message}"):
        camface.load(edited, device="cpu")


def test_the_random_baseline_the_graph_holds_is_reachable(cam, two_faces):
    """Every registry method the graph holds runs through the API: "random" (the faithfulness
    baseline, not offered for display) was refused with "has no 'random' heatmap" although the
    graph holds it. Its map is the registry's numpy reference on the graph's own activations."""
    from camface import methods

    assert "random" in cam.graph.info.heatmaps and "random" not in cam.methods
    result = cam.explain(two_faces, method="random")
    assert result.method == "random" and len(result.predictions) == 2
    _, crops, _ = crop_for_graph(two_faces, result.faces, cam.config.margin, cam.config.max_faces, cam.graph.info)
    activations, = cam.graph.session.run(["activations"], {"image": crops, "class_index": np.full(2, -1, np.int64)})
    expected = methods.get("random").reference(activations)
    for got, want in zip(cam.explain_crops(crops, method="random"), expected):
        assert got.method == "random"
        # a sum of K = 64 products of O(1) weights and activations: float32 rounding ~1e-5 relative
        np.testing.assert_allclose(got.heatmap, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert cam.annotate(two_faces, result).shape == two_faces.shape
    with pytest.raises(ModelError, match="has no 'bogus' heatmap"):
        cam.explain(two_faces, method="bogus")
    with camface.load(device="cpu", method="random") as baseline:  # LiveConfig takes it: so does load
        assert baseline.explain(two_faces).method == "random"


def test_annotate_refuses_a_result_of_another_frame(cam, two_faces):
    """A result whose face boxes do not fit the frame was drawn cut off (or not at all) without a
    word; the frame it came from, and a crop that still holds every box, are drawn."""
    result = cam.explain(two_faces)
    with pytest.raises(UsageError, match=r"result's face box \(6\d\d, .*\) .* outside this 320x240 frame"):
        cam.annotate(np.zeros((240, 320, 3), np.uint8), result)
    assert cam.annotate(two_faces[:, :900], result).shape == (512, 900, 3)


def _hand_built(face=None, **prediction):
    """A FrameResult of one face built by hand: a 50-pixel box at (10, 10), its crop square,
    uniform probabilities over the 7 emotions and a 4x4 heatmap, with `face` / `prediction`'s
    fields in their place."""
    from camface import Face, FrameResult, Prediction

    fields = dict(probs=np.full(7, 1 / 7, np.float32), heatmap=np.eye(4, dtype=np.float32), predicted=3,
                  explained=3, method="gradcam") | prediction
    return FrameResult(index=0, faces=(face or Face(box=(10, 10, 50, 50), score=0.9, crop_box=(5, 5, 60, 60)),),
                       predictions=(Prediction(**fields),), labels=EMOTIONS)


@pytest.mark.parametrize("result, message", [
    # each was a numpy or OpenCV error from inside the renderer
    (dict(face=camface.Face(box=(10, 10, 50, 50), score=0.9)),  # crop_box left at (0, 0, 0, 0)
     r"its heatmap spans crop_box \(0, 0, 0, 0\), which must be a square holding box \(10, 10, 50, 50\)"),
    (dict(predicted=99), r"predicted 99 is not a class index 0..6"),
    (dict(explained=-5), r"explained -5 is not a class index 0..6"),
    (dict(probs=np.full(2, 0.5, np.float32)), r"predicted 3 is not a class index 0..1"),
    (dict(probs=np.full(7, np.nan, np.float32)), r"probs must be finite numbers, one per class"),
    (dict(heatmap=[[0.1, 0.2], [0.3, 0.4]]), r"heatmap must be a 2-D numpy array, got list \(2, 2\)"),
    (dict(face=camface.Face(box=(10.5, 10, 50, 50), score=0.9, crop_box=(5, 5, 60, 60))),
     r"box \(10.5, 10, 50, 50\) and crop_box \(5, 5, 60, 60\) must be 4 integers"),
], ids=["no crop_box", "predicted", "explained", "few probs", "nan probs", "list heatmap", "float box"])
def test_annotate_names_what_keeps_a_hand_built_result_from_being_drawn(cam, two_faces, result, message):
    with pytest.raises(UsageError, match="^result's face 0 cannot be drawn: " + message):
        cam.annotate(two_faces, _hand_built(**result))


def test_annotate_draws_a_hand_built_result_that_fits(cam, two_faces):
    """The check refuses no result that fits: the heatmap is drawn inside the box, nothing far from it."""
    picture = cam.annotate(two_faces, _hand_built())
    assert (picture[15:55, 15:55] != two_faces[15:55, 15:55]).any(axis=2).mean() > 0.5
    assert np.array_equal(picture[100:], two_faces[100:]) and np.array_equal(picture[:, 100:], two_faces[:, 100:])


@pytest.mark.parametrize("dtype, hint", [(np.uint16, "divide by 257"), (np.float64, "scale floats in"),
                                         (np.int64, "scale to 0..255"), (bool, "scale to 0..255")])
def test_a_frame_of_another_dtype_says_how_to_convert_it(cam, dtype, hint):
    """16-bit and integer frames were told to 'scale floats in [0, 1] by 255'."""
    with pytest.raises(UsageError, match=f"got dtype {np.dtype(dtype)} .*{hint}"):
        cam.explain(np.zeros((64, 64, 3), dtype))


def test_results_arrays_are_read_only_so_a_caller_cannot_change_the_next_frame(two_faces):
    """A FrameResult is frozen, its arrays too: normalising a heatmap or scaling probabilities in
    place changed the smoother's track, and so the next frame's smoothed result."""
    with camface.load(device="cpu", smooth=0.5) as api:
        first = api.explain(two_faces).predictions[0]
        for name in ("probs", "heatmap", "similarity"):
            with pytest.raises(ValueError, match="read-only"):
                getattr(first, name)[...] = 0
        again = api.explain(two_faces).predictions[0]
        np.testing.assert_allclose(again.probs, first.probs, atol=1e-5)  # the same frame: the average holds
    given = np.ones(3, np.float32)
    made = camface.Prediction(probs=given, heatmap=np.zeros((2, 2), np.float32), predicted=0, explained=0,
                              method="gradcam")
    assert given.flags.writeable and not made.probs.flags.writeable  # the caller's array stays theirs


def test_every_public_name_is_listed_and_resolves():
    """`dir(camface)` (a notebook's completion) listed none of the lazily loaded names (`load`,
    `FrameResult`, ...); each name of `__all__` resolves to what its module defines."""
    import camface.api
    import camface.realtime.results

    assert set(camface.__all__) <= set(dir(camface))
    assert camface.load is camface.api.load and camface.Pipeline is camface.api.Pipeline
    assert camface.FrameResult is camface.realtime.results.FrameResult
    namespace: dict = {}
    exec("from camface import *", namespace)
    assert set(camface.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="has no attribute 'lod'"):
        camface.lod


@pytest.mark.parametrize("option, value", [("record", "out.mp4"), ("source", "talk.mp4"), ("show", True),
                                           ("snapshot_every", 5), ("loop", True), ("pace", "source")])
def test_options_only_camface_live_reads_are_refused_not_ignored(option, value):
    """`load(record="out.mp4")` was accepted and recorded nothing; each of `camface live`'s own
    options is a UsageError saying the pipeline does not use it."""
    import dataclasses

    from camface.api import LIVE_ONLY

    assert option in LIVE_ONLY and set(LIVE_ONLY) <= {f.name for f in dataclasses.fields(camface.LiveConfig)}
    with pytest.raises(UsageError, match=f"option {option} is `camface live`'s .* a pipeline does not use it"):
        camface.load(device="cpu", **{option: value})
    # in a LiveConfig too: it was accepted without a word, and the pipeline ignored it
    with pytest.raises(UsageError, match=f"^config's {option}={re.escape(repr(value))} is `camface live`'s .* "
                                         "a pipeline does not use it"):
        camface.load(device="cpu", config=camface.LiveConfig(**{option: value}))


def test_a_config_of_live_s_defaults_and_the_front_ends_configs_are_taken():
    """Only a changed live-only field is refused: a config built with other fields, and a front
    end's config (cli=True: `camface live` reads its source and recording itself), load."""
    with camface.load(config=camface.LiveConfig(max_faces=2, alpha=0.3), device="cpu") as pipeline:
        assert (pipeline.config.max_faces, pipeline.config.alpha) == (2, 0.3)
    with camface.load(config=camface.LiveConfig(source="talk.mp4", record="out.mp4"), device="cpu", cli=True) as live:
        assert live.config.record == "out.mp4"


def test_what_is_computed_from_a_picture_is_not_shown_as_one():
    """`picture.max()` was a 0-d Picture and `picture.mean(axis=2)` a float Picture, which
    Jupyter tried to show as PNG images (or failed to) instead of their numbers."""
    from camface.api import Picture

    picture = np.arange(60, dtype=np.uint8).reshape(4, 5, 3).view(Picture)
    assert picture.max() == 59 and type(picture.max()) is np.uint8
    assert type(picture.mean(axis=2)) is np.ndarray and type(picture.sum(axis=(0, 1))) is np.ndarray
    for derived in (picture.astype(np.float32), picture[:, :, 0], picture[:0], picture[0, 0]):
        assert derived._repr_png_() is None
    assert type(picture + 1) is Picture and (picture + 1)._repr_png_().startswith(b"\x89PNG")


def test_a_detector_that_fails_to_close_still_releases_the_graph_and_is_named(two_faces):
    """The detector's close raising left the graph and explainer held (their ONNX Runtime
    sessions) until close() was called again; now they are released, then the error names the
    detector."""
    api = camface.load(device="cpu")
    api.explain(two_faces)  # the detector is open
    detector = api._detector
    really_close = detector.close

    def fails():
        really_close()
        raise RuntimeError("the detector would not close")

    detector.close = fails
    with pytest.raises(CamfaceError, match=r"closing the camface pipeline's face detector \(\w+\) failed: "
                                           r"RuntimeError: the detector would not close"):
        api.close()
    for attribute in ("graph", "explainer"):
        with pytest.raises(UsageError, match="this camface pipeline is closed"):
            getattr(api, attribute)
    api.close()  # closed: nothing more to do, nothing raised again


def test_close_waits_for_an_explain_in_another_thread(two_faces):
    """Closing while another thread explains closed the face detector under its running call."""
    import threading
    import time

    api = camface.load(device="cpu")
    api.explain(two_faces)  # the detector is open
    explainer, original, order = api.explainer, api.explainer.explain, []

    def slow(*args, **kwargs):
        time.sleep(0.3)
        explained = original(*args, **kwargs)
        order.append("explained")
        return explained

    explainer.explain = slow
    worker = threading.Thread(target=api.explain, args=(two_faces,))
    worker.start()
    time.sleep(0.1)  # the worker is inside explain
    api.close()
    order.append("closed")
    worker.join()
    assert order == ["explained", "closed"]


@pytest.mark.parametrize("frame, hint", [
    (np.zeros((64, 64), np.uint8), r"got shape \(64, 64\) \(grayscale: cv2.cvtColor\(frame, cv2.COLOR_GRAY2BGR\)\)"),
    (np.zeros((64, 64, 1), np.uint8), "grayscale: cv2.cvtColor"),
    (np.zeros((64, 64, 4), np.uint8), r"with alpha: cv2.cvtColor\(frame, cv2.COLOR_BGRA2BGR\)"),
    (np.zeros((2, 64, 64, 3), np.uint8), "one frame per call; explain_crops takes a batch"),
    (np.zeros((3, 64, 48), np.uint8), r"got shape \(3, 64, 48\) \(channels first: np.ascontiguousarray\(frame.transpose"),
    ("photo.jpg", "got str .a path: read it with cv2.imread, or give it to process_video"),
    (Path("photo.jpg"), r"got \w*Path .a path"),
    ([np.zeros((64, 64, 3), np.uint8)] * 2, "got list .one frame per call, as a numpy array"),
])
def test_a_frame_in_another_form_says_how_to_convert_it(cam, frame, hint):
    """Grayscale, RGBA, a batch, a path: the error says which conversion gives a BGR frame."""
    with pytest.raises(UsageError, match=hint):
        cam.explain(frame)


@pytest.mark.parametrize("runtime", ["onnx", "mediapipe"])
def test_the_pipelines_face_detector_checks_its_frames(astronaut_bgr, runtime):
    """`Pipeline.face_detector()` hands out a detector whose `detect` took any array: a float
    frame in [0, 1] found no face without a word on ONNX (ValueError inside MediaPipe), an empty
    frame was a ZeroDivisionError or an OpenCV assertion, a list an AttributeError; used outside
    its `with` block it raised a RuntimeError."""
    with camface.load(device="cpu", detector_runtime=runtime) as pipeline:
        detector = pipeline.face_detector()
        with pytest.raises(UsageError, match="FaceDetector used outside its `with` block"):
            detector.detect(astronaut_bgr)
        with detector:
            assert len(detector.detect(astronaut_bgr[:, ::-1])) == 1  # a view is fine
            for frame, message in [(astronaut_bgr.astype(np.float32) / 255, "got dtype float32 .scale floats"),
                                   (np.zeros((0, 0, 3), np.uint8), r"got shape \(0, 0, 3\)"),
                                   (astronaut_bgr[:, :, 0], "grayscale: cv2.cvtColor"),
                                   (astronaut_bgr.tolist(), "must be a numpy array, uint8 BGR .* got list")]:
                with pytest.raises(UsageError, match=message):
                    detector.detect(frame)


def test_a_masked_array_is_refused_not_read_without_its_mask(cam, two_faces):
    """A numpy masked array's mask was dropped (np.ascontiguousarray): the pixels under it were
    read as whatever they held. One with masked values is refused, naming the way out; one with
    nothing masked is its data."""
    hidden = np.ma.masked_array(two_faces, mask=np.zeros_like(two_faces, bool))
    hidden[:, : two_faces.shape[1] // 2] = np.ma.masked  # one face hidden
    count = int(hidden.mask.sum())
    said = rf"is a masked array with {count} masked values, and camface reads pixel values only: fill them " \
           r"\(array.filled\(0\), black\) or keep what they hold \(array.data\)$"
    with pytest.raises(UsageError, match="^a frame " + said):
        cam.explain(hidden)
    with cam.face_detector() as detector, pytest.raises(UsageError, match="^a frame " + said):
        detector.detect(hidden)
    with pytest.raises(UsageError, match="^frame 0 of _FramesOnly " + said):
        list(cam.process_video(_FramesOnly([hidden])))
    crops = np.ma.masked_array(np.zeros((2, 64, 64, 1), np.uint8), mask=True)
    with pytest.raises(UsageError, match=r"^crops is a masked array with 8192 masked values"):
        cam.explain_crops(crops)
    unmasked = cam.explain(np.ma.masked_array(two_faces))  # nothing masked: the frame itself
    assert [f.box for f in unmasked.faces] == [f.box for f in cam.explain(two_faces).faces]


MASK_SAID = ("camface: a {w}x{h} frame holds values 0..1 only, but frames are uint8 BGR 0..255 (a boolean mask, or "
             "a 0..1 image cast to uint8?): no face is found in it; scale it to 0..255 (frame * 255). Said once")


@pytest.fixture
def mask_unsaid(monkeypatch):
    """The process's mask warning not said yet (another test may have said it), and as it was after."""
    from camface.realtime import frames

    monkeypatch.setattr(frames.MASK_WARNING, "said", False)


@pytest.mark.parametrize("runtime", ["onnx", "mediapipe"])
def test_a_frame_of_zeros_and_ones_is_said_once(two_faces, caplog, mask_unsaid, runtime):
    """A uint8 frame holding 0 and 1 only (a boolean mask, a 0..1 image cast to uint8) found no
    face without a word. It is said once in the process, naming the range: another detector (a
    second detector thread, process_video's) said it again; a black frame and ordinary frames
    are not."""
    mask = (two_faces > 127).astype(np.uint8)
    with camface.load(device="cpu", detector_runtime=runtime) as pipeline, \
            caplog.at_level(logging.WARNING, logger="camface"):
        assert len(pipeline.explain(two_faces).faces) == 2
        assert not pipeline.explain(np.zeros_like(two_faces)).faces and not caplog.messages  # black: valid, unsaid
        for _ in range(2):
            assert not pipeline.explain(mask).faces
        assert caplog.messages == [MASK_SAID.format(w=two_faces.shape[1], h=two_faces.shape[0])]
        with pipeline.face_detector() as detector:  # another detector: not said again
            assert not detector.detect(mask)
        assert len(caplog.messages) == 1


def test_two_detector_threads_say_a_mask_once(astronaut_bgr, caplog, mask_unsaid):
    """Each detector thread (--detect-workers 2) kept its own 'said once': the user read it twice."""
    from camface.realtime.frames import RangeWatch

    mask = (astronaut_bgr > 127).astype(np.uint8)
    watches = [RangeWatch() for _ in range(8)]  # as each detector makes its own
    start = threading.Barrier(len(watches))

    def watch(each):
        start.wait()
        for _ in range(20):
            each(mask)

    with caplog.at_level(logging.WARNING, logger="camface"):
        threads = [threading.Thread(target=watch, args=(each,)) for each in watches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert caplog.messages == [MASK_SAID.format(w=512, h=512)] and all(each.said for each in watches)


def _blocks(shape, size, seed):
    """0s and 1s constant over size x size blocks, as a codec decodes a near-black frame."""
    blocks = np.random.default_rng(seed).random((shape[0] // size, shape[1] // size)) < 0.3
    return np.repeat(np.repeat(blocks, size, 0), size, 1)[..., None].repeat(3, 2).astype(np.uint8)


@pytest.mark.parametrize("make, said", [
    (lambda image: (image > 127).astype(np.uint8), True),  # a boolean mask
    (lambda image: np.round(image / 255).astype(np.uint8), True),  # a 0..1 image cast to uint8
    (lambda image: (cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) > 100).astype(np.uint8)[..., None].repeat(3, 2), True),
    # a night camera's noise about a sensor offset of 0.5, sd 0.2, kept in 0..1: 50% 1s, scattered
    (lambda image: np.random.default_rng(3).normal(0.5, 0.2, image.shape).round().clip(0, 1).astype(np.uint8), False),
    # a capped lens: 0s, and 0.5% hot pixels at 1
    (lambda image: (np.random.default_rng(4).random(image.shape) < 0.005).astype(np.uint8), False),
    # a near-black clip's frame as a codec decodes it: 0s and 1s in 8x8 or 16x16 blocks, or in row bands
    (lambda image: _blocks(image.shape, 8, 5), False),
    (lambda image: _blocks(image.shape, 16, 6), False),
    (lambda image: np.repeat(np.arange(image.shape[0])[:, None, None] // 16 % 2, image.shape[1], 1).repeat(3, 2)
     .astype(np.uint8), False),
], ids=["mask", "unit image", "gray mask", "sensor noise", "hot pixels", "codec 8x8", "codec 16x16", "bands"])
def test_a_mask_is_said_and_a_dark_frame_of_0s_and_1s_is_not(astronaut_bgr, caplog, make, said):
    """Any frame of 0s and 1s, both there, was said to look like a mask: a night camera's noise
    kept in 0..1, or a near-black clip decoded to 0s and 1s, were told to scale by 255. A mask's
    1s fill a share of the frame in regions whose edges follow the image; noise's are scattered
    and a codec's blocks have their edges on its grid."""
    from camface.realtime.frames import Once, RangeWatch

    frame = make(cv2.resize(astronaut_bgr, (640, 480)))
    assert frame.max() == 1 and frame.min() == 0  # the old rule said every one
    watch = RangeWatch(Once())
    with caplog.at_level(logging.WARNING, logger="camface"):
        watch(frame)
    assert watch.said == said and caplog.messages == ([MASK_SAID.format(w=640, h=480)] if said else [])


def test_a_frame_of_ones_only_is_not_said_and_a_mask_after_it_is(astronaut_bgr, caplog):
    """A uniform frame of 1s is what a near-black video decodes to (x264 makes a dark frame
    dithered with 0s and 2s a uniform Y of 17, read back as 1): a real clip was told it looked
    like a boolean mask. It is not said; a mask after it still is."""
    from camface.realtime.frames import Once, RangeWatch

    watch = RangeWatch(Once())
    near_black = np.ones((512, 512, 3), np.uint8)
    with caplog.at_level(logging.WARNING, logger="camface"):
        for _ in range(3):
            watch(near_black)
        assert not watch.said and not caplog.messages
        watch((astronaut_bgr > 127).astype(np.uint8))
    assert watch.said and caplog.messages == [MASK_SAID.format(w=512, h=512)]


def test_a_mask_after_a_black_stream_is_said_within_dark_every_frames(astronaut_bgr):
    """Past its first DARK_EVERY dark frames, a detector's watch reads the whole of one dark frame
    in DARK_EVERY (a black stream's cost): a mask (its 1s in rows the cheap check skips) that
    follows is said within DARK_EVERY frames, one in the first DARK_EVERY at once."""
    from camface.realtime.frames import Once, RangeWatch

    black = np.zeros((480, 640, 3), np.uint8)
    mask = black.copy()
    mask[130:230, 64:576] = astronaut_bgr[200:300] > 127  # not in rows 0, 120, 240, 360
    early, late = RangeWatch(Once()), RangeWatch(Once())
    for _ in range(3):
        early(black)
    early(mask)
    for _ in range(RangeWatch.DARK_EVERY + 15):
        late(black)
    waited = next(n for n in range(1, 2 * RangeWatch.DARK_EVERY) if late(mask) is None and late.said)
    assert early.said and waited == RangeWatch.DARK_EVERY - 15


def test_a_pil_image_says_how_to_convert_it(cam):
    from PIL import Image

    with pytest.raises(UsageError, match=r"got Image .a PIL image: cv2.cvtColor\(np.asarray\(image.convert"):
        cam.explain(Image.new("RGB", (64, 64)))


def test_a_graph_with_a_fixed_batch_is_a_clear_error(tmp_path):
    """A graph whose image input takes exactly one crop loaded (its warm-up is one crop) and then
    failed inside ONNX Runtime at the first frame of two faces."""
    import onnx

    from camface.models import EMOTION_ONNX

    model = onnx.load(str(EMOTION_ONNX))
    image, = (i for i in model.graph.input if i.name == "image")
    image.type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed))
    with pytest.raises(ModelError, match=f"{fixed}: its 'image' input has a fixed batch of 1; a CAM graph takes any batch"):
        camface.load(fixed, device="cpu")


@pytest.mark.parametrize("content", [b"hello world\n", cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()],
                         ids=["text", "png"])
def test_a_file_that_is_no_onnx_model_is_said_to_be_one(tmp_path, content):
    """A text file or a PNG named .onnx was ONNX Runtime's '[ONNXRuntimeError] : 7 :
    INVALID_PROTOBUF : Failed to load model because protobuf parsing failed.' (its words, less
    the status code, are the reason the line gives)"""
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=f"^{re.escape(str(path))} is not an ONNX model \\(ONNX Runtime: Failed to load "
                                         "model because protobuf parsing failed\\): a CAM graph is the .onnx "
                                         "that `camface export` writes$"):
        camface.load(path, device="cpu")


@pytest.mark.parametrize("detector, signature", [
    ("short", r"input 'input' \[1, 128, 128, 3\], outputs boxes \[1, 896, 16\] and scores \[1, 896, 1\]"),
    ("full", r"input 'input_1' \[1, 192, 192, 3\], outputs boxes \[1, 2304, 16\] and scores \[1, 2304, 1\]"),
])
def test_a_face_detector_given_as_the_model_is_said_to_be_one(detector, signature):
    """A BlazeFace .onnx (the bundled detectors) loaded as the CAM graph ended 'a classifier
    becomes one with `camface export models/detectors/blaze_face_short_range.onnx -o cam.onnx`'."""
    from camface.models import DETECTORS_ONNX

    path = DETECTORS_ONNX[detector]
    with pytest.raises(ModelError, match=f"^{re.escape(str(path))} is a face detector model .BlazeFace: {signature}., "
                                         "not a CAM graph: camface runs its own .detector='short' or 'full', "
                                         "--detector.; the CAM graph is a face classifier's, made by `camface export`$"):
        camface.load(path, device="cpu")


def test_a_video_given_as_the_model_is_said_to_be_a_source(tmp_path, monkeypatch, clip):
    """`camface.load("talk.mp4")` (the video where the model goes) read the whole file into
    memory before ONNX Runtime refused it as 'INVALID_PROTOBUF': gigabytes for a long video.
    It is refused by its name, unread."""
    def unread(self):
        raise AssertionError(f"{self} was read")

    monkeypatch.setattr(Path, "read_bytes", unread)
    with pytest.raises(ModelError, match=f"^{re.escape(str(clip))} is a video, not a CAM graph .*a video is a source "
                                         r"\(`process_video`, --source\)$"):
        camface.load(clip, device="cpu")


@pytest.mark.parametrize("name", ["talk.mp4\n", " talk.mp4", "a\x00b"])
def test_a_path_not_found_with_a_newline_or_space_shows_it_on_one_line(cam, name):
    """A path read from a list kept its newline: 'source not found: talk.mp4' and the rest of the
    message on a second line, the newline unseen. The path is shown quoted, escapes and all."""
    for call, said in [(lambda: cam.process_video(name), "source not found: "),
                       (lambda: camface.load(name, device="cpu"), "CAM graph not found: ")]:
        with pytest.raises(CamfaceError, match=re.escape(said + repr(name))) as caught:
            call()
        assert "\n" not in str(caught.value) and "\x00" not in str(caught.value)


@pytest.mark.parametrize("unreadable, message", [
    (False, "{path} is empty \\(0 bytes\\), not a CAM graph$"),  # was ONNX Runtime's 'No graph was found in the protobuf'
    (True, "^cannot read CAM graph {path}: Permission denied$"),  # was a PermissionError traceback
])
def test_an_empty_or_unreadable_model_is_said_to_be_one(tmp_path, monkeypatch, unreadable, message):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    if unreadable:  # chmod 000 does not stop root, who runs the CI
        def refuse(self):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ModelError, match=message.format(path=re.escape(str(path)))):
        camface.load(path, device="cpu")


def test_a_folder_given_as_the_model_is_said_to_be_one(tmp_path):
    with pytest.raises(ModelError, match=f"{tmp_path} is a folder, not a CAM graph"):
        camface.load(tmp_path, device="cpu")


@pytest.mark.parametrize("inputs, outputs, hint", [
    (("input",), ("logits",), True),  # a forward-only classifier: export makes it a CAM graph
    (("image", "class_index"), ("probs", "activations"), False),  # a CAM graph short of a heatmap: no export hint
])
def test_an_onnx_model_that_is_no_cam_graph_says_whether_to_export_it(tmp_path, inputs, outputs, hint):
    """A plain ONNX classifier given to `load` was 'not a camface CAM graph: missing image,
    class_index, probs, activations, a heatmap output', with no word of `camface export`."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Identity", [inputs[0]], [name]) for name in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3])
                                           for name in inputs],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3]) for name in outputs])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    with pytest.raises(ModelError, match=f"{path} is not a camface CAM graph: missing .*a heatmap output") as caught:
        camface.load(path, device="cpu")
    # without --preset, export refused the .onnx: "does not say how it normalises its input"
    export = f"; a classifier becomes one with `camface export {path} -o cam.onnx --preset PRESET`"
    assert str(caught.value).endswith(export) == hint, caught.value


def test_a_classifier_given_as_the_model_says_to_export_it():
    """The bundled Keras classifier sits beside its graph; loading it was ONNX Runtime's
    'INVALID_PROTOBUF : Failed to load model because protobuf parsing failed'."""
    from camface.models import EMOTION_KERAS

    with pytest.raises(ModelError, match=f"{EMOTION_KERAS} is a Keras model, not a CAM graph: make one with "
                                         f"`camface export {EMOTION_KERAS} -o cam.onnx`"):
        camface.load(EMOTION_KERAS, device="cpu")


@pytest.mark.parametrize("hud", ["no", 0, None, "False"])
def test_annotate_refuses_a_hud_that_is_not_true_or_false(cam, two_faces, hud):
    """annotate(hud="no") drew the HUD: any non-empty string is true."""
    result = cam.explain(two_faces)
    with pytest.raises(UsageError, match=f"hud must be True or False, got {re.escape(repr(hud))}"):
        cam.annotate(two_faces, result, hud=hud)
    assert (cam.annotate(two_faces, result, hud=np.bool_(False)) == cam.annotate(two_faces, result)).all()
