"""Token targets of vision transformers (ViT, DeiT): tokens [N, T, C] laid on their patch grid
[N, h, w, C] (T = prefix + h * w, the grid from the patch embedding) and explained there. Inline
PyTorch models, exported by torch.onnx's legacy exporter at opset 17; every heatmap against the
method's numpy reference on torch autograd's gradient at the same tokens."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import onnxruntime as ort  # noqa: E402
from test_onnx_export_models import SIZE, ConvNeXt, Swin, TransformerBlock, ViT, legacy_onnx, run_graph  # noqa: E402
from torch import nn  # noqa: E402

from camface import methods  # noqa: E402
from camface.errors import ModelError  # noqa: E402
from camface.export import onnx_cam, onnx_model, onnx_verify  # noqa: E402

UNIT = ([1 / 255] * 3, [0.0] * 3)  # the `unit` preset: x / 255


class DeiT(ViT):
    """DeiT-like: a class and a distillation token before the patches, one head on each, the
    logits their mean (as DeiT at inference)."""

    def __init__(self, dim=16, classes=4):
        super().__init__(True, dim, classes)
        self.dist_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (SIZE // 8) ** 2 + 2, dim))
        self.head_dist = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        n = x.shape[0]
        x = torch.cat([self.class_token.expand(n, -1, -1), self.dist_token.expand(n, -1, -1), x], 1)
        x = self.norm(self.blocks(x + self.pos))
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


class PatchViT(nn.Module):
    """One block, `patch` x `patch` patches of a `size` x `size` (or (height, width)) image, a
    class token."""

    def __init__(self, size, patch, dim=8, classes=3):
        super().__init__()
        height, width = (size, size) if isinstance(size, int) else size
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (height // patch) * (width // patch) + 1, dim))
        self.blocks = nn.Sequential(TransformerBlock(dim, 1))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.blocks(x)[:, 0])


class TokenMixer(ViT):
    """Patch tokens mixed into 35 tokens by a linear layer over the token axis: no grid."""

    def __init__(self):
        super().__init__(False)
        self.mix = nn.Linear((SIZE // 8) ** 2, 35)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2)  # [N, C, 16]
        x = self.mix(x).transpose(1, 2)  # [N, 35, C]
        return self.head(self.blocks(x).mean(1))


def classifier_of(model, path, size=SIZE):
    if size == SIZE:
        path = legacy_onnx(model, path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            height, width = (size, size) if isinstance(size, int) else size
            torch.onnx.export(model.eval(), (torch.zeros(1, 3, height, width),), str(path),
                              dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["logits"],
                              dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return onnx_model.settle_shapes(onnx_model.describe(onnx_model.load(path)))


MODELS = {"vit": (lambda: ViT(True), "blocks/blocks.1/norm1", 1),
          "deit": (DeiT, "blocks/blocks.1/norm1", 2),
          "vit-mean-tokens": (lambda: ViT(False), "blocks/blocks.0", 0)}  # no norms: block input


@pytest.fixture(scope="module", params=sorted(MODELS))
def token_graph(request, tmp_path_factory):
    """(name, torch model, classifier with the grid, built CAM graph, self-check differences)."""
    make, _, _ = MODELS[request.param]
    torch.manual_seed(0)
    model = make().eval()
    classifier = classifier_of(model, tmp_path_factory.mktemp("tokens") / "m.onnx")
    tokens = onnx_model.default_token_target(classifier)
    grid = onnx_model.token_grid(classifier, tokens)
    gridded, target = onnx_model.with_token_grid(classifier, tokens, grid)
    built = onnx_cam.build(gridded, target, *UNIT)
    return request.param, model, classifier, tokens, grid, built, \
        onnx_verify.check(gridded, built, *UNIT)


def test_the_default_token_target_is_the_last_blocks_norm1_on_its_patch_grid(token_graph):
    name, _, classifier, tokens, grid, built, differences = token_graph
    _, module, prefix = MODELS[name]
    assert onnx_model.module_outputs(classifier.model)[module] == tokens
    assert grid == onnx_model.TokenGrid(prefix, 4, 4)
    assert built.layout == "NHWC" and built.feature_size == (4, 4)
    assert {m for m in methods.names() if not methods.get(m).reruns} - {"cam"} == set(built.heatmaps)
    assert all(d.ok for d in differences)
    # no gradient that nothing reads: the rules' weight gradients (A^T g) are left out
    graph = built.model.graph
    read = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    unread = [n.name for n in graph.node if n.name.startswith("camface/")
              and not any(o in read for o in n.output)]
    assert unread == [] and {i.name for i in graph.initializer} <= read


@pytest.mark.parametrize("batch", [1, 4, 32])
def test_token_heatmaps_equal_those_of_torch_autograd(token_graph, batch):
    name, model, _, _, grid, built, _ = token_graph
    stage = model.blocks[1].norm1 if name != "vit-mean-tokens" else model.blocks[0]
    images, classes, logits, seen = torch_backward(model, stage, batch)

    def on_grid(t):  # [N, T, C] -> the patches [N, 4, 4, C]
        return t[:, grid.prefix:].reshape(batch, 4, 4, -1).numpy()

    a, g = on_grid(seen.detach()), on_grid(seen.grad)
    session = ort.InferenceSession(built.model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"image": images, "class_index": classes})))
    assert_heatmaps(got, torch.softmax(logits, 1).detach().numpy(), a, g, built.heatmaps)


def torch_backward(model, stage, batch: int):
    """`batch` random uint8 crops and classes (-1: the top class) seeded by `batch`, the model's
    logits on them, and `stage`'s output with its gradient of the chosen classes' logits."""
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["a"] = out

    rng = np.random.default_rng(batch)
    images = rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
    classes = rng.integers(-1, 4, batch).astype(np.int64)
    hook = stage.register_forward_hook(keep)
    logits = model(torch.tensor(images.astype(np.float32) / 255).permute(0, 3, 1, 2))
    hook.remove()
    chosen = np.where(classes < 0, logits.detach().numpy().argmax(1), classes)
    logits[torch.arange(batch), torch.tensor(chosen)].sum().backward()
    return images, classes, logits, seen["a"]


def assert_heatmaps(got, probs, a, g, heatmaps):
    """The graph's outputs `got` against torch: probabilities, activations a [N, h, w, K] and
    every heatmap against its method's numpy reference on a and the gradient g."""
    np.testing.assert_allclose(got["probs"], probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["activations"], a, rtol=1e-4, atol=1e-5)
    batch = len(a)
    for method in heatmaps:
        expected, heatmap = methods.get(method).reference(a, g), got[method]
        assert heatmap.shape == a.shape[:3]
        if method.startswith("eigen"):  # crops with a first principal component only
            kept = separated(a if method == "eigencam" else a * g)
            assert kept.sum() >= batch // 2
            if not kept.any():
                continue
            expected, heatmap = expected[kept], heatmap[kept]
        np.testing.assert_allclose(heatmap, expected, rtol=1e-4,
                                   atol=1e-4 * float(np.abs(expected).max()), err_msg=method)


