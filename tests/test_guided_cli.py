"""`camface guided` end to end: snapshot folders built by hand from the astronaut photo (in the
live loop's snapshot format), plain images, the figure's axes, the GIF, and misuse."""

import json
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from camface.cli import main  # noqa: E402
from camface.guided.figure import comparison_figure  # noqa: E402
from camface.hashing import sha256_file  # noqa: E402
from camface.models import EMOTION_KERAS, EMOTION_ONNX, EMOTION_LABELS, read_labels  # noqa: E402

LABELS = read_labels(EMOTION_LABELS)
BOX = (177, 82, 95, 95)  # the astronaut's face, pixels


def make_snapshot(folder, astronaut_bgr, *, faces=2, explained=(-1, 4), model=None, predicted=3):
    """A snapshot folder as the live loop writes it: frame.png, face_NN.png (gray), snapshot.json.
    Face 1 is the mirrored crop, so the two rows differ."""
    import cv2

    folder.mkdir()
    cv2.imwrite(str(folder / "frame.png"), astronaut_bgr)
    x, y, w, h = BOX
    crop = cv2.cvtColor(cv2.resize(astronaut_bgr[y:y + h, x:x + w], (64, 64),
                                   interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
    entries = []
    for i in range(faces):
        cv2.imwrite(str(folder / f"face_{i:02d}.png"), crop if i % 2 == 0 else crop[:, ::-1])
        entries.append({"crop": f"face_{i:02d}.png", "box": list(BOX), "score": 0.92,
                        "probs": [0.0] * 6 + [1.0], "predicted": predicted,
                        "explained": explained[i % len(explained)]})
    if model is None:
        model = {"path": str(EMOTION_ONNX),
                 "sha256": sha256_file(EMOTION_ONNX) if EMOTION_ONNX.is_file() else "",
                 "source_model": EMOTION_KERAS.name, "source_sha256": sha256_file(EMOTION_KERAS)}
    meta = {"camface_version": "0.1.0", "source": "test", "frame_index": 12, "method": "gradcam",
            "labels": LABELS, "color_order": "GRAY", "model": model, "faces": entries}
    (folder / "snapshot.json").write_text(json.dumps(meta))
    return folder


def files_under(path):
    return sorted(p.relative_to(path) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory, astronaut_bgr):
    return make_snapshot(tmp_path_factory.mktemp("snap") / "frame_000012", astronaut_bgr)


def test_snapshot_figure(snapshot_dir, caplog):
    import cv2

    before = files_under(snapshot_dir)
    with caplog.at_level(logging.INFO):
        assert main(["guided", str(snapshot_dir), "--layer", "conv2d_7"]) == 0
    out = snapshot_dir / "guided.png"
    assert files_under(snapshot_dir) == sorted(before + [out.relative_to(snapshot_dir)])
    image = cv2.imread(str(out))
    assert image is not None and image.shape[1] > 1000
    assert "2 row(s)" in caplog.text and "conv2d_7" in caplog.text
    # -o naming guided's own default file writes it again, as without -o; it was refused as "a
    # file of the input folder" once the first run had written it
    stamp = out.stat().st_mtime_ns
    assert main(["guided", str(snapshot_dir), "--layer", "conv2d_7", "-o", str(out)]) == 0
    assert out.stat().st_mtime_ns != stamp and cv2.imread(str(out)) is not None


def test_snapshot_without_graph_uses_bundled_model_by_sha(tmp_path, astronaut_bgr, caplog):
    """The ONNX file is gone: the Keras model is found by source_sha256, preprocessing assumed."""
    model = {"path": str(tmp_path / "gone" / "emotion.onnx"), "sha256": "",
             "source_model": "renamed.hdf5", "source_sha256": sha256_file(EMOTION_KERAS)}
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1, model=model)
    with caplog.at_level(logging.INFO):
        assert main(["guided", str(folder), "-o", str(tmp_path / "fig.png"), "--class", "sad"]) == 0
    assert (tmp_path / "fig.png").is_file()
    assert "assuming the emotion model's preprocessing" in caplog.text
    assert "1 row(s), layer 'conv2d_7'" in caplog.text


def test_layers_gif_has_one_frame_per_conv_layer(snapshot_dir, tmp_path):
    from PIL import Image

    model = keras.models.load_model(str(EMOTION_KERAS), compile=False)
    convs = [layer.name for layer in model.layers
             if type(layer).__name__ in ("Conv2D", "SeparableConv2D", "DepthwiseConv2D")]
    assert len(convs) == 15
    out = tmp_path / "layers.gif"
    assert main(["guided", str(snapshot_dir), "--layers", "all", "-o", str(out),
                 "--class", "happy"]) == 0
    with Image.open(out) as gif:
        assert gif.n_frames == len(convs)
        first = np.asarray(gif.convert("RGB"))
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("RGB"))
    assert first.shape == last.shape and not np.array_equal(first, last)


