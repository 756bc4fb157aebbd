"""Reading snapshot folders for `camface guided` (no TensorFlow needed)."""

import json

import cv2
import numpy as np
import pytest

from camface.errors import ModelError, SourceError
from camface.guided.snapshot import EMOTION_PREPROCESSING, read_snapshot
from camface.hashing import sha256_file


def write_snapshot(folder, crops_bgr, color_order, model):
    folder.mkdir()
    faces = []
    for i, crop in enumerate(crops_bgr):
        cv2.imwrite(str(folder / f"face_{i:02d}.png"), crop)
        faces.append({"crop": f"face_{i:02d}.png", "box": [10 * i, 5, 40, 40], "score": 0.9,
                      "probs": [0.5, 0.5], "predicted": 0, "explained": 1 - i})
    (folder / "snapshot.json").write_text(json.dumps(
        {"camface_version": "0.1.0", "source": "x", "frame_index": 3, "method": "gradcam",
         "labels": ["a", "b"], "color_order": color_order, "model": model, "faces": faces}))
    return folder


@pytest.mark.parametrize("color_order", ["RGB", "BGR", "GRAY"])
def test_crops_come_back_in_the_graph_colour_order(tmp_path, astronaut_bgr, color_order):
    """The Keras file is found by `source_model` beside the (absent) ONNX file; crops are
    converted from the PNG's BGR to the graph's order; the emotion scaling is assumed."""
    keras_file = tmp_path / "mine.keras"
    keras_file.write_bytes(b"weights")
    model = {"path": str(tmp_path / "mine.onnx"), "sha256": "", "source_model": "mine.keras",
             "source_sha256": sha256_file(keras_file)}
    crop_bgr = cv2.resize(astronaut_bgr[82:177, 177:272], (32, 32))
    png = crop_bgr if color_order != "GRAY" else cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2GRAY)
    source = read_snapshot(write_snapshot(tmp_path / "snap", [png, png], color_order, model))
    assert source.keras_path == keras_file
    assert source.labels == ("a", "b")
    assert [f.explained for f in source.faces] == [1, 0]
    assert source.faces[1].box == (10, 5, 40, 40)
    crop = source.faces[0].crop
    if color_order == "RGB":
        np.testing.assert_array_equal(crop, crop_bgr[:, :, ::-1])
    elif color_order == "BGR":
        np.testing.assert_array_equal(crop, crop_bgr)
    else:
        np.testing.assert_array_equal(crop[:, :, 0], png)
    assert source.preprocessing.color_order == color_order
    assert source.preprocessing.scale == EMOTION_PREPROCESSING.scale
    assert any("not found" in note for note in source.notes)


