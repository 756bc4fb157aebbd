"""The baseline `camface bench --baseline keras` compares against: Grad-CAM computed the way
the original study and the Keras Grad-CAM example do it, one face at a time.

Grad-CAM (Selvaraju et al., arXiv:1610.02391, eq. 1-2): alpha_k = spatial mean of
d(logit_c) / dA_k, heatmap = ReLU(sum_k alpha_k A_k), with the PRE-softmax logit, as in the
Keras example (https://keras.io/examples/vision/grad_cam/), which removes the final softmax,
builds `grad_model = Model(inputs, [target.output, logits])`, and for each image runs it
eagerly under `tf.GradientTape`, then `tape.gradient`, `reduce_mean` and a matrix product.

One kindness to the baseline: the example builds `grad_model` inside its per-image function;
here it is built once, so the comparison measures the per-face eager tape, not model building.

TensorFlow is imported in `KerasGradCam.__init__`, never at module level; `camface bench`
loads this module only for `--baseline keras`. TF_ENABLE_ONEDNN_OPTS=0 is set before that
import: eager convolution gradients segfault in oneDNN on some CPUs (TF 2.21: the eager
gradient of every Conv2D computes Conv2DBackpropFilter too, which crashes). TensorFlow reads
the variable once, when it loads: one imported before it was set keeps oneDNN on, so the
baseline refuses to run in that process (`check_onednn_off`) rather than crash it.
CAMFACE_ALLOW_ONEDNN=1 is for a CPU where oneDNN's gradients work: the variable is then left
alone (TensorFlow's default, oneDNN on for x86 Linux) and oneDNN is not refused.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from camface.errors import CamfaceError, ModelError, UsageError

ALLOW_ONEDNN = "CAMFACE_ALLOW_ONEDNN"  # 1: run the baseline with oneDNN on (a CPU where it works)


def onednn_allowed() -> bool:
    """Whether CAMFACE_ALLOW_ONEDNN is 1; 0 or unset: no. UsageError for another value (a
    "true" or "yes" read as no would refuse, or crash, with the user thinking it was set)."""
    value = os.environ.get(ALLOW_ONEDNN, "").strip()
    if value not in ("", "0", "1"):
        raise UsageError(f"{ALLOW_ONEDNN} must be 0 or 1, got {value!r}")
    return value == "1"


def check_onednn_off() -> None:
    """CamfaceError when this process's TensorFlow is loaded with oneDNN on, where the eager
    baseline crashes (a segfault in Conv2DBackpropFilter); nothing when TensorFlow is not loaded
    yet (`_import_tensorflow` sets TF_ENABLE_ONEDNN_OPTS=0 first). TensorFlow fixes the setting
    when it loads: setting the variable afterwards (a module that imported TensorFlow before
    `camface bench` ran in the same process) left it on, and the old check of the variable alone
    said nothing. CAMFACE_ALLOW_ONEDNN=1: nothing (a CPU where oneDNN's gradients work)."""
    if "tensorflow" not in sys.modules or onednn_allowed():
        return
    try:  # the setting TensorFlow loaded with (private, but the only place that says it)
        from tensorflow.python.util import _pywrap_util_port

        on = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # a TensorFlow without it: the variable is all there is
        on = os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0"
    if on:
        raise CamfaceError("the Keras baseline cannot run in this process: TensorFlow was loaded with oneDNN on "
                           "(TF_ENABLE_ONEDNN_OPTS was not 0 when it was imported), and eager convolution gradients "
                           "crash in oneDNN; set TF_ENABLE_ONEDNN_OPTS=0 before TensorFlow is imported (in the "
                           "environment, or before `import tensorflow`), or run `camface bench` in a process of its own; "
                           f"on a CPU where oneDNN's gradients work, {ALLOW_ONEDNN}=1 allows it")


def prepare_environment() -> None:
    """Before TensorFlow loads: TF_ENABLE_ONEDNN_OPTS=0 (unless it is set, or CAMFACE_ALLOW_ONEDNN
    is 1) and its start-up logging off; nothing once it is loaded (it has read them)."""
    if "tensorflow" not in sys.modules:
        if not onednn_allowed():
            os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _import_tensorflow():
    prepare_environment()
    check_onednn_off()  # before the import too: loaded already, it is said without loading keras
    from camface.native import quiet_native_stderr

    with quiet_native_stderr():  # CUDA-stub and absl start-up lines written straight to fd 2
        import tensorflow as tf

    check_onednn_off()  # TF_ENABLE_ONEDNN_OPTS=1 in the environment
    return tf


class KerasGradCam:
    """`explain(crops, class_index) -> (probs, heatmaps)` with a Keras model, per face, eagerly.

    keras_path: the .keras/.h5 model the CAM graph was exported from (same weights).
    target_layer: the layer whose activations Grad-CAM weighs (the graph's `target_layer`;
        a flat layer name: nested backbones are not supported by the Keras example's recipe).
    scale, offset: the graph's normalisation (x * scale + offset, per channel or one value).
    input_shape, classes: the graph's crops (H, W, C) and class count, when known: a model that
        differs is refused (ModelError) here, not by Keras on the first face.
    """

    provider = "TensorFlow eager"

    def __init__(self, keras_path: str | Path, target_layer: str,
                 scale: Sequence[float], offset: Sequence[float],
                 input_shape: Sequence[int] | None = None, classes: int | None = None):
        tf = _import_tensorflow()
        import keras

        from camface.export import keras_model

        self._tf = tf
        model = keras_model.load_model(keras_path)
        shape = tuple(model.input_shape[1:])
        if input_shape is not None and (len(shape) != 3 or any(
                d is not None and d != e for d, e in zip(shape, input_shape))):  # Keras said so in a traceback
            raise ModelError(f"{Path(keras_path).name} takes {'x'.join(str(d) for d in shape)} inputs, the CAM "
                             f"graph {'x'.join(str(d) for d in input_shape)} crops: not the graph's model")
        if classes is not None and int(model.output_shape[-1]) != classes:
            raise ModelError(f"{Path(keras_path).name} has {model.output_shape[-1]} classes, the CAM graph "
                             f"{classes}: not the graph's model")
        if "/" in target_layer:
            raise ModelError(f"the Keras baseline needs a flat target layer; {target_layer!r} is "
                             f"inside a nested model of {Path(keras_path).name}")
        try:
            target = model.get_layer(target_layer)
        except ValueError as exc:
            raise ModelError(f"{Path(keras_path).name} has no layer {target_layer!r} "
                             "(the CAM graph's target layer)") from exc
        # the layer that makes the probabilities (the last, or the one before layers that are the
        # identity at inference: a softmax then Dropout); the graph's probs are its activation
        # (softmax or sigmoid) of the logits, a softmax of them when the model outputs logits
        final = keras_model.probability_layer(model)
        activation = keras_model.activation_name(final)
        self._probabilities = tf.nn.sigmoid if activation == "sigmoid" else tf.nn.softmax
        if type(final).__name__ in ("Activation", "Softmax") and activation in ("softmax", "sigmoid"):
            logits = keras_model.input_in(model, final)  # the example's "remove the last layer's softmax"
            if len(logits.shape) > 2:  # a 1x1 map's probabilities squeezed after it: the logits are its channels
                logits = keras.layers.Reshape((int(logits.shape[-1]),))(logits)
        else:  # an Activation layer of another kind (linear, relu) gives the logits as it is, as the graph takes them
            if getattr(final, "activation", None) is not None and type(final).__name__ not in ("Activation", "Softmax"):
                final.activation = None  # exactly what the example does
            logits = model.outputs[0]  # through the identity layers after `final` (a Sequential has none of its own: `model.output` raises)
        # the target's output in the model's graph: `target.output` is the layer's first call, of an
        # earlier build in a Sequential Keras loaded (one build per layer added)
        self._grad_model = keras.Model(model.inputs[0], [keras_model.output_in(model, target), logits])
        self._scale = np.asarray(scale, np.float32)
        self._offset = np.asarray(offset, np.float32)

    def explain(self, crops: np.ndarray, class_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """crops: uint8 [N, H, W, C] in the graph's colour order; class_index: int64 [N], -1 = the
        predicted class. Returns probs float32 [N, classes] and Grad-CAM float32 [N, h, w]
        (ReLU'd, unnormalised: the renderer divides by the maximum, as the example does)."""
        tf = self._tf
        probs, heatmaps = [], []
        for crop, wanted in zip(crops, class_index):
            image = crop[None].astype(np.float32) * self._scale + self._offset
            with tf.GradientTape() as tape:
                activations, logits = self._grad_model(image)
                index = int(tf.argmax(logits[0])) if wanted < 0 else int(wanted)
                class_channel = logits[:, index]
            grads = tape.gradient(class_channel, activations)
            pooled_grads = tf.reduce_mean(grads, axis=(0, 1, 2))  # eq. 1
            heatmap = activations[0] @ pooled_grads[..., tf.newaxis]  # eq. 2, before ReLU
            heatmaps.append(tf.maximum(tf.squeeze(heatmap, -1), 0.0).numpy())
            probs.append(self._probabilities(logits[0]).numpy())
        return np.stack(probs).astype(np.float32), np.stack(heatmaps).astype(np.float32)
