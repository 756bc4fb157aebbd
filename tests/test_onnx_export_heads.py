"""How the ONNX and .pt2 paths read a classifier's head, as the Keras path does: a final Softmax /
Sigmoid (no-ops after it) is where the logits are; a head nested in submodules is explained at
its logits, a target inside it too; probabilities squeezed off a 1x1 map (an all-convolutional
head: Conv(classes, 1) -> Softmax -> Flatten) are explained at the map's channels, and
probabilities pooled or mixed after their activation (across crops, or classes reordered by a
Transpose) are refused naming the nodes."""

from __future__ import annotations

import numpy as np
import pytest

import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from camface import methods
from camface.errors import ModelError
from camface.export import onnx_export
from camface.export.exporter import ExportOptions

SIZE = 8


def _onnx(nodes, inits, classes=4, opset=18, out=None, out_type=TensorProto.FLOAT):
    """x [N, 3, 8, 8] -> conv "conv" [N, 6, 8, 8] (relu) -> `nodes` -> "out" [N, classes] (or
    the dims `out`, of `out_type`)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             *[numpy_helper.from_array(value, name) for name, value in inits.items()]]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["conv"], ["a"], name="relu"), *nodes]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("out", out_type, out or ["N", classes])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


_RNG = np.random.default_rng(1)
_KERNEL = _RNG.standard_normal((4, 6, 1, 1)).astype(np.float32)  # Conv(4, 1): the class scores
_WIDE = _RNG.standard_normal((4, 6, SIZE, SIZE)).astype(np.float32) / 8  # Conv(4, 8), valid: 1x1
_BIAS = _RNG.standard_normal(4).astype(np.float32)
_SHAPE = np.array([-1, 4], np.int64)
_DENSE = {"k": _KERNEL[:, :, 0, 0], "b": _BIAS}  # Gemm(4): the 1x1 conv's weights


def _node(op, inputs, output, **attrs):
    return helper.make_node(op, inputs, [output], name=output, **attrs)


def _dense_softmax(*tail):
    """a -> GAP -> Flatten -> Gemm(4) -> Softmax "probs" [N, 4] -> `tail` (the last writes "out")."""
    return [_node("GlobalAveragePool", ["a"], "pool"), _node("Flatten", ["pool"], "flat"),
            _node("Gemm", ["flat", "k", "b"], "scores", transB=1), _node("Softmax", ["scores"], "probs"), *tail]


# name -> (nodes after "a" [N, 6, 8, 8], initializers, whether the 1x1 conv follows a pooling (CAM),
# and the output's dims where they are not [N, 4])
SQUEEZED = {
    "gap-conv1x1-softmax-flatten": ([
        _node("GlobalAveragePool", ["a"], "pool"), _node("Conv", ["pool", "k", "b"], "scores"),
        _node("Softmax", ["scores"], "probs4", axis=1), _node("Flatten", ["probs4"], "out")],
        {"k": _KERNEL, "b": _BIAS}, True),
    "gap-conv1x1-sigmoid-reshape-identity": ([
        _node("GlobalAveragePool", ["a"], "pool"), _node("Conv", ["pool", "k", "b"], "scores"),
        _node("Sigmoid", ["scores"], "probs4"), _node("Reshape", ["probs4", "shape"], "flat"),
        _node("Identity", ["flat"], "out")], {"k": _KERNEL, "b": _BIAS, "shape": _SHAPE}, True),
    "all-conv-softmax-gap-flatten": ([  # GAP-free: a valid 8x8 conv to a 1x1 map, pooled anyway
        _node("Conv", ["a", "k", "b"], "scores"), _node("Softmax", ["scores"], "probs4", axis=1),
        _node("GlobalAveragePool", ["probs4"], "same"), _node("Flatten", ["same"], "out")],
        {"k": _WIDE, "b": _BIAS}, False),
    "all-conv-logsoftmax-squeeze-dropout": ([
        _node("Conv", ["a", "k"], "scores"), _node("LogSoftmax", ["scores"], "probs4", axis=1),
        _node("Squeeze", ["probs4", "axes"], "flat"), _node("Dropout", ["flat"], "out")],
        {"k": _WIDE, "axes": np.array([2, 3], np.int64)}, False),
    # a Cast to float32 or an Unsqueeze after the activation (as exporters write them)
    "gap-gemm-softmax-cast": (_dense_softmax(_node("Cast", ["probs"], "out", to=TensorProto.FLOAT)), _DENSE, True),
    "gap-gemm-softmax-unsqueeze": (_dense_softmax(_node("Unsqueeze", ["probs", "axis1"], "out")),
                                   {**_DENSE, "axis1": np.array([1], np.int64)}, True, ["N", 1, 4]),
    "all-conv-softmax-cast-squeeze-unsqueeze": ([
        _node("Conv", ["a", "k", "b"], "scores"), _node("Softmax", ["scores"], "probs4", axis=1),
        _node("Cast", ["probs4"], "same", to=TensorProto.FLOAT), _node("Squeeze", ["same", "axes"], "flat"),
        _node("Unsqueeze", ["flat", "axis2"], "out")],
        {"k": _WIDE, "b": _BIAS, "axes": np.array([2, 3], np.int64), "axis2": np.array([2], np.int64)}, False,
        ["N", 4, 1]),
    # [N, 4] probabilities reshaped or transposed without moving the batch or the classes
    "gap-gemm-softmax-transpose-in-place": (_dense_softmax(_node("Transpose", ["probs"], "out", perm=[0, 1])),
                                            _DENSE, True),
    "gap-gemm-softmax-reshape-to-2x2": (_dense_softmax(_node("Reshape", ["probs", "shape"], "out")),
                                        {**_DENSE, "shape": np.array([-1, 2, 2], np.int64)}, True, ["N", 2, 2]),
    "gap-gemm-softmax-reshape-transpose-size-1": (_dense_softmax(
        _node("Reshape", ["probs", "shape"], "r"), _node("Transpose", ["r"], "out", perm=[0, 2, 1])),
        {**_DENSE, "shape": np.array([-1, 1, 4], np.int64)}, True, ["N", 4, 1]),
}


def _run(model, images):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": (images.astype(np.float32) / 255).transpose(0, 3, 1, 2)})[0]


def _graph(cam_graph, images, classes):
    session = ort.InferenceSession(cam_graph.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": images, "class_index": classes})))


@pytest.mark.parametrize("name", list(SQUEEZED))
def test_probabilities_squeezed_off_a_1x1_map_are_explained_at_its_channels(name):
    """Conv(classes, 1) -> Softmax(axis=1) -> Flatten (or a valid conv to 1x1, pooled or squeezed
    after): the logits are the 1x1 map's channels; the export refused them ('the logits must be
    [N, classes]') or, pooled, softmaxed the probabilities again. The graph's probs are the
    model's, and CAM (GAP -> 1x1 conv) is its kernel's weighted sum of the activations."""
    nodes, inits, with_cam, *out = SQUEEZED[name]
    model = _onnx(nodes, inits, out=out[0] if out else None)
    cam_graph, info, differences = onnx_export.build(model, ExportOptions(preset="unit", target_layer="a"))
    assert all(d.ok for d in differences)
    images = np.random.default_rng(2).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array([-1, 0, 3], np.int64)
    got = _graph(cam_graph, images, classes)
    own = _run(model, images).reshape(len(images), -1)  # [N, 1, 4] or [N, 4, 1] unsqueezed
    want = np.exp(own) if "logsoftmax" in name else own
    np.testing.assert_allclose(got["probs"], want, rtol=1e-5, atol=1e-6)
    assert ("cam" in info.heatmaps) == with_cam
    chosen = np.where(classes < 0, want.argmax(1), classes)
    if with_cam:  # CAM: sum_k w_k^c A_k, w the 1x1 conv's kernel (arXiv:1512.04150 eq. 2)
        expected = np.einsum("nhwk,nk->nhw", got["activations"], _KERNEL[chosen, :, 0, 0])
        np.testing.assert_allclose(got["cam"], expected, rtol=1e-5,
                                   atol=1e-6 * float(np.abs(expected).max()))
    else:  # a linear head: d logit_c / dA = the conv's kernel of class c, laid out NHWC
        gradient = _WIDE[chosen].transpose(0, 2, 3, 1)
        pooled = gradient.mean(axis=(1, 2))
        expected = np.maximum(np.einsum("nhwk,nk->nhw", got["activations"], pooled), 0)
        np.testing.assert_allclose(got["gradcam"], expected, rtol=1e-4,
                                   atol=1e-5 * float(np.abs(expected).max()))


REFUSED = {
    "softmax-pooled-over-8x8": ([
        _node("Conv", ["a", "k"], "scores"), _node("Softmax", ["scores"], "probs4", axis=1),
        _node("GlobalAveragePool", ["probs4"], "pool"), _node("Flatten", ["pool"], "out")],
        {"k": _KERNEL}, r"its output is the Softmax of 'scores' \(node 'probs4'\) passed through 'pool' "
        r"\(GlobalAveragePool\) -> 'out' \(Flatten\): 'pool' \(GlobalAveragePool\) turns \[N, 4, 8, 8\] into "
        r"\[N, 4, 1, 1\]: it pools .*no logits give.*ending in the Softmax of \[N, classes\] logits, after 'out'"),
    "sigmoid-max-pooled": ([
        _node("Conv", ["a", "k"], "scores"), _node("Sigmoid", ["scores"], "probs4"),
        _node("ReduceMax", ["probs4", "axes"], "out", keepdims=0)],
        {"k": _KERNEL, "axes": np.array([2, 3], np.int64)},
        r"the Sigmoid of 'scores' \(node 'probs4'\) passed through 'out' \(ReduceMax\): 'out' \(ReduceMax\) "
        r"turns \[N, 4, 8, 8\] into \[N, 4\]"),
    "softmax-over-a-size-1-axis": ([
        _node("GlobalAveragePool", ["a"], "pool"), _node("Conv", ["pool", "k"], "scores"),
        _node("Softmax", ["scores"], "probs4"), _node("Flatten", ["probs4"], "out")],
        {"k": _KERNEL}, r"node 'probs4'.*its Softmax runs over axis -1 of \[N, 4, 1, 1\], not over the "
                        r"class scores alone"),
    "softmax-cast-to-double": (
        _dense_softmax(_node("Cast", ["probs"], "out", to=TensorProto.DOUBLE)), _DENSE,
        r"its output is the Softmax of 'scores' \(node 'probs'\) passed through 'out' \(Cast\): 'out' "
        r"\(Cast\) casts the probabilities to double", {"out_type": TensorProto.DOUBLE}),
    "softmax-unsqueezed-before-the-batch": (
        _dense_softmax(_node("Unsqueeze", ["probs", "axis0"], "out")), {**_DENSE, "axis0": np.array([0], np.int64)},
        r"the Softmax of 'scores' \(node 'probs'\) passed through 'out' \(Unsqueeze\): 'out' \(Unsqueeze\) "
        r"turns \[N, 4\] into \[1, N, 4\]", {"out": [1, "N", 4]}),
    # [N, 4] probabilities whose tail moves the batch or the classes: the export kept the
    # model's output as its probs (mixed across crops) or, after a Transpose, softmaxed them again
    "softmax-reshaped-across-the-batch": (
        _dense_softmax(_node("Reshape", ["probs", "shape"], "out")), {**_DENSE, "shape": np.array([-1, 2], np.int64)},
        r"the Softmax of 'scores' \(node 'probs'\) passed through 'out' \(Reshape\): 'out' \(Reshape\) "
        r"turns \[N, 4\] into \[M, 2\]", {"out": ["M", 2]}),
    "softmax-reshaped-classes-first": (
        _dense_softmax(_node("Reshape", ["probs", "shape"], "out")), {**_DENSE, "shape": np.array([4, -1], np.int64)},
        r"passed through 'out' \(Reshape\): 'out' \(Reshape\) turns \[N, 4\] into \[4, N\]", {"out": [4, "N"]}),
    "softmax-transposed": (
        _dense_softmax(_node("Transpose", ["probs"], "out", perm=[1, 0])), _DENSE,
        r"passed through 'out' \(Transpose\): 'out' \(Transpose\) turns \[N, 4\] into \[4, N\]", {"out": [4, "N"]}),
    "softmax-classes-permuted": (
        _dense_softmax(_node("Reshape", ["probs", "shape"], "r"), _node("Transpose", ["r"], "t", perm=[0, 2, 1]),
                       _node("Reshape", ["t", "back"], "out")),
        {**_DENSE, "shape": np.array([-1, 2, 2], np.int64), "back": np.array([-1, 4], np.int64)},
        r"passed through 'r' \(Reshape\) -> 't' \(Transpose\) -> 'out' \(Reshape\): 't' \(Transpose\) "
        r"permutes \[\w+, 2, 2\] by \[0, 2, 1\]: it reorders the class scores"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_probabilities_pooled_after_their_activation_are_refused_naming_the_nodes(name):
    """A mean (or max) of softmaxes over a map is no softmax of any logits: the export took it
    for logits and softmaxed it again. It is refused, naming the activation and what pooled it."""
    nodes, inits, match, *declared = REFUSED[name]
    with pytest.raises(ModelError, match=match):
        onnx_export.build(_onnx(nodes, inits, **(declared[0] if declared else {})), ExportOptions(preset="unit"))


_DEFAULT_AXIS = ([  # a Softmax without an axis of [N, 4, 1, 1] scores, then flattened
    _node("GlobalAveragePool", ["a"], "pool"), _node("Conv", ["pool", "k"], "scores"),
    _node("Softmax", ["scores"], "probs4"), _node("Flatten", ["probs4"], "out")], {"k": _KERNEL})


def test_a_softmax_without_an_axis_before_opset_13_runs_over_the_classes():
    """Before opset 13 a Softmax's default axis is 1, its input flattened from there: over the
    class scores of [N, 4, 1, 1] (refused at opset 18 above, where it runs over the last axis).
    The export upgrades the model first and its probs are the model's own."""
    model = _onnx(*_DEFAULT_AXIS, opset=11)
    cam_graph, info, differences = onnx_export.build(model, ExportOptions(preset="unit", target_layer="a"))
    assert all(d.ok for d in differences)
    images = np.random.default_rng(3).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    got = _graph(cam_graph, images, np.array([-1, 2], np.int64))
    own = _run(model, images)
    np.testing.assert_allclose(own.sum(1), 1, rtol=1e-5)  # a softmax over the four classes
    np.testing.assert_allclose(got["probs"], own, rtol=1e-5, atol=1e-6)


