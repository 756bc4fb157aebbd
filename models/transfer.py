"""Transfer learning in Keras for `camface train`: build, freeze, fit, fine-tune.

The original study's recipe: an ImageNet backbone, frozen, then global average pooling and a
Dense softmax trained on the user's faces; optionally the backbone's last block is unfrozen and
fine-tuned at a low learning rate. With random weights (`--weights none`) there is nothing to
transfer: the whole network trains from scratch, its BatchNorm statistics re-estimated before
each validation ("precise BN"). Models come from `camface.models.builders`, so training and the
exporter agree on layer names and preprocessing.

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
    "vgg16": ("block5_",),
    "mobilenetv2": ("block_16_", "Conv_1", "out_relu"),
}


@dataclass(frozen=True)
class Classifier:
    """A built model and which of its layers are the backbone (the rest is the head)."""

    model: object  # keras.Model: float32 [N, S, S, 3] normalised -> probabilities [N, classes]
    backbone: str  # --backbone name
    backbone_layers: tuple  # the pretrained part's layers, in order


@dataclass(frozen=True)
class StageResult:
    """One call of `fit_stage`: per-epoch history and the best validation accuracy seen."""

    name: str
    history: dict
    epochs_run: int
    best_val_accuracy: float  # of the checkpoint so far (this stage or an earlier one)
    best_val_loss: float
    best_epoch: int  # 1-based within the stage; 0 when no epoch improved on the previous best


# The names Keras 3's load_weights reads, by their ending (case as written: "W.H5" is refused),
# and what each must hold: HDF5 (legacy and .weights.h5), a zip (.keras), a JSON index of shards
WEIGHTS_FORMATS = ((".weights.json", "a JSON index of weight shards"), (".weights.h5", "an HDF5 file"),
                   (".h5", "an HDF5 file"), (".hdf5", "an HDF5 file"), (".keras", "a zip archive"))


def check_weights_file(weights: str, backbone: str) -> None:
    """ModelError naming --weights, before any photo is cropped, when `weights` (a path, not
    imagenet or none) is no file Keras can read weights from: missing, a folder, a name Keras
    does not read (notes.txt), or content other than its name says (a text file named .h5).
    Keras said so only when the model was built, after every photo was cropped. Reads an HDF5
    or zip file's signature only (h5py's check: HDF5's may follow a user block), a JSON index whole."""
    if weights in ("imagenet", "none"):
        return
    path = Path(weights)
    use = f"use imagenet, none or a path to a weights file of the {backbone} backbone without its top"
    if not path.is_file():
        what = "a folder, not a weights file" if path.is_dir() else "no such file"
        raise ModelError(f"--weights {weights}: {what} ({use})")
    fmt = next((f for f in WEIGHTS_FORMATS if str(path).endswith(f[0])), None)
    if fmt is None:
        raise ModelError(f"--weights {weights}: not a Keras weights file (Keras reads "
                         f"{', '.join(f[0] for f in WEIGHTS_FORMATS[1:])} and sharded .weights.json files; {use})")
    suffix, holds = fmt
    try:
        right = _holds(path, suffix)
    except OSError as exc:  # no read permission
        raise ModelError(f"--weights {weights}: cannot read it: {exc.strerror or exc}") from exc
    if not right:
        raise ModelError(f"--weights {weights}: not a Keras weights file (a {suffix} file is {holds}; this one "
                         "is not: damaged, or another file renamed)")


def _holds(path: Path, suffix: str) -> bool:
    """Whether `path` holds what Keras reads from a file named `suffix` (see WEIGHTS_FORMATS)."""
    if suffix == ".keras":
        import zipfile

        return zipfile.is_zipfile(path)
    if suffix == ".weights.json":
        import json

        try:
            return isinstance(json.loads(path.read_bytes()), dict)
        except ValueError:  # not JSON, or not UTF-8
            return False
    import h5py

    with path.open("rb"):  # h5py says False for a file it cannot open: a permission is said as one
        pass
    return h5py.is_hdf5(str(path))


