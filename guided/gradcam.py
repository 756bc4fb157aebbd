"""The gradients of `camface guided`, in TensorFlow, at any layer of a Keras model.

The live loop gets its heatmaps from the exported ONNX CAM graph; `camface guided` recomputes
the target layer's activations A and the gradient G = d y^c / d A of the class's PRE-softmax
(or pre-sigmoid) logit y^c here, so the guided figure can explain any layer (`--layer`,
`--layers all`), and every heatmap comes from the method registry's numpy references (camface.methods), the same
equations the graph runs (tests/test_guided_gradcam.py checks the two against each other).
Target layers are resolved and the model is cut exactly as `camface export` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# ---------------------------------------------------------------- Keras model structure
# Target layers are resolved and the model is cut exactly as `camface export` does
# (camface.export.keras_model), so a snapshot's graph target, nested backbones included
# (`backbone/layer` paths), means the same layer here.


PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")  # as `camface export` reads a model's last layer


def _probability_activation(layer) -> str | None:
    """"softmax" or "sigmoid" when `layer` turns logits into probabilities (a Softmax layer, an
    Activation layer or any layer built with that activation), else None. `camface export`
    treats both alike (camface.export.keras_model.split_model): the graph explains the logit
    before them, and a saturated sigmoid (probability 1.0 in float32) has no gradient."""
    import keras

    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    return next((name for name in PROBABILITY_ACTIVATIONS if activation is getattr(keras.activations, name)), None)


def _probability_layer(model):
    """The layer whose output the model's output is, as `camface export` finds it: the output
    layer, or the one before layers that are the identity at inference (softmax then Dropout:
    the softmax, whose probabilities are not logits to softmax again)."""
    from camface.export.keras_model import probability_layer

    return probability_layer(model)


def probability_activation(model) -> str:
    """How `model`'s logits (`logits_model`) become its probabilities: "sigmoid" for a model
    ending in sigmoid (a nested head ending in it included), else "softmax" (a model that outputs
    logits gets them softmaxed, as the exported graph's `probs`)."""
    import keras

    last = _probability_layer(model)
    while isinstance(last, keras.Model):
        last = _probability_layer(last)
    return _probability_activation(last) or "softmax"


def _single_input(model):
    """The model's input tensor, not a list of one: the sub-models built here are called with one
    tensor, and Keras warns (4 lines per call) when a model built on `[input]` gets a bare tensor."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def logits_model(model):
    """A Keras model from `model`'s input to its PRE-softmax (or pre-sigmoid) logits [N, classes].

    If the model ends in softmax or sigmoid (an `Activation` / `Softmax` layer, or a layer with
    that activation, Dropout and the like after it ignored as `camface export` ignores them) its
    input / pre-activation is used, inside a nested model ending the model (a Sequential head)
    too; otherwise the output is taken as the logits. Shares weights with `model` (the copied
    final layer gets the same values).
    """
    import keras

    from camface.export.keras_model import input_in, linear_twin

    last = _probability_layer(model)
    inputs = _single_input(model)
    if isinstance(last, keras.Model):
        inner = logits_model(last)
        if inner is last:
            return model
        return keras.Model(inputs, inner(input_in(model, last)), name=f"{model.name}_logits")
    if _probability_activation(last) is None:
        return model
    if isinstance(last, (keras.layers.Softmax, keras.layers.Activation)):
        logits = input_in(model, last)
    else:  # a layer (Dense, Conv...) built with the activation: its linear twin
        logits = linear_twin(model, last)(input_in(model, last))
    if len(logits.shape) > 2:  # probabilities squeezed off a 1x1 map: the logits are its channels
        logits = keras.layers.Reshape((int(logits.shape[-1]),))(logits)
    return keras.Model(inputs, logits, name=f"{model.name}_logits")


def resolve_layer(model, name: str | None) -> str:
    """Full path of a target layer (`layer` or `backbone/layer`); None -> the default target,
    the last 4-D layer before the head's global pooling (the study's "last conv"; the last 4-D
    layer when the head has none, as export's `default_target_layer`). Raises ModelError
    listing the candidates for an unknown name."""
    from camface.export.keras_model import resolve_target

    return "/".join(resolve_target(model, name))


def conv_layers(model) -> list[str]:
    """Paths of the convolutional layers (Conv2D, SeparableConv2D, DepthwiseConv2D,
    Conv2DTranspose), first to last, nested backbones walked into."""
    import keras

    from camface.export.keras_model import iter_layers

    kinds = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D,
             keras.layers.Conv2DTranspose)
    return [path for path, layer in iter_layers(model) if isinstance(layer, kinds)]


def cam_weights(model, layer: str) -> tuple[np.ndarray | None, str]:
    """CAM class weights [K, classes] for the layer at path `layer`, or (None, reason).

    CAM (arXiv:1512.04150) needs the head after the target to be global average pooling then
    a linear map to the logits: one Dense layer (softmax, sigmoid or linear) or nothing (the pooled
    channels are the logits, as in the bundled emotion model: conv2d_7 -> GAP -> softmax).
    A layer inside a nested backbone qualifies when it produces the backbone's output; a nested
    head ending the model (a Sequential of pooling and Dense) is read layer by layer, as export
    reads it, a target inside it included. The layers after the probabilities, which only
    squeeze a 1x1 map of them to [N, classes] (export's `probability_layer`), are not the head.
    """
    import keras

    from camface.export.keras_model import identity_at_inference, output_in

    names = layer.split("/")
    top = model.get_layer(names[0])
    head = [(item, model) for item in model.layers[[item.name for item in model.layers].index(names[0]) + 1:]]
    if len(names) > 1:
        parent, inner = model, top
        for name in names[1:]:
            parent, inner = inner, inner.get_layer(name)
        if top is _probability_layer(model) and len(names) == 2:  # inside the nested head
            head = [(item, top) for item in top.layers[[item.name for item in top.layers].index(names[1]) + 1:]] \
                + head
        elif output_in(parent, inner) is not top.outputs[0]:
            return None, f"CAM needs global average pooling right after {layer!r}"

    def flat(layers):  # a nested head's layers in its place, each with the model that holds it
        return [leaf for item, parent in layers for leaf in
                (flat([(sub, item) for sub in item.layers]) if isinstance(item, keras.Model) else [(item, parent)])
                if not isinstance(leaf[0], keras.layers.InputLayer)]

    head = flat(head)
    holder = {id(item): parent for item, parent in head}
    head = [item for item, _ in head]
    final = _probability_layer(model)  # as export's head ends: at the probabilities, not after
    while isinstance(final, keras.Model):  # the layers that only squeeze them off a 1x1 map (a
        final = _probability_layer(final)  # Reshape -> Permute of its size-1 axes -> Flatten)
    end = next((i for i, item in enumerate(head) if item is final), None)
    head = head if end is None else head[:end + 1]
    head = [item for item in head if not identity_at_inference(item)]  # as export's CAM check
    if not head or not isinstance(head[0], keras.layers.GlobalAveragePooling2D):
        return None, f"CAM needs global average pooling right after {layer!r}"
    rest = head[1:]
    if rest and isinstance(rest[-1], (keras.layers.Softmax, keras.layers.Activation)) \
            and _probability_activation(rest[-1]) is not None:
        rest = rest[:-1]
    channels = int(output_in(holder[id(head[0])], head[0]).shape[-1])
    if not rest:
        return np.eye(channels, dtype=np.float32), ""
    if len(rest) == 1 and isinstance(rest[0], keras.layers.Dense) and (
            _probability_activation(rest[0]) is not None or rest[0].activation is keras.activations.linear):
        return np.asarray(rest[0].get_weights()[0], dtype=np.float32), ""
    if len(rest) == 1 and type(rest[0]) is keras.layers.Conv2D and tuple(rest[0].kernel_size) == (1, 1) \
            and (_probability_activation(rest[0]) is not None or rest[0].activation is keras.activations.linear):
        # a 1x1 convolution of the pooled map (an all-convolutional head), as export reads it
        return np.asarray(rest[0].get_weights()[0], dtype=np.float32).reshape(channels, -1), ""
    return None, f"CAM needs one linear layer between the pooling after {layer!r} and the softmax"


def _segments(model, layers: list[str]):
    """Keras callables that together output every layer's activations and the logits.

    Built only from tensors already in the model's graph, so the model is not modified (the
    exporter's cutting code calls shared layers again, which a second cut then refuses).
    Returns [(callable x -> [activations..., logits], [indices into `layers`])].
    """
    import keras

    from camface.export.keras_model import input_in, output_in

    logits = logits_model(model).outputs[0]
    by_owner: dict[str, list[int]] = {}
    for index, path in enumerate(layers):
        owner = path.split("/")[0] if "/" in path else ""
        by_owner.setdefault(owner, []).append(index)
    segments = []
    for owner, indices in by_owner.items():
        if not owner:
            outputs = [output_in(model, model.get_layer(layers[i])) for i in indices] + [logits]
            net = keras.Model(_single_input(model), outputs)
            segments.append((lambda x, net=net: list(net(x, training=False)), indices))
            continue
        backbone = model.get_layer(owner)
        inner_outputs = []
        for i in indices:
            parent, inner = model, backbone
            for name in layers[i].split("/")[1:]:
                parent, inner = inner, inner.get_layer(name)
            inner_outputs.append(output_in(parent, inner))
        # a nested head ending in softmax (the model's last layer) gives the logits itself
        head_logits = logits_model(backbone) if backbone is _probability_layer(model) else backbone
        inner_net = keras.Model(backbone.inputs, inner_outputs + [head_logits.outputs[0]])
        source = input_in(model, backbone)
        before = keras.Model(_single_input(model), source) if source is not model.inputs[0] else None
        after = keras.Model(output_in(model, backbone), logits) if head_logits is backbone else None

        def segment(x, before=before, inner_net=inner_net, after=after):
            if before is not None:
                x = before(x, training=False)
            *activations, features = inner_net(x, training=False)
            return activations + [after(features, training=False) if after is not None else features]

        segments.append((segment, indices))
    return segments


# ---------------------------------------------------------------- TensorFlow runner

@dataclass(frozen=True)
class LayerGradients:
    """One forward/backward pass: per target layer, activations and d logit[class] / d activations."""

    probs: np.ndarray  # float32 [N, classes], as the model outputs them (softmax or sigmoid)
    logits: np.ndarray  # float32 [N, classes], pre-softmax / pre-sigmoid
    explained: np.ndarray  # int64 [N]: the class each gradient is of (-1 resolved as live: `predicted_classes`)
    activations: tuple[np.ndarray, ...]  # per layer: float32 [N, h, w, K]
    gradients: tuple[np.ndarray, ...]  # per layer: float32 [N, h, w, K]


class GradientRunner:
    """Activations and class-logit gradients at several layers of a Keras classifier.

    `layers` are paths from `resolve_layer` / `conv_layers`. Built once per model and layer
    list; `run` takes normalised float32 images [N, H, W, C] and one class per image
    (-1 = the predicted class as live names it, `camface.realtime.results.predicted_classes`:
    the first of tied top probabilities, where a sigmoid saturates at 1.0 in float32, not the
    argmax of the logits). Runs in a `tf.function`: TF 2.21's eager conv backprop
    segfaults in oneDNN on some CPUs, graph mode does not.
    """

    def __init__(self, model, layers: list[str]):
        import tensorflow as tf

        self.layers = tuple(layers)
        segments = _segments(model, list(layers))
        probabilities = getattr(tf.nn, probability_activation(model))
        count = len(layers)

        @tf.function(reduce_retracing=True)
        def forward_backward(images, class_index):
            activations, gradients = [None] * count, [None] * count
            with tf.GradientTape(persistent=len(segments) > 1) as tape:
                # Watch the input so every op is recorded, trainable weights or not.
                tape.watch(images)
                passes = []
                for segment, indices in segments:
                    *acts, logits = segment(images)
                    chosen_class = tf.where(class_index < 0,
                                            tf.argmax(logits, axis=-1, output_type=tf.int32),
                                            class_index)
                    # Images are independent (inference mode): one sum gives per-image gradients.
                    target = tf.reduce_sum(tf.gather(logits, chosen_class, batch_dims=1))
                    passes.append((acts, target, indices))
            for acts, target, indices in passes:
                for a, g, i in zip(acts, tape.gradient(target, acts), indices):
                    activations[i], gradients[i] = a, g
            return probabilities(logits), logits, chosen_class, activations, gradients

        self._run = forward_backward

    def run(self, images: np.ndarray, class_index: np.ndarray) -> LayerGradients:
        from camface.realtime.results import predicted_classes

        images, class_index = np.asarray(images, dtype=np.float32), np.asarray(class_index, np.int64)
        passes = self._pass(images, class_index)
        # The pass took the logits' argmax for -1; where the top probabilities tie that may be
        # another class than the one named predicted: the batch again with that class, as live.
        wanted = np.where(class_index < 0, predicted_classes(passes.probs), class_index)
        return passes if np.array_equal(wanted, passes.explained) else self._pass(images, wanted)

    def _pass(self, images: np.ndarray, class_index: np.ndarray) -> LayerGradients:
        import tensorflow as tf

        probs, logits, explained, activations, gradients = self._run(
            tf.convert_to_tensor(images), tf.convert_to_tensor(class_index.astype(np.int32)))
        return LayerGradients(probs.numpy(), logits.numpy(), explained.numpy().astype(np.int64),
                              tuple(a.numpy() for a in activations),
                              tuple(g.numpy() for g in gradients))
