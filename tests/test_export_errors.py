"""`camface export` / `camface info` misuse: one clear line on stderr and exit code 2."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from camface.cli import main as camface_main
from camface.errors import ModelError
from camface.models import DETECTORS, EMOTION_KERAS, EMOTION_ONNX


def run(capsys, *argv):
    code = camface_main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture(scope="module")
def dense_only_model(tmp_path_factory):
    """A classifier with no 4-D layer (Flatten first)."""
    import keras

    path = tmp_path_factory.mktemp("dense") / "dense.keras"
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)).save(path)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing.h5", "model file not found: .*missing.h5"),
    (lambda tmp: _write(tmp / "notes.txt", b"hello"), "expected a Keras model file"),
    # a TFLite model was "expected a Keras model file (.keras, .h5 or .hdf5)"
    (lambda tmp: _write(tmp / "face.tflite", DETECTORS["short"].read_bytes()),
     r"face.tflite is a face-detector TFLite model \(MediaPipe BlazeFace\), not a face classifier or recognition "
     r"model: camface runs its own \(detector='short' or 'full', --detector\); give the model whose maps you want "
     r"\(Keras, ONNX or \.pt2\)$"),
    (lambda tmp: _write(tmp / "net.tflite", b"\x1c\x00\x00\x00TFL3" + bytes(64)),
     r"net.tflite is a TFLite model, which camface does not read: convert it to ONNX \(`python -m "
     r"tf2onnx.convert --tflite .*net.tflite --output model.onnx`\), then `camface export model.onnx -o cam.onnx "
     r"--preset PRESET`, or give the Keras model it came from$"),
    (lambda tmp: _write(tmp / "broken.h5", b"not hdf5 at all" * 10), "broken.h5: not a loadable Keras model"),
    (lambda tmp: _write(tmp / "broken.keras", b"PK\x03\x04junk"), "broken.keras: not a loadable Keras model"),
    # Keras said "File not found" of these, which are there
    (lambda tmp: _write(tmp / "empty.keras", b""), "empty.keras: not a loadable Keras model: it is empty$"),
    (lambda tmp: _write(tmp / "notes.keras", b"hello"), r"notes.keras: not a loadable Keras model: it is not a zip "
                                                        r"archive \(a .keras model is one\)"),
    (lambda tmp: _write(tmp / "renamed.keras", EMOTION_KERAS.read_bytes()),
     r"renamed.keras: not a loadable Keras model: it is an HDF5 file: a Keras .h5 model renamed .keras\? Name it .h5"),
    # "opset 0 is older than 13 and onnx.version_converter cannot convert it"
    (lambda tmp: _write(tmp / "empty.onnx", b""), r"empty.onnx: not an ONNX model \(no graph\)$"),
    # a graph camface exported: "tensors renamed", then two inputs and a dozen outputs
    (lambda tmp: _write(tmp / "cam.onnx", EMOTION_ONNX.read_bytes()),
     r"cam.onnx is a CAM graph already \(made by camface export from emotion_mini_xception_fer2013.hdf5\): "
     r"`camface live --model .*cam.onnx` runs it and `camface info .*cam.onnx` shows it; export the classifier it was "
     r"made from to make another"),
])
def test_bad_model_files(tmp_path, capsys, make, message):
    import re

    path = make(tmp_path)
    code, line = run(capsys, "export", str(path), "-o", str(tmp_path / "out.onnx"))
    assert code == 2 and line.startswith("camface: error: ") and re.search(message, line), line
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("argv", [["compare", "a.png", "b.png", "--model", "empty.onnx", "--preset", "arcface"],
                                  ["enroll", "people", "--embedding-from", "empty.onnx", "-o", "g.onnx",
                                   "--preset", "arcface"]])
def test_an_empty_onnx_embedder_is_no_onnx_model(argv, tmp_path, capsys, monkeypatch):
    """An empty .onnx parses as a model with no graph: compare and enroll said it "needs one
    output, the embedding [N, D] (it has [])"."""
    import cv2

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "people" / "someone").mkdir(parents=True)
    for photo in ("a.png", "b.png", "people/someone/0.png"):
        cv2.imwrite(str(tmp_path / photo), np.full((64, 64, 3), 128, np.uint8))
    code, line = run(capsys, *argv)
    assert code == 2 and line == "camface: error: empty.onnx: not an ONNX model (no graph)", line
    assert not (tmp_path / "g.onnx").exists()


@pytest.mark.parametrize("argv", [["compare", "a.png", "b.png", "--model", "face.tflite", "--preset", "arcface"],
                                  ["enroll", "people", "--embedding-from", "face.tflite", "-o", "g.onnx",
                                   "--preset", "arcface"]])
