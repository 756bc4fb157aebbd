"""The heatmap method registry (camface.methods): each entry's equations on hand-computed
arrays, in numpy (the reference), in TensorFlow (the Keras exporter runs the same function) and
as ONNX nodes (the ONNX exporter's), and the registry driving every command's choices."""

import argparse

import numpy as np
import pytest

from camface import methods


def _tensorflow_ops():
    pytest.importorskip("tensorflow")
    import tensorflow as tf

    from camface.export.graph import TF_OPS

    def run(method, a, g=None, w=None):
        as_tensor = (lambda x: None if x is None else tf.constant(x))
        return method.compute(TF_OPS, as_tensor(a), as_tensor(g), as_tensor(w)).numpy()

    return run


def _numpy_ops():
    return lambda method, a, g=None, w=None: method.reference(a, g, w)


def _onnx_ops():
    """The compute function as ONNX nodes (what `camface export` writes into a CAM graph from an
    ONNX or PyTorch model), run on ONNX Runtime."""
    pytest.importorskip("onnx")
    from onnx_helpers import run_nodes

    from camface.export.onnx_builder import GraphBuilder
    from camface.export.onnx_ops import ONNX_OPS, OnnxTensor

    def run(method, a, g=None, w=None):
        builder = GraphBuilder(opset=18)
        given = {name: np.ascontiguousarray(x, np.float32) for name, x in (("a", a), ("g", g), ("w", w))
                 if x is not None}
        handles = {name: OnnxTensor(builder, name, shape=(None, *x.shape[1:])) for name, x in given.items()}
        out = method.compute(ONNX_OPS, handles["a"], handles.get("g"), handles.get("w"))
        return run_nodes(builder.nodes, given, [out.name], builder.initializers)[0]

    return run


BACKENDS = {"numpy": _numpy_ops, "tensorflow": _tensorflow_ops, "onnx": _onnx_ops}


@pytest.fixture(params=list(BACKENDS))
def run(request):
    return BACKENDS[request.param]()


def test_gradcam_and_gradcampp_by_hand(run):
    """One crop, 1x2 map, 2 channels. A = [[1, 2], [3, 0]] per position (channels last)."""
    a = np.array([[[[1.0, 3.0], [2.0, 0.0]]]], np.float32)  # [1, 1, 2, 2]: positions x channels
    g = np.array([[[[1.0, -1.0], [3.0, 0.0]]]], np.float32)
    # Grad-CAM: alpha = mean over positions = [2, -0.5]; map = relu([1*2 - 0.5*3, 2*2]) = [0.5, 4]
    np.testing.assert_allclose(run(methods.get("gradcam"), a, g), [[[0.5, 4.0]]], rtol=1e-6)
    # Grad-CAM++: sum_ab A = [3, 3]; alpha = g^2 / (2 g^2 + 3 g^3)
    # channel 0: g=1 -> 1/5, g=3 -> 9/(18+81) = 1/11; w0 = 1/5 * 1 + 1/11 * 3 = 26/55
    # channel 1: g=-1 -> 1/(2-3) = -1 but relu(g)=0; g=0 -> 0 (0/0 guarded); w1 = 0
    # map = relu([1 * 26/55, 2 * 26/55])
    np.testing.assert_allclose(run(methods.get("gradcampp"), a, g), [[[26 / 55, 52 / 55]]], rtol=1e-6)
    # CAM with W [K=2, classes=2]: class 1 uses column [0.5, -1]: [1*0.5 - 3, 2*0.5] = [-2.5, 1]
    weights = np.array([[1.0, 0.5], [2.0, -1.0]], np.float32)
    w = weights[:, 1][None, None, None, :]
    np.testing.assert_allclose(run(methods.get("cam"), a, None, w), [[[-2.5, 1.0]]], rtol=1e-6)


