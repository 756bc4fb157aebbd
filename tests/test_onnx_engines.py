"""Both engines agree (a Keras model through the TensorFlow exporter, and the same model
exported forward-only by tf2onnx then through the ONNX engine), and an ONNX-engine graph runs
in `camface live` with TensorFlow and torch blocked."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
import onnxruntime as ort  # noqa: E402
from realtime_helpers import BLOCK_TF, write_clip  # noqa: E402

from camface import methods  # noqa: E402
from camface.export import exporter, onnx_export  # noqa: E402
from camface.export.exporter import ExportOptions  # noqa: E402


@pytest.fixture(scope="module")
def keras_model():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def _run(model_bytes, images, classes):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": images, "class_index": classes})))


def test_keras_exporter_and_onnx_engine_give_the_same_heatmaps(tmp_path, keras_model):
    import tensorflow as tf
    import tf2onnx

    path = tmp_path / "net.keras"
    keras_model.save(path)
    keras_graph = exporter.export(path, tmp_path / "keras.onnx",
                                  ExportOptions(preset="tf", target_layer="last_conv"))
    forward, _ = tf2onnx.convert.from_keras(
        keras_model, input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)], opset=17)
    onnx_graph, info, _ = onnx_export.build(forward, ExportOptions(preset="tf"))
    assert set(info.heatmaps) == set(keras_graph.info.heatmaps) == set(methods.names())
    assert info.feature_size == keras_graph.info.feature_size == (16, 16)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    classes = np.array([-1, 0, 1, 2, 3], np.int64)
    from_keras = _run(keras_graph.path.read_bytes(), images, classes)
    from_onnx = _run(onnx_graph.SerializeToString(), images, classes)
    for name, value in from_keras.items():
        error = float(np.abs(from_onnx[name] - value).max())
        print(f"{name}: max |onnx engine - tf engine| = {error:.2e} (max {np.abs(value).max():.3g})")
        assert error <= 1e-6 + 1e-4 * float(np.abs(value).max()), name


def test_onnx_engine_graph_runs_live_without_tensorflow_or_torch(tmp_path, keras_model,
                                                                astronaut_bgr):
    import tensorflow as tf
    import tf2onnx

    forward, _ = tf2onnx.convert.from_keras(
        keras_model, input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)], opset=17)
    graph, info, _ = onnx_export.build(forward, ExportOptions(preset="tf"))
    from camface.export import convert

    convert.set_metadata(graph, info.to_metadata())
    convert.save(graph, tmp_path / "graph.onnx")
    clip = write_clip(tmp_path / "clip.mp4", [astronaut_bgr] * 6)
    blocked = BLOCK_TF.replace("('tensorflow', 'keras', 'tf2onnx')",
                               "('tensorflow', 'keras', 'tf2onnx', 'torch', 'onnxscript')")
    assert blocked != BLOCK_TF
    run = subprocess.run([sys.executable, "-c", blocked, "live", "--source", str(clip),
                          "--model", str(tmp_path / "graph.onnx"), "--no-show", "--record",
                          str(tmp_path / "out.mp4"), "--method", "cam"],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert run.returncode == 0, run.stderr
    assert "recorded 6 frames" in run.stderr
