"""The maps a user sees do not depend on the CPU: every registry method's normalised map stays
put when its activations and gradients move by a few ulps (as another CPU's rounding moves them)
and when ONNX Runtime runs with its optimisations on or off, on 1 or 2 threads.

Inputs: the bundled model at add_3 (a target layer without ReLU, where Grad-CAM++'s and
XGrad-CAM's paper formulas are ill-conditioned) on 64 crops: the astronaut's face, shifted,
mirrored and noisy copies, Grace Hopper's face, and faces buried in noise that the model is unsure
of; each explained for its predicted class and for each of the 7 classes forced.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np
import pytest

pytest.importorskip("onnx")
from test_export_graph import ORT_SETTINGS, ort_session, ulp_perturbed  # noqa: E402

from camface import methods  # noqa: E402

# The largest change of a normalised map (values in [0, 1]) allowed under those perturbations.
# Measured on this suite's crops: at most 2e-5 for every method. With the papers' Grad-CAM++ and
# XGrad-CAM denominators (before camface conditioned them) the same check gave 1.2e-3 and 1.7e-3.
MAP_BOUND = 2e-4
SEEDS = (0, 1)


def _gradient_methods():
    return [m for m in methods.names() if methods.get(m).needs <= {methods.GRADIENTS}]


def methods_graph(shape, names) -> bytes:
    """An ONNX model: inputs A and g float32 [N, h, w, K] -> each method's unnormalised map,
    written by the registry's ONNX ops (`camface.export.onnx_ops`), as in every exported graph."""
    from onnx import TensorProto, helper

    from camface.export.onnx_builder import GraphBuilder
    from camface.export.onnx_ops import ONNX_OPS, OnnxTensor

    builder = GraphBuilder(opset=18)
    dims = [None, *shape]
    a, g = OnnxTensor(builder, "A", tuple(dims)), OnnxTensor(builder, "g", tuple(dims))
    for name in names:
        out = methods.get(name).compute(ONNX_OPS, a, g, None)
        builder.nodes.append(helper.make_node("Identity", [out.name], [name]))
    graph = helper.make_graph(
        builder.nodes, "methods",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, dims) for x in ("A", "g")],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in names],
        initializer=builder.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def many_crops(astronaut_bgr) -> np.ndarray:
    """64 gray 64x64 crops: uint8 [64, 64, 64, 1] (see the module docstring)."""
    import cv2
    from matplotlib import cbook
    from test_export_emotion import crops

    faces = crops(astronaut_bgr, 40)
    with cbook.get_sample_data("grace_hopper.jpg") as file:
        hopper = cv2.imdecode(np.frombuffer(file.read(), np.uint8), cv2.IMREAD_GRAYSCALE)
    x, y, side = 166, 130, 199  # MediaPipe's face box on grace_hopper.jpg
    hopper = cv2.resize(hopper[y:y + side, x:x + side], (64, 64), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(7)
    shifted = [np.roll(hopper, rng.integers(-5, 6, 2), axis=(0, 1)) for _ in range(12)]
    unsure = faces[:12, ..., 0] * 0.3 + rng.normal(100, 40, faces[:12, ..., 0].shape)
    return np.concatenate([faces[..., 0], np.stack(shifted), np.clip(unsure, 0, 255)]).astype(np.uint8)[..., None]


@pytest.fixture(scope="module")
def bundled_activations(astronaut_bgr):
    """(A float32 [8 N, 8, 8, 64], g = d logit_c / dA alike, max probability per crop [N]): the
    bundled graph's activations, and the Keras head's gradients for the predicted class (-1)
    and each of the 7 classes."""
    pytest.importorskip("tensorflow")
    import keras
    from test_methods import tape_gradients

    from camface.models import EMOTION_KERAS, EMOTION_ONNX

    image = many_crops(astronaut_bgr)
    session = ort_session(EMOTION_ONNX.read_bytes(), outputs=("probs", "activations"))
    probs, activations = session.run(["probs", "activations"],
                                     {"image": image, "class_index": -np.ones(len(image), np.int64)})
    model = keras.models.load_model(EMOTION_KERAS, compile=False)
    head = keras.Model(model.get_layer("add_3").output, model.get_layer("predictions").input)
    gradients = [tape_gradients(lambda x: head(x, training=False), activations,
                                np.full(len(image), c, np.int64))[0] for c in range(-1, 7)]
    return np.concatenate([activations] * 8), np.concatenate(gradients), probs.max(axis=1)


def _normalised(maps: dict, names) -> dict:
    return {name: np.stack([methods.normalize(m, name) for m in maps[name]]) for name in names}


def test_crops_include_faces_the_model_is_unsure_of(bundled_activations):
    _, _, top = bundled_activations
    assert top.min() < 0.5 and top.max() > 0.9  # unsure faces and confident ones


@pytest.mark.parametrize("setting", ORT_SETTINGS)
def test_normalised_maps_survive_ulp_perturbations(bundled_activations, setting):
    """Every method's normalised map, on A and g moved by up to 4 ulps (two seeds) and run with
    `setting`, within MAP_BOUND of the unperturbed map run with optimisations on, 1 thread."""
    activations, gradients, _ = bundled_activations
    names = _gradient_methods()
    model = methods_graph(activations.shape[1:], names)
    reference = _normalised(dict(zip(names, ort_session(model, True, 1).run(
        names, {"A": activations, "g": gradients}))), names)
    session = ort_session(model, *ORT_SETTINGS[setting])
    worst = {}
    for seed in SEEDS:
        moved = {"A": ulp_perturbed(activations, seed), "g": ulp_perturbed(gradients, seed + 100)}
        got = _normalised(dict(zip(names, session.run(names, moved))), names)
        for name in names:
            worst[name] = max(worst.get(name, 0.0), float(np.abs(got[name] - reference[name]).max()))
    assert all(reference[name].max() > 0.99 for name in names)  # maps that show something
    over = {name: f"{value:.3g}" for name, value in worst.items() if value > MAP_BOUND}
    assert not over, f"normalised maps moved by more than {MAP_BOUND} under a few ulps: {over}"


@pytest.mark.parametrize("setting", [s for s in ORT_SETTINGS if s != "optimised-1"])
def test_bundled_graph_normalised_maps_do_not_depend_on_onnx_runtime_settings(astronaut_bgr, setting):
    """The whole bundled graph (features, in-graph gradient, maps) on the 64 crops, predicted and
    forced classes: normalised maps within MAP_BOUND of the optimised single-thread run's."""
    from camface.models import EMOTION_ONNX

    image = many_crops(astronaut_bgr)
    model = EMOTION_ONNX.read_bytes()
    # not the methods that run the model again: 64 x 64 forward passes per run (test_gradient_free.py)
    names = [n for n in methods.names() if n != "cam" and not methods.get(n).reruns]
    baseline, other = ort_session(model, True, 1, names), ort_session(model, *ORT_SETTINGS[setting], outputs=names)
    worst = {}
    for c in range(-1, 7):
        feed = {"image": image, "class_index": np.full(len(image), c, np.int64)}
        want = _normalised(dict(zip(names, baseline.run(names, feed))), names)
        got = _normalised(dict(zip(names, other.run(names, feed))), names)
        for name in names:
            worst[name] = max(worst.get(name, 0.0), float(np.abs(got[name] - want[name]).max()))
    over = {name: f"{value:.3g}" for name, value in worst.items() if value > MAP_BOUND}
    assert not over, f"normalised maps differ between ONNX Runtime settings: {over}"


# ---- the conditioning choices, by hand (camface/methods.py says why) ----------------------------

# One crop, 1x2 map, 2 channels. Channel 0 sums negative (-3 + 1 = -2), channel 1 positive.
A_MIXED = np.array([[[[-3.0, 1.0], [1.0, 3.0]]]], np.float32)
G_MIXED = np.array([[[[1.0, 2.0], [0.5, -1.0]]]], np.float32)


def test_gradcampp_clamps_a_negative_channel_sum_at_zero():
    """Channel 0: S = -2 -> S+ = 0, so alpha = 1/2 where g > 0: w0 = (1 + 0.5) / 2 = 0.75 (the
    paper's formula would divide by 2 + S g = 0 at g = 1). Channel 1: S = 4, w1 = 2 / (2 + 4 * 2)
    (g = -1 contributes nothing). map = ReLU([-3 w0 + 1 w1, 1 w0 + 3 w1])."""
    w0, w1 = 0.75, 2 / 10
    out = methods.get("gradcampp").reference(A_MIXED, G_MIXED)
    np.testing.assert_allclose(out, [[[0.0, w0 + 3 * w1]]], rtol=1e-6)
    assert np.isfinite(out).all()


def test_gradcampp_equals_the_paper_where_activations_are_non_negative():
    rng = np.random.default_rng(2)
    a = np.abs(rng.normal(size=(3, 4, 4, 6))).astype(np.float32)
    g = rng.normal(size=a.shape).astype(np.float32)
    g2, g3 = g.astype(np.float64) ** 2, g.astype(np.float64) ** 3
    alpha = g2 / (2 * g2 + a.sum(axis=(1, 2), keepdims=True) * g3)
    weights = (alpha * np.maximum(g, 0)).sum(axis=(1, 2))
    want = np.maximum(np.einsum("nhwk,nk->nhw", a, weights), 0)
    np.testing.assert_allclose(methods.get("gradcampp").reference(a, g), want, rtol=1e-5)


def test_xgradcam_divides_by_the_sum_of_magnitudes():
    """Channel 0: sum |A| = 4, sum g A = -3 + 0.5 = -2.5 -> w0 = -0.625 (the paper's sum A = -2
    would give 1.25 with the opposite sign); channel 1: sum |A| = 4, sum g A = 2 - 3 -> w1 = -0.25.
    map = ReLU([-3 w0 + w1, w0 + 3 w1])."""
    w0, w1 = -2.5 / 4, -1.0 / 4
    out = methods.get("xgradcam").reference(A_MIXED, G_MIXED)
    np.testing.assert_allclose(out, [[[-3 * w0 + w1, 0.0]]], rtol=1e-6)
    rng = np.random.default_rng(4)
    a = np.abs(rng.normal(size=(2, 3, 3, 5))).astype(np.float32)  # A >= 0: the paper's weight
    g = rng.normal(size=a.shape).astype(np.float32)
    weights = (a * g).sum(axis=(1, 2)) / a.sum(axis=(1, 2))
    want = np.maximum(np.einsum("nhwk,nk->nhw", a, weights), 0)
    np.testing.assert_allclose(methods.get("xgradcam").reference(a, g), want, rtol=1e-5)