def test_grad_cam_math_by_hand(run):
    a = np.zeros((1, 2, 2, 2), np.float32)
    a[0, :, :, 0] = [[1, 2], [3, 4]]
    a[0, :, :, 1] = [[4, 0], [0, 0]]
    g = np.zeros_like(a)
    g[0, :, :, 0] = [[1, 1], [1, 1]]  # alpha_0 = 1
    g[0, :, :, 1] = [[-2, -2], [-2, -2]]  # alpha_1 = -2
    before = a.copy()
    np.testing.assert_allclose(run(methods.get("gradcam"), a, g)[0], [[0, 2], [3, 4]])  # ReLU(1*A0 - 2*A1)
    np.testing.assert_array_equal(a, before)
    # Grad-CAM++ eq. 19: channel 0: g=1, sum A=10 -> alpha = 1/(2+10) everywhere, w = 4/12;
    # channel 1: g=-2 -> ReLU(g) = 0, w = 0.
    np.testing.assert_allclose(run(methods.get("gradcampp"), a, g)[0], a[0, :, :, 0] / 3, rtol=1e-6)
    w = np.array([2.0, -1.0], np.float32)[None, None, None, :]
    np.testing.assert_allclose(run(methods.get("cam"), a, None, w)[0], 2 * a[0, :, :, 0] - a[0, :, :, 1])


# One crop, 1x2 map, 2 channels (positions x channels): A = [[1, 3], [2, 0]], g = [[1, -1], [3, 0]].
A1 = np.array([[[[1.0, 3.0], [2.0, 0.0]]]], np.float32)
G1 = np.array([[[[1.0, -1.0], [3.0, 0.0]]]], np.float32)
A3 = np.array([[[[0.0, 0.0], [1.0, 2.0], [5.0, 10.0]]]], np.float32)  # 1x3 map, 2 channels


@pytest.mark.parametrize("name, a, g, expected", [
    # HiResCAM: sum_k g A = [1 - 3, 6 + 0] (signed)
    ("hirescam", A1, G1, [[-2.0, 6.0]]),
    # Grad-CAM element-wise: sum_k ReLU(g A) = [1 + 0, 6 + 0]
    ("gradcamelementwise", A1, G1, [[1.0, 6.0]]),
    # XGrad-CAM: sum A = [3, 3]; w = [(1 + 6) / 3, (-3 + 0) / 3] = [7/3, -1];
    # map = ReLU([7/3 - 3, 14/3]) = [0, 14/3]
    ("xgradcam", A1, G1, [[0.0, 14 / 3]]),
    # LayerCAM: ReLU(sum_k ReLU(g) A) = ReLU([1 + 0, 6 + 0])
    ("layercam", A1, G1, [[1.0, 6.0]]),
    # LayerCAM with A < 0: ReLU(g) A = [-1 * 1 + 0, ...] -> ReLU clips the negative sum
    ("layercam", -A1, G1, [[0.0, 0.0]]),
    # Grad-CAM element-wise with A < 0: ReLU(g * -A) = [0 + 3, 0 + 0]
    ("gradcamelementwise", -A1, G1, [[3.0, 0.0]]),
    # Eigen-CAM: A = [[0, 0], [1, 2], [5, 10]] centred is [-2, -1, 3] x (1, 2), rank 1, v1 = (1, 2) / sqrt(5):
    # X v1 = [-2, -1, 3] sqrt(5), its largest-magnitude entry already positive.
    ("eigencam", A3, None, [[-2 * np.sqrt(5), -np.sqrt(5), 3 * np.sqrt(5)]]),
    # Eigen-Grad-CAM with g = -1: g A = -A projects to minus that, and the sign rule turns it back.
    ("eigengradcam", A3, -np.ones_like(A3), [[-2 * np.sqrt(5), -np.sqrt(5), 3 * np.sqrt(5)]]),
])
def test_new_methods_by_hand(run, name, a, g, expected):
    before = a.copy()
    np.testing.assert_allclose(run(methods.get(name), a, g), [expected], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a, before)


def test_xgradcam_has_no_epsilon():
    """Deliberate deviation from pytorch-grad-cam (denominator sum(A) + 1e-7): the paper's weight
    exactly. A channel summing to 1e-6 keeps weight sum(g A) / sum(A) (pytorch-grad-cam's would be
    ~9% smaller); a channel that is zero everywhere gets weight 0, not NaN."""
    a = np.zeros((1, 1, 2, 2), np.float32)
    a[0, 0, :, 0] = [4e-7, 6e-7]  # sum 1e-6
    g = np.ones_like(a)
    g[0, 0, :, 0] = [1e-3, 3e-3]
    out = methods.get("xgradcam").reference(a, g)
    weight = (4e-7 * 1e-3 + 6e-7 * 3e-3) / 1e-6  # 2.2e-3
    np.testing.assert_allclose(out, [[[4e-7 * weight, 6e-7 * weight]]], rtol=1e-5)
    eps = (4e-7 * 1e-3 + 6e-7 * 3e-3) / (1e-6 + 1e-7)
    assert abs(eps - weight) > 0.08 * weight  # the epsilon would have mattered
    assert np.isfinite(out).all()


