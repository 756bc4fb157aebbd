"""The ONNX engine on whole PyTorch models (inline, see onnx_helpers.torch_models): every
registry heatmap from ONNX Runtime equals eager torch autograd on the same weights, and the
errors a user can run into."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx_helpers import torch_calls, save_program, torch_models  # noqa: E402

from camface import methods  # noqa: E402
from camface.cli import main  # noqa: E402
from camface.errors import ModelError  # noqa: E402
from camface.export import onnx_export, torch_model  # noqa: E402
from camface.export.exporter import ExportOptions  # noqa: E402
from camface.export.preprocess import PRESETS  # noqa: E402
from camface.graph_spec import GraphInfo  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (torch model, forward ONNX ModelProto from its .pt2)."""
    folder = tmp_path_factory.mktemp("pt2")
    found = {}
    for name, model in torch_models().items():
        path = save_program(model, folder / f"{name}.pt2")
        found[name] = (model, torch_model.to_onnx(path))
    return found


def torch_reference(model, images, classes, module, with_cam=True):
    """Eager torch: probs, activations NHWC and every registry heatmap at `module`'s output."""
    _, scale, offset = PRESETS["torch"]
    x = torch.tensor(images.astype(np.float32) * np.float32(scale) + np.float32(offset))
    x = x.permute(0, 3, 1, 2).contiguous()
    seen = {}

    def keep(module_, inputs, out):
        out.retain_grad()
        seen["a"] = out

    hook = getattr(model, module).register_forward_hook(keep)
    logits = model(x)
    hook.remove()
    chosen = torch.where(torch.tensor(classes) < 0, logits.argmax(1), torch.tensor(classes))
    logits.gather(1, chosen[:, None]).sum().backward()  # crops are independent
    a = seen["a"].detach().permute(0, 2, 3, 1).numpy()
    g = seen["a"].grad.permute(0, 2, 3, 1).numpy()
    fc = model.fc if isinstance(model.fc, torch.nn.Linear) and with_cam else None
    w = None if fc is None else fc.weight.detach().numpy()[chosen.numpy()][:, None, None, :]
    out = {"probs": torch.softmax(logits, 1).detach().numpy(), "activations": a}
    calls = torch_calls(model, module, x.permute(0, 2, 3, 1).numpy(), a, classes)
    for method in methods.METHODS.values():
        if methods.CLASS_WEIGHTS not in method.needs or w is not None:
            out[method.name] = method.reference(a, g, w, model=calls)
    return out


CASES = [("linear", None, "layer4"), ("mlp", None, "layer4"), ("linear", "layer3", "layer3")]


@pytest.mark.parametrize("name, target, module", CASES)
def test_every_heatmap_equals_torch_autograd(exported, name, target, module):
    model, forward = exported[name]
    options = ExportOptions(preset="torch", target_layer=target)
    cam_graph, info, differences = onnx_export.build(forward, options)
    assert info.target_layer == module and all(d.ok for d in differences)
    with_cam = name == "linear" and module == "layer4"  # a pooling -> linear head
    expected = {m for m in methods.names() if methods.CLASS_WEIGHTS not in methods.get(m).needs or with_cam}
    assert set(info.heatmaps) == expected
    session = ort.InferenceSession(cam_graph.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    for batch in (1, 4, 32):
        images = rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
        classes = rng.integers(-1, 5, batch).astype(np.int64)
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(None, {"image": images, "class_index": classes})))
        reference = torch_reference(model, images, classes, module, "cam" in expected)
        assert set(got) == set(reference)
        for output, value in reference.items():
            scale = float(np.abs(value).max())
            error = float(np.abs(got[output] - value).max())
            print(f"{name} {module} batch {batch} {output}: max |onnx - torch| = {error:.2e} "
                  f"(max |torch| = {scale:.3g})")
            assert error <= 1e-6 + 1e-4 * scale, output


@pytest.mark.parametrize("typo, meant", [("layr3", "layer3"), ("layer4.bn", "layer4.bn[12] or layer4.bn[12]")])
def test_a_misspelt_target_names_the_near_matches(exported, typo, meant):
    with pytest.raises(ModelError, match=rf"no tensor, node or module named '{typo}' \(did you mean "
                                         rf"{meant}.*\?[;)].*; candidate target layers: "):
        onnx_export.build(exported["linear"][1], ExportOptions(preset="torch", target_layer=typo))


def test_gradcam_is_relu_cam_over_hw_for_a_linear_head(exported):
    cam_graph, info, _ = onnx_export.build(exported["linear"][1], ExportOptions(preset="torch"))
    session = ort.InferenceSession(cam_graph.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(4).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    out = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"image": images, "class_index": np.array([-1, 1, 4])})))
    h, w = info.feature_size
    np.testing.assert_allclose(out["gradcam"], np.maximum(out["cam"], 0) / (h * w),
                               rtol=1e-4, atol=1e-7)


