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


def legacy_onnx(model, path, input_name="x", output_name="logits", opset=17):
    """`model` -> ONNX at `path` by torch.onnx's TorchScript exporter (opset 17 unless told,
    dynamic batch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=False,
                          opset_version=opset, input_names=[input_name], output_names=[output_name],
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


class Attention(nn.Module):
    """Multi-head self-attention as timm writes it: qkv -> [3, N, heads, tokens, dim]."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attention = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(n, tokens, dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, norm=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if norm else nn.Identity()
        self.norm2 = nn.LayerNorm(dim) if norm else nn.Identity()
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT-like: 8x8 patch-embedding conv, position embedding, two blocks; the head on the class
    token after a LayerNorm (as ViT-Tiny), or on the mean of the tokens without norms."""

    def __init__(self, class_token=True, dim=16, classes=4):
        super().__init__()
        self.class_token = nn.Parameter(torch.randn(1, 1, dim)) if class_token else None
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.pos = nn.Parameter(torch.randn(1, (SIZE // 8) ** 2 + bool(class_token), dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, 2, class_token) for _ in range(2)])
        self.norm = nn.LayerNorm(dim) if class_token else nn.Identity()
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1)
        x = self.norm(self.blocks(x + self.pos))
        return self.head(x[:, 0] if self.class_token is not None else x.mean(1))


class SwinBlock(TransformerBlock):
    """timm's SwinTransformerBlock on an NHWC stage [N, h, w, C]: norm1, attention within
    window x window windows, then norm2 and the MLP on the tokens [N, h * w, C] (`tokens`, as
    timm 1.0 writes it) or on the stage itself."""

    def __init__(self, dim, heads, window, tokens):
        super().__init__(dim, heads)
        self.window, self.tokens = window, tokens

    def forward(self, x):
        n, h, w, c = x.shape
        win = self.window
        y = self.norm1(x).view(n, h // win, win, w // win, win, c).permute(0, 1, 3, 2, 4, 5)
        y = self.attn(y.reshape(-1, win * win, c))
        y = y.view(n, h // win, w // win, win, win, c).permute(0, 1, 3, 2, 4, 5)
        x = x + y.reshape(n, h, w, c)
        if self.tokens:
            x = x.reshape(n, -1, c)
        return (x + self.mlp(self.norm2(x))).reshape(n, h, w, c)


class Swin(nn.Module):
    """Swin-like, NHWC: patch-embedding conv, two stages of one block of window attention with
    patch merging between (a 2x2 space-to-depth by reshapes of the traced shape, which leaves
    ONNX's shapes symbolic), a LayerNorm and the mean over h and w before the linear head."""

    def __init__(self, classes=4, tokens=True):
        super().__init__()
        self.patch_embed, self.norm0 = nn.Conv2d(3, 16, 4, 4), nn.LayerNorm(16)
        self.stage1 = SwinBlock(16, 2, 4, tokens)
        self.merge_norm, self.reduction = nn.LayerNorm(64), nn.Linear(64, 32, bias=False)
        self.stage2 = SwinBlock(32, 2, 2, tokens)
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, classes)

    def forward(self, x):
        x = self.stage1(self.norm0(self.patch_embed(x).permute(0, 2, 3, 1)))
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        x = self.stage2(self.reduction(self.merge_norm(x)))
        return self.head(self.norm(x).mean(dim=(1, 2)))


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm over the channels of NCHW, by permutes to NHWC and back."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm and the MLP (linear, GELU, linear) on NHWC, layer scale."""

    def __init__(self, dim):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtHead(nn.Module):
    """timm's NormMlpClassifierHead: global average pooling, LayerNorm2d, flatten, linear."""

    def __init__(self, dim, classes):
        super().__init__()
        self.global_pool, self.norm = nn.AdaptiveAvgPool2d(1), LayerNorm2d(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):
        return self.fc(self.norm(self.global_pool(x)).flatten(1))