def test_plain_image(tmp_path, astronaut_bgr, caplog):
    import cv2

    image = tmp_path / "astronaut.png"
    cv2.imwrite(str(image), astronaut_bgr)
    with caplog.at_level(logging.INFO):
        assert main(["guided", str(image), "--class", "happy", "4"]) == 0
    assert (tmp_path / "astronaut_guided.png").is_file()
    assert "1 face(s) found" in caplog.text and "2 row(s)" in caplog.text


def test_guided_runs_with_tensorflow_s_own_onednn_setting(tmp_path, astronaut_bgr):
    """conftest turns oneDNN off for the suite (eager convolution gradients crash in it here:
    the Keras baseline), but users run TensorFlow with its default: a subprocess without the
    variable runs `camface guided` through its gradients (Guided Backprop, Grad-CAM at every
    layer) and writes both figures."""
    import subprocess
    import sys

    import cv2

    image = tmp_path / "astronaut.png"
    cv2.imwrite(str(image), astronaut_bgr)
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    for extra, out in (([], "figure.png"), (["--layers", "all"], "layers.gif")):
        run = subprocess.run([sys.executable, "-m", "camface", "guided", str(image), "-o", str(tmp_path / out),
                              *extra], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert (tmp_path / out).stat().st_size > 10_000, out


def test_an_onnx_model_beside_the_keras_model_that_is_no_cam_graph_is_passed_over(tmp_path):
    """`camface guided photo.jpg --model m.keras` looks for m.onnx, a CAM graph made from it, for
    its preprocessing, labels and target layer; m.onnx holding the model itself (a tf2onnx
    conversion, no CAM metadata) failed the run ("cannot read CAM graph metadata"). It is passed
    over: the bundled graph made from the same file gives them."""
    import onnx
    from onnx import TensorProto, helper

    from camface.guided.image import image_model

    keras_copy = tmp_path / "m.keras"
    keras_copy.write_bytes(EMOTION_KERAS.read_bytes())
    plain = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7])])
    onnx.save(helper.make_model(plain), str(tmp_path / "m.onnx"))
    path, preprocessing, labels, layer = image_model(keras_copy)
    assert path == keras_copy
    assert (preprocessing, labels, layer) == image_model(EMOTION_KERAS)[1:]
    assert preprocessing is not None and len(labels) == 7 and layer


GRAPH_LABELS = ("calm", "glad", "sad")


def _saved_as_keras_and_h5(folder, exported_from="m.keras", other_weights=False, nested=False):
    """A 64x64 RGB classifier saved as m.keras and m.h5 (`other_weights`: the .h5 holds other
    weights; `nested`: its features are a model of their own, as a pretrained base is), and
    m.onnx beside them: a CAM graph's metadata (its own class names, layer and pixels,
    x / 127.5 - 1) recording `exported_from` as its source model."""
    inputs = keras.Input((64, 64, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    if nested:
        x = keras.Model(inputs, x, name="base")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)))
    model.save(folder / "m.keras")
    if other_weights:
        model.set_weights([w + 1 for w in model.get_weights()])
    model.save(folder / "m.h5")
    _graph_made_from(folder, exported_from)


