"""The export self-check judges a float32 graph against TensorFlow with tolerances widened by
the model's own sensitivity to rounding (camface.export.verify.rounding_sensitivity): a model
that amplifies rounding exports with a warning instead of failing on one CPU and passing on
another, and a well-conditioned model keeps the stated tolerance."""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from camface.export import verify
from camface.export.exporter import ExportOptions, export

AMPLIFY = 1e5  # the target layer subtracts two nearly equal convolutions, times this


def _model(path, ill_conditioned: bool):
    """8x8x1 -> Conv2D "pair" (2 filters) -> Conv2D 1x1 "target" (4) -> GAP -> Dense(3).

    Ill-conditioned: the pair's filters differ by 2**-16 of their values and the target takes
    AMPLIFY x their difference, so rounding in either sum (a few 1e-7 of it) moves the target
    by about a percent of its largest value. Well-conditioned: independent filters, weights
    of order one."""
    import keras

    rng = np.random.default_rng(3)
    inputs = keras.Input((8, 8, 1))
    pair = keras.layers.Conv2D(2, 3, padding="same", use_bias=False, name="pair")
    target = keras.layers.Conv2D(4, 1, use_bias=False, name="target")
    x = target(pair(inputs))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs)
    w = rng.normal(size=(3, 3, 1, 1)).astype(np.float32)
    if ill_conditioned:
        pair.set_weights([np.concatenate([w, w * np.float32(1 + 2.0 ** -16)], axis=3)])
        mix = np.stack([[1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]], axis=1) * AMPLIFY
        target.set_weights([mix.reshape(1, 1, 2, 4).astype(np.float32)])
    else:
        pair.set_weights([rng.normal(size=(3, 3, 1, 2)).astype(np.float32)])
        target.set_weights([rng.normal(size=(1, 1, 2, 4)).astype(np.float32)])
    model.save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify")
    return {name: _model(folder / f"{name}.keras", name == "ill")
            for name in ("ill", "plain")}


def _differences(result):
    return {d.output: d for d in result.differences}


def test_an_ill_conditioned_model_exports_and_is_named(models, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    result = export(models["ill"], tmp_path / "ill.onnx", ExportOptions())
    activations = _differences(result)["activations"]
    stated = activations.allowed - activations.sensitivity
    # the self-check measured the amplification: far above the stated tolerance, and it passed
    assert activations.ok and activations.sensitivity > 5 * stated, activations
    assert activations.cause.startswith("weights moved")
    warned = [r.getMessage() for r in caplog.records if "ill-conditioned" in r.getMessage()]
    assert any(m.startswith("activations at target is ill-conditioned: rounding inside the model")
               for m in warned), warned


def test_a_well_conditioned_model_keeps_the_stated_tolerance(models, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    result = export(models["plain"], tmp_path / "plain.onnx", ExportOptions())
    differences = _differences(result)
    assert {"probs", "activations", "gradcam"} <= set(differences)
    for difference in differences.values():
        if difference.cause.startswith("weights moved"):
            # rounding moves these outputs by far less than the stated tolerance
            assert difference.sensitivity < 0.05 * (difference.allowed - difference.sensitivity), difference
    assert not [r for r in caplog.records if "ill-conditioned" in r.getMessage()]


def test_rounding_sensitivity_restores_the_weights_and_moves_each_by_ulps():
    import tensorflow as tf

    kernel = tf.Variable(np.linspace(0.5, 2.0, 12, dtype=np.float32).reshape(3, 4))
    steps = tf.Variable(np.array([1, 2], np.int64))  # not a float: left alone
    before = kernel.numpy().copy()
    seen = {}

    def function(images, classes):
        seen["kernel"] = kernel.numpy().copy()
        return {"out": kernel * tf.cast(steps[0], tf.float32)}

    reference = {"out": function(None, None)["out"].numpy()}
    sensitivity = verify.rounding_sensitivity(function, None, None, [kernel, steps], reference)
    moved = seen["kernel"].astype(np.float64) / before - 1.0
    # every weight moved by ROUNDING_STEP of itself (to float32 rounding), up or down
    np.testing.assert_allclose(np.abs(moved), verify.ROUNDING_STEP, rtol=0.6)
    assert (moved > 0).any() and (moved < 0).any()
    np.testing.assert_array_equal(kernel.numpy(), before)
    np.testing.assert_array_equal(steps.numpy(), [1, 2])
    expected = verify.SENSITIVITY_FACTOR * np.abs(seen["kernel"].astype(np.float64) - before).max()
    assert sensitivity["out"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("scale", [1e-7, 1e-4, 1.0, 300.0])
def test_a_wrong_map_fails_and_a_rounded_one_passes_at_any_scale(scale):
    """A heatmap is seen normalised, so its raw scale must not decide the verdict: a map whose
    values all lie below the absolute tolerance (a model with tiny gradients) once passed the
    check whatever the graph returned."""
    rng = np.random.default_rng(0)
    reference = rng.random((2, 4, 4)) * scale
    other = rng.random((2, 4, 4)) * scale  # another map of the same size: a wrong graph
    rounded = reference * (1 + rng.choice([-1, 1], reference.shape) * 2.0 ** -22)
    wrong, = verify.compare({"gradcam": other}, {"gradcam": reference})
    close, = verify.compare({"gradcam": rounded}, {"gradcam": reference})
    assert not wrong.ok, wrong
    assert close.ok, close
    # probabilities (at most 1) keep the stated absolute tolerance's order
    probs, = verify.compare({"probs": np.array([[0.5, 0.5 + 5e-4]])}, {"probs": np.array([[0.5, 0.5]])})
    assert probs.ok, probs


_GRID = np.linspace(-1.0, 1.0, 16).reshape(1, 4, 4)  # a map with both signs, peak 1


@pytest.mark.parametrize("output, got, ok", [
    ("gradcam", 1e-12 * np.abs(_GRID), True),  # ONNX Runtime's rounding where TF gives 0
    ("gradcam", 1e-12 * _GRID, True),
    ("gradcam", 0.0 * _GRID, True),
    ("gradcam", 3e-12 * np.abs(_GRID), False),  # normalises to a map, not to zeros
    ("gradcam", 1e-3 * np.abs(_GRID), False),  # a real map where the reference has none
    ("cam", 4e-13 * _GRID, True),  # min-max: the range, 8e-13, stays within the flat peak
    ("cam", 1e-12 * _GRID, False),  # range 2e-12: shown as a map
    ("cam", 1e-3 * _GRID, False),
    ("activations", 4e-13 * _GRID, True),
    ("activations", 1e-3 * _GRID, False),
])
def test_an_all_zero_reference_allows_only_differences_no_one_sees(output, got, ok):
    """Where TensorFlow's output is all zero, the relative tolerance is zero (and often the
    rounding sensitivity too): a graph returning 1e-12 there failed the export. The tolerance's
    floor passes exactly the maps that `methods.normalize` shows as zeros, as it shows the
    reference, and fails a real map."""
    from camface import methods

    reference = np.zeros_like(got)
    difference, = verify.compare({output: got}, {output: reference})
    assert difference.ok is ok, difference
    if output in methods.METHODS:  # the verdict is what a user sees: the normalised maps agree
        same = np.array_equal(methods.normalize(got[0], output), methods.normalize(reference[0], output))
        assert same is ok
