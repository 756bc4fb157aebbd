"""The original study's classifier architectures, for training and tests.

Each builder returns an uncompiled `keras.Model` whose head lets camface compute CAM:
  resnet50_gap     ResNet50 (frozen) -> GlobalAveragePooling -> Dense(softmax)
  vgg16_conv_gap   VGG16 conv base -> Conv2D(1024, 3x3, relu) -> GlobalAveragePooling -> Dense(softmax)
  mobilenetv2_gap  MobileNetV2 -> GlobalAveragePooling -> Dense(softmax)

Input: float32 [N, input_size, input_size, 3], preprocessed as the backbone's ImageNet weights
expect; `PRESETS` names the matching `camface export --preset`:
  ResNet50, VGG16  "imagenet-caffe": BGR channel order, ImageNet mean subtracted, no scaling
                   (keras.applications.resnet50/vgg16.preprocess_input)
  MobileNetV2      "tf": RGB, x / 127.5 - 1 (keras.applications.mobilenet_v2.preprocess_input)

`weights="imagenet"` needs the Keras weight file: downloaded once into ~/.keras/models (network),
or give a local .h5 path. `weights=None` builds random weights (tests, training from scratch).
`nested=True` puts the backbone in the model as one layer (Keras' transfer-learning guide style:
`x = base(inputs, training=False)`); `nested=False` builds one flat graph. camface's target
layers are named `backbone/layer` in the nested form.
"""

from __future__ import annotations

from pathlib import Path

from camface.errors import ModelError

PRESETS = {"resnet50_gap": "imagenet-caffe", "vgg16_conv_gap": "imagenet-caffe",
           "mobilenetv2_gap": "tf"}


def resnet50_gap(num_classes: int, input_size: int = 224, weights: str | Path | None = "imagenet",
                 nested: bool = False, trainable_base: bool = False):
    """ResNet50 (frozen unless `trainable_base`) -> GAP -> Dense(num_classes, softmax).
    Default camface target: `conv5_block3_out` (input_size / 32 square)."""
    import keras

    base = _backbone(keras.applications.ResNet50, weights, input_size)
    base.trainable = trainable_base
    return _with_head(base, num_classes, nested, "resnet50_gap")


def vgg16_conv_gap(num_classes: int, input_size: int = 224, weights: str | Path | None = "imagenet",
                   nested: bool = False, trainable_base: bool = True):
    """VGG16 conv base -> Conv2D(1024, 3x3, same, relu) `cam_conv` -> GAP -> Dense(softmax).
    Default camface target: `cam_conv` (input_size / 32 square)."""
    import keras

    base = _backbone(keras.applications.VGG16, weights, input_size)
    base.trainable = trainable_base
    extra = keras.layers.Conv2D(1024, 3, padding="same", activation="relu", name="cam_conv")
    return _with_head(base, num_classes, nested, "vgg16_conv_gap", extra=extra)


def mobilenetv2_gap(num_classes: int, input_size: int = 224,
                    weights: str | Path | None = "imagenet", nested: bool = False,
                    trainable_base: bool = True, alpha: float = 1.0):
    """MobileNetV2 (width `alpha`) -> GAP -> Dense(softmax).
    Default camface target: `out_relu` (input_size / 32 square)."""
    import keras

    base = _backbone(keras.applications.MobileNetV2, weights, input_size, alpha=alpha)
    base.trainable = trainable_base
    return _with_head(base, num_classes, nested, "mobilenetv2_gap")


BUILDERS = {"resnet50_gap": resnet50_gap, "vgg16_conv_gap": vgg16_conv_gap,
            "mobilenetv2_gap": mobilenetv2_gap}
# `--backbone` of `camface train` and `camface bench` -> its builder: one name per architecture.
BACKBONES = {"resnet50": "resnet50_gap", "vgg16": "vgg16_conv_gap", "mobilenetv2": "mobilenetv2_gap"}
BACKBONE_ALIASES = {"vgg16-gap": "vgg16"}  # `camface train`'s earlier spelling, still accepted


def backbone_name(text: str) -> str:
    """argparse `type` of `--backbone`: an alias becomes its name (`choices` checks the rest)."""
    return BACKBONE_ALIASES.get(text, text)


def _backbone(application, weights, input_size: int, **kwargs):
    if weights not in (None, "imagenet"):
        weights = str(weights)
        if not Path(weights).is_file():
            raise ModelError(f"weights file not found: {weights}")
    try:
        return application(include_top=False, weights=weights,
                           input_shape=(input_size, input_size, 3), **kwargs)
    except Exception as exc:
        if weights == "imagenet" and _looks_like_network_error(exc):
            raise ModelError(
                f"{application.__name__} ImageNet weights are not in ~/.keras/models and could "
                f"not be downloaded ({type(exc).__name__}); use weights=None for random weights "
                "or weights=PATH for a local .h5 file") from exc
        raise


def _looks_like_network_error(exc: BaseException) -> bool:
    import urllib.error

    while exc is not None:
        if isinstance(exc, (urllib.error.URLError, OSError, ConnectionError, TimeoutError)):
            return True
        if "URL fetch failure" in str(exc) or "download" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _with_head(base, num_classes: int, nested: bool, name: str, extra=None):
    import keras

    if nested:
        inputs = keras.Input(base.input.shape[1:], name="image")
        x = base(inputs, training=False)
    else:
        inputs, x = base.input, base.output
    if extra is not None:
        x = extra(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)
