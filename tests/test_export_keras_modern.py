"""Modern Keras backbones through the TensorFlow path: keras.applications' ConvNeXt (built by its
own `ConvNeXt` function and blocks, small: depths 1, 64x64 input; ConvNeXtTiny itself takes ~45 s
to export, benchmarks/RESULTS-transformers.md) exports at its last stage and matches a
tf.GradientTape reference; a small Keras ViT is refused with one line naming the attention."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # before TensorFlow loads: eager conv gradients segfault in oneDNN here

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("tensorflow")
from test_export_graph import (  # noqa: E402
    assert_outputs_close, class_indices, export_in_memory, images, tape_reference)

from camface.errors import ModelError  # noqa: E402
from camface.export import keras_model  # noqa: E402


@pytest.fixture(scope="module")
def convnext():
    """(model, graph, info) of a small keras.applications ConvNeXt (its preprocessing inside:
    preset none), random weights."""
    import keras
    from keras.src.applications.convnext import ConvNeXt

    keras.utils.set_random_seed(0)
    model = ConvNeXt(depths=[1, 1, 1, 1], projection_dims=[8, 16, 24, 32], default_size=64,
                     name="convnext_small_test", input_shape=(64, 64, 3), classes=5,
                     layer_scale_init_value=0.5, weights=None)
    graph, info = export_in_memory(model, preset="none")
    return model, graph, info


def test_a_keras_convnext_exports_at_its_last_stage(convnext):
    """The last block's output is an `Add` operation (Keras 3: `inputs + x`), no layer: it is the
    default target, the map before the global pooling; no CAM (a LayerNorm follows the pooling)."""
    model, graph, info = convnext
    last = keras_model.operations(model)[-4]
    assert type(last).__name__ == "Add" and info.target_layer == last.name
    assert info.feature_size == (2, 2) and "cam" not in info.heatmaps
    assert "convnext_small_test_head_layernorm (LayerNormalization)" in info.cam_unavailable_reason


@pytest.mark.parametrize("n", [1, 4])
def test_keras_convnext_heatmaps_equal_the_tape_reference(convnext, n):
    """Depthwise convolutions written as grouped Conv2D (run as depthwise ones: TensorFlow's
    grouped convolution is an XLA call tf2onnx cannot convert), the exact GELU (Erfc) and the
    head's LayerNorm gradient (RsqrtGrad), all converted: every output as tf.GradientTape gives."""
    import keras
    from keras import ops
    from test_export_graph import tape_reference

    model, graph, info = convnext
    target = next(op for op in keras_model.operations(model) if op.name == info.target_layer)
    features = keras.Model(model.input, target._inbound_nodes[0].output_tensors[0])
    gap, norm, dense = (model.get_layer(f"convnext_small_test_head_{name}")
                        for name in ("gap", "layernorm", "dense"))

    def head(a):  # the logits: the dense layer without its softmax
        return ops.matmul(norm(gap(a)), dense.kernel) + dense.bias

    image = images(n, 64, 3, seed=n)
    classes = class_indices(n)
    want = tape_reference(features, head, image.astype(np.float32), classes)
    assert_outputs_close(graph(image, classes), want)


def tiny_vit():
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = layers.Reshape((16, 16), name="tokens")(layers.Conv2D(16, 8, strides=8,
                                                              name="patch_embed")(inputs))
    for i in range(2):
        y = layers.LayerNormalization(name=f"block{i}_norm1")(x)
        x = layers.Add()([x, layers.MultiHeadAttention(2, 8, name=f"block{i}_attn")(y, y)])
        y = layers.Dense(32, activation="gelu")(layers.LayerNormalization(name=f"block{i}_norm2")(x))
        x = layers.Add()([x, layers.Dense(16)(y)])
    outputs = layers.Dense(4, activation="softmax")(layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs, name="tiny_vit")


def test_a_keras_vit_is_refused_naming_its_attention():
    """Its only 4-D layer is the patch embedding, read through attention: no feature map of what
    it decides on; its tokens are 3-D (token targets are the ONNX path's)."""
    model = tiny_vit()
    with pytest.raises(ModelError, match=r"^model 'tiny_vit': target layer 'patch_embed' reaches the "
                                         r"logits through attention \(layer 'block0_attn', "
                                         r"MultiHeadAttention\).*token targets \[N, T, C\] are for "
                                         r"\.onnx / \.pt2 models"):
        export_in_memory(model, preset="unit")
    with pytest.raises(ModelError, match=r"^layer 'block1_norm1' has no 4-D output \(it gives tokens "
                                         r"\[N, T, C\]: token targets are for \.onnx / \.pt2 models\)"):
        export_in_memory(model, preset="unit", target_layer="block1_norm1")


