"""`explain_many`: several streams' frames in one graph call give what each stream's own
`FrameExplainer.explain` gives (smoothers included)."""

from __future__ import annotations

import numpy as np
import pytest
from realtime_helpers import tiny_cam_graph

from camface.realtime.results import Face
from camface.realtime.controls import Controls


class Counted:
    def __init__(self, graph):
        self.graph, self.calls, self.sizes = graph, 0, []

    def run(self, crops, class_index, method):
        self.calls += 1
        self.sizes.append(len(crops))
        return self.graph.run(crops, class_index, method)

    def __getattr__(self, name):
        return getattr(self.graph, name)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    from camface.realtime.graph import CamGraph

    return CamGraph(tiny_cam_graph(tmp_path_factory.mktemp("graph") / "tiny.onnx"), "cpu")


def _frame(seed: int) -> np.ndarray:
    frame = np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    frame[20:60, 20:60] = 250 - 15 * (seed % 12)
    return frame


FACES = (Face((20, 20, 40, 40), 0.9), Face((90, 50, 50, 50), 0.8), Face((0, 0, 9, 9), 0.5))


@pytest.mark.parametrize("streams, calls", [
    # (controls, faces, smooth) per stream; calls: graph calls explain_many makes
    ([(Controls("gradcam"), FACES, 0.0), (Controls("gradcam", explained_class=1), FACES[:1], 0.0)], 1),
    ([(Controls("gradcam"), FACES, 0.5), (Controls("gradcam"), (), 0.5), (Controls("gradcam"), FACES[1:], 0.0)], 1),
    ([(Controls("gradcam"), FACES, 0.0), (Controls("cam", explained_class=0), FACES, 0.0),
      (Controls("none"), FACES[:2], 0.0), (Controls("gradcam"), FACES[2:], 0.0)], 3),  # one per method
    ([(Controls("gradcampp"), FACES, 0.0)] * 12, 2),  # 12 x 3 crops: 32 + 4
])
def test_explain_many_equals_explain_per_frame(graph, streams, calls):
    from camface.realtime.explainer import FrameExplainer, explain_many

    counted = Counted(graph)
    batched = [FrameExplainer(counted, margin=0.2, max_faces=3, smooth=s) for _, _, s in streams]
    single = [FrameExplainer(graph, margin=0.2, max_faces=3, smooth=s) for _, _, s in streams]
    for step in range(3):  # several frames: the smoothers' state must follow the same path
        frames = [_frame(step + k) for k in range(len(streams))]
        items = [(e, f, faces, c, step, 30.0, {"detect": 1.0})
                 for e, f, (c, faces, _) in zip(batched, frames, streams)]
        before = counted.calls
        got = explain_many(items)
        assert counted.calls - before == calls and max(counted.sizes) <= 32
        for e, f, (c, faces, _), g in zip(single, frames, streams, got):
            want = e.explain(f, faces, c, step, 30.0, {"detect": 1.0})
            np.testing.assert_array_equal(g.crops, want.crops)
            a, b = g.result, want.result
            assert (a.faces, a.index, a.method, a.explained_class, a.dropped, a.fps, a.stage_ms) == \
                   (b.faces, b.index, b.method, b.explained_class, b.dropped, b.fps, b.stage_ms)
            assert len(a.predictions) == len(b.predictions)
            for p, q in zip(a.predictions, b.predictions):
                assert (p.predicted, p.explained, p.method) == (q.predicted, q.explained, q.method)
                np.testing.assert_allclose(p.probs, q.probs, rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(p.heatmap, q.heatmap, rtol=1e-5, atol=1e-7)