def test_a_face_detector_as_the_embedder_is_said_to_be_one(argv, tmp_path, capsys, monkeypatch):
    """The BlazeFace .tflite given to compare or enroll was "expected an .onnx, .pt2 or Keras
    (.keras, .h5) model"."""
    import cv2

    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "face.tflite", DETECTORS["short"].read_bytes())
    (tmp_path / "people" / "someone").mkdir(parents=True)
    for photo in ("a.png", "b.png", "people/someone/0.png"):
        cv2.imwrite(str(tmp_path / photo), np.full((64, 64, 3), 128, np.uint8))
    code, line = run(capsys, *argv)
    assert code == 2 and line.startswith("camface: error: face.tflite is a face-detector TFLite model (MediaPipe "
                                         "BlazeFace), not a face classifier or recognition model"), line
    assert not (tmp_path / "g.onnx").exists()


def _write(path, data):
    path.write_bytes(data)
    return path


def test_model_without_4d_layer(dense_only_model, tmp_path, capsys):
    code, line = run(capsys, "export", str(dense_only_model), "-o", str(tmp_path / "out.onnx"))
    assert code == 2 and "no layer with a 4-D output" in line


def test_unknown_target_layer_lists_candidates(tmp_path, capsys):
    code, line = run(capsys, "export", str(EMOTION_KERAS), "-o", str(tmp_path / "o.onnx"),
                     "--target-layer", "conv99")
    assert code == 2 and "no layer named 'conv99'" in line
    for candidate in ("add_3", "add_4", "conv2d_7"):
        assert candidate in line


def test_target_layer_without_4d_output(tmp_path, capsys):
    code, line = run(capsys, "export", str(EMOTION_KERAS), "-o", str(tmp_path / "o.onnx"),
                     "--target-layer", "predictions")
    assert code == 2 and "'predictions' has no 4-D output" in line and "conv2d_7" in line


def test_target_inside_a_residual_block_is_refused(tmp_path, capsys):
    # activation_6 feeds separable_conv2d_8 while add_4 also reads add_3 through conv2d_6
    code, line = run(capsys, "export", str(EMOTION_KERAS), "-o", str(tmp_path / "o.onnx"),
                     "--target-layer", "activation_6")
    assert code == 2 and "cannot cut the model at layer 'activation_6'" in line


@pytest.mark.parametrize("output, message", [
    ("no/such/folder/out.onnx", "folder .* does not exist"),
    (".", "it is a directory"),
    ("a_file/out.onnx", "a_file is a file, not a folder"),  # unwritable even for root
])
def test_unwritable_output(tmp_path, capsys, output, message):
    import re

    (tmp_path / "a_file").write_text("not a folder")
    target = tmp_path / output if output != "." else tmp_path
    code, line = run(capsys, "export", str(EMOTION_KERAS), "-o", str(target))
    assert code == 2 and re.search(message, line), line


def test_checked_before_any_work(tmp_path, capsys):
    """What would cost minutes of building before failing, or destroy a file, is refused first:
    a name that is not .onnx (the files written beside it are named after it), the model itself
    as the output, an opset tf2onnx cannot write, a calibration source that is not there, and a
    --scale that is not a finite number. Nothing is written."""
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not even read")
    (tmp_path / "empty").mkdir()
    cases = [
        (["-o", str(tmp_path / "graph.npz")], "a CAM graph is an .onnx file; give a name ending in .onnx"),
        (["-o", str(model)], f"-o {model} is an input ({model})"),
        (["-o", str(tmp_path / "g.onnx"), "--opset", "99"], "--opset must be 13..18 (tf2onnx converts up to 18)"),
        (["-o", str(tmp_path / "g.onnx"), "--opset", "5"], "--opset must be 13..18"),
        (["-o", str(tmp_path / "g.onnx"), "--calibration", str(tmp_path / "nothing")], "source not found"),
        (["-o", str(tmp_path / "g.onnx"), "--calibration", str(tmp_path / "empty")], "no images"),
        (["-o", str(tmp_path / "g.onnx"), "--rank-seconds", "-1"], "--rank-seconds must be >= 0"),
        (["-o", str(tmp_path / "g.onnx"), "--prefix-tokens", "-2"], "--prefix-tokens must be >= 0, got -2"),
        (["-o", str(tmp_path / "g.onnx"), "--scale", "0"], "--scale 0: a zero scale makes every image the same"),
    ]
    for flags, message in cases:
        code, line = run(capsys, "export", str(model), *flags)
        assert code == 2 and message in line, (flags, line)
    with pytest.raises(SystemExit) as exit_:
        camface_main(["export", str(model), "-o", str(tmp_path / "g.onnx"), "--scale", "nan"])
    assert exit_.value.code == 2 and "argument --scale: 'nan' is not a finite number" in capsys.readouterr().err
    assert model.read_bytes() == b"not even read" and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model.onnx"]


def test_a_folder_given_as_a_model_is_named_as_one(tmp_path, capsys):
    for command in (["info", str(tmp_path)], ["export", str(tmp_path), "-o", str(tmp_path / "g.onnx")]):
        code, line = run(capsys, *command)
        assert code == 2 and f"{tmp_path} is a folder, not a" in line, line


