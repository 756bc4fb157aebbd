""".pt2 programs saved at a fixed batch (torch.export.export without dynamic_shapes), which
camface exports again with a dynamic one: a Swin's window views [batch * windows, ...], a
.contiguous() torch dropped at a batch of 1, and models whose batch cannot be freed (one line,
exit 2)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
from torch import nn  # noqa: E402

from camface.cli import main  # noqa: E402
from test_onnx_export_models import SIZE, Swin, run_graph  # noqa: E402

EXPORT = ["--preset", "unit", "--heads", "gradcam", "--no-rank"]
IMAGES = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
CLASSES = np.array([-1, 1, 3], np.int64)


def saved(model, path, batch=None):
    """torch.export.save of `model` on [batch, 3, SIZE, SIZE] (None: a dynamic batch 1..32)."""
    example = (torch.zeros(batch or 2, 3, SIZE, SIZE),)
    shapes = None if batch else ({0: torch.export.Dim("batch", min=1, max=32)},)
    torch.export.save(torch.export.export(model, example, dynamic_shapes=shapes), str(path))
    return path


def exported(capsys, path, out):
    assert main(["export", str(path), "-o", str(out), *EXPORT]) == 0, capsys.readouterr().err
    return out


def eager_probs(model, images, output=None):
    """The model's probabilities on `images` (its output named `output` when it returns a dict)."""
    with torch.no_grad():
        logits = model(torch.tensor(images.astype(np.float32) / 255).permute(0, 3, 1, 2))
    return torch.softmax(logits[output] if output else logits, 1).numpy()


def assert_exports_as_the_model(model, capsys, path, out, output=None):
    """Exports the saved program `path` to `out` (--class-output `output` when the model returns a
    dict) and asserts the graph's probabilities on IMAGES are the model's."""
    options = ["--class-output", output] if output else []
    assert main(["export", str(path), "-o", str(out), *EXPORT, *options]) == 0, capsys.readouterr().err
    np.testing.assert_allclose(run_graph(out, IMAGES, CLASSES)["probs"], eager_probs(model, IMAGES, output),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_swin_saved_at_a_fixed_batch_exports_as_saved_with_a_dynamic_one(tmp_path, capsys, batch):
    """A Swin folds the batch into its windows ([batch * windows, tokens, C]): traced at a fixed
    batch its views read batch * windows as a number (4 at a batch of 1, 8 at 2), which the
    re-export kept: it failed inside torch at aten.view ("shape '[4, 16, 3, 2, 8]' is invalid
    for input of size 3072*s77") or on the batch constraint. The views read their input's
    leading size now: the graph takes 1 to 3 crops and its maps equal those of the same Swin
    saved with a dynamic batch."""
    torch.manual_seed(0)
    model = Swin(tokens=True).eval()
    fixed = exported(capsys, saved(model, tmp_path / "fixed.pt2", batch), tmp_path / "fixed.onnx")
    dynamic = exported(capsys, saved(model, tmp_path / "dynamic.pt2"), tmp_path / "dynamic.onnx")
    for n in (1, 3):
        got, expected = run_graph(fixed, IMAGES[:n], CLASSES[:n]), run_graph(dynamic, IMAGES[:n], CLASSES[:n])
        assert got.keys() == expected.keys()
        np.testing.assert_allclose(got["probs"], eager_probs(model, IMAGES[:n]), rtol=1e-4, atol=1e-6)
        for name in ("probs", "activations", "gradcam"):
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-4,
                                       atol=1e-6 * max(1.0, float(np.abs(expected[name]).max())), err_msg=name)
    assert got["activations"].shape == (3, 4, 4, 32) and np.abs(got["gradcam"]).max() > 0


