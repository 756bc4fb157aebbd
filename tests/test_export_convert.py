"""The converter fixes for in-graph gradients with a dynamic batch (export/convert.py and
graph.safe_global_*_pool): each gradient op alone, ONNX Runtime vs TensorFlow at N = 1 and 3."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest


def _gradient_function(forward, x_shape, y_shape):
    """tf.function (x, upstream) -> {"y": forward(x), "dx": d<forward(x), upstream>/dx}."""
    import tensorflow as tf

    signature = [tf.TensorSpec([None, *x_shape], tf.float32, name="x"),
                 tf.TensorSpec([None, *y_shape], tf.float32, name="upstream")]

    @tf.function(input_signature=signature, autograph=False)
    def function(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward(x)
        return {"y": tf.identity(y), "dx": tape.gradient(y, x, output_gradients=upstream)}

    return function


def _check(forward, x_shape, y_shape, seed=0):
    import onnxruntime as ort

    from camface.export import convert

    function = _gradient_function(forward, x_shape, y_shape)
    proto = convert.to_onnx(function)
    ops = {node.op_type for node in proto.graph.node}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    for n in (1, 3):
        x = rng.normal(size=(n, *x_shape)).astype(np.float32)
        upstream = rng.normal(size=(n, *y_shape)).astype(np.float32)
        want = {k: v.numpy() for k, v in function(x, upstream).items()}
        got = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"x": x, "upstream": upstream})))
        assert np.abs(want["dx"]).max() > 1e-3
        for name in ("y", "dx"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    return ops


@pytest.mark.parametrize("padding, y_side", [("SAME", 5), ("VALID", 4)])
def test_max_pool_gradient(padding, y_side):
    """Overlapping 3x3/2 windows: an input that is the max of two windows gets both gradients."""
    import tensorflow as tf

    ops = _check(lambda x: tf.nn.max_pool2d(x, 3, 2, padding), (9, 9, 2), (y_side, y_side, 2))
    assert "ScatterElements" in ops


@pytest.mark.parametrize("stride, padding, y_side", [(1, "SAME", 7), (2, "SAME", 4), (2, "VALID", 3)])
def test_depthwise_conv_gradient(stride, padding, y_side):
    import tensorflow as tf

    # numpy, made a constant inside the function (a captured eager tensor would become an input)
    kernel = np.random.default_rng(1).normal(size=(3, 3, 2, 2)).astype(np.float32)
    ops = _check(lambda x: tf.nn.depthwise_conv2d(x, tf.constant(kernel), [1, stride, stride, 1], padding),
                 (7, 7, 2), (y_side, y_side, 4))
    assert "ConvTranspose" in ops


def test_conv_gradient_uses_shape_n():
    import tensorflow as tf

    kernel = np.random.default_rng(2).normal(size=(3, 3, 2, 4)).astype(np.float32)
    _check(lambda x: tf.nn.conv2d(x, tf.constant(kernel), 2, "SAME"), (8, 8, 2), (4, 4, 4))


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_relu_gradients(activation):
    import tensorflow as tf

    function = getattr(tf.nn, activation)
    _check(lambda x: function(4 * x), (3, 3, 2), (3, 3, 2))


def test_broadcast_add_gradient():
    """x + per-crop mean: Add of [N, h, w, C] and [N, 1, 1, C] needs BroadcastGradientArgs."""
    import tensorflow as tf

    def forward(x):
        bias = tf.reduce_max(x, axis=[1, 2], keepdims=True)
        return (x + tf.stop_gradient(bias)) * tf.stop_gradient(bias)

    _check(forward, (4, 4, 3), (4, 4, 3))


@pytest.mark.parametrize("pool", ["average", "max"])
def test_safe_global_pooling_gradient(pool):
    """Same values and gradients as TensorFlow's own reductions, and convertible."""
    import tensorflow as tf

    from camface.export import graph

    safe = graph.safe_global_average_pool if pool == "average" else graph.safe_global_max_pool
    plain = (lambda x: tf.reduce_mean(x, [1, 2])) if pool == "average" else \
        (lambda x: tf.reduce_max(x, [1, 2]))
    x = tf.constant(np.random.default_rng(3).normal(size=(2, 3, 4, 5)).astype(np.float32))
    upstream = tf.constant(np.random.default_rng(4).normal(size=(2, 5)).astype(np.float32))
    results = []
    for function in (safe, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = function(x)
        results.append((y.numpy(), tape.gradient(y, x, output_gradients=upstream).numpy()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6, atol=1e-7)
    _check(safe, (3, 4, 5), (5,))


def test_float16_round_trips_are_dropped():
    """Two float32 nodes joined by the converter's Cast(float16) -> Cast(float32) read each
    other directly afterwards (no float16 rounding), also where the Cast has several readers
    or writes a graph output."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from camface.export import convert

    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Cast", ["r"], ["r16"], to=TensorProto.FLOAT16, name="to16"),
        helper.make_node("Cast", ["r16"], ["a"], to=TensorProto.FLOAT, name="back_a"),
        helper.make_node("Cast", ["r16"], ["b"], to=TensorProto.FLOAT, name="back_b"),
        helper.make_node("Neg", ["a"], ["neg"], name="neg"),
        helper.make_node("Abs", ["b"], ["abs"], name="abs"),
        helper.make_node("Identity", ["r"], ["i"], name="identity"),
        helper.make_node("Cast", ["i"], ["out"], to=TensorProto.FLOAT16, name="out16"),
    ]
    value = lambda name, kind: helper.make_tensor_value_info(name, kind, [2])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT)],
                              [value("neg", TensorProto.FLOAT), value("abs", TensorProto.FLOAT),
                               value("out", TensorProto.FLOAT16)])
    model = convert.drop_float16_round_trips(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    onnx.checker.check_model(model)
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert all(n.attribute[0].i == TensorProto.FLOAT for n in casts)
    assert model.graph.output[2].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.array([1.0001, 3.14159265], np.float32)  # not representable in float16
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    neg, absolute, out = session.run(None, {"x": x})
    np.testing.assert_array_equal(neg, -x)
    np.testing.assert_array_equal(absolute, x)
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("op, forward", [
    ("SigmoidGrad", lambda tf, x: tf.sigmoid(2 * x)),
    ("TanhGrad", lambda tf, x: tf.tanh(2 * x)),
    ("LeakyReluGrad", lambda tf, x: tf.nn.leaky_relu(3 * x, alpha=0.3)),
    ("EluGrad", lambda tf, x: tf.nn.elu(3 * x)),
    ("SeluGrad", lambda tf, x: tf.nn.selu(3 * x)),
])
def test_activation_gradients_equal_tensorflows(op, forward):
    """Each activation's gradient op (in TensorFlow's backward pass, so in the graph) converts and
    gives TensorFlow's gradient, on both sides of 0."""
    import tensorflow as tf

    function = _gradient_function(lambda x: forward(tf, x), (3, 3, 2), (3, 3, 2))
    graph = function.get_concrete_function().graph.as_graph_def()
    assert op in {node.op for node in graph.node}
    _check(lambda x: forward(tf, x), (3, 3, 2), (3, 3, 2))


@pytest.mark.parametrize("op, forward", [
    ("SigmoidGrad", lambda tf, x: tf.sigmoid(x)),
    ("TanhGrad", lambda tf, x: tf.tanh(x)),
    ("LeakyReluGrad", lambda tf, x: tf.nn.leaky_relu(x, alpha=0.3)),
    ("EluGrad", lambda tf, x: tf.nn.elu(x)),
    ("SeluGrad", lambda tf, x: tf.nn.selu(x)),
])
def test_activation_gradients_at_zero_equal_tensorflows(op, forward):
    """At an input of exactly 0 (a ReLU'd feature map is 0 over whole regions, so a head's input
    often is) each gradient takes TensorFlow's branch: SELU's slope there is its scale (TF tests
    activations < 0), not scale * alpha."""
    import onnxruntime as ort
    import tensorflow as tf

    from camface.export import convert

    function = _gradient_function(lambda x: forward(tf, x), (2, 2, 1), (2, 2, 1))
    assert op in {node.op for node in function.get_concrete_function().graph.as_graph_def().node}
    session = ort.InferenceSession(convert.to_onnx(function).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[[[0.0], [0.0]], [[-1.5], [2.0]]]], np.float32)
    upstream = np.array([[[[1.0], [-2.0]], [[0.5], [3.0]]]], np.float32)
    want = function(x, upstream)["dx"].numpy()
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x, "upstream": upstream})))
    np.testing.assert_allclose(got["dx"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op, size, align, half", [
    ("ResizeBilinear", (8, 10), False, True),  # tf.image.resize, Keras' UpSampling2D
    ("ResizeBilinear", (7, 7), True, False),  # align_corners (TF1 code)
    ("ResizeBilinear", (3, 2), False, False),  # down, legacy asymmetric
    ("ResizeBicubic", (9, 6), False, True),
])
def test_resize_gradients_equal_tensorflows(op, size, align, half):
    """ResizeBilinearGrad / ResizeBicubicGrad (an upsampling after the target) had no conversion
    ("has no ONNX conversion"): A_h^T g A_w gives TensorFlow's gradient, up and down."""
    import tensorflow as tf

    def forward(x):
        return getattr(tf.raw_ops, op)(images=x, size=list(size), align_corners=align,
                                       half_pixel_centers=half)

    function = _gradient_function(forward, (4, 5, 2), (*size, 2))
    assert f"{op}Grad" in {node.op for node in function.get_concrete_function().graph.as_graph_def().node}
    assert "MatMul" in _check(forward, (4, 5, 2), (*size, 2))