def _graph_made_from(folder, exported_from):
    """m.onnx in `folder`: a CAM graph's metadata recording `exported_from` (and its sha256)."""
    import onnx
    from onnx import TensorProto, helper

    from camface.graph_spec import GraphInfo

    info = GraphInfo(labels=GRAPH_LABELS, input_size=(64, 64), color_order="RGB", target_layer="conv",
                     heatmaps=("gradcam",), normalization={"scale": [1 / 127.5] * 3, "offset": [-1.0] * 3},
                     source_model=exported_from, source_sha256=sha256_file(folder / exported_from))
    graph = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "cam",
                                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]))
    helper.set_model_props(graph, info.to_metadata())
    onnx.save(graph, str(folder / "m.onnx"))


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("exported_from, given", [("m.keras", "m.h5"), ("m.h5", "m.keras")])
def test_the_graph_of_the_same_model_in_the_other_keras_format_is_found(tmp_path, astronaut_bgr, exported_from,
                                                                        given, nested, caplog):
    """`camface guided photo --model m.h5` looks for m.onnx beside it; m.onnx exported from
    m.keras (the same model) records m.keras' sha256, so it was passed over and an RGB model was
    refused ("cannot tell how m.h5 expects its pixels: export it first (camface export m.h5 -o
    m.onnx)", which would replace m.keras' graph). Its source beside it with the same weights,
    it is the graph: its pixels, class names and layer are used. Also with a nested model (a
    pretrained base), whose config the two formats write with lists or tuples: it was taken for
    other layers."""
    from camface.guided.cli import GuidedConfig, _read_input
    from camface.guided.snapshot import Preprocessing

    _saved_as_keras_and_h5(tmp_path, exported_from, nested=nested)
    config = GuidedConfig(_photo(tmp_path, astronaut_bgr), None, tmp_path / given, None, (), False, None,
                          "full", 0.1, 0.5, 8)
    with caplog.at_level(logging.INFO, logger="camface.guided.image"):
        source, model = _read_input(config)
    assert source.keras_path == tmp_path / given and len(source.faces) == 1
    assert source.preprocessing == Preprocessing("RGB", (1 / 127.5,) * 3, (-1.0,) * 3)
    assert (source.labels, source.target_layer) == (GRAPH_LABELS, "conv")
    assert f"using {tmp_path / 'm.onnx'}, the CAM graph of {exported_from} (the same weights)" in caplog.text


@pytest.mark.parametrize("field, value", [("detector", "short"), ("margin", 0.25), ("min_confidence", 0.7),
                                          ("max_faces", 3)])
def test_image_inputs_are_detected_and_cropped_with_live_defaults(monkeypatch, field, value):
    """An image's faces are found and cropped as `camface live` would with its defaults: guided
    reads them from LiveConfig (a copy of them drifted from live's crops when live's changed)."""
    import argparse

    from camface.guided.cli import GuidedConfig, configure
    from camface.realtime.config import LiveConfig

    monkeypatch.setattr(LiveConfig, field, value)  # live's default, changed
    parser = argparse.ArgumentParser()
    configure(parser)
    assert getattr(GuidedConfig.from_args(parser.parse_args(["photo.png"])), field) == value


@pytest.mark.parametrize("explained", [-1, 4])
def test_a_snapshot_s_row_is_titled_with_the_class_it_recorded(tmp_path, astronaut_bgr, monkeypatch, explained):
    """A snapshot taken with smoothing or an int8 / fp16 graph may record a predicted class other
    than the Keras model's argmax: the row was titled with the Keras argmax (and 'explaining' the
    recorded one); it is titled with the recorded class and the Keras probability for it, and
    the maps explain that class."""
    import cv2

    import camface.guided.figure
    from camface.guided.snapshot import EMOTION_PREPROCESSING

    sad = LABELS.index("sad")
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1, explained=(explained,), predicted=sad)
    crop = cv2.imread(str(folder / "face_00.png"), cv2.IMREAD_GRAYSCALE)[None, :, :, None]
    model = keras.models.load_model(str(EMOTION_KERAS), compile=False)
    probs = np.asarray(model(EMOTION_PREPROCESSING.apply(crop), training=False))[0]
    assert int(probs.argmax()) != sad  # the Keras model's own class differs from the recorded one
    shown = []
    monkeypatch.setattr(camface.guided.figure, "save_figure", lambda fig, path: shown.append(fig))
    assert main(["guided", str(folder), "-o", str(tmp_path / "fig.png")]) == 0
    title = shown[0].axes[0].get_ylabel()
    name, row = title.split("\n")[:2]
    label, shown_prob = row.split()
    assert (name, label) == ("face 0", "sad") and "explaining" not in title, title
    assert float(shown_prob) == pytest.approx(float(probs[sad]), abs=1.5e-3)  # Keras's probability of it


