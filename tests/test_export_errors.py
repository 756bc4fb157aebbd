"""`camface export` / `camface info` misuse: one clear line on stderr and exit code 2."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

from camface.cli import main as camface_main
from camface.errors import ModelError
from camface.models import EMOTION_KERAS


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
    (lambda tmp: _write(tmp / "broken.h5", b"not hdf5 at all" * 10), "broken.h5: not a loadable Keras model"),
    (lambda tmp: _write(tmp / "broken.keras", b"PK\x03\x04junk"), "broken.keras: not a loadable Keras model"),
])
def test_bad_model_files(tmp_path, capsys, make, message):
    import re

    path = make(tmp_path)
    code, line = run(capsys, "export", str(path), "-o", str(tmp_path / "out.onnx"))
    assert code == 2 and line.startswith("camface: error: ") and re.search(message, line), line
    assert not (tmp_path / "out.onnx").exists()


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
])
def test_unwritable_output(tmp_path, capsys, output, message):
    import re

    target = tmp_path / output if output != "." else tmp_path
    code, line = run(capsys, "export", str(EMOTION_KERAS), "-o", str(target))
    assert code == 2 and re.search(message, line), line


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
    assert code == 2 and "2 labels given for a model with 7 classes" in line


def test_preprocessing_misuse():
    from camface.export.preprocess import Preprocessing

    with pytest.raises(ModelError, match="1 channel; colour order RGB needs 3"):
        Preprocessing.resolve(1, "tf", color_order="RGB")
    with pytest.raises(ModelError, match="--offset needs 1 or 3 values, got 2"):
        Preprocessing.resolve(3, "none", offset=[1.0, 2.0])
    caffe = Preprocessing.resolve(3, "imagenet-caffe")
    assert caffe.color_order == "BGR" and caffe.offset == (-103.939, -116.779, -123.68)
    assert Preprocessing.resolve(1, "tf").color_order == "GRAY"  # one channel is always GRAY
    custom = Preprocessing.resolve(3, "unit", color_order="bgr", scale=[2.0])
    assert custom.color_order == "BGR" and custom.scale == (2.0, 2.0, 2.0)


@pytest.mark.parametrize("content, message", [
    (None, "ONNX file not found"),
    (b"\x00\x01garbage", "not an ONNX model"),
])
def test_info_errors(tmp_path, capsys, content, message):
    path = tmp_path / "graph.onnx"
    if content is not None:
        path.write_bytes(content)
    code, line = run(capsys, "info", str(path))
    assert code == 2 and message in line
