"""TensorFlow CAM / Grad-CAM / Grad-CAM++ of `camface guided`: hand-computed arrays, the bundled
emotion model, and agreement with the exported ONNX CAM graph."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from camface import methods  # noqa: E402
from camface.guided import gradcam as maps  # noqa: E402
from camface.guided.explain import Explainer, layer_sweep  # noqa: E402
from camface.guided.snapshot import EMOTION_PREPROCESSING  # noqa: E402
from camface.models import EMOTION_KERAS, EMOTION_ONNX, EMOTION_LABELS, read_labels  # noqa: E402

HAPPY, SAD = 3, 4


def astronaut_crop(astronaut_bgr, flip=False):
    """The astronaut's face (box about 177, 82, 95, 95), 64x64 gray, as the live loop crops it."""
    import cv2

    x, y, side = 177, 82, 95
    crop = cv2.resize(astronaut_bgr[y:y + side, x:x + side], (64, 64), interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    return (gray[:, ::-1] if flip else gray)[:, :, None].copy()


@pytest.fixture(scope="module")
def emotion_model():
    return keras.models.load_model(str(EMOTION_KERAS), compile=False)


@pytest.fixture(scope="module")
def crops(astronaut_bgr):
    return np.stack([astronaut_crop(astronaut_bgr), astronaut_crop(astronaut_bgr, flip=True)])


def test_emotion_model_structure(emotion_model):
    assert maps.resolve_layer(emotion_model, None) == "conv2d_7"
    weights, reason = maps.cam_weights(emotion_model, "conv2d_7")
    np.testing.assert_array_equal(weights, np.eye(7))  # conv2d_7 -> GAP -> softmax
    assert reason == ""
    weights, reason = maps.cam_weights(emotion_model, "add_3")
    assert weights is None and "global average pooling" in reason
    convs = maps.conv_layers(emotion_model)
    assert len(convs) == 15 and convs[0] == "conv2d_1" and convs[-1] == "conv2d_7"
    with pytest.raises(Exception, match="no layer named 'nope'.*conv2d_7"):
        maps.resolve_layer(emotion_model, "nope")


def test_nested_backbone_gradcam_equals_flat_model():
    """A backbone nested as one layer (`backbone/conv_b` path) gives the same Grad-CAM as the
    same weights in one flat graph."""
    def build(nested):
        inputs = keras.Input((12, 12, 1))
        conv_a = keras.layers.Conv2D(4, 3, activation="relu", name="conv_a")
        conv_b = keras.layers.Conv2D(5, 3, activation="relu", name="conv_b")
        if nested:
            inner_in = keras.Input((12, 12, 1))
            backbone = keras.Model(inner_in, conv_b(conv_a(inner_in)), name="backbone")
            x = backbone(inputs)
        else:
            x = conv_b(conv_a(inputs))
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
        return keras.Model(inputs, outputs)

    keras.utils.set_random_seed(1)
    flat, nested = build(False), build(True)
    nested.set_weights(flat.get_weights())
    images = np.random.default_rng(2).integers(0, 255, (2, 12, 12, 1), dtype=np.uint8)
    preprocessing = EMOTION_PREPROCESSING
    want = Explainer(flat, "conv_b", preprocessing).explain(images, np.array([0, 2]))
    explainer = Explainer(nested, "conv_b", preprocessing)
    assert explainer.layer == "backbone/conv_b" and explainer.cam_reason == ""
    got = explainer.explain(images, np.array([0, 2]))
    for a, b in zip(want, got):
        np.testing.assert_allclose(a.heatmaps["gradcam"], b.heatmaps["gradcam"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.heatmaps["cam"], b.heatmaps["cam"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.input_gradient, b.input_gradient, rtol=1e-4, atol=1e-7)
        # GAP -> Dense head: Grad-CAM = ReLU(CAM) / (h*w) (Grad-CAM paper, appendix A); 8x8 here.
        np.testing.assert_allclose(b.heatmaps["gradcam"], np.maximum(b.heatmaps["cam"], 0) / 64, rtol=1e-4, atol=1e-7)
    assert maps.conv_layers(nested) == ["backbone/conv_a", "backbone/conv_b"]


@pytest.mark.parametrize("head, suffix", [("flat", ".keras"), ("flat", ".h5"), ("nested", ".keras")])
def test_a_sequential_saved_and_loaded_again_is_explained_as_before(tmp_path, head, suffix):
    """Keras loads a Sequential by adding its layers one by one, building it again at each (a
    nested Sequential head too): guided took each layer's first call, of an earlier build, no
    gradient reached it and the runner failed. Loaded, it explains as before it was saved."""
    from keras import layers

    keras.utils.set_random_seed(6)
    tail = [layers.GlobalAveragePooling2D(), layers.Dense(3, activation="softmax")]
    if head == "nested":
        tail = [keras.Sequential([keras.Input((8, 8, 5)), *tail], name="head")]
    model = keras.Sequential([keras.Input((12, 12, 1)), layers.Conv2D(4, 3, activation="relu", name="conv_a"),
                              layers.Conv2D(5, 3, name="conv_b"), *tail])
    path = tmp_path / f"model{suffix}"
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    assert len(loaded.layers[0]._inbound_nodes) == len(loaded.layers)  # one build per layer added
    images = np.random.default_rng(3).integers(0, 255, (2, 12, 12, 1), dtype=np.uint8)
    want = Explainer(model, None, EMOTION_PREPROCESSING).explain(images, np.array([-1, 2]))
    explainer = Explainer(loaded, None, EMOTION_PREPROCESSING)
    assert explainer.layer == "conv_b" and explainer.cam_reason == ""
    got = explainer.explain(images, np.array([-1, 2]))
    for a, b in zip(want, got):
        assert np.abs(a.heatmaps["gradcam"]).max() > 0
        for name in ("gradcam", "cam"):
            np.testing.assert_allclose(b.heatmaps[name], a.heatmaps[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.input_gradient, a.input_gradient, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("tail", ["dense", "activation", "dense+dropout", "activation+dropout"])
def test_a_sigmoid_model_is_explained_at_its_logits_with_its_own_probabilities(tail):
    """A model ending in sigmoid (a binary or multi-label head) is explained as `camface export`
    explains it: the gradients of the pre-sigmoid logit (a linear twin with the same weights gives
    the same maps, CAM included), probabilities as the model gives them (not softmax(sigmoid)),
    a Dropout after the sigmoid ignored as export ignores it (not its output taken for logits).
    Class 0 is saturated (probability 1.0 in float32): through the sigmoid its maps would be 0."""
    def build(activation, tail):
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        if tail.startswith("dense"):
            outputs = keras.layers.Dense(3, activation=activation, name="head")(x)
        else:
            outputs = keras.layers.Activation(activation)(keras.layers.Dense(3, name="head")(x))
        if tail.endswith("+dropout"):
            outputs = keras.layers.Dropout(0.5)(outputs)
        return keras.Model(inputs, outputs)

    keras.utils.set_random_seed(0)
    sigmoid, twin = build("sigmoid", tail), build("linear", "dense")
    kernel, bias = sigmoid.get_layer("head").get_weights()
    sigmoid.get_layer("head").set_weights([kernel * 40, bias + np.array([40.0, 0.0, -1.0], np.float32)])
    twin.set_weights(sigmoid.get_weights())
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    explainer = Explainer(sigmoid, "conv", EMOTION_PREPROCESSING)
    assert explainer.cam_reason == "" and "cam" in explainer.methods
    got = explainer.explain(images, np.array([0, 1]))
    want = Explainer(twin, "conv", EMOTION_PREPROCESSING).explain(images, np.array([0, 1]))
    probs = np.asarray(sigmoid(EMOTION_PREPROCESSING.apply(images)))
    assert (probs[:, 0] == 1.0).all()  # saturated: d sigmoid / d logit is 0 in float32
    for i, (a, b) in enumerate(zip(want, got)):
        np.testing.assert_allclose(b.probs, probs[i], rtol=1e-5, atol=1e-7)
        for name in ("gradcam", "cam", "gradcampp"):
            scale = float(np.abs(a.heatmaps[name]).max())
            assert scale > 0
            np.testing.assert_allclose(b.heatmaps[name], a.heatmaps[name], rtol=1e-4, atol=1e-5 * scale)
        scale = float(np.abs(a.input_gradient).max())
        assert scale > 0
        np.testing.assert_allclose(b.input_gradient, a.input_gradient, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("between", ["Flatten", "GaussianNoise", "Dropout"])
def test_cam_looks_through_layers_that_change_nothing_at_inference_as_export_does(between):
    """GAP -> Flatten (or noise, dropout) -> Dense(softmax): `camface export` gives the graph a
    CAM head (the Flatten changes nothing), so guided's figure has its CAM too, the same map as
    the model without that layer (the figure left CAM out: "needs one linear layer")."""
    from camface.export import exporter

    def build(middle):
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        if middle == "Flatten":
            x = keras.layers.Flatten()(x)
        elif middle:
            x = getattr(keras.layers, middle)(0.2)(x)
        return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))

    keras.utils.set_random_seed(0)
    model, plain = build(between), build(None)
    plain.set_weights(model.get_weights())
    _, _, info = exporter.prepare(model, exporter.ExportOptions(preset="emotion"))
    assert info.cam_unavailable_reason == "" and "cam" in info.heatmaps  # live offers CAM
    explainer = Explainer(model, "conv", EMOTION_PREPROCESSING)
    assert explainer.cam_reason == "" and "cam" in explainer.methods
    images = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    for got, want in zip(explainer.explain(images, np.array([0, 2])),
                         Explainer(plain, "conv", EMOTION_PREPROCESSING).explain(images, np.array([0, 2]))):
        scale = float(np.abs(want.heatmaps["cam"]).max())
        assert scale > 0
        np.testing.assert_allclose(got.heatmaps["cam"], want.heatmaps["cam"], rtol=1e-5, atol=1e-6 * scale)


def _saturated_sigmoid(size: int = 8):
    """(model, linear twin with the same weights): conv -> GAP -> Dense(3, sigmoid) whose
    logits are about 40, 50 and -1 for any crop, so classes 0 and 1 both have probability 1.0
    in float32: the first of them (0) is the one live names, the larger logit (1) another."""
    def build(activation):
        inputs = keras.Input((size, size, 1))
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(3, activation=activation, name="head")(x))

    keras.utils.set_random_seed(0)
    sigmoid, twin = build("sigmoid"), build("linear")
    kernel, _ = sigmoid.get_layer("head").get_weights()
    sigmoid.get_layer("head").set_weights([kernel * 0.01, np.array([40.0, 50.0, -1.0], np.float32)])
    twin.set_weights(sigmoid.get_weights())
    return sigmoid, twin


def test_the_predicted_class_of_a_saturated_sigmoid_is_the_one_every_map_explains():
    """Two classes saturate at probability 1.0 (logits 40 and 50): the class named predicted is
    the first of them (class 0, as live names it: `predicted_classes`), not the larger logit
    (class 1, which the gradient pass picks). Every map of the row, Guided Backprop, the CAM
    weights and the title must explain that one class: the linear twin's maps for class 0."""
    sigmoid, twin = _saturated_sigmoid()
    images = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 1), dtype=np.uint8)
    probs = np.asarray(sigmoid(EMOTION_PREPROCESSING.apply(images)))
    assert (probs[0, :2] == 1.0).all()  # the tie this test is about
    (got,) = Explainer(sigmoid, "conv", EMOTION_PREPROCESSING).explain(images, np.array([-1]))
    want = {c: Explainer(twin, "conv", EMOTION_PREPROCESSING).explain(images, np.array([c]))[0] for c in (0, 1)}
    assert got.predicted == got.explained == 0
    def close(a, b):  # float32 through different graphs: 1e-5 of the map's scale
        return np.allclose(a, b, rtol=1e-4, atol=1e-5 * (float(np.abs(b).max()) + 1e-12))

    depends_on_class = 0
    for name in got.heatmaps:
        assert close(got.heatmaps[name], want[0].heatmaps[name]), name
        if not close(want[0].heatmaps[name], want[1].heatmaps[name]):  # Eigen-CAM is the same for both
            depends_on_class += 1
            assert not close(got.heatmaps[name], want[1].heatmaps[name]), name
    assert depends_on_class >= 5  # CAM, Grad-CAM, Grad-CAM++, ... at least
    assert close(got.input_gradient, want[0].input_gradient)
    assert not close(got.input_gradient, want[1].input_gradient)
    np.testing.assert_allclose(got.guided_gradcam, want[0].guided_gradcam, rtol=1e-4,
                               atol=1e-5 * float(np.abs(want[0].guided_gradcam).max()))
    assert layer_sweep(sigmoid, ["conv"], images, np.array([-1]), EMOTION_PREPROCESSING)[0].explained.tolist() == [0]


def test_guided_names_and_explains_the_class_live_does_where_top_probabilities_tie(tmp_path):
    """The saturated sigmoid exported by `camface export` and run as live runs it
    (`camface.load(...).explain_crops`), and `camface guided`'s explainer on the same crops
    with the graph's preprocessing: the same class named predicted, the same class explained,
    the same Grad-CAM (normalised), where classes 0 and 1 tie at probability 1.0."""
    import camface
    from camface.export.exporter import ExportOptions, export
    from camface.guided.snapshot import Preprocessing, read_graph_metadata
    from camface.methods import normalize

    sigmoid, _ = _saturated_sigmoid(size=16)
    sigmoid.save(tmp_path / "tied.keras")
    export(tmp_path / "tied.keras", tmp_path / "tied.onnx",
           ExportOptions(preset="emotion", labels=("a", "b", "c"), heads=("gradcam",)))
    crops = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    with camface.load(tmp_path / "tied.onnx", method="gradcam") as pipeline:
        live = pipeline.explain_crops(crops)
    info = read_graph_metadata(tmp_path / "tied.onnx")
    explainer = Explainer(sigmoid, info.target_layer,
                          Preprocessing.from_normalization(info.color_order, info.normalization))
    guided, other = explainer.explain(crops, np.array([-1, -1])), explainer.explain(crops, np.array([1, 1]))
    for seen, shown, not_shown in zip(live, guided, other):
        assert (seen.probs[:2] == 1.0).all() and (shown.probs[:2] == 1.0).all()  # the tie
        assert (shown.predicted, shown.explained) == (seen.predicted, seen.explained) == (0, 0)
        want = normalize(seen.heatmap, "gradcam")
        assert float(want.max()) == 1.0  # a map, not an empty one
        np.testing.assert_allclose(normalize(shown.heatmaps["gradcam"], "gradcam"), want, atol=1e-4)
        assert np.abs(normalize(not_shown.heatmaps["gradcam"], "gradcam") - want).max() > 0.05  # the class matters


@pytest.fixture(scope="module")
def explained(emotion_model, crops):
    """happy and sad for the astronaut, at conv2d_7."""
    explainer = Explainer(emotion_model, "conv2d_7", EMOTION_PREPROCESSING)
    pair = np.stack([crops[0], crops[0]])
    return explainer, explainer.explain(pair, np.array([-1, SAD]))


def test_predicts_happy_and_cam_matches_gradcam(explained):
    """GAP -> logits head: Grad-CAM = ReLU(CAM) / (h*w) (Grad-CAM paper, appendix A)."""
    _, (happy, sad) = explained
    assert happy.predicted == HAPPY and happy.explained == HAPPY and happy.probs[HAPPY] > 0.99
    assert sad.predicted == HAPPY and sad.explained == SAD
    for item in (happy, sad):
        np.testing.assert_allclose(item.heatmaps["gradcam"], np.maximum(item.heatmaps["cam"], 0) / 16, rtol=1e-5, atol=1e-6)
    # At conv2d_7, "happy" Grad-CAM peaks in the top rows (measured for issue 2).
    assert np.unravel_index(happy.heatmaps["gradcam"].argmax(), (4, 4))[0] <= 1


def test_changing_the_class_changes_guided_gradcam(explained):
    explainer, (happy, sad) = explained
    assert explainer.guided and happy.guided
    a, b = happy.guided_gradcam.ravel(), sad.guided_gradcam.ravel()
    correlation = np.corrcoef(a, b)[0, 1]
    assert correlation < 0.8, correlation
    assert not np.allclose(happy.heatmaps["gradcam"], sad.heatmaps["gradcam"])
    # Guided Grad-CAM is Guided Backprop x Grad-CAM normalised to [0, 1] (as shown), upsampled.
    from camface.guided.explain import upsample

    weight = upsample(methods.normalize(sad.heatmaps["gradcam"], "gradcam"), (64, 64))
    np.testing.assert_allclose(sad.guided_gradcam[..., 0], sad.input_gradient[..., 0] * weight, rtol=1e-5,
                               atol=1e-9)


@pytest.mark.parametrize("scale, shown", [(1.0, True), (1e-20, False)])
def test_guided_gradcam_weighs_by_the_gradcam_its_column_shows(scale, shown):
    """A head whose weights are ~1e-20 gives a Grad-CAM of rounding residue (peak at most
    methods.FLAT_PEAK): its column is empty, and so is Guided Grad-CAM; it was scaled by its own
    peak (> 0) to full strength beside the empty Grad-CAM."""
    from camface.guided.explain import upsample

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))
    kernel, bias = model.get_layer("head").get_weights()
    model.get_layer("head").set_weights([kernel * np.float32(scale), bias])
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    for item in Explainer(model, "conv", EMOTION_PREPROCESSING).explain(images, np.array([0, 1])):
        gradcam = item.heatmaps["gradcam"]
        assert 0 < float(gradcam.max()) and (float(gradcam.max()) > methods.FLAT_PEAK) == shown
        assert np.abs(item.input_gradient).max() > 0  # the gradient is there; the weight decides
        column = methods.normalize(gradcam, "gradcam")
        assert column.any() == shown
        np.testing.assert_allclose(item.guided_gradcam[..., 0], item.input_gradient[..., 0] * upsample(column, (8, 8)),
                                   rtol=1e-5, atol=1e-9 * float(np.abs(item.input_gradient).max()))
        assert np.abs(item.guided_gradcam).any() == shown