@pytest.mark.parametrize("found, max_faces, kept", [
    (10, 8, 8),  # live's default: the 8 largest
    (10, 3, 3),
    (2, 8, 2),
])
def test_an_image_explains_the_largest_faces_up_to_max_faces_as_live_does(tmp_path, astronaut_bgr, monkeypatch,
                                                                          caplog, found, max_faces, kept):
    """guided explained every face of an image where live stops at --max-faces, the largest first."""
    import contextlib

    import cv2

    import camface.api
    from camface.guided.image import read_image
    from camface.guided.snapshot import EMOTION_PREPROCESSING
    from camface.realtime.results import Face

    image = tmp_path / "crowd.png"
    cv2.imwrite(str(image), astronaut_bgr)
    # largest first, as the detectors give them
    faces = [Face((10 + 40 * i, 20, 60 - 2 * i, 60 - 2 * i), 0.9) for i in range(found)]

    class Detector(contextlib.AbstractContextManager):
        def __exit__(self, *exc):
            return None

        def detect(self, frame):
            return list(faces)

    monkeypatch.setattr(camface.api, "face_detector", lambda config: Detector())
    with caplog.at_level(logging.INFO):
        got = read_image(image, EMOTION_KERAS, EMOTION_PREPROCESSING, (64, 64), tuple(LABELS), max_faces=max_faces)
    assert [face.box for face in got.faces] == [face.box for face in faces[:kept]]
    assert f"{found} face(s) found" in caplog.text
    assert (f"the largest {kept} explained" in caplog.text) == (found > max_faces)


@pytest.fixture(scope="module")
def explanations(astronaut_bgr):
    from camface.guided.explain import Explainer
    from camface.guided.snapshot import EMOTION_PREPROCESSING

    import cv2

    x, y, w, h = BOX
    gray = cv2.cvtColor(cv2.resize(astronaut_bgr[y:y + h, x:x + w], (64, 64)), cv2.COLOR_BGR2GRAY)
    crops = np.stack([gray, gray[:, ::-1], gray])[..., None]
    model = keras.models.load_model(str(EMOTION_KERAS), compile=False)
    return {layer: Explainer(model, layer, EMOTION_PREPROCESSING).explain(
        crops, np.array([-1, -1, 4]), ("face 0", "face 1", "face 0")) for layer in ("conv2d_7", "add_3")}


def _columns(cam: bool) -> list[str]:
    """image, one column per displayable registry method (CAM only where it exists), the guided pair."""
    from camface import methods

    shown = [methods.get(m).title for m in methods.names(display_only=True) if cam or m != "cam"]
    return ["image", *shown, "Guided Backprop", "Guided Grad-CAM"]


@pytest.mark.parametrize("layer, columns", [
    # GAP right after conv2d_7: CAM exists and gets its column
    ("conv2d_7", _columns(cam=True)),
    # add_3 is not followed by pooling: no CAM column (the title says why), no empty panels
    ("add_3", _columns(cam=False)),
])
def test_figure_has_one_row_per_face_and_a_panel_per_method(explanations, layer, columns):
    assert columns[1:3] == ["Grad-CAM", "Grad-CAM++"] and ("CAM" in columns) == (layer == "conv2d_7")
    assert len(columns) >= 10  # nine methods at add_3 besides the image and the guided pair
    items = explanations[layer]
    fig = comparison_figure(items, LABELS, cam_note="" if layer == "conv2d_7" else "no pooling after add_3")
    axes, width = fig.axes, len(columns)
    assert len(axes) == 3 * width
    assert [ax.get_title() for ax in axes[:width]] == columns
    assert ("no CAM" in fig._suptitle.get_text()) == (layer == "add_3")
    rows = [axes[r * width:(r + 1) * width] for r in range(3)]
    titles = [row[0].get_ylabel() for row in rows]
    assert titles[0].startswith("face 0\nhappy 0.99") and "explaining" not in titles[0]
    assert titles[1].startswith("face 1\nhappy")
    assert "explaining sad" in titles[2]
    for row in rows:
        # every panel is one image: overlays are drawn by the live overlay function
        assert [len(ax.get_images()) for ax in row] == [1] * width
        assert not any(ax.texts for ax in row)
    # the localisation box is drawn on each overlay (a Rectangle patch), not on the others
    assert [len(ax.patches) for ax in rows[2]] == [0] + [1] * (width - 3) + [0, 0]
    assert sum(len(ax.patches) for ax in comparison_figure(items, LABELS, boxes=False).axes) == 0


