"""Guided Backprop (arXiv:1412.6806) on tiny hand-built models, against numpy by hand.

Model under test: x [4] -> Dense(4) + ReLU in one of its Keras forms -> Dense(2) logits -> softmax.
With h = x W1 + b1 and the guided rule at the ReLU, d logit_c / d x is

    W1 @ (relu'(h) * max(W2[:, c], 0))      guided
    W1 @ (relu'(h) * W2[:, c])              plain
with relu'(h) = 1 on 0 < h (< 6 for ReLU6), else 0.
"""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from camface.guided.backprop import GuidedBackprop, guided_copy, guided_relu_backward  # noqa: E402

X = np.array([[2.0, -1.0, 7.0, 0.5],
              [-0.5, 3.0, 5.5, 6.5]], np.float32)
W2 = np.array([[1.0, -1.0],
               [1.0, 2.0],
               [1.0, 0.5],
               [-1.0, 1.0]], np.float32)
B2 = np.array([0.1, -0.2], np.float32)


def relu_forms():
    """(name, layers after the Dense, Dense activation, ReLU max value)."""
    return [
        ("activation=relu", [], "relu", None),
        ("Activation(relu)", [keras.layers.Activation("relu")], None, None),
        ("layers.ReLU", [keras.layers.ReLU()], None, None),
        ("layers.ReLU(max_value=6)", [keras.layers.ReLU(max_value=6.0)], None, 6.0),
        ("activation=relu6", [], "relu6", 6.0),
    ]


def tiny_model(w1, b1, after, activation, name="tiny"):
    inputs = keras.Input((4,))
    dense1 = keras.layers.Dense(4, activation=activation, name="hidden")
    x = dense1(inputs)
    for layer in after:
        x = layer(x)
    dense2 = keras.layers.Dense(2, name="logits")
    logits = dense2(x)
    outputs = keras.layers.Activation("softmax", name="predictions")(logits)
    dense1.set_weights([w1, b1])
    dense2.set_weights([W2, B2])
    return keras.Model(inputs, outputs, name=name), keras.Model(inputs, logits, name=f"{name}_logits")


def hand_gradient(x, w1, b1, c, max_value, guided):
    h = x @ w1 + b1
    derivative = (h > 0) & ((h < max_value) if max_value is not None else True)
    upstream = np.maximum(W2[:, c], 0) if guided else W2[:, c]
    return (derivative * upstream) @ w1.T


@pytest.mark.parametrize("form", relu_forms(), ids=lambda f: f[0])
@pytest.mark.parametrize("c", [0, 1])
def test_guided_backprop_equals_hand_computed(form, c):
    name, after, activation, max_value = form
    rng = np.random.default_rng(7)
    w1 = rng.normal(size=(4, 4)).astype(np.float32) * 2
    b1 = rng.normal(size=4).astype(np.float32)
    _, logits = tiny_model(w1, b1, after, activation)
    backprop = GuidedBackprop(logits)
    assert backprop.guided and backprop.label == "Guided Backprop"
    got = backprop.gradients(X, np.array([c, c]))
    expected = hand_gradient(X, w1, b1, c, max_value, guided=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", relu_forms(), ids=lambda f: f[0])
def test_guided_differs_from_plain_exactly_where_it_should(form):
    """W1 = identity: the input gradient is the hidden units' gradient. Guided and plain differ
    exactly at units that are active (0 < h, < 6 for ReLU6) and get a negative gradient."""
    name, after, activation, max_value = form
    eye, zero = np.eye(4, dtype=np.float32), np.zeros(4, np.float32)
    model, logits = tiny_model(eye, zero, after, activation)
    c = 0  # W2[:, 0] = [1, 1, 1, -1]: only unit 3 gets a negative gradient
    guided = GuidedBackprop(logits).gradients(X, np.array([c, c]))
    plain = hand_gradient(X, eye, zero, c, max_value, guided=False)
    active = (X > 0) & ((X < max_value) if max_value is not None else True)
    should_differ = active & (W2[:, c] < 0)
    # Unit 3 is active in both rows (0.5, and 6.5 only without the ReLU6 cap).
    assert should_differ[0, 3] and should_differ[1, 3] == (max_value is None)
    np.testing.assert_array_equal(~np.isclose(guided, plain), should_differ)
    np.testing.assert_allclose(guided[should_differ], 0.0)
    # ReLU6 cuts unit 2 (h = 7) in row 0: no gradient there, guided or not.
    if max_value is not None:
        assert guided[0, 2] == 0.0 and plain[0, 2] == 0.0
    else:
        assert guided[0, 2] == 1.0


def test_original_model_is_untouched():
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(4, 4)).astype(np.float32)
    b1 = rng.normal(size=4).astype(np.float32)
    _, logits = tiny_model(w1, b1, [keras.layers.ReLU()], None)
    copy = guided_copy(logits)
    assert len(copy.relus) == 1
    assert copy.model is not logits
    # Same forward values, and the original still backpropagates plainly.
    np.testing.assert_allclose(copy.model.predict(X, verbose=0), logits.predict(X, verbose=0),
                               rtol=1e-6)
    import tensorflow as tf

    @tf.function
    def plain_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            target = tf.reduce_sum(logits(x)[:, 0])
        return tape.gradient(target, x)

    np.testing.assert_allclose(plain_gradient(tf.constant(X)).numpy(),
                               hand_gradient(X, w1, b1, 0, None, guided=False), rtol=1e-5, atol=1e-6)