@pytest.mark.parametrize("only, computed", [((), {"gradcam"}), (("hirescam", "cam"), {"gradcam", "hirescam", "cam"})])
def test_only_the_heatmaps_asked_for_are_computed_grad_cam_always(explained, only, computed):
    """`explain(only=...)` (the sanity check's guided maps: no Score-CAM, K model runs a crop):
    those heatmaps and Grad-CAM, Guided Grad-CAM's weight, equal to a call that computes all."""
    explainer, (_, sad) = explained
    assert {"scorecam", "ablationcam"} <= set(explainer.methods)
    crops = np.stack([sad.image_rgb[..., :1]])  # one grey channel: the colour order's own crop
    explainer._parts = None  # built again only for a method that runs the model again (none here)
    (got,) = explainer.explain(crops, np.array([SAD]), only=only)
    assert explainer._parts is None and set(got.heatmaps) == computed
    for name in computed:
        np.testing.assert_allclose(got.heatmaps[name], sad.heatmaps[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.guided_gradcam, sad.guided_gradcam, rtol=1e-5, atol=1e-9)


@pytest.mark.skipif(not EMOTION_ONNX.is_file(), reason="bundled CAM graph not exported yet")
def test_gradcam_equals_exported_onnx_graph(emotion_model, crops):
    """Same crop and class: this command's TF Grad-CAM / Grad-CAM++ / CAM / probs equal the ONNX
    graph's. Tolerance: max |difference| <= 1e-4 x the map's max (+1e-6): float32, different kernels."""
    import onnxruntime as ort

    from camface.graph_spec import GraphInfo
    from camface.guided.snapshot import Preprocessing

    session = ort.InferenceSession(str(EMOTION_ONNX), providers=["CPUExecutionProvider"])
    info = GraphInfo.from_metadata(session.get_modelmeta().custom_metadata_map)
    preprocessing = Preprocessing.from_normalization(info.color_order, info.normalization)
    explainer = Explainer(emotion_model, info.target_layer, preprocessing)
    classes = np.array([-1, SAD, 0], np.int64)
    batch = np.stack([crops[0], crops[0], crops[1]])
    ours = explainer.explain(batch, classes)
    outputs = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"image": batch, "class_index": classes})))
    for i, item in enumerate(ours):
        np.testing.assert_allclose(item.probs, outputs["probs"][i], atol=1e-5)
        assert set(item.heatmaps) == {m for m in methods.names(display_only=True) if m in outputs}
        for name in item.heatmaps:
            expected = outputs[name][i]
            got = item.heatmaps[name]
            tolerance = 1e-4 * float(np.abs(expected).max()) + 1e-6
            assert np.abs(got - expected).max() <= tolerance, (name, i, np.abs(got - expected).max())
    assert read_labels(EMOTION_LABELS) == list(info.labels)


