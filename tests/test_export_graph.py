"""CAM graphs of small random models: ONNX Runtime vs an independent TensorFlow reference.

The reference here shares no code with camface.export: the head after the target layer is written
out by hand (or taken from Keras), the gradient comes from tf.GradientTape with TensorFlow's own
gradients, and the heatmaps are numpy transcriptions of the papers' equations.
"""

import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # eager conv gradients segfault in oneDNN here

import numpy as np
import pytest

from camface import methods

BATCHES = (1, 3, 32)
NUM_CLASSES = 5


# ---- independent reference -------------------------------------------------------------------

def reference_gradcam(activations, gradients):
    """Grad-CAM, arXiv:1610.02391 eq. 1 (alpha = spatial mean of gradients) and eq. 2."""
    alpha = gradients.mean(axis=(1, 2))  # [N, K]
    return np.maximum(np.einsum("nhwk,nk->nhw", activations, alpha), 0)


def reference_gradcampp(activations, gradients):
    """Grad-CAM++, arXiv:1710.11063 eq. 19 for Y = exp(S): alpha = g^2 / (2 g^2 + S+ g^3),
    w = sum_ij alpha relu(g) (exp(S) left out), map = relu(sum_k w A); S+ = max(sum_ab A, 0),
    camface's choice where activations sum negative (camface/methods.py)."""
    g2, g3 = gradients ** 2, gradients ** 3
    denominator = 2 * g2 + np.maximum(activations.sum(axis=(1, 2), keepdims=True), 0) * g3
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(denominator != 0, g2 / denominator, 0.0)
    weights = (alpha * np.maximum(gradients, 0)).sum(axis=(1, 2))  # [N, K]
    return np.maximum(np.einsum("nhwk,nk->nhw", activations, weights), 0)


def reference_cam(activations, class_weights, classes):
    """CAM, arXiv:1512.04150 eq. 2: M_c(x, y) = sum_k w_k^c f_k(x, y)."""
    return np.einsum("nhwk,kn->nhw", activations, class_weights[:, classes])


def tape_reference(features, head, x, class_index, class_weights=None):
    """Outputs of a CAM graph computed with tf.GradientTape (inside tf.function, as eager conv
    gradients crash oneDNN on this CPU). features: x -> A; head: A -> logits (pre-softmax)."""
    import tensorflow as tf

    @tf.function
    def run(x, picked_class):
        activations = features(x)
        with tf.GradientTape() as tape:
            tape.watch(activations)
            logits = head(activations)
            chosen = tf.where(picked_class < 0, tf.argmax(logits, -1), picked_class)
            picked = tf.gather(logits, chosen, batch_dims=1)
        return tf.nn.softmax(logits), activations, tape.gradient(picked, activations), chosen

    probs, activations, gradients, chosen = (t.numpy() for t in run(
        tf.constant(x, tf.float32), tf.constant(class_index, tf.int64)))
    out = {"probs": probs, "activations": activations,
           "gradcam": reference_gradcam(activations, gradients),
           "gradcampp": reference_gradcampp(activations, gradients)}
    if class_weights is not None:
        out["cam"] = reference_cam(activations, class_weights, chosen)
    return out


def assert_outputs_close(got, want, rtol=1e-4, names=None):
    """Every output within rtol of the reference's largest magnitude (plus 1e-6)."""
    for name in names or want:
        scale = float(np.abs(want[name]).max())
        assert scale > 1e-3, f"{name}: reference is ~0, test is vacuous"
        tolerance = 1e-6 + rtol * scale
        diff = float(np.abs(got[name] - want[name]).max())
        assert diff <= tolerance, f"{name}: max |onnx - tf| = {diff:.3g} > {tolerance:.3g}"


def class_indices(n, num_classes=NUM_CLASSES):
    """-1 (predicted) and explicit classes, cycling."""
    return np.array([(i % (num_classes + 1)) - 1 for i in range(n)], dtype=np.int64)