def separated(x, ratio=1.1):
    """Crops of x [N, h, w, K] whose centred matrix's first two singular values differ by more
    than `ratio`: elsewhere the Eigen maps' 64 power-iteration steps have not converged (LayerNorm
    outputs of 16 tokens have near-equal ones in a few crops in 32) and float32 rounding alone
    moves them by up to 10%."""
    rows = x.reshape(len(x), -1, x.shape[-1]).astype(np.float64)
    values = np.linalg.svd(rows - rows.mean(1, keepdims=True), compute_uv=False)
    return values[:, 0] > ratio * values[:, 1]


@pytest.mark.parametrize("size, patch, side", [(224, 16, 14), (224, 14, 16), (384, 16, 24),
                                               (384, 14, 27)])
def test_the_grid_is_the_input_size_over_the_patch_stride(tmp_path, size, patch, side):
    torch.manual_seed(0)
    classifier = classifier_of(PatchViT(size, patch), tmp_path / "m.onnx", size)
    tokens = onnx_model.default_token_target(classifier)
    assert onnx_model.shapes(classifier.model)[tokens][1:] == [side * side + 1, 8]
    assert onnx_model.token_grid(classifier, tokens) == onnx_model.TokenGrid(1, side, side)
    # the overrides, as --token-grid and --prefix-tokens give them
    assert onnx_model.token_grid(classifier, tokens, grid=(side, side), prefix=1) == \
        onnx_model.TokenGrid(1, side, side)
    with pytest.raises(ModelError, match=rf"are not 1 prefix tokens \+ a {side - 1}x{side + 1} "
                                         rf"grid \(given\): {side * side + 1} != 1 \+ "):
        onnx_model.token_grid(classifier, tokens, grid=(side - 1, side + 1), prefix=1)


def test_a_token_grid_against_the_patch_embedding_is_said(tmp_path, caplog):
    """--token-grid 6x4 on tokens whose patch embedding makes a 4x6 grid (the same number of
    patches) would lay rows out as columns, silently: a warning names both grids."""
    torch.manual_seed(0)
    classifier = classifier_of(PatchViT((32, 48), 8), tmp_path / "m.onnx", (32, 48))
    tokens = onnx_model.default_token_target(classifier)
    with caplog.at_level(logging.WARNING):
        assert onnx_model.token_grid(classifier, tokens) == onnx_model.TokenGrid(1, 4, 6)
        assert onnx_model.token_grid(classifier, tokens, grid=(4, 6)) == onnx_model.TokenGrid(1, 4, 6)
    assert "--token-grid" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert onnx_model.token_grid(classifier, tokens, grid=(6, 4)) == onnx_model.TokenGrid(1, 6, 4)
    assert "--token-grid 6x4 differs from the 4x6 grid of the patch embedding" in caplog.text


def test_tokens_that_form_no_grid_and_attention_are_refused(tmp_path):
    torch.manual_seed(0)
    classifier = classifier_of(TokenMixer(), tmp_path / "m.onnx")
    tokens = onnx_model.default_token_target(classifier)
    assert onnx_model.shapes(classifier.model)[tokens][1:] == [35, 16]
    with pytest.raises(ModelError, match=r"are not 19 prefix tokens \+ a 4x4 grid \(the patch "
                                         r"embedding '/patch_embed/Conv_output_0'\): 35 != 19 \+ "
                                         r"16; pass --token-grid HxW and --prefix-tokens N"):
        onnx_model.token_grid(classifier, tokens)
    attention = next(n.output[0] for n in classifier.model.graph.node if n.op_type == "Softmax")
    with pytest.raises(ModelError, match=r"\[N, 2, 35, 35\] is no token tensor \[N, tokens, "
                                         r"channels\]"):
        onnx_model.token_grid(classifier, attention)
    assert onnx_model.token_grid(classifier, tokens, grid=(5, 7)) == onnx_model.TokenGrid(0, 5, 7)