def test_a_model_built_on_a_list_of_one_input_is_explained_without_keras_warnings():
    """Models saved by Keras 2 (the bundled .hdf5) have `inputs` = [input]; the sub-models
    camface guided cuts from them were called with one tensor, and Keras printed a 4-line
    UserWarning per call (Score-CAM and Ablation-CAM call them eagerly) into every run's output."""
    import warnings

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model([inputs], keras.layers.Activation("softmax")(x))
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = Explainer(model, "conv", EMOTION_PREPROCESSING).explain(images, np.array([-1, 1]))
    assert {"scorecam", "ablationcam"} <= set(items[0].heatmaps)
    assert not [w for w in caught if "structure" in str(w.message)], [str(w.message)[:80] for w in caught]


def _head_model(head: str):
    """16x16x3 -> Conv2D "conv" (6) -> a head ending in softmax / sigmoid that is no Dense of the
    outer model: a nested Sequential or functional model, or an EinsumDense with the activation."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    if head == "sequential":
        outputs = keras.Sequential([keras.layers.GlobalAveragePooling2D(),
                                    keras.layers.Dense(4, activation="softmax", name="dense")], name="head")(x)
    elif head == "functional+dropout":
        head_in = keras.Input((14, 14, 6))
        logits = keras.layers.Dense(4, name="dense")(keras.layers.GlobalAveragePooling2D()(head_in))
        outputs = keras.Model(head_in, keras.layers.Softmax()(logits), name="head")(x)
        outputs = keras.layers.Dropout(0.3)(outputs)
    else:  # "einsum-softmax", "einsum-sigmoid"
        outputs = keras.layers.EinsumDense("ab,bc->ac", output_shape=4, bias_axes="c", name="einsum",
                                           activation=head.split("-")[1])(
            keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("head", ["sequential", "functional+dropout", "einsum-softmax", "einsum-sigmoid"])
def test_a_head_ending_in_probabilities_is_explained_at_its_logits_by_export_and_guided(head):
    """A model whose last layer is a nested head ending in softmax, or a layer other than Dense
    built with softmax / sigmoid: export took its probabilities for logits and softmaxed them
    again (probs and maps wrong) while guided, for the EinsumDense, explained its pre-activation.
    Both now explain the logits before the activation: the graph's probs are the model's own,
    and the graph and guided name the same class and give the same Grad-CAM."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_export_graph import export_in_memory

    from camface.guided.snapshot import Preprocessing

    keras.utils.set_random_seed(0)
    model = _head_model(head)
    graph, info = export_in_memory(model, preset="unit")
    assert info.target_layer == "conv"
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    classes = np.array([-1, 0, 3], np.int64)
    outputs = graph(images, classes)
    assert ("cam" in outputs) == (not head.startswith("einsum"))  # CAM needs a Dense
    want = np.asarray(model(images.astype(np.float32) / 255, training=False))
    np.testing.assert_allclose(outputs["probs"], want, rtol=1e-5, atol=1e-6)
    preprocessing = Preprocessing.from_normalization(info.color_order, info.normalization)
    explained = Explainer(model, "conv", preprocessing).explain(images, classes)
    scale = float(np.abs(outputs["gradcam"]).max())
    assert scale > 0
    for i, item in enumerate(explained):
        np.testing.assert_allclose(item.probs, want[i], rtol=1e-5, atol=1e-6)
        assert item.explained == (int(np.argmax(outputs["probs"][i])) if classes[i] < 0 else classes[i])
        assert np.abs(item.heatmaps["gradcam"] - outputs["gradcam"][i]).max() <= 1e-4 * scale + 1e-7
        assert ("cam" in item.heatmaps) == ("cam" in outputs)  # GAP -> Dense in a nested head: both
        if "cam" in outputs:
            cam_scale = float(np.abs(outputs["cam"][i]).max())
            assert np.abs(item.heatmaps["cam"] - outputs["cam"][i]).max() <= 1e-4 * cam_scale + 1e-7


