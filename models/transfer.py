"""Transfer learning in Keras for `camface train`: build, freeze, fit, fine-tune.

The original study's recipe: an ImageNet backbone, frozen, then global average pooling and a
Dense softmax trained on the user's faces; optionally the backbone's last block is unfrozen and
fine-tuned at a low learning rate. Models come from `camface.models.builders`, so training and
the exporter agree on layer names and preprocessing.

Data reach the model as uint8 crops; `tf_dataset` applies augmentation (training only) and then
the backbone's normalisation (the exporter's `Preprocessing`, which the CAM graph later bakes in),
so the trained model and its ONNX graph see the same numbers.

TensorFlow and Keras are imported inside functions (the CLI imports this package).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camface.errors import ModelError

log = logging.getLogger(__name__)

# Layers of each backbone's last block, by name prefix: what --fine-tune-epochs unfreezes.
LAST_BLOCK_PREFIXES: dict[str, tuple[str, ...]] = {
    "resnet50": ("conv5_",),
    "vgg16-gap": ("block5_",),
    "mobilenetv2": ("block_16_", "Conv_1", "out_relu"),
}


@dataclass(frozen=True)
class StageResult:
    """One call of `fit_stage`: per-epoch history and the best validation accuracy seen."""

    name: str
    history: dict
    epochs_run: int
    best_val_accuracy: float
    best_epoch: int  # 1-based within the stage; 0 when no epoch improved on the previous best


def build_model(backbone: str, input_size: int, num_classes: int, weights: str, seed: int):
    """Backbone -> GAP -> Dense(softmax) via camface.models.builders, backbone frozen.

    weights: "imagenet", "none" or a path to a weights file (.h5 / .weights.h5 for the
    backbone without its top). A failed ImageNet download (no network) becomes a ModelError that
    suggests `--weights none` or a local file.
    """
    import keras

    from camface.models import builders

    keras.utils.set_random_seed(seed)
    keras_weights = None if weights == "none" else weights
    try:
        model = builders.build(backbone, input_shape=(input_size, input_size, 3),
                               num_classes=num_classes, weights=keras_weights)
    except Exception as exc:
        if weights == "imagenet" and _looks_like_download_failure(exc):
            raise ModelError(
                f"cannot download the ImageNet weights of {backbone} (no network?): {_first_line(exc)}. "
                f"Train from scratch with --weights none, or pass a local weights file with "
                f"--weights PATH (e.g. a copy of ~/.keras/models/ from a machine that has it)") from exc
        if weights not in ("imagenet", "none"):
            raise ModelError(f"--weights {weights}: cannot load it into {backbone} "
                             f"({_first_line(exc)})") from exc
        raise
    set_backbone_trainable(model, backbone, "none")
    return model


def _looks_like_download_failure(exc: BaseException) -> bool:
    """Keras' get_file wraps URLError/HTTPError in a plain Exception("URL fetch failure ...")."""
    import urllib.error

    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
        if len(chain) > 10:
            break
    text = " ".join(str(e) for e in chain).lower()
    return (any(isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError)) for e in chain)
            or "url fetch failure" in text or "download" in text)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def backbone_layers(model) -> list:
    """The backbone's layers (not the head), flattened through a nested backbone model."""
    from camface.models import builders

    return list(builders.backbone_layers(model))


def set_backbone_trainable(model, backbone: str, part: str) -> int:
    """Freeze the backbone ("none"), unfreeze its last block ("last-block") or all of it
    ("all"); the head stays trainable. BatchNormalization layers stay frozen in every case
    (inference mode, as Keras' transfer-learning guide advises: small batches would wreck their
    statistics). Returns the number of backbone layers left trainable."""
    import keras

    if part not in ("none", "last-block", "all"):
        raise ValueError(f"unknown part {part!r}")
    prefixes = LAST_BLOCK_PREFIXES[backbone]
    layers = backbone_layers(model)
    for nested in model.layers:  # a nested backbone must be trainable for its layers to be
        if isinstance(nested, keras.Model):
            nested.trainable = True
    trainable = 0
    for layer in layers:
        unfreeze = (part == "all" or (part == "last-block" and layer.name.startswith(prefixes))) \
            and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = unfreeze
        trainable += unfreeze
    return trainable