def _svd_projection(x):
    """numpy's first-component projection of each crop's centred (h w) x K matrix, sign made
    so that the largest-magnitude entry is positive: [N, h, w] float64."""
    n, h, w, k = x.shape
    out = []
    for crop in x.reshape(n, h * w, k).astype(np.float64):
        crop = crop - crop.mean(axis=0)
        p = crop @ np.linalg.svd(crop, full_matrices=False)[2][0]
        out.append((p if p[np.abs(p).argmax()] >= 0 else -p).reshape(h, w))
    return np.array(out)


def _gapped(n=3, h=5, w=6, k=16, gap=0.5, seed=0):
    """Activations whose centred matrices have singular values 1 > gap > gap^2 > ...: [n, h, w, k]."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        u, _ = np.linalg.qr(rng.normal(size=(h * w, h * w)))
        u = u - u.mean(axis=0)  # centred left vectors (column sums 0)
        u, _ = np.linalg.qr(u)
        v, _ = np.linalg.qr(rng.normal(size=(k, k)))
        s = gap ** np.arange(min(h * w, k) - 1)
        x = (u[:, :len(s)] * s) @ v[:, :len(s)].T
        out.append(x.reshape(h, w, k) + rng.normal(size=(1, 1, k)))  # channel offsets: centring removes them
    return np.array(out, np.float32)


@pytest.mark.parametrize("gap", [0.5, 0.8, 0.9])
@pytest.mark.parametrize("h, w, k", [(5, 6, 16), (3, 4, 16), (4, 4, 16)])  # more positions than channels, fewer, as many
def test_eigencam_matches_numpy_svd(run, gap, h, w, k):
    """Up to sign, Eigen-CAM's power method gives numpy's SVD projection; the sign is the
    largest-magnitude entry's (to 1e-4 after normalisation, singular value ratios up to 0.9),
    whether it iterates on the positions' Gram matrix or the channels' (h w > K)."""
    x = _gapped(h=h, w=w, k=k, gap=gap)
    got = run(methods.get("eigencam"), x)
    want = _svd_projection(x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(methods.normalize(g, "eigencam"), methods.normalize(w, "eigencam"), atol=1e-4)
        np.testing.assert_allclose(g, w, atol=1e-4 * np.abs(w).max())  # unnormalised too: X v1


@pytest.mark.parametrize("scale", [1e-20, 1e-11, 1e18])
@pytest.mark.parametrize("h, w, k", [(5, 6, 16), (2, 2, 64)])  # the channels' matrix, the positions'
def test_eigencam_scales_with_the_activations(run, scale, h, w, k):
    """Eigen-CAM is linear in A: A * scale gives the map * scale. Activations near 1e-11 (a
    random-weight MobileNetV2 at 64x64) put |X^T u|^2 below float32's normal range: TensorFlow
    flushed it to 0 and gave an all-zero map where ONNX Runtime gave one (the export failed);
    near 1e18 the Gram matrix overflowed."""
    x = _gapped(h=h, w=w, k=k, gap=0.5, seed=1)
    eigencam = methods.get("eigencam")
    want = run(eigencam, x) * np.float64(scale)
    got = run(eigencam, (x * np.float64(scale)).astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    eigengradcam = methods.get("eigengradcam")
    np.testing.assert_allclose(run(eigengradcam, (x * np.float64(scale)).astype(np.float32), np.ones_like(x)),
                               want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_eigencam_sign_is_deterministic():
    """pytorch-grad-cam leaves the SVD's sign to chance (then ReLU may leave nothing): here the
    map of -A is the map of A, and its largest-magnitude entry is positive."""
    x = _gapped(gap=0.6, seed=3)
    eigencam = methods.get("eigencam")
    np.testing.assert_allclose(eigencam.reference(-x), eigencam.reference(x), atol=1e-6)
    out = eigencam.reference(x).reshape(len(x), -1)
    assert (out[np.arange(len(x)), np.abs(out).argmax(1)] > 0).all()
    assert not eigencam.reference(np.ones((2, 3, 3, 4), np.float32)).any()  # X = 0 after centring


def test_random_weights_are_uniform_fixed_and_per_crop(run):
    """w ~ U(-1, 1) per crop (row) and channel, the same in numpy and TensorFlow and on every call."""
    a = np.ones((32, 1, 1, 512), np.float32)  # the random map of ones is the sum of the weights
    weights = methods.random_weights(methods.NUMPY, a)[:, 0, 0, :]
    assert weights.shape == (32, 512) and -1 <= weights.min() and weights.max() < 1
    assert abs(weights.mean()) < 0.02 and abs(weights.std() - 1 / np.sqrt(3)) < 0.01
    assert abs(np.corrcoef(weights[:, :-1].ravel(), weights[:, 1:].ravel())[0, 1]) < 0.03  # channels
    assert abs(np.corrcoef(weights[:-1].ravel(), weights[1:].ravel())[0, 1]) < 0.03  # crops
    assert len(np.unique(weights)) > 4000
    maps = run(methods.get("random"), a)
    np.testing.assert_allclose(maps[:, 0, 0], weights.sum(axis=1), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(run(methods.get("random"), a), maps)  # every call alike
    # row n's weights do not depend on the batch size
    np.testing.assert_array_equal(methods.random_weights(methods.NUMPY, a[:3])[:, 0, 0], weights[:3])


def test_layercam_equals_gradcam_elementwise_where_activations_are_non_negative():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(4, 5, 5, 8)).astype(np.float32)
    a[:, :3] = np.abs(a[:, :3])  # rows 0-2: A >= 0 in every channel; rows 3-4: mixed signs
    g = rng.normal(size=a.shape).astype(np.float32)
    layer, elementwise = methods.get("layercam").reference(a, g), methods.get("gradcamelementwise").reference(a, g)
    non_negative = (a >= 0).all(axis=-1)
    np.testing.assert_allclose(layer[non_negative], elementwise[non_negative], rtol=1e-5)
    assert np.abs(layer - elementwise)[~non_negative].max() > 0.1  # the identity needs A >= 0


def test_gradcampp_is_zero_where_gradients_vanish(run):
    a = np.random.default_rng(0).normal(size=(2, 3, 3, 4)).astype(np.float32)
    out = run(methods.get("gradcampp"), a, np.zeros_like(a))
    assert np.isfinite(out).all() and not out.any()


@pytest.mark.parametrize("method, heatmap, expected", [
    ("gradcam", [[-1.0, 0.0], [2.0, 4.0]], [[0.0, 0.0], [0.5, 1.0]]),  # ReLU, / max
    ("cam", [[-1.0, 0.0], [1.0, 3.0]], [[0.0, 0.25], [0.5, 1.0]]),  # min-max
    ("gradcam", [[-1.0, -2.0]], [[0.0, 0.0]]),  # no positive evidence: all zero
    ("cam", [[2.0, 2.0]], [[0.0, 0.0]]),  # constant
    ("hirescam", [[-1.0, 0.0], [2.0, 4.0]], [[0.0, 0.0], [0.5, 1.0]]),  # signed: positive part
    ("eigencam", [[-1.0, 0.0], [1.0, 3.0]], [[0.0, 0.25], [0.5, 1.0]]),  # sign is a convention
    ("random", [[-1.0, 0.0], [1.0, 3.0]], [[0.0, 0.25], [0.5, 1.0]]),
])
def test_normalize_follows_the_entry(method, heatmap, expected):
    before = np.array(heatmap, np.float32)
    out = methods.normalize(before, method)
    np.testing.assert_allclose(out, expected)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(before, np.array(heatmap, np.float32))  # input untouched


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(KeyError, match="gradcam, gradcampp, cam, hirescam, .*, random"):
        methods.get("nope")


@pytest.mark.parametrize("method", ["nope", "GradCAM", ""])
def test_normalize_refuses_an_unknown_method(method):
    # an unknown name must not silently get the POSITIVE normalisation
    with pytest.raises(KeyError, match=f"unknown heatmap method '{method}'; choose from gradcam, .*, random"):
        methods.normalize(np.ones((2, 2), np.float32), method)


def test_random_is_a_baseline_not_a_display_choice():
    from camface.realtime.config import method_choices

    assert "random" in methods.names() and "random" not in methods.names(display_only=True)
    assert "random" not in method_choices() and "eigencam" in method_choices()
    assert len(methods.names(display_only=True)) >= 9


@pytest.fixture
def extra_method(monkeypatch):
    """A fake entry appended to the registry for one test."""
    fake = methods.Method("fakecam", "Fake-CAM", "none", lambda ops, a, g, w: ops.sum(a, axis=-1),
                          frozenset())
    monkeypatch.setitem(methods.METHODS, fake.name, fake)
    return fake


def _choices(configure, flag="--method"):
    parser = argparse.ArgumentParser()
    configure(parser)
    return next(a for a in parser._actions if flag in a.option_strings).choices


def test_registry_drives_the_cli_choices(extra_method):
    from camface.realtime import cli as live_cli
    from camface.realtime.bench import cli as bench_cli
    from camface.export import cli as export_cli

    assert "fakecam" in _choices(live_cli.configure)
    assert "fakecam" in _choices(bench_cli.configure)
    assert "fakecam" in _choices(export_cli.configure, "--heads")
    assert list(_choices(live_cli.configure)) == ["auto", *methods.names(display_only=True), "none"]


def test_registry_drives_the_graph_contract_and_menus(extra_method):
    from camface import graph_spec
    from camface.realtime.controls import Controls, apply_key

    assert graph_spec.heatmap_outputs()[-1] == "fakecam"
    info = graph_spec.GraphInfo(labels=("a",), input_size=(4, 4), color_order="GRAY", target_layer="t",
                                heatmaps=("gradcam", "fakecam"))
    assert graph_spec.methods_of(info) == ("gradcam", "fakecam")
    controls, _ = apply_key(Controls(method="gradcam"), ord("m"), graph_spec.methods_of(info), 1)
    assert controls.method == "fakecam"


# ---- every heatmap of exported graphs: ONNX Runtime vs the numpy reference ------------------------
# The reference runs on the graph's own activations with an independent gradient (tf.GradientTape
# through the Keras head, not camface.export), so only the heatmap maths and the gradient are
# compared, not the features' rounding.

from test_export_graph import (BATCHES, ORT_SETTINGS, _dense_head, class_indices, images,  # noqa: E402,F401
                               nonlinear_head, resnet_like, ulp_perturbed)

RTOL = 1e-4  # of the reference's largest magnitude
CONDITIONING = 16  # times the reference's own change when its inputs move by a few ulps


def tape_gradients(head, activations, classes):
    """(d logit_c / dA float32 [N, h, w, K], logits [N, classes]) at `activations`, c = classes
    (-1: the argmax), via tf.GradientTape inside tf.function (eager conv gradients crash oneDNN)."""
    import tensorflow as tf

    @tf.function
    def run(a, picked_class):
        with tf.GradientTape() as tape:
            tape.watch(a)
            logits = head(a)
            chosen = tf.where(picked_class < 0, tf.argmax(logits, -1), picked_class)
            picked = tf.gather(logits, chosen, batch_dims=1)
        return tape.gradient(picked, a), chosen

    gradients, chosen = run(tf.constant(activations), tf.constant(classes))
    return gradients.numpy(), chosen.numpy()


def assert_heatmaps_match_reference(graph, head, image, classes, class_weights=None):
    """Every registry heatmap of `graph` equals `Method.reference` on the graph's activations.

    The tolerance follows each map's conditioning: RTOL of the reference's largest magnitude plus
    CONDITIONING times how far the reference itself moves when its activations and gradients
    move by a few ulps (`ulp_perturbed`), so an ill-conditioned map is judged by what rounding
    can do to it, and a well-conditioned one tightly."""
    out = graph(image, classes)
    activations = out["activations"]
    gradients, chosen = tape_gradients(head, activations, classes)
    np.testing.assert_array_equal(chosen, np.where(classes < 0, out["probs"].argmax(1), classes))
    weights = None if class_weights is None else class_weights[:, chosen].T[:, None, None, :]
    moved_a, moved_g = ulp_perturbed(activations, 1), ulp_perturbed(gradients, 2)
    # the methods that run the model again: against their reference in tests/test_gradient_free.py
    names = [n for n in graph.names if n in methods.METHODS and not methods.get(n).reruns]
    assert len(names) >= 9, names
    for name in names:
        entry = methods.get(name)
        want = entry.reference(activations, gradients, weights)
        scale = float(np.abs(want).max())
        assert scale > 1e-6, f"{name}: reference is ~0, test is vacuous"
        sensitivity = float(np.abs(entry.reference(moved_a, moved_g, weights) - want).max())
        # capped: a map that became ill-conditioned again must not widen its own bound without limit
        tolerance = 1e-7 + RTOL * scale + min(CONDITIONING * sensitivity, 10 * RTOL * scale)
        diff = float(np.abs(out[name] - want).max())
        assert diff <= tolerance, f"{name}: max |onnx - reference| = {diff:.3g} > {tolerance:.3g}"


@pytest.fixture(scope="module")
def bundled():
    """The committed graph and its Keras head (target add_3 -> pre-softmax logits)."""
    import keras
    import onnx

    from camface.models import EMOTION_KERAS, EMOTION_ONNX
    from test_export_graph import Graph

    model = keras.models.load_model(EMOTION_KERAS, compile=False)
    head = keras.Model(model.get_layer("add_3").output, model.get_layer("predictions").input)
    return Graph(onnx.load(str(EMOTION_ONNX))), (lambda a: head(a, training=False))


@pytest.mark.parametrize("setting", ORT_SETTINGS)
@pytest.mark.parametrize("n", BATCHES)
def test_bundled_graph_heatmaps_match_reference(bundled, astronaut_bgr, n, setting):
    """Predicted and forced classes, with ONNX Runtime's optimisations on and off, 1 and 2 threads."""
    from test_export_emotion import crops

    graph, head = bundled
    graph = graph.with_settings(setting)
    assert set(methods.names()) - {"cam"} <= set(graph.names)  # `make models` exports them all
    classes = np.array([(i % 8) - 1 for i in range(n)], dtype=np.int64)
    assert_heatmaps_match_reference(graph, head, crops(astronaut_bgr, n), classes)


