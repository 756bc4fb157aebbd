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


def eager_probs(model, images):
    with torch.no_grad():
        return torch.softmax(model(torch.tensor(images.astype(np.float32) / 255).permute(0, 3, 1, 2)), 1).numpy()


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
    out = exported(capsys, path, tmp_path / "cam.onnx")
    np.testing.assert_allclose(run_graph(out, IMAGES, CLASSES)["probs"], eager_probs(model, IMAGES),
                               rtol=1e-4, atol=1e-6)


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
    out = tmp_path / "cam.onnx"
    assert main(["export", str(path), "-o", str(out), *EXPORT, "--class-output", "logits"]) == 0, \
        capsys.readouterr().err
    with torch.no_grad():
        logits = model(torch.tensor(IMAGES.astype(np.float32) / 255).permute(0, 3, 1, 2))["logits"]
    np.testing.assert_allclose(run_graph(out, IMAGES, CLASSES)["probs"], torch.softmax(logits, 1).numpy(),
                               rtol=1e-4, atol=1e-6)


class BatchMean(nn.Module):
    """Subtracts the batch's mean feature (crops mixed: no batch but the traced one is right)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 4)

    def forward(self, x):
        features = self.conv(x).mean((2, 3))
        return self.head(features - features.mean(0, keepdim=True) + 1)


class RowsOfTokensFirst(nn.Module):
    """Tokens [T, N, C] as rows [T * N, C] by their traced sizes (the batch on their second axis,
    which camface does not free): at another batch the rows are [T, N * C] and the linear layer
    reading them fails inside torch."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).permute(2, 0, 1)
        rows = self.mix(tokens.reshape(tokens.shape[0] * tokens.shape[1], -1))
        return self.head(rows.view(tokens.shape[0], -1, 8).mean(0))


@pytest.mark.parametrize("model, named", [
    (BatchMean, "a batch of 2 crops does not give each crop what the batch of 1 gives it"),
    (RowsOfTokensFirst, "a and b must have same reduction dim")])
def test_a_program_whose_batch_cannot_be_freed_is_refused_in_one_line(tmp_path, model, named):
    """A model that mixes its crops ran at any batch once freed, and its graph explained each crop
    with the others' mean: the freed program is checked against the saved one (a batch of 2
    against 1 crop at a time). Sizes camface cannot free fail in torch, which logged the failing
    op's traceback to stderr before camface's line (30 'E1205 ... fake_tensor.py' lines; its
    handler writes to the process's stderr, hence a subprocess)."""
    torch.manual_seed(0)
    path = saved(model().eval(), tmp_path / "fixed.pt2", batch=1)
    done = subprocess.run([sys.executable, "-m", "camface", "export", str(path), "-o", str(tmp_path / "cam.onnx"),
                           *EXPORT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"camface: error: {path}: the program was exported with a fixed batch of 1 "
                                  "and does not run with a dynamic one"), done.stderr
    assert named in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
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
    out = tmp_path / "cam.onnx"
    assert main(["export", str(path), "-o", str(out), *EXPORT, "--class-output", "logits"]) == 0, \
        capsys.readouterr().err
    with torch.no_grad():
        logits = model(torch.tensor(IMAGES.astype(np.float32) / 255).permute(0, 3, 1, 2))["logits"]
    np.testing.assert_allclose(run_graph(out, IMAGES, CLASSES)["probs"], torch.softmax(logits, 1).numpy(),
                               rtol=1e-4, atol=1e-6)


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
    out = exported(capsys, path, tmp_path / "cam.onnx")
    np.testing.assert_allclose(run_graph(out, IMAGES, CLASSES)["probs"], eager_probs(model, IMAGES),
                               rtol=1e-4, atol=1e-6)
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
