"""Guided Backpropagation (Springenberg et al., "Striving for Simplicity", arXiv:1412.6806, sec. 3.4).

At every ReLU the backward pass keeps the incoming gradient only where both the ReLU's input
and the incoming gradient are positive (the paper's eq. for R^l_i, fig. 1):

    R_in = (f_in > 0) * (R_out > 0) * R_out

This module builds a *copy* of a Keras model whose ReLUs backpropagate that way (the original
model is left untouched) and returns the class-specific gradient of the pre-softmax logit with
respect to the input pixels. ReLU in all the forms Keras models use is covered:
`Activation("relu")`, `layers.ReLU` (any `max_value`, e.g. 6 in MobileNetV2, `threshold`,
`negative_slope`) and layers built with `activation="relu"` / `"relu6"`. A leaky ReLU is the
same op whichever way it is spelt (`layers.ReLU(negative_slope=a)`, `layers.LeakyReLU(a)`,
`activation="leaky_relu"`), so all three get the same rule: f'(x) * max(R_out, 0), f'(x) = a
below 0. Nested Functional or Sequential models (a backbone used as one layer) are copied
recursively.

Other activations (swish, gelu, ELU, PReLU, sigmoid gates ...) have no guided rule and pass
plain gradients: a warning names them. Models without any ReLU: `GuidedBackprop.guided` is then
False and the gradients are plain input gradients; callers must label them as such.

TensorFlow is imported inside functions: the module itself stays light.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from camface.errors import ModelError

log = logging.getLogger(__name__)


def guided_relu_backward(x: np.ndarray, upstream: np.ndarray, *, max_value: float | None = None,
                         threshold: float = 0.0, negative_slope: float = 0.0) -> np.ndarray:
    """Reference (numpy) guided-ReLU backward rule, arXiv:1412.6806 fig. 1.

    `x` is the ReLU's input, `upstream` the gradient arriving at its output (same shape).
    Returns `f'(x) * max(upstream, 0)`, where f'(x) is the derivative of Keras' ReLU
    (1 on threshold < x < max_value, `negative_slope` below threshold, 0 above max_value).
    """
    x = np.asarray(x, dtype=np.float64)
    derivative = np.where(x > threshold, 1.0, negative_slope)
    if max_value is not None:
        derivative = np.where(x >= max_value, 0.0, derivative)
    return derivative * np.maximum(np.asarray(upstream, dtype=np.float64), 0.0)


def _guided_relu_fn(max_value: float | None = None, threshold: float = 0.0,
                    negative_slope: float = 0.0):
    """A TF function computing Keras' ReLU forward and the guided rule backward."""
    import keras
    import tensorflow as tf

    @tf.custom_gradient
    def guided_relu(x):
        y = keras.activations.relu(x, negative_slope=negative_slope, max_value=max_value,
                                   threshold=threshold)

        def backward(upstream):
            derivative = tf.where(x > threshold, tf.ones_like(x),
                                  tf.fill(tf.shape(x), tf.cast(negative_slope, x.dtype)))
            if max_value is not None:
                derivative = tf.where(x >= max_value, tf.zeros_like(x), derivative)
            return derivative * tf.nn.relu(upstream)

        return y, backward

    return guided_relu


def _relu_params(activation) -> dict | None:
    """Guided-ReLU parameters if `activation` (a Keras activation function) is a ReLU."""
    import keras

    if activation is keras.activations.relu:
        return {}
    if activation is keras.activations.relu6:
        return {"max_value": 6.0}
    if activation is keras.activations.leaky_relu:  # its default slope: the function's own
        return {"negative_slope": 0.2}
    return None


def _make_guided_layer_class():
    import keras

    class GuidedReLU(keras.layers.Layer):
        """Drop-in for `keras.layers.ReLU` whose gradient follows the guided rule."""

        def __init__(self, max_value=None, threshold=0.0, negative_slope=0.0, **kwargs):
            super().__init__(**kwargs)
            self._fn = _guided_relu_fn(None if max_value is None else float(max_value),
                                       float(threshold), float(negative_slope))

        def call(self, inputs):
            return self._fn(inputs)

        def compute_output_shape(self, input_shape):
            return input_shape

    return GuidedReLU


@dataclass(frozen=True)
class GuidedCopy:
    """A guided copy of a model and what was replaced in it."""

    model: object  # keras.Model with the same weights; ReLUs backpropagate the guided way
    relus: tuple[str, ...]  # names of the layers whose ReLU became guided
    other_activations: tuple[str, ...]  # names of other activation functions met (for messages)