@pytest.mark.parametrize("n", BATCHES)
def test_gap_dense_graph_heatmaps_match_reference(resnet_like, n):
    model, graph, _ = resnet_like
    head, weights = _dense_head(model)
    assert "cam" in graph.names
    assert_heatmaps_match_reference(graph, head, images(n, 32, 3, seed=50 + n), class_indices(n), weights)


@pytest.mark.parametrize("n", BATCHES)
def test_nonlinear_head_heatmaps_match_reference(nonlinear_head, n):
    model, graph, _ = nonlinear_head
    head, _ = _dense_head(model, hidden="hidden")
    assert_heatmaps_match_reference(graph, head, images(n, 32, 3, seed=60 + n), class_indices(n))


def test_gap_dense_identities(resnet_like):
    """GAP -> Dense: g = W_c / (h w) at every position, so HiResCAM = CAM / (h w) (signed) and
    XGrad-CAM = Grad-CAM = ReLU(CAM) / (h w): the same map up to a positive factor. block_out is
    a ReLU (A >= 0), so LayerCAM = Grad-CAM element-wise."""
    _, graph, info = resnet_like
    out = graph(images(8, 32, 3, seed=7), class_indices(8))
    h, w = info.feature_size
    cam = out["cam"]
    assert np.abs(cam).max() > 1e-2 and (cam < 0).any() and (out["activations"] >= 0).all()
    atol = 1e-5 * np.abs(cam).max() / (h * w)
    for name, want in (("hirescam", cam / (h * w)), ("xgradcam", np.maximum(cam, 0) / (h * w)),
                       ("gradcam", np.maximum(cam, 0) / (h * w))):
        np.testing.assert_allclose(out[name], want, rtol=1e-4, atol=atol, err_msg=name)
        for got, ref in zip(out[name], cam):
            np.testing.assert_allclose(methods.normalize(got, name), methods.normalize(np.maximum(ref, 0), "gradcam"),
                                       atol=1e-4, err_msg=name)
    np.testing.assert_allclose(out["layercam"], out["gradcamelementwise"], rtol=1e-5, atol=atol)


def test_random_map_is_reproducible_across_sessions(resnet_like):
    """Two sessions (two runs) give the same random maps bit for bit; row n's weights do not
    depend on the batch (the maps of a batch of 2 agree on the map's scale: its activations may
    come from other kernel blocking; other weights, U(-1, 1), would change the map at O(1))."""
    import onnxruntime as ort

    _, graph, _ = resnet_like
    image, classes = images(5, 32, 3, seed=8), class_indices(5)
    again = ort.InferenceSession(graph.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    first = graph(image, classes)["random"]
    np.testing.assert_array_equal(again.run(["random"], {"image": image, "class_index": classes})[0], first)
    np.testing.assert_allclose(graph(image[:2], classes[:2])["random"], first[:2], rtol=1e-5,
                               atol=1e-6 * np.abs(first[:2]).max())