def test_figure_overlay_is_the_live_overlay(explanations):
    """The figure's Grad-CAM panel shows exactly what the live overlay draws on that crop."""
    from camface.realtime.overlay import overlay

    item = explanations["conv2d_7"][0]
    shown = comparison_figure([item], LABELS, boxes=False).axes[1].get_images()[0].get_array()
    want = overlay(np.ascontiguousarray(item.image_rgb[..., ::-1]), item.heatmaps["gradcam"], "gradcam")
    np.testing.assert_array_equal(np.asarray(shown), want[..., ::-1])


def test_figure_labels_plain_gradients_for_models_without_relu():
    from camface.guided.explain import Explainer
    from camface.guided.snapshot import Preprocessing

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(3, 3, activation="swish", padding="same", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    explainer = Explainer(model, "conv", Preprocessing("GRAY", (1 / 255,), (0.0,)))
    crops = np.random.default_rng(0).integers(0, 255, (1, 8, 8, 1), dtype=np.uint8)
    items = explainer.explain(crops, np.array([1]))
    assert not items[0].guided
    titles = [ax.get_title() for ax in comparison_figure(items, ["a", "b"],
                                                         gradient_label=explainer.gradient_label).axes]
    assert titles[-2] == "Gradient (no ReLU)" and titles[-1] == "Gradient x Grad-CAM"


# ------------------------------------------------------------------------------- misuse


def _no_json(tmp_path, astronaut_bgr):
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1)
    (folder / "snapshot.json").unlink()
    return [str(folder)], "snapshot.json is missing"


def _a_folder_of_snapshots(tmp_path, astronaut_bgr):  # said "snapshot.json is missing"
    (tmp_path / "snaps").mkdir()
    make_snapshot(tmp_path / "snaps" / "frame_000012", astronaut_bgr, faces=1)
    return [str(tmp_path / "snaps")], r"snaps holds 1 camface snapshot\(s\) but is none: give one of them, such as "


def _a_snapshot_s_crop(tmp_path, astronaut_bgr):  # "no faces found in face_00.png", after the model loaded
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1)
    return [str(folder / "face_00.png")], (f"{folder / 'face_00.png'} is a face crop of the snapshot {folder}: give "
                                           f"the snapshot folder \\(camface guided {folder}\\) to explain its faces")


def _model_missing(tmp_path, astronaut_bgr):
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1)
    return [str(folder), "--model", str(tmp_path / "nope.keras")], "model file not found: .*nope.keras"


def _model_mismatch(tmp_path, astronaut_bgr):
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1)
    other = tmp_path / "other.h5"
    other.write_bytes(b"not the snapshot's model")
    return [str(folder), "--model", str(other)], "other.h5 does not match snapshot .*source_sha256"


def _model_not_found(tmp_path, astronaut_bgr):
    model = {"path": str(tmp_path / "gone.onnx"), "sha256": "", "source_model": "mine.keras",
             "source_sha256": "0" * 64}
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1, model=model)
    return [str(folder)], "cannot find the Keras model .*mine.keras.*--model"


def _no_faces(tmp_path, astronaut_bgr):
    import cv2

    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((240, 320, 3), 128, np.uint8))
    return [str(blank)], "no faces found in .*wall.png"


