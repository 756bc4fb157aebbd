"""Snapshots are written and read by one module (camface.realtime.snapshot): the crops come back
exactly as they were fed to the graph, in each colour order."""

import cv2
import numpy as np
import pytest
from realtime_helpers import TINY_LABELS

from camface.errors import SourceError
from camface.graph_spec import GraphInfo
from camface.realtime.results import Face, FrameResult, Prediction
from camface.realtime.snapshot import SnapshotWriter, find_snapshots, read_crop, read_meta


@pytest.mark.parametrize("order, channels", [("GRAY", 1), ("RGB", 3), ("BGR", 3)])
def test_crops_come_back_as_fed_to_the_graph(tmp_path, order, channels):
    info = GraphInfo(labels=TINY_LABELS, input_size=(16, 24), color_order=order, target_layer="t",
                     heatmaps=("gradcam",), feature_size=(4, 4))
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not a graph: only hashed")
    crops = np.random.default_rng(0).integers(0, 256, (2, 16, 24, channels), dtype=np.uint8)
    faces = (Face((1, 2, 10, 10), 0.9, (0, 0, 12, 12)), Face((20, 2, 8, 8), 0.8, (19, 1, 10, 10)))
    predictions = tuple(Prediction(np.array([0.7, 0.2, 0.1], np.float32), np.zeros((4, 4), np.float32), 0, 0, "gradcam")
                        for _ in faces)
    result = FrameResult(5, faces, predictions, labels=TINY_LABELS)
    writer = SnapshotWriter(tmp_path / "snaps", "clip.mp4", model, info)
    folder = writer.save(np.zeros((40, 40, 3), np.uint8), crops, result)
    assert find_snapshots([tmp_path / "snaps"]) == [folder] == find_snapshots([folder])
    # a snapshot named twice, or by its parent too, is one snapshot: its crops were scored twice
    assert find_snapshots([tmp_path / "snaps", folder, tmp_path / "snaps" / ".." / "snaps"]) == [folder]
    # its snapshot.json, as `camface guided` takes it ("snapshot.json is not a camface snapshot folder (no
    # snapshot.json in it ...)")
    assert find_snapshots([folder / "snapshot.json"]) == [folder]
    # `camface guided snaps` said "snapshot.json is missing", of the folder `camface live` wrote them to
    with pytest.raises(SourceError, match=f"^{tmp_path / 'snaps'} holds 1 camface snapshot\\(s\\) but is none: "
                                          f"give one of them, such as {folder}$"):
        read_meta(tmp_path / "snaps")
    meta = read_meta(folder)
    assert meta["color_order"] == order and meta["frame_index"] == 5 and len(meta["faces"]) == 2
    for i, face in enumerate(meta["faces"]):
        np.testing.assert_array_equal(read_crop(folder / face["crop"], order), crops[i])


def test_what_is_not_a_snapshot_is_named(tmp_path):
    with pytest.raises(SourceError, match=f"{tmp_path} is not a camface snapshot folder"):
        find_snapshots([tmp_path])
    # a mistyped name: it said "not a camface snapshot folder", as of a folder of other files
    with pytest.raises(SourceError, match=f"^snapshot folder not found: {tmp_path / 'snpas'}$"):
        find_snapshots([tmp_path / "snpas"])
    with pytest.raises(SourceError, match="snapshot.json is missing"):
        read_meta(tmp_path)
    (tmp_path / "snapshot.json").write_text('{"faces": 3}')
    with pytest.raises(SourceError, match="cannot read .*snapshot.json: faces is not a list"):
        read_meta(tmp_path)
    with pytest.raises(SourceError, match="cannot read face crop .*face_00.png"):
        read_crop(tmp_path / "face_00.png", "GRAY")


@pytest.mark.parametrize("make, why", [(lambda path: path.unlink(), "it is missing"),
                                       (lambda path: (path.unlink(), path.mkdir()), "it is a folder")])
def test_a_missing_crop_is_named_in_one_line(tmp_path, capfd, make, why):
    """A snapshot's crop deleted (or a folder in its place) said "cannot read face crop X" after
    OpenCV's own warning line ("[ WARN:0@1.4] global loadsave.cpp ... can't open/read file")."""
    crop = tmp_path / "face_00.png"
    cv2.imwrite(str(crop), np.zeros((8, 8, 3), np.uint8))
    make(crop)
    with pytest.raises(SourceError, match=f"^cannot read face crop {crop}: {why}$"):
        read_crop(crop, "BGR")
    assert capfd.readouterr().err == ""
