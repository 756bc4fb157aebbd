"""The frame explainer (camface.realtime.explainer) that every front end calls, and the one
overlay function (camface.realtime.overlay) every picture of a heatmap goes through."""

from __future__ import annotations

import numpy as np
import pytest
from realtime_helpers import tiny_cam_graph

from camface.errors import ModelError
from camface.realtime.crop import crop_faces
from camface.realtime.results import Face, FrameResult, Prediction
from camface.realtime.controls import Controls


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    from camface.realtime.graph import CamGraph

    return CamGraph(tiny_cam_graph(tmp_path_factory.mktemp("graph") / "tiny.onnx"), "cpu")


def _frame():
    """A 120x160 BGR frame: a bright square (face A, top left) and a dark-on-bright one (face B)."""
    rng = np.random.default_rng(3)
    frame = rng.integers(60, 200, (120, 160, 3), dtype=np.uint8)
    frame[10:50, 10:50] = 250
    frame[60:110, 90:140] = 240
    frame[70:90, 100:120] = 5
    return frame


FACES = (Face((10, 10, 40, 40), 0.9), Face((90, 60, 50, 50), 0.8), Face((0, 0, 8, 8), 0.5))


@pytest.mark.parametrize("controls, class_index", [
    (Controls("gradcam"), [-1, -1]),
    (Controls("cam", explained_class=1), [1, 1]),
    (Controls("gradcampp", explained_class=0), [0, 0]),
])
def test_explainer_gives_what_the_graph_gives(graph, controls, class_index):
    frame = _frame()
    before = frame.copy()
    from camface.realtime.explainer import FrameExplainer

    explainer = FrameExplainer(graph, margin=0.2, max_faces=2)
    explained = explainer.explain(frame, FACES, controls, index=7, fps=30.0, stage_ms={"detect": 1.0})
    np.testing.assert_array_equal(frame, before)  # the frame is not drawn on
    crops, placed = crop_faces(frame, FACES[:2], 0.2, graph.info.input_size, graph.info.color_order)
    probs, heatmaps = graph.run(crops, np.array(class_index, np.int64), controls.method)
    result = explained.result
    np.testing.assert_array_equal(explained.crops, crops)
    assert result.faces == placed and result.dropped == 1 and result.index == 7
    assert result.method == controls.method and result.explained_class == controls.explained_class
    assert result.fps == 30.0 and result.stage_ms == {"detect": 1.0} and result.labels == graph.info.labels
    for i, prediction in enumerate(result.predictions):
        np.testing.assert_allclose(prediction.probs, probs[i], rtol=1e-6)
        np.testing.assert_allclose(prediction.heatmap, heatmaps[i], rtol=1e-6)
        assert prediction.predicted == int(probs[i].argmax())
        assert prediction.explained == (prediction.predicted if class_index[i] < 0 else class_index[i])
    # the tiny graph's class 0 lights up bright cells: face A is bright, face B mostly too
    assert result.predictions[0].predicted == 0


def test_explainer_without_faces_and_with_smoothing(graph):
    from camface.realtime.explainer import FrameExplainer
    from camface.realtime.timing import StageTimer

    timer = StageTimer()
    explainer = FrameExplainer(graph, smooth=0.5, timer=timer)
    empty = explainer.explain(_frame(), (), Controls("gradcam"))
    assert empty.result.faces == () and empty.result.predictions == () and empty.crops.shape == (0, 32, 32, 1)
    first = explainer.explain(_frame(), FACES[:1], Controls("gradcam")).result
    frame = _frame()
    frame[10:50, 10:50] = 120  # the same face, dimmer: the smoothed probabilities lie between
    raw = FrameExplainer(graph).explain(frame, FACES[:1], Controls("gradcam")).result
    smoothed = explainer.explain(frame, FACES[:1], Controls("gradcam")).result
    np.testing.assert_allclose(smoothed.predictions[0].probs,
                               0.5 * first.predictions[0].probs + 0.5 * raw.predictions[0].probs, rtol=1e-5)
    assert smoothed.faces[0].track_id == first.faces[0].track_id >= 0
    assert timer.stats()["crop"].count == timer.stats()["classify"].count == 3  # the timed explainer's calls


def test_explainer_refuses_a_method_the_graph_lacks(tmp_path):
    from camface.realtime.config import LiveConfig
    from camface.realtime.explainer import FrameExplainer
    from camface.realtime.graph import CamGraph

    graph = CamGraph(tiny_cam_graph(tmp_path / "nocam.onnx", cam=False), "cpu")
    with pytest.raises(ModelError, match="has no 'cam' heatmap.*it offers gradcam, gradcampp"):
        FrameExplainer.from_config(LiveConfig(method="cam"), graph)


# ------------------------------------------------------------------------------ overlay