def test_a_grouped_convolution_that_is_not_depthwise_is_refused():
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, groups=3, name="grouped")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(x)))
    with pytest.raises(ModelError, match=r"^layer 'grouped': a grouped Conv2D \(3 groups, 3 -> 6 "
                                         r"channels\) that is not depthwise has no ONNX conversion"):
        export_in_memory(model, preset="unit")


@pytest.mark.parametrize("application, expected", [("EfficientNetB0", "top_activation"),
                                                   ("EfficientNetV2B0", "top_activation"),
                                                   ("MobileNetV3Small", None)])
def test_the_default_target_of_a_backbone_with_squeeze_excitation_is_its_last_map(application, expected):
    """Squeeze-and-excitation blocks pool globally and go on: the default target is the map the
    head pools (EfficientNet's top_activation), not the map before the first block's squeeze."""
    import keras

    model = getattr(keras.applications, application)(weights=None, input_shape=(64, 64, 3), classes=3)
    target = keras_model.default_target_layer(model)
    pool = [layer for layer in model.layers if type(layer).__name__ in keras_model.POOLING_TYPES][-1]
    assert target == (expected or target)
    assert keras_model.output_in(model, model.get_layer(target)) is keras_model.input_in(model, pool)


def _squeeze_excitation_model(head: str):
    """16x16x3 -> conv -> a squeeze-and-excitation block (GAP, Dense, Dense(sigmoid), Reshape,
    Multiply "se_scale") -> conv "last_conv" -> a head: GAP or Flatten, then Dense(softmax)."""
    import keras
    from keras import layers

    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stem")(inputs)
    se = layers.GlobalAveragePooling2D(name="se_squeeze")(x)
    se = layers.Dense(8, activation="sigmoid", name="se_expand")(layers.Dense(2, activation="relu")(se))
    x = layers.Multiply(name="se_scale")([x, layers.Reshape((1, 1, 8))(se)])
    if head != "no-conv":
        x = layers.Conv2D(8, 1, activation="relu", name="last_conv")(x)
    pooled = layers.Flatten(name="flatten")(x) if head != "gap" else layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, layers.Dense(3, activation="softmax")(pooled))


@pytest.mark.parametrize("head, expected", [("flatten", "last_conv"), ("gap", "last_conv"),
                                            ("no-conv", "se_scale")])
def test_the_default_target_of_a_squeeze_excitation_net_with_a_flatten_head_is_its_last_map(head, expected):
    """With no global pooling in the head (Flatten -> Dense), the default target was the map
    before the last squeeze-and-excitation block's pooling (inside the block: "stem"); it is now
    the last 4-D map, the one the head reads, as with a pooling head."""
    model = _squeeze_excitation_model(head)
    assert keras_model.default_target_layer(model) == expected
    graph, info = export_in_memory(model, preset="unit")
    assert info.target_layer == expected and info.feature_size == (8, 8)
    assert float(np.abs(graph(images(2, 16, 3), class_indices(2, 3))["gradcam"]).max()) > 0
    # the reason `camface info` prints is said of this head (it gave both cases' rules to every model)
    assert info.target_reason == ("default: the last 4-D layer before the head's global pooling" if head == "gap"
                                  else "default: the last 4-D layer larger than 1x1 (the head has no global pooling)")