def images(n, size, channels, seed=0):
    from camface.export.verify import sample_batch

    return sample_batch((size, size), channels, NUM_CLASSES, batch=n, seed=seed)[0]


# ONNX Runtime settings the numerics must not depend on: graph optimisations on and off (fused
# and reordered kernels), 1 and 2 intra-op threads (split reductions). Other CPUs round as
# differently as these settings do (the suite once failed on an AVX-512 machine).
ORT_SETTINGS = {"optimised-1": (True, 1), "unoptimised-1": (False, 1),
                "optimised-2": (True, 2), "unoptimised-2": (False, 2)}


def ort_session(model_bytes: bytes, optimised: bool = True, threads: int = 0, outputs=None):
    """An ONNX Runtime CPU session with graph optimisations on or off and `threads` intra-op
    threads (0: ONNX Runtime's default); of the graph pruned to `outputs` (names) when given, as
    the live loop prunes it (ONNX Runtime runs every node of a graph whatever is fetched, and a
    CAM graph's Score-CAM and Ablation-CAM run the model again K times a crop)."""
    import onnxruntime as ort

    if outputs is not None:
        from camface.realtime.graph import prune

        model_bytes = prune(model_bytes, tuple(outputs))

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimised
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def ulp_perturbed(x, seed: int, ulps: int = 4) -> np.ndarray:
    """float32 x with every element moved by a seeded whole number of units in the last place,
    at most `ulps` either way (x * (1 + k 2^-23), |k| <= ulps): how another CPU's rounding moves
    a computed tensor."""
    steps = np.random.default_rng(seed).integers(-ulps, ulps + 1, np.shape(x))
    return (np.asarray(x, np.float32) * (1 + steps * np.float32(2.0 ** -23))).astype(np.float32)


class Graph:
    """An exported CAM graph held in memory, run on ONNX Runtime (settings: `ort_session`)."""

    def __init__(self, model_proto, optimised: bool = True, threads: int = 0):
        self.proto = model_proto
        self.session = ort_session(model_proto.SerializeToString(), optimised, threads)
        self.names = [o.name for o in self.session.get_outputs()]
        self.metadata = {p.key: p.value for p in model_proto.metadata_props}

    def with_settings(self, setting: str) -> "Graph":
        """The same graph in a session with one of ORT_SETTINGS."""
        return Graph(self.proto, *ORT_SETTINGS[setting])

    def __call__(self, image, class_index):
        values = self.session.run(None, {"image": image, "class_index": class_index})
        return dict(zip(self.names, values))


def export_in_memory(model, **options):
    """(Graph, GraphInfo) via the exporter's build + convert, without files."""
    from camface.export import convert, exporter, onnx_rerun

    function, info = exporter.build(model, exporter.ExportOptions(**options))
    proto = convert.to_onnx(function)
    proto, info, _ = onnx_rerun.attach(proto, info, methods.names())  # as exporter.export
    convert.set_metadata(proto, info.to_metadata())
    return Graph(proto), info


# ---- small models with the builders' head shapes ----------------------------------------------

def _randomise_batch_norm(model, seed=1):
    """Random BN statistics, so that random nets do not collapse to ~0 activations."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers() if hasattr(model, "_flatten_layers") else model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = (w.shape for w in layer.get_weights())
            layer.set_weights([rng.uniform(0.5, 1.5, gamma), rng.normal(0, 0.2, beta),
                               rng.normal(0, 0.2, mean), rng.uniform(0.5, 1.5, var)])


def tiny_residual_base(size=32, name="base"):
    """ResNet-shaped: conv stem, one residual block (conv-BN-ReLU-conv-BN + add), ReLU out."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stem")(inputs)
    y = layers.Conv2D(8, 3, padding="same", name="conv_a")(x)
    y = layers.BatchNormalization(name="bn_a")(y)
    y = layers.Activation("relu", name="relu_a")(y)
    y = layers.Conv2D(8, 3, padding="same", name="conv_b")(y)
    y = layers.BatchNormalization(name="bn_b")(y)
    x = layers.Add(name="add")([x, y])
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool")(x)
    x = layers.Activation("relu", name="block_out")(x)
    return keras.Model(inputs, x, name=name)