class ConvNeXt(nn.Module):
    """ConvNeXt-like (as timm's ConvNeXt-Atto, smaller): a 4x4 patchify stem with LayerNorm2d,
    two stages (the second downsamples by LayerNorm2d and a 2x2 conv), the head above."""

    def __init__(self, dims=(8, 16), classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.Sequential(
            nn.Sequential(ConvNeXtBlock(dims[0]), ConvNeXtBlock(dims[0])),
            nn.Sequential(LayerNorm2d(dims[0], eps=1e-6), nn.Conv2d(dims[0], dims[1], 2, 2),
                          ConvNeXtBlock(dims[1])))
        self.head = ConvNeXtHead(dims[1], classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def refused(capsys, path, tmp_path, *flags) -> str:
    """`camface export` on `path` fails: exit 2, one line on stderr, no graph; that line."""
    out = tmp_path / "cam.onnx"
    assert main(["export", str(path), "-o", str(out), "--preset", "unit", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("camface: error: ") and "\n" not in err and "Traceback" not in err
    assert not out.exists()
    return err


@pytest.mark.parametrize("class_token", [True, False], ids=["class-token", "mean-tokens"])
def test_a_vision_transformer_exports_on_its_token_grid_and_runs_live(tmp_path, capsys, class_token):
    """No spatial map reaches the logits without attention: the default target is the last
    block's norm1 tokens, laid out on the 4x4 patch grid after the class token (if any); the
    graph runs in `camface live` unchanged, with maps on the faces."""
    import json

    torch.manual_seed(0)
    out = tmp_path / "vit.cam.onnx"
    assert main(["export", str(legacy_onnx(ViT(class_token), tmp_path / "vit.onnx")), "-o", str(out),
                 "--preset", "unit", "--no-rank"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    # the input of the last block's qkv: its norm1, or (blocks without norms) the block before's
    # output, named as PyTorch names the module (TorchScript's scope: blocks/blocks.1/norm1)
    module = "blocks.1.norm1" if class_token else "blocks.0"
    assert meta["target_layer"] == module
    assert json.loads(meta["token_grid"]) == {"prefix": int(class_token), "height": 4, "width": 4}
    assert json.loads(meta["feature_size"]) == [4, 4]
    assert meta["target_reason"].startswith("default for ViT/DeiT: the last block's norm1")
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"at {module} (tokens: {int(class_token)} + 4x4) 4x4; fp32" in printed
    assert f"target {module}: default for ViT/DeiT: the last block's norm1, the tokens the last " \
           "attention reads (pytorch-grad-cam's choice)" in printed
    snapshots = tmp_path / "snaps"
    assert main(["live", "--model", str(out), "--source", "sample", "--no-show", "--max-frames", "3",
                 "--method", "gradcam", "--snapshot-every", "2", "--snapshot-dir", str(snapshots)]) == 0
    saved = json.loads(next(snapshots.glob("*/snapshot.json")).read_text())
    assert saved["faces"] and saved["method"] == "gradcam"


@pytest.mark.parametrize("name, why", [("blocks.11.norm1", "no tensor, node or module named 'blocks.11.norm1'"),
                                       ("head", "'head' [N, 4] is not a 4-D tensor or tokens [N, T, C] before the logits")])
def test_a_wrong_target_on_a_vision_transformer_lists_its_token_modules(tmp_path, capsys, name, why):
    """The candidates a ViT's refusal lists are what --target-layer takes there: its token modules
    and spatial maps, not the attention's internals (which were all it listed)."""
    torch.manual_seed(0)
    err = refused(capsys, legacy_onnx(ViT(True), tmp_path / "vit.onnx"), tmp_path, "--target-layer", name)
    assert why in err
    listed = err.split("candidate target layers: ")[1].split(", ")
    assert {"blocks.0.norm1", "blocks.1.norm1", "blocks.1.attn", "patch_embed"} <= set(listed)
    assert not [c for c in listed if "attn/" in c or "Softmax" in c or "Transpose" in c], listed


@pytest.mark.parametrize("name, kind", [("blocks.0.norm1", "a PyTorch module name"),
                                        ("blocks/blocks.0/norm1", "a PyTorch module name"),
                                        ("/blocks/blocks.0/norm1/LayerNormalization_output_0",
                                         "a tensor name"),
                                        ("/blocks/blocks.0/norm1/LayerNormalization", "a node name")])
def test_target_layer_takes_a_module_node_or_tensor_name(tmp_path, capsys, name, kind):
    """The first block's norm1 named four ways: the same tokens on the same grid, the name given
    recorded with what kind of name it was; `camface info` says so."""
    import json

    torch.manual_seed(0)
    out = tmp_path / "vit.cam.onnx"
    assert main(["export", str(legacy_onnx(ViT(True), tmp_path / "vit.onnx")), "-o", str(out),
                 "--preset", "unit", "--no-rank", "--target-layer", name]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["target_layer"] == name and meta["target_reason"] == f"--target-layer {name} ({kind})"
    assert json.loads(meta["token_grid"]) == {"prefix": 1, "height": 4, "width": 4}
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert f"target {name}: --target-layer {name} ({kind})" in capsys.readouterr().out
    default = tmp_path / "default.cam.onnx"
    assert main(["export", str(tmp_path / "vit.onnx"), "-o", str(default), "--preset", "unit",
                 "--no-rank"]) == 0
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array([-1, 2], np.int64)
    first, last = run_graph(out, images, classes), run_graph(default, images, classes)
    np.testing.assert_allclose(first["probs"], last["probs"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(first["activations"], last["activations"])  # blocks.0, not blocks.1


def test_a_cnns_target_reason_is_the_map_before_pooling(tmp_path, capsys):
    import json

    out = tmp_path / "cnn.cam.onnx"
    assert main(["export", str(legacy_onnx(small_cnn(), tmp_path / "cnn.onnx")), "-o", str(out),
                 "--preset", "unit", "--no-rank"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    # no "(ConvNeXt: its last stage)" note: it was said of every CNN, a ConvNeXt or not
    assert meta["target_reason"] == "default: the last 4-D feature map before global pooling" \
        and "token_grid" not in meta
    assert json.loads(meta["feature_size"]) == [16, 16]


def test_a_token_grid_flag_is_for_onnx_models(tmp_path, capsys):
    from camface.models import EMOTION_KERAS

    assert main(["export", str(EMOTION_KERAS), "-o", str(tmp_path / "x.onnx"), "--token-grid", "4x4"]) == 2
    assert "--token-grid and --prefix-tokens are for .onnx / .pt2 transformers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(EMOTION_KERAS), "-o", str(tmp_path / "x.onnx"), "--token-grid", "4by4"])


def test_a_swin_exports_at_its_last_stage_with_the_dims_shape_inference_leaves_open(tmp_path):
    """Patch merging by reshapes of the traced shape: ONNX's shape inference leaves h and w of
    every later tensor symbolic; a probe run fixes them, and the map before the mean over h, w
    (NHWC), named as a PyTorch module, is the target. CAM: its head is that mean and one linear
    layer. Values against torch on the same weights (the default target, the last block's
    norm2: tests/test_onnx_tokens.py)."""
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    model = Swin().eval()
    path = legacy_onnx(model, tmp_path / "swin.onnx")
    shapes = onnx.shape_inference.infer_shapes(onnx.load(str(path)), data_prop=True).graph.value_info
    assert any(v.name == "/norm/LayerNormalization_output_0" and v.type.tensor_type.shape.dim[1].dim_param
               for v in shapes)  # what shape inference alone leaves
    result = onnx_export.export(path, tmp_path / "cam.onnx", ExportOptions(preset="unit",
                                                                           target_layer="norm"))
    assert result.info.target_layer == "norm" and result.info.feature_size == (4, 4)
    assert result.info.target_reason == "--target-layer norm (a PyTorch module name)"
    assert "cam" in result.info.heatmaps and all(d.ok for d in result.differences)
    images = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array([-1, 1, 3], np.int64)
    got = run_graph(result.path, images, classes)
    logits, norm = logits_and_output(model, model.norm, images)
    np.testing.assert_allclose(got["probs"], torch.softmax(torch.tensor(logits), 1).numpy(),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["activations"], norm, rtol=1e-4, atol=1e-4)
    chosen = np.where(classes < 0, logits.argmax(1), classes)
    cam = np.einsum("nhwk,nk->nhw", got["activations"], model.head.weight.detach().numpy()[chosen])
    np.testing.assert_allclose(got["cam"], cam, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["gradcam"], np.maximum(cam, 0) / 16, rtol=1e-4, atol=1e-6)


class Mixer(nn.Module):
    """MLP-Mixer-like: a 4x4 patch-embedding conv (64 tokens), a block mixing the tokens by a
    linear layer over the token axis and the channels by another, a LayerNorm, the mean over
    the tokens, a linear head. No attention."""

    def __init__(self, dim=8, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.norm1, self.mix_tokens = nn.LayerNorm(dim), nn.Linear(64, 64)
        self.norm2, self.mix_channels = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                                                            nn.Linear(2 * dim, dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.mix_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.mix_channels(self.norm2(x))
        return self.head(self.norm(x).mean(1))


@pytest.mark.parametrize("kind", ["legacy", "pt2"])
def test_an_mlp_mixer_defaults_to_the_tokens_its_mean_reads(tmp_path, kind):
    """An MLP-Mixer's only 4-D map is its patch embedding, read through token mixing by linear
    layers (no attention, so no ViT default): its first layer was the default target. The
    default is the tokens the final mean reads (`norm`) on their 8x8 grid: CAM is its head,
    and the maps equal torch's."""


    torch.manual_seed(0)
    model = Mixer().eval()
    result = export_saved(model, kind, tmp_path)
    info = result.info
    assert info.target_layer == "norm" and info.feature_size == (8, 8)
    assert info.token_grid == {"prefix": 0, "height": 8, "width": 8}
    assert info.target_reason.startswith("default for MLP-Mixer: the tokens the mean over tokens")
    assert {"cam", "gradcam"} <= set(info.heatmaps) and all(d.ok for d in result.differences)
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array([-1, 1, 3], np.int64)
    got = run_graph(result.path, images, classes)
    logits, norm = logits_and_output(model, model.norm, images)
    tokens = norm.reshape(3, 8, 8, -1)
    np.testing.assert_allclose(got["activations"], tokens, rtol=1e-4, atol=1e-5)
    chosen = np.where(classes < 0, logits.argmax(1), classes)
    cam = np.einsum("nhwk,nk->nhw", tokens, model.head.weight.detach().numpy()[chosen])
    np.testing.assert_allclose(got["cam"], cam, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["gradcam"], np.maximum(cam, 0) / 64, rtol=1e-4, atol=1e-6)


def test_an_attention_target_named_explicitly_is_exported_with_a_warning(tmp_path, caplog):
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    path = legacy_onnx(ViT(class_token=False), tmp_path / "vit.onnx")
    softmax = "/blocks/blocks.1/attn/Softmax_output_0"
    result = onnx_export.export(path, tmp_path / "cam.onnx",
                                ExportOptions(preset="unit", target_layer=softmax))
    assert result.info.target_layer == softmax and result.info.feature_size == (16, 16)
    assert f"target {softmax} (Softmax [N, 2, 16, 16]) is no spatial feature map" in caplog.text


def test_a_target_with_symbolic_height_and_width_is_one_line_naming_it(tmp_path, capsys,
                                                                       monkeypatch):
    """When the probe run cannot fix them (a model ONNX Runtime does not run, here: the probe
    left out), the target's open dims are named, not a ValueError from int('unk__5')."""
    from camface.export import onnx_model

    monkeypatch.setattr(onnx_model, "settle_shapes", lambda classifier: classifier)
    torch.manual_seed(0)
    path = legacy_onnx(Swin(), tmp_path / "swin.onnx")
    err = refused(capsys, path, tmp_path)
    assert re.search(r"target '/norm/LayerNormalization_output_0' \[N, unk__\d+, unk__\d+, 32\] "
                     r"\(NHWC\): its height and width are not fixed after ONNX shape inference.*"
                     r"--target-layer, such as .*/stage1/Reshape_\d+_output_0$", err), err
    explicit = refused(capsys, path, tmp_path, "--target-layer", "norm")  # a module name
    assert explicit.startswith("camface: error: target '/norm/LayerNormalization_output_0' [N, unk__")


def test_a_model_whose_4d_tensors_are_reshapes_has_no_default_target(tmp_path, capsys):
    """[N, 3, 8, 8] reshaped to [N, 3, 4, 16] and averaged over its last two axes: pooled like a
    map, but 16 is no stride of 8, and nothing else is 4-D."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([0, 3, 4, 16], np.int64), "shape"),
             numpy_helper.from_array(np.ones((4, 3), np.float32), "fc")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["tokens"]),
             helper.make_node("ReduceMean", ["tokens"], ["pool"], axes=[2, 3], keepdims=0),
             helper.make_node("Gemm", ["pool", "fc"], ["logits"], transB=1)]
    onnx.save(_tiny_classifier(nodes, inits), str(tmp_path / "m.onnx"))
    err = refused(capsys, tmp_path / "m.onnx", tmp_path)
    assert "no spatial feature map (N, C, h, w) on the image grid before the logits 'logits'" in err
    assert "(e.g. tokens [N, 3, 4, 16]); pass one with --target-layer" in err


class DenseSE(nn.Module):
    """A dense block (a Concat of channels), squeeze-and-excitation (a Mul by [N, C, 1, 1]) and
    an upsampling: maps all of them, through to the global pooling."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem, self.grow = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 4, 3, 1, 1)
        self.squeeze, self.excite = nn.Conv2d(12, 3, 1), nn.Conv2d(3, 12, 1)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([x, self.grow(x)], 1)
        x = x * torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = torch.relu(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.fc(x.mean((2, 3)))


def test_concat_of_channels_excitation_and_upsampling_keep_the_map(tmp_path):
    from camface.export import onnx_model

    torch.manual_seed(0)
    path = legacy_onnx(DenseSE(), tmp_path / "dense.onnx")
    classifier = onnx_model.describe(onnx_model.load(path))
    maps = onnx_model.spatial_maps(classifier)
    producers = {o: n.op_type for n in classifier.model.graph.node for o in n.output}
    kinds = {producers[t] for t in maps}
    assert {"Concat", "Mul", "Resize", "Relu"} <= kinds and set(maps.values()) == {"NCHW"}
    target = onnx_model.default_target(classifier)
    assert producers[target] == "Relu" and onnx_model.shapes(classifier.model)[target][1:] == [12, 32, 32]


def _tiny_classifier(nodes: list, inits: list, opset: int = 17) -> onnx.ModelProto:
    """`nodes` (with initializers `inits`) as a model from x [N, 3, 8, 8] to logits [N, 4]."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset > 20 else 8
    return model


def test_a_residual_add_keeps_the_map_whatever_its_batch_dim_is_called():
    """conv + (conv reshaped away and back): shape inference names the sum's batch unk__2, the
    conv's N; the sum, and the ReLU after it, are still the map."""
    from onnx import helper, numpy_helper

    from camface.export import onnx_model

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([-1, 384], np.int64), "rows_shape"),
             numpy_helper.from_array(np.array([-1, 6, 8, 8], np.int64), "grid_shape"),
             numpy_helper.from_array(rng.standard_normal((4, 384)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["conv", "rows_shape"], ["rows"]),
             helper.make_node("Reshape", ["rows", "grid_shape"], ["back"]),
             helper.make_node("Add", ["back", "conv"], ["sum"]),
             helper.make_node("Relu", ["sum"], ["relu"]),
             helper.make_node("Flatten", ["relu"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    classifier = onnx_model.describe(onnx_model.prepare(_tiny_classifier(nodes, inits)))
    dims = onnx_model.shapes(classifier.model)
    assert dims["conv"][0] != dims["sum"][0]
    assert onnx_model.spatial_maps(classifier) == {"conv": "NCHW", "sum": "NCHW", "relu": "NCHW"}
    assert onnx_model.default_target(classifier) == "relu"


# op, opset, its second input (a constant: CastLike's type, RMSNormalization's scale), attributes
_MAP_KEEPING_OPS = [("Swish", 24, None, {}), ("Shrink", 17, None, {}),
                    ("ThresholdedRelu", 17, None, {}), ("Tan", 17, None, {}),
                    ("Atanh", 17, None, {}), ("Sinh", 17, None, {}), ("Reciprocal", 17, None, {}),
                    ("Floor", 17, None, {}), ("CastLike", 17, np.zeros(1, np.float32), {}),
                    ("MeanVarianceNormalization", 17, None, {}),
                    ("RMSNormalization", 23, np.ones((6, 1, 1), np.float32), {"axis": 1})]


@pytest.mark.parametrize("op, opset, second, attrs", _MAP_KEEPING_OPS)
def test_an_elementwise_op_with_a_gradient_rule_keeps_the_map(op, opset, second, attrs):
    """conv -> `op` -> ReLU -> pooled logits: the op's output is on the map, a target as the
    conv's and the ReLU's (these ops have gradient rules since; they were taken for ops that
    break the map, so only the pooled ReLU was found again)."""
    classifier = _conv_op_relu_classifier(op, opset, second, attrs)
    from camface.export import onnx_model

    assert onnx_model.spatial_maps(classifier) == {"conv": "NCHW", "act": "NCHW", "relu": "NCHW"}


def test_a_hardmax_breaks_the_map():
    """conv -> Hardmax -> ReLU -> pooled logits: Hardmax's one-hot along the width (gradient 0)
    is no feature map to offer; the pooled ReLU's input is found as before."""
    from camface.export import onnx_model

    classifier = _conv_op_relu_classifier("Hardmax", 17, None, {})
    assert "act" not in onnx_model.spatial_maps(classifier)
    assert "conv" in onnx_model.spatial_maps(classifier)


def _conv_op_relu_classifier(op, opset, second, attrs):
    from onnx import helper, numpy_helper

    from camface.export import onnx_model

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "fc")]
    if second is not None:
        inits.append(numpy_helper.from_array(second, "second"))
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node(op, ["conv"] + (["second"] if second is not None else []), ["act"],
                              **attrs),
             helper.make_node("Relu", ["act"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    return onnx_model.describe(onnx_model.prepare(_tiny_classifier(nodes, inits, opset)))


def test_an_attention_tensor_is_no_spatial_map(tmp_path):
    """spatial_maps on the mean-token ViT: the patch embedding only, though its attention
    [N, 2, 16, 16] has 16 = 32 / 2 on both sides, like a map at stride 2."""
    from camface.export import onnx_model

    torch.manual_seed(0)
    path = legacy_onnx(ViT(class_token=False), tmp_path / "vit.onnx")
    classifier = onnx_model.describe(onnx_model.load(path))
    dims = onnx_model.shapes(classifier.model)
    softmax = next(n.output[0] for n in classifier.model.graph.node if n.op_type == "Softmax")
    assert dims[softmax][1:] == [2, 16, 16]
    assert onnx_model.spatial_maps(classifier) == {"/patch_embed/Conv_output_0": "NCHW"}


def logits_and_output(model, module, images):
    """(logits, `module`'s output) of torch `model` on uint8 NHWC `images` (preset unit), numpy."""
    seen = {}
    hook = module.register_forward_hook(lambda _module, _args, out: seen.update(a=out))
    with torch.no_grad():
        logits = model(torch.tensor(images.astype(np.float32) / 255).permute(0, 3, 1, 2)).numpy()
    hook.remove()
    return logits, seen["a"].numpy()


def run_graph(path, images, classes):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": images, "class_index": classes})))


def export_saved(model, kind, tmp_path, **options):
    """`model` saved by the TorchScript exporter (kind "legacy") or as a .pt2, then `camface
    export`ed with the unit preset and `options` (ExportOptions): the ExportResult."""
    from onnx_helpers import save_program

    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    path = legacy_onnx(model, tmp_path / "m.onnx") if kind == "legacy" else \
        save_program(model, tmp_path / "m.pt2", size=SIZE)
    return onnx_export.export(path, tmp_path / "cam.onnx", ExportOptions(preset="unit", **options))


def assert_heatmaps_equal_torch(result, model, stage, classes=(-1, 2, 0), heatmaps=("gradcam", "hirescam"),
                                atol=1e-4):
    """The exported graph's activations and `heatmaps` on random crops (one per class of
    `classes`, -1: the predicted) against the methods' references on torch autograd's gradient
    at `stage`'s output (`torch_heatmaps`), within `atol` of each map's largest value (none all
    zero). Returns the activations."""
    images = np.random.default_rng(0).integers(0, 256, (len(classes), SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array(classes)
    got = run_graph(result.path, images, classes)
    _, activations, expected = torch_heatmaps(model, stage, images, classes, list(heatmaps))
    np.testing.assert_allclose(got["activations"], activations, rtol=1e-4,
                               atol=1e-5 * max(1.0, float(np.abs(activations).max())))
    for name, heatmap in expected.items():
        scale = float(np.abs(heatmap).max())
        assert scale > 0, name
        np.testing.assert_allclose(got[name], heatmap, rtol=1e-4, atol=atol * scale, err_msg=name)
    return activations


@pytest.mark.parametrize("input_name, output_name", [("x", "probs"), ("image", "probs"),
                                                      ("x", "gradcam"), ("activations", "class_index")])
def test_tensors_named_like_the_contract_are_renamed_inside_the_graph(tmp_path, capsys, caplog,
                                                                     input_name, output_name):
    caplog.set_level(logging.INFO)
    model = small_cnn()
    path = legacy_onnx(model, tmp_path / "m.onnx", input_name, output_name)
    out = tmp_path / "cam.onnx"
    assert main(["export", str(path), "-o", str(out), "--preset", "unit", "--no-rank"]) == 0, capsys.readouterr().err
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
    assert main(["export", str(path), "-o", str(fp32), "--preset", "unit", "--no-verify",
                 "--no-rank"]) == 0  # the float32 reference
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


def torch_heatmaps(model, stage, images, classes, heatmaps):
    """(probs, activations [N, h, w, K], {method: reference heatmap}) of `model` on uint8 NHWC
    `images` (preset unit), from torch autograd's gradient of the chosen logits at the output
    of `stage`."""
    from camface import methods

    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["a"] = out

    hook = stage.register_forward_hook(keep)
    logits = model(torch.tensor(images.astype(np.float32) / 255).permute(0, 3, 1, 2))
    hook.remove()
    chosen = np.where(classes < 0, logits.detach().numpy().argmax(1), classes)
    logits[torch.arange(len(chosen)), torch.tensor(chosen)].sum().backward()
    a = seen["a"].detach().permute(0, 2, 3, 1).numpy()
    g = seen["a"].grad.permute(0, 2, 3, 1).numpy()
    from onnx_helpers import torch_calls

    x = (images.astype(np.float32) / 255).astype(np.float32)
    calls = torch_calls(model, stage, x, a, classes)
    expected = {name: methods.get(name).reference(a, g, model=calls) for name in heatmaps}
    return torch.softmax(logits, 1).detach().numpy(), a, expected


@pytest.fixture(scope="module", params=[17, 14], ids=["opset17", "opset14-decomposed"])
def convnext_graph(tmp_path_factory, request):
    """(the torch model, the export result, the opset) of the ConvNeXt-like model, legacy exporter: at
    opset 17 (LayerNormalization nodes) and 14 (LayerNorm as ReduceMean, Sub, Pow, Sqrt, Div)."""
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    folder = tmp_path_factory.mktemp("convnext")
    torch.manual_seed(0)
    model = ConvNeXt().eval()
    path = legacy_onnx(model, folder / "convnext.onnx", opset=request.param)
    return model, onnx_export.export(path, folder / "cam.onnx", ExportOptions(preset="unit")), \
        request.param


def test_a_convnext_exports_at_its_last_stage_without_cam(convnext_graph):
    """ConvNeXt-Atto failed with "no gradient rule for op LayerNormalization (node
    '/head/norm/LayerNormalization')": the head's LayerNorm2d is differentiated now. The
    default target is the input of the global pooling, the last stage's output (recorded as
    `stages`, the module whose output it is); CAM is left out: a norm lies between the pooling
    and the linear layer."""
    _, result, opset = convnext_graph
    info = result.info
    assert info.target_layer == "stages" and info.feature_size == (4, 4)
    assert "cam" not in info.heatmaps and {"gradcam", "hirescam", "eigencam"} <= set(info.heatmaps)
    assert all(d.ok for d in result.differences)
    norm = "LayerNormalization" if opset >= 17 else "ReduceMean"  # its decomposition below 17
    assert re.search(r"the head after global average pooling is not one linear layer "
                     rf"\(/head/norm/Transpose \(Transpose\) -> /head/norm/{norm} \({norm}\)",
                     info.cam_unavailable_reason), info.cam_unavailable_reason


@pytest.mark.parametrize("batch", [1, 4, 32])
def test_convnext_heatmaps_equal_those_of_torch_autograd(convnext_graph, batch):
    """Every heatmap of the graph against the method's numpy reference on the activations and
    torch autograd's gradient at the last stage, the same weights, at batch 1, 4 and 32."""
    model, result, _ = convnext_graph
    rng = np.random.default_rng(batch)
    images = rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
    classes = rng.integers(-1, 4, batch).astype(np.int64)
    got = run_graph(result.path, images, classes)
    probs, activations, expected = torch_heatmaps(model, model.stages, images, classes,
                                                  result.info.heatmaps)
    np.testing.assert_allclose(got["probs"], probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["activations"], activations, rtol=1e-4, atol=1e-5)
    for name, heatmap in expected.items():
        assert got[name].shape == (batch, 4, 4)
        scale = float(np.abs(heatmap).max())
        np.testing.assert_allclose(got[name], heatmap, rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=name)


@pytest.fixture(scope="module")
def convnext_pt2_and_legacy(tmp_path_factory):
    """(the torch model, {"pt2" | "legacy": the export result}) of one ConvNeXt-like model saved
    by torch.export and by the legacy exporter (opset 17), every method asked for."""
    from onnx_helpers import save_program

    from camface import methods
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    folder = tmp_path_factory.mktemp("convnext_pt2")
    torch.manual_seed(0)
    model = ConvNeXt().eval()
    paths = {"pt2": save_program(model, folder / "convnext.pt2", size=SIZE),
             "legacy": legacy_onnx(model, folder / "convnext.onnx")}
    options = ExportOptions(preset="unit", heads=methods.names())
    return model, {kind: onnx_export.export(path, folder / f"cam_{kind}.onnx", options)
                   for kind, path in paths.items()}


@pytest.mark.parametrize("batch", [1, 4])
def test_a_convnext_from_a_pt2_keeps_ablation_cam_equal_to_the_legacy_exporters(convnext_pt2_and_legacy,
                                                                               batch):
    """torch.export writes the head's flatten after global pooling as a Gather whose indices
    count the rows from the input's Shape (`node_as_strided`): Ablation-CAM was left out ("also
    reads 'val_83', computed from the graph's input"). The index nodes are cloned into the rerun
    reading its own rows' batch size: the .pt2's Ablation-CAM equals the legacy graph's and torch's
    (the head rerun on the ablated activations by a forward hook)."""
    model, results = convnext_pt2_and_legacy
    assert all("ablationcam" in r.info.heatmaps for r in results.values())
    assert all(d.ok for r in results.values() for d in r.differences)
    rng = np.random.default_rng(batch)
    images = rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
    classes = rng.integers(-1, 4, batch).astype(np.int64)
    got = {kind: run_graph(r.path, images, classes)["ablationcam"] for kind, r in results.items()}
    _, _, expected = torch_heatmaps(model, model.stages, images, classes, ["ablationcam"])
    scale = float(np.abs(expected["ablationcam"]).max())
    assert got["pt2"].shape == (batch, 4, 4) and scale > 0
    for heatmap in (got["legacy"], expected["ablationcam"]):
        np.testing.assert_allclose(got["pt2"], heatmap, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("module, channels_last", [("stages.1.2.norm", True), ("stages.1.2.mlp.0", True),
                                                   ("stages.0.1.conv_dw", False)])
def test_a_module_inside_nested_sequentials_is_named_as_pytorch_names_it(tmp_path, module,
                                                                         channels_last):
    """TorchScript scopes a module of a Sequential inside a Sequential `stages/stages.1/
    stages.1.2/norm`; its PyTorch name is `stages.1.2.norm`, which was unknown (`did you mean
    stages.1.stages.1.2.norm`). ConvNeXt's block internals, NHWC (its LayerNorm and MLP) or
    NCHW, on a 32x48 input (a 4x6 or 8x12 map): the activations are torch's, not transposed."""
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    model = ConvNeXt().eval()
    path = tmp_path / "convnext.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, 32, 48),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    graph, info, differences = onnx_export.build(onnx.load(path), ExportOptions(preset="unit",
                                                                                target_layer=module))
    assert info.target_layer == module and all(d.ok for d in differences)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["activations"], {"image": images, "class_index": np.array([-1, 1])})[0]
    seen = {}
    hook = model.get_submodule(module).register_forward_hook(lambda _m, _i, out: seen.__setitem__("a", out))
    with torch.no_grad():
        model(torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2))
    hook.remove()
    want = seen["a"].numpy() if channels_last else seen["a"].numpy().transpose(0, 2, 3, 1)
    assert want.shape[1:3] in ((4, 6), (8, 12))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class CalledFromAbove(nn.Module):
    """A stem whose conv the model's forward calls itself (`self.stem.proj(x)`, as some ViT and
    MLP-Mixer code does), not the stem's forward."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Module()
        self.stem.proj = nn.Conv2d(3, 8, 4, 4)
        self.blocks = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.blocks(self.stem.proj(x)).mean((2, 3)))


def test_a_module_called_from_above_its_parent_is_refused_naming_its_torchscript_scope(tmp_path,
                                                                                      capsys):
    """TorchScript scopes `stem.proj`, called from the model's forward, as `proj`: the PyTorch
    name was refused with no hint (its did-you-mean list misses it, `patch_embed.proj` being too
    unlike `proj`); the refusal names the scope, which exports, and a .pt2 takes the PyTorch
    name."""
    from onnx_helpers import save_program

    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    model = CalledFromAbove().eval()
    path = legacy_onnx(model, tmp_path / "m.onnx")
    err = refused(capsys, path, tmp_path, "--target-layer", "stem.proj")
    assert "no tensor, node or module named 'stem.proj' (TorchScript's exporter scopes a module by " \
           "the forward that calls it: stem.proj, called from an ancestor's forward, not its parent's, " \
           "is scoped 'proj'; pass that name" in err
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        want = model.stem.proj(torch.from_numpy(images / np.float32(255)).permute(0, 3, 1, 2))
    for source, name in ((path, "proj"), (save_program(model, tmp_path / "m.pt2", size=SIZE), "stem.proj")):
        result = onnx_export.export(source, tmp_path / "cam.onnx", ExportOptions(preset="unit",
                                                                                 target_layer=name))
        got = run_graph(result.path, images, np.array([-1, 1]))["activations"]
        np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.weight.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.fc(self.head(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("folding", [True, False], ids=["folded", "kept-apart"])
def test_a_conv_target_whose_batchnorm_torch_onnx_folded_in_says_so(tmp_path, caplog, folding):
    """torch.onnx's TorchScript exporter folds an eval-mode BatchNorm into the Conv before it
    and scopes the fused node as the Conv: `--target-layer conv` silently gave the BatchNorm's
    output, recorded as the convolution (its maps unlike pytorch-grad-cam's at model.conv). It is
    exported with a warning saying so (the recorded reason too); with do_constant_folding=False
    the Conv is its own, no warning."""
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    model = ConvBN().eval()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
                          do_constant_folding=folding)
    result = onnx_export.export(path, tmp_path / "cam.onnx", ExportOptions(preset="unit",
                                                                           target_layer="conv"))
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    got = run_graph(result.path, images, np.array([-1, 1]))["activations"]
    with torch.no_grad():
        conv = model.conv(torch.from_numpy(images / np.float32(255)).permute(0, 3, 1, 2))
        want = (model.bn(conv) if folding else conv).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    warned = "target conv: torch.onnx folded the BatchNorm after this convolution into it (its weights " \
             "are onnx::Conv_"
    assert (warned in caplog.text) == folding
    assert result.info.target_reason == "--target-layer conv (a PyTorch module name)" + (
        ", the BatchNorm after it folded in" if folding else "")


def _dynamo_onnx(model, path):
    """`model` -> ONNX at `path` by torch.onnx's dynamo exporter, its optimiser on (the default)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=32)},))
    return path


@pytest.mark.parametrize("kind, name, why", [
    ("legacy", "bn", "torch.onnx folded each BatchNorm of the model into the "
                     "convolution before it, whose name the fused map keeps: conv; export with "
                     "do_constant_folding=False to keep them apart); candidate target layers: "),
    ("dynamo", "conv", "torch.onnx's optimiser folded each convolution of the model and the BatchNorm "
                       "after it into one map, named as the BatchNorm: bn; export with optimize=False, "
                       "or to .pt2, to keep them apart); candidate target layers: ")])
def test_a_module_folded_away_is_refused_naming_the_fused_map(tmp_path, capsys, kind, name, why):
    """The module of a Conv + BatchNorm pair that an exporter folded away was refused as unknown,
    with no word of the folding (the dynamo exporter's file refused `conv`, the legacy exporter's
    `bn`, suggesting nothing): the refusal says which name the fused map has and how to keep the
    pair apart."""
    torch.manual_seed(0)
    model = ConvBN().eval()
    path = (legacy_onnx if kind == "legacy" else _dynamo_onnx)(model, tmp_path / "m.onnx")
    err = refused(capsys, path, tmp_path, "--target-layer", name)
    assert f"no tensor, node or module named '{name}' (" in err and why in err, err


@pytest.mark.parametrize("name", ["conv", "bn"])
def test_a_pt2_conv_followed_by_a_batchnorm_is_a_target_of_its_own(tmp_path, caplog, name):
    """torch.onnx's optimiser fuses a convolution and the BatchNorm after it into one Conv scoped
    as the BatchNorm, so `--target-layer conv` on a .pt2 was refused (the zoo's ResNeXt
    `layer1.0.conv2`). The program is exported again without that fusion: the map is the
    convolution's own output and its Grad-CAM is that of torch autograd's gradient there (as
    pytorch-grad-cam's at model.conv); the BatchNorm's name still gives the BatchNorm's output."""
    from onnx_helpers import save_program

    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    model = ConvBN().eval()
    path = save_program(model, tmp_path / "m.pt2", size=SIZE)
    with caplog.at_level(logging.INFO):
        result = onnx_export.export(path, tmp_path / "cam.onnx", ExportOptions(preset="unit", target_layer=name))
    assert all(d.ok for d in result.differences) and result.info.target_layer == name
    assert ("exported again without that fusion" in caplog.text) == (name == "conv")
    assert_heatmaps_equal_torch(result, model, model.get_submodule(name), classes=(-1, 1, 3),
                                heatmaps=("gradcam", "gradcampp", "layercam"), atol=1e-5)


class ReLUTwice(nn.Module):
    """torchvision's BasicBlock habit: one ReLU module called twice (after the first conv, and
    after the sum)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 1, 1)
        self.relu, self.fc = nn.ReLU(), nn.Linear(8, 4)

    def forward(self, x):
        y = self.relu(self.conv1(x))
        return self.fc(self.relu(self.conv2(y) + y).mean((2, 3)))


@pytest.mark.parametrize("kind", ["legacy", "pt2"])
def test_a_module_called_twice_is_its_last_call_or_a_warning_says_so(tmp_path, caplog, kind):
    """TorchScript scopes a module's second call `relu_1`: `--target-layer relu` on a legacy
    export was silently the first call's output; on a .pt2 too, though its module `relu` is the
    last call's output (the first call's tensor is named `relu` as well, and tensor names went
    first). A .pt2 gives the last call, as a forward hook keeping the latest output does; a
    legacy export warns and names `relu_1`, which is the last call."""
    from onnx_helpers import save_program

    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    model = ReLUTwice().eval()
    path = legacy_onnx(model, tmp_path / "m.onnx") if kind == "legacy" else \
        save_program(model, tmp_path / "m.pt2", size=SIZE)
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    seen = []
    hook = model.relu.register_forward_hook(lambda _m, _i, out: seen.append(out.permute(0, 2, 3, 1).numpy()))
    with torch.no_grad():
        model(torch.from_numpy(images / np.float32(255)).permute(0, 3, 1, 2))
    hook.remove()
    for name, call in [("relu", 0 if kind == "legacy" else 1)] + [("relu_1", 1)] * (kind == "legacy"):
        caplog.clear()
        result = onnx_export.export(path, tmp_path / "cam.onnx", ExportOptions(preset="unit",
                                                                               target_layer=name))
        got = run_graph(result.path, images, np.array([-1, 1]))["activations"]
        np.testing.assert_allclose(got, seen[call], rtol=1e-4, atol=1e-5)
        warned = "target relu: TorchScript scopes the calls of a module called again relu, relu_1; " \
                 "unless relu_1 is a module of its own, the map is this module's first call's output"
        assert (warned in caplog.text) == (kind == "legacy" and name == "relu"), caplog.text


class Upsampling(nn.Module):
    """A stride-2 stem, then the map upsampled (F.interpolate) before the last convolution, as
    FPN-like and decoder heads do: a target before the Resize needs its gradient."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 6, 3, 1, 1), nn.ReLU())
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        up = nn.functional.interpolate(self.stem(x), scale_factor=2, mode=self.mode,
                                       **({} if self.mode == "nearest" else {"align_corners": False}))
        return self.fc(self.head(up).mean((2, 3)))


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("kind", ["legacy", "pt2"])
def test_a_target_before_an_upsampling_exports_with_torchs_gradient(tmp_path, mode, kind):
    """`F.interpolate` after the target failed the export ("no gradient rule for op Resize"):
    each mode, from the legacy exporter and from a .pt2, passes the self-check, and its heatmaps
    equal the methods' references on torch autograd's gradient at the stem."""


    torch.manual_seed(0)
    model = Upsampling(mode).eval()
    result = export_saved(model, kind, tmp_path, target_layer="stem")
    assert result.info.target_layer == "stem" and result.info.feature_size == (16, 16)
    assert all(d.ok for d in result.differences)
    assert_heatmaps_equal_torch(result, model, model.stem)


class MaxAfterReLU(nn.Module):
    """VGG's order (conv, ReLU, max pool) or a global max (amax) after a ReLU target, a third of
    whose channels are all zero: the max reads tied zeros. `stem`: ResNet's stem (conv, BN,
    ReLU, a 3x3 max pool of stride 2), two of its channels a hair either side of zero (their
    conv's weights 1e-5, no bias) and read 50 times as strongly by the next conv."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, 2, 1), nn.ReLU()) if pool != "stem" else \
            nn.Sequential(nn.Conv2d(3, 12, 3, 2, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.conv = nn.Conv2d(12, 6, 3, 1, 1)
        with torch.no_grad():
            self.stem[0].bias[:4] -= 9.0
            if pool == "stem":
                self.stem[0].weight[4:6] *= 1e-5
                self.stem[0].bias[4:6] = 0.0
                self.conv.weight[:, 4:6] *= 50.0
        self.fc = nn.Linear(12 if pool == "amax" else 6, 4)

    def forward(self, x):
        y = self.stem(x)
        if self.pool == "amax":
            return self.fc(y.amax((2, 3)))
        y = nn.functional.max_pool2d(y, 3, 2, 1) if self.pool == "stem" else nn.functional.max_pool2d(y, 2)
        return self.fc(torch.relu(self.conv(y)).mean((2, 3)))


@pytest.mark.parametrize("pool", ["max_pool", "amax", "stem"])
def test_a_max_after_a_relu_target_exports_with_torchs_gradient(tmp_path, pool):
    """A max pool or amax after a ReLU target failed the export's gradient self-check (finite
    differences across the tied zeros see the tie broken: 4.4e-2 against 1.9e-2 allowed); it
    exports, and its maps equal the references on torch autograd's gradient (the first of tied
    elements for max_pool2d, equal shares for amax). ResNet's stem (`relu` before `maxpool`)
    failed it still: elements a hair above the zeros cross them at every step (0.126 against
    0.109 on a ResNet-like net); the check moves none within its step of a tied value."""
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    model = MaxAfterReLU(pool).eval()
    result = onnx_export.export(legacy_onnx(model, tmp_path / "m.onnx"), tmp_path / "cam.onnx",
                                ExportOptions(preset="unit", target_layer="stem"))
    assert all(d.ok for d in result.differences)
    activations = assert_heatmaps_equal_torch(result, model, model.stem, classes=(-1, 1, 3))
    assert (activations[..., :4] == 0).all()


class EinsumAttention(nn.Module):
    """A conv stem (the target), then two-head self-attention over its 8 x 8 tokens written with
    torch.einsum as transformers often are: the q, k, v projection (`bld,od->blo`), the scores
    (`bhqd,bhkd->bhqk`), the values (`bhqk,bhkd->bhqd`) and the classifier (`bd,od->bo`)."""

    def __init__(self, dim=8, heads=2, classes=4):
        super().__init__()
        self.heads = heads
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 4, 4), nn.ReLU())
        self.qkv = nn.Parameter(torch.randn(3 * dim, dim) * dim ** -0.5)
        self.fc = nn.Parameter(torch.randn(classes, dim) * dim ** -0.5)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        n, count, dim = tokens.shape
        q, k, v = torch.einsum("bld,od->blo", tokens, self.qkv).reshape(
            n, count, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attention = (torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.5).softmax(-1)
        y = torch.einsum("bhqk,bhkd->bhqd", attention, v).transpose(1, 2).reshape(n, count, dim)
        return torch.einsum("bd,od->bo", y.mean(1), self.fc)


@pytest.mark.parametrize("kind", ["legacy", "pt2"])
def test_a_target_before_einsum_attention_exports_with_torchs_gradient(tmp_path, kind):
    """torch.einsum between the target and the logits (ONNX Einsum, kept by both exporters)
    dropped the gradient methods ("no gradient rule for op Einsum"): the graph passes the
    self-check with Grad-CAM and HiResCAM, and they equal the references on torch autograd's
    gradient at the conv stem."""


    torch.manual_seed(0)
    model = EinsumAttention().eval()
    result = export_saved(model, kind, tmp_path, target_layer="stem")
    assert sum(n.op_type == "Einsum" for n in onnx.load(str(result.path)).graph.node) > 4
    assert {"gradcam", "hirescam"} <= set(result.info.heatmaps)
    assert result.info.feature_size == (8, 8) and all(d.ok for d in result.differences)
    assert_heatmaps_equal_torch(result, model, model.stem)


class LocalResponseNormNet(nn.Module):
    """AlexNet's order: conv, ReLU (the target), nn.LocalResponseNorm, then a conv and a linear
    layer. torch.onnx's TorchScript exporter writes its squeeze(1) as an If on Shape(x)[1] == 1,
    the size of an axis its Pad of computed pads hides from ONNX's shape inference."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.norm = nn.LocalResponseNorm(3, alpha=0.5, beta=0.75, k=2.0)
        self.conv = nn.Conv2d(8, 6, 3, 1, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(self.norm(self.stem(x)))).mean((2, 3)))


@pytest.mark.parametrize("kind", ["legacy", "pt2"])
def test_a_target_before_a_local_response_norm_exports_with_torchs_gradient(tmp_path, kind):
    """nn.LocalResponseNorm from the TorchScript exporter was refused ("If node '/norm/If'
    reads ... inside its subgraph"): the If, whose condition reads only shapes, is folded to
    its branch; from both exporters the graph passes the self-check and its Grad-CAM and
    HiResCAM equal the references on torch autograd's gradient at the stem."""


    torch.manual_seed(0)
    model = LocalResponseNormNet().eval()
    result = export_saved(model, kind, tmp_path, target_layer="stem")
    assert not any(n.op_type == "If" for n in onnx.load(str(result.path)).graph.node)
    assert {"gradcam", "hirescam"} <= set(result.info.heatmaps)
    assert all(d.ok for d in result.differences)
    assert_heatmaps_equal_torch(result, model, model.stem)


@pytest.mark.parametrize("axis, reduce, folded", [
    (1, None, "then"),  # Shape(x)[1] == 3: the channels, the same at any batch
    (2, None, "else"),  # Shape(x)[2] == 3: 8, never 3
    (0, None, None),  # the batch: 1 or not, the If stays
    (1, "ReduceSum", None),  # a value of x: the If stays
], ids=["channels", "height", "batch", "values"])
def test_an_if_is_folded_only_where_the_shapes_decide_it(axis, reduce, folded):
    from onnx import TensorProto, helper, numpy_helper

    from camface.export import onnx_model

    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_y"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                None)])

    reads = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "axis"], ["size"]),
             helper.make_node("Equal", ["size", "three"], ["condition"])]
    if reduce:
        reads = [helper.make_node(reduce, ["x"], ["total"], keepdims=0),
                 helper.make_node("Greater", ["total", "zero"], ["condition"])]
    graph = helper.make_graph(
        reads + [helper.make_node("If", ["condition"], ["y"], then_branch=branch("then", "Relu"),
                                  else_branch=branch("else", "Neg"))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(axis), "axis"), numpy_helper.from_array(np.array(3), "three"),
         numpy_helper.from_array(np.float32(0), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ops = [n.op_type for n in onnx_model.prepare(model).graph.node]
    assert ("If" in ops) == (folded is None)
    assert ("Relu" in ops, "Neg" in ops) == (folded == "then", folded == "else")


class AdaptivePooling(nn.Module):
    """A stride-4 stem (8 x 8, the target), AdaptiveAvgPool2d(3) (windows of 3 and 4 that
    overlap: torch.export writes GatherND for them), a linear layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 4, 4), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.fc = nn.Linear(54, 4)

    def forward(self, x):
        return self.fc(self.pool(self.stem(x)).flatten(1))


def test_a_target_before_an_adaptive_pooling_of_a_pt2_exports_with_torchs_gradient(tmp_path):
    """AdaptiveAvgPool2d whose output size does not divide the map's, from a .pt2, dropped the
    gradient methods ("no gradient rule for op GatherND"); its Grad-CAM and HiResCAM equal the
    references on torch autograd's gradient at the stem."""
    from onnx_helpers import save_program

    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    model = AdaptivePooling().eval()
    result = onnx_export.export(save_program(model, tmp_path / "m.pt2", size=SIZE),
                                tmp_path / "cam.onnx",
                                ExportOptions(preset="unit", target_layer="stem"))
    assert any(n.op_type == "GatherND" for n in onnx.load(str(result.path)).graph.node)
    assert {"gradcam", "hirescam"} <= set(result.info.heatmaps)
    assert all(d.ok for d in result.differences)
    assert_heatmaps_equal_torch(result, model, model.stem)


class ScoreHead(nn.Module):
    """features (conv-ReLU, 8x8) then a head: `squeezenet`, SqueezeNet's all-convolutional one
    (dropout, a 1x1 convolution to one channel per class, ReLU, global average pooling, flatten);
    `no-relu` without the ReLU (its class channel exactly CAM of `features`); `linear-after`, the same convolution and pooling then a linear
    layer (the pooled map's channels are features again, though as many as the classes)."""

    def __init__(self, kind, classes=5):
        super().__init__()
        self.kind = kind
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(12, classes, 1),
                                        nn.ReLU() if kind != "no-relu" else nn.Identity(),
                                        nn.AdaptiveAvgPool2d((1, 1)))
        self.fc = nn.Linear(classes, classes) if kind == "linear-after" else nn.Identity()

    def forward(self, x):
        return self.fc(torch.flatten(self.classifier(self.features(x)), 1))


@pytest.mark.parametrize("kind, default", [("squeezenet", "features"), ("no-relu", "classifier.1"),
                                           ("linear-after", "classifier.2")])
@pytest.mark.parametrize("exporter", ["legacy", "pt2"])
def test_an_all_convolutional_heads_default_target_is_the_map_its_class_convolution_reads(
        tmp_path, kind, default, exporter):
    """SqueezeNet's head is a convolution to one channel per class, pooled: the default target
    was that class-score map (`classifier.2`, its channels classes, not features), where
    pytorch-grad-cam's examples take `features`. The default is now the map the convolution
    reads, recorded with why, and its heatmaps are torch autograd's there; a head with a linear
    layer after the pooling, or none between the convolution and the pooling (its class channel
    is then exactly CAM of the map before, as the bundled emotion model's conv2d_7), keeps the
    pooled map."""
    from onnx_helpers import save_program

    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    model = ScoreHead(kind).eval()
    path = legacy_onnx(model, tmp_path / "m.onnx") if exporter == "legacy" else \
        save_program(model, tmp_path / "m.pt2", size=SIZE)
    result = onnx_export.export(path, tmp_path / "cam.onnx", ExportOptions(preset="unit"))
    assert all(d.ok for d in result.differences)
    assert result.info.target_layer == default
    assert (result.info.target_reason == onnx_export.REASON_CLASS_SCORES) == (default == "features")
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array([-1, 1, 3])
    got = run_graph(result.path, images, classes)
    heatmaps = ["gradcam", "hirescam", "layercam"]
    _, a, want = torch_heatmaps(model, model.get_submodule(default), images, classes, heatmaps)
    np.testing.assert_allclose(got["activations"], a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    scale = max(float(np.abs(want[method]).max()) for method in heatmaps)
    assert scale > 0  # the linear-after head's Grad-CAM may be all zero (a ReLU of a negative sum)
    for method in heatmaps:
        np.testing.assert_allclose(got[method], want[method], rtol=1e-4, atol=1e-5 * scale, err_msg=method)


@pytest.mark.parametrize("sized", ["expand", "range"])
def test_an_if_on_a_size_that_values_decide_is_not_folded(sized):
    """The condition reads the size of a tensor whose shape x's values decide (an Expand to a shape
    computed from them; a Range up to their sum): the walk to the graph's input read only shapes
    there, so ONNX Runtime's sizes on zero inputs folded the If to the branch of zeros, wrong
    for any other x. It stays."""
    from onnx import TensorProto, helper, numpy_helper

    from camface.export import onnx_model

    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_y"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                None)])

    total = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Cast", ["total"], ["count"], to=TensorProto.INT64)]
    if sized == "expand":  # [1 + count]: 1 on zeros
        total += [helper.make_node("Add", ["count", "one"], ["long"]),
                  helper.make_node("Unsqueeze", ["long", "axes"], ["dims"]),
                  helper.make_node("Expand", ["zero", "dims"], ["sized"])]
    else:  # range(0, count): empty on zeros
        total += [helper.make_node("Range", ["none", "count", "one"], ["sized"])]
    reads = total + [helper.make_node("Size", ["sized"], ["size"]),
                     helper.make_node("Equal", ["size", "one" if sized == "expand" else "none"], ["condition"])]
    graph = helper.make_graph(
        reads + [helper.make_node("If", ["condition"], ["y"], then_branch=branch("then", "Relu"),
                                  else_branch=branch("else", "Neg"))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array(0, np.int64), "none"),
         numpy_helper.from_array(np.array([0], np.int64), "axes"), numpy_helper.from_array(np.float32(0), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ops = [n.op_type for n in onnx_model.prepare(model).graph.node]
    assert "If" in ops and "Relu" not in ops and "Neg" not in ops