def test_a_cam_graph_given_to_export_is_said_to_be_one(tmp_path, capsys):
    """Exporting a CAM graph again renamed its tensors `model/...` (a log line listing all 16)
    and failed as 'camface needs one image input and one output'."""
    import shutil

    from camface.models import EMOTION_ONNX

    graph = tmp_path / "cam.onnx"
    shutil.copy(EMOTION_ONNX, graph)
    assert camface_main(["export", str(graph), "-o", str(tmp_path / "again.onnx"), "--no-rank"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"camface: error: {graph} is a CAM graph already (made by camface export from "
                   f"emotion_mini_xception_fer2013.hdf5): `camface live "
                   f"--model {graph}` runs it and `camface info {graph}` shows it; export the classifier it was "
                   "made from to make another"], err
    assert not (tmp_path / "again.onnx").exists()


def test_a_pt2_that_is_not_a_program_is_one_line(tmp_path, capsys):
    pytest.importorskip("torch")
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    assert camface_main(["export", str(bad), "-o", str(tmp_path / "g.onnx"), "--preset", "torch", "--no-rank"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"camface: error: {bad}: not a program saved with torch.export.save")


def test_a_model_without_classes_is_refused(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [0, 3, 1, 1], [])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["f"]), helper.make_node("GlobalAveragePool", ["f"], ["p"]),
         helper.make_node("Flatten", ["p"], ["logits"])], "zero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 0])], [weight])
    model = tmp_path / "zero.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), model)
    code, line = run(capsys, "export", str(model), "-o", str(tmp_path / "g.onnx"), "--preset", "torch", "--no-rank")
    assert code == 2 and "its output has 0 classes; a classifier needs at least one" in line, line
    assert not (tmp_path / "g.onnx").exists()


def test_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        code, line = run(capsys, "export", str(EMOTION_KERAS), "-o", str(folder / "o.onnx"))
        assert code == 2 and "permission denied" in line
    finally:
        folder.chmod(0o700)


def test_wrong_label_count(tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    code, line = run(capsys, "export", str(EMOTION_KERAS), "-o", str(tmp_path / "o.onnx"),
                     "--labels", str(labels))
    assert code == 2 and f"labels file {labels}: 2 labels, but model" in line, line
    assert "has 7 classes" in line and not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "absent.txt", "labels file not found: .*absent.txt"),
    (lambda tmp: _write(tmp / "blank.txt", b"\n  \n"), "labels file .*blank.txt holds no labels"),
    (lambda tmp: _write(tmp / "binary.txt", b"\xff\xfe\x00\x81"),
     "cannot read labels file .*binary.txt"),
    # exported: two classes the overlay could not tell apart
    (lambda tmp: _write(tmp / "twice.txt", b"a\nb\na\nc\nb\nd\ne\n"),
     "labels file .*twice.txt: 'a' names classes 0, 2; 'b' names classes 1, 4; each class needs a name of its own"),
    (lambda tmp: tmp, "labels file .* is a folder; give a text file, one class name per line"),  # "not found"
])
def test_bad_labels_file(tmp_path, capsys, make, message):
    """Checked before the model is loaded (fast), one line naming the file."""
    import re

    code, line = run(capsys, "export", str(EMOTION_KERAS), "-o", str(tmp_path / "o.onnx"),
                     "--labels", str(make(tmp_path)))
    assert code == 2 and re.search(message, line), line


def test_a_labels_file_with_a_byte_order_mark_reads_as_its_names(tmp_path):
    """Notepad saves UTF-8 with a byte-order mark and CRLF: the first class was exported as
    '\ufeffangry', which `camface guided --class angry` did not find."""
    from camface.export.exporter import read_labels_file

    path = _write(tmp_path / "labels.txt", "\ufeffangry\r\nhappy \u00e9t\u00e9\r\n".encode())
    assert read_labels_file(path) == ("angry", "happy \u00e9t\u00e9")


@pytest.fixture(scope="module")
def lambda_model(tmp_path_factory):
    """A tiny classifier whose first layer is a Lambda (Python code stored in the file)."""
    import keras

    path = tmp_path_factory.mktemp("lambda") / "lambda.keras"
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Lambda(lambda t: t * 2.0 - 1.0, name="rescale")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    keras.Model(inputs, outputs).save(path)
    return path


