"""Models users export that are not plain CNNs with camface-friendly names: transformers
(ViT-like, Swin-like), outputs named like camface's own tensors, and --int8 on the ONNX engine.
Inline PyTorch models, exported with torch.onnx's legacy (TorchScript) exporter at opset 17 as
users do, and `camface export` run on them: a CAM graph, or one line that names what is wrong."""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from torch import nn  # noqa: E402

from camface.cli import main  # noqa: E402

SIZE = 32


def legacy_onnx(model, path, input_name="x", output_name="logits"):
    """`model` -> ONNX at `path` by torch.onnx's TorchScript exporter (opset 17, dynamic batch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=False,
                          opset_version=17, input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "N"}, output_name: {0: "N"}})
    return path


class SmallCNN(nn.Module):
    """conv-relu-pool-conv-relu, global average pooling, linear, softmax (`probs` out)."""

    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 12, 3, 1, 1), nn.ReLU())
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        return torch.softmax(self.fc(self.features(x).mean(dim=(2, 3))), 1)


def small_cnn():
    torch.manual_seed(0)
    return SmallCNN().eval()


def run_graph(path, images, classes):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": images, "class_index": classes})))


@pytest.mark.parametrize("input_name, output_name", [("x", "probs"), ("image", "probs"),
                                                      ("x", "gradcam"), ("activations", "class_index")])
def test_tensors_named_like_the_contract_are_renamed_inside_the_graph(tmp_path, capsys, caplog,
                                                                     input_name, output_name):
    caplog.set_level(logging.INFO)
    model = small_cnn()
    path = legacy_onnx(model, tmp_path / "m.onnx", input_name, output_name)
    out = tmp_path / "cam.onnx"
    assert main(["export", str(path), "-o", str(out), "--preset", "unit"]) == 0, capsys.readouterr().err
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    got = run_graph(out, images, np.array([-1, 0, 3], np.int64))
    x = torch.tensor(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
    with torch.no_grad():
        features = model.features(x)
        expected = model(x).numpy()
    np.testing.assert_allclose(got["probs"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["activations"], features.permute(0, 2, 3, 1).numpy(),
                               rtol=1e-5, atol=1e-5)
    chosen = np.where(np.array([-1, 0, 3]) < 0, expected.argmax(1), [-1, 0, 3])
    weights = model.fc.weight.detach().numpy()[chosen]  # CAM: a GAP -> linear head
    np.testing.assert_allclose(got["cam"], np.einsum("nhwk,nk->nhw", got["activations"], weights),
                               rtol=1e-4, atol=1e-5)
    graph = onnx.load(str(out))
    assert [i.name for i in graph.graph.input] == ["image", "class_index"]
    assert f"{output_name} -> model/{output_name}" in caplog.text


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_int8_quantizes_the_features_of_an_onnx_or_pt2_model(tmp_path, capsys, suffix):
    from onnx_helpers import save_program

    from camface.export import int8
    from camface.graph_spec import GraphInfo

    model = small_cnn()
    if suffix == ".pt2":
        pytest.importorskip("onnxscript")
        path = save_program(model, tmp_path / "m.pt2", size=SIZE)
    else:
        path = legacy_onnx(model, tmp_path / "m.onnx")
    fp32, int8_path = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    assert main(["export", str(path), "-o", str(fp32), "--preset", "unit", "--no-verify"]) == 0
    assert main(["export", str(path), "-o", str(int8_path), "--preset", "unit", "--int8",
                 "--calibration-method", "minmax"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert ", int8" in printed and "int8 agreement with float32 (passed" in printed
    graph = onnx.load(str(int8_path))
    info = GraphInfo.from_metadata({p.key: p.value for p in graph.metadata_props})
    assert info.precision == "int8" and info.quantization["passed"]
    assert info.source_model == path.name and info.quantization["calibration"]["method"] == "minmax"
    features = {n.op_type for n in int8.feature_nodes(graph)}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= features
    int8.check_float_tail(graph)  # head, gradient and heatmaps float32
    images = np.random.default_rng(3).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array([-1, 0, 1, 2, 3], np.int64)
    reference, got = run_graph(fp32, images, classes), run_graph(int8_path, images, classes)
    assert set(got) == set(reference)
    np.testing.assert_allclose(got["probs"], reference["probs"], atol=0.02)
    a, b = got["activations"].ravel(), reference["activations"].ravel()
    assert not np.array_equal(a, b) and np.corrcoef(a, b)[0, 1] > 0.99  # int8, and close