def _score_head_model(head: str):
    """16x16x3 -> conv "features" (8x8) -> a head: `squeezenet`, SqueezeNet's all-convolutional
    one (Dropout, a 1x1 Conv2D "classes" to one channel per class, ReLU, GAP, softmax);
    `relu-inside` with the ReLU as the Conv2D's activation; `linear` without it (as the bundled
    emotion model's conv2d_7 -> GAP: its class channel is exactly CAM of `features`);
    `dense-after` with a Dense(softmax) after the GAP (the pooled channels are features again,
    though as many as the classes)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="features")(inputs)
    x = layers.Dropout(0.5)(x)
    if head in ("relu-inside", "linear"):
        x = layers.Conv2D(3, 1, activation="relu" if head == "relu-inside" else None, name="classes")(x)
    else:
        x = layers.ReLU(name="class_relu")(layers.Conv2D(3, 1, name="classes")(x))
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(3, activation="softmax")(x) if head == "dense-after" else layers.Activation("softmax")(x)
    return keras.Model(inputs, out)


@pytest.mark.parametrize("head, expected", [("squeezenet", "features"), ("relu-inside", "features"),
                                            ("linear", "classes"), ("dense-after", "class_relu")])
def test_an_all_convolutional_heads_default_target_is_the_map_its_class_convolution_reads(head, expected):
    """SqueezeNet's head is a Conv2D to one channel per class, pooled: the default target was that
    class-score map (its channels classes, not features), where pytorch-grad-cam's examples take
    `features`. The default is now the map the convolution reads, recorded with why, its Grad-CAM
    tf.GradientTape's there; a head with a Dense after the pooling, or no activation before it,
    keeps the pooled map."""
    import keras

    from camface.export.keras_model import CLASS_SCORES_REASON

    model = _score_head_model(head)
    assert keras_model.default_target_layer(model) == expected
    graph, info = export_in_memory(model, preset="unit")
    assert info.target_layer == expected
    assert (info.target_reason == CLASS_SCORES_REASON) == (expected == "features")
    if expected != "features":
        return
    features = keras.Model(model.input, model.get_layer("features").output)
    after = model.layers[model.layers.index(model.get_layer("features")) + 1:-1]  # up to the softmax

    def scores(a):
        for layer in after:
            a = layer(a)
        return a

    image, classes = images(3, 16, 3), class_indices(3, 3)
    want = tape_reference(features, scores, image.astype(np.float32) / 255, classes)
    got = graph(image, classes)
    assert float(np.abs(want["gradcam"]).max()) > 0
    assert_outputs_close({k: got[k] for k in want}, want)


def _small_classifier(policy: str):
    import keras
    from keras import layers

    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(4)
        inputs = keras.Input((16, 16, 3))
        x = layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
        x = layers.BatchNormalization(name="bn")(x)
        x = layers.Conv2D(6, 1, activation="sigmoid", name="head_conv")(x)
        x = layers.Dense(4, name="dense")(layers.GlobalAveragePooling2D(name="gap")(x))
        return keras.Model(inputs, layers.Activation("softmax", dtype="float32", name="probs_out")(x))
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_a_mixed_precision_model_exports_in_float32(policy):
    """A model built under a mixed-precision policy (float16 maths, float32 weights) exports as
    the float32 model with its weights: every output float32, equal to that model's (as Keras
    computes it in float32), the self-checks passing."""
    mixed = _small_classifier(policy)
    reference = _small_classifier("float32")
    reference.set_weights(mixed.get_weights())
    graph, info = export_in_memory(mixed, preset="unit", target_layer="conv")
    image = images(3, 16, 3, seed=2)
    got = graph(image, class_indices(3, 4))
    assert all(value.dtype == np.float32 for value in got.values())
    want = reference.predict(image.astype(np.float32) / 255, verbose=0)
    np.testing.assert_allclose(got["probs"], want, rtol=1e-5, atol=1e-6)
    assert "gradcam" in info.heatmaps and mixed.layers[1].compute_dtype != "float32"


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_an_upsampling_after_the_target_exports_as_the_tape_reference(interpolation):
    """UpSampling2D after the target (a decoder or FPN-like head): bilinear failed the export
    ("TensorFlow op ResizeBilinearGrad ... has no ONNX conversion"), bicubic's forward differed
    from TensorFlow's by up to 5e-4. Both export, every output as tf.GradientTape gives."""
    import keras
    from keras import layers
    from test_export_graph import tape_reference

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    stem = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stem")(inputs)
    up = layers.UpSampling2D(2, interpolation=interpolation, name="up")(stem)
    last = layers.Conv2D(6, 3, padding="same", activation="relu", name="last")(up)
    dense = layers.Dense(4, name="dense")
    model = keras.Model(inputs, layers.Activation("softmax")(dense(
        layers.GlobalAveragePooling2D()(last))))
    graph, info = export_in_memory(model, preset="unit", target_layer="stem")
    assert info.feature_size == (16, 16) and "gradcam" in info.heatmaps
    features = keras.Model(model.input, stem)
    up_layer, last_layer = model.get_layer("up"), model.get_layer("last")

    def head(a):
        return dense(keras.ops.mean(last_layer(up_layer(a)), axis=(1, 2)))

    image = images(3, 32, 3, seed=3)
    classes = class_indices(3)
    want = tape_reference(features, head, image.astype(np.float32) / 255, classes)
    assert_outputs_close(graph(image, classes), want)