class LinearPatchViT(ViT):
    """Patches cut by reshapes and embedded by a linear layer (no convolution): its grid is
    found as the square that the tokens less a prefix make."""

    def __init__(self):
        super().__init__(True)
        self.embed = nn.Linear(8 * 8 * 3, 16)

    def forward(self, x):
        n = x.shape[0]
        x = x.reshape(n, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(n, 16, 8 * 8 * 3)
        x = torch.cat([self.class_token.expand(n, -1, -1), self.embed(x)], 1)
        return self.head(self.norm(self.blocks(x + self.pos))[:, 0])


def test_tokens_without_a_patch_embedding_conv_make_a_square(tmp_path):
    torch.manual_seed(0)
    classifier = classifier_of(LinearPatchViT(), tmp_path / "m.onnx")
    tokens = onnx_model.default_token_target(classifier)
    assert onnx_model.spatial_maps(classifier) == {}
    assert onnx_model.token_grid(classifier, tokens) == onnx_model.TokenGrid(1, 4, 4)
    assert onnx_model.token_grid(classifier, tokens, prefix=1) == onnx_model.TokenGrid(1, 4, 4)
    with pytest.raises(ModelError, match=r"form no grid that camface recognises \(no patch "
                                         r"embedding before them, no square\); pass --token-grid"):
        onnx_model.token_grid(classifier, tokens, prefix=2)


def test_a_vit_whose_patches_a_linear_layer_embeds_defaults_to_its_last_blocks_norm1(tmp_path):
    """lucidrains' ViT embeds its patches by a linear layer (no convolution, so no spatial map at
    all): the default target was refused ("no spatial feature map ... pass one with
    --target-layer"); it is the last block's norm1 on the square grid, as for a ViT with a
    patch-embedding convolution, and the maps pass the self-check."""
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    path = legacy_onnx(LinearPatchViT().eval(), tmp_path / "m.onnx")
    _, info, differences = onnx_export.build(onnx_model.load(path), ExportOptions(preset="unit"))
    assert (info.target_layer, info.token_grid, info.feature_size) == (
        "blocks.1.norm1", {"prefix": 1, "height": 4, "width": 4}, (4, 4))
    assert info.target_reason == onnx_export.REASON_VIT and "gradcam" in info.heatmaps
    assert differences and all(d.ok for d in differences)


def test_cam_is_offered_where_the_tokens_are_averaged_into_one_linear_layer(tmp_path):
    """The mean-token ViT at its last block's output: the head is the mean of the tokens and the
    linear layer, so CAM is a weighted sum of the channels on the grid (eq. 2); with a class
    token (the head reads one token) it is not."""
    torch.manual_seed(0)
    model = ViT(False).eval()
    classifier = classifier_of(model, tmp_path / "m.onnx")
    tokens = onnx_model.module_outputs(classifier.model)["blocks"]
    gridded, target = onnx_model.with_token_grid(classifier, tokens,
                                                 onnx_model.token_grid(classifier, tokens))
    built = onnx_cam.build(gridded, target, *UNIT)
    assert "cam" in built.heatmaps and built.cam_unavailable_reason == ""
    np.testing.assert_array_equal(built.class_weights, model.head.weight.detach().numpy())
    assert all(d.ok for d in onnx_verify.check(gridded, built, *UNIT))
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array([-1, 0, 1, 3], np.int64)
    session = ort.InferenceSession(built.model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"image": images, "class_index": classes})))
    with torch.no_grad():
        x = torch.tensor(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
        a = model.blocks(model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos)
        logits = model.head(a.mean(1)).numpy()
    chosen = np.where(classes < 0, logits.argmax(1), classes)
    cam = np.einsum("ntk,nk->nt", a.numpy(), model.head.weight.detach().numpy()[chosen])
    np.testing.assert_allclose(got["cam"], cam.reshape(4, 4, 4), rtol=1e-4, atol=1e-5)

    torch.manual_seed(0)
    classifier = classifier_of(ViT(True), tmp_path / "class_token.onnx")
    tokens = onnx_model.module_outputs(classifier.model)["norm"]
    gridded, target = onnx_model.with_token_grid(classifier, tokens,
                                                 onnx_model.token_grid(classifier, tokens))
    built = onnx_cam.build(gridded, target, *UNIT)
    assert "cam" not in built.heatmaps
    assert "CAM needs global average pooling right after the target" in \
        built.cam_unavailable_reason


@pytest.fixture(scope="module", params=[True, False], ids=["tokens", "nhwc-stage"])
def swin_graph(request, tmp_path_factory):
    """(torch model, export result) of the Swin-like model, its last block's norm2 reading
    tokens [N, h * w, C] (timm 1.0) or the NHWC stage [N, h, w, C], through `camface export`'s
    target choice."""
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    folder = tmp_path_factory.mktemp("swin")
    torch.manual_seed(0)
    model = Swin(tokens=request.param).eval()
    path = legacy_onnx(model, folder / "swin.onnx")
    return model, onnx_export.export(path, folder / "cam.onnx", ExportOptions(preset="unit"))


def test_a_swins_default_target_is_its_last_blocks_norm2(swin_graph):
    """pytorch-grad-cam's documented Swin target, layers[-1].blocks[-1].norm2: tokens without a
    prefix on the last stage's 4x4 grid (not the patch embedding's 8x8), or the NHWC stage
    itself; the reason recorded."""
    from camface.export.onnx_export import REASON_SWIN

    model, result = swin_graph
    info = result.info
    assert info.target_layer == "stage2.norm2" and info.target_reason == REASON_SWIN
    assert info.token_grid == ({"prefix": 0, "height": 4, "width": 4} if model.stage2.tokens else {})
    assert info.feature_size == (4, 4) and "cam" not in info.heatmaps  # the MLP lies before the head
    # the head also reads the residual stream beside norm2: Ablation-CAM's head passes read it
    # as the forward pass left it; Score-CAM runs the model
    assert {"scorecam", "ablationcam"} <= set(info.heatmaps)
    assert all(d.ok for d in result.differences)


def torch_ablation_cam(model, stage, images, classes, prefix):
    """Ablation-CAM (camface.methods.ablationcam) in torch: `stage`'s output (tokens [N, T, K]
    after `prefix` class tokens, or an NHWC stage) with channel k of its patch tokens set to 0 by
    a forward hook, every other tensor as the forward pass computes it; [N, h, w] on the
    square grid of the patches."""
    x = torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
    seen = {}
    hook = stage.register_forward_hook(lambda _m, _i, out: seen.__setitem__("a", out))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    rows = torch.arange(len(images))
    chosen = torch.where(torch.from_numpy(classes) < 0, logits.argmax(1), torch.from_numpy(classes))
    a = seen["a"].reshape(len(images), -1, seen["a"].shape[-1])[:, prefix:]  # [N, patches, K]
    scores = torch.zeros(a.shape[0], a.shape[2])
    for k in range(a.shape[2]):
        def ablate(_m, _i, out, k=k):
            out = out.clone()
            out.view(len(images), -1, out.shape[-1])[:, prefix:, k] = 0
            return out

        hook = stage.register_forward_hook(ablate)
        with torch.no_grad():
            scores[:, k] = model(x)[rows, chosen]
        hook.remove()
    y = logits[rows, chosen][:, None]
    weights = torch.where(y != 0, (y - scores) / y, torch.zeros_like(scores))
    side = int(round(a.shape[1] ** 0.5))
    return torch.relu((weights[:, None, :] * a).sum(-1)).reshape(len(images), side, side).numpy()


def test_swin_ablation_cam_equals_torch(swin_graph):
    """Swin's head reads the residual stream beside norm2: Ablation-CAM was left out; its head
    passes read the stream as the forward pass left it and the map equals torch's."""
    model, result = swin_graph
    images = np.random.default_rng(7).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array([-1, 1], np.int64)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(["ablationcam"], {"image": images, "class_index": classes})[0]
    want = torch_ablation_cam(model, model.stage2.norm2, images, classes, 0)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("batch", [1, 4, 32])
def test_swin_heatmaps_equal_those_of_torch_autograd(swin_graph, batch):
    model, result = swin_graph
    images, classes, logits, seen = torch_backward(model, model.stage2.norm2, batch)
    # tokens [N, 16, C] row by row, or the stage [N, 4, 4, C]: the same NHWC map
    a = seen.detach().reshape(batch, 4, 4, -1).numpy()
    g = seen.grad.reshape(batch, 4, 4, -1).numpy()
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"image": images, "class_index": classes})))
    # Score-CAM (in the graph since its head stopped keeping it out) against torch: test_score_cam_*
    assert_heatmaps(got, torch.softmax(logits, 1).detach().numpy(), a, g,
                    [h for h in result.info.heatmaps if not methods.get(h).reruns])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_self_check_judges_eigen_maps_of_layernorm_tokens_by_their_conditioning(tmp_path, seed):
    """At an untrained ViT's norm1 every token's channels sum to 0, so the Eigen maps' power
    iteration starts from rounding noise, and where a crop's first two singular values nearly tie
    rounding decides the map: the graph and the numpy reference disagreed by 3-20x the tolerance
    and the export's self-check refused these models. The check now widens a map's tolerance by
    what a few ulps of rounding do to its reference, and holds the well-conditioned maps tight."""
    torch.manual_seed(seed)
    classifier = classifier_of(ViT(True).eval(), tmp_path / "m.onnx")
    tokens = onnx_model.default_token_target(classifier)
    gridded, target = onnx_model.with_token_grid(classifier, tokens,
                                                 onnx_model.token_grid(classifier, tokens))
    built = onnx_cam.build(gridded, target, *UNIT)
    differences = {d.output: d for d in onnx_verify.check(gridded, built, *UNIT)}
    assert all(d.ok for d in differences.values())
    # How far rounding moves the Eigen map depends on the runtime's own rounding (1e-2 of its
    # maximum with ONNX Runtime's optimisations, 3e-4 without): what holds on any CPU is that
    # it gets a widening and far more of one than the well-conditioned gradient maps
    relative = {name: d.sensitivity / d.reference_max for name, d in differences.items() if d.reference_max}
    assert "for the map's conditioning" in str(differences["eigencam"])
    for name in ("gradcam", "hirescam", "layercam", "gradcamelementwise"):
        assert relative[name] < 1e-4, differences[name]
        assert relative["eigencam"] > 2 * relative[name], (differences["eigencam"], differences[name])