def tiny_vgg_base(size=32, name="vgg"):
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    return keras.Model(inputs, x, name=name)


@pytest.fixture(scope="module")
def resnet_like():
    """Flat ResNet-GAP shape (builders.resnet50_gap's head): base -> GAP -> Dense(softmax)."""
    import keras

    from camface.models.builders import _with_head

    keras.utils.set_random_seed(0)
    model = _with_head(tiny_residual_base(), NUM_CLASSES, nested=False, name="resnet_like")
    _randomise_batch_norm(model)
    graph, info = export_in_memory(model, preset="imagenet-caffe")
    return model, graph, info


@pytest.fixture(scope="module")
def vgg_like_nested():
    """VGG16-conv-GAP shape with the base nested as one layer: base -> Conv2D(relu) -> GAP -> Dense."""
    import keras
    from keras import layers

    from camface.models.builders import _with_head

    keras.utils.set_random_seed(1)
    extra = layers.Conv2D(16, 3, padding="same", activation="relu", name="cam_conv")
    model = _with_head(tiny_vgg_base(), NUM_CLASSES, nested=True, name="vgg_like", extra=extra)
    graph, info = export_in_memory(model, preset="tf")
    return model, graph, info


@pytest.fixture(scope="module")
def resnet_like_nested():
    """The residual base nested as one layer; target inside it, before its residual block, so
    the differentiated head runs through the rest of the nested base (conv, BN, ReLU, add,
    max pool) and then the outer GAP -> Dense."""
    import keras

    from camface.models.builders import _with_head

    keras.utils.set_random_seed(2)
    model = _with_head(tiny_residual_base(name="backbone"), NUM_CLASSES, nested=True,
                       name="resnet_nested")
    _randomise_batch_norm(model.get_layer("backbone"))
    default = export_in_memory(model, preset="unit")
    inner = export_in_memory(model, preset="unit", target_layer="backbone/stem")
    return model, default, inner


@pytest.fixture(scope="module")
def mobilenet():
    """The real builders.mobilenetv2_gap at width 0.35 and 32x32, random weights."""
    import keras

    from camface.models.builders import mobilenetv2_gap

    keras.utils.set_random_seed(3)
    model = mobilenetv2_gap(NUM_CLASSES, input_size=32, weights=None, alpha=0.35)
    _randomise_batch_norm(model)
    graph, info = export_in_memory(model, preset="tf")
    return model, graph, info