@pytest.mark.parametrize("build, layer, why", [
    (lambda x: keras.layers.GlobalAveragePooling2D(name="pool")(
        keras.layers.Conv2D(4, 1, activation="softmax", name="classes")(x)), r"'classes' \(Conv2D\)",
     r"'pool' turns \(None, 14, 14, 4\) into \(None, 4\)"),
    (lambda x: keras.layers.Flatten(name="pool")(keras.layers.Softmax(axis=1, name="classes")(
        keras.layers.Conv2D(4, 14)(x))), r"'classes' \(Softmax\)",
     r"its softmax runs over axis 1 of \(None, 1, 1, 4\), not the class scores alone"),
    # Dense(softmax) [N, 4] -> Reshape((2, 2)) -> Permute((2, 1)) -> Flatten: the classes reordered
    (lambda x: keras.layers.Flatten(name="pool")(keras.layers.Permute((2, 1), name="turn")(keras.layers.Reshape(
        (2, 2), name="square")(keras.layers.Dense(4, activation="softmax", name="classes")(
            keras.layers.GlobalAveragePooling2D()(x))))), r"'classes' \(Dense\)",
     r"'square' turns \(None, 4\) into \(None, 2, 2\)"),
    (lambda x: keras.layers.Flatten(name="pool")(keras.layers.Reshape((2, 2), name="square")(
        keras.layers.Dense(4, activation="softmax", name="classes")(keras.layers.GlobalAveragePooling2D()(x)))),
     r"'classes' \(Dense\)", r"'square' turns \(None, 4\) into \(None, 2, 2\)"),
], ids=["global-pooling", "softmax-over-a-size-1-axis", "reshape-permute-flatten", "reshape-flatten"])
def test_probabilities_pooled_after_their_activation_are_refused_by_export_and_guided(build, layer, why):
    """Conv2D(softmax) -> global pooling: the output holds probabilities no logits give; export
    softmaxed them again. Both refuse, naming the layer, why and the fix. A Reshape (and Permute)
    of the probabilities before the last layer was not looked through: they were taken for logits
    (reordered by the Permute) and softmaxed again."""
    from camface.errors import ModelError
    from camface.export import exporter

    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, build(keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)))
    match = rf"its output is the \w+ of layer {layer} passed through .*'pool'.*no logits give \({why};.*Activation"
    with pytest.raises(ModelError, match=match):
        exporter.prepare(model, exporter.ExportOptions(preset="unit"))
    with pytest.raises(ModelError, match=match):
        maps.logits_model(model)