def calibrate_batchnorm(model, images: np.ndarray) -> int:
    """Set every BatchNormalization layer's moving mean/variance from `images` (float32,
    normalised, [N, H, W, 3]) in one forward pass; returns how many layers were set.

    For `--weights none` only: a randomly initialised backbone carries no statistics (mean 0,
    variance 1), and through MobileNetV2's ~50 frozen layers its activations then shrink to
    ~1e-12, leaving the head nothing to learn from. Estimating the statistics on the training
    crops (a data-dependent initialisation, as AdaBN does for domain shift: Li et al.,
    arXiv:1603.04779) gives well-scaled random features.
    """
    import keras

    layers = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers:
        return 0
    saved = [(layer, layer.momentum, layer.trainable) for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0  # moving stat := this batch's stat
            layer.trainable = True  # Keras 3 BN updates only when trainable and training
        _calibration_model(model)(images, training=True)
    finally:
        for layer, momentum, trainable in saved:
            layer.momentum = momentum
            layer.trainable = trainable
    return len(layers)


def _calibration_model(model):
    """`model`, or its nested backbone when the backbone is called with training=False
    (baked into the graph; calling the outer model with training=True would not reach it)."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return _NestedRunner(model, layer)
    return model


class _NestedRunner:
    """Runs the layers before a nested backbone, then the backbone itself in training mode."""

    def __init__(self, model, nested):
        import keras

        self.before = keras.Model(model.inputs, nested._inbound_nodes[0].input_tensors[0])
        self.nested = nested

    def __call__(self, images, training: bool):
        return self.nested(self.before(images, training=False), training=training)


def _all_layers(model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        yield layer


def augmentation(seed: int):
    """Training-only augmentation (the study's: horizontal flip, shifts, small shear), on
    float32 [N, H, W, 3] in 0..255 before normalisation."""
    import keras

    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 1),
        keras.layers.RandomShear(x_factor=0.1, y_factor=0.1, fill_mode="reflect", seed=seed + 2),
    ], name="augmentation")


def normalise(images, preprocessing):
    """uint8/float [N, H, W, 3] BGR (0..255) -> float32 model input in the backbone's colour order,
    x * scale + offset: the same map the exported CAM graph applies to its uint8 input."""
    import tensorflow as tf

    x = tf.cast(images, tf.float32)
    if preprocessing.color_order == "RGB":
        x = x[..., ::-1]
    elif preprocessing.color_order == "GRAY":
        raise ModelError("camface train builds 3-channel models; a GRAY preset does not apply")
    scale = tf.constant(preprocessing.scale, tf.float32)
    offset = tf.constant(preprocessing.offset, tf.float32)
    return x * scale + offset


def tf_dataset(images_bgr: np.ndarray, targets: np.ndarray, batch_size: int, preprocessing,
               augment=None, shuffle_seed: int | None = None):
    """tf.data pipeline: uint8 BGR crops [N, S, S, 3] + int64 targets -> batches of
    (normalised float32, target). `augment` (a Keras layer) runs on training data only, on the
    fly, so every epoch sees new variants; shuffle_seed None keeps the order (val/test)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images_bgr, targets))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(targets), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(tf.cast(x, tf.float32), training=True), y),
                    num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x, y: (normalise(x, preprocessing), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def fit_stage(model, name: str, train_ds, val_ds, epochs: int, learning_rate: float,
              checkpoint: Path, class_weight: dict[int, float], patience: int,
              best_so_far: float | None = None) -> StageResult:
    """Compile and fit; the checkpoint keeps the best validation accuracy (of this stage, and
    better than `best_so_far` from an earlier stage); early stopping after `patience` epochs
    without improvement. Keras prints one progress line per epoch."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    callbacks = [
        keras.callbacks.ModelCheckpoint(str(checkpoint), monitor="val_accuracy", mode="max",
                                        save_best_only=True, initial_value_threshold=best_so_far),
        keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=patience),
    ]
    log.info("%s: %d epoch(s) at learning rate %g, %d trainable weight tensors", name, epochs,
             learning_rate, len(model.trainable_weights))
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, class_weight=class_weight,
                        callbacks=callbacks, verbose=2)
    values = [float(v) for v in history.history.get("val_accuracy", [])]
    best = max(values) if values else float("nan")
    improved = best_so_far is None or best > best_so_far
    return StageResult(name=name, history={k: [float(v) for v in vs] for k, vs in history.history.items()},
                       epochs_run=len(values), best_val_accuracy=best,
                       best_epoch=(values.index(best) + 1) if improved and values else 0)