def test_cli_exports_a_pt2_and_records_the_metadata(tmp_path, capsys):
    model = torch_models()["linear"]
    path = save_program(model, tmp_path / "net.pt2")
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\ne\n")
    out = tmp_path / "net.onnx"
    assert main(["export", str(path), "-o", str(out), "--preset", "torch",
                 "--labels", str(labels), "--no-rank"]) == 0  # ranking: tests/test_ranking.py
    import onnx

    graph = onnx.load(str(out))
    info = GraphInfo.from_metadata({p.key: p.value for p in graph.metadata_props})
    assert info.labels == tuple("abcde") and info.target_layer == "layer4"
    assert info.color_order == "RGB" and info.normalization["preset"] == "torch"
    assert info.source_model == "net.pt2" and info.heatmaps == methods.names()
    printed = capsys.readouterr().out
    assert "verify gradient" in printed and "FAIL" not in printed


def _tiny_onnx(path, nodes, inits, input_shape=("N", 3, 8, 8), classes=4):
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, list(input_shape))], [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["N", classes])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    import onnx

    onnx.save(model, str(path))
    return path


def _conv_trilu_model(path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Trilu", ["conv"], ["wave"], name="wave_node"),  # (no gradient rule)
             helper.make_node("GlobalAveragePool", ["wave"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    return _tiny_onnx(path, nodes, inits)


@pytest.fixture
def trilu_without_rule(monkeypatch):
    """Trilu (which `_conv_trilu_model` puts after the target) as an op with no gradient rule,
    should it ever get one: these tests need an op ONNX Runtime runs but the backward pass cannot
    cross."""
    from camface.export import onnx_grad

    monkeypatch.delitem(onnx_grad.RULES, "Trilu", raising=False)


def test_onnx_file_with_default_target_exports(tmp_path, capsys):
    """An ONNX file exports at its default target, recording the version of the methods' maths its
    maps follow (`methods.VERSION`), which `camface info` shows."""
    import onnx

    from camface import graph_spec, methods

    out = tmp_path / "out.onnx"
    assert main(["export", str(_conv_trilu_model(tmp_path / "m.onnx")), "-o", str(out),
                 "--preset", "unit", "--no-rank"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta[graph_spec.META_METHODS_VERSION] == str(methods.VERSION)
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert f"methods' maths: version {methods.VERSION} (this camface's)" in capsys.readouterr().out


def test_a_graph_without_heatmaps_exports_unranked(tmp_path, capsys):
    """`--heads probs activations` (a forward-only graph, as the benchmarks time) was written,
    then the ranking failed on it ("missing a heatmap output"): exit 2 with a file behind."""
    import onnx

    from camface.graph_spec import META_RANKING

    out = tmp_path / "out.onnx"
    assert main(["export", str(_conv_trilu_model(tmp_path / "m.onnx")), "-o", str(out), "--preset", "unit",
                 "--heads", "probs", "activations"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta[META_RANKING]) == {"skipped": "no heatmap exported (--heads): nothing to rank"}
    assert "nothing to rank" in capsys.readouterr().out


def _mlp_only(path):
    inits = [numpy_helper.from_array(np.ones((4, 192), np.float32), "fc")]
    nodes = [helper.make_node("Flatten", ["x"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    return _tiny_onnx(path, nodes, inits)


def _fixed_batch(path, shape=(1, 3)):
    """A batch of 1 fixed in the input and in a Reshape to `shape` (a Flatten's [-1, 3] would run
    on any batch)."""
    return _tiny_onnx(path, [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
                             helper.make_node("Reshape", ["p", "shape"], ["logits"])],
                      [numpy_helper.from_array(np.array(shape, np.int64), "shape")],
                      input_shape=(1, 3, 8, 8), classes=3)


def test_a_fixed_batch_of_1_is_made_dynamic_when_the_model_runs_crop_by_crop(tmp_path):
    """ONNX model zoos fix the batch at 1; such a model was refused even where nothing but the
    input's declared shape held the batch."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.array([-1, 6], np.int64), "flat_shape")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["conv"], ["pool"]),
             helper.make_node("Reshape", ["pool", "flat_shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    path = _tiny_onnx(tmp_path / "m.onnx", nodes, inits, input_shape=(1, 3, 8, 8))
    result = onnx_export.export(path, tmp_path / "cam.onnx", ExportOptions(preset="unit"))
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"image": images, "class_index": np.array([1, 3, 0, 2])})))
    expected = np.einsum("nhwk,nk->nhw", got["activations"],
                         numpy_helper.to_array(inits[1])[[1, 3, 0, 2]])  # linear head: W[c] / (h w)
    np.testing.assert_allclose(got["gradcam"], np.maximum(expected, 0) / 64, rtol=1e-5, atol=1e-7)


def _conv_relu_then(path, node, inits=()):
    """conv -> relu -> `node` (reads 'relu', writes 'after') -> pool -> linear: a model whose
    `node` sits in the head."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"]), node,
             helper.make_node("GlobalAveragePool", ["after"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    return _tiny_onnx(path, nodes, weights + list(inits))


def _batch_norm_training(path):
    stats = [numpy_helper.from_array(np.full(6, v, np.float32), n)
             for n, v in (("s", 1), ("b", 0), ("mu", 0.1), ("var", 2))]
    return _conv_relu_then(path, helper.make_node(
        "BatchNormalization", ["relu", "s", "b", "mu", "var"], ["after", "mean", "var_out"],
        training_mode=1, name="bn_left_training"), stats)


def _dropout_training(path):
    flags = [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
             numpy_helper.from_array(np.array(True), "train")]
    return _conv_relu_then(path, helper.make_node("Dropout", ["relu", "ratio", "train"], ["after"],
                                                  name="drop_left_training"), flags)


def _branch_reading_conv(path):
    """An If whose branches read the main graph's 'conv' without taking it as an input (ONNX's
    outer scope): the export failed in ONNX Runtime (a traceback) on the parts it cut out."""
    rng = np.random.default_rng(0)
    then = helper.make_graph([helper.make_node("Relu", ["conv"], ["inner"])], "then", [],
                             [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["conv"], ["inner2"])], "else", [],
                              [helper.make_tensor_value_info("inner2", TensorProto.FLOAT, None)])
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.array(True), "cond")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("If", ["cond"], ["branch"], then_branch=then, else_branch=other,
                              name="branchy"),
             helper.make_node("GlobalAveragePool", ["branch"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    return _tiny_onnx(path, nodes, inits)


def _conv_with_a_side_branch(path):
    """conv -> relu -> pool -> linear, and a 4-D 'side' = Sigmoid(conv) that nothing reads."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("Sigmoid", ["conv"], ["side"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    return _tiny_onnx(path, nodes, inits)


def _float16_model(path):
    import onnx

    _conv_trilu_model(path)
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(model, str(path))
    return path


def _deprecated_group_norm(path):
    """conv -> GroupNormalization in opset 18's form (deprecated, which ONNX's checker refuses
    though ONNX Runtime runs it) -> pool -> linear."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.ones(2, np.float32), "s"),
             numpy_helper.from_array(np.zeros(2, np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("GroupNormalization", ["conv", "s", "b"], ["norm"], num_groups=2,
                              name="the_norm"),
             helper.make_node("GlobalAveragePool", ["norm"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    return _tiny_onnx(path, nodes, inits)


ERRORS = [
    ("float16 input", _float16_model, [],
     r"input 'x' must be float32 \[N, C, H, W\] or \[N, H, W, C\] \(it is float16 \['N', 3, 8, 8\]\); convert "
     r"the model to float32"),
    ("control flow reading the outer graph", _branch_reading_conv, [],
     r"If node 'branchy' reads conv inside its subgraph.*fold the control flow"),
    ("batch norm in training mode", _batch_norm_training, ["--target-layer", "relu"],
     r"BatchNormalization node 'bn_left_training' is in training mode.*eval mode"),
    ("dropout in training mode", _dropout_training, ["--target-layer", "relu"],
     r"Dropout node 'drop_left_training' is in training mode.*eval mode"),
    ("unknown target", _conv_trilu_model, ["--target-layer", "layer9"],
     r"no tensor, node or module named 'layer9'; candidate target layers: conv, wave"),
    ("no 4-D tensor", _mlp_only, [], r"no 4-D tensor .* before the logits 'logits'"),
    ("a target that is not 4-D", _conv_trilu_model, ["--target-layer", "flat"],
     r"'flat' \[N, 6\] is not a 4-D tensor before the logits; candidate target layers: conv, wave"),
    ("the input as a target", _conv_with_a_side_branch, ["--target-layer", "x"],
     r"'x' is the model's input, not a layer; candidate target layers: conv, relu"),
    ("a target the logits do not depend on", _conv_with_a_side_branch, ["--target-layer", "side"],
     r"the logits 'logits' do not depend on 'side' \[N, 6, 8, 8\]: it is no target layer; "
     r"candidate target layers: conv, relu"),
    ("fixed batch", _fixed_batch, [], r"fixed batch dimension of 1.*dynamic"),
    ("no preset", _conv_trilu_model, ["--no-preset"], r"m\.onnx does not say how it normalises.*--preset"),
    ("a deprecated op", _deprecated_group_norm, ["--target-layer", "conv"],
     r"ONNX's checker refuses the model's nodes in the CAM graph \(Op registered for "
     r"GroupNormalization is deprecated .*Name: the_norm.*\); re-export the model"),
]


@pytest.mark.parametrize("what, make, flags, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_export_errors(tmp_path, capsys, what, make, flags, message):
    path = make(tmp_path / "m.onnx")
    preset = [] if "--no-preset" in flags else ["--preset", "unit"]
    flags = [f for f in flags if f != "--no-preset"]
    out = tmp_path / "out.onnx"
    assert main(["export", str(path), "-o", str(out), *preset, *flags]) == 2
    import re

    assert re.search(message, capsys.readouterr().err), what
    assert not out.exists()


def test_a_head_without_gradient_rules_exports_the_gradient_free_methods(tmp_path, capsys, caplog,
                                                                         trilu_without_rule):
    """Trilu after the target has no gradient rule: the export says why (one line) and offers the
    methods that need no gradient; the graph loads and `camface info` lists what it offers."""
    import logging

    path = _conv_trilu_model(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    with caplog.at_level(logging.WARNING):
        assert main(["export", str(path), "-o", str(out), "--preset", "unit", "--target-layer", "conv",
                     "--no-rank"]) == 0
    warned = [r.getMessage() for r in caplog.records if "no gradient methods" in r.getMessage()]
    assert len(warned) == 1 and "no gradient rule for op Trilu (node 'wave_node')" in warned[0]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ablationcam" in printed and "scorecam" in printed and "gradcam " not in printed
    assert "--method auto shows eigencam" in printed


def _conv_step_model(path, step: str, side_path: bool):
    """Conv -> `step` (Floor, Round ...) -> ReLU -> pooled logits; side_path: the step's output
    added to the conv's (a path around the step, as torch's LPPool2d has)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node(step, ["conv"], ["stepped"], name="the_step")]
    if side_path:
        nodes.append(helper.make_node("Add", ["conv", "stepped"], ["both"], name="both"))
    nodes += [helper.make_node("Relu", ["both" if side_path else "stepped"], ["relu"], name="relu"),
              helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
              helper.make_node("Flatten", ["pool"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    return _tiny_onnx(path, nodes, inits)


@pytest.mark.parametrize("step", ["Floor", "Ceil", "Round", "Sign", "Hardmax"])
@pytest.mark.parametrize("target, side_path, gradients", [
    ("conv", False, False),  # every path passes the step: a gradient of 0
    ("relu", False, True),  # the step before the target
    ("conv", True, True),  # a path around the step
], ids=["before-the-step", "after-the-step", "around-the-step"])
def test_a_target_whose_every_path_to_the_logits_passes_a_step_has_no_gradient_maps(tmp_path, caplog, step, target,
                                                                                       side_path, gradients):
    """Floor, Ceil and Round got a gradient rule (0, as torch's): a target before one that every
    path to the logits passes was exported with every gradient map all zero, without a word, and
    `--method auto` showing Grad-CAM (zeros). The gradient methods are left out there, the
    warning naming the step; a target after it, or one with a path around it, keeps them."""
    import logging

    import onnx

    path = _conv_step_model(tmp_path / "m.onnx", step, side_path)
    with caplog.at_level(logging.WARNING):
        _, info, differences = onnx_export.build(onnx.load(str(path)),
                                                 ExportOptions(preset="unit", target_layer=target))
    assert ("gradcam" in info.heatmaps) == gradients and "eigencam" in info.heatmaps
    assert all(d.ok for d in differences)
    warned = "no gradient methods (the gradient at target 'conv' is 0 everywhere: every path from it to the " \
             f"logits passes a step whose slope is 0 ({step} (node 'the_step'))"
    assert (warned in caplog.text) == (not gradients), caplog.text


@pytest.mark.parametrize("given, named", [
    (dict(token_grid=(4, 4)), "--token-grid ignored"),
    (dict(prefix_tokens=1), "--prefix-tokens ignored"),
    (dict(token_grid=(4, 4), prefix_tokens=0), "--token-grid and --prefix-tokens ignored"),
    (dict(), None),
])
def test_token_options_for_a_cnn_s_map_are_said_to_be_ignored(tmp_path, caplog, given, named):
    """--token-grid / --prefix-tokens lay a transformer's tokens out; given for a CNN (whose
    target is a map already) they were dropped without a word."""
    import logging

    import onnx

    path = _conv_step_model(tmp_path / "m.onnx", "Relu", side_path=False)
    with caplog.at_level(logging.WARNING):
        _, info, _ = onnx_export.build(onnx.load(str(path)), ExportOptions(preset="unit", verify=False, **given))
    assert "gradcam" in info.heatmaps
    warned = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert warned == ([] if named is None else [
        f"{named}: target {info.target_layer} is a feature map, not tokens [N, T, C] to lay out on a grid"]), warned


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_pickled_torch_files_are_refused(tmp_path, capsys, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not opened")
    assert main(["export", str(path), "-o", str(tmp_path / "o.onnx"), "--preset", "torch"]) == 2
    err = capsys.readouterr().err
    assert "RUNS CODE FROM THE FILE" in err and "torch.export.save" in err


class BatchInShapes(torch.nn.Module):
    """Its flatten and reshape, traced at a fixed batch, hold that batch as a number."""

    def __init__(self, per_row_bias: bool = False):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 5)
        self.register_buffer("row_bias", torch.randn(2, 5) if per_row_bias else torch.zeros(1, 5))

    def forward(self, x):
        a = torch.relu(self.conv(x))
        return self.fc(torch.flatten(a, 1).reshape(x.shape[0], -1)) + self.row_bias


@pytest.mark.parametrize("name, batch", [("linear", 2), ("linear", 1), ("batch in shapes", 2), ("batch in shapes", 1)])
def test_a_program_exported_with_a_fixed_batch_is_exported_again_with_a_dynamic_one(tmp_path, name, batch):
    """torch.export without dynamic_shapes fixes the batch (its reshapes read the number): the
    CAM graph still takes 1 to 32 crops, each explained as eager torch explains it."""
    model = torch_models()["linear"] if name == "linear" else BatchInShapes().eval()
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(batch, 3, SIZE, SIZE),)), str(path))
    result = onnx_export.export(path, tmp_path / "o.onnx", ExportOptions(preset="torch", heads=("gradcam",)))
    assert all(d.ok for d in result.differences)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    _, scale, offset = PRESETS["torch"]
    for n in (1, 3, 32):
        images = np.random.default_rng(n).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
        probs = session.run(["probs"], {"image": images, "class_index": np.full(n, -1, np.int64)})[0]
        x = torch.tensor(images.astype(np.float32) * np.float32(scale) + np.float32(offset)).permute(0, 3, 1, 2)
        np.testing.assert_allclose(probs, torch.softmax(model(x), 1).detach().numpy(), rtol=1e-4, atol=1e-6)


def test_a_program_whose_batch_cannot_be_freed_says_how_to_export_it(tmp_path):
    """A buffer of one row per crop of the fixed batch: no dynamic batch runs it."""
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(BatchInShapes(per_row_bias=True).eval(),
                                          (torch.zeros(2, 3, SIZE, SIZE),)), str(path))
    with pytest.raises(ModelError, match=r"exported with a fixed batch of 2 and does not run with a dynamic "
                                         r"one.*torch.export.Dim\('batch'"):
        onnx_export.export(path, tmp_path / "o.onnx", ExportOptions(preset="torch"))
    assert list(tmp_path.iterdir()) == [path]


def test_self_check_fails_a_wrong_gradient_rule(tmp_path, monkeypatch):
    from camface.export import onnx_grad

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    path = _tiny_onnx(tmp_path / "m.onnx", nodes, inits)
    options = ExportOptions(preset="unit", target_layer="conv")
    onnx_export.export(path, tmp_path / "good.onnx", options)  # the right rule passes
    monkeypatch.setitem(onnx_grad.RULES, "Relu", onnx_grad.RULES["Identity"])  # no mask
    with pytest.raises(ModelError, match=r"fails its self-check: gradient .* FAIL"):
        onnx_export.export(path, tmp_path / "bad.onnx", options)
    assert not (tmp_path / "bad.onnx").exists()


def test_torchscript_exported_onnx_resolves_module_names(tmp_path):
    """A .onnx from torch.onnx's older TorchScript exporter (module names only in node names)."""
    import warnings

    model = torch_models()["linear"]
    path = tmp_path / "legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}})
    result = onnx_export.export(path, tmp_path / "cam.onnx",
                                ExportOptions(preset="torch", target_layer="layer3"))
    assert result.info.target_layer == "layer3" and result.info.feature_size == (8, 8)
    images = np.random.default_rng(6).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array([-1, 0, 2, 4], np.int64)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"image": images, "class_index": classes})))
    reference = torch_reference(model, images, classes, "layer3", with_cam=False)
    for name in ("gradcam", "gradcampp", "activations"):
        np.testing.assert_allclose(got[name], reference[name], rtol=1e-4,
                                   atol=1e-6 + 1e-4 * float(np.abs(reference[name]).max()))


def test_an_old_opset_is_converted(tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["conv"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["pooled"], ["pool"]),
             helper.make_node("Squeeze", ["pool"], ["flat"], axes=[2, 3]),  # opset 11 form
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 3, 8, 8])], [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["N", 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    cam_graph, info, differences = onnx_export.build(
        model, ExportOptions(preset="unit", target_layer="conv"))
    assert cam_graph.opset_import[0].version == 17 and info.feature_size == (8, 8)
    assert {d.output for d in differences} >= {"gradient", "gradcam"}


@pytest.mark.parametrize("final", ["Softmax", "Sigmoid", "LogSoftmax", None])
def test_the_logits_are_the_input_of_a_final_activation(tmp_path, final):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["conv"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["scores" if final else "logits"], transB=1)]
    if final:
        nodes.append(helper.make_node(final, ["scores"], ["logits"]))
    path = _tiny_onnx(tmp_path / "m.onnx", nodes, inits)
    result = onnx_export.export(path, tmp_path / "cam.onnx", ExportOptions(preset="unit"))
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    out = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"image": images, "class_index": np.array([1, 3])})))
    # linear head: d logit_c / dA = W[c] / (h w) everywhere, whatever the final activation
    fc = numpy_helper.to_array(inits[1])
    expected = np.einsum("nhwk,nk->nhw", out["activations"], fc[[1, 3]])
    np.testing.assert_allclose(out["cam"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["gradcam"], np.maximum(expected, 0) / 64, rtol=1e-5, atol=1e-7)
    sums = out["probs"].sum(axis=1)
    assert (np.allclose(sums, 1, atol=1e-5)) == (final != "Sigmoid")


def _logits_and_embedding(path, batch="N"):
    """conv -> pool -> [embedding (N, 6), logits (N, 4)]: a face model's two outputs (the batch
    dynamic, or fixed at `batch`)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["conv"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["embedding"]),
             helper.make_node("Gemm", ["embedding", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, 6]),
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    import onnx

    onnx.save(model, str(path))
    return path, numpy_helper.to_array(inits[1])


@pytest.mark.parametrize("flags, message", [
    ([], r"outputs \['embedding', 'logits'\]\); of several outputs, name the one holding the class "
         r"scores with --class-output NAME"),
    (["--class-output", "scores"], r"--class-output 'scores': no output of that name \(its outputs: "
                                   r"embedding, logits\)")])
def test_a_model_with_several_outputs_needs_class_output(tmp_path, capsys, flags, message):
    import re

    path, _ = _logits_and_embedding(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    assert main(["export", str(path), "-o", str(out), "--preset", "unit", "--no-rank", *flags]) == 2
    assert re.search(message, capsys.readouterr().err) and not out.exists()


@pytest.mark.parametrize("batch", ["N", 1])
def test_class_output_picks_the_logits_of_a_model_that_also_returns_an_embedding(tmp_path, batch):
    path, fc = _logits_and_embedding(tmp_path / "m.onnx", batch)
    out = tmp_path / "out.onnx"
    assert main(["export", str(path), "-o", str(out), "--preset", "unit", "--no-rank",
                 "--class-output", "logits"]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"image": images, "class_index": np.array([1, 3])})))
    assert got["probs"].shape == (2, 4)
    expected = np.einsum("nhwk,nk->nhw", got["activations"], fc[[1, 3]])  # linear head: W[c] / (h w)
    np.testing.assert_allclose(got["gradcam"], np.maximum(expected, 0) / 64, rtol=1e-5, atol=1e-7)


def test_class_output_picks_the_logits_of_a_program_returning_a_tuple(tmp_path):
    from torch import nn

    class LogitsAndEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 6, 3, 1, 1), nn.Linear(6, 4)

        def forward(self, x):
            embedding = torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1), 1)
            return self.fc(embedding), embedding

    torch.manual_seed(0)
    model = LogitsAndEmbedding().eval()
    path = save_program(model, tmp_path / "two.pt2", size=8)
    with pytest.raises(ModelError, match=r"outputs \['linear', 'view'\]\).*--class-output NAME"):
        onnx_export.export(path, tmp_path / "o.onnx", ExportOptions(preset="unit"))
    result = onnx_export.export(path, tmp_path / "o.onnx", ExportOptions(preset="unit", class_output="linear"))
    assert result.info.labels == tuple(f"class_{i}" for i in range(4))
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"image": images, "class_index": np.array([-1, 2])})))
    x = torch.tensor(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
    probs = torch.softmax(model(x)[0], 1).detach().numpy()
    np.testing.assert_allclose(got["probs"], probs, atol=1e-5)


def _dynamic_size_model(path, input_shape=("N", 3, "H", "W")):
    """conv (stride 2) -> pool -> linear on an input whose height and width are dynamic."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["conv"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    return _tiny_onnx(path, nodes, inits, input_shape=input_shape), numpy_helper.to_array(inits[1])


@pytest.mark.parametrize("shape, flags, message", [
    (("N", 3, "H", "W"), [], r"needs a fixed height and width \(\['N', 3, 'H', 'W'\]\); pass the size "
                             r"the model was trained on with --input-size HxW"),
    (("N", 3, 8, 8), ["--input-size", "16x12"], r"--input-size 16x12: input 'x' is fixed at 8x8"),
    # one side fixed: it was overwritten, the model exported at a height it does not declare
    (("N", 3, 8, "W"), ["--input-size", "16x12"], r"--input-size 16x12: input 'x' has a fixed height of 8 "
                                                  r"\(\[N, 3, 8, W\]\)")])
def test_input_size_errors(tmp_path, capsys, shape, flags, message):
    import re

    path, _ = _dynamic_size_model(tmp_path / "m.onnx", shape)
    out = tmp_path / "out.onnx"
    assert main(["export", str(path), "-o", str(out), "--preset", "unit", "--no-rank", *flags]) == 2
    assert re.search(message, capsys.readouterr().err) and not out.exists()


def test_input_size_fixes_a_dynamic_height_and_width(tmp_path):
    path, fc = _dynamic_size_model(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    assert main(["export", str(path), "-o", str(out), "--preset", "unit", "--no-rank",
                 "--input-size", "16x12"]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 12, 3), dtype=np.uint8)
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"image": images, "class_index": np.array([1, 3])})))
    assert got["activations"].shape == (2, 8, 6, 6)
    expected = np.einsum("nhwk,nk->nhw", got["activations"], fc[[1, 3]])  # linear head: W[c] / (h w)
    np.testing.assert_allclose(got["gradcam"], np.maximum(expected, 0) / 48, rtol=1e-5, atol=1e-7)


def test_input_size_fixes_a_program_exported_with_a_dynamic_height_and_width(tmp_path):
    """torch.onnx cannot convert a program whose height is 2*h ("expected sympy.Symbol"): it failed
    with that, or, at any dynamic size, converted the program at a 2x2 image."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 4)).eval()
    batch, h, w = (torch.export.Dim(n, min=m, max=32) for n, m in (("batch", 1), ("h", 4), ("w", 4)))
    program = torch.export.export(model, (torch.zeros(2, 3, 16, 12),),
                                  dynamic_shapes=({0: batch, 2: 2 * h, 3: 2 * w},))
    path = tmp_path / "sized.pt2"
    torch.export.save(program, str(path))
    with pytest.raises(ModelError, match=r"dynamic height and width; pass .* --input-size HxW"):
        onnx_export.export(path, tmp_path / "o.onnx", ExportOptions(preset="unit"))
    with pytest.raises(ModelError, match=r"does not run at --input-size 16x6"):  # width >= 8
        onnx_export.export(path, tmp_path / "o.onnx", ExportOptions(preset="unit", input_size=(16, 6)))
    result = onnx_export.export(path, tmp_path / "o.onnx", ExportOptions(preset="unit", input_size=(16, 12)))
    assert result.info.input_size == (16, 12) and result.info.feature_size == (8, 6)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 12, 3), dtype=np.uint8)
    probs = session.run(["probs"], {"image": images, "class_index": np.array([-1, 0, 3])})[0]
    x = torch.tensor(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
    np.testing.assert_allclose(probs, torch.softmax(model(x), 1).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("save, what", [
    (lambda model, path: torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 8, 8)), str(path)),
     "it is a TorchScript archive, saved with torch.jit.save"),
    (lambda model, path: torch.save(model.state_dict(), str(path)),
     r"it is a pickle saved with torch.save \(a state dict or a whole model\)")], ids=["jit", "pickle"])
def test_a_torchscript_or_pickle_named_pt2_says_what_it_is_and_what_to_make(tmp_path, save, what):
    """torch's own message pointed at warnings that camface silences ('Please check the warnings
    above') and said neither what the file was nor what to make."""
    from torch import nn

    path = tmp_path / "renamed.pt2"
    save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval(), path)
    with pytest.raises(ModelError, match=rf"not a program saved with torch.export.save \({what}\); make one "
                                         r"with ep = torch.export.export\(model.eval\(\).*torch.export.save"):
        onnx_export.export(path, tmp_path / "o.onnx", ExportOptions(preset="unit"))
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("tail", ["Identity", "Flatten", "Reshape"])
def test_a_softmax_followed_by_an_identity_or_reshape_is_still_the_final_activation(tmp_path, tail):
    """tf2onnx names outputs with an Identity, PyTorch models reshape after the softmax: the
    Softmax was taken for attention between the map and the output (the export refused: 'passes
    through Softmax node'), or, at a named target, explained the probability with probs the
    softmax of the softmax."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["conv"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["scores"], transB=1),
             helper.make_node("Softmax", ["scores"], ["softmax"]),
             helper.make_node(tail, ["softmax", "shape"] if tail == "Reshape" else ["softmax"], ["logits"])]
    path = _tiny_onnx(tmp_path / "m.onnx", nodes, inits)
    result = onnx_export.export(path, tmp_path / "cam.onnx", ExportOptions(preset="unit"))
    assert {"ablationcam", "scorecam", "cam"} <= set(result.info.heatmaps)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"image": images, "class_index": np.array([1, 3])})))
    model = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    own = model.run(None, {"x": (images.astype(np.float32) / 255).transpose(0, 3, 1, 2)})[0]
    np.testing.assert_allclose(got["probs"], own, rtol=1e-5, atol=1e-6)
    # the gradient of the logit (not of the probability): W[c] / (h w) for a linear head
    expected = np.einsum("nhwk,nk->nhw", got["activations"], numpy_helper.to_array(inits[1])[[1, 3]])
    np.testing.assert_allclose(got["gradcam"], np.maximum(expected, 0) / 64, rtol=1e-5, atol=1e-7)


def test_an_unnamed_node_is_named_by_its_op_and_output(tmp_path, trilu_without_rule):
    """ONNX node names are optional: a refusal said "node ''"."""
    import onnx

    path = _conv_trilu_model(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.name = ""
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match=r"no gradient rule for op Trilu \(node 'Trilu:wave'\)"):
        onnx_export.export(path, tmp_path / "o.onnx", ExportOptions(preset="unit", target_layer="conv",
                                                                    heads=("gradcam",)))


class NamedOutputs(torch.nn.Module):
    """Returns a dict: class scores under `scores_key` and an embedding, as transformers' models
    (ModelOutput) and many face models do."""

    def __init__(self, scores_key: str):
        super().__init__()
        torch.manual_seed(2)
        self.key = scores_key
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.fc = torch.nn.Linear(6, 5)
        self.embed = torch.nn.Linear(6, 4)

    def forward(self, x):
        pooled = torch.relu(self.conv(x)).mean((2, 3))
        return {"embedding": self.embed(pooled), self.key: self.fc(pooled)}


@pytest.mark.parametrize("key, class_output", [("scores", "scores"), ("logits", "logits")])
def test_a_program_returning_a_dict_has_its_outputs_named_by_key(tmp_path, key, class_output):
    """The outputs are the dict's keys: --class-output names one; probs are the softmax of
    those, not of the embedding."""
    model = NamedOutputs(key).eval()
    path = save_program(model, tmp_path / "named.pt2")
    assert [o.name for o in torch_model.to_onnx(path).graph.output] == ["embedding", key]
    options = ExportOptions(preset="unit", class_output=class_output, heads=("gradcam",))
    result = onnx_export.export(path, tmp_path / "o.onnx", options)
    assert len(result.info.labels) == 5 and all(d.ok for d in result.differences)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    probs = session.run(["probs"], {"image": images, "class_index": np.full(3, -1, np.int64)})[0]
    x = torch.tensor(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
    np.testing.assert_allclose(probs, torch.softmax(model(x)[key], 1).detach().numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("key", ["scores", "logits"])
def test_a_dict_without_class_output_names_its_keys(tmp_path, key):
    """Several outputs and no --class-output: the error lists the keys to choose from."""
    path = save_program(NamedOutputs(key).eval(), tmp_path / "named.pt2")
    with pytest.raises(ModelError, match=rf"outputs \['embedding', '{key}'\].*--class-output NAME"):
        onnx_export.export(path, tmp_path / "o.onnx", ExportOptions(preset="unit"))


@pytest.mark.parametrize("suffix, opset, warned, graph_opset", [
    (".pt2", 18, None, 18), (".pt2", 14, "net.pt2 is converted at opset 18", 18),
    (".onnx", 14, "net.onnx keeps its own opset", None)])
def test_the_opset_warning_says_what_a_pt2_or_onnx_model_is_converted_at(tmp_path, caplog, suffix, opset,
                                                                           warned, graph_opset):
    """--opset on a .pt2 warned that the .pt2 "keeps its own opset" (the warning meant for .onnx
    files), though the .pt2 is converted at --opset (at least torch_model.DEFAULT_OPSET): only a
    value below that minimum is said now, with the opset used; an .onnx file keeps its own."""
    import logging

    import onnx

    path = tmp_path / f"net{suffix}"
    if suffix == ".pt2":
        save_program(torch_models()["linear"], path)
    else:
        onnx.save(torch_model.to_onnx(save_program(torch_models()["linear"], tmp_path / "net.pt2")), path)
    out = tmp_path / "cam.onnx"
    with caplog.at_level(logging.WARNING):
        assert main(["export", str(path), "-o", str(out), "--preset", "torch", "--opset", str(opset),
                     "--no-rank", "--no-verify"]) == 0
    said = [r.getMessage() for r in caplog.records if "--opset" in r.getMessage()]
    assert (said == []) if warned is None else (len(said) == 1 and warned in said[0]), said
    if graph_opset is not None:
        assert {o.domain: o.version for o in onnx.load(out).opset_import}[""] == graph_opset


def test_a_pt2_export_says_nothing_of_the_exporters_own_unless_debug(tmp_path, caplog, capfd):
    """torch's and onnxscript's warnings and optimiser lines (`Removed 101 unused nodes`, ...) on
    a normal run: none logged, warned or printed; under --debug (root logger at DEBUG) they are."""
    import logging
    import warnings

    path = save_program(torch_models()["linear"], tmp_path / "net.pt2")
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch_model.to_onnx(path)
    exporters = [r for r in caplog.records if r.name.split(".")[0] in torch_model.EXPORTER_LOGGERS
                 and r.levelno >= logging.INFO]  # what camface's INFO console shows
    assert not exporters and not caught and not capfd.readouterr().out.strip()
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    torch_model.to_onnx(path)
    assert any(r.name.split(".")[0] in torch_model.EXPORTER_LOGGERS and r.levelno >= logging.INFO
               for r in caplog.records)


class TokenAttention(torch.nn.Module):
    """A conv map's cells as tokens [N, HW, C] through F.scaled_dot_product_attention on 3-D
    query, key and value (no heads axis), which torch.onnx's dynamo exporter does not convert."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return self.fc(torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens).mean(1))


def test_a_conversion_failure_names_the_op_and_its_innermost_cause(tmp_path):
    """torch.onnx.export's own message is "Failed to convert ..." and next steps: camface kept its
    first line, so the cause (an aten op it cannot translate, and why) was lost."""
    path = save_program(TokenAttention().eval(), tmp_path / "attention.pt2", size=SIZE)
    with pytest.raises(ModelError, match=r"attention\.pt2: torch\.onnx\.export fails") as caught:
        onnx_export.export(path, tmp_path / "o.onnx", ExportOptions(preset="torch"))
    message = str(caught.value)
    assert message.endswith("at aten.scaled_dot_product_attention: only 4D query, key, and value are supported)")
    assert "Next steps" not in message and "\n" not in message
    assert list(tmp_path.iterdir()) == [path]