def test_a_head_read_before_its_upgrade_to_opset_13_is_refused_naming_the_opset():
    """`_logits_squeezed` took a Softmax without an axis for axis -1 at any opset (before 13 it
    is 1): a model not upgraded first is refused, naming its opset and the node."""
    from camface.export import onnx_model

    model = onnx_model.prepare(_onnx(*_DEFAULT_AXIS, opset=11))
    with pytest.raises(ModelError, match=r"m: opset 11: its Softmax 'probs4' is read as opset 13 defines it"):
        onnx_model.describe(model, where="m")


# ---------------------------------------------------------------- PyTorch (.pt2)

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")


def _torch_models():
    """name -> a tiny eval-mode net [N, 3, 8, 8] -> probabilities [N, 4] whose head is nested."""
    from torch import nn

    torch.manual_seed(0)
    stem = lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())  # noqa: E731
    found = {
        # a Sequential head ending in softmax, a Dropout and an Identity after it
        "nested": nn.Sequential(stem(), nn.Sequential(
            nn.Conv2d(6, 5, 1), nn.Tanh(),  # smooth: the self-check's finite differences see no kink
            nn.Sequential(nn.Conv2d(5, 5, 1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(5, 4), nn.Softmax(dim=1)),
            nn.Dropout(0.3), nn.Identity())),
        # all-convolutional: Conv(4, 8) valid -> 1x1 -> Softmax over channels -> Flatten
        "all-conv": nn.Sequential(stem(), nn.Sequential(nn.Conv2d(6, 4, SIZE), nn.Softmax(dim=1),
                                                        nn.Flatten())),
        "pooled-softmax": nn.Sequential(stem(), nn.Sequential(nn.Conv2d(6, 4, 1), nn.Softmax(dim=1),
                                                              nn.AdaptiveAvgPool2d(1), nn.Flatten())),
    }
    return {name: model.eval() for name, model in found.items()}


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """name -> (torch model, its .pt2 path)."""
    from onnx_helpers import save_program

    folder = tmp_path_factory.mktemp("heads")
    return {name: (model, save_program(model, folder / f"{name}.pt2", size=SIZE))
            for name, model in _torch_models().items()}


def _torch_gradcam(model, module: str, softmax: str, images, classes):
    """Eager torch: probabilities and Grad-CAM [N, h, w] of the logit (the input of the module
    `softmax`, flattened) at `module`'s output, on images scaled to [0, 1]."""
    seen = {}

    def keep(_module, _inputs, out):
        out.retain_grad()
        seen["a"] = out

    hooks = [model.get_submodule(module).register_forward_hook(keep),
             model.get_submodule(softmax).register_forward_hook(
                 lambda _m, inputs, _out: seen.__setitem__("logits", inputs[0].flatten(1)))]
    x = torch.tensor((images.astype(np.float32) / 255).transpose(0, 3, 1, 2))
    probs = model(x)
    for hook in hooks:
        hook.remove()
    logits = seen["logits"]
    chosen = torch.where(torch.tensor(classes) < 0, logits.argmax(1), torch.tensor(classes))
    logits.gather(1, chosen[:, None]).sum().backward()
    a = seen["a"].detach().permute(0, 2, 3, 1).numpy()
    g = seen["a"].grad.permute(0, 2, 3, 1).numpy()
    return probs.detach().numpy(), methods.get("gradcam").reference(a, g, None)


@pytest.mark.parametrize("name, target, softmax", [
    ("nested", None, "1.2.5"),  # the default: the map the nested head's pooling reads
    ("nested", "1.0", "1.2.5"),  # one nested head deep
    ("nested", "1.2.0", "1.2.5"),  # two deep: ONNX is flat, the cut is as good as any
    ("all-conv", None, "1.1"),
])
def test_a_nested_or_all_convolutional_torch_head_is_explained_at_its_logits(programs, name, target, softmax):
    """A .pt2 whose head is nested Sequentials ending in Softmax (then Dropout, Identity), or
    an all-convolutional head (Conv to 1x1 -> Softmax -> Flatten): the graph's probs are the
    model's and Grad-CAM is torch autograd's of the logit before the softmax."""
    model, path = programs[name]
    result = onnx_export.export(path, path.with_suffix(f".{target}.onnx"),
                                ExportOptions(preset="unit", target_layer=target))
    assert all(d.ok for d in result.differences)
    # the defaults: the Tanh the nested head's pooling reads; the last map larger than 1x1
    assert result.info.target_layer == (target or {"nested": "1.2.1", "all-conv": "0"}[name])
    images = np.random.default_rng(3).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array([-1, 1, 3], np.int64)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"image": images, "class_index": classes})))
    probs, gradcam = _torch_gradcam(model, result.info.target_layer, softmax, images, classes)
    np.testing.assert_allclose(got["probs"], probs, rtol=1e-5, atol=1e-6)
    scale = float(np.abs(gradcam).max())
    assert scale > 0
    assert np.abs(got["gradcam"] - gradcam).max() <= 1e-4 * scale + 1e-7


def test_a_torch_softmax_pooled_over_a_map_is_refused_naming_the_nodes(programs):
    _, path = programs["pooled-softmax"]
    with pytest.raises(ModelError, match=r"its output is the Softmax of .* passed through .*"
                                         r"turns \[\w+, 4, 8, 8\] into .*no logits give"):
        onnx_export.export(path, path.with_suffix(".onnx"), ExportOptions(preset="unit"))
    assert not path.with_suffix(".onnx").exists()
