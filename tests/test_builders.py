"""The study's architectures (models/builders.py), built small with random weights."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from camface.errors import ModelError

# builder -> (default camface target, flat; nested name of the backbone layer)
EXPECTED = {
    "resnet50_gap": ("conv5_block3_out", "resnet50"),
    "vgg16_conv_gap": ("cam_conv", "vgg16"),
    "mobilenetv2_gap": ("out_relu", "mobilenetv2_1.00_32"),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def built(request):
    from camface.models import builders

    name = request.param
    return name, builders.BUILDERS[name](4, input_size=32, weights=None)


def test_head_shape_and_default_target(built):
    from camface.export import keras_model

    name, model = built
    target, _ = EXPECTED[name]
    assert model.name == name and model.output.shape[-1] == 4
    assert keras_model.default_target_layer(model) == target
    split = keras_model.split_model(model, [target])
    assert [type(layer).__name__ for layer in split.head_layers] == ["GlobalAveragePooling2D",
                                                                     "Dense"]
    channels = 1024 if name == "vgg16_conv_gap" else int(model.get_layer(target).output.shape[-1])
    weights, why = keras_model.cam_weights(split, 4, channels)
    assert why == "" and weights.shape == (channels, 4)
    np.testing.assert_array_equal(weights, np.asarray(model.get_layer("predictions").kernel))
    probs = np.asarray(model(np.zeros((2, 32, 32, 3), np.float32)))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_resnet_base_is_frozen_and_head_trains(built):
    name, model = built
    head = model.get_layer("predictions")
    assert head.trainable and head.trainable_weights
    first_conv = next(layer for layer in model.layers if type(layer).__name__ == "Conv2D")
    assert first_conv.trainable == (name != "resnet50_gap")


def test_nested_backbone_target_names():
    from camface.export import keras_model
    from camface.models import builders

    model = builders.mobilenetv2_gap(3, input_size=32, weights=None, nested=True, alpha=0.35)
    backbone = next(layer for layer in model.layers if type(layer).__name__ == "Functional")
    assert keras_model.default_target_layer(model) == f"{backbone.name}/out_relu"
    # a bare inner name resolves to its path; candidates list nested layers
    assert keras_model.resolve_target(model, "block_16_project") == [backbone.name,
                                                                     "block_16_project"]
    assert f"{backbone.name}/Conv1" in keras_model.candidate_layers(model)


def test_imagenet_weights_offline_is_a_clear_error(monkeypatch):
    from keras.src.utils import file_utils

    from camface.models import builders

    def no_network(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- "
                        "[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", no_network)
    with pytest.raises(ModelError, match="weights=None .* weights=PATH"):
        builders.vgg16_conv_gap(2, input_size=32, weights="imagenet")


def test_missing_weights_file(tmp_path):
    from camface.models import builders

    with pytest.raises(ModelError, match="weights file not found: .*nope.h5"):
        builders.resnet50_gap(2, input_size=32, weights=tmp_path / "nope.h5")


def test_presets_name_the_preprocessing():
    from camface.export.preprocess import PRESETS as EXPORT_PRESETS
    from camface.models import builders

    assert set(builders.PRESETS) == set(builders.BUILDERS)
    assert all(preset in EXPORT_PRESETS for preset in builders.PRESETS.values())
    assert builders.PRESETS["resnet50_gap"] == "imagenet-caffe"
    assert builders.PRESETS["mobilenetv2_gap"] == "tf"