@pytest.mark.parametrize("name", ["vit", "deit"])
def test_score_cam_of_a_vit_with_class_tokens_equals_torch(tmp_path, name):
    """Score-CAM runs the whole model on masked images, so a head that also reads tensors beside
    the target (the class tokens, the residual stream around norm1) does not stop it; it used to
    be left out with Ablation-CAM. Ablation-CAM runs the head alone, from the target, reading
    those tensors as the crop's forward pass left them (as a forward hook replacing norm1's
    patch tokens does): it was left out ("computed from the graph's input") and equals torch's
    now (`torch_ablation_cam`)."""
    import onnx

    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    make, _, prefix = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    graph, info, differences = onnx_export.build(onnx.load(legacy_onnx(model, tmp_path / "m.onnx")),
                                                 ExportOptions(preset="unit"))
    assert {"scorecam", "ablationcam"} <= set(info.heatmaps)
    assert all(d.ok for d in differences)
    images = np.random.default_rng(5).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array([-1, 2], np.int64)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ablation = session.run(["ablationcam"], {"image": images, "class_index": classes})[0]
    want = torch_ablation_cam(model, model.blocks[1].norm1, images, classes, prefix)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(ablation, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    got = session.run(["scorecam"], {"image": images, "class_index": classes})[0]
    # pytorch-grad-cam 1.5.7's ScoreCAM at the tokens, on their 4x4 grid (its reshape_transform)
    x = torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
    seen = {}
    stage = model.blocks[1].norm1
    hook = stage.register_forward_hook(lambda _m, _i, out: seen.__setitem__("a", out))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    a = seen["a"][:, prefix:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)  # [N, K, 4, 4]
    chosen = torch.where(torch.from_numpy(classes) < 0, logits.argmax(1), torch.from_numpy(classes))
    with torch.no_grad():
        up = torch.nn.UpsamplingBilinear2d(size=(SIZE, SIZE))(a)
        low, high = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        masks = (up - low) / (high - low + 1e-8)
        scores = torch.stack([model(x[n:n + 1] * masks[n][:, None])[:, chosen[n]] for n in range(2)])
        want = torch.relu((torch.softmax(scores, 1)[:, :, None, None] * a).sum(1)).numpy()
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("exporter", ["legacy", "pt2"])
@pytest.mark.parametrize("layer", ["norm", "blocks.1"])
def test_a_token_target_whose_patches_the_logits_do_not_read_keeps_no_gradient_maps(tmp_path, caplog,
                                                                                    layer, exporter):
    """A ViT's head reads the class token alone: after the last attention (the final norm, the
    last block's output) no patch token reaches the logits, every gradient there is exactly 0,
    and the gradient maps were exported empty without a word (pytorch-grad-cam's FAQ: use
    blocks[-1].norm1). So was Ablation-CAM's (as torch's with a forward hook: zeroing a channel
    of the patch tokens changes no logit, every weight is 0), the warning naming the gradient
    maps only. They are left out with a warning naming the layer, each of them and the default;
    Eigen-CAM and Score-CAM (which masks the image) stay; asked for by name, the export is
    refused. Both torch.onnx's TorchScript exporter and a .pt2 (the zoo's ViT,
    benchmarks/export_zoo.py)."""
    import onnx
    from onnx_helpers import save_program

    from camface.export import onnx_export, torch_model
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    vit = ViT(True).eval()
    model = onnx.load(legacy_onnx(vit, tmp_path / "m.onnx")) if exporter == "legacy" else \
        torch_model.to_onnx(save_program(vit, tmp_path / "m.pt2", size=SIZE))
    with caplog.at_level(logging.WARNING):
        _, info, differences = onnx_export.build(model, ExportOptions(preset="unit", target_layer=layer))
    gradient_maps = {m for m in methods.names() if methods.GRADIENTS in methods.get(m).needs}
    assert not (gradient_maps | {"ablationcam"}) & set(info.heatmaps)
    assert {"eigencam", "scorecam"} <= set(info.heatmaps) and all(d.ok for d in differences)
    assert f"target {layer}: the logits read none of its patch tokens" in caplog.text
    assert "ablationcam (zeroing a channel of the patch tokens changes no logit)" in caplog.text
    assert "blocks.1.norm1 (the default)" in caplog.text
    for asked in ("gradcam", "ablationcam"):
        with pytest.raises(ModelError, match=rf"target {layer}: the logits read none of its patch "
                                             rf"tokens.*{asked}"):
            onnx_export.build(model, ExportOptions(preset="unit", target_layer=layer, heads=(asked,)))
    # at the default target, and at the first block's output, the gradient reaches the patches
    # through the last attention: every map stays, Ablation-CAM's not empty
    for target in (None, "blocks.0"):
        graph, info, _ = onnx_export.build(model, ExportOptions(preset="unit", target_layer=target))
        assert gradient_maps | {"ablationcam"} <= set(info.heatmaps)
        images = np.random.default_rng(5).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        assert np.abs(session.run(["ablationcam"], {"image": images,
                                                    "class_index": np.array([-1, 2])})[0]).max() > 0


class TriuHeadViT(PatchViT):
    """PatchViT whose head reads the tokens through torch.triu (ONNX Trilu, whose gradient rule
    the test below takes away: it needs an op the backward pass cannot cross)."""

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(torch.triu(self.blocks(x))[:, 0])


@pytest.mark.parametrize("heads", [None, ("probs", "activations", "ablationcam")], ids=["default", "ablationcam"])
def test_a_token_target_whose_head_has_no_gradient_rule_exports_the_gradient_free_maps(tmp_path, caplog, heads,
                                                                                       monkeypatch):
    """A ViT whose head holds an op without a gradient rule was exported with the maps that need
    no gradient; probing whether Ablation-CAM would be all zero there built a Grad-CAM graph,
    whose ModelError (no gradient rule) failed the whole export, --heads ablationcam too.
    Ablation-CAM stays (its map is not zero), with the other gradient-free maps."""
    import onnx

    from camface.export import onnx_export, onnx_grad
    from camface.export.exporter import ExportOptions

    monkeypatch.delitem(onnx_grad.RULES, "Trilu", raising=False)
    torch.manual_seed(0)
    model = onnx.load(legacy_onnx(TriuHeadViT(SIZE, 8), tmp_path / "m.onnx"))
    with caplog.at_level(logging.WARNING):
        graph, info, differences = onnx_export.build(model, ExportOptions(preset="unit", heads=heads))
    assert "ablationcam" in info.heatmaps and "gradcam" not in info.heatmaps and all(d.ok for d in differences)
    assert (heads is not None) or "no gradient rule for op Trilu" in caplog.text
    images = np.random.default_rng(5).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(["ablationcam"], {"image": images, "class_index": np.array([-1, 2])})[0]).max() > 0


class TokensAroundPatches(nn.Module):
    """Patches of a `height` x `width` image (8x8 each) with extra tokens on either side: a class
    token before them and `after` register tokens after (lucidrains' SimpleViT with registers
    packs [patches, registers]), or DINOv2's class token, registers, patches (`registers_first`).
    The head reads the class token (the last token when none comes first); one block, so the default target (its norm1) holds each
    patch's own token, unmixed."""

    def __init__(self, height=32, width=48, before=1, after=0, registers_first=0, dim=8):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.before = nn.Parameter(torch.randn(1, before, dim))
        self.after = nn.Parameter(torch.randn(1, after, dim))
        self.registers = nn.Parameter(torch.randn(1, registers_first, dim))
        self.blocks = nn.Sequential(TransformerBlock(dim, 1))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        n = x.shape[0]
        x = torch.cat([self.before.expand(n, -1, -1), x, self.after.expand(n, -1, -1)], 1)
        if self.registers.shape[1]:  # DINOv2: cat(x[:, :1], registers, x[:, 1:])
            x = torch.cat([x[:, :1], self.registers.expand(n, -1, -1), x[:, 1:]], 1)
        x = self.blocks(x)
        return self.head(x[:, 0] if self.before.shape[1] else x[:, -1])  # the class token