def test_lambda_model_is_refused_without_unsafe_load(lambda_model, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, line = run(capsys, "export", str(lambda_model), "-o", str(out))
    assert code == 2 and f"{lambda_model}: Keras safe mode refuses to load it" in line, line
    assert "--unsafe-load" in line and "runs code from the file" in line and not out.exists()


def test_lambda_model_exports_with_unsafe_load(lambda_model, tmp_path, capsys):
    import numpy as np
    import onnxruntime as ort

    out = tmp_path / "o.onnx"
    assert camface_main(["export", str(lambda_model), "-o", str(out), "--unsafe-load"]) == 0
    assert "verify gradcam" in capsys.readouterr().out  # the self-check ran and passed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probs, = session.run(["probs"], {"image": np.zeros((2, 8, 8, 1), np.uint8),
                                     "class_index": np.array([-1, 0], np.int64)})
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_unsafe_load_help_says_it_runs_code(capsys):
    with pytest.raises(SystemExit):
        camface_main(["export", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--unsafe-load" in help_text and "RUNS PYTHON CODE FROM THE MODEL FILE" in help_text


def test_preprocessing_misuse():
    from camface.export.preprocess import Preprocessing

    with pytest.raises(ModelError, match="1 channel; colour order RGB needs 3"):
        Preprocessing.resolve(1, "tf", color_order="RGB")
    with pytest.raises(ModelError, match="--offset has 2 values, but the model's input has 3 channels: give 1 or 3 values"):
        Preprocessing.resolve(3, "none", offset=[1.0, 2.0])
    with pytest.raises(ModelError, match="--preset torch's scale has 3 values, but the model's input has 1 channel: "
                                         "give 1 value$"):
        Preprocessing.resolve(1, "torch", color_order="GRAY")
    caffe = Preprocessing.resolve(3, "imagenet-caffe")
    assert caffe.color_order == "BGR" and caffe.offset == (-103.939, -116.779, -123.68)
    assert Preprocessing.resolve(1, "tf").color_order == "GRAY"  # one channel is always GRAY
    custom = Preprocessing.resolve(3, "unit", color_order="bgr", scale=[2.0])
    assert custom.color_order == "BGR" and custom.scale == (2.0, 2.0, 2.0)


@pytest.mark.parametrize("preset, order", [("torch", "BGR"), ("imagenet-caffe", "RGB")])
def test_a_presets_channel_values_follow_their_colours_in_the_other_order(preset, order):
    """torch's mean of red (0.485) applied to the blue channel of a BGR model, caffe's mean of
    blue (103.939) to the red channel of an RGB one: the values were kept by position."""
    from camface.export.preprocess import PRESETS, Preprocessing

    own = Preprocessing.resolve(3, preset)
    swapped = Preprocessing.resolve(3, preset, color_order=order)
    assert swapped.color_order == order and own.color_order != order
    assert swapped.scale == own.scale[::-1] and swapped.offset == own.offset[::-1]
    assert own.offset == PRESETS[preset][2]  # the preset's own order keeps them as written
    # the same pixel, sent in either order, is normalised to the same value per colour
    pixel = np.array([10.0, 120.0, 250.0])  # in `own`'s colour order
    np.testing.assert_allclose(pixel[::-1] * swapped.scale + swapped.offset,
                               (pixel * own.scale + own.offset)[::-1])
    explicit = Preprocessing.resolve(3, preset, color_order=order, offset=[1.0, 2.0, 3.0])
    assert explicit.offset == (1.0, 2.0, 3.0)  # given values are in the order given


def _onnx_without_cam_outputs(tmp):
    """A valid ONNX model with the `image` input but only a `probs` output."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["probs"], keepdims=0)]
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 4, 4, 1])
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, [])
    graph = helper.make_graph(nodes, "not_cam", [image], [probs])
    path = tmp / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _committed_without_metadata(tmp):
    import onnx

    from camface.models import EMOTION_ONNX

    model = onnx.load(str(EMOTION_ONNX))
    del model.metadata_props[:]
    path = tmp / "bare.onnx"
    onnx.save(model, str(path))
    return path


def _truncated_committed(tmp):
    from camface.models import EMOTION_ONNX

    return _write(tmp / "truncated.onnx", EMOTION_ONNX.read_bytes()[:50_000])


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "graph.onnx", "ONNX file not found: .*graph.onnx"),
    (lambda tmp: _write(tmp / "graph.onnx", b"\x00\x01garbage"), "graph.onnx is not an ONNX model"),
    (lambda tmp: _write(tmp / "random.onnx", bytes(np.random.default_rng(7).integers(0, 256, 4096,
                                                                              np.uint8))),
     "random.onnx is not an ONNX model"),
    (_truncated_committed, "truncated.onnx is not an ONNX model"),
    # it said "not an ONNX model (Error parsing message with type 'onnx.ModelProto': Wire format was corrupt)"
    (lambda tmp: EMOTION_KERAS, r"emotion_mini_xception_fer2013.hdf5 is a Keras model, not a CAM graph: make one "
                                r"with `camface export .*emotion_mini_xception_fer2013.hdf5 -o cam.onnx`"),
    (_onnx_without_cam_outputs, "plain.onnx is not a camface CAM graph: missing class_index, "
                                "activations, a heatmap output "),
    (_committed_without_metadata, "bare.onnx lacks CAM graph metadata: labels"),
    # a pipe or a device was "not found"
    (lambda tmp: os.mkfifo(tmp / "pipe.onnx") or tmp / "pipe.onnx",
     r"pipe.onnx is not a regular file \(a pipe, a device or a socket\), not an ONNX file"),
    (lambda tmp: Path(os.devnull), r"/dev/null is not a regular file \(a pipe, a device or a socket\)"),
    (lambda tmp: (tmp / "gone.onnx").symlink_to(tmp / "nowhere.onnx") or tmp / "gone.onnx",
     "ONNX file not found: .*gone.onnx"),
])
def test_info_errors(tmp_path, capsys, make, message):
    import re

    code = camface_main(["info", str(make(tmp_path))])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not captured.out, captured
    assert err[0].startswith("camface: error: ") and re.search(message, err[0]), err[0]


def _edited_committed(tmp, key, value, input_type=None):
    """The committed emotion graph with the metadata `key` set to `value` (None: left as it is)
    and its image input's element type changed to `input_type` (an onnx.TensorProto type)."""
    import onnx

    from camface.models import EMOTION_ONNX

    model = onnx.load(str(EMOTION_ONNX))
    if key is not None:
        kept = [(p.key, p.value) for p in model.metadata_props if p.key != key]
        del model.metadata_props[:]
        for k, v in [*kept, (key, value)]:
            model.metadata_props.add(key=k, value=v)
    if input_type is not None:
        next(i for i in model.graph.input if i.name == "image").type.tensor_type.elem_type = input_type
    path = tmp / "edited.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("key, value, input_type, message, loads", [
    ("token_grid", '{"prefix": "a"}', None, r"malformed CAM graph metadata: token_grid must be "
                                             r'\{"prefix": P, "height": h, "width": w\}', False),
    ("token_grid", '{"prefix": 1, "height": 0, "width": 4}', None, "token_grid must be", False),
    ("method_ranking", '{"ranking": 5}', None, "method_ranking's 'ranking' must be a list of strings, got 5", False),
    ("method_ranking", '{"ranking": "scorecam"}', None, "method_ranking's 'ranking' must be a list of strings", False),
    ("method_ranking", '{"skipped": 5}', None, "method_ranking's 'skipped' must be a string, got 5", False),
    ("gallery", '{"threshold": "high"}', None, "gallery's 'threshold' must be a number, got \"high\"", False),
    ("method_ranking", '{"ranking": ["gradcam"]}', None,
     r"malformed CAM graph metadata: method_ranking \(no field 'settings'\)", True),
    ("quantization", '{"scheme": "x"}', None,
     r"malformed CAM graph metadata: quantization \(no field 'calibration'\)", True),
    (None, None, 1, "its 'image' input is float, not uint8", False),  # TensorProto.FLOAT
])
def test_an_edited_graphs_metadata_or_input_type_is_one_line(tmp_path, capsys, key, value, input_type, message,
                                                            loads):
    """A CAM graph whose metadata was edited (a token grid without its height, a ranking that is
    not a list, a gallery threshold that is not a number) or whose image input is float was a
    traceback in `camface info` (KeyError, TypeError) or in the first graph call (ONNX Runtime's
    INVALID_ARGUMENT): one line naming the file and the key, before anything is printed, and the
    same ModelError from `camface.load`; metadata only `camface info` reads (a ranking's
    settings, an int8 graph's calibration) is said by `camface info` and does not stop a load."""
    import re

    import camface

    path = _edited_committed(tmp_path, key, value, input_type)
    code = camface_main(["info", str(path)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not captured.out, captured
    assert err[0].startswith(f"camface: error: {path}") and re.search(message, err[0]), err[0]
    if loads:
        camface.load(path, device="cpu").close()
    else:
        with pytest.raises(ModelError, match=message):
            camface.load(path, device="cpu")


def test_graph_spec_validate():
    """The shared check (camface info, the live loop's loader) on hand-made signatures."""
    from camface import graph_spec

    info = graph_spec.GraphInfo(labels=("a", "b"), input_size=(4, 4), color_order="GRAY",
                                target_layer="conv", heatmaps=("gradcam", "gradcampp"))
    inputs = ["image", "class_index"]
    outputs = {"probs": ("N", 2), "activations": ("N", 2, 2, 3), "gradcam": ("N", 2, 2),
               "gradcampp": ("N", 2, 2)}
    assert graph_spec.validate("g.onnx", inputs, outputs, info.to_metadata()) == info
    with pytest.raises(ModelError, match=r"g.onnx is not a camface CAM graph: missing a heatmap output "
                                         r"\(it has inputs"):
        without = {k: v for k, v in outputs.items() if k not in ("gradcam", "gradcampp")}
        graph_spec.validate("g.onnx", inputs, without, info.to_metadata())
    with pytest.raises(ModelError, match=r"g.onnx: metadata lists heatmaps gradcampp that are not outputs"):
        without = {k: v for k, v in outputs.items() if k != "gradcampp"}
        graph_spec.validate("g.onnx", inputs, without, info.to_metadata())
    with pytest.raises(ModelError, match="2 labels in the metadata but the graph returns 5"):
        graph_spec.validate("g.onnx", inputs, {**outputs, "probs": ("N", 5)}, info.to_metadata())
    with pytest.raises(ModelError, match="malformed CAM graph metadata"):
        graph_spec.validate("g.onnx", inputs, outputs, {**info.to_metadata(), "labels": "[oops"})
    listed = {**info.to_metadata(), "heatmaps": '["gradcam", "gradcampp", "cam"]'}
    with pytest.raises(ModelError, match="metadata lists heatmaps cam that are not outputs"):
        graph_spec.validate("g.onnx", inputs, outputs, listed)


def test_info_reads_the_feature_size_off_the_heatmaps_when_the_metadata_lacks_it(tmp_path, capsys):
    """A graph whose metadata has no `feature_size` printed 'at add_3 0x0'."""
    import onnx

    from camface.models import EMOTION_ONNX

    model = onnx.load(str(EMOTION_ONNX))
    props = {p.key: p.value for p in model.metadata_props if p.key != "feature_size"}
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    path = tmp_path / "old.onnx"
    onnx.save(model, str(path))
    assert camface_main(["info", str(path)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("CAM graph:"))
    assert " at add_3 8x8; fp32" in line, line


def test_info_names_what_auto_shows_on_a_graph_without_gradcam_or_ranking(tmp_path, capsys):
    """A graph holding only gradient-free heatmaps and no ranking: `--method auto` shows its
    first method (graph_spec.auto_method); the ranking line said 'gradcam', which it lacks."""
    import onnx

    from camface.models import EMOTION_ONNX

    model = onnx.load(str(EMOTION_ONNX))
    props = {p.key: p.value for p in model.metadata_props if p.key != "method_ranking"}
    props["heatmaps"] = '["eigencam", "random"]'
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    path = tmp_path / "gradient_free.onnx"
    onnx.save(model, str(path))
    assert camface_main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "method ranking (--method auto shows eigencam):" in text
    assert "none recorded (made by an older camface, or not by `camface export`): --method auto shows eigencam" \
        in text, text


@pytest.mark.parametrize("recorded, line, warned", [
    (None, "version not recorded (an older camface; this camface's is {now})", False),
    ("{now}", "version {now} (this camface's)", False),
    ("{newer}", "version {newer}, NEWER than this camface's {now} (upgrade camface)", True),
])
def test_info_shows_the_methods_version_and_a_newer_one_is_warned(tmp_path, capsys, caplog, recorded, line,
                                                                  warned):
    """The graph records the version of the methods' maths its maps were built by
    (`methods.VERSION`); `camface info` shows it, and a graph of a newer version than this camface
    knows (its maps may follow other formulas than this camface describes) loads with a warning
    naming both versions."""
    import logging

    import onnx

    from camface import graph_spec, methods
    from camface.models import EMOTION_ONNX

    now, newer = methods.VERSION, methods.VERSION + 1
    model = onnx.load(str(EMOTION_ONNX))
    props = {p.key: p.value for p in model.metadata_props if p.key != graph_spec.META_METHODS_VERSION}
    if recorded is not None:
        props[graph_spec.META_METHODS_VERSION] = recorded.format(now=now, newer=newer)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    path = tmp_path / "graph.onnx"
    onnx.save(model, str(path))
    with caplog.at_level(logging.WARNING):
        assert camface_main(["info", str(path)]) == 0
    assert f"methods' maths: {line.format(now=now, newer=newer)}" in capsys.readouterr().out.splitlines()
    said = [r.getMessage() for r in caplog.records if "camface's methods" in r.getMessage()]
    assert said == ([f"{path}: its heatmaps were built by version {newer} of camface's methods, newer than "
                     f"this camface's {now} (camface {props['camface_version']} exported it): its maps may not "
                     "be what this camface's method descriptions and references say; upgrade camface to "
                     "read it as made"] if warned else [])


@pytest.mark.parametrize("value", ["one", "-1", "1.5", ""])
def test_a_malformed_methods_version_is_refused_naming_the_key(value):
    from camface import graph_spec

    info = graph_spec.GraphInfo(labels=("a", "b"), input_size=(4, 4), color_order="GRAY",
                                target_layer="conv", heatmaps=("gradcam",))
    outputs = {"probs": ("N", 2), "activations": ("N", 2, 2, 3), "gradcam": ("N", 2, 2)}
    with pytest.raises(ModelError, match=rf"g.onnx has malformed CAM graph metadata: methods_version must be a "
                                         rf"whole number, got {value}$"):
        graph_spec.validate("g.onnx", ["image", "class_index"], outputs,
                            {**info.to_metadata(), "methods_version": value})


@pytest.mark.parametrize("argv, said", [
    (["--calibration-method", "minmax"], ["--calibration-method minmax is for --int8; ignored"]),
    (["--calibration-method", "minmax", "--int8"], []),
    (["--no-rank", "--calibration", "photos", "--rank-seconds", "5"],
     ["--calibration photos: --no-rank and no --int8 leave nothing to use it; ignored",
      "--rank-seconds 5 with --no-rank; ignored"]),
    (["--no-rank", "--int8", "--calibration", "photos"], []),
    (["--calibration", "photos", "--rank-seconds", "5"], []),
])
def test_export_names_flags_it_would_ignore(argv, said):
    """`--calibration-method minmax` without --int8 was accepted and ignored in silence."""
    import argparse

    from camface.export.cli import configure, unused_flags

    parser = argparse.ArgumentParser()
    configure(parser)
    assert unused_flags(parser.parse_args(["model.keras", "-o", "out.onnx", *argv])) == said


def _tiny_onnx_classifier(path, ir_version, opset, lrn_size=None):
    """Conv -> ReLU (-> LRN of `lrn_size`) -> global average pool -> Gemm: 3 classes from
    [N, 3, 16, 16] float."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
               for name, shape in (("w", (4, 3, 3, 3)), ("b", (4,)), ("g", (4, 3)), ("c", (3,)))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             *([helper.make_node("LRN", ["relu"], ["normed"], name="the_lrn", size=lrn_size)]
               if lrn_size else []),
             helper.make_node("GlobalAveragePool", ["normed" if lrn_size else "relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "g", "c"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version), path)
    return path


@pytest.mark.parametrize("ir_version, opset, message", [
    # onnx 1.23's make_model writes IR 14 by default; 99 stays beyond any ONNX Runtime
    (99, 17, r"tiny.onnx: IR version 99, and ONNX Runtime [\d.]+ reads up to \d+: save it with model.ir_version = \d+"),
    (8, 99, r"tiny.onnx: opset 99, and ONNX Runtime [\d.]+ runs up to opset \d+: convert it"),
])
def test_an_onnx_model_newer_than_onnx_runtime_reads_is_one_line(tmp_path, capsys, ir_version, opset, message):
    import re

    model = _tiny_onnx_classifier(tmp_path / "tiny.onnx", ir_version, opset)
    code, line = run(capsys, "export", str(model), "-o", str(tmp_path / "out.onnx"), "--preset", "unit")
    assert code == 2 and re.search(message, line), line
    assert not (tmp_path / "out.onnx").exists()


def test_the_same_onnx_model_at_versions_onnx_runtime_reads_exports(tmp_path, capsys):
    model = _tiny_onnx_classifier(tmp_path / "tiny.onnx", 8, 17)
    assert camface_main(["export", str(model), "-o", str(tmp_path / "out.onnx"), "--preset", "unit",
                         "--no-rank"]) == 0
    assert (tmp_path / "out.onnx").is_file()


@pytest.mark.parametrize("target", ["relu", "normed"])  # the LRN after the target, or before it
def test_an_onnx_model_onnx_runtime_does_not_run_is_one_line(tmp_path, capsys, target):
    """An LRN of an even size (ONNX Runtime runs odd ones only): the self-check's session of the
    model raised a traceback."""
    import re

    model = _tiny_onnx_classifier(tmp_path / "tiny.onnx", 8, 17, lrn_size=4)
    code, line = run(capsys, "export", str(model), "-o", str(tmp_path / "out.onnx"), "--preset", "unit",
                     "--target-layer", target)
    assert code == 2 and re.search(r"tiny.onnx: ONNX Runtime [\d.]+ does not run the model, so neither "
                                   r"would a CAM graph of it \(.*LRN", line), line
    assert not (tmp_path / "out.onnx").exists()


def _one_unit_onnx(path, activation):
    """Conv -> GlobalAveragePool -> Gemm to ONE unit (-> `activation`): a binary classifier."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal((1, 4)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["target"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["target"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logit" if activation else "y"], transB=1)]
    if activation:
        nodes.append(helper.make_node(activation, ["logit"], ["y"]))
    graph = helper.make_graph(nodes, "binary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def _one_unit_keras(path, activation):
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="conv")(inputs))
    keras.Model(inputs, keras.layers.Dense(1, activation=activation)(x)).save(path)
    return path