def test_nested_backbone_is_guided_too():
    """A backbone used as one layer (Keras' transfer-learning pattern) is copied recursively."""
    rng = np.random.default_rng(5)
    w1 = rng.normal(size=(4, 4)).astype(np.float32)
    b1 = rng.normal(size=4).astype(np.float32)
    inner_in = keras.Input((4,))
    dense1 = keras.layers.Dense(4, activation="relu", name="hidden")
    backbone = keras.Model(inner_in, dense1(inner_in), name="backbone")
    dense1.set_weights([w1, b1])
    inputs = keras.Input((4,))
    head = keras.layers.Dense(2, name="logits")
    logits = keras.Model(inputs, head(backbone(inputs)))
    head.set_weights([W2, B2])
    backprop = GuidedBackprop(logits)
    assert backprop.relus == ("hidden",)
    np.testing.assert_allclose(backprop.gradients(X, np.array([1, 0])),
                               np.stack([hand_gradient(X, w1, b1, 1, None, True)[0],
                                         hand_gradient(X, w1, b1, 0, None, True)[1]]),
                               rtol=1e-5, atol=1e-5)


def test_sequential_model_with_relu6():
    rng = np.random.default_rng(11)
    w1 = rng.normal(size=(4, 4)).astype(np.float32) * 3
    b1 = rng.normal(size=4).astype(np.float32)
    dense1, dense2 = keras.layers.Dense(4), keras.layers.Dense(2)
    model = keras.Sequential([keras.Input((4,)), dense1, keras.layers.ReLU(max_value=6.0), dense2])
    dense1.set_weights([w1, b1])
    dense2.set_weights([W2, B2])
    got = GuidedBackprop(model).gradients(X, np.array([1, 1]))
    np.testing.assert_allclose(got, hand_gradient(X, w1, b1, 1, 6.0, True), rtol=1e-5, atol=1e-5)


def test_model_without_relu_falls_back_to_plain_gradient(caplog):
    rng = np.random.default_rng(9)
    w1 = rng.normal(size=(4, 4)).astype(np.float32)
    b1 = rng.normal(size=4).astype(np.float32)
    _, logits = tiny_model(w1, b1, [], "swish")
    with caplog.at_level(logging.WARNING):
        backprop = GuidedBackprop(logits)
    assert not backprop.guided
    assert backprop.label == "Gradient (no ReLU)"
    assert "no ReLU" in caplog.text and "silu" in caplog.text  # Keras 3 names swish silu
    h = X @ w1 + b1
    s = 1 / (1 + np.exp(-h))
    swish_derivative = s + h * s * (1 - s)
    expected = (swish_derivative * W2[:, 1]) @ w1.T
    np.testing.assert_allclose(backprop.gradients(X, np.array([1, 1])), expected, rtol=1e-4,
                               atol=1e-5)


def test_numpy_reference_rule():
    x = np.array([-1.0, 0.5, 3.0, 7.0])
    up = np.array([2.0, -1.0, 4.0, 5.0])
    np.testing.assert_array_equal(guided_relu_backward(x, up), [0.0, 0.0, 4.0, 5.0])
    np.testing.assert_array_equal(guided_relu_backward(x, up, max_value=6.0), [0.0, 0.0, 4.0, 0.0])


@pytest.mark.parametrize("name, after, activation, slope", [
    ("layers.ReLU(negative_slope=0.1)", lambda: [keras.layers.ReLU(negative_slope=0.1)], None, 0.1),
    ("layers.LeakyReLU(0.1)", lambda: [keras.layers.LeakyReLU(negative_slope=0.1)], None, 0.1),
    ("Activation(leaky_relu)", lambda: [keras.layers.Activation("leaky_relu")], None, 0.2),
    ("activation=leaky_relu", lambda: [], "leaky_relu", 0.2),
], ids=["ReLU-negative-slope", "LeakyReLU", "Activation-leaky_relu", "activation-leaky_relu"])
def test_a_leaky_relu_gets_the_same_rule_however_it_is_spelt(name, after, activation, slope):
    """The guided rule at a leaky ReLU: f'(h) * max(upstream, 0), f'(h) = slope below 0.
    W1 = identity, so the input gradient is the hidden units' gradient, by hand."""
    eye, zero = np.eye(4, dtype=np.float32), np.zeros(4, np.float32)
    _, logits = tiny_model(eye, zero, after(), activation)
    backprop = GuidedBackprop(logits)
    assert backprop.guided and backprop.relus and backprop.other_activations == ()
    c = 0  # W2[:, 0] = [1, 1, 1, -1]: unit 3's negative gradient is cut, guided
    got = backprop.gradients(X, np.array([c, c]))
    expected = np.where(X > 0, 1.0, slope) * np.maximum(W2[:, c], 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert (got[:, 3] == 0).all() and np.isclose(got[0, 1], slope)  # x = -1 in row 0: the leak


def test_activations_left_plain_in_a_guided_model_are_named(caplog):
    """ReLU then ELU: the ReLU is guided, the ELU has no guided rule; the warning says so
    instead of a figure titled Guided Backprop that is half plain gradient."""
    rng = np.random.default_rng(4)
    w1 = rng.normal(size=(4, 4)).astype(np.float32)
    b1 = rng.normal(size=4).astype(np.float32)
    _, logits = tiny_model(w1, b1, [keras.layers.ELU()], "relu")
    with caplog.at_level(logging.WARNING):
        backprop = GuidedBackprop(logits)
    assert backprop.guided and backprop.relus == ("hidden",) and backprop.other_activations == ("ELU",)
    assert "other activations (ELU) pass plain gradients" in caplog.text