class TokensFirst(nn.Module):
    """Tokens laid out [T, N, C] (nn.MultiheadAttention's layout) and mixed as rows by
    .contiguous().view(-1, C): at a batch of 1 the permuted tokens are contiguous already, and
    torch.export drops the .contiguous() (torch #186381)."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 8)
        self.mix, self.head = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.proj(self.embed(x).flatten(2).transpose(1, 2)).permute(1, 0, 2)
        rows = self.mix(tokens.contiguous().view(-1, 8))
        return self.head(rows.view(tokens.shape[0], -1, 8).permute(1, 0, 2).mean(1))


def test_a_contiguous_torch_dropped_at_a_batch_of_one_does_not_fail_the_re_export(tmp_path, capsys):
    """The view after the dropped .contiguous() read the traced layout: the re-export at a dynamic
    batch failed ("Cannot view a tensor with shape torch.Size([64, s77, 8]) and strides (8, 512, 1)
    as a tensor with shape (64*s77, 8)"). It is a reshape (a copy where the layout needs one)."""
    torch.manual_seed(0)
    model = TokensFirst().eval()
    program = torch.export.export(model, (torch.zeros(1, 3, SIZE, SIZE),))
    assert "aten.contiguous.default" not in {str(n.target) for n in program.graph.nodes}  # what torch does
    path = tmp_path / "fixed.pt2"
    torch.export.save(program, str(path))
    assert_exports_as_the_model(model, capsys, path, tmp_path / "cam.onnx")


class LogitsAndSigns(nn.Module):
    """Two outputs: the logits and a boolean tensor of their signs."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)

    def forward(self, x):
        logits = self.head(torch.relu(self.conv(x)).mean((2, 3)))
        return {"logits": logits, "positive": logits > 0}


def test_a_program_with_a_boolean_output_is_checked_as_freed(tmp_path, capsys):
    """The check that the freed program gives each crop what the saved one does subtracted its
    outputs as they came: a boolean one failed it (numpy has no boolean subtract) and the
    program was refused."""
    torch.manual_seed(0)
    model = LogitsAndSigns().eval()
    path = saved(model, tmp_path / "fixed.pt2", batch=1)
    assert_exports_as_the_model(model, capsys, path, tmp_path / "cam.onnx", "logits")


class BatchMean(nn.Module):
    """Subtracts the batch's mean feature (crops mixed: no batch but the traced one is right)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)

    def forward(self, x):
        features = self.conv(x).mean((2, 3))
        return self.head(features - features.mean(0, keepdim=True) + 1)


class BiasedBatchMean(nn.Module):
    """Logits with one biased by 1e4, less a tenth of the batch's mean logits (crops mixed by
    about 0.1 in each logit: the other logits are about 1)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)
        self.register_buffer("bias", torch.tensor([1e4, 0, 0, 0]))

    def forward(self, x):
        logits = self.head(self.conv(x).mean((2, 3)))
        return logits + self.bias - 0.1 * logits.mean(0, keepdim=True)


class ExpandedByItsBatch(nn.Module):
    """Adds a bias expanded to [C, batch] by the traced number to features [C, N] (the batch on
    their second axis, made by no view camface reads): at another batch the sum fails in torch."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)
        self.bias = nn.Parameter(torch.ones(8, 1))

    def forward(self, x):
        features = self.conv(x).mean((2, 3)).t() + self.bias.expand(8, 2)
        return self.head(features.t())


class GuardedView(nn.Module):
    """Tokens [T, N, C] plus positions [T, 1, C], as rows [T * N, C] viewed back as [T, N, C] by
    view(T, -1, C): exported with a dynamic batch, torch cannot prove the guard it makes there
    for every batch ("Not all values of batch ... satisfy the generated guard ...")."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 8, 8), nn.Linear(8, 4)
        self.pos = nn.Parameter(torch.randn((SIZE // 8) ** 2, 1, 8))

    def forward(self, x):
        tokens = self.conv(x).flatten(2).permute(2, 0, 1) + self.pos
        rows = tokens.reshape(-1, 8)
        return self.head(rows.view(len(self.pos), -1, 8).mean(0))


@pytest.mark.parametrize("model, named", [
    (BatchMean, "a batch of 2 crops does not give each crop what the batch of 1 gives it"),
    (BiasedBatchMean, "a batch of 2 crops does not give each crop what the batch of 1 gives it"),
    (ExpandedByItsBatch, "camface could not trace back to the input's batch, so torch fixed the batch at 2: "
                         "Constraints violated (batch)); export it with a dynamic batch: ep = torch.export.export("),
    (GuardedView, "Constraints violated (batch): Not all values of batch = "),
    (GuardedView, "); torch.export cannot give the model as written a dynamic batch either (TORCH_LOGS=")])
def test_a_program_whose_batch_cannot_be_freed_is_refused_in_one_line(tmp_path, model, named):
    """A model that mixes its crops ran at any batch once freed, and its graph explained each crop
    with the others' mean: the freed program is checked against the saved one (a batch of 2
    against 1 crop at a time). Sizes camface cannot free fail in torch, which logged the failing
    op's traceback to stderr before camface's line (30 'E1205 ... fake_tensor.py' lines; its
    handler writes to the process's stderr, hence a subprocess). torch's "Constraints violated
    (batch)! For more information, run with TORCH_LOGS=..." is said as what it means here: a
    size camface did not trace back where torch says it specialized the batch to a constant;
    torch's own reason where it could not prove a guard it made (it was said to be such a size,
    though the model as written exports with no dynamic batch at all). Each output element is
    judged against its own scale: with one logit biased by 1e4 the others could differ by 10
    (a thousandth of the output's largest) and crops mixed by 0.1 passed."""
    torch.manual_seed(0)
    batch = 1 if model in (BatchMean, BiasedBatchMean) else 2
    path = saved(model().eval(), tmp_path / "fixed.pt2", batch=batch)
    done = subprocess.run([sys.executable, "-m", "camface", "export", str(path), "-o", str(tmp_path / "cam.onnx"),
                           *EXPORT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"camface: error: {path}: the program was exported with a fixed batch of {batch} "
                                  "and does not run with a dynamic one"), done.stderr
    assert named in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert ("could not trace back" in done.stderr) == (model is ExpandedByItsBatch), done.stderr
    assert not (tmp_path / "cam.onnx").exists()


@pytest.mark.parametrize("batch", [32, 40])
def test_a_program_saved_at_32_crops_or_more_is_freed(tmp_path, capsys, batch):
    """The check that the freed program gives each crop what the saved one does ran it on the
    saved batch + 1 crops, over the 32 its dynamic batch takes: a .pt2 saved at a batch of 32
    (or more) was refused ("Expected input at *args[0].shape[0] to be <= 32, but got 33"). It
    runs on 31 crops there, against the first rows of the saved batch."""
    torch.manual_seed(0)
    model = LogitsAndSigns().eval()
    path = saved(model, tmp_path / "fixed.pt2", batch=batch)
    assert_exports_as_the_model(model, capsys, path, tmp_path / "cam.onnx", "logits")


def test_a_contiguous_dropped_in_a_model_with_an_in_place_relu_does_not_fail_the_re_export(tmp_path, capsys):
    """Any op that changed a tensor in place (an nn.ReLU(inplace=True), in most torchvision
    models) kept every view a view, so the view after the dropped .contiguous() failed the
    re-export as before ("Cannot view a tensor with shape ..."). Only views that alias a tensor
    changed in place stay views now; the others are reshapes."""
    from camface.export.torch_model import _views_as_reshapes

    torch.manual_seed(0)
    model = TokensFirst().eval()
    model.embed = nn.Sequential(model.embed, nn.ReLU(inplace=True))
    program = torch.export.export(model, (torch.zeros(1, 3, SIZE, SIZE),))
    path = tmp_path / "fixed.pt2"
    torch.export.save(program, str(path))
    assert_exports_as_the_model(model, capsys, path, tmp_path / "cam.onnx")
    module = program.module(check_guards=False)
    _views_as_reshapes(module)
    assert torch.ops.aten.view.default not in {n.target for n in module.graph.nodes}

    class ThroughAView(nn.Module):
        def forward(self, x):
            h = x * 2
            h.view(-1).relu_()  # changes h through its view: a copy would not
            return h.sum((1, 2, 3))

    aliased = torch.export.export(ThroughAView(), (torch.zeros(1, 3, 4, 4),)).module()
    _views_as_reshapes(aliased)
    assert [str(n.target) for n in aliased.graph.nodes if "view" in str(n.target) or "reshape" in str(n.target)] \
        == ["aten.view.default"]
    crops = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(aliased(crops), (2 * crops).relu().sum((1, 2, 3)))


class TokensFirstViT(nn.Module):
    """A ViT as users write it with nn.TransformerEncoder(batch_first=False): patch tokens
    [T, N, C], a class token expanded to [1, N, C] and joined before them, the encoder's
    attention ([T, N * heads, dim] views, rows [T * N, C]), the class token's logits;
    batch_first: tokens [N, T, C] (nn.MultiheadAttention lays them out [T, N, C] inside)."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, 16, 8, 8)
        self.cls, self.pos = nn.Parameter(torch.randn(1, 1, 16)), nn.Parameter(torch.randn(17, 1, 16))
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).permute(2, 0, 1)
        tokens = torch.cat([self.cls.expand(-1, tokens.shape[1], -1), tokens]) + self.pos
        if self.batch_first:
            return self.head(self.encoder(tokens.transpose(0, 1))[:, 0])
        return self.head(self.encoder(tokens)[0])


@pytest.mark.parametrize("batch, batch_first", [(1, False), (2, False), (1, True)])
def test_a_transformer_encoder_saved_at_a_fixed_batch_exports(tmp_path, capsys, batch, batch_first):
    """nn.MultiheadAttention lays tokens out [T, N, C] and views them by their traced sizes
    ([T, N * heads, dim], rows [T * N, C]); only a batch on the first axis was freed, so such a
    program was refused ("Constraints violated (batch)", or "a and b must have same reduction
    dim" at a batch of 1), with batch_first=True too. Each view's batch is found where its
    elements lie now: the graph takes 1 to 3 crops and its maps equal those of the same model
    saved with a dynamic batch."""
    torch.manual_seed(0)
    model = TokensFirstViT(batch_first).eval()
    options = [*EXPORT, "--target-layer", "embed"]
    paths = saved(model, tmp_path / "fixed.pt2", batch), saved(model, tmp_path / "dynamic.pt2")
    for path in paths:
        assert main(["export", str(path), "-o", str(path.with_suffix(".onnx")), *options]) == 0, \
            capsys.readouterr().err
    for n in (1, 3):
        got, expected = (run_graph(p.with_suffix(".onnx"), IMAGES[:n], CLASSES[:n]) for p in paths)
        np.testing.assert_allclose(got["probs"], eager_probs(model, IMAGES[:n]), rtol=1e-4, atol=1e-6)
        for name in ("probs", "gradcam"):
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-4,
                                       atol=1e-6 * max(1.0, float(np.abs(expected[name]).max())), err_msg=name)
    assert np.abs(got["gradcam"]).max() > 0


class RowsOfTokensFirst(nn.Module):
    """Tokens [T, N, C] as rows [T * N, C] by their traced sizes (the batch inside their first
    axis), mixed by a linear layer and viewed back by T."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).permute(2, 0, 1)
        rows = self.mix(tokens.reshape(tokens.shape[0] * tokens.shape[1], -1))
        return self.head(rows.view(tokens.shape[0], -1, 8).mean(0))


def test_rows_of_tokens_first_are_freed(tmp_path, capsys):
    """Tokens [T, N, C] as rows [T * N, C] by their traced sizes: the batch there is inside the
    first axis, after T (refused before: "a and b must have same reduction dim")."""
    torch.manual_seed(0)
    model = RowsOfTokensFirst().eval()
    assert_exports_as_the_model(model, capsys, saved(model, tmp_path / "fixed.pt2", batch=1), tmp_path / "cam.onnx")


class Branches(nn.Module):
    """A torch.cond on a parameter whose branches view features [N, 8] by the traced batch."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        return torch.cond(self.head.bias.sum() > 0,
                          lambda f: self.head(f.flatten(2).mean(2).view(f.shape[0], 8)),
                          lambda f: self.head(f.amax((2, 3)).view(f.shape[0], 8)), (features,))


@pytest.mark.parametrize("positive", [True, False])
def test_views_inside_torch_cond_branches_are_freed(tmp_path, capsys, positive):
    """The branches of a torch.cond are subgraphs camface did not read: their views kept the
    traced batch ("shape '[1, 8]' is invalid for input of size 8*s77"). They are freed as the
    program's own graph is (and are reshapes): each branch gives what the model does."""
    torch.manual_seed(0)
    model = Branches().eval()
    with torch.no_grad():
        model.head.bias.abs_().mul_(1 if positive else -1)
    assert_exports_as_the_model(model, capsys, saved(model, tmp_path / "fixed.pt2", batch=1), tmp_path / "cam.onnx")


class LogitsByClass(nn.Module):
    """The logits, the same transposed [classes, N] under another name, and the features' tokens
    as rows [N * T, C]."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)

    def forward(self, x):
        features = self.conv(x)
        logits = self.head(torch.relu(features).mean((2, 3)))
        return {"logits": logits, "by_class": logits.t(), "rows": features.flatten(2).transpose(1, 2).reshape(-1, 8)}


def test_an_output_with_the_batch_on_another_axis_is_checked_on_that_axis(tmp_path, capsys):
    """The check that the freed program gives each crop what the saved one does joined every
    output's rows on its first axis: an output [classes, N] beside the logits was taken as a
    wrong batch ("up to inf apart") and the program refused, as was one with tokens as rows
    [N * T, C] (whose first axis grows by T a crop). The batch is the axis whose size follows
    the crops, a number of rows each."""
    torch.manual_seed(0)
    model = LogitsByClass().eval()
    path = saved(model, tmp_path / "fixed.pt2", batch=2)
    assert_exports_as_the_model(model, capsys, path, tmp_path / "cam.onnx", "logits")


class TransposedLogits(nn.Module):
    """Logits returned [classes, N]."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3))).t()


@pytest.mark.parametrize("batch", [1, None])
def test_logits_with_the_batch_last_are_refused_saying_so(tmp_path, capsys, batch):
    """Logits [classes, N] saved at a fixed batch were refused by the check of the freed program
    ("a batch of 2 crops does not give each crop what the batch of 1 gives it (up to inf
    apart)"), which was not what is wrong. Saved at a fixed or a dynamic batch, the error names
    the logits' shape and what to do."""
    path = saved(TransposedLogits().eval(), tmp_path / "model.pt2", batch)
    assert main(["export", str(path), "-o", str(tmp_path / "cam.onnx"), *EXPORT]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"camface: error: {path}: the logits 't' must be [N, classes] (they are [4, "), err
    assert err.strip().endswith("; return them with the batch first, not transposed, or name another output "
                                "with --class-output)"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "cam.onnx").exists()


class TwoChannels(nn.Module):
    """Features with as many channels (2) as the batch the program is saved at, passed through
    an op that adds an axis of its own (stack on dim 1, unfold's last) or a .t(), then viewed by
    the traced batch."""

    def __init__(self, op):
        super().__init__()
        self.op, self.conv, self.head = op, nn.Conv2d(3, 2, 8, 8), nn.Linear(2 if op == "t" else 8, 4)

    def forward(self, x):
        features = torch.relu(self.conv(x)).flatten(2)  # [N, 2, 16]
        if self.op == "stack":
            stacked = torch.stack([features.mean(2), features.amax(2)], 1)  # [N, 2, 2]
            return self.head(stacked.view(stacked.shape[0], -1).repeat(1, 2))
        if self.op == "unfold":
            windows = features.unfold(2, 4, 4)  # [N, 2, 4, 4]
            return self.head(windows.mean(3).reshape(windows.shape[0], -1))
        by_channel = features.mean(2).t()  # [2, N]
        return self.head(by_channel.reshape(2, by_channel.shape[1], 1).sum(2).t())


@pytest.mark.parametrize("op", ["stack", "unfold", "t"])
def test_an_op_that_moves_the_batch_when_channels_equal_the_batch_is_freed(tmp_path, capsys, op):
    """The batch was followed through an op that adds axes as if it broadcast (new axes in
    front): stack(dim=1) and unfold of features [2, 2, 16] saved at a batch of 2 put it on the
    channels, of size 2 too, and the view by the traced batch kept its 2 (refused, 'Constraints
    violated (batch)'; accepted before the batch was followed off the first axis); .t() kept
    it on the first axis, so the view of [C, N] read the channels as the batch. Freed, the
    graph gives what the model does at 3 crops."""
    torch.manual_seed(0)
    model = TwoChannels(op).eval()
    assert_exports_as_the_model(model, capsys, saved(model, tmp_path / "fixed.pt2", batch=2), tmp_path / "cam.onnx")


class NoRegisters(nn.Module):
    """A ViT's register tokens tokens[:, 1:1 + registers] viewed as heads, with no registers:
    an empty [N, 0, 2, 4]."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Conv2d(3, 8, 8, 8), nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # [N, 16, 8]
        registers = tokens[:, 1:1].reshape(tokens.shape[0], 0, 2, 4)
        return self.head(tokens.mean(1) + registers.sum((1, 2, 3)).unsqueeze(1))


@pytest.mark.parametrize("batch", [1, 2])
def test_an_empty_view_in_a_program_saved_at_a_fixed_batch_is_freed(batch):
    """Following the batch through a view of an empty tensor divided by its size 0: the export
    ended in a ZeroDivisionError traceback. An empty view is left to the first-axis rule, as
    before the batch was followed: freed, the program gives what the model does at 3 crops.
    (ONNX cannot reshape an empty tensor by a dynamic batch, so this stops short of the CLI.)"""
    from camface.export import pt2_batch

    torch.manual_seed(0)
    model = NoRegisters().eval()
    program = torch.export.export(model, (torch.zeros(batch, 3, SIZE, SIZE),))
    freed = pt2_batch.free(program.module(check_guards=False), batch)
    again = torch.export.export(freed, (torch.zeros(2, 3, SIZE, SIZE),),
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=32)},))
    crops = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(again.module()(crops), model(crops))


def test_a_graph_that_cannot_be_freed_for_any_reason_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """pt2_batch.free ran before camface's one-line errors: anything it raised (a
    ZeroDivisionError on an empty view) ended the export in a traceback."""
    from camface.export import pt2_batch

    def fails(module, batch, ties=None):
        raise ZeroDivisionError("integer modulo by zero")

    monkeypatch.setattr(pt2_batch, "free", fails)
    path = saved(NoRegisters().eval(), tmp_path / "fixed.pt2", 2)
    assert main(["export", str(path), "-o", str(tmp_path / "cam.onnx"), *EXPORT]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"camface: error: {path}: the program was exported with a fixed batch of 2 and does not "
                          "run with a dynamic one (camface graphs take 1 to 32 crops at once: integer modulo by "
                          "zero); export it with a dynamic batch"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "cam.onnx").exists()


class ExpandedPair(nn.Module):
    """Features f [N, C] expanded to a pair [2, N, C] and viewed as rows [2, N * C]: at a batch of
    1, [2, 1, C] as [2, C] holds the batch on either axis (it is on the second, the -1's)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)
        self.weights = nn.Parameter(torch.randn(2, 1))

    def forward(self, x):
        features = torch.relu(self.conv(x)).mean((2, 3))
        pair = features.unsqueeze(0).expand(2, -1, -1).reshape(2, -1)
        return self.head((pair * self.weights).reshape(2, -1, 8).sum(0))


def traces(monkeypatch) -> list:
    """The calls torch.export.export gets from here on, one entry each."""
    calls, export = [], torch.export.export

    def counted(*args, **kwargs):
        calls.append(args[0])
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counted)
    return calls


def test_a_view_whose_batch_axis_is_ambiguous_at_a_batch_of_one_is_freed(tmp_path, capsys, monkeypatch):
    """Saved at a batch of 1, the pair [2, 1, C] viewed as [2, C] holds the batch on either axis;
    the tie-break took the first, made the view (2 * N, -1), and the program was refused ("The
    size of tensor a (2*s77) must match the size of tensor b (2)"; accepted at 7aad2f0, which
    left the -1 alone). Each candidate of such a view is tried, the first whose freed program
    gives each crop what the saved one does kept: the graph gives the model's probabilities.
    The candidates are tried on the freed graph as it is: the program is traced once."""
    torch.manual_seed(0)
    model = ExpandedPair().eval()
    path = saved(model, tmp_path / "fixed.pt2", batch=1)
    calls = traces(monkeypatch)
    assert_exports_as_the_model(model, capsys, path, tmp_path / "cam.onnx")
    assert len(calls) == 1


class TwoPairs(nn.Module):
    """ExpandedPair's pair [2, N, C] as rows [2, N * C], then the same of its sum as a triple
    [3, N * C]: at a batch of 1 both views hold the batch on either axis, the second each time."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)
        self.pair, self.triple = nn.Parameter(torch.randn(2, 1)), nn.Parameter(torch.randn(3, 1))

    def forward(self, x):
        features = torch.relu(self.conv(x)).mean((2, 3))
        for weights in (self.pair, self.triple):
            rows = features.unsqueeze(0).expand(len(weights), -1, -1).reshape(len(weights), -1)
            features = (rows * weights).reshape(len(weights), -1, 8).sum(0)
        return self.head(features)


def test_two_views_whose_batch_axis_is_ambiguous_at_a_batch_of_one_are_freed(tmp_path, capsys):
    """Two views that both hold the batch on their tie-break's other axis: each other choice was
    tried alone (the pair's or the triple's), each failed on the other view, and the program was
    refused with the first error ("The size of tensor a (2*s77) must match the size of tensor b
    (2)"). A choice that moves the failure further on is kept and the next view's tried: the
    graph gives the model's probabilities at 1, 2 and 3 crops."""
    torch.manual_seed(0)
    model = TwoPairs().eval()
    out = exported(capsys, saved(model, tmp_path / "fixed.pt2", batch=1), tmp_path / "cam.onnx")
    for n in (1, 2, 3):
        np.testing.assert_allclose(run_graph(out, IMAGES[:n], CLASSES[:n])["probs"], eager_probs(model, IMAGES[:n]),
                                   rtol=1e-4, atol=1e-6)


class WideRows(nn.Module):
    """Features f [N, C] repeated twice along a new axis and viewed as rows [N, 2 * C], twice (at
    a batch of 1, [1, 2, C] as [1, 2 * C] holds the batch on either axis; the tie-break's first
    is right), then the batch's mean subtracted (crops mixed) or the logits split into rows of
    one crop each by the traced batch (split sizes [1]): refused on either axis."""

    def __init__(self, then):
        super().__init__()
        self.then, self.conv, self.head = then, nn.Conv2d(3, 8, 4, 4), nn.Linear(32, 4)

    def forward(self, x):
        rows = torch.relu(self.conv(x)).mean((2, 3))
        for _ in range(2):
            rows = rows.unsqueeze(1).expand(-1, 2, -1).reshape(rows.shape[0], -1)
        logits = self.head(rows)
        if self.then == "mean":
            return logits - logits.mean(0, keepdim=True)
        return torch.cat(logits.split([1], 0)) * 2


@pytest.mark.parametrize("then, why", [
    ("mean", "a batch of 2 crops does not give each crop what the batch of 1 gives it (up to "),
    ("split", "Split sizes add up to 1 but got the tensor's size of s")])
def test_a_program_with_an_ambiguous_view_refused_for_another_reason_is_traced_once(
        tmp_path, capsys, monkeypatch, then, why):
    """A program saved at a batch of 1 with views whose batch axis is ambiguous was traced again
    with each other candidate of each view (3 traces here, up to 7: 2.9 s for a small encoder)
    before it was refused for a reason no candidate changes. The candidates are tried on the
    freed graph, untraced: the program is traced once and refused as before."""
    torch.manual_seed(0)
    path = saved(WideRows(then).eval(), tmp_path / "fixed.pt2", batch=1)
    calls = traces(monkeypatch)
    assert main(["export", str(path), "-o", str(tmp_path / "cam.onnx"), *EXPORT]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"camface: error: {path}: the program was exported with a fixed batch of 1 and does not "
                          f"run with a dynamic one (camface graphs take 1 to 32 crops at once: {why}"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "cam.onnx").exists()
    assert len(calls) == 1


class TokenNorms(nn.Module):
    """Tokens [T, N, C] reduced to their norms [T, N] over C (p first, then the dims: aten.norm's
    ScalarOpt_dim as an older torch recorded x.norm(1, -1), or linalg_vector_norm as torch 2.13
    does), viewed as [T, N, 1] by their traced sizes."""

    def __init__(self, op):
        super().__init__()
        self.op, self.embed, self.head = op, nn.Conv2d(3, 8, 8, 8), nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.randn(8))

    def forward(self, x):
        tokens = self.embed(x).flatten(2).permute(2, 0, 1)
        norms = torch.ops.aten.norm.ScalarOpt_dim(tokens, 1, [-1]) if self.op == "norm" else tokens.norm(1, -1)
        return self.head((norms.reshape(norms.shape[0], norms.shape[1], 1) * self.scale).mean(0))


@pytest.mark.parametrize("op", ["norm", "linalg_vector_norm"])
def test_the_batch_is_followed_through_a_norm_over_other_axes(tmp_path, capsys, op):
    """aten.norm.ScalarOpt_dim(x, p, dim) was read as reducing the axes p names (p=1: the
    batch's axis of tokens [T, N, C]), and linalg_vector_norm not as a reduction: the batch was
    lost, the view of the norms [T, N] as [T, N, 1] kept the traced N and the program was refused
    ('Constraints violated (batch)'). Their dims are read after p: the graph gives the model's
    probabilities."""
    torch.manual_seed(0)
    model = TokenNorms(op).eval()
    program = torch.export.export(model, (torch.zeros(2, 3, SIZE, SIZE),))
    assert f"aten.{op}" in {str(n.target).rsplit(".", 1)[0] for n in program.graph.nodes}
    path = tmp_path / "fixed.pt2"
    torch.export.save(program, str(path))
    assert_exports_as_the_model(model, capsys, path, tmp_path / "cam.onnx")


class Unflattened(nn.Module):
    """Rows [N * T, C] unflattened to tokens [N, T, C] (unflatten(0, (N, -1))), then laid out
    [T, N, C] and as [T, N * C] unflattened back (unflatten(1, (N, C))): traced at a fixed batch,
    the batch is a number in unflatten's sizes, its third argument (not its second, as a view's)."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        features = torch.relu(self.embed(x))
        n, c = features.shape[:2]
        rows = self.mix(features.flatten(2).transpose(1, 2).reshape(-1, c))
        tokens = rows.unflatten(0, (n, -1))
        first = tokens.transpose(0, 1).reshape(tokens.shape[1], -1).unflatten(1, (n, c))
        return self.head(first.mean(0))


@pytest.mark.parametrize("batch", [1, 2])
def test_the_batch_in_unflattens_sizes_is_freed(tmp_path, capsys, batch):
    """unflatten(x, dim, sizes) holds the traced batch in `sizes`, which were left as traced: the
    program was refused ('a batch of 3 crops does not give each crop what the batch of 2 gives
    it'). The batch's entry of `sizes` (the output's batch axis less dim) reads the input's
    batch: the graph gives the model's probabilities."""
    torch.manual_seed(0)
    model = Unflattened().eval()
    program = torch.export.export(model, (torch.zeros(batch, 3, SIZE, SIZE),))
    assert sum(str(n.target) == "aten.unflatten.int" for n in program.graph.nodes) == 2
    path = tmp_path / "fixed.pt2"
    torch.export.save(program, str(path))
    assert_exports_as_the_model(model, capsys, path, tmp_path / "cam.onnx")


def test_another_candidate_at_an_earlier_view_is_tried_with_the_later_views_at_the_tie_break():
    """Unflattened at a batch of 1: its last view ([1, N * C] unflattened) was given its other
    candidate first (the failure moved from a crash there to other outputs, so it was kept),
    and that index was kept when the view before it (its rows) was given its own: the later
    view's candidates follow from where the earlier one puts the batch, so it then crashed
    again, and the program was refused ('Provided sizes [s77, 8] don't multiply up'). Another
    candidate at view k is tried with the views after it at the tie-break's first, then with
    their picks as they were (views on branches of their own)."""
    from camface.export import torch_model

    assert torch_model._picked((0, 0, 0, 1), 2, 1) == [(0, 0, 1), (0, 0, 1, 1)]
    assert torch_model._picked((1, 0), 0, 2) == [(2,)]
    assert torch_model._picked((), 1, 1) == [(0, 1)]
    assert torch_model._picked((0, 1), 1, 2) == [(0, 2)]


class ExpandedInFront(nn.Module):
    """Features f [N, C] expanded to a pair [2, N, C] by expand alone (its new axes lead), then
    viewed as [2, N, C] by their traced sizes."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)
        self.weights = nn.Parameter(torch.randn(2, 1, 1))

    def forward(self, x):
        features = torch.relu(self.conv(x)).mean((2, 3))
        pair = features.expand(2, -1, -1) * self.weights
        return self.head(pair.reshape(2, features.shape[0], -1).sum(0))


@pytest.mark.parametrize("batch", [1, 2])
def test_the_batch_is_followed_through_an_expand_that_adds_axes(tmp_path, capsys, batch):
    """expand adds its new axes in front ([N, C] to [2, N, C]): the batch was lost there (taken
    for an op adding axes of its own, as unfold does), the view of the pair kept the traced batch
    or had its first axis taken for it, and the program was refused. The batch moves back by
    the axes expand adds: the graph gives the model's probabilities."""
    torch.manual_seed(0)
    model = ExpandedInFront().eval()
    assert_exports_as_the_model(model, capsys, saved(model, tmp_path / "fixed.pt2", batch), tmp_path / "cam.onnx")


class UnderNoGrad(nn.Module):
    """Features [N, 8] pooled and viewed by the traced batch inside a torch.no_grad() block of
    forward (or a torch.autocast(enabled=False) one), added to the features pooled outside it."""

    def __init__(self, block):
        super().__init__()
        self.block, self.conv, self.head = block, nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        with torch.no_grad() if self.block == "no_grad" else torch.autocast("cpu", enabled=False):
            pooled = features.flatten(2).amax(2).view(features.shape[0], 8)
        return self.head(features.mean((2, 3)) + pooled)


@pytest.mark.parametrize("block, batch", [("no_grad", 1), ("no_grad", 2), ("autocast", 1)])
def test_views_inside_a_no_grad_block_are_freed(tmp_path, capsys, block, batch):
    """torch.export puts a torch.no_grad() block of forward in a subgraph of its own (a
    higher-order op, wrap_with_set_grad_enabled; torch.autocast's is wrap_with_autocast) that
    camface did not read: its views kept the traced batch ("shape '[1, 8]' is invalid for input
    of size 8*s77", "Constraints violated (batch)" at a batch of 2). They are freed as torch.cond's
    branches are: the graph gives the model's probabilities."""
    torch.manual_seed(0)
    model = UnderNoGrad(block).eval()
    path = saved(model, tmp_path / "fixed.pt2", batch=batch)
    assert "wrap_with_" in str(torch.export.load(str(path)).module().graph)
    assert_exports_as_the_model(model, capsys, path, tmp_path / "cam.onnx")


class TokensFirstWithin(TokensFirst):
    """TokensFirst's forward inside a torch.no_grad() block, or as both branches of a torch.cond
    (the second doubling the logits) on a parameter."""

    def __init__(self, within):
        super().__init__()
        self.within = within

    def forward(self, x):
        if self.within == "no_grad":
            with torch.no_grad():
                return super().forward(x)
        return torch.cond(self.head.bias.sum() > -100, lambda x: TokensFirst.forward(self, x),
                          lambda x: TokensFirst.forward(self, x) * 2, (x,))


@pytest.mark.parametrize("within", ["no_grad", "cond"])
def test_a_contiguous_dropped_inside_a_subgraph_does_not_fail_the_re_export(tmp_path, capsys, within):
    """The views of a .pt2 were made reshapes in its own graph only: in a torch.no_grad() block
    or a torch.cond branch, the view after a .contiguous() torch dropped at a batch of 1 failed
    the re-export ("Cannot view a tensor with shape torch.Size([64, s77, 8]) and strides (8,
    512, 1) ..."). Subgraphs' views are reshapes too: the graph gives the model's
    probabilities."""
    torch.manual_seed(0)
    model = TokensFirstWithin(within).eval()
    path = saved(model, tmp_path / "fixed.pt2", batch=1)
    assert_exports_as_the_model(model, capsys, path, tmp_path / "cam.onnx")


@pytest.mark.parametrize("model, batch, checks", [(LogitsAndSigns, 2, 1), (ExpandedPair, 1, 3)])
def test_the_freed_graph_is_run_untraced_only_where_a_view_is_ambiguous(tmp_path, capsys, monkeypatch, model,
                                                                        batch, checks):
    """The freed graph is run untraced to choose where ambiguous views hold the batch: a program
    with none is checked once, after its trace; ExpandedPair's tie-break fails that run, its
    other candidate passes it, then the trace is checked."""
    from camface.export import torch_model

    torch.manual_seed(0)
    path = saved(model().eval(), tmp_path / "fixed.pt2", batch=batch)
    shapes, check = [], torch_model._check_freed

    def counted(program, again, shape, saved=None):
        shapes.append(shape)
        return check(program, again, shape, saved)

    monkeypatch.setattr(torch_model, "_check_freed", counted)
    options = ["--class-output", "logits"] if model is LogitsAndSigns else []
    assert main(["export", str(path), "-o", str(tmp_path / "cam.onnx"), *EXPORT, *options]) == 0, \
        capsys.readouterr().err
    assert shapes == [[batch, 3, SIZE, SIZE]] * checks


class MaskedLogits(nn.Module):
    """Logits with one class masked to -inf (masked_fill(mask, float("-inf"))): torch.export.save
    writes the constant as the string "-Infinity", a float that is no JSON number."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)
        self.register_buffer("mask", torch.tensor([False, False, True, False]))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3))).masked_fill(self.mask, float("-inf"))


@pytest.mark.parametrize("batch", [None, 1])
def test_a_model_with_a_masked_logit_exports_as_the_model(tmp_path, capsys, batch):
    """A masked logit's -inf was refused twice: its constant, saved as "-Infinity", as "no number"
    whose load "would RUN CODE FROM THE FILE" (torch writes every non-finite float so and reads it
    with float()); saved at a fixed batch, as crops mixed ("up to nan apart": -inf - -inf is nan)."""
    torch.manual_seed(0)
    model = MaskedLogits().eval()
    assert_exports_as_the_model(model, capsys, saved(model, tmp_path / "masked.pt2", batch), tmp_path / "cam.onnx")


def test_a_freed_program_that_loses_a_masked_logit_is_refused():
    """Equal values are 0 apart (-inf in both), but a finite value where the saved program gives
    -inf is not: the scale of a value that is not finite is 0, never inf (inf <= inf held)."""
    from camface.export import torch_model

    class Saved:
        def module(self, check_guards=False):
            return model

    model = MaskedLogits().eval()
    torch_model._check_freed(Saved(), model, [1, 3, SIZE, SIZE])  # -inf in both: the same
    unmasked = lambda x: model(x).nan_to_num(neginf=-1e30)  # noqa: E731
    with pytest.raises(torch_model._NotFreed, match="a batch of 2 crops does not give each crop what the batch"):
        torch_model._check_freed(Saved(), unmasked, [1, 3, SIZE, SIZE])


@pytest.mark.parametrize("dead", [0.0, 300.0])
def test_a_sparse_output_is_judged_at_the_scale_of_its_values_not_its_zeros(dead):
    """Each element is judged at least at the median scale of its output's positions, so that
    one near 0 in every crop is no finer than the others; but where most positions are exactly
    0 in every crop (a ReLU's dead units), the median was 0, and an element of 0.01 beside
    values of 500 was held to 1e-4: float32 rounding of values of 500 (a batch of 2 is summed
    otherwise than 1 at a time, about 1e-4 apart) refused a valid program as crops mixed, where
    the same output with no dead unit passed."""
    from camface.export import torch_model

    class Saved:
        def module(self, check_guards=False):
            return model

    def model(x):
        mean = x.flatten(1).mean(1, keepdim=True).double()
        return torch.cat([torch.full((len(x), 6), dead, dtype=torch.float64), 500 + mean, 0.01 + 0 * mean], 1)

    rounded = lambda x: model(x) + torch.tensor([0, 0, 0, 0, 0, 0, 2e-4, 2e-4], dtype=torch.float64)  # noqa: E731
    torch_model._check_freed(Saved(), rounded, [1, 3, SIZE, SIZE])
    mixed = lambda x: model(x) + model(x).mean(0) * 0.01  # noqa: E731
    with pytest.raises(torch_model._NotFreed, match="a batch of 2 crops does not give each crop"):
        torch_model._check_freed(Saved(), mixed, [1, 3, SIZE, SIZE])


class Counting(nn.Module):
    """Buffers changed in place in forward: a counter (self.n += 1) that scales the logits, and a
    running mean of the features, added to the logits before it takes this batch in."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)
        self.register_buffer("n", torch.zeros(()))
        self.register_buffer("running", torch.linspace(-1, 1, 8))

    def forward(self, x):
        features = torch.relu(self.conv(x)).mean((2, 3))
        self.n += 1
        logits = self.head(features + self.running) * self.n
        self.running.lerp_(features.mean(0), 0.5)
        return logits


@pytest.mark.parametrize("batch", [None, 1, 2])
def test_buffers_changed_in_forward_are_exported_as_saved(tmp_path, capsys, batch):
    """The checks of the freed program ran program.module(), whose buffers are the program's: each
    run added to the counter and moved the running mean, so the saved program at a fixed batch was
    refused as crops mixed (its runs gave other logits), and what the re-export captured was
    not what was saved. Each run starts from the saved buffers and leaves them so: the graph gives
    what the saved program gives on its first run, taken from a fresh load before the export."""
    torch.manual_seed(0)
    path = saved(Counting().eval(), tmp_path / "counting.pt2", batch)
    images = torch.tensor(IMAGES.astype(np.float32) / 255).permute(0, 3, 1, 2)
    step = batch or len(IMAGES)
    with torch.no_grad():  # a fresh load for each batch: each run changes the buffers
        expected = torch.cat([torch.softmax(torch.export.load(str(path)).module()(images[i:i + step]), 1)
                              for i in range(0, len(IMAGES) - step + 1, step)]).numpy()
    assert main(["export", str(path), "-o", str(tmp_path / "cam.onnx"), *EXPORT]) == 0, capsys.readouterr().err
    got = run_graph(tmp_path / "cam.onnx", IMAGES, CLASSES)["probs"]
    np.testing.assert_allclose(got[:len(expected)], expected, rtol=1e-4, atol=1e-6)


class PickedToken(nn.Module):
    """CLIP-style pooling: of each crop's tokens [N, T, C] the one chosen by index (the largest),
    tokens[torch.arange(N), index], beside the tokens' mean, its rows viewed as [N, 2, C // 2];
    `first` tokens (a number, not the batch) of each crop are taken by an arange too, on the
    token axis; `mixed`: less the batch's mean (crops mixed)."""

    def __init__(self, first=2, mixed=False):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)
        self.first, self.mixed = first, mixed

    def forward(self, x):
        features = torch.relu(self.conv(x))
        tokens = features.flatten(2).transpose(1, 2)  # [N, T, C]
        picked = tokens[torch.arange(tokens.shape[0]), tokens.sum(-1).argmax(-1)]
        pooled = features.mean((2, 3)) + tokens[:, torch.arange(self.first)].sum(1) \
            + picked.view(len(x), 2, 4).flatten(1)
        return self.head(pooled - pooled.mean(0) if self.mixed else pooled)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_token_picked_by_an_arange_of_the_batch_is_freed(tmp_path, capsys, batch):
    """torch.arange(x.shape[0]) traced at a fixed batch is arange(batch): the program saved so was
    refused (tokens[arange(2), index] at 3 crops: "shape mismatch: indexing tensors could not be
    broadcast together"). An arange of the batch that picks a row of each crop's own (the index of
    the batch's axis) ends at the input's batch now; one of as many tokens, on another axis, keeps
    its number: the graph gives the model's probabilities on 3 crops."""
    torch.manual_seed(0)
    model = PickedToken(first=batch).eval()
    assert_exports_as_the_model(model, capsys, saved(model, tmp_path / "fixed.pt2", batch), tmp_path / "cam.onnx")


@pytest.mark.parametrize("batch", [1, 2])
def test_a_picked_token_of_crops_mixed_is_refused(tmp_path, capsys, batch):
    """The arange of the batch freed, the check still runs: crops mixed (less the batch's mean
    of the pooled tokens) are refused in one line as such (at a batch of 2 they were refused
    as a size camface could not trace back, the arange's)."""
    torch.manual_seed(0)
    path = saved(PickedToken(mixed=True).eval(), tmp_path / "fixed.pt2", batch)
    assert main(["export", str(path), "-o", str(tmp_path / "cam.onnx"), *EXPORT]) == 2
    err = capsys.readouterr().err
    assert f"a batch of {batch + 1} crops does not give each crop what the batch of {batch} gives it" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "cam.onnx").exists()

class LookedUp(nn.Module):
    """An embedding looked up for each crop by an index from its image: a table of `rows` rows
    of 2, table[argmax] ([N, 2]) or, `columns`, a table [rows, 8] indexed on its columns
    (table[:, argmax], [rows, N]), its crops' columns viewed as [N, rows]."""

    def __init__(self, rows=8, columns=False):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8 + (rows if columns else 2), 4)
        self.table, self.columns = nn.Parameter(torch.randn(rows, 8 if columns else 2)), columns

    def forward(self, x):
        features = torch.relu(self.conv(x)).mean((2, 3))
        index = features.argmax(-1)
        looked = self.table[:, index].t() if self.columns else self.table[index]
        return self.head(torch.cat([features, looked.reshape(len(x), -1)], 1))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("rows, columns", [(8, False), (2, True), (3, True)])
def test_an_embedding_looked_up_by_an_index_of_the_image_is_freed(tmp_path, capsys, batch, rows, columns):
    """The batch of table[index] (index [N] from the image) is the index's, on the indices'
    broadcast axes: _indexed_axis read the index's axis as the table's, so table[:, index] (its
    crops on axis 1) was taken to hold them on axis 0 where the table has as many rows as the
    batch (2), and table[index] lost them: the reshape(len(x), -1) after kept the number 2, and
    the program saved at a batch of 2 was refused. The graph gives the model's probabilities."""
    torch.manual_seed(0)
    model = LookedUp(rows, columns).eval()
    assert_exports_as_the_model(model, capsys, saved(model, tmp_path / "fixed.pt2", batch), tmp_path / "cam.onnx")


class PickedTokens(nn.Module):
    """Each crop's `k` largest tokens, tokens[arange(N), idx] with idx [k, N] (topk's, transposed):
    [k, N, C], its crops' rows viewed as [N, k * C]."""

    def __init__(self, k):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8 * k, 4)
        self.k = k

    def forward(self, x):
        tokens = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)  # [N, T, C]
        picked = tokens[torch.arange(len(x)), tokens.sum(-1).topk(self.k).indices.t()]  # [k, N, C]
        return self.head(picked.permute(1, 0, 2).reshape(len(x), -1))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("k", [2, 3])
def test_tokens_picked_by_an_arange_of_the_batch_beside_a_2d_index_are_freed(tmp_path, capsys, batch, k):
    """tokens[arange(N), idx] with idx [k, N] puts the crops on the second of the broadcast axes
    [k, N, C]: _indexed_axis followed the batch only where the indices broadcast to one axis, and
    the rule after took the first axis, which holds the batch's size where k is the batch (2),
    so the reshape(len(x), -1) after kept the number and the program saved at 2 was refused."""
    torch.manual_seed(0)
    model = PickedTokens(k).eval()
    path = saved(model, tmp_path / "fixed.pt2", batch)
    options = ["--target-layer", "relu"]  # the tokens are no grid: the feature map is the target
    assert main(["export", str(path), "-o", str(tmp_path / "cam.onnx"), *EXPORT, *options]) == 0, \
        capsys.readouterr().err
    np.testing.assert_allclose(run_graph(tmp_path / "cam.onnx", IMAGES, CLASSES)["probs"], eager_probs(model, IMAGES),
                               rtol=1e-4, atol=1e-6)
