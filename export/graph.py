"""The CAM graph as a TensorFlow function: uint8 crops + class indices -> probabilities,
activations and heatmaps, with the gradient of the logit computed inside the graph.

Heatmap maths (all at the target layer's resolution h x w, unnormalised; A = activations
[N, h, w, K], g = d logit_c / dA [N, h, w, K], logit = the input of the final softmax):
- Grad-CAM (Selvaraju et al., arXiv:1610.02391, eq. 1-2): alpha_k = mean_ij g_ijk,
  map = ReLU(sum_k alpha_k A_k).
- Grad-CAM++ (Chattopadhyay et al., arXiv:1710.11063, eq. 19 with Y_c = exp(logit_c)):
  alpha_ijk = g^2 / (2 g^2 + sum_ab A_abk g^3), w_k = sum_ij alpha_ijk ReLU(g_ijk),
  map = ReLU(sum_k w_k A_k). The factor exp(logit_c) scales every w_k alike and is dropped.
- CAM (Zhou et al., arXiv:1512.04150, eq. 2): map = sum_k W_kc A_k from the classifier weights.

Only the head (target layer -> logits) is differentiated, so the gradients cost little.
"""

from __future__ import annotations

from dataclasses import dataclass

from camface import graph_spec

FULL_HEADS = ("probs", "activations", "gradcam", "gradcampp", "cam")
FORWARD_HEADS = ("probs", "activations")  # a forward-only graph (benchmarks)
HEATMAP_SCOPE = "camface_heatmaps"


def gradcam(activations, gradients):
    """Grad-CAM, arXiv:1610.02391 eq. 1-2. [N, h, w, K] x2 -> [N, h, w]."""
    import tensorflow as tf

    alpha = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)
    return tf.nn.relu(tf.reduce_sum(alpha * activations, axis=-1))


def gradcampp(activations, gradients):
    """Grad-CAM++, arXiv:1710.11063 eq. 19 (exp(logit) output, factor dropped). -> [N, h, w]."""
    import tensorflow as tf

    g2 = tf.square(gradients)
    g3 = g2 * gradients
    sum_a = tf.reduce_sum(activations, axis=[1, 2], keepdims=True)
    denominator = 2.0 * g2 + sum_a * g3
    # alpha is 0/0 where the gradient is 0; it contributes nothing there.
    safe = tf.where(denominator != 0.0, denominator, tf.ones_like(denominator))
    alpha = tf.where(denominator != 0.0, g2 / safe, tf.zeros_like(g2))
    weights = tf.reduce_sum(alpha * tf.nn.relu(gradients), axis=[1, 2], keepdims=True)
    return tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1))


def cam(activations, class_weights, class_index):
    """CAM, arXiv:1512.04150 eq. 2: sum_k W[k, c_n] A_nk. W [K, classes] -> [N, h, w]."""
    import tensorflow as tf

    w = tf.gather(tf.transpose(class_weights), class_index)  # [N, K]
    return tf.reduce_sum(activations * w[:, None, None, :], axis=-1)


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
        probs, heatmaps = _explain(parts, heads, activations, class_index)
        outputs = {graph_spec.OUTPUT_PROBS: probs, graph_spec.OUTPUT_ACTIVATIONS: activations,
                   **heatmaps}
        return {name: tf.identity(value, name=name) for name, value in outputs.items()}

    return cam_graph


def build_heatmap_function(parts: GraphParts, heads: tuple[str, ...] = FULL_HEADS):
    """A `tf.function` activations float32 [N, h, w, K], class_index int64 [N] -> the heatmaps
    of `build_function` computed from those activations (no `probs` / `activations`).

    The self-check of a float16 graph uses it to judge the graph's heatmaps against TensorFlow
    run on the graph's own (float16-rounded) activations; see `verify.verify`."""
    import tensorflow as tf

    @tf.function(autograph=False)
    def heatmap_graph(activations, class_index):
        return _explain(parts, heads, tf.cast(activations, tf.float32), class_index)[1]

    return heatmap_graph


def _explain(parts: GraphParts, heads: tuple[str, ...], activations, class_index):
    """(probs [N, classes], {heatmap name: [N, h, w]}) from target-layer activations."""
    import tensorflow as tf

    wants_gradients = any(h in heads for h in ("gradcam", "gradcampp"))
    with_cam = "cam" in heads and parts.class_weights is not None
    split = parts.split
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(activations)
        logits = tf.cast(split.head(activations), tf.float32)
    probs = tf.cast(split.probabilities(logits), tf.float32)
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int64)
    chosen = tf.where(class_index < 0, predicted, class_index)
    heatmaps = {}
    if wants_gradients:
        # Seeding with one-hot rows gives each crop d logit[n, c_n] / dA[n] (crops are
        # independent), without a reduction whose gradient would need the batch size.
        seed = tf.one_hot(chosen, parts.num_classes, dtype=logits.dtype)
        gradients = tape.gradient(logits, activations, output_gradients=seed)
        # The heatmap maths sits in its own name scope (readable node names in the ONNX file).
        with tf.name_scope(HEATMAP_SCOPE):
            if "gradcam" in heads:
                heatmaps["gradcam"] = gradcam(activations, gradients)
            if "gradcampp" in heads:
                heatmaps["gradcampp"] = gradcampp(activations, gradients)
    if with_cam:
        with tf.name_scope(HEATMAP_SCOPE):
            weights = tf.constant(parts.class_weights, tf.float32)
            heatmaps["cam"] = cam(activations, weights, chosen)
    return probs, heatmaps