@pytest.mark.parametrize("before, after, registers_first, grid", [
    (1, 0, 0, (1, 4, 6, 0)), (0, 1, 0, (0, 4, 6, 1)), (1, 4, 0, (1, 4, 6, 4)),
    (1, 0, 4, (5, 4, 6, 0)), (1, 0, 8, (9, 4, 6, 0)), (1, 0, 16, (17, 4, 6, 0)), (1, 16, 0, (1, 4, 6, 16))],
    ids=["class-token", "class-token-after", "registers-after", "dinov2-registers", "uni2-registers",
         "16-registers", "16-registers-after"])
def test_each_patch_lands_on_its_own_grid_cell(tmp_path, before, after, registers_first, grid):
    """One lit 8x8 patch at row 1, column 3 of a 4x6 grid: the graph's activations (the tokens on
    the grid) differ from those of a dark image there and nowhere else, and equal torch's token
    of patch 1 * 6 + 3. Tokens after the patches (registers packed after them) were taken for
    prefix tokens: the grid started one token late and the map was shifted by a patch. More than
    8 extra tokens (UNI2-h's class token and 8 registers, 16 registers) were refused, even with
    --prefix-tokens."""
    torch.manual_seed(0)
    model = TokensAroundPatches(32, 48, before, after, registers_first).eval()
    classifier = classifier_of(model, tmp_path / "m.onnx", (32, 48))
    tokens = onnx_model.default_token_target(classifier)
    found = onnx_model.token_grid(classifier, tokens)
    assert (found.prefix, found.height, found.width, found.suffix) == grid
    assert found.to_metadata() == {"prefix": grid[0], "height": 4, "width": 6,
                                   **({"suffix": grid[3]} if grid[3] else {})}
    # --prefix-tokens and --token-grid as the model has them: the tokens after the patches stay
    assert onnx_model.token_grid(classifier, tokens, (4, 6), grid[0]) == found
    gridded, target = onnx_model.with_token_grid(classifier, tokens, found)
    built = onnx_cam.build(gridded, target, *UNIT)
    assert all(d.ok for d in onnx_verify.check(gridded, built, *UNIT))
    images = np.zeros((2, 32, 48, 3), np.uint8)
    images[1, 8:16, 24:32] = 255  # patch (1, 3)
    session = ort.InferenceSession(built.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["activations"], {"image": images, "class_index": np.array([-1, -1])})[0]
    moved = np.abs(got[1] - got[0]).max(-1)  # [4, 6]
    assert np.argwhere(moved > 1e-3 * moved.max()).tolist() == [[1, 3]]
    seen = {}
    hook = model.blocks[0].norm1.register_forward_hook(lambda _m, _i, out: seen.__setitem__("a", out))
    with torch.no_grad():
        model(torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2))
    hook.remove()
    patches = seen["a"][:, grid[0]:grid[0] + 24].numpy()
    np.testing.assert_allclose(got.reshape(2, 24, -1), patches, rtol=1e-4, atol=1e-5)


def test_tokens_after_the_patches_are_named_in_the_target_description():
    from camface.graph_spec import GraphInfo

    info = GraphInfo(labels=("a",), input_size=(32, 48), color_order="RGB",
                     target_layer="blocks.0.norm1", heatmaps=("gradcam",), feature_size=(4, 6),
                     token_grid={"prefix": 1, "height": 4, "width": 6, "suffix": 4})
    assert info.target_description == "blocks.0.norm1 (tokens: 1 + 4x6 + 4)"
    assert GraphInfo.from_metadata(info.to_metadata()).token_grid == info.token_grid


@pytest.mark.parametrize("size", [(24, 24), (48, 48), (32, 48)])
def test_an_input_size_the_position_embedding_does_not_fit_is_refused_in_one_line(tmp_path, size):
    """A ViT exported with a dynamic height and width keeps a position embedding of 1 + 4x4
    tokens: at another --input-size its patches no longer fit it. At 24x24 (9 patches, 17
    tokens) the 8 extra tokens were taken for prefix tokens and the export crashed inside ONNX
    Runtime (or, without the self-check, wrote a graph that cannot run); at 48x48 it advised
    '-19 prefix tokens'. The model is now run once at the size and refused, saying why."""
    import onnx

    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    path = tmp_path / "dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ViT(True).eval(), (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N"}})
    model = onnx.load(path)
    with pytest.raises(ModelError, match=rf"^{path}: --input-size {size[0]}x{size[1]}: the model does "
                                         r"not run at that size \(ONNX Runtime: .*Add.*\); .*position "
                                         r"embedding.*size it was trained on"):
        onnx_export.build(model, ExportOptions(preset="unit", input_size=size, verify=False), str(path))
    _, info, _ = onnx_export.build(model, ExportOptions(preset="unit", input_size=(SIZE, SIZE),
                                                       verify=False), str(path))
    assert info.token_grid == {"prefix": 1, "height": 4, "width": 4}


@pytest.mark.parametrize("grid", [None, (4, 4)])
def test_a_swins_window_tokens_are_refused_as_a_token_target(tmp_path, grid):
    """Swin's window attention works on [N * windows, window tokens, C]: its 16 tokens are one
    window's, and the batch axis holds 4 windows per image. The refusal advised --token-grid,
    which then laid each window out as an image and crashed the self-check inside ONNX
    Runtime; it now says they are windows and names a layer that holds the image's tokens."""
    torch.manual_seed(0)
    classifier = classifier_of(Swin().eval(), tmp_path / "m.onnx")
    windows = onnx_model.module_outputs(classifier.model)["stage1.attn"]
    assert onnx_model.shapes(classifier.model)[windows][1:] == [16, 16]
    with pytest.raises(ModelError, match=r"'/stage1/attn/proj/Add_output_0' \[.*, 16, 16\] hold 4 "
                                         r"rows per image.*windows.*norm2"):
        onnx_model.token_grid(classifier, windows, grid)
    tokens = onnx_model.module_outputs(classifier.model)["stage1.norm2"]
    assert onnx_model.token_grid(classifier, tokens) == onnx_model.TokenGrid(0, 8, 8)


class LinearPatchesOf(nn.Module):
    """A `height` x `width` image cut into 8x8 patches by reshapes, embedded by a linear layer
    (no convolution), a class token first."""

    def __init__(self, height, width, dim=8):
        super().__init__()
        self.rows, self.columns = height // 8, width // 8
        self.embed = nn.Linear(8 * 8 * 3, dim)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(TransformerBlock(dim, 1))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        n = x.shape[0]
        x = x.reshape(n, 3, self.rows, 8, self.columns, 8).permute(0, 2, 4, 3, 5, 1)
        x = self.embed(x.reshape(n, self.rows * self.columns, 8 * 8 * 3))
        return self.head(self.blocks(torch.cat([self.class_token.expand(n, -1, -1), x], 1))[:, 0])