@pytest.mark.parametrize("make", [
    lambda tmp: _one_unit_onnx(tmp / "sigmoid.onnx", "Sigmoid"),
    lambda tmp: _one_unit_onnx(tmp / "logit.onnx", None),  # trained with a logistic loss on its logit
    lambda tmp: _one_unit_keras(tmp / "sigmoid.keras", "sigmoid"),
], ids=["onnx-sigmoid", "onnx-logit", "keras-sigmoid"])
def test_a_binary_classifier_with_one_output_is_refused_with_how_to_give_it_two(make, tmp_path, capsys):
    """A single sigmoid (or logit) unit, "is X": the graph's predicted class, the argmax of one
    probability, named every face X, and `probs` of a lone logit was its softmax, always 1.
    Refused before any work, saying how to give the model two outputs; nothing written."""
    model = make(tmp_path)
    out = tmp_path / "g.onnx"
    code, line = run(capsys, "export", str(model), "-o", str(out), "--preset", "torch", "--no-rank")
    assert code == 2 and "its output has 1 class (a binary classifier's single sigmoid or logit unit?)" in line, line
    assert "Dense(2, softmax) head with kernel [-w/2, w/2] and bias [-b/2, b/2]" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name]


@pytest.mark.parametrize("op, activation, said, debug", [
    ("SigmoidGrad", "sigmoid", "SigmoidGrad (in the gradient of Sigmoid) in layer", False),
    # its node is head_conv_1/TanhGrad: not "in the gradient of head_conv_1", the layer's call
    ("TanhGrad", "tanh", "TanhGrad (in the gradient of Tanh) in layer", False),
    ("Expm1", "celu", "Expm1 in layer", False),  # CELU's forward op: tf2onnx 1.17 has no handler for it
    ("Expm1", "celu", "Expm1 in layer", True),
])
def test_an_op_the_conversion_leaves_unconverted_is_one_line_naming_it_and_its_layer(
        tmp_path, capsys, caplog, monkeypatch, op, activation, said, debug):
    """tf2onnx keeps an op it has no handler for as it is: the export stops there with a
    ModelError naming the op and the Keras layer (no traceback from ONNX's checker later), and
    writes nothing. tf2onnx's own lines about it ("Tensorflow op [...] is not supported",
    "Unsupported ops: Counter(...)") said it a second time, without the layer: they show under
    --debug only."""
    import logging

    import keras

    from camface.export import convert

    if op in convert.GRADIENT_HANDLERS:
        monkeypatch.delitem(convert.GRADIENT_HANDLERS, op)  # as tf2onnx alone would leave it
    if debug:  # what --debug sets (under pytest the root logger's level, not basicConfig's handler)
        caplog.set_level(logging.DEBUG)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Conv2D(4, 1, activation=activation, name="head_conv")(x)
    x = keras.layers.Dense(3, name="pred")(keras.layers.GlobalAveragePooling2D()(x))
    path, out = tmp_path / "m.keras", tmp_path / "m.onnx"
    keras.Model(inputs, x).save(path)
    argv = ["export", str(path), "-o", str(out), "--target-layer", "conv", "--no-rank", "--preset", "unit"]
    if debug:
        with pytest.raises(ModelError) as caught:
            camface_main(argv + ["--debug"])
        code, line = 2, str(caught.value)
    else:
        code, line = run(capsys, *argv)
    assert code == 2 and f"TensorFlow op {said} 'head_conv' has no ONNX conversion" in line, line
    assert not out.exists() and list(tmp_path.iterdir()) == [path]
    theirs = [r.getMessage() for r in caplog.records if r.name.startswith("tf2onnx") and r.levelno >= logging.ERROR]
    if debug:
        assert any(f"Unsupported ops: Counter({{'{op}': 1}})" in m for m in theirs), theirs
    else:
        assert theirs == []