def _gif_needs_gif_suffix(tmp_path, astronaut_bgr):
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1)
    argv = [str(folder), "--layers", "all", "-o", str(tmp_path / "x.png")]
    return argv, "--layers all writes an animated GIF"


def _unknown_class(tmp_path, astronaut_bgr):
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1)
    return [str(folder), "--class", "joy"], "unknown class 'joy'.*angry, disgust"


def _class_twice(tmp_path, astronaut_bgr):
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1)
    return [str(folder), "--class", "happy", "3"], "--class 3 names class happy twice: give each class once"


def _unknown_layer(tmp_path, astronaut_bgr):
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1)
    return [str(folder), "--layer", "conv9"], "no layer named 'conv9' .*candidate target layers.*conv2d_7"


def _photo_for_a_model_of_any_size(tmp_path, astronaut_bgr):
    import cv2

    inputs = keras.Input((None, None, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(7, 3, activation="relu")(inputs))
    model = tmp_path / "any_size.keras"
    keras.Model(inputs, keras.layers.Softmax()(x)).save(model)
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), astronaut_bgr)
    return [str(photo), "--model", str(model)], "model .*any_size.keras takes images of any size"


def _gallery_snapshot(tmp_path, astronaut_bgr):
    """A snapshot of a gallery graph made with `camface enroll --embedding-from` the bundled
    classifier: its source model resolves (same sha256), but its classes are not the identities."""
    model = {"path": str(tmp_path / "people.onnx"), "sha256": "", "source_model": EMOTION_KERAS.name,
             "source_sha256": sha256_file(EMOTION_KERAS)}
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1, explained=(1,), model=model)
    meta = json.loads((folder / "snapshot.json").read_text())
    meta["labels"] = ["ann", "bob"]
    meta["faces"][0].update(probs=[0.2, 0.8], predicted=1, similarity=[0.4, 0.9])
    (folder / "snapshot.json").write_text(json.dumps(meta))
    return [str(folder)], "taken with the gallery graph .*people.onnx \\(identities ann, bob\\)"


def _missing_input(tmp_path, astronaut_bgr):
    return [str(tmp_path / "nothing")], "input not found: .*nothing"


def _output_over_the_photo(tmp_path, astronaut_bgr):
    import cv2

    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), astronaut_bgr)
    return [str(photo), "-o", str(photo)], "-o .*photo.png is an input"


def _output_into_the_snapshot(tmp_path, astronaut_bgr):
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1)
    return [str(folder), "-o", str(folder / "face_00.png")], "-o .*face_00.png is a file of the input folder"


def _output_is_a_folder(tmp_path, astronaut_bgr):
    """Said before any TensorFlow work, not after it as the figure fails to save."""
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1)
    (tmp_path / "fig.png").mkdir()
    return [str(folder), "-o", str(tmp_path / "fig.png")], "cannot write .*fig.png: it is a directory"


def _photo(tmp_path, astronaut_bgr):
    import cv2

    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), astronaut_bgr)
    return photo


def _model_not_a_keras_zip(tmp_path, astronaut_bgr):
    """Keras itself says "File not found" for a .keras file that is there but not a zip."""
    model = tmp_path / "mine.keras"
    model.write_bytes(b"not a zip")
    return [str(_photo(tmp_path, astronaut_bgr)), "--model", str(model)], \
        "cannot load Keras model .*mine.keras: not a .keras file"


def _model_is_the_onnx_graph(tmp_path, astronaut_bgr):
    """`camface live --model` takes the graph; guided needs the Keras model it came from."""
    graph = tmp_path / "emotion.onnx"
    graph.write_bytes(b"an ONNX graph")  # refused by its name before it is read
    return [str(_photo(tmp_path, astronaut_bgr)), "--model", str(graph)], \
        "emotion.onnx is an ONNX graph: camface guided runs the Keras model it was exported from"


