"""The export's gradient self-check (export/onnx_verify.py, check 2) catches a backward rule that
loses part of the gradient (a LeakyReLU rule with ReLU's slope, a dropped branch of an Add or a
Concat, a Mul rule missing one operand's term, a MaxPool routing to the wrong element, a
ReduceMax taken for a mean, a GroupNormalization without its scale): the export exits 2, names
the target layer and writes nothing; the same models with the right rules export, also with
their weights moved by a few ulps, and also where the max pool reads a ReLU target's tied
zeros."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from camface.cli import main  # noqa: E402
from camface.export import onnx_grad, onnx_verify  # noqa: E402
from camface.export import onnx_grad_layers as layers  # noqa: E402
from camface.export import onnx_grad_norms as norms  # noqa: E402
from camface.export import onnx_grad_pointwise as pointwise  # noqa: E402

CLASSES = 4


def _conv(name, source, cin, cout, rng, inits, kernel=3):
    inits.append(numpy_helper.from_array(
        (rng.standard_normal((cout, cin, kernel, kernel)) / np.sqrt(cin * kernel * kernel))
        .astype(np.float32), f"{name}_w"))
    inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(cout)).astype(np.float32),
                                         f"{name}_b"))
    return helper.make_node("Conv", [source, f"{name}_w", f"{name}_b"], [name], name=name,
                            pads=[kernel // 2] * 4)


def model(kind: str, seed: int = 0):
    """x [N, 3, 16, 16] -> Conv `target` (8 channels) -> a `kind` block -> Conv, GAP, Gemm.
    relu_*: the target is a ReLU's output, three of its channels all zero and others zero in
    places (ties for the max pool or ReduceMax after it)."""
    rng = np.random.default_rng(seed)
    inits: list = []
    if kind.startswith("relu_"):
        nodes = [_conv("pre", "x", 3, 8, rng, inits), helper.make_node("Relu", ["pre"], ["target"])]
        bias = numpy_helper.to_array(inits[1]) - np.float32([9, 9, 9, 0.3, 0.3, 0, 0, 0])
        inits[1] = numpy_helper.from_array(bias.astype(np.float32), "pre_b")
    else:
        nodes = [_conv("target", "x", 3, 8, rng, inits)]
    channels = 8
    if kind == "leaky_relu":
        nodes.append(helper.make_node("LeakyRelu", ["target"], ["block"], alpha=0.2))
    elif kind == "add":
        nodes += [_conv("a", "target", 8, 8, rng, inits), _conv("b", "target", 8, 8, rng, inits),
                  helper.make_node("Add", ["a", "b"], ["sum"]),
                  helper.make_node("Tanh", ["sum"], ["block"])]
    elif kind == "concat":
        nodes += [_conv("a", "target", 8, 6, rng, inits), _conv("b", "target", 8, 6, rng, inits),
                  helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
                  helper.make_node("Tanh", ["cat"], ["block"])]
        channels = 12
    elif kind == "mul":
        nodes += [_conv("a", "target", 8, 8, rng, inits),
                  helper.make_node("Sigmoid", ["a"], ["gate"]),
                  helper.make_node("Mul", ["target", "gate"], ["block"])]
    elif kind in ("max_pool", "relu_max_pool"):
        nodes.append(helper.make_node("MaxPool", ["target"], ["block"], kernel_shape=[2, 2],
                                      strides=[2, 2]))
    elif kind == "group_norm":  # opset 21 (as torch's dynamo exporter writes nn.GroupNorm)
        nodes.append(helper.make_node("GroupNormalization", ["target", "gn_scale", "gn_bias"],
                                      ["block"], num_groups=2))
        inits += [numpy_helper.from_array(np.float32([0.25, 2.5] * 4), "gn_scale"),
                  numpy_helper.from_array(np.float32([0.1, -0.2] * 4), "gn_bias")]
    elif kind == "relu_amax":
        nodes.append(helper.make_node("ReduceMax", ["target", "hw"], ["block"], keepdims=1))
        inits.append(numpy_helper.from_array(np.array([2, 3]), "hw"))
    else:
        raise ValueError(kind)
    nodes += [_conv("last", "block", channels, 16, rng, inits),
              helper.make_node("Relu", ["last"], ["act"]),
              helper.make_node("GlobalAveragePool", ["act"], ["pool"]),
              helper.make_node("Flatten", ["pool"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    inits.append(numpy_helper.from_array(
        (rng.standard_normal((CLASSES, 16)) / 4).astype(np.float32), "fc"))
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=inits)
    opset = 21 if kind == "group_norm" else 18
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    built.ir_version = 8 if opset == 18 else 10
    return built


def _relu_for_leaky(ctx, node, grads):
    return pointwise.relu(ctx, node, grads)


def _first_branch_only(rule):
    def wrong(ctx, node, grads):
        found = rule(ctx, node, grads)
        return found[:1] + [None] * (len(found) - 1)
    return wrong


def _max_pool_to_the_min(ctx, node, grads):
    """MaxPool's indices of -x: the gradient goes to each window's smallest element."""
    wrong = onnx.NodeProto()
    wrong.CopyFrom(node)
    wrong.input[0] = ctx.builder.op("Neg", [node.input[0]])
    return layers.max_pool(ctx, wrong, grads)


def _max_as_mean(ctx, node, grads):
    """ReduceMax differentiated as ReduceMean: the gradient spread over every element."""
    return layers.reduce(ctx, node, grads, mean=True)


def _group_norm_without_its_scale(ctx, node, grads):
    """GroupNormalization differentiated as if its scale were 1."""
    wrong = onnx.NodeProto()
    wrong.CopyFrom(node)
    wrong.input[1] = ctx.builder.const(np.ones(8, np.float32))
    return norms.group_norm(ctx, wrong, grads)


WRONG_RULES = {
    "leaky_relu": ("LeakyRelu", _relu_for_leaky),
    "add": ("Add", _first_branch_only(pointwise.add)),
    "concat": ("Concat", _first_branch_only(pointwise.concat)),
    "mul": ("Mul", _first_branch_only(pointwise.mul)),
    "max_pool": ("MaxPool", _max_pool_to_the_min),
    # a max over a ReLU target's zeros: tied elements, where finite differences see the tie
    # broken, not the rule (the check moves the untied elements only)
    "relu_max_pool": ("MaxPool", _max_pool_to_the_min),
    "relu_amax": ("ReduceMax", _max_as_mean),
    # ONNX's shape inference stops at GroupNormalization: the export gives its output the
    # input's shape (onnx_model.prepare)
    "group_norm": ("GroupNormalization", _group_norm_without_its_scale),
}


def _export(tmp_path, forward, capsys):
    path, out = tmp_path / "m.onnx", tmp_path / "cam.onnx"
    onnx.save(forward, str(path))
    code = main(["export", str(path), "-o", str(out), "--preset", "unit",
                 "--target-layer", "target", "--no-rank"])  # the self-check runs before any ranking
    captured = capsys.readouterr()
    return code, out, captured.out + captured.err


@pytest.mark.parametrize("kind", sorted(WRONG_RULES))
def test_a_rule_that_loses_part_of_the_gradient_fails_the_export(tmp_path, capsys, monkeypatch,
                                                                   kind):
    op, wrong = WRONG_RULES[kind]
    code, out, _ = _export(tmp_path, model(kind), capsys)
    assert code == 0 and out.is_file()  # the right rules pass
    out.unlink()
    monkeypatch.setitem(onnx_grad.RULES, op, wrong)
    code, out, printed = _export(tmp_path, model(kind), capsys)
    assert code == 2 and not out.exists()
    assert "target layer 'target'" in printed and "along random directions by" in printed


def _moved_by_ulps(forward, seed: int):
    """`forward` with every weight moved by a few ulps (onnx_verify.ulp_perturbed)."""
    moved = onnx.ModelProto()
    moved.CopyFrom(forward)
    for k, tensor in enumerate(moved.graph.initializer):
        if tensor.data_type != TensorProto.FLOAT:  # axes
            continue
        tensor.CopyFrom(numpy_helper.from_array(
            onnx_verify.ulp_perturbed(numpy_helper.to_array(tensor), seed * 100 + k), tensor.name))
    return moved


@pytest.mark.parametrize("seed", [1, 2])
def test_the_verdict_holds_when_weights_and_inputs_move_by_a_few_ulps(monkeypatch, seed):
    """What another CPU's rounding does (an AVX-512 machine sums in other orders): the right
    rules still pass with a margin, the wrong ones still fail, on every model above."""
    from camface.errors import ModelError
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    normalised = onnx_verify._normalised
    monkeypatch.setattr(onnx_verify, "_normalised", lambda *a: onnx_verify.ulp_perturbed(
        normalised(*a), seed))
    options = ExportOptions(preset="unit", target_layer="target")
    for kind, (op, wrong) in sorted(WRONG_RULES.items()):
        forward = _moved_by_ulps(model(kind), seed)
        _, _, differences = onnx_export.build(forward, options)
        random = [d for d in differences if isinstance(d, onnx_verify.RandomDirections)]
        assert random and all(d.ok for d in random), kind
        with monkeypatch.context() as patched:
            patched.setitem(onnx_grad.RULES, op, wrong)
            with pytest.raises(ModelError, match="along random directions"):
                onnx_export.build(forward, options)


def test_a_head_that_will_not_take_a_batch_is_run_one_row_at_a_time():
    """The probes run HEAD_BATCH rows a run; a head whose batch is fixed to 1 or folded into
    another axis (one logit row out for many in) is run row by row instead, same values."""

    class FoldsTheBatch:
        def run(self, _, feeds):
            rows = feeds["target"].reshape(len(feeds["target"]), -1)
            return [rows.sum(axis=0, keepdims=True) @ np.eye(rows.shape[1], 3)]

    targets = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2 * 5, 4)
    values = onnx_verify._head_logits(FoldsTheBatch(), 0, "x", "target", np.zeros((1, 2)),
                                      targets, 1)
    np.testing.assert_array_equal(values, targets[:, 1])


def _newer_ops_net():
    """A PyTorch classifier whose head (after the `target` conv) holds the ops with rules from
    tests/test_onnx_grad.py's later tables: GroupNorm, Mish, ConvTranspose, reflect padding,
    InstanceNorm, ELU, SELU, PixelShuffle, Softplus, torch.maximum, repeat, an L2-normalised
    embedding and log_softmax."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, 1, 1)
            self.target = nn.Conv2d(8, 8, 3, 2, 1)
            self.norm = nn.GroupNorm(2, 8)
            self.up = nn.ConvTranspose2d(8, 8, 3, 2, 1, output_padding=1)
            self.instance = nn.InstanceNorm2d(8, affine=True)
            self.conv = nn.Conv2d(8, 16, 3, 1, 1)
            self.mix = nn.Conv2d(4, 8, 1)
            self.embed = nn.Linear(8, 16)
            self.fc = nn.Linear(16, CLASSES)

        def forward(self, x):
            y = F.mish(self.norm(self.target(F.relu(self.stem(x)))))
            y = F.pad(self.up(y), (1, 1, 1, 1), mode="reflect")
            y = F.selu(self.conv(F.elu(self.instance(y))))
            y = F.softplus(self.mix(F.pixel_shuffle(y, 2)))
            y = torch.maximum(y, y.mean((2, 3), keepdim=True)) + y.repeat(1, 1, 1, 1)
            return F.log_softmax(self.fc(F.normalize(self.embed(y.mean((2, 3))), dim=1)) * 10, 1)

    torch.manual_seed(0)
    return Net().eval()