def test_bad_snapshots(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(SourceError, match="not a camface snapshot: snapshot.json is missing"):
        read_snapshot(folder)
    (folder / "snapshot.json").write_text("{not json")
    with pytest.raises(SourceError, match="cannot read .*snapshot.json"):
        read_snapshot(folder)
    model = {"path": str(tmp_path / "m.onnx"), "source_model": "m.keras", "source_sha256": "f" * 64}
    (tmp_path / "m.keras").write_bytes(b"other")
    crops = [np.zeros((8, 8), np.uint8)]
    with pytest.raises(ModelError, match="m.keras does not match snapshot .*sha256"):
        read_snapshot(write_snapshot(tmp_path / "snap", crops, "GRAY", model))
    model["source_sha256"] = sha256_file(tmp_path / "m.keras")
    folder = write_snapshot(tmp_path / "snap2", crops, "GRAY", model)
    (folder / "face_00.png").unlink()
    with pytest.raises(SourceError, match="cannot read face crop .*face_00.png"):
        read_snapshot(folder)


def _faces_not_objects(meta):
    meta["faces"] = ["face_00.png"]


def _explained_not_a_number(meta):
    meta["faces"][0]["explained"] = "happy"


def _box_null(meta):
    meta["faces"][1]["box"] = None


def _box_too_short(meta):
    meta["faces"][0]["box"] = [1, 2]


def _model_not_an_object(meta):
    meta["model"] = "emotion.onnx"


def _unknown_color_order(meta):
    meta["color_order"] = "YUV"


def _labels_a_number(meta):
    meta["labels"] = 5


def _labels_not_strings(meta):
    meta["labels"] = ["happy", 3]


def _faces_left_out(meta):
    del meta["faces"]


def _a_list(meta):
    return [1, 2]  # what is written instead of the edited snapshot.json


@pytest.mark.parametrize("edit, message", [
    (_faces_not_objects, "every entry of \"faces\" must be an object"),
    (_explained_not_a_number, "face 0: invalid literal .*'happy'"),
    (_box_null, "face 1: 'NoneType' object is not iterable"),
    (_box_too_short, r"face 0: box \(1, 2\) is not \[x, y, w, h\]"),
    (_model_not_an_object, "\"model\" is 'emotion.onnx', not an object"),
    (_unknown_color_order, "unknown color_order 'YUV'"),
    (_labels_a_number, r"labels is not a list of strings \(5\)"),
    (_labels_not_strings, r"labels is not a list of strings \(\[\"happy\", 3\]\)"),
    (_faces_left_out, r"faces is not a list \(it has none\)"),
    (_a_list, r"not a JSON object but \[1, 2\]"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else "")
def test_a_corrupt_snapshot_json_is_a_source_error_naming_it(tmp_path, edit, message):
    """A hand-edited or truncated snapshot.json: one SourceError naming the file (the CLI's
    one-line error, exit 2), never an AttributeError / TypeError traceback (labels of 5 were one in
    `camface guided`; a list, or no faces, said "list indices must be integers" or "'faces'")."""
    keras_file = tmp_path / "m.keras"
    keras_file.write_bytes(b"weights")
    model = {"path": str(tmp_path / "m.onnx"), "source_model": "m.keras",
             "source_sha256": sha256_file(keras_file)}
    folder = write_snapshot(tmp_path / "snap", [np.zeros((8, 8), np.uint8)] * 2, "GRAY", model)
    meta = json.loads((folder / "snapshot.json").read_text())
    (folder / "snapshot.json").write_text(json.dumps(edit(meta) or meta))
    with pytest.raises(SourceError, match=f"cannot read .*snapshot.json: .*{message}"):
        read_snapshot(folder)


def test_crops_of_different_sizes_are_a_source_error_naming_the_crop(tmp_path):
    keras_file = tmp_path / "m.keras"
    keras_file.write_bytes(b"weights")
    model = {"path": str(tmp_path / "m.onnx"), "source_model": "m.keras",
             "source_sha256": sha256_file(keras_file)}
    folder = write_snapshot(tmp_path / "snap", [np.zeros((8, 8), np.uint8), np.zeros((6, 6), np.uint8)],
                            "GRAY", model)
    with pytest.raises(SourceError, match="face crop .*face_01.png is 6x6 but face 0's is 8x8"):
        read_snapshot(folder)


def test_a_folder_given_as_the_model_is_named_a_folder(tmp_path, astronaut_bgr):
    """`camface guided SNAPSHOT --model FOLDER` (or an image's) said "model file not found: FOLDER"."""
    from camface.guided.image import image_model

    (tmp_path / "saved.keras").mkdir()
    crop = cv2.resize(astronaut_bgr[82:177, 177:272], (32, 32))
    model = {"path": str(tmp_path / "mine.onnx"), "sha256": "", "source_model": "mine.keras", "source_sha256": ""}
    folder = write_snapshot(tmp_path / "snap", [crop], "BGR", model)
    message = f"^{tmp_path / 'saved.keras'} is a folder, not a model file$"
    with pytest.raises(ModelError, match=message):
        read_snapshot(folder, model_override=tmp_path / "saved.keras")
    with pytest.raises(ModelError, match=message):
        image_model(tmp_path / "saved.keras")
