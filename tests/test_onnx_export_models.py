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