def build_model(backbone: str, input_size: int, num_classes: int, weights: str,
                seed: int) -> Classifier:
    """Backbone -> GAP -> Dense(softmax) from camface.models.builders (flat graph, so the
    exporter's default target layer is the study's last conv), backbone frozen.

    weights: "imagenet", "none" or a path to a weights file of the backbone without its top.
    A failed ImageNet download (no network) becomes a ModelError that suggests `--weights none`
    or a local file.
    """
    import keras

    from camface.models import builders

    keras.utils.set_random_seed(seed)
    build = builders.BUILDERS[builders.BACKBONES[backbone]]
    try:
        model = build(num_classes, input_size=input_size,
                      weights=None if weights == "none" else weights, trainable_base=False)
    except Exception as exc:
        if weights == "imagenet" and _looks_like_download_failure(exc):
            missing = _weights_file_name(exc) or "its weights file"
            raise ModelError(
                f"cannot download the ImageNet weights of {backbone} (no network?): {missing} is "
                "not in ~/.keras/models. Train from scratch with --weights none, or pass a local "
                "weights file with --weights PATH (e.g. copied from ~/.keras/models/ on a machine "
                "that has it)") from exc
        if weights not in ("imagenet", "none"):
            raise ModelError(f"--weights {weights}: cannot load it into {backbone} "
                             f"({_first_line(exc)})") from exc
        raise
    # The builder froze its base (trainable_base=False): the frozen layers are the backbone.
    layers = tuple(layer for layer in model.layers
                   if not layer.trainable and type(layer).__name__ != "InputLayer")
    return Classifier(model, backbone, layers)


def _looks_like_download_failure(exc: BaseException) -> bool:
    """Keras' get_file wraps URLError/HTTPError in a plain Exception("URL fetch failure ...");
    the builders turn that into a ModelError that says "could not be downloaded"."""
    import urllib.error

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)):
            return True
        text = str(exc).lower()
        if "url fetch failure" in text or "download" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _weights_file_name(exc: BaseException) -> str | None:
    """The .h5 file Keras tried to download, from the URL in its "URL fetch failure on URL"
    message somewhere in the exception chain; None when no message names one."""
    import re

    seen = 0
    while exc is not None and seen < 10:
        found = re.search(r"https?://\S+/([^/\s:]+\.h5)", str(exc))
        if found:
            return found.group(1)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def set_backbone_trainable(classifier: Classifier, part: str) -> int:
    """Which backbone layers train; the head always does. Returns how many backbone layers train.

    "none": the backbone is frozen (transfer learning's first stage).
    "last-block": only its last block trains (fine-tuning); BatchNormalization layers stay
        frozen, in inference mode, as Keras' transfer-learning guide advises (small batches would
        wreck the ImageNet statistics).
    "all": every layer trains, BatchNormalization included (training from scratch, for
        --weights none: random features are not worth freezing). Pair it with
        `precise_batchnorm` so validation and the checkpoint use exact statistics.
    """
    import keras

    if part not in ("none", "last-block", "all"):
        raise ValueError(f"unknown part {part!r}")
    prefixes = LAST_BLOCK_PREFIXES[classifier.backbone]
    trainable = 0
    for layer in classifier.backbone_layers:
        if part == "all":
            unfreeze = True
        else:
            unfreeze = (part == "last-block" and layer.name.startswith(prefixes)
                        and not isinstance(layer, keras.layers.BatchNormalization))
        layer.trainable = unfreeze
        trainable += unfreeze
    return trainable


