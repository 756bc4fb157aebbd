"""The heatmap method registry (camface.methods): each entry's equations on hand-computed
arrays, in numpy (the reference) and in TensorFlow (the Keras exporter runs the same function),
and the registry driving every command's choices."""

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


BACKENDS = {"numpy": _numpy_ops, "tensorflow": _tensorflow_ops}


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


def test_gradcampp_is_zero_where_gradients_vanish(run):
    a = np.random.default_rng(0).normal(size=(2, 3, 3, 4)).astype(np.float32)
    out = run(methods.get("gradcampp"), a, np.zeros_like(a))
    assert np.isfinite(out).all() and not out.any()


@pytest.mark.parametrize("method, heatmap, expected", [
    ("gradcam", [[-1.0, 0.0], [2.0, 4.0]], [[0.0, 0.0], [0.5, 1.0]]),  # ReLU, / max
    ("cam", [[-1.0, 0.0], [1.0, 3.0]], [[0.0, 0.25], [0.5, 1.0]]),  # min-max
    ("gradcam", [[-1.0, -2.0]], [[0.0, 0.0]]),  # no positive evidence: all zero
    ("cam", [[2.0, 2.0]], [[0.0, 0.0]]),  # constant
])
def test_normalize_follows_the_entry(method, heatmap, expected):
    before = np.array(heatmap, np.float32)
    out = methods.normalize(before, method)
    np.testing.assert_allclose(out, expected)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(before, np.array(heatmap, np.float32))  # input untouched


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(KeyError, match="gradcam, gradcampp, cam"):
        methods.get("nope")


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
    assert list(_choices(live_cli.configure)) == [*methods.names(display_only=True), "none"]


def test_registry_drives_the_graph_contract_and_menus(extra_method):
    from camface import graph_spec
    from camface.realtime.window import Controls, apply_key

    assert graph_spec.heatmap_outputs()[-1] == "fakecam"
    info = graph_spec.GraphInfo(labels=("a",), input_size=(4, 4), color_order="GRAY", target_layer="t",
                                heatmaps=("gradcam", "fakecam"))
    assert graph_spec.methods_of(info) == ("gradcam", "fakecam")
    controls, _ = apply_key(Controls(method="gradcam"), ord("m"), graph_spec.methods_of(info), 1)
    assert controls.method == "fakecam"