def test_overlay_is_identical_live_and_in_the_montage():
    """The same crop and heatmap: the live renderer (face box = its crop square, inside the
    frame) and the training montage draw exactly the same pixels."""
    from camface.models.report import overlay_heatmap
    from camface.realtime.render import HeatmapAnnotator

    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    heatmap = rng.normal(size=(4, 4)).astype(np.float32)
    frame = np.zeros((100, 120, 3), np.uint8)
    frame[20:68, 30:78] = crop
    face = Face((30, 20, 48, 48), 1.0, crop_box=(30, 20, 48, 48))
    prediction = Prediction(np.array([0.7, 0.3], np.float32), heatmap, 0, 0, "gradcam")
    HeatmapAnnotator("jet", 0.45).annotate(frame, FrameResult(0, (face,), (prediction,), method="gradcam"))
    montage = overlay_heatmap(crop, heatmap, "gradcam")
    np.testing.assert_array_equal(frame[20:68, 30:78], montage)
    assert not np.array_equal(montage, crop)


@pytest.mark.parametrize("method", ["gradcam", "cam"])
def test_overlay_values(method):
    from camface.realtime.overlay import overlay

    image = np.full((16, 16, 3), 100, np.uint8)
    heatmap = np.zeros((2, 2), np.float32)
    assert np.array_equal(overlay(image, heatmap, method), image)  # no evidence: untouched
    heatmap[0, 0] = 1.0
    out = overlay(image, heatmap, method, alpha=1.0)
    assert out is not image and (image == 100).all()
    # alpha 1: the colormap alone; JET: hot corner red (BGR channel 2), cold corner blue
    assert out[0, 0, 2] > out[0, 0, 0] + 100 and out[15, 15, 0] > out[15, 15, 2] + 100
    half = overlay(image, heatmap, method, alpha=0.5)
    np.testing.assert_allclose(half.astype(int), (out.astype(int) + 100) / 2, atol=1)
    # a part of a larger square: the same pixels as that part of the whole
    whole = overlay(np.full((32, 32, 3), 100, np.uint8), heatmap, method)
    part = overlay(np.full((10, 12, 3), 100, np.uint8), heatmap, method, side=32, offset=(5, 7))
    np.testing.assert_array_equal(part, whole[7:17, 5:17])


def test_overlay_misuse():
    from camface.realtime.overlay import overlay

    heatmap = np.ones((2, 2), np.float32)
    assert overlay(np.zeros((8, 9, 3), np.uint8), heatmap, "gradcam").shape == (8, 9, 3)  # not square: fine
    with pytest.raises(ValueError, match=r"BGR image \[h, w, 3\]"):
        overlay(np.zeros((8, 8), np.uint8), heatmap, "gradcam")
    with pytest.raises(ValueError, match="outside the 8-pixel square"):
        overlay(np.zeros((4, 4, 3), np.uint8), heatmap, "gradcam", side=8, offset=(6, 0))
    with pytest.raises(ValueError, match="unknown colormap 'nope'"):
        overlay(np.zeros((4, 4, 3), np.uint8), heatmap, "gradcam", "nope")


class _SaturatedSigmoidGraph:
    """The tiny graph's contract with a multi-label sigmoid head whose classes 0 and 1 both
    saturate at probability 1.0 (logits 20 and 30): like every exported graph it explains the
    argmax of its logits (class 1) when asked for the predicted class (-1). Each heatmap is
    filled with 1 + the class it explains."""

    def __init__(self, info):
        self.info, self.provider, self.calls = info, "cpu", []

    def run(self, crops, class_index, method):
        self.calls.append(class_index.tolist())
        probs = np.tile(np.array([1.0, 1.0, 0.2], np.float32), (len(crops), 1))
        explained = np.where(class_index < 0, 1, class_index)
        heatmaps = np.ones((len(crops), 4, 4), np.float32) * (1 + explained)[:, None, None]
        return probs, heatmaps


def test_a_class_shown_as_predicted_is_the_class_its_heatmap_explains(graph):
    """Tied top probabilities (a saturated sigmoid): the result names the first of them as
    predicted, so its heatmap is of that class, not of the graph's own pick among the ties."""
    from camface.realtime.explainer import FrameExplainer, run_graph_scores

    fake = _SaturatedSigmoidGraph(graph.info)
    result = FrameExplainer(fake, margin=0.2, max_faces=2).explain(_frame(), FACES, Controls("gradcam")).result
    for prediction in result.predictions:
        assert prediction.predicted == prediction.explained == 0
        np.testing.assert_array_equal(prediction.heatmap, np.full((4, 4), 1.0, np.float32))
    assert fake.calls == [[-1, -1], [0, 0]]  # the tied crops once more, for their predicted class
    # a class asked for by index is explained as asked, once; "none" asks for no heatmap again
    fake.calls.clear()
    crops = np.zeros((3, 32, 32, 1), np.uint8)
    probs, heatmaps, _, _ = run_graph_scores(fake, crops, np.array([2, -1, 1], np.int64), "gradcam")
    assert heatmaps[:, 0, 0].tolist() == [3.0, 1.0, 2.0] and fake.calls == [[2, -1, 1], [0]]
    fake.calls.clear()
    run_graph_scores(fake, crops, np.full(3, -1, np.int64), "none")
    assert fake.calls == [[-1, -1, -1]]
