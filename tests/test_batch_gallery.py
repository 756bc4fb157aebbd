"""`camface batch` (Ray, local) on a gallery graph of `camface enroll`: its rows carry each face's
cosine similarities and the `unknown (best: NAME 0.31)` label, as `camface live` computes them,
through whole videos and joined segments. Small: two identities enrolled, a six-frame clip with
a third face that is not."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from gallery_helpers import SIZE, centre_on, faces_bgr, people_dir, to_onnx, torch_embedder  # noqa: E402
from realtime_helpers import write_clip  # noqa: E402

from camface.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def gallery_clip(tmp_path_factory):
    """(gallery.onnx enrolling collins and hopper, a 6-frame 512x512 clip: hopper, collins and
    the cameraman, who is not enrolled, twice)."""
    from camface.export import enroll

    root = tmp_path_factory.mktemp("gallery")
    everyone = people_dir(root / "everyone", per_person=3)
    crops, _, _, _ = enroll.face_crops(everyone, enroll.scan_people(everyone), (SIZE, SIZE), "RGB")
    # centred on all three faces, as a trained embedder spreads faces it was not shown
    embedder = to_onnx(centre_on(torch_embedder(), crops), root / "embedder.onnx")
    people = people_dir(root / "people", per_person=3, names=("collins", "hopper"))
    graph = root / "gallery.onnx"
    assert main(["enroll", str(people), "--model", str(embedder), "-o", str(graph), "--preset", "arcface",
                 "--no-rank"]) == 0
    faces = faces_bgr()
    clip = write_clip(root / "clip.mp4", [faces["hopper"][:512, :512], faces["collins"], faces["cameraman"]] * 2)
    return graph, clip


def _live(graph, clip, recording, *flags):
    """Every FrameResult `camface live` hands its writer on `clip`, in order."""
    from camface.realtime.recorder import Recorder

    seen, handle = [], Recorder.handle

    def capture(self, item):
        seen.append(item.explained.result)
        handle(self, item)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Recorder, "handle", capture)
        assert main(["live", "--model", str(graph), "--source", str(clip), "--no-show", "--device", "cpu",
                     "--record", str(recording), *flags]) == 0
    return seen


MODES = {  # name: (camface batch flags, camface live flags)
    "whole video": ((), ()),
    "two segments": (("--segment-frames", "3"), ()),
    "smoothing": (("--smooth", "0.6"), ("--smooth", "0.6")),  # the similarities smoothed as the probs
}


@pytest.mark.parametrize("mode", list(MODES))
def test_batch_rows_carry_the_similarities_and_the_unknown_label(ray_cluster, gallery_clip, tmp_path, mode):
    from camface.batch.inputs import video_id
    from camface.realtime.graph import CamGraph

    graph_path, clip = gallery_clip
    flags, live_flags = MODES[mode]
    info = CamGraph(graph_path, "cpu").info
    out = tmp_path / "out"
    assert main(["batch", str(clip), "-o", str(out), "--model", str(graph_path), "--device", "cpu",
                 "--graph-gpus", "0", "--no-progress", *flags]) == 0
    table = pq.read_table(out / "rows" / f"{video_id(clip.resolve())}.parquet").to_pydict()
    live = _live(graph_path, clip, tmp_path / "live.mp4", *live_flags)
    expected = [(r.index, p) for r in live for p in r.predictions]
    assert table["frame"] == [index for index, _ in expected] and len(expected) == 6  # one face a frame
    similarity = np.array(table["similarity"], np.float32)
    assert similarity.shape == (6, 2)  # [faces, identities]
    np.testing.assert_allclose(similarity, np.stack([p.similarity for _, p in expected]), rtol=1e-5, atol=1e-6)
    # the label: the name at or above the threshold, else unknown with the best match and its score
    labels = info.labels
    best, threshold = similarity.argmax(1), info.threshold
    want = [labels[b] if s[b] >= threshold else f"unknown (best: {labels[b]} {s[b]:.2f})"
            for b, s in zip(best, similarity)]
    assert table["predicted_label"] == want
    assert [p.label(labels, threshold) for _, p in expected] == want  # as live names them
    assert table["explained_label"] == [labels[k] for k in table["explained"]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == list(labels) and summary["videos"][0]["status"] == "done"
    assert summary["videos"][0].get("segments", 1) == (2 if mode == "two segments" else 1)
    # the report counts the unknown faces beside the shares of the best matches
    unknown = sum(label.startswith("unknown (best: ") for label in want)
    assert summary["videos"][0]["unknown_faces"] == unknown
    assert f"; unknown (below the threshold) {unknown / 6:.0%} |" in (out / "report.md").read_text()
    if mode == "smoothing":  # a track's probs and similarities are blended over its frames
        return
    # probs = softmax(scale * similarity), the scale in the graph's metadata
    logits = info.gallery["scale"] * similarity.astype(np.float64)
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(table["probs"], softmax / softmax.sum(1, keepdims=True), atol=1e-5)
    assert want[:2] == ["hopper", "collins"] and want[3:5] == ["hopper", "collins"]
    assert want[2].startswith("unknown (best: ") and want[5].startswith("unknown (best: ")  # the cameraman
    assert table["explained"] == list(best)  # the map explains the best match, unknown or not