def _graph_of_another_model_beside(tmp_path, astronaut_bgr):
    """m.onnx, exported from m.keras, beside an m.h5 of other weights: it names the graph it
    looked at, why it is not m.h5's, and the flag (it said to export m.h5 -o m.onnx, which
    replaces m.keras' graph, without a word of it)."""
    _saved_as_keras_and_h5(tmp_path, "m.keras", other_weights=True)
    return [str(_photo(tmp_path, astronaut_bgr)), "--model", str(tmp_path / "m.h5")], \
        (r"cannot tell how .*m.h5 expects its pixels: .*m.onnx beside it is the CAM graph of m.keras, whose weights "
         r"differ from m.h5's \(--model .*m.keras explains that model\); to explain m.h5, export it \(camface export "
         r".*m.h5 -o .*m.onnx, which replaces that graph\)$")


def _graph_of_a_model_with_other_layers_beside(tmp_path, astronaut_bgr):
    """m.onnx, exported from m.keras (which rescales its pixels itself: a Rescaling layer, no
    weights), beside an m.h5 without that layer and the same weights, input and output shapes:
    the graph's pixels (0..255 for m.keras) were taken for m.h5's, whose maps and probabilities
    were then silently wrong. Its layers differ: it is not m.h5's graph."""
    _saved_as_keras_and_h5(tmp_path, "m.keras")
    inputs = keras.Input((64, 64, 3))
    rescaled = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(rescaled)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)))
    model.set_weights(keras.models.load_model(tmp_path / "m.h5", compile=False).get_weights())
    model.save(tmp_path / "m.keras")
    _graph_made_from(tmp_path, "m.keras")
    return [str(_photo(tmp_path, astronaut_bgr)), "--model", str(tmp_path / "m.h5")], \
        (r"cannot tell how .*m.h5 expects its pixels: .*m.onnx beside it is the CAM graph of m.keras, whose layers "
         r"differ from m.h5's \(--model .*m.keras explains that model\); to explain m.h5, export it")


def _negative_margin(tmp_path, astronaut_bgr):
    return [str(_photo(tmp_path, astronaut_bgr)), "--margin", "-1"], r"--margin must be in \[0, .*got -1"


def _layer_with_all_layers(tmp_path, astronaut_bgr):
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1)
    return [str(folder), "--layers", "all", "--layer", "add_3", "-o", str(tmp_path / "x.gif")], \
        "--layer add_3 and --layers all exclude each other"


def _cam_boxes_with_all_layers(tmp_path, astronaut_bgr):
    """--cam-boxes was ignored without a word by --layers all (its GIF draws no boxes)."""
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1)
    return [str(folder), "--layers", "all", "--no-cam-boxes", "-o", str(tmp_path / "x.gif")], \
        "--no-cam-boxes is for the figure: --layers all writes a GIF"


def _one_unit_model(tmp_path):
    """A binary classifier's single sigmoid unit ("is X"), 64x64 gray."""
    inputs = keras.Input((64, 64, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(inputs))
    model = tmp_path / "is_x.keras"
    keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x)).save(model)
    return model


def _one_sigmoid_unit(tmp_path, astronaut_bgr):
    """Refused before any detection, as `camface export` and `camface.load` refuse it (the
    figure named every face class 0, probability 0.5 or not)."""
    model = _one_unit_model(tmp_path)
    return [str(_photo(tmp_path, astronaut_bgr)), "--model", str(model)], \
        r"is_x.keras: its output has 1 class .*Dense\(2, softmax\) head with kernel \[-w/2, w/2\]"


def _one_sigmoid_unit_snapshot(tmp_path, astronaut_bgr):
    model = _one_unit_model(tmp_path)
    entry = {"path": str(tmp_path / "is_x.onnx"), "sha256": "", "source_model": model.name,
             "source_sha256": sha256_file(model)}
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1, explained=(0,), model=entry)
    return [str(folder)], r"is_x.keras: its output has 1 class .*Dense\(2, softmax\)"


def _snapshot_of_a_torch_graph(tmp_path, astronaut_bgr):
    """A graph exported from a .pt2 program records it as its source model: Keras cannot load it
    (its own message suggested TFSMLayer)."""
    program = tmp_path / "net.pt2"
    program.write_bytes(b"PK\x03\x04 a torch program")
    entry = {"path": str(tmp_path / "net.onnx"), "sha256": "", "source_model": program.name,
             "source_sha256": sha256_file(program)}
    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1, explained=(0,), model=entry)
    return [str(folder)], r"net.pt2 is not a Keras model \(.keras, .h5, .hdf5\): camface guided explains Keras"