@pytest.mark.parametrize("opset, dynamo, optimize", [(17, False, True), (18, True, True), (21, True, True),
                                                     (18, True, False)],
                         ids=["torchscript-17", "dynamo-18", "dynamo-21", "dynamo-18-unoptimised"])
def test_a_torch_head_of_the_newer_ops_exports_with_every_gradient_method(tmp_path, opset, dynamo,
                                                                          optimize):
    """As each exporter writes them (GroupNorm: InstanceNormalization between Reshapes, or
    GroupNormalization at 21; Mish: Softplus, Tanh, Mul or the op), the self-check passes. Also
    with dynamo's optimiser off (camface's advice where it folds a BatchNorm into a
    convolution): axes as Reshapes and Ranges of Constants, which stopped the gradient before."""
    torch = pytest.importorskip("torch")
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    path, x = tmp_path / "m.onnx", torch.randn(1, 3, 32, 32)
    if dynamo:
        pytest.importorskip("onnxscript")
        torch.onnx.export(_newer_ops_net(), (x,), dynamo=True, opset_version=opset, optimize=optimize,
                          dynamic_shapes={"x": {0: torch.export.Dim("N")}}).save(str(path))
    else:
        torch.onnx.export(_newer_ops_net(), (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}})
    _, info, differences = onnx_export.build(onnx.load(str(path)),
                                             ExportOptions(preset="unit", target_layer="target"))
    random = [d for d in differences if isinstance(d, onnx_verify.RandomDirections)]
    assert random and all(d.ok for d in random)
    assert {"gradcam", "gradcampp", "layercam"} <= set(info.heatmaps)


