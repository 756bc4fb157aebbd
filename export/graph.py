"""The CAM graph as a TensorFlow function: uint8 crops + class indices -> probabilities,
activations and heatmaps, with the gradient of the logit computed inside the graph.

The heatmap equations are the registry's (`camface.methods`), run on TensorFlow tensors
through `TF_OPS`. Only the head (target layer -> logits) is differentiated, so the gradients
cost little.
"""

from __future__ import annotations

from dataclasses import dataclass

from camface import graph_spec, methods

FORWARD_HEADS = (graph_spec.OUTPUT_PROBS, graph_spec.OUTPUT_ACTIVATIONS)  # a forward-only graph
FULL_HEADS = FORWARD_HEADS + methods.names()
# what tf2onnx converts: the methods that run the model again are written into the ONNX graph
# afterwards (export/onnx_rerun.py: frozen weights would otherwise be copied per clone)
CONVERTED_HEADS = tuple(h for h in FULL_HEADS if h not in methods.METHODS or not methods.get(h).reruns)
HEATMAP_SCOPE = "camface_heatmaps"


class TensorFlowOps:
    """`camface.methods.Ops` on TensorFlow tensors: the registry's equations inside the graph."""

    def sum(self, x, axis, keepdims=False):
        import tensorflow as tf

        return tf.reduce_sum(x, axis=axis, keepdims=keepdims)

    def mean(self, x, axis, keepdims=False):
        import tensorflow as tf

        return tf.reduce_mean(x, axis=axis, keepdims=keepdims)

    def relu(self, x):
        import tensorflow as tf

        return tf.nn.relu(x)

    def square(self, x):
        import tensorflow as tf

        return tf.square(x)

    def safe_divide(self, numerator, denominator):
        import tensorflow as tf

        nonzero = denominator != 0.0
        safe = tf.where(nonzero, denominator, tf.ones_like(denominator))
        return tf.where(nonzero, numerator / safe, tf.zeros_like(numerator))

    def max(self, x, axis, keepdims=False):
        import tensorflow as tf

        return tf.reduce_max(x, axis=axis, keepdims=keepdims)

    def sqrt(self, x):
        import tensorflow as tf

        return tf.sqrt(x)

    def floor(self, x):
        import tensorflow as tf

        return tf.floor(x)

    def cumsum(self, x, axis):
        import tensorflow as tf

        return tf.cumsum(x, axis=axis)

    def matmul(self, a, b):
        import tensorflow as tf

        return tf.linalg.matmul(a, b)

    def transpose(self, x, axes):
        import tensorflow as tf

        return tf.transpose(x, axes)

    def reshape(self, x, shape):
        import tensorflow as tf

        return tf.reshape(x, shape)

    def min(self, x, axis, keepdims=False):
        import tensorflow as tf

        return tf.reduce_min(x, axis=axis, keepdims=keepdims)

    def exp(self, x):
        import tensorflow as tf

        return tf.exp(x)

    def expand_dims(self, x, axis):
        import tensorflow as tf

        return tf.expand_dims(x, axis)

    def take(self, x, indices, axis):
        import tensorflow as tf

        return tf.gather(x, indices, axis=axis)

    def one_hot(self, indices, depth):
        import tensorflow as tf

        return tf.one_hot(indices, depth, dtype=tf.float32)


TF_OPS = TensorFlowOps()


class TensorFlowModelOps(methods.Chunked, TensorFlowOps):
    """`camface.methods.ModelOps` on TensorFlow tensors: the head and the whole model are the
    Keras sub-models (`keras_model.Split`), run once per chunk (a Python loop, unrolled when
    traced). images: the normalised input [N, H, W, C]; logits: [N, classes]; chosen: int64 [N]."""

    def __init__(self, split, images, logits, chosen):
        import tensorflow as tf

        self._split, self.images = split, images
        self._classes = tf.one_hot(chosen, int(logits.shape[-1]), dtype=tf.float32)
        self.class_logit = tf.reduce_sum(logits * self._classes, axis=-1, keepdims=True)

    def _logits_of_head(self, rows):
        import tensorflow as tf

        return tf.cast(self._split.head(rows), tf.float32)

    def _logits_of_model(self, rows):
        import tensorflow as tf

        return tf.cast(self._split.head(tf.cast(self._split.features(rows), tf.float32)), tf.float32)

    def _indices(self, start, stop):
        import tensorflow as tf

        return tf.range(start, stop, dtype=tf.int64)

    def _concat(self, parts, axis):
        import tensorflow as tf

        return tf.concat(parts, axis=axis)


def safe_global_average_pool(x):
    """Spatial mean [N, h, w, K] -> [N, K] whose gradient converts to ONNX with a dynamic batch.

    TF's own Mean gradient builds the kept-dims shape with DynamicStitch, which tf2onnx turns
    into a Reshape that fails at run time when N is dynamic; here the gradient is the incoming
    gradient broadcast over h x w and divided by h * w."""
    import tensorflow as tf

    @tf.custom_gradient
    def pool(x):
        def grad(upstream):
            count = tf.cast(tf.shape(x)[1] * tf.shape(x)[2], upstream.dtype)
            return tf.broadcast_to(upstream[:, None, None, :], tf.shape(x)) / count

        return tf.reduce_mean(x, axis=[1, 2]), grad

    return pool(x)