def test_linear_patches_of_a_non_square_image_take_their_grid_from_the_input_size(tmp_path):
    """32x48 in 8x8 patches: 1 + 4x6 = 25 tokens, which a square would read as 0 + 5x5. With no
    patch-embedding convolution the grid is the one whose patches tile the input (a stride
    dividing both sides); it was refused ('form no grid'). Patch (1, 3) lands on its cell."""
    torch.manual_seed(0)
    model = LinearPatchesOf(32, 48).eval()
    classifier = classifier_of(model, tmp_path / "m.onnx", (32, 48))
    tokens = onnx_model.default_token_target(classifier)
    assert onnx_model.token_grid(classifier, tokens) == onnx_model.TokenGrid(1, 4, 6)
    gridded, target = onnx_model.with_token_grid(classifier, tokens, onnx_model.token_grid(classifier, tokens))
    built = onnx_cam.build(gridded, target, *UNIT)
    images = np.zeros((2, 32, 48, 3), np.uint8)
    images[1, 8:16, 24:32] = 255
    session = ort.InferenceSession(built.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["activations"], {"image": images, "class_index": np.array([-1, -1])})[0]
    moved = np.abs(got[1] - got[0]).max(-1)
    assert np.argwhere(moved > 1e-3 * moved.max()).tolist() == [[1, 3]]


def test_score_cam_on_a_non_square_token_grid_equals_torch(tmp_path):
    """Score-CAM's masks on a 4x6 grid upsampled to a 32x48 input (rows to the height, columns to
    the width), against pytorch-grad-cam 1.5.7's ScoreCAM transcribed as above."""
    import onnx

    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    model = TokensAroundPatches(32, 48).eval()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, 32, 48),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    graph, info, differences = onnx_export.build(onnx.load(path), ExportOptions(preset="unit"))
    assert "scorecam" in info.heatmaps and info.feature_size == (4, 6) and all(d.ok for d in differences)
    images = np.random.default_rng(5).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    classes = np.array([-1, 2], np.int64)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["scorecam"], {"image": images, "class_index": classes})[0]
    x = torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
    seen = {}
    hook = model.blocks[0].norm1.register_forward_hook(lambda _m, _i, out: seen.__setitem__("a", out))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    a = seen["a"][:, 1:].reshape(2, 4, 6, -1).permute(0, 3, 1, 2)  # [N, K, 4, 6]
    chosen = torch.where(torch.from_numpy(classes) < 0, logits.argmax(1), torch.from_numpy(classes))
    with torch.no_grad():
        up = torch.nn.UpsamplingBilinear2d(size=(32, 48))(a)
        low, high = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        masks = (up - low) / (high - low + 1e-8)
        scores = torch.stack([model(x[n:n + 1] * masks[n][:, None])[:, chosen[n]] for n in range(2)])
        want = torch.relu((torch.softmax(scores, 1)[:, :, None, None] * a).sum(1)).numpy()
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())


class ColumnMajorPatches(TokensAroundPatches):
    """Patch tokens taken column by column (x.transpose(2, 3).flatten(2)): token i is patch
    (i % 4, i // 4) of the 4x6 grid."""

    def forward(self, x):
        x = self.patch_embed(x).transpose(2, 3).flatten(2).transpose(1, 2)
        x = torch.cat([self.before.expand(x.shape[0], -1, -1), x], 1)
        return self.head(self.blocks(x)[:, 0])


def test_patch_tokens_taken_column_by_column_are_refused(tmp_path):
    """camface lays tokens out row by row, as ViT, DeiT and Swin flatten their patches; tokens
    flattened column by column were laid out transposed without a word."""
    torch.manual_seed(0)
    classifier = classifier_of(ColumnMajorPatches(32, 48).eval(), tmp_path / "m.onnx", (32, 48))
    tokens = onnx_model.default_token_target(classifier)
    with pytest.raises(ModelError, match=r"come column by column from the patch embedding "
                                         r"'/patch_embed/Conv_output_0'.*row by row"):
        onnx_model.token_grid(classifier, tokens)