@pytest.mark.parametrize("case", [_no_json, _a_folder_of_snapshots, _a_snapshot_s_crop, _model_missing, _model_mismatch, _model_not_found,
                                  _no_faces, _gif_needs_gif_suffix, _unknown_class, _class_twice, _unknown_layer,
                                  _missing_input, _output_over_the_photo, _output_into_the_snapshot,
                                  _photo_for_a_model_of_any_size, _gallery_snapshot, _output_is_a_folder,
                                  _model_not_a_keras_zip, _model_is_the_onnx_graph, _negative_margin,
                                  _layer_with_all_layers, _cam_boxes_with_all_layers, _one_sigmoid_unit, _one_sigmoid_unit_snapshot,
                                  _snapshot_of_a_torch_graph, _graph_of_another_model_beside,
                                  _graph_of_a_model_with_other_layers_beside],
                         ids=lambda f: f.__name__.strip("_"))
def test_errors_are_one_clear_line_and_write_nothing(case, tmp_path, astronaut_bgr, capsys):
    import re

    argv, message = case(tmp_path, astronaut_bgr)
    before = files_under(tmp_path)
    capsys.readouterr()
    assert main(["guided"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("camface: error: "), err
    assert re.search(message, err[-1]), err[-1]
    assert "Traceback" not in "\n".join(err)
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("flag, value, message", [
    ("--max-faces", "0", r"--max-faces must be 1..32 \(the graph.s batch range\), got 0"),
    ("--max-faces", "33", r"--max-faces must be 1..32 \(the graph.s batch range\), got 33"),
    ("--margin", "-0.5", r"--margin must be in \[0, 2\], got -0.5"),
    ("--margin", "nan", r"--margin must be in \[0, 2\], got nan"),
    ("--min-confidence", "1.5", r"--min-confidence must be in \[0, 1\], got 1.5"),
    ("--min-confidence", "-0.1", r"--min-confidence must be in \[0, 1\], got -0.1"),
    ("--layer", "", "--layer is empty; give a layer name, or leave it out for the default"),  # the default, unsaid
])
@pytest.mark.parametrize("kind", ["photo", "snapshot"])
def test_bad_crop_options_are_refused_before_the_model_loads(kind, flag, value, message, tmp_path, astronaut_bgr,
                                                             capsys, monkeypatch):
    """--max-faces, --margin and --min-confidence were checked only when the photo's faces were
    detected, after TensorFlow had loaded the model (and never for a snapshot): now at once, by
    live's own checks."""
    import re

    import camface.guided.cli as guided_cli

    def no_model(*args, **kwargs):
        pytest.fail("the Keras model was loaded before the options were checked")

    monkeypatch.setattr(guided_cli, "_load_keras", no_model)
    source = _photo(tmp_path, astronaut_bgr) if kind == "photo" else make_snapshot(tmp_path / "snap", astronaut_bgr)
    before = files_under(tmp_path)
    capsys.readouterr()
    assert main(["guided", str(source), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(f"camface: error: {message}", err[0]), err
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("crop", [["face_00.png"], {"file": "face_00.png"}, 0])
def test_a_photo_beside_a_hand_edited_snapshot_json_is_taken_as_a_photo(tmp_path, astronaut_bgr, crop):
    """A snapshot.json whose face names its crop with a list or an object (hand-edited) made
    `camface guided face_00.png` a TypeError traceback (unhashable), before the photo was read:
    the file is taken as a photo, as beside any broken snapshot.json."""
    from camface.guided.cli import _refuse_a_snapshot_crop

    folder = make_snapshot(tmp_path / "snap", astronaut_bgr, faces=1)
    meta = json.loads((folder / "snapshot.json").read_text())
    meta["faces"][0]["crop"] = crop
    (folder / "snapshot.json").write_text(json.dumps(meta))
    assert _refuse_a_snapshot_crop(folder / "face_00.png") is None