def guided_copy(model) -> GuidedCopy:
    """Copy a Functional or Sequential Keras model, replacing every ReLU by a guided ReLU.

    Each layer is rebuilt from its config and given the original's weights, so the original
    model (its layers and their graph nodes) is not changed. Raises ModelError for subclassed
    models, which Keras cannot copy layer by layer.
    """
    import keras

    GuidedReLU = _make_guided_layer_class()
    relus: list[str] = []
    others: set[str] = set()

    def copy_layer(layer):
        if isinstance(layer, keras.layers.ReLU):
            relus.append(layer.name)
            return GuidedReLU(max_value=layer.max_value, threshold=layer.threshold,
                              negative_slope=layer.negative_slope, name=layer.name)
        if isinstance(layer, keras.layers.LeakyReLU):
            relus.append(layer.name)
            return GuidedReLU(negative_slope=float(layer.negative_slope), name=layer.name)
        if type(layer).__name__ in ("PReLU", "ELU"):
            others.add(type(layer).__name__)
        try:
            new = layer.__class__.from_config(layer.get_config())
        except Exception as exc:  # e.g. a Lambda layer refused by safe mode: share it
            if _relu_params(getattr(layer, "activation", None)) is not None:
                raise ModelError(f"cannot copy ReLU layer {layer.name!r} for Guided Backprop: "
                                 f"{exc}") from exc
            log.debug("sharing layer %r in the guided copy: %s", layer.name, exc)
            return layer
        build_config = layer.get_build_config()
        if build_config is not None:
            new.build_from_config(build_config)
            new.set_weights(layer.get_weights())
        activation = getattr(layer, "activation", None)
        if callable(activation):
            params = _relu_params(activation)
            if params is not None:
                relus.append(layer.name)
                # Dense, Conv*, Activation ... call `self.activation(x)`: swap the function
                # on the copy only (the copy is never saved, so its config may go stale).
                new.activation = _guided_relu_fn(**params)
            elif activation is not keras.activations.linear:
                others.add(getattr(activation, "__name__", type(activation).__name__))
        return new

    try:
        copy = keras.models.clone_model(model, clone_function=copy_layer, recursive=True)
    except ValueError as exc:
        raise ModelError(f"cannot build a guided copy of model {model.name!r} "
                         f"({type(model).__name__}): {exc}") from exc
    return GuidedCopy(copy, tuple(relus), tuple(sorted(others)))


class GuidedBackprop:
    """Class-specific input gradients of a classifier's pre-softmax logit, guided at ReLUs.

    `logits_model` maps the model input (float32 [N, H, W, C], already normalised) to the
    pre-softmax logits [N, classes]; see `camface.guided.gradcam.logits_model`. When the model
    holds no ReLU, `guided` is False and `gradients` are plain gradients (logged once).
    """

    def __init__(self, logits_model):
        import tensorflow as tf

        copy = guided_copy(logits_model)
        self.guided = bool(copy.relus)
        self.relus = copy.relus
        self.other_activations = copy.other_activations
        if self.guided and copy.other_activations:
            log.warning("model %r: Guided Backprop's rule is applied at its %d ReLU(s); its other "
                        "activations (%s) pass plain gradients", logits_model.name, len(copy.relus),
                        ", ".join(copy.other_activations))
        if not self.guided:
            log.warning("model %r has no ReLU (activations: %s): Guided Backprop is undefined, "
                        "showing plain input gradients instead", logits_model.name,
                        ", ".join(copy.other_activations) or "none")
            net = logits_model
        else:
            net = copy.model

        # In a tf.function: TF 2.21's eager conv backprop segfaults in oneDNN on some CPUs.
        @tf.function(reduce_retracing=True)
        def input_gradients(images, class_index):
            with tf.GradientTape() as tape:
                tape.watch(images)
                logits = net(images, training=False)
                target = tf.reduce_sum(tf.gather(logits, class_index, batch_dims=1))
            return tape.gradient(target, images)

        self._input_gradients = input_gradients

    @property
    def label(self) -> str:
        return "Guided Backprop" if self.guided else "Gradient (no ReLU)"

    def gradients(self, images: np.ndarray, class_index: np.ndarray) -> np.ndarray:
        """d logit[class] / d input for each image.

        images: float32 [N, H, W, C], the model's (normalised) input.
        class_index: int [N], one class per image (no -1 here: resolve it first).
        Returns float32 [N, H, W, C] with respect to the normalised input; multiply by the
        normalisation scale for the gradient with respect to raw pixel values.
        """
        import tensorflow as tf

        images = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
        class_index = tf.convert_to_tensor(np.asarray(class_index, dtype=np.int32))
        return self._input_gradients(images, class_index).numpy()