class SdpaViT(ViT):
    """The ViT whose attention is torch's F.scaled_dot_product_attention (timm's fused_attn): the
    dynamo exporter writes it as Softmax and MatMuls up to opset 22, as one Attention op at 23."""

    def __init__(self):
        super().__init__(True)
        for block in self.blocks:
            block.attn.forward = self._sdpa(block.attn)

    @staticmethod
    def _sdpa(attn):
        def forward(x):
            n, tokens, dim = x.shape
            qkv = attn.qkv(x).reshape(n, tokens, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            y = nn.functional.scaled_dot_product_attention(*qkv.unbind(0))
            return attn.proj(y.transpose(1, 2).reshape(n, tokens, dim))
        return forward


def sdpa_onnx(model, path, opset):
    """`model` -> ONNX at `path` by torch.onnx's dynamo exporter at `opset`, dynamic batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=True,
                          opset_version=opset,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=32)},))
    return path


@pytest.mark.parametrize("opset", [18, 23])
def test_a_vit_with_sdpa_defaults_to_its_last_blocks_norm1_at_every_opset(tmp_path, opset):
    """At opset 23 torch's dynamo exporter writes F.scaled_dot_product_attention as ONNX's
    Attention op, which camface did not take for attention: the default target was the patch
    embedding conv (a spatial map, "the last ... before the logits"), not the tokens the last
    attention reads. It is the last block's norm1 on the patch grid at opset 23 as at 18, and
    the maps pass the self-check."""
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    model = onnx_model.load(sdpa_onnx(SdpaViT().eval(), tmp_path / "m.onnx", opset))
    assert sum(n.op_type == "Attention" for n in model.graph.node) == (2 if opset >= 23 else 0)
    _, info, differences = onnx_export.build(model, ExportOptions(preset="unit"))
    assert (info.target_layer, info.token_grid, info.feature_size) == (
        "blocks.1.norm1", {"prefix": 1, "height": 4, "width": 4}, (4, 4))
    assert info.target_reason == onnx_export.REASON_VIT and "gradcam" in info.heatmaps
    assert differences and all(d.ok for d in differences)


@pytest.mark.parametrize("opset", [18, 23])
def test_a_swin_with_sdpa_defaults_to_its_last_blocks_norm2_at_every_opset(tmp_path, opset):
    """The same for Swin: at opset 23 its default target was the final norm before the pooling
    (no attention seen, so no MLP tokens to prefer); it is the last block's norm2 as at 18."""
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    swin = Swin(tokens=True).eval()
    for stage in (swin.stage1, swin.stage2):
        stage.attn.forward = SdpaViT._sdpa(stage.attn)
    model = onnx_model.load(sdpa_onnx(swin, tmp_path / "m.onnx", opset))
    assert sum(n.op_type == "Attention" for n in model.graph.node) == (2 if opset >= 23 else 0)
    _, info, differences = onnx_export.build(model, ExportOptions(preset="unit"))
    assert (info.target_layer, info.feature_size) == ("stage2.norm2", (4, 4))
    assert info.target_reason == onnx_export.REASON_SWIN
    assert differences and all(d.ok for d in differences)


def dynamo_onnx(model, path, opset, optimize):
    """`model` -> ONNX at `path` by torch.onnx's dynamo exporter at `opset`, its optimiser on or
    off, dynamic batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=True,
                          opset_version=opset, optimize=optimize,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=32)},))
    return path


OPTIMISED = {"vit": (lambda: ViT(True), "blocks.1.norm1"), "deit": (DeiT, "blocks.1.norm1"),
             "swin": (lambda: Swin(tokens=True), "stage2.norm2"), "convnext": (ConvNeXt, "stages")}


# each model once, each opset twice (about 20 s a case: CI's time)
@pytest.mark.parametrize("name, opset", [("vit", 18), ("deit", 23), ("swin", 23), ("convnext", 18)])
def test_the_dynamo_exporters_optimiser_off_gives_the_target_and_maps_of_optimiser_on(tmp_path, name, opset):
    """torch's dynamo exporter with optimize=False writes nn.Linear on tokens as MatMul(x,
    Transpose(weight)): camface, which finds a ViT's qkv layer (and a Swin's MLP) by its constant
    weights, found none, and refused a ViT or DeiT ("passes through ... attention ... pass one
    with --target-layer") and took a Swin's final norm. Each weight's Transpose is now folded into
    the weight: the target, its grid and every map (each scaled by its largest value) are
    optimize=True's, at opset 18 (Softmax attention) and 23 (ONNX's Attention op)."""
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    make, layer = OPTIMISED[name]
    torch.manual_seed(0)
    model = make().eval()
    results = {}
    for optimize in (True, False):
        path = dynamo_onnx(model, tmp_path / f"m{optimize}.onnx", opset, optimize)
        results[optimize] = onnx_export.export(path, tmp_path / f"cam{optimize}.onnx",
                                               ExportOptions(preset="unit"))
    on, off = (results[o].info for o in (True, False))
    assert off.target_layer == on.target_layer == layer
    assert (off.target_reason, off.token_grid, off.feature_size, off.heatmaps) == \
        (on.target_reason, on.token_grid, on.feature_size, on.heatmaps)
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    classes = np.array([-1, 2, 0])
    got = {o: run_graph(results[o].path, images, classes) for o in (True, False)}
    np.testing.assert_allclose(got[False]["probs"], got[True]["probs"], rtol=1e-4, atol=1e-6)
    for heatmap in on.heatmaps:
        scale = float(np.abs(got[True][heatmap]).max())
        assert scale > 0, heatmap
        np.testing.assert_allclose(got[False][heatmap] / scale, got[True][heatmap] / scale,
                                   atol=1e-4, err_msg=heatmap)


def test_a_weights_transpose_is_folded_only_where_nothing_else_reads_the_weight():
    """The Transpose (and Cast after it) of a weight that only it reads becomes the weight, laid
    out: optimize=True's graph. A weight that another node reads too stays with its Transpose (the
    CAM graph's backward transposes the weights its forward reads: folding would store them
    twice), and the values ONNX Runtime computes stay."""
    from onnx import TensorProto, helper, numpy_helper

    from camface.export.onnx_fold import weight_layouts_folded

    rng = np.random.default_rng(0)
    alone, shared = rng.standard_normal((2, 3, 4)).astype(np.float16), rng.standard_normal((6, 6)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["alone"], ["alone_t"], perm=[2, 0, 1]),
             helper.make_node("Cast", ["alone_t"], ["alone_f"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["alone_f", "shape"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Transpose", ["shared"], ["shared_t"]),
             helper.make_node("MatMul", ["y", "shared_t"], ["z"]),
             helper.make_node("MatMul", ["z", "shared"], ["out"])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(alone, "alone"), numpy_helper.from_array(shared, "shared"),
         numpy_helper.from_array(np.array([4, 6], np.int64), "shape")]),
        opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    folded = weight_layouts_folded(model)
    weights = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    assert sorted(weights) == ["alone_f", "shape", "shared"]
    np.testing.assert_array_equal(weights["alone_f"], alone.transpose(2, 0, 1).astype(np.float32))
    assert [n.op_type for n in folded.graph.node] == ["Reshape", "MatMul", "Transpose", "MatMul", "MatMul"]
    x = rng.standard_normal((2, 4)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0] for m in (model, folded)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-6)


def test_a_double_weight_cast_to_float16_is_not_folded():
    """numpy casts a double to float16 with one rounding, ONNX Runtime through float32 (two): a
    value just past the middle of two float16s, as 1 + 2**-11 + 2**-40 (within float32's
    rounding of the middle), was 1.0 in the model and 1.001 once folded (5 of 100,000 normal
    draws times 10**-9..10**5 differed). A double cast to float32 is folded, the values ONNX
    Runtime computes the same (an overflow to inf too, without numpy's warning)."""
    import warnings

    from onnx import TensorProto, helper, numpy_helper

    from camface.export.onnx_fold import weight_layouts_folded

    def model(values, to):
        return helper.make_model(helper.make_graph(
            [helper.make_node("Cast", ["w"], ["c"], to=to), helper.make_node("Identity", ["c"], ["y"])], "g", [],
            [helper.make_tensor_value_info("y", to, None)], [numpy_helper.from_array(values, "w")]),
            opset_imports=[helper.make_opsetid("", 18)], ir_version=8)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]

    values = np.array([1 + 2**-11 + 2**-40, 0.5, -3.25, 1e39])
    half, single = model(values[:3], TensorProto.FLOAT16), model(values, TensorProto.FLOAT)
    assert [n.op_type for n in weight_layouts_folded(half).graph.node] == ["Cast", "Identity"]
    np.testing.assert_array_equal(run(weight_layouts_folded(half)), run(half))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = weight_layouts_folded(single)
    assert [n.op_type for n in folded.graph.node] == ["Identity"]
    np.testing.assert_array_equal(run(folded), run(single))
    assert np.isinf(run(folded)[3])


