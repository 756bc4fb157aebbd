"""Ablation-CAM of a pre-norm nn.TransformerEncoder (norm_first=True) with batch_first=False: at
its default target, the last layer's norm1, the head also reads the residual stream beside it,
laid out [T, N, C] (the batch on axis 1). The rerun took tensors beside the target only with
the batch first, so Ablation-CAM was left out ("... also reads '/encoder/layers.0/Add_1_output_0',
computed from the graph's input"); its clones now repeat that stream along its batch axis, and
the map equals torch's with each ablated variant run alone."""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
from torch import nn  # noqa: E402

from onnx_helpers import ablation_cam_alone  # noqa: E402
from test_onnx_export_models import SIZE, legacy_onnx, run_graph  # noqa: E402

TARGET = "encoder.layers.1.norm1"  # camface's default: the tokens the last attention reads


class PreNormViT(nn.Module):
    """A ViT on nn.TransformerEncoder(batch_first=False) whose layers normalise first: patch
    tokens [T, N, C] after a class token, the class token's logits."""

    def __init__(self, dim=16, classes=4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn((SIZE // 8) ** 2 + 1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).permute(2, 0, 1)
        x = torch.cat([self.cls.expand(-1, x.shape[1], -1), x]) + self.pos
        return self.head(self.encoder(x)[0])


@pytest.mark.parametrize("kind, looped", [("legacy", False), ("pt2", False), ("pt2", True)],
                         ids=["legacy", "pt2", "pt2-loop"])
def test_a_pre_norm_encoder_on_tokens_first_keeps_ablation_cam_equal_to_each_variant_run_alone(
        tmp_path, caplog, monkeypatch, kind, looped):
    """Ablation-CAM was left out of the default export, naming the residual stream [T, N, C] the
    head reads beside norm1: it is exported, self-checked, and equals torch's with each ablated
    variant run alone, at 1 and 3 crops, from the legacy exporter and a .pt2, unrolled clones and
    a Loop's alike."""
    from onnx_helpers import save_program

    from camface.export import onnx_export, onnx_rerun
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    model = PreNormViT().eval()
    path = legacy_onnx(model, tmp_path / "m.onnx") if kind == "legacy" else \
        save_program(model, tmp_path / "m.pt2", size=SIZE)
    if looped:
        monkeypatch.setattr(onnx_rerun, "MAX_UNROLLED", 0)
    with caplog.at_level(logging.WARNING):
        result = onnx_export.export(path, tmp_path / "cam.onnx", ExportOptions(preset="unit"))
    assert "left out" not in caplog.text
    assert result.info.target_layer == TARGET and "ablationcam" in result.info.heatmaps
    assert any(d.output == "ablationcam" for d in result.differences) and all(d.ok for d in result.differences)
    rng = np.random.default_rng(5)
    for crops in (1, 3):
        images = rng.integers(0, 256, (crops, SIZE, SIZE, 3), dtype=np.uint8)
        classes = np.array([-1, 0, 3][:crops], np.int64)
        got = run_graph(result.path, images, classes)["ablationcam"]
        expected = ablation_cam_alone(model, TARGET, images, classes, channels=lambda out: out[1:, 0],
                                      zeroed=lambda out, k: out[1:, :, k]).reshape(crops, 4, 4)
        peak = expected.max(axis=(1, 2), keepdims=True)
        assert got.shape == (crops, 4, 4) and (peak > 0).all()
        np.testing.assert_allclose(got / peak, expected / peak, atol=1e-3, err_msg=f"{crops} crop(s)")