def test_a_target_inside_a_nested_head_ending_in_softmax_is_cut_before_its_logits():
    """The default target of conv -> Sequential([Conv2D, GAP, Dense(softmax)]) is the head's own
    Conv2D: the head is cut there and ends at the Dense's logits, so the graph's probs are the
    model's and guided gives the same Grad-CAM."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_export_graph import export_in_memory

    from camface.guided.snapshot import Preprocessing

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    head = keras.Sequential([keras.layers.Conv2D(5, 1, activation="relu", name="head_conv"),
                             keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(4, activation="softmax")], name="head")
    model = keras.Model(inputs, head(x))
    graph, info = export_in_memory(model, preset="unit")
    assert info.target_layer == "head/head_conv" and "cam" in info.heatmaps
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    classes = np.array([-1, 2], np.int64)
    outputs = graph(images, classes)
    want = np.asarray(model(images.astype(np.float32) / 255, training=False))
    np.testing.assert_allclose(outputs["probs"], want, rtol=1e-5, atol=1e-6)
    preprocessing = Preprocessing.from_normalization(info.color_order, info.normalization)
    scale = float(np.abs(outputs["gradcam"]).max())
    assert scale > 0
    for i, item in enumerate(Explainer(model, info.target_layer, preprocessing).explain(images, classes)):
        assert np.abs(item.heatmaps["gradcam"] - outputs["gradcam"][i]).max() <= 1e-4 * scale + 1e-7
        assert ("cam" in item.heatmaps) == ("cam" in outputs)  # GAP -> Dense in a nested head: both
        if "cam" in outputs:
            cam_scale = float(np.abs(outputs["cam"][i]).max())
            assert np.abs(item.heatmaps["cam"] - outputs["cam"][i]).max() <= 1e-4 * cam_scale + 1e-7


def test_a_target_two_nested_heads_deep_is_refused_and_one_deep_is_cut():
    """A nested head whose own last layer is a nested head ending in softmax: a target in the
    inner one cannot be cut before its logits and is refused, naming it; one in the outer is cut."""
    from camface.errors import ModelError
    from camface.export import exporter

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    head_in = keras.Input((14, 14, 6))
    inner = keras.Sequential([keras.layers.Conv2D(5, 1, name="deep_conv"), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(4, activation="softmax")], name="inner")
    head = keras.Model(head_in, inner(keras.layers.Conv2D(5, 1, name="head_conv")(head_in)), name="head")
    model = keras.Model(inputs, head(x))
    with pytest.raises(ModelError, match=r"target layer 'head/inner/deep_conv' is inside its nested head "
                                         r"'head', in a model nested in it that ends in softmax"):
        exporter.prepare(model, exporter.ExportOptions(preset="unit"))
    parts, _, info = exporter.prepare(model, exporter.ExportOptions(preset="unit", target_layer="head_conv"))
    assert info.target_layer == "head/head_conv" and "cam" not in info.heatmaps
    image = np.random.default_rng(0).random((2, 16, 16, 3), np.float32)
    probs = parts.split.probabilities(parts.split.head(parts.split.features(image)))
    np.testing.assert_allclose(probs, model(image, training=False), rtol=1e-5, atol=1e-6)


def _squeezed(head: str):
    """16x16x3 -> Conv2D "conv" (6) [N, 14, 14, 6] -> a head whose probabilities are a 1x1 map's
    channels squeezed to [N, 4]: GAP(keepdims) -> Conv2D(4, 1, softmax) -> Flatten (in a nested
    Sequential head too), or an
    all-convolutional (GAP-free) Conv2D(4, 14) to 1x1 -> sigmoid / Softmax -> Flatten, Reshape
    or global pooling of the 1x1 map."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    layers = keras.layers
    if head == "gap-conv1x1-softmax-flatten":
        x = layers.Conv2D(4, 1, activation="softmax", name="classes")(layers.GlobalAveragePooling2D(keepdims=True)(x))
        return keras.Model(inputs, layers.Flatten()(x))
    if head == "nested-gap-conv1x1-softmax-flatten":
        return keras.Model(inputs, keras.Sequential([
            layers.GlobalAveragePooling2D(keepdims=True), layers.Conv2D(4, 1, activation="softmax", name="classes"),
            layers.Flatten()], name="head")(x))
    if head == "gap-conv1x1-softmax-reshape-permute-flatten":  # [N, 1, 1, 4] -> [N, 4, 1] -> [N, 1, 4] -> [N, 4]
        x = layers.Conv2D(4, 1, activation="softmax", name="classes")(layers.GlobalAveragePooling2D(keepdims=True)(x))
        return keras.Model(inputs, layers.Flatten()(layers.Permute((2, 1))(layers.Reshape((4, 1))(x))))
    if head == "nested-gap-conv1x1-softmax-reshape-permute-flatten":
        return keras.Model(inputs, keras.Sequential([
            layers.GlobalAveragePooling2D(keepdims=True), layers.Conv2D(4, 1, activation="softmax", name="classes"),
            layers.Reshape((4, 1)), layers.Permute((2, 1)), layers.Flatten()], name="head")(x))
    if head == "all-conv-sigmoid-flatten":
        return keras.Model(inputs, layers.Flatten()(layers.Conv2D(4, 14, activation="sigmoid", name="classes")(x)))
    if head == "all-conv-softmax-reshape-dropout":
        x = layers.Softmax()(layers.Conv2D(4, 14, name="classes")(x))
        return keras.Model(inputs, layers.Dropout(0.3)(layers.Reshape((4,))(x)))
    if head == "all-conv-softmax-reshape-permute-flatten":  # [N, 1, 1, 4] -> [N, 4, 1] -> [N, 1, 4] -> [N, 4]
        x = layers.Softmax()(layers.Conv2D(4, 14, name="classes")(x))
        return keras.Model(inputs, layers.Flatten()(layers.Permute((2, 1))(layers.Reshape((4, 1))(x))))
    x = layers.Activation("softmax")(layers.Conv2D(4, 14, name="classes")(x))  # "all-conv-softmax-gap"
    return keras.Model(inputs, layers.GlobalAveragePooling2D()(x))