def calibrate_batchnorm(model, images) -> int:
    """Set every BatchNormalization layer's moving mean/variance to the statistics of `images`
    (float32, normalised, [N, H, W, 3]) in one forward pass; returns how many layers were set.

    "Precise BN" (Wu & Johnson, arXiv:2105.07576, sec. 3): while a network trains from scratch
    its weights move faster than the moving averages (momentum 0.99) follow, so on a small
    dataset's few steps the averages lag far behind and inference is off; statistics
    re-estimated with the current weights make inference match training. `model` must be a
    flat graph (a nested model called with training=False would not update).
    """
    import keras

    layers = [layer for layer in model.layers
              if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers:
        return 0
    saved = [(layer, layer.momentum, layer.trainable) for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0  # moving statistic := this batch's statistic
            layer.trainable = True  # Keras 3 BN updates its statistics only when trainable
        model(images, training=True)
    finally:
        for layer, momentum, trainable in saved:
            layer.momentum = momentum
            layer.trainable = trainable
    return len(layers)


def precise_batchnorm(images):
    """Keras callback: `calibrate_batchnorm(model, images)` before every validation, so the
    validation accuracy, and the checkpoint saved after it, use exact statistics."""
    import keras

    class PreciseBatchNorm(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            calibrate_batchnorm(self.model, images)

    return PreciseBatchNorm()


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
        # Sequential on purpose: the augmentation's random state advances call by call, so a
        # fixed --seed gives the same augmented images in the same order on every run.
        ds = ds.map(lambda x, y: (augment(tf.cast(x, tf.float32), training=True), y))
    ds = ds.map(lambda x, y: (normalise(x, preprocessing), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def best_checkpoint(path: Path, patience: int, best_so_far: tuple[float, float] | None = None):
    """Keras callback: save the model to `path` whenever validation gets better, stop after
    `patience` epochs without it getting better.

    "Better" is a higher validation accuracy, ties going to a lower validation loss: with the
    few validation photos a small dataset has, accuracy ties are common (6 photos allow only 7
    values) and Keras' ModelCheckpoint/EarlyStopping on accuracy alone would keep the first,
    barely trained epoch. `best_so_far` (accuracy, loss) carries an earlier stage's best over.
    Each save is written beside `path` and renamed: a failure (a full disk) is an OutputError
    naming `path`, and the checkpoint saved before stays whole.
    """
    import keras

    from camface.outputs import replace_whole

    class BestCheckpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best = best_so_far
            self.best_epoch = 0  # 1-based; 0 = nothing better than best_so_far
            self.waited = 0

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            score = (float(logs["val_accuracy"]), -float(logs["val_loss"]))
            if self.best is None or score > (self.best[0], -self.best[1]):
                self.best = (score[0], -score[1])
                self.best_epoch = epoch + 1
                self.waited = 0
                # beside and renamed: a full disk or Ctrl-C midway keeps the earlier checkpoint
                replace_whole(path, self.model.save)
            else:
                self.waited += 1
                if self.waited >= patience:
                    self.model.stop_training = True

    return BestCheckpoint()


def fit_stage(model, name: str, train_ds, val_ds, epochs: int, learning_rate: float,
              checkpoint: Path, class_weight: dict[int, float], patience: int,
              best_so_far: tuple[float, float] | None = None,
              callbacks: tuple = ()) -> StageResult:
    """Compile and fit with `best_checkpoint` (best validation accuracy, ties to the lower loss,
    better than `best_so_far` (accuracy, loss) from an earlier stage; early stopping after
    `patience` epochs without improvement). Keras prints one progress line per epoch."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    keeper = best_checkpoint(checkpoint, patience, best_so_far)
    log.info("%s: up to %d epoch(s) at learning rate %g, %d trainable weight tensors", name,
             epochs, learning_rate, len(model.trainable_weights))
    # `callbacks` go first: precise_batchnorm must run before validation and the checkpoint.
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, class_weight=class_weight,
                        callbacks=[*callbacks, keeper], verbose=2,
                        shuffle=False)  # tf_dataset shuffles, with the seed
    values = history.history.get("val_accuracy", [])
    best = keeper.best or (float("nan"), float("nan"))
    return StageResult(name=name,
                       history={k: [float(v) for v in vs] for k, vs in history.history.items()},
                       epochs_run=len(values), best_val_accuracy=best[0], best_val_loss=best[1],
                       best_epoch=keeper.best_epoch)