class EncoderViT(nn.Module):
    """A ViT as users write it with nn.TransformerEncoder: patch tokens [T, N, C]
    (flatten(2).permute(2, 0, 1)), a class token joined before them or none, the encoder with
    batch_first=False on [T, N, C], or batch_first=True on the same tokens transposed to
    [N, T, C]; the class token's logits or the mean token's."""

    def __init__(self, batch_first, class_token, dim=16, classes=4):
        super().__init__()
        self.batch_first, self.class_token = batch_first, class_token
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn((SIZE // 8) ** 2 + class_token, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).permute(2, 0, 1)
        if self.class_token:
            x = torch.cat([self.cls.expand(-1, x.shape[1], -1), x])
        x = x + self.pos
        if self.batch_first:
            x = self.encoder(x.transpose(0, 1))
            return self.head(x[:, 0] if self.class_token else x.mean(1))
        x = self.encoder(x)
        return self.head(x[0] if self.class_token else x.mean(0))


@pytest.mark.parametrize("kind, class_token", [("legacy", True), ("pt2", False)])
def test_a_transformer_encoder_on_tokens_first_defaults_to_the_target_of_batch_first(tmp_path, kind,
                                                                                     class_token):
    """nn.TransformerEncoder(batch_first=False) keeps tokens [T, N, C] between its layers: the
    default target was refused ("no spatial feature map ... a token target [N, T, C] needs ..."),
    and with batch_first=True it was the previous layer's MLP ReLU, found through the shape of
    the tokens that nn.MultiheadAttention reads (and through the weights the exporter shares
    between the encoder's equal copies). Both now take the tokens the last attention reads (the
    previous layer's output), [T, N, C] read through a transpose to [N, T, C]: the same target,
    grid, probabilities and maps (each scaled by its largest value) at 1 and 3 crops."""
    from onnx_helpers import save_program
    from test_onnx_export_models import run_graph

    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    tokens_first = EncoderViT(False, class_token).eval()
    batch_first = EncoderViT(True, class_token).eval()
    batch_first.load_state_dict(tokens_first.state_dict())
    results = {}
    for name, model in (("tokens_first", tokens_first), ("batch_first", batch_first)):
        folder = tmp_path / name
        folder.mkdir()
        path = legacy_onnx(model, folder / "m.onnx") if kind == "legacy" else \
            save_program(model, folder / "m.pt2", size=SIZE)
        results[name] = onnx_export.export(path, folder / "cam.onnx", ExportOptions(preset="unit"))
    first, batch = (results[n].info for n in ("tokens_first", "batch_first"))
    assert first.target_layer == batch.target_layer == "encoder.layers.0"
    assert first.token_grid == batch.token_grid == {"prefix": int(class_token), "height": 4, "width": 4}
    assert first.target_reason == onnx_export.REASON_VIT and first.heatmaps == batch.heatmaps
    assert "gradcam" in first.heatmaps
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    for crops in (1, 3):
        classes = np.array([-1, 2, 0][:crops])
        got = {n: run_graph(results[n].path, images[:crops], classes) for n in results}
        np.testing.assert_allclose(got["tokens_first"]["probs"], got["batch_first"]["probs"],
                                   rtol=1e-4, atol=1e-6)
        for heatmap in batch.heatmaps:
            scale = float(np.abs(got["batch_first"][heatmap]).max())
            assert scale > 0, heatmap
            np.testing.assert_allclose(got["tokens_first"][heatmap] / scale,
                                       got["batch_first"][heatmap] / scale, atol=1e-4,
                                       err_msg=f"{heatmap} at {crops} crop(s)")


def test_tokens_first_named_by_target_layer_are_laid_on_their_grid(tmp_path):
    """--target-layer naming tokens [T, N, C] (an nn.TransformerEncoder layer with
    batch_first=False) was refused ("is no token tensor [N, tokens, channels] with a fixed
    number of tokens"): they are transposed to [N, T, C] first, and the maps are the default's."""
    from onnx_helpers import save_program
    from test_onnx_export_models import run_graph

    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    path = save_program(EncoderViT(False, True).eval(), tmp_path / "m.pt2", size=SIZE)
    default = onnx_export.export(path, tmp_path / "default.onnx", ExportOptions(preset="unit"))
    named = onnx_export.export(path, tmp_path / "named.onnx",
                               ExportOptions(preset="unit", target_layer="encoder.layers.0"))
    assert named.info.token_grid == {"prefix": 1, "height": 4, "width": 4}
    assert named.info.heatmaps == default.info.heatmaps
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    got, want = (run_graph(r.path, images, np.array([-1, 2, 0])) for r in (named, default))
    for output in want:
        scale = max(float(np.abs(want[output]).max()), 1e-12)
        np.testing.assert_allclose(got[output] / scale, want[output] / scale, atol=1e-5, err_msg=output)


class EncoderViTWithRegister(EncoderViT):
    """EncoderViT with a class token before the patches and a register after them, joined
    along the token axis of [T, N, C] (batch_first=False) or of [N, T, C] (batch_first=True)."""

    def __init__(self, batch_first):
        super().__init__(batch_first, True)
        self.register = nn.Parameter(torch.randn(1, 1, 16))
        self.pos = nn.Parameter(torch.randn((SIZE // 8) ** 2 + 2, 1, 16))

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).permute(2, 0, 1)
        if self.batch_first:
            x = x.transpose(0, 1)
            n = x.shape[0]
            x = torch.cat([self.cls.expand(n, -1, -1), x, self.register.expand(n, -1, -1)], 1)
            return self.head(self.encoder(x + self.pos.transpose(0, 1))[:, 0])
        n = x.shape[1]
        x = torch.cat([self.cls.expand(-1, n, -1), x, self.register.expand(-1, n, -1)])
        return self.head(self.encoder(x + self.pos)[0])


def test_a_register_after_tokens_first_patches_is_a_suffix(tmp_path):
    """Tokens [T, N, C] joined as class token, patches, register along their first axis: the
    register was taken for a second prefix token (only a Concat along axis 1 was read), which
    shifted every patch by one grid cell. It is a suffix token, as where the same tokens are
    joined [N, T, C] along axis 1, and the maps are those."""
    from test_onnx_export_models import run_graph

    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    tokens_first = EncoderViTWithRegister(False).eval()
    batch_first = EncoderViTWithRegister(True).eval()
    batch_first.load_state_dict(tokens_first.state_dict())
    results = {}
    for name, model in (("tokens_first", tokens_first), ("batch_first", batch_first)):
        (tmp_path / name).mkdir()
        results[name] = onnx_export.export(legacy_onnx(model, tmp_path / name / "m.onnx"),
                                           tmp_path / name / "cam.onnx", ExportOptions(preset="unit"))
    first, batch = (results[n].info for n in ("tokens_first", "batch_first"))
    assert first.token_grid == batch.token_grid == {"prefix": 1, "height": 4, "width": 4, "suffix": 1}
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    got = {n: run_graph(results[n].path, images, np.array([-1, 2, 0])) for n in results}
    np.testing.assert_allclose(got["tokens_first"]["probs"], got["batch_first"]["probs"], rtol=1e-4, atol=1e-6)
    for heatmap in ("gradcam", "hirescam", "eigencam"):
        scale = float(np.abs(got["batch_first"][heatmap]).max())
        assert scale > 0, heatmap
        np.testing.assert_allclose(got["tokens_first"][heatmap] / scale, got["batch_first"][heatmap] / scale,
                                   atol=1e-4, err_msg=heatmap)


class ColumnMajorEncoderViT(EncoderViT):
    """EncoderViT (batch_first=False) whose patches are flattened column by column."""

    def forward(self, x):
        x = self.patch_embed(x).transpose(2, 3).flatten(2).permute(2, 0, 1)
        x = torch.cat([self.cls.expand(-1, x.shape[1], -1), x]) + self.pos
        return self.head(self.encoder(x)[0])


def test_tokens_first_patches_taken_column_by_column_are_refused(tmp_path):
    """Patch tokens [T, N, C] flattened column by column were laid out row by row without a
    word (the check read only patches [N, h * w, C]); they are refused as [N, T, C] ones are."""
    from camface.export import onnx_export
    from camface.export.exporter import ExportOptions

    torch.manual_seed(0)
    path = legacy_onnx(ColumnMajorEncoderViT(False, True).eval(), tmp_path / "m.onnx")
    with pytest.raises(ModelError, match=r"come column by column from the patch embedding "
                                         r"'/patch_embed/Conv_output_0'.*row by row"):
        onnx_export.export(path, tmp_path / "cam.onnx", ExportOptions(preset="unit"))