@pytest.fixture(scope="module")
def nonlinear_head():
    """The study's earlier head: GAP -> Dense(512, relu) -> Dense(softmax). No CAM."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(4)
    base = tiny_vgg_base(name="vgg_flat")
    x = layers.GlobalAveragePooling2D(name="gap")(base.output)
    x = layers.Dense(512, activation="relu", name="hidden")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)
    model = keras.Model(base.input, outputs)
    graph, info = export_in_memory(model, preset="unit")
    return model, graph, info


def _dense_head(model, dense_name="predictions", hidden=None):
    """Hand-written head: GAP (mean) [-> relu(Dense hidden)] -> Dense linear part."""
    import tensorflow as tf

    dense = model.get_layer(dense_name)

    def head(a):
        x = tf.reduce_mean(a, axis=[1, 2])
        if hidden is not None:
            layer = model.get_layer(hidden)
            x = tf.nn.relu(tf.matmul(x, layer.kernel) + layer.bias)
        return tf.matmul(x, dense.kernel) + dense.bias

    return head, np.asarray(dense.kernel)


def _normalised(x, scale, offset):
    return x.astype(np.float32) * np.float32(scale) + np.float32(offset)


@pytest.mark.parametrize("n", BATCHES)
def test_resnet_like_matches_tape_reference(resnet_like, n):
    import keras

    model, graph, info = resnet_like
    assert info.target_layer == "block_out" and info.heatmaps == methods.names()
    features = keras.Model(model.input, model.get_layer("block_out").output)
    head, weights = _dense_head(model)
    image = images(n, 32, 3, seed=n)
    classes = class_indices(n)
    caffe_mean = np.array([103.939, 116.779, 123.68], np.float32)
    want = tape_reference(features, head, image.astype(np.float32) - caffe_mean, classes, weights)
    assert_outputs_close(graph(image, classes), want)


@pytest.mark.parametrize("n", BATCHES)
def test_nested_vgg_like_matches_tape_reference(vgg_like_nested, n):
    import keras

    model, graph, info = vgg_like_nested
    assert info.target_layer == "cam_conv"
    base_out = model.get_layer("vgg")(model.input)
    features = keras.Model(model.input, model.get_layer("cam_conv")(base_out))
    head, weights = _dense_head(model)
    image = images(n, 32, 3, seed=10 + n)
    classes = class_indices(n)
    want = tape_reference(features, head, _normalised(image, 1 / 127.5, -1), classes, weights)
    assert_outputs_close(graph(image, classes), want)


@pytest.mark.parametrize("n", BATCHES)
def test_target_inside_nested_backbone(resnet_like_nested, n):
    import keras

    model, (default_graph, default_info), (inner_graph, inner_info) = resnet_like_nested
    base = model.get_layer("backbone")
    assert default_info.target_layer == "backbone/block_out"
    assert default_info.heatmaps == methods.names()
    assert inner_info.target_layer == "backbone/stem" and inner_info.feature_size == (16, 16)
    assert "cam" not in inner_info.heatmaps and "stem" in inner_info.cam_unavailable_reason
    image = images(n, 32, 3, seed=20 + n)
    x = _normalised(image, 1 / 255, 0)
    classes = class_indices(n)
    dense_head, weights = _dense_head(model)

    block_out = keras.Model(base.input, base.get_layer("block_out").output)
    want = tape_reference(block_out, dense_head, x, classes, weights)
    assert_outputs_close(default_graph(image, classes), want)

    stem = keras.Model(base.input, base.get_layer("stem").output)
    rest = keras.Model(base.get_layer("stem").output, base.output)

    def head(a):
        return dense_head(rest(a, training=False))

    want = tape_reference(stem, head, x, classes)
    assert_outputs_close(inner_graph(image, classes), want)


@pytest.mark.parametrize("n", BATCHES)
def test_mobilenetv2_builder_matches_tape_reference(mobilenet, n):
    import keras

    model, graph, info = mobilenet
    assert info.target_layer == "out_relu" and info.color_order == "RGB"
    features = keras.Model(model.input, model.get_layer("out_relu").output)
    head, weights = _dense_head(model)
    image = images(n, 32, 3, seed=30 + n)
    classes = class_indices(n)
    want = tape_reference(features, head, _normalised(image, 1 / 127.5, -1), classes, weights)
    assert_outputs_close(graph(image, classes), want)


@pytest.mark.parametrize("n", BATCHES)
def test_nonlinear_head_has_no_cam_and_matches_reference(nonlinear_head, n):
    import keras

    model, graph, info = nonlinear_head
    assert "cam" not in graph.names and info.heatmaps == tuple(m for m in methods.names() if m != "cam")
    assert "hidden" in info.cam_unavailable_reason
    assert graph.metadata["cam_unavailable_reason"] == info.cam_unavailable_reason
    features = keras.Model(model.input, model.get_layer("pool2").output)
    head, _ = _dense_head(model, hidden="hidden")
    image = images(n, 32, 3, seed=40 + n)
    classes = class_indices(n)
    want = tape_reference(features, head, _normalised(image, 1 / 255, 0), classes)
    assert_outputs_close(graph(image, classes), want)


def test_cam_is_proportional_to_gradcam_for_gap_dense_head(resnet_like):
    """Grad-CAM paper, appendix A: with GAP -> Dense, alpha_k = w_k^c / (h w), so
    Grad-CAM = ReLU(CAM) / (h w) exactly."""
    _, graph, info = resnet_like
    image = images(8, 32, 3, seed=5)
    out = graph(image, class_indices(8))
    h, w = info.feature_size
    assert np.abs(out["cam"]).max() > 1e-2
    np.testing.assert_allclose(out["gradcam"], np.maximum(out["cam"], 0) / (h * w),
                               rtol=1e-4, atol=1e-6 * np.abs(out["cam"]).max())


def test_explicit_class_index_selects_that_class(resnet_like):
    """The same crop explained for every class gives every class's own CAM; -1 = argmax."""
    _, graph, _ = resnet_like
    image = np.repeat(images(1, 32, 3, seed=6), NUM_CLASSES + 1, axis=0)
    classes = np.array([-1] + list(range(NUM_CLASSES)), dtype=np.int64)
    out = graph(image, classes)
    predicted = int(out["probs"][0].argmax())
    np.testing.assert_allclose(out["cam"][0], out["cam"][1 + predicted], rtol=1e-6)
    cams = out["cam"][1:].reshape(NUM_CLASSES, -1)
    assert np.linalg.matrix_rank(cams) > 1, "different classes should give different maps"
    np.testing.assert_allclose(out["probs"], np.repeat(out["probs"][:1], NUM_CLASSES + 1, 0),
                               rtol=1e-6)