def safe_global_max_pool(x):
    """Spatial max [N, h, w, K] -> [N, K] with an ONNX-friendly gradient (see
    `safe_global_average_pool`): the incoming gradient shared among the positions of the max."""
    import tensorflow as tf

    @tf.custom_gradient
    def pool(x):
        top = tf.reduce_max(x, axis=[1, 2], keepdims=True)

        def grad(upstream):
            mask = tf.cast(tf.equal(x, top), upstream.dtype)
            ties = tf.reduce_sum(mask, axis=[1, 2], keepdims=True)
            return mask * upstream[:, None, None, :] / ties

        return top[:, 0, 0, :], grad

    return pool(x)


@dataclass(frozen=True)
class GraphParts:
    """Everything `build_function` needs, made by `camface.export.keras_model`."""

    split: object  # keras_model.Split with its global average pooling made gradient-safe
    input_size: tuple[int, int]
    channels: int
    num_classes: int
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    class_weights: object = None  # [K, classes] numpy, or None when CAM is unavailable


def build_function(parts: GraphParts, heads: tuple[str, ...] = FULL_HEADS):
    """A `tf.function` image uint8 [N, H, W, C], class_index int64 [N] -> dict of outputs
    (graph_spec names) for the heads asked for (`cam` only when class weights exist)."""
    import tensorflow as tf

    height, width = parts.input_size
    signature = [
        tf.TensorSpec([None, height, width, parts.channels], tf.uint8, name=graph_spec.INPUT_IMAGE),
        tf.TensorSpec([None], tf.int64, name=graph_spec.INPUT_CLASS),
    ]

    @tf.function(input_signature=signature, autograph=False)
    def cam_graph(image, class_index):
        # Constants are made inside the function: captured eager tensors would become inputs.
        scale = tf.constant(parts.scale, tf.float32)
        offset = tf.constant(parts.offset, tf.float32)
        x = tf.cast(image, tf.float32) * scale + offset
        activations = tf.cast(parts.split.features(x), tf.float32)
        probs, heatmaps = _explain(parts, heads, activations, class_index, x)
        outputs = {graph_spec.OUTPUT_PROBS: probs, graph_spec.OUTPUT_ACTIVATIONS: activations,
                   **heatmaps}
        return {name: tf.identity(value, name=name) for name, value in outputs.items()}

    return cam_graph


def build_heatmap_function(parts: GraphParts, heads: tuple[str, ...] = FULL_HEADS):
    """A `tf.function` activations float32 [N, h, w, K], class_index int64 [N] -> the heatmaps
    of `build_function` computed from those activations (no `probs` / `activations`), but for
    the methods that run the model again (they need the images).

    The self-check of a float16 graph uses it to judge the graph's heatmaps against TensorFlow
    run on the graph's own (float16-rounded) activations; see `verify.verify`."""
    import tensorflow as tf

    @tf.function(autograph=False)
    def heatmap_graph(activations, class_index):
        return _explain(parts, heads, tf.cast(activations, tf.float32), class_index)[1]

    return heatmap_graph


def _explain(parts: GraphParts, heads: tuple[str, ...], activations, class_index, images=None):
    """(probs [N, classes], {heatmap name: [N, h, w]}) from target-layer activations (and the
    normalised images [N, H, W, C], which the methods that run the model again need)."""
    import tensorflow as tf

    wanted = [methods.get(h) for h in heads if h in methods.METHODS]
    if images is None:
        wanted = [m for m in wanted if not m.reruns]
    if parts.class_weights is None:
        wanted = [m for m in wanted if methods.CLASS_WEIGHTS not in m.needs]
    split = parts.split
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(activations)
        logits = tf.cast(split.head(activations), tf.float32)
    probs = tf.cast(split.probabilities(logits), tf.float32)
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int64)
    chosen = tf.where(class_index < 0, predicted, class_index)
    gradients = weights = None
    if any(methods.GRADIENTS in m.needs for m in wanted):
        # Seeding with one-hot rows gives each crop d logit[n, c_n] / dA[n] (crops are
        # independent), without a reduction whose gradient would need the batch size.
        seed = tf.one_hot(chosen, parts.num_classes, dtype=logits.dtype)
        gradients = tape.gradient(logits, activations, output_gradients=seed)
    heatmaps = {}
    # The heatmap maths sits in its own name scope (readable node names in the ONNX file).
    with tf.name_scope(HEATMAP_SCOPE):
        if any(methods.CLASS_WEIGHTS in m.needs for m in wanted):
            columns = tf.gather(tf.transpose(tf.constant(parts.class_weights, tf.float32)), chosen)
            weights = columns[:, None, None, :]  # [N, 1, 1, K]
        rerun = TensorFlowModelOps(split, images, logits, chosen) if any(m.reruns for m in wanted) else None
        for method in wanted:
            ops = rerun if method.reruns else TF_OPS
            heatmaps[method.name] = method.compute(ops, activations, gradients, weights)
    return probs, heatmaps