def test_a_torch_attention_head_at_opset_23_exports_with_every_gradient_method(tmp_path):
    """From opset 23 torch's dynamo exporter writes F.scaled_dot_product_attention as ONNX's
    Attention, which had no gradient rule: such a ViT-like head exported the gradient-free maps
    only. Now its gradient passes the self-check and the gradient methods are exported."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    import torch.nn.functional as F
    from torch import nn

    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, 2, 1)
            self.target = nn.Conv2d(16, 16, 3, 1, 1)
            self.qkv = nn.Linear(16, 48)
            self.fc = nn.Linear(16, CLASSES)

        def forward(self, x):
            tokens = self.target(F.relu(self.stem(x))).flatten(2).transpose(1, 2)  # [N, 64, 16]
            n = tokens.shape[0]
            q, k, v = self.qkv(tokens).reshape(n, 64, 3, 2, 8).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.fc(y.transpose(1, 2).reshape(n, 64, 16).mean(1))

    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(2, 3, 16, 16),), dynamo=True, opset_version=23,
                      dynamic_shapes={"x": {0: torch.export.Dim("N", min=1, max=32)}}).save(str(path))
    forward = onnx.load(str(path))
    assert "Attention" in {n.op_type for n in forward.graph.node}
    _, info, differences = onnx_export.build(forward, ExportOptions(preset="unit", target_layer="target"))
    random = [d for d in differences if isinstance(d, onnx_verify.RandomDirections)]
    assert random and all(d.ok for d in random)
    assert {"gradcam", "gradcampp", "layercam"} <= set(info.heatmaps)