def test_metadata_follows_graph_spec(resnet_like):
    from camface import graph_spec

    _, graph, info = resnet_like
    assert graph_spec.GraphInfo.from_metadata(graph.metadata) == info
    assert graph.metadata["channels"] == "3" and graph.metadata["color_order"] == "BGR"
    assert [i.name for i in graph.session.get_inputs()] == ["image", "class_index"]
    assert graph.session.get_inputs()[0].type == "tensor(uint8)"
    assert set(graph.names) == {"probs", "activations", *methods.names()}


# ---- the heatmap maths on hand-computed arrays: tests/test_methods.py (numpy and TensorFlow)




def _softmax_then(tail: str, activation: str):
    """conv -> GAP -> Dense(`activation`) (or Dense -> Activation(`activation`)) -> `tail`: layers
    that are the identity at inference after the model's probabilities."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if activation == "separate softmax":
        x = layers.Activation("softmax", name="probs_act")(layers.Dense(NUM_CLASSES, name="dense")(x))
    else:
        x = layers.Dense(NUM_CLASSES, activation=activation, name="dense")(x)
    tails = {"dropout": lambda: [layers.Dropout(0.5)], "flatten": lambda: [layers.Flatten()],
             "identity": lambda: [layers.Identity()], "reshape": lambda: [layers.Reshape((NUM_CLASSES,))],
             "dropout+flatten": lambda: [layers.Dropout(0.3), layers.Flatten()]}
    for layer in tails[tail]():
        x = layer(x)
    return keras.Model(inputs, x, name="softmax_then")


@functools.cache
def _softmax_then_exported(tail: str, activation: str):
    """(model, Graph, GraphInfo) of `_softmax_then(tail, activation)` exported (preset unit); the
    two tables below share the models they both hold, each exported once."""
    model = _softmax_then(tail, activation)
    return (model, *export_in_memory(model, preset="unit"))


@pytest.mark.parametrize("tail, activation", [("dropout", "softmax"), ("flatten", "softmax"),
                                              ("identity", "softmax"), ("reshape", "softmax"),
                                              ("dropout+flatten", "softmax"), ("dropout", "sigmoid"),
                                              ("dropout", "separate softmax")])
def test_probabilities_followed_by_identity_layers_are_not_activated_twice(tail, activation):
    """The model's own output is its probabilities: `probs` equals it (not a softmax of it), and
    the gradient is taken at the logits (CAM's weights: the Dense kernel)."""
    model, graph, info = _softmax_then_exported(tail, activation)
    image = images(3, 16, 3, seed=5)
    got = graph(image, class_indices(3))
    want = model.predict(image.astype(np.float32) / 255, verbose=0)
    np.testing.assert_allclose(got["probs"], want, rtol=1e-4, atol=1e-6)
    assert "cam" in info.heatmaps


@pytest.mark.parametrize("tail, activation", [("dropout", "softmax"), ("dropout", "sigmoid"),
                                              ("identity", "separate softmax")])
def test_the_keras_baseline_gives_the_models_probabilities_and_the_graphs_gradcam(tmp_path, tail, activation):
    """camface bench --baseline keras: its probabilities are the model's own (a sigmoid's, a
    softmax's before a Dropout), as the graph's are; its Grad-CAM is the graph's."""
    from camface.export.keras_baseline import KerasGradCam

    model, graph, info = _softmax_then_exported(tail, activation)
    path = tmp_path / "model.keras"
    model.save(path)
    image = images(2, 16, 3, seed=6)
    classes = class_indices(2)
    baseline = KerasGradCam(path, info.target_layer, [1 / 255] * 3, [0.0] * 3)
    probs, gradcam = baseline.explain(image, classes)
    want = graph(image, classes)
    np.testing.assert_allclose(probs, model.predict(image.astype(np.float32) / 255, verbose=0),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs, want["probs"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gradcam, want["gradcam"], rtol=1e-3, atol=1e-4 * np.abs(gradcam).max())


@pytest.mark.parametrize("head", ["softmax-reshape", "activation-gap", "conv-softmax-flatten"])
def test_the_keras_baseline_of_probabilities_squeezed_off_a_1x1_map(tmp_path, head):
    """An all-convolutional head (Conv2D to a 1x1 map, its Softmax / Activation layer, then
    Reshape, Flatten or global pooling), which export explains at the map's channels: the
    baseline took the 4-D input of that Softmax for the logits, and `camface bench --baseline
    keras` failed ("only 0-dimensional arrays can be converted"). Its probabilities are the
    model's and its Grad-CAM the graph's."""
    import keras
    from keras import layers

    from camface.export.keras_baseline import KerasGradCam

    keras.utils.set_random_seed(5)
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    if head == "softmax-reshape":
        x = layers.Reshape((NUM_CLASSES,))(layers.Softmax()(layers.Conv2D(NUM_CLASSES, 14, name="classes")(x)))
    elif head == "activation-gap":
        x = layers.GlobalAveragePooling2D()(layers.Activation("softmax")(layers.Conv2D(NUM_CLASSES, 14, name="classes")(x)))
    else:
        x = layers.Flatten()(layers.Conv2D(NUM_CLASSES, 14, activation="softmax", name="classes")(x))
    model = keras.Model(inputs, x, name="all_conv")
    path = tmp_path / "model.keras"
    model.save(path)
    graph, info = export_in_memory(model, preset="unit")
    assert info.target_layer == "conv"
    image = images(2, 16, 3, seed=8)
    classes = class_indices(2)
    probs, gradcam = KerasGradCam(path, info.target_layer, [1 / 255] * 3, [0.0] * 3).explain(image, classes)
    want = graph(image, classes)
    np.testing.assert_allclose(probs, model.predict(image.astype(np.float32) / 255, verbose=0),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs, want["probs"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gradcam, want["gradcam"], rtol=1e-3, atol=1e-4 * np.abs(gradcam).max())


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_the_keras_baseline_of_a_model_ending_in_an_activation_layer_that_is_not_probabilities(tmp_path, activation):
    """Activation('linear', dtype='float32') last (the mixed-precision recipe for a model that
    outputs logits): the baseline set that layer's activation to None, and calling the model
    raised TypeError; its output is the logits, as the graph takes them (softmax of it)."""
    import keras
    from keras import layers

    from camface.export.keras_baseline import KerasGradCam

    keras.utils.set_random_seed(4)
    inputs = keras.Input((16, 16, 3))
    x = layers.GlobalAveragePooling2D(name="gap")(layers.Conv2D(6, 3, activation="relu", name="conv")(inputs))
    x = layers.Activation(activation, dtype="float32", name="out")(layers.Dense(NUM_CLASSES, name="dense")(x))
    model = keras.Model(inputs, x, name="logits_out")
    path = tmp_path / "model.keras"
    model.save(path)
    graph, info = export_in_memory(model, preset="unit")
    image = images(2, 16, 3, seed=7)
    classes = class_indices(2)
    probs, gradcam = KerasGradCam(path, info.target_layer, [1 / 255] * 3, [0.0] * 3).explain(image, classes)
    want = graph(image, classes)
    np.testing.assert_allclose(probs, want["probs"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gradcam, want["gradcam"], rtol=1e-3, atol=1e-4 * np.abs(gradcam).max())


# ---- a Sequential saved and loaded again ------------------------------------------------------

def _normalised_maps(maps):
    """Each image's map divided by its largest value (the renderer's normalisation)."""
    peak = np.abs(maps).reshape(len(maps), -1).max(axis=1).reshape(-1, *[1] * (maps.ndim - 1))
    return maps / np.maximum(peak, 1e-12)


@pytest.fixture(scope="module")
def sequential_exported():
    """(model, graph, info): the reviewer's 4-layer Sequential (two convolutions, global average
    pooling, a softmax Dense), random weights, exported as built."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((16, 16, 3)), layers.Conv2D(4, 3, activation="relu"),
                              layers.Conv2D(4, 3), layers.GlobalAveragePooling2D(),
                              layers.Dense(NUM_CLASSES, activation="softmax")], name="sequential_saved")
    return model, *export_in_memory(model, preset="none")


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_sequential_saved_and_loaded_again_exports_as_before(tmp_path, sequential_exported, suffix):
    """Keras loads a Sequential by adding its layers one by one, building it again at each: the
    first of 4 layers is called 4 times, the last once, and the model's graph is the last build.
    Export took every layer's first call and failed ("cannot cut the model at layer ...");
    `camface bench --baseline keras` took the target's first call (no gradient reaches it).
    Loaded, it exports as before it was saved: the same target, probabilities and maps."""
    from camface.export import keras_model
    from camface.export.keras_baseline import KerasGradCam

    model, graph, info = sequential_exported
    path = tmp_path / f"model{suffix}"
    model.save(path)
    loaded = keras_model.load_model(path)
    assert [len(layer._inbound_nodes) for layer in loaded.layers] == [4, 3, 2, 1]  # the rebuilds
    loaded_graph, loaded_info = export_in_memory(loaded, preset="none")
    assert loaded_info.target_layer == info.target_layer == model.layers[1].name
    assert loaded_info.heatmaps == info.heatmaps and "cam" in info.heatmaps
    image, classes = images(3, 16, 3, seed=9), class_indices(3)
    got, want = loaded_graph(image, classes), graph(image, classes)
    np.testing.assert_allclose(got["probs"], want["probs"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(want["probs"], model.predict(image.astype(np.float32), verbose=0),
                               rtol=1e-4, atol=1e-6)
    for name in ("gradcam", "cam"):
        assert np.abs(want[name]).max() > 0
        np.testing.assert_allclose(_normalised_maps(got[name]), _normalised_maps(want[name]), atol=1e-4)
    _, baseline = KerasGradCam(path, info.target_layer, [1.0] * 3, [0.0] * 3).explain(image, classes)
    np.testing.assert_allclose(_normalised_maps(baseline), _normalised_maps(want["gradcam"]), atol=1e-4)