@pytest.mark.parametrize("head", ["gap-conv1x1-softmax-flatten", "nested-gap-conv1x1-softmax-flatten",
                                  "gap-conv1x1-softmax-reshape-permute-flatten",
                                  "nested-gap-conv1x1-softmax-reshape-permute-flatten",
                                  "all-conv-sigmoid-flatten",
                                  "all-conv-softmax-reshape-dropout", "all-conv-softmax-gap",
                                  "all-conv-softmax-reshape-permute-flatten"])
def test_probabilities_squeezed_off_a_1x1_map_are_explained_at_its_channels(head):
    """A 1x1 map of probabilities flattened (or pooled) to [N, classes] was refused ('probabilities
    that no logits give'), though its channels are the class scores and the softmax runs over
    them. Export and guided now explain the logits, the map's channels before the activation:
    the graph's probs are the model's, guided gives the same class and Grad-CAM, and CAM (GAP ->
    1x1 conv) is the conv's kernel's weighted sum of the activations. Guided has CAM exactly when
    the graph has it, with the same weights: behind a Permute of the size-1 axes (after the
    probabilities, not in the head) it had none."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_export_graph import export_in_memory

    from camface.guided.snapshot import Preprocessing

    keras.utils.set_random_seed(0)
    model = _squeezed(head)
    graph, info = export_in_memory(model, preset="unit")
    assert info.target_layer == "conv" and ("cam" in info.heatmaps) == ("gap-" in head)
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    classes = np.array([-1, 0, 3], np.int64)
    outputs = graph(images, classes)
    want = np.asarray(model(images.astype(np.float32) / 255, training=False))
    np.testing.assert_allclose(outputs["probs"], want, rtol=1e-5, atol=1e-6)
    chosen = np.where(classes < 0, want.argmax(1), classes)
    if "cam" in info.heatmaps:
        owner = model.get_layer("head") if head.startswith("nested") else model
        kernel = np.asarray(owner.get_layer("classes").kernel)[0, 0]  # [6, 4]
        expected = np.einsum("nhwk,kn->nhw", outputs["activations"], kernel[:, chosen])
        np.testing.assert_allclose(outputs["cam"], expected, rtol=1e-4,
                                   atol=1e-5 * float(np.abs(expected).max()))
    preprocessing = Preprocessing.from_normalization(info.color_order, info.normalization)
    scale = float(np.abs(outputs["gradcam"]).max())
    assert scale > 0
    explainer = Explainer(model, "conv", preprocessing)
    assert ("cam" in explainer.methods) == ("cam" in info.heatmaps) and (explainer.cam_reason == "") == ("gap-" in head)
    if "cam" in info.heatmaps:
        np.testing.assert_array_equal(maps.cam_weights(model, "conv")[0], kernel)
    for i, item in enumerate(explainer.explain(images, classes)):
        assert ("cam" in item.heatmaps) == ("cam" in info.heatmaps)
        np.testing.assert_allclose(item.probs, want[i], rtol=1e-5, atol=1e-6)
        assert item.explained == chosen[i]
        assert np.abs(item.heatmaps["gradcam"] - outputs["gradcam"][i]).max() <= 1e-4 * scale + 1e-7
        if "cam" in info.heatmaps:
            assert np.abs(item.heatmaps["cam"] - outputs["cam"][i]).max() <= 1e-4 * float(np.abs(outputs["cam"]).max())