@pytest.mark.parametrize("inside, flags, warned", [
    (None, (), True),  # nothing says how it normalises: raw pixels assumed, said
    ("Rescaling", (), False),  # it normalises inside
    ("Normalization", (), False),
    (None, ("--preset", "none"), False),  # said by the user
    (None, ("--preset", "tf"), False),
    (None, ("--scale", "0.5"), False),
])
def test_a_keras_model_whose_normalisation_cannot_be_told_is_warned_about(tmp_path, caplog, inside, flags, warned):
    """No --preset and no normalising layer: the export says it assumed raw 0..255 pixels and how
    to say otherwise (a MobileNetV2 fed raw pixels gives wrong classes without an error)."""
    import logging

    import keras

    inputs = keras.Input((16, 16, 3))
    x = inputs
    if inside == "Rescaling":
        x = keras.layers.Rescaling(1 / 127.5, offset=-1)(x)
    elif inside == "Normalization":
        x = keras.layers.Normalization(mean=[120.0] * 3, variance=[900.0] * 3)(x)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    x = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    path = tmp_path / "m.keras"
    keras.Model(inputs, x, name="plain").save(path)
    caplog.set_level(logging.WARNING)
    assert camface_main(["export", str(path), "-o", str(tmp_path / "m.onnx"), "--no-rank", "--no-verify",
                         *flags]) == 0
    said = [r.getMessage() for r in caplog.records if "raw 0..255" in r.getMessage()]
    assert bool(said) == warned
    if warned:
        assert "model 'plain'" in said[0] and "--preset none" in said[0] and "--scale/--offset" in said[0]
