"""Read a Keras classifier: load it, find its target layer, and cut it in two at that layer.

The CAM graph needs three things from a model: the `features` part (image -> target-layer
activations A, [N, h, w, K]), the `head` part (A -> logits, the input of the final softmax) and,
when the head is global-average-pooling followed by one linear layer, the class weights that CAM
uses. Backbones nested as one layer (a `keras.Model` used inside another, as in Keras' transfer
learning guide) are walked into; their layers are named `outer/inner`.

TensorFlow and Keras are imported inside functions: this module is imported by the CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from camface import model_kinds
from camface.errors import ModelError
from camface.outputs import check_model_file

log = logging.getLogger(__name__)

POOLING_TYPES = ("GlobalAveragePooling2D", "GlobalMaxPooling2D")
# Layers that mix tokens: a target before one is no feature map of what the model decides on.
ATTENTION_TYPES = ("MultiHeadAttention", "GroupedQueryAttention", "GroupQueryAttention",
                   "Attention", "AdditiveAttention")
# Layers that are the identity at inference: CAM may look through them.
_IDENTITY_AT_INFERENCE = ("Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout",
                          "AlphaDropout", "ActivityRegularization", "Flatten", "Reshape", "Identity")
_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


def load_model(path: str | Path, safe_mode: bool = True):
    """Load a `.keras` / `.h5` / `.hdf5` model without compiling it.

    Raises `ModelError` naming the path when the file is missing or is not a Keras model.
    `safe_mode=True` refuses to deserialise Lambda-layer bytecode (Keras' own safety switch);
    `safe_mode=False` (the CLI's --unsafe-load) runs that code.
    """
    path = Path(path)
    check_model_file(path)
    if path.suffix.lower() not in (".keras", ".h5", ".hdf5"):
        # export sends it every suffix but .onnx and .pt2: a BlazeFace .tflite is named for what it is
        raise ModelError(model_kinds.not_a_classifier(path) or
                         f"{path}: expected a Keras model file (.keras, .h5 or .hdf5)")
    _check_container(path)
    import keras

    try:
        model = keras.models.load_model(path, compile=False, safe_mode=safe_mode)
    except ValueError as exc:
        if safe_mode and ("safe_mode" in str(exc) or "Lambda" in str(exc)):
            raise ModelError(f"{path}: Keras safe mode refuses to load it: it holds Python code "
                             f"(a Lambda layer). If you trust the file, --unsafe-load loads it "
                             f"and so runs code from the file") from exc
        raise ModelError(f"{path}: not a loadable Keras model ({_first_line(exc)})") from exc
    except Exception as exc:  # h5py/zipfile raise many types for a file that is not a model
        raise ModelError(f"{path}: not a loadable Keras model ({_first_line(exc)})") from exc
    if not isinstance(model, keras.Model) or len(model.outputs) != 1 or len(model.inputs) != 1:
        raise ModelError(f"{path}: camface needs a model with one image input and one output")
    return model


def _check_container(path: Path) -> None:
    """ModelError when a .keras file is not a zip archive (Keras said "File not found" of a file
    that is there: an empty or text file, or an HDF5 model renamed .keras, which Keras reads as
    .h5 only)."""
    import zipfile

    if path.suffix.lower() != ".keras" or zipfile.is_zipfile(path):
        return
    with open(path, "rb") as file:
        head = file.read(8)
    what = ("an HDF5 file: a Keras .h5 model renamed .keras? Name it .h5" if head == b"\x89HDF\r\n\x1a\n" else
            "empty" if not head else "not a zip archive (a .keras model is one): truncated, or another format")
    raise ModelError(f"{path}: not a loadable Keras model: it is {what}")


_HALF_DTYPES = ("float16", "bfloat16", "mixed_float16", "mixed_bfloat16")


def in_float32(model):
    """`model`, or a copy computing in float32 (the same weights) when layers of it compute in
    float16 / bfloat16 (a mixed_float16 policy): tf2onnx would convert the float16 maths, the
    graph's outputs would be float16, and its self-check would differ from the float32 reference
    by float16's rounding. ModelError when the copy cannot be built."""
    import keras
    import numpy as np

    half = sorted({layer.dtype_policy.name for _, layer in iter_layers(model)
                   if getattr(layer, "compute_dtype", "float32") in ("float16", "bfloat16")})
    if not half:
        return model

    def to_float32(config):
        if isinstance(config, dict):
            if config.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and \
                    config.get("config", {}).get("name") in _HALF_DTYPES:
                return {**config, "config": {**config["config"], "name": "float32"}}
            return {key: "float32" if key == "dtype" and value in _HALF_DTYPES else to_float32(value)
                    for key, value in config.items()}
        if isinstance(config, list):
            return [to_float32(value) for value in config]
        return config

    try:  # the model is loaded already (its Lambda code, if any, allowed): no safe mode again
        copy = keras.saving.deserialize_keras_object(
            to_float32(keras.saving.serialize_keras_object(model)), safe_mode=False)
        copy.set_weights([np.asarray(w, np.float32) if np.asarray(w).dtype.kind == "f" else w
                          for w in model.get_weights()])
    except Exception as exc:  # Keras raises many types for a config it cannot rebuild
        raise ModelError(f"model {model.name!r} computes in {' and '.join(half)} (a mixed-precision "
                         f"policy) and cannot be rebuilt in float32 ({_first_line(exc)}); save it "
                         "under keras.mixed_precision.set_global_policy('float32')") from exc
    log.info("model %r computes in %s (a mixed-precision policy): exported in float32, its weights "
             "as they are", model.name, " and ".join(half))
    return copy


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def operations(model) -> list:
    """The layers of `model` and the operations its functional graph calls that are no layer
    (Keras 3: `inputs + x` in keras.applications' ConvNeXt blocks is an `Add` operation, the
    block's output), in topological order."""
    return list(getattr(model, "operations", None) or model.layers)


def _is_model(layer) -> bool:
    import keras

    return isinstance(layer, keras.Model)


def graph_nodes(model) -> dict[int, object]:
    """id(operation) -> its call (a Keras `Node`) in `model`'s own graph, the one from
    `model.inputs` to `model.outputs` (a nested model: its call in the graph that calls it).

    Not an operation's first call: a Sequential built layer by layer calls its layers again at
    each `add` and keeps the last build as its graph (one Keras loads from a file, 4 layers:
    4, 3, 2 and 1 calls), and cutting a model with keras.Model(intermediate, ...) calls the
    layers after the cut again. An operation called twice in the graph: its call nearest the
    input. A model without a graph of its own (subclassed): each operation's first call.
    """
    graph = getattr(model, "_functional", None) or model  # a Sequential's graph: its last build's
    by_depth = getattr(graph, "_nodes_by_depth", None)
    if by_depth is None:
        return {id(op): op._inbound_nodes[0] for op in operations(model) if op._inbound_nodes}
    nodes: dict[int, object] = {}
    for depth in sorted(by_depth, reverse=True):  # from the inputs (deepest) to the outputs
        for node in by_depth[depth]:
            nodes.setdefault(id(node.operation), node)
    return nodes


def _node(layer, nodes: dict):
    """The call of `layer` in a graph whose `graph_nodes` are `nodes`."""
    node = nodes.get(id(layer))
    if node is None:
        raise ModelError(f"layer {layer.name!r} is not connected to the model's graph")
    return node


def output_in(model, layer):
    """`layer`'s output tensor in `model`'s graph (a nested model: its call's output)."""
    return _node(layer, graph_nodes(model)).output_tensors[0]


def input_in(model, layer):
    """`layer`'s (first) input tensor in `model`'s graph."""
    return _node(layer, graph_nodes(model)).input_tensors[0]


def _walk(model, prefix: str = "") -> list[tuple[str, object, object]]:
    """(path, layer, call) for every layer in topological order, `call` its Node in the graph of
    the model that holds it (None when it is not in it); nested models are walked into and also
    listed themselves (after their layers). Input layers are skipped."""
    nodes, walked = graph_nodes(model), []
    for layer in operations(model):
        if type(layer).__name__ == "InputLayer":
            continue
        path = prefix + layer.name
        if _is_model(layer):
            walked += _walk(layer, prefix=path + "/")
        walked.append((path, layer, nodes.get(id(layer))))
    return walked


def iter_layers(model, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(path, layer) for every layer in topological order; nested models are walked into and
    also listed themselves (after their layers). Input layers are skipped."""
    for path, layer, _ in _walk(model, prefix):
        yield path, layer


def layer_names(model) -> tuple[str, ...]:
    """The names of every layer of `model` (nested models' included, without their path): what
    a converted node's scope names (convert.check_converted)."""
    return tuple(path.split("/")[-1] for path, _ in iter_layers(model))


def _output(node):
    return node.output_tensors[0]


def _input(node):
    return node.input_tensors[0]


def _rank(node) -> int:
    """The rank of a call's output, -1 for a layer not in its model's graph (node None)."""
    try:
        return len(_output(node).shape)
    except AttributeError:
        return -1


def candidate_layers(model) -> list[str]:
    """Paths of layers with a 4-D output (NHWC feature maps), in topological order."""
    return [path for path, _, node in _walk(model) if _rank(node) == 4]


# why the default target was chosen (`camface info` prints it), by the head of the model at hand
REASON_HEAD_POOLING = "default: the last 4-D layer before the head's global pooling"
REASON_NO_HEAD_POOLING = "default: the last 4-D layer larger than 1x1 (the head has no global pooling)"


def _head_pools(layers) -> list[int]:
    """Indices into `layers` ((path, layer, call) from `_walk`) of the global pooling layers that
    pool for the head: those whose input only they read, a 1x1 map of probabilities (squeezed)
    left out. A squeeze-and-excitation block's pooling (EfficientNet, MobileNetV3) shares its
    input with the multiply that scales the map by the excitation."""
    readers: dict[int, int] = {}
    for _, _, node in layers:
        for tensor in {id(t): t for t in (node.input_tensors if node else ())}.values():
            readers[id(tensor)] = readers.get(id(tensor), 0) + 1
    producers = {id(_output(node)): layer for _, layer, node in layers if _rank(node) >= 0}

    def squeezes_probabilities(node) -> bool:  # an all-convolutional head's 1x1 map of them
        source = _input(node)
        return tuple(source.shape[1:3]) == (1, 1) and id(source) in producers and \
            activation_name(producers[id(source)]) in _PROBABILITY_ACTIVATIONS

    return [i for i, (_, layer, node) in enumerate(layers) if type(layer).__name__ in POOLING_TYPES
            and node is not None and readers.get(id(_input(node)), 0) <= 1 and not squeezes_probabilities(node)]


CLASS_SCORES_REASON = ("default for an all-convolutional head (SqueezeNet's: a Conv2D to one channel per "
                       "class, a ReLU, pooled): the feature map that convolution reads, not the class-score map "
                       "(pytorch-grad-cam's choice)")
# what may lie between an all-convolutional head's class-score Conv2D and its global pooling,
# besides the layers that change nothing at inference
_SCORE_ACTIVATION_TYPES = ("ReLU", "LeakyReLU", "ELU", "PReLU")


def _class_score_input(layers, pool_index: int):
    """(path, layer, call) of the feature map that an all-convolutional head's class-score Conv2D reads
    (SqueezeNet's, NiN's: a Conv2D to one channel per class, an activation (ReLU), the global
    pooling layers[pool_index], then only reshapes and the final activation: the pooled map holds
    classes, not features), else None. Without an activation (the bundled emotion model's
    conv2d_7 -> GAP -> softmax) the class-score map stays: its class channel is exactly CAM of
    the map before, the study's "last conv"."""
    producers = {id(_output(node)): (path, layer, node) for path, layer, node in layers if _rank(node) >= 0}
    pool = layers[pool_index][2]
    for _, layer, _ in layers[pool_index + 1:]:  # a Dense (or anything but a reshape) after it: features
        kind = type(layer).__name__
        if not (identity_at_inference(layer) or kind in ("Flatten", "Reshape", "Softmax") or
                kind == "Activation" and activation_name(layer) in _PROBABILITY_ACTIVATIONS):
            return None

    def activation(layer) -> bool:
        return type(layer).__name__ in _SCORE_ACTIVATION_TYPES or type(layer).__name__ == "Activation" \
            and activation_name(layer) not in _PROBABILITY_ACTIVATIONS + ("linear",)

    found, activated = producers.get(id(_input(pool))), False
    while found is not None and (identity_at_inference(found[1]) or activation(found[1])):
        activated = activated or activation(found[1])
        found = producers.get(id(_input(found[2])))
    if found is None or type(found[1]).__name__ != "Conv2D" or getattr(found[1], "groups", 1) != 1 or \
            activation_name(found[1]) in _PROBABILITY_ACTIVATIONS:
        return None
    if not activated and activation_name(found[1]) == "linear":
        return None  # conv -> GAP: the class channel is exactly CAM of the map before (the study's)
    source = _input(found[2])
    while id(source) in producers and identity_at_inference(producers[id(source)][1]):
        source = _input(producers[id(source)][2])
    found = producers.get(id(source))
    if found is None or len(source.shape) != 4 or any(not isinstance(d, int) for d in source.shape[1:3]) \
            or tuple(source.shape[1:3]) == (1, 1):
        return None
    return found


def default_target_reason(model) -> str:
    """Why `default_target_layer(model)` is the target, in words (the graph's target_reason), said
    of this model's head only."""
    layers = _walk(model)
    pools = _head_pools(layers)
    if pools and _class_score_input(layers, pools[-1]):
        return CLASS_SCORES_REASON
    return REASON_HEAD_POOLING if pools else REASON_NO_HEAD_POOLING


def default_target_layer(model) -> str:
    """The last layer with a 4-D output before the head's global pooling (the study's "last
    conv"; pooling layers inside blocks, as the squeeze-and-excitation of EfficientNet and
    MobileNetV3, are not the head's: their maps go on; an all-convolutional head's, whose pooled
    map holds the class scores: the map its class-score Conv2D reads, `_class_score_input`); when
    the head has none (Flatten -> Dense), the last 4-D layer, larger than 1x1 where one is (an
    all-convolutional head's class map is 1x1). Raises `ModelError` when the model has no 4-D
    layer."""
    layers = _walk(model)
    pools = _head_pools(layers)
    candidates = [item for item in layers[:pools[-1] if pools else len(layers)] if _rank(item[2]) == 4]
    if not candidates:
        candidates = [item for item in layers if _rank(item[2]) == 4]
    if not pools:  # an all-convolutional head (Conv2D to 1x1, then softmax) ends in a 1x1 map
        candidates = [item for item in candidates
                      if tuple(_output(item[2]).shape[1:3]) != (1, 1)] or candidates
    if not candidates:
        raise ModelError(f"model {model.name!r} has no layer with a 4-D output (N, H, W, C): "
                         "camface explains convolutional classifiers")
    path, layer, _ = candidates[-1]
    features = _class_score_input(layers, pools[-1]) if pools else None
    if features is not None:
        path, layer, _ = features
    while _is_model(layer):  # name the layer that produces a nested model's output
        inner, nodes = layer.outputs[0], graph_nodes(layer)
        owner = next(sub for sub in reversed(operations(layer))
                     if id(sub) in nodes and _output(nodes[id(sub)]) is inner)
        path, layer = f"{path}/{owner.name}", owner
    return path


def resolve_target(model, name: str | None) -> list[str]:
    """Split a target-layer name into its path through nested models.

    Accepts a full path (`resnet50/conv5_block3_out`) or a bare layer name when it is unique.
    Raises `ModelError` listing the candidate layers for an unknown name."""
    if name is None:
        return default_target_layer(model).split("/")
    candidates = candidate_layers(model)
    if name in candidates:
        return name.split("/")
    matches = [c for c in candidates if c.split("/")[-1] == name]
    if len(matches) == 1:
        return matches[0].split("/")
    known = {path for path, _ in iter_layers(model)}
    if name in known or matches:
        ranks = [_rank(node) for path, _, node in _walk(model) if path == name or
                 path.split("/")[-1] == name]
        tokens = " (it gives tokens [N, T, C]: token targets are for .onnx / .pt2 models)" \
            if 3 in ranks else ""
        why = f"layer {name!r} has no 4-D output{tokens}" if not matches else f"{name!r} is ambiguous"
    else:
        why = f"no layer named {name!r}"
    shown = candidates[-30:]
    more = f" (and {len(candidates) - len(shown)} earlier)" if len(candidates) > len(shown) else ""
    raise ModelError(f"{why} in model {model.name!r}; candidate target layers{more}: "
                     + ", ".join(shown))


@dataclass(frozen=True)
class Split:
    """A classifier cut at its target layer.

    features(x) -> A: float32 [N, H, W, C] normalised image -> [N, h, w, K] activations.
    head(A) -> logits: [N, h, w, K] -> [N, classes], the input of the final softmax/sigmoid.
    probabilities(logits) -> [N, classes]: the model's own final activation.
    head_layers: the layers between A and the logits, in order (for the CAM check).
    final_kernel: [K', classes] kernel of a final Dense whose linear part `head` applies (or None).
    """

    target_layer: str
    features: Callable
    head: Callable
    probabilities: Callable
    head_layers: tuple
    final_kernel: object
    final_activation: str


def split_model(model, target_path: list[str]) -> Split:
    """Cut `model` at `target_path` (from `resolve_target`). Raises `ModelError` when layers
    after the target also read tensors from before it (inside a residual block)."""
    import keras

    model = depthwise_convolutions(model)
    logits = logits_of(model)
    activation = "softmax" if logits.activation == "linear" else logits.activation
    probabilities = keras.activations.get(activation)
    final = probability_layer(model)
    if _is_model(final) and target_path[0] == final.name and logits.tail is not None:
        # the target is inside a nested head ending in softmax: cut that head, before its logits
        logits = logits_of(final)
        where = f"layer {'/'.join(target_path)!r}"
        if len(target_path) < 2 or (_is_model(probability_layer(final)) and logits.tail is not None
                                    and target_path[1] == probability_layer(final).name):
            raise ModelError(f"model {model.name!r}: target layer {'/'.join(target_path)!r} is inside "
                             f"its nested head {target_path[0]!r}, in a model nested in it that ends in "
                             f"{activation}; name a 4-D layer before that head with --target-layer")
        inner_features, head, head_layers = _split(final, target_path[1:], logits.end)
        before, _ = _submodel(model.inputs[0], input_in(model, final), where)

        def features(x, before=before, inner_features=inner_features):
            return inner_features(before(x))
    else:
        features, head, head_layers = _split(model, list(target_path), logits.end)
    if logits.tail is not None:
        head_layers = head_layers + logits.layers

        def head_with_tail(a, head=head, tail=logits.tail):
            return tail(head(a))
    else:
        head_with_tail = head
    attention = next((layer for layer in head_layers if type(layer).__name__ in ATTENTION_TYPES), None)
    if attention is not None:
        raise ModelError(
            f"model {model.name!r}: target layer {'/'.join(target_path)!r} reaches the logits through "
            f"attention (layer {attention.name!r}, {type(attention).__name__}): in a vision "
            "transformer the 4-D layers are its patch embedding, not the map it decides on, and "
            "token targets [N, T, C] are for .onnx / .pt2 models; name a 4-D layer after the "
            "last attention with --target-layer, if there is one")
    return Split("/".join(target_path), features, head_with_tail, probabilities, head_layers,
                 logits.kernel, activation)


def _grouped(layer) -> bool:
    return type(layer).__name__ == "Conv2D" and getattr(layer, "groups", 1) > 1


def depthwise_convolutions(model):
    """`model`, its Conv2D layers of groups == channels == filters (keras.applications' ConvNeXt
    writes its depthwise convolutions so) computing as the depthwise convolutions they are (in
    place: the same weights and maths, through `ops.depthwise_conv`): TensorFlow runs a grouped
    Conv2D as an XLA function, which tf2onnx does not convert. ModelError naming a grouped
    convolution that is not depthwise."""
    import functools

    for _, layer, node in _walk(model):
        if not _grouped(layer):
            continue
        channels = int(_input(node).shape[-1])
        if not layer.groups == layer.filters == channels or layer.data_format != "channels_last":
            raise ModelError(f"layer {layer.name!r}: a grouped Conv2D ({layer.groups} groups, "
                             f"{channels} -> {layer.filters} channels) that is not depthwise has "
                             "no ONNX conversion (TensorFlow runs it as an XLA function)")
        layer.convolution_op = functools.partial(_depthwise, layer)
    return model


def _depthwise(layer, inputs, kernel):
    """Conv2D.convolution_op of a depthwise `layer`: kernel [kh, kw, 1, C] as [kh, kw, C, 1]."""
    from keras import ops

    return ops.depthwise_conv(inputs, ops.swapaxes(kernel, 2, 3), strides=tuple(layer.strides),
                              padding=layer.padding, dilation_rate=layer.dilation_rate,
                              data_format=layer.data_format)


def _producer(model, tensor):
    """The layer (or operation) of `model` whose call in its graph outputs `tensor`, else None."""
    nodes = graph_nodes(model)
    return next((op for op in reversed(operations(model)) if type(op).__name__ != "InputLayer"
                 and id(op) in nodes and _output(nodes[id(op)]) is tensor), None)


def _final_layer(model):
    final = _producer(model, model.outputs[0])
    if final is None:
        raise ModelError(f"cannot find the output layer of model {model.name!r}")
    return final


def identity_at_inference(layer) -> bool:
    """Whether `layer` is one of the kinds that change nothing at inference (Dropout, noise,
    Flatten, Reshape, ...): the CAM check looks through them (`cam_weights`, and `camface
    guided`'s)."""
    return type(layer).__name__ in _IDENTITY_AT_INFERENCE


def _passes_through(model, layer) -> bool:
    """Whether `layer` (of `model`) is the identity at inference on its input: Dropout and the
    like, and a Flatten or Reshape that leaves the shape as it is."""
    kind = type(layer).__name__
    if kind not in _IDENTITY_AT_INFERENCE:
        return False
    if kind in ("Flatten", "Reshape"):
        return tuple(input_in(model, layer).shape) == tuple(output_in(model, layer).shape)
    return True


def probability_layer(model):
    """The layer whose output the model's output is: the output layer, or the layer before the
    ones that are the identity at inference after it (a softmax then Dropout: the softmax, so
    that probabilities are not taken for logits and softmaxed again), or before one that
    squeezes a 1x1 map of probabilities to [N, classes] (whose output is then no 2-D tensor:
    `logits_of` flattens its logits)."""
    final = _final_layer(model)
    while _passes_through(model, final) and not _is_model(final):
        before = _producer(model, input_in(model, final))
        if before is None:
            break
        final = before
    return _check_probabilities_not_reshaped(model, final)


# Layers that reshape or pool what they get: after a softmax / sigmoid their output holds
# probabilities that no logits give (an average of softmaxes is no softmax).
_RESHAPING_TYPES = POOLING_TYPES + ("Flatten", "Reshape", "AveragePooling2D", "MaxPooling2D")
# ... and what may lie between them and the probabilities: a Permute (which reorders the class
# scores unless it moves axes of size 1 only) and the layers that change nothing at inference
_TAIL_TYPES = _RESHAPING_TYPES + ("Permute",) + _IDENTITY_AT_INFERENCE


def _layer_before(model, layer):
    """The layer (or operation) of `model` whose output `layer` reads, None for the input."""
    return _producer(model, input_in(model, layer))


def _check_probabilities_not_reshaped(model, final):
    """The layer that computed the model's output when `final` (and the reshaping layers before
    it) only squeeze its probabilities off a 1x1 map (Conv2D(classes, 1, softmax) on a 1x1 map ->
    Flatten, or its global pooling: the class scores are the map's channels, the softmax over
    them), else `final`. ModelError when the output is probabilities pooled or reshaped after the
    layer that computed them (Conv2D(softmax) -> GlobalAveragePooling2D over a 3x3 map, a
    Dense(softmax) -> Reshape((2, 2)) -> Permute -> Flatten that reorders the classes): the
    output would be taken for logits and softmaxed again, and no logits give it."""
    kind = type(final).__name__
    if kind not in _RESHAPING_TYPES + ("Permute",) or activation_name(final) in _PROBABILITY_ACTIVATIONS:
        return final
    tail, before = [final], _layer_before(model, final)
    while before is not None and not _is_model(before) and type(before).__name__ in _TAIL_TYPES \
            and activation_name(before) not in _PROBABILITY_ACTIVATIONS:
        tail.insert(0, before)
        before = _layer_before(model, before)
    if before is None or _is_model(before):
        return final
    activation = activation_name(before)
    if activation not in _PROBABILITY_ACTIVATIONS:
        return final
    shape = tuple(output_in(model, before).shape)
    axis = getattr(before, "axis", -1) if type(before).__name__ == "Softmax" else -1
    axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis

    def dims(tensor) -> tuple:
        return tuple(tensor.shape)

    def classes_alone(layer) -> bool:  # its output holds the class scores on one axis, the others of size 1
        out = dims(output_in(model, layer))
        return [d for d in out[1:] if d != 1] == [shape[-1]] and (layer is not final or len(out) == 2)

    # a 1x1 map of class scores (or [N, classes]) whose every tensor after it keeps them on one
    # axis: no layer of the tail pools them or puts them in another order
    moved = next((layer for layer in tail if not classes_alone(layer)), None)
    if not (all(isinstance(d, int) for d in shape[1:]) and all(d == 1 for d in shape[1:-1])):
        why = f"{tail[0].name!r} turns {shape} into {dims(output_in(model, tail[0]))}"
    elif moved is not None:
        why = f"{moved.name!r} turns {dims(input_in(model, moved))} into {dims(output_in(model, moved))}"
    elif activation == "sigmoid" or isinstance(axis, int) and axis % len(shape) == len(shape) - 1:
        return before
    else:
        why = f"its softmax runs over axis {axis} of {shape}, not the class scores alone"
    passed = " -> ".join(f"{layer.name!r} ({type(layer).__name__})" for layer in tail)
    raise ModelError(
        f"model {model.name!r}: its output is the {activation} of layer {before.name!r} "
        f"({type(before).__name__}) passed through {passed}, probabilities that "
        f"no logits give ({why}; a 1x1 map's channels squeezed off are the one kind read); camface "
        f"explains the logits before the final {activation}: build "
        f"{before.name!r} with a linear activation and end the model in "
        f"keras.layers.Activation({activation!r}) after {final.name!r}")


@dataclass(frozen=True)
class Logits:
    """Where a model's logits are: the head ends at `end` (a tensor in the model's graph) and
    `tail` (or nothing) takes it on to the logits [N, classes].

    layers: the layers `tail` runs (for the CAM check). activation: "softmax" / "sigmoid", the
    model's own final activation, or "linear" when its output is the logits. kernel: the
    [K', classes] kernel of a final Dense (or 1x1 Conv2D) whose linear part `tail` is, else None."""

    end: object
    tail: Callable | None
    layers: tuple
    final: object
    activation: str
    kernel: object = None


def logits_of(model) -> Logits:
    """The logits of `model`: before its final softmax / sigmoid, whether that is an Activation
    or Softmax layer, the activation of a Dense (its linear part) or of any other layer (a linear
    twin with its weights), or inside a nested model ending the model (a Sequential head), whose
    layers up to that point `tail` runs. A model that ends in neither outputs its logits."""
    final = probability_layer(model)
    if _is_model(final):
        if len(final.inputs) != 1:
            raise ModelError(f"model {model.name!r}: its output layer {final.name!r} is a nested "
                             "model with several inputs; camface needs one that takes one tensor")
        inner = logits_of(final)
        if inner.activation not in _PROBABILITY_ACTIVATIONS:
            return Logits(output_in(model, final), None, (), final, "linear")
        run, layers = _submodel(final.inputs[0], inner.end, f"nested head {final.name!r}",
                                differentiated=True)
        tail = run if inner.tail is None else (lambda x, run=run, tail=inner.tail: tail(run(x)))
        return Logits(input_in(model, final), tail, layers + inner.layers, inner.final,
                      inner.activation, inner.kernel)
    activation = activation_name(final)
    if activation not in _PROBABILITY_ACTIVATIONS:
        return Logits(output_in(model, final), None, (), final, "linear")
    end = input_in(model, final)
    kind = type(final).__name__
    if kind in ("Activation", "Softmax"):
        logits = Logits(end, None, (), final, activation)
    elif kind == "Dense":
        logits = Logits(end, _linear_dense(final), (final,), final, activation, final.kernel)
    else:
        twin = linear_twin(model, final)
        one_by_one = kind == "Conv2D" and tuple(final.kernel_size) == (1, 1)  # CAM reads its kernel
        logits = Logits(end, lambda x, twin=twin: twin(x, training=False), (final,), final, activation,
                        final.kernel if one_by_one else None)
    if len(output_in(model, final).shape) == 2:
        return logits
    # probabilities squeezed off a 1x1 map (`probability_layer`): the logits are its channels
    from keras import ops

    classes = int(output_in(model, final).shape[-1])
    run = logits.tail or (lambda x: x)
    return replace(logits, tail=lambda x, run=run: ops.reshape(run(x), (-1, classes)))


def linear_twin(model, layer):
    """A copy of `layer` of `model` (a Conv2D, EinsumDense... built with a softmax / sigmoid
    activation) with a linear activation and the same weight values, built on `layer`'s input:
    what it computes before its activation. ModelError naming the layer when Keras cannot
    rebuild it."""
    import keras

    source = input_in(model, layer)
    try:
        twin = layer.__class__.from_config({**layer.get_config(), "activation": "linear",
                                            "name": f"{layer.name}_logits"})
        twin(keras.KerasTensor(source.shape, dtype=source.dtype))
        twin.set_weights(layer.get_weights())
    except Exception as exc:  # Keras raises many types for a config it cannot rebuild
        raise ModelError(f"layer {layer.name!r} ({type(layer).__name__}) ends the model in "
                         f"{activation_name(layer)} but cannot be rebuilt without it "
                         f"({_first_line(exc)}); end the model in a linear {layer.name!r} then "
                         f"keras.layers.Activation({activation_name(layer)!r})") from exc
    return twin


def activation_name(layer) -> str:
    """The activation a layer ends in: softmax, sigmoid, linear, ..."""
    if type(layer).__name__ == "Softmax":
        return "softmax"
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", str(act)) if act is not None else "linear"


def _linear_dense(dense) -> Callable:
    """The linear part x @ kernel + bias of a Dense layer whose activation is softmax/sigmoid."""
    from keras import ops

    def linear(x):
        y = ops.matmul(x, dense.kernel)
        return y + dense.bias if dense.bias is not None else y

    return linear


def _submodel(inputs, outputs, what: str, differentiated: bool = False):
    """A callable running the layers between two tensors, and those layers; a differentiated
    part has its global pooling layers replaced by ones whose gradient converts to ONNX."""
    import keras

    if inputs is outputs:
        return (lambda x: x), ()
    try:
        sub = keras.Model(inputs, outputs)
    except ValueError as exc:
        raise ModelError(f"cannot cut the model at {what}: layers after it also read tensors from "
                         f"before it (inside a residual block?); choose a layer where the network "
                         f"narrows, such as an `add` or block output ({_first_line(exc)})") from exc
    layers = tuple(layer for layer in operations(sub) if type(layer).__name__ != "InputLayer")
    if differentiated:
        sub = _gradient_safe(sub)

    def call(x, sub=sub):
        return sub(x, training=False)

    return call, layers


def _gradient_safe(sub):
    """`sub` with its GlobalAverage/MaxPooling2D layers (channels_last, no keepdims) replaced by
    `graph.safe_global_*_pool`; every other layer is shared, weights included."""
    import keras

    from camface.export import graph

    functions = {"GlobalAveragePooling2D": graph.safe_global_average_pool,
                 "GlobalMaxPooling2D": graph.safe_global_max_pool}

    class SafePooling(keras.layers.Layer):
        def __init__(self, function, **kwargs):
            super().__init__(**kwargs)
            self.function = function

        def call(self, x):
            return self.function(x)

    def swap(layer):
        kind = type(layer).__name__
        if (kind in functions and not layer.keepdims
                and getattr(layer, "data_format", "channels_last") == "channels_last"):
            return SafePooling(functions[kind], name=layer.name)
        return layer

    return keras.models.clone_model(sub, clone_function=swap)


def _split(model, path: list[str], end) -> tuple[Callable, Callable, tuple]:
    """features, head and head layers of `model` cut at `path`, the head ending at `end`."""
    layer = next((op for op in operations(model) if op.name == path[0]), None) or \
        model.get_layer(path[0])
    where = f"layer {'/'.join(path)!r}"
    if len(path) == 1:
        target = output_in(model, layer)
        features, _ = _submodel(model.inputs[0], target, where)
        head, layers = _submodel(target, end, where, differentiated=True)
        return features, head, layers
    if not _is_model(layer):
        raise ModelError(f"{path[0]!r} is not a nested model in {model.name!r}")
    inner_features, inner_head, inner_layers = _split(layer, path[1:], layer.outputs[0])
    before, _ = _submodel(model.inputs[0], input_in(model, layer), where)
    after, outer_layers = _submodel(output_in(model, layer), end, where, differentiated=True)

    def features(x):
        return inner_features(before(x))

    def head(a):
        return after(inner_head(a))

    return features, head, inner_layers + outer_layers


def cam_weights(split: Split, num_classes: int, channels: int):
    """CAM class weights W [K, classes] (CAM, arXiv:1512.04150 eq. 2: M_c = sum_k w_k^c f_k) when
    the head is global average pooling then one linear layer (or nothing: identity weights),
    else (None, reason). Biases are left out, as in the paper."""
    import numpy as np

    layers = [layer for layer in split.head_layers if not identity_at_inference(layer)]
    kinds = [type(layer).__name__ for layer in layers]
    if not kinds or kinds[0] != "GlobalAveragePooling2D":
        first = kinds[0] if kinds else "nothing"
        return None, (f"CAM needs global average pooling right after the target layer "
                      f"{split.target_layer!r}; found {first}")
    rest = layers[1:]
    if not rest:
        if channels != num_classes:
            return None, (f"global average pooling feeds the softmax directly but has {channels} "
                          f"channels for {num_classes} classes")
        return np.eye(channels, dtype=np.float32), ""
    if len(rest) == 1:
        layer = rest[0]
        kind = type(layer).__name__
        linear = activation_name(layer) in ("linear",) or layer is _final_of(split)
        if kind == "Dense" and linear:
            return np.asarray(layer.kernel, dtype=np.float32), ""
        if kind == "Conv2D" and linear and tuple(layer.kernel_size) == (1, 1):
            return np.asarray(layer.kernel, dtype=np.float32).reshape(channels, -1), ""
    names = " -> ".join(f"{layer.name} ({type(layer).__name__})" for layer in rest)
    return None, (f"the head after global average pooling is not one linear layer "
                  f"({names}); CAM needs GAP -> Dense/1x1 conv -> softmax")


def _final_of(split: Split):
    return split.head_layers[-1] if split.final_kernel is not None else None
