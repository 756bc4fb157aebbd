""".pt2 programs whose .view() holds only for the layout an operator had where they were traced:
a Swin's window attention viewing F.scaled_dot_product_attention's output after a transpose.
torch.onnx.export traces the program again on the CPU, where another kernel can lay that output
out otherwise (a program saved on a GPU; here the CPU's math kernel stands for it)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
from torch import nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from camface.cli import main  # noqa: E402
from test_onnx_export_models import SIZE, Swin, legacy_onnx, run_graph  # noqa: E402

EXPORT = ["--preset", "unit", "--heads", "gradcam", "--no-rank"]
IMAGES = np.random.default_rng(2).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
CLASSES = np.array([-1, 0, 2], np.int64)


def sdpa_swin(in_place=False):
    """The inline Swin, its attention F.scaled_dot_product_attention, the heads merged by
    .transpose(1, 2).view(...): a view the CPU's flash kernel's output allows (its [N, T, heads, d]
    layout) and its math kernel's does not. in_place: the merged heads scaled in place (x1)."""
    torch.manual_seed(0)
    model = Swin(tokens=True).eval()

    def attention(attn):
        def forward(x):
            n, tokens, dim = x.shape
            qkv = attn.qkv(x).reshape(n, tokens, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            merged = nn.functional.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).view(n, tokens, dim)
            return attn.proj(merged.mul_(1.0) if in_place else merged)
        return forward

    for stage in (model.stage1, model.stage2):
        stage.attn.forward = attention(stage.attn)
    return model


def saved(model, path):
    torch.export.save(torch.export.export(model, (torch.zeros(2, 3, SIZE, SIZE),),
                                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=32)},)), str(path))
    return path


def test_a_swin_whose_view_reads_the_saved_attention_layout_exports_elsewhere(tmp_path, capsys):
    """torch.onnx.export failed inside torch: "at aten.view: Use tlparse to see full graph" (its
    cause, "Cannot view a tensor with shape torch.Size([4*s77, 16, 2, 8]) and strides (256, 8,
    128, 1) as a tensor with shape (4*s77, 16, 16)!"). The views are reshapes: the graph's maps
    equal those of the same model through torch.onnx's TorchScript exporter."""
    model = sdpa_swin()
    path = saved(model, tmp_path / "swin.pt2")
    out = tmp_path / "cam.onnx"
    with sdpa_kernel([SDPBackend.MATH]):
        assert main(["export", str(path), "-o", str(out), *EXPORT]) == 0, capsys.readouterr().err
    plain = tmp_path / "plain.onnx"
    assert main(["export", str(legacy_onnx(model, tmp_path / "legacy.onnx")), "-o", str(plain), *EXPORT]) == 0
    got, expected = run_graph(out, IMAGES, CLASSES), run_graph(plain, IMAGES, CLASSES)
    assert got["activations"].shape == (3, 4, 4, 32)
    for name in ("probs", "activations", "gradcam"):
        scale = float(np.abs(expected[name]).max())
        assert scale > 0, name
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5 * max(1.0, scale), err_msg=name)


def test_a_view_kept_beside_an_in_place_op_fails_in_one_line_saying_what_to_write(tmp_path, capsys):
    """A program that changes a tensor in place keeps its views (a reshape's copy would not see
    the change): the failure names aten.view, torch's reason (not "Use tlparse to see full
    graph", the last line of its message) and what to write in the model."""
    path = saved(sdpa_swin(in_place=True), tmp_path / "swin.pt2")
    with sdpa_kernel([SDPBackend.MATH]):
        assert main(["export", str(path), "-o", str(tmp_path / "cam.onnx"), *EXPORT]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"camface: error: {path}: torch.onnx.export fails (at aten.view: Cannot view a tensor "
                          "with shape torch.Size([4*s77, 16, 2, 8])"), err
    assert err.rstrip().endswith("write .reshape() or .contiguous().view() there in the model and save it again))")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "cam.onnx").exists()
