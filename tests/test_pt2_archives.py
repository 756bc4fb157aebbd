""".pt2 archives as users bring them: pickles inside that would run code (refused before they
run), programs saved on a GPU (exported on the CPU, as saved), a fixed batch of 1 whose
constants are reshaped with a leading 1 (kept, not taken for the batch)."""

from __future__ import annotations

import io
import json
import logging
import pathlib
import pickle
import re
import subprocess
import sys
import warnings
import zipfile
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
import onnxruntime as ort  # noqa: E402
from torch import nn  # noqa: E402

from camface.cli import main  # noqa: E402
from camface.errors import ModelError  # noqa: E402
from camface.export import pt2_archive, torch_model  # noqa: E402

SIZE = 32


class ScaledCNN(nn.Module):
    """BatchNorm, and a tensor made on the input's device and viewed as [1, C, 1, 1]: traced at
    a fixed batch of 1, that view's leading 1 is no batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        scale = torch.arange(1, 17, device=x.device, dtype=x.dtype) / 16
        return self.fc((self.features(x) * scale.view(1, -1, 1, 1)).mean((2, 3)))


def saved(path, batch: int | None = 1):
    """ScaledCNN exported at a fixed `batch` (None: dynamic) and saved at `path`."""
    model = ScaledCNN().eval()
    example = torch.randn(batch or 2, 3, SIZE, SIZE)
    shapes = None if batch else ({0: torch.export.Dim("batch", min=1, max=32)},)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=shapes), str(path))
    return model, path


def rewritten(source, target, change):
    """A copy of the .pt2 `source` at `target`, change(name, bytes, archive) -> bytes applied
    to each member (and change.rename(name) -> name, when it has one)."""
    rename = getattr(change, "rename", lambda name: name)
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as copy:
        for info in archive.infolist():
            data = change(info.filename, archive.read(info), archive)
            copy.writestr(zipfile.ZipInfo(rename(info.filename), info.date_time), data)  # writestr(info) moves info
    return target


def as_if_saved_on_cuda(name, data, archive):
    """What torch.export.save writes for a program on cuda:0 (read from programs saved on an
    H200 with torch 2.11: every device in the JSON is {"type": "cuda", "index": 0}, the sample
    inputs' storages are at "cuda:0")."""
    if name.endswith(".json"):
        def moved(value):
            if isinstance(value, dict):
                if value.keys() == {"type", "index"}:
                    assert value == {"type": "cpu", "index": None}
                    return {"type": "cuda", "index": 0}
                return {k: moved(v) for k, v in value.items()}
            return [moved(v) for v in value] if isinstance(value, list) else value
        return json.dumps(moved(json.loads(data))).encode()
    if "/sample_inputs/" in name:
        inputs, buffer = torch.load(io.BytesIO(data), weights_only=True), io.BytesIO()
        with mock.patch("torch.serialization.location_tag", lambda storage: "cuda:0"):
            torch.save(inputs, buffer)
        return buffer.getvalue()
    return data


def graph_outputs(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probs", "gradcam"], {"image": images, "class_index": np.full(len(images), -1, np.int64)})


IMAGES = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
EXPORT = ["--preset", "torch", "--heads", "gradcam", "--no-rank"]


def test_a_fixed_batch_of_one_keeps_the_leading_one_of_its_constants_views(tmp_path, capsys):
    """The view of a tensor that does not depend on the image was rewritten to read the batch:
    the re-export failed ('The size of tensor a (16) must match the size of tensor b ((16//s77))')."""
    model, path = saved(tmp_path / "fixed.pt2", batch=1)
    assert main(["export", str(path), "-o", str(tmp_path / "cam.onnx"), *EXPORT]) == 0, capsys.readouterr().err
    probs, _ = graph_outputs(tmp_path / "cam.onnx", IMAGES)  # 3 crops through a program traced at 1
    x = (torch.tensor(IMAGES, dtype=torch.float32) / 255 - torch.tensor([0.485, 0.456, 0.406])) / \
        torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = torch.softmax(model(x.permute(0, 3, 1, 2)), 1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_a_program_saved_on_a_gpu_exports_on_the_cpu_as_saved_there(tmp_path, caplog):
    """torch.export.load makes each weight on its saved device: without a GPU it fails ('Torch
    not compiled with CUDA enabled'); with one, the program's device arguments do not match
    camface's CPU example. camface loads it on the CPU: the graph equals the CPU program's."""
    _, on_cpu = saved(tmp_path / "cpu.pt2", batch=1)
    on_gpu = rewritten(on_cpu, tmp_path / "gpu.pt2", as_if_saved_on_cuda)
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            torch.export.load(str(on_gpu))
    caplog.set_level(logging.INFO, "camface")
    for path in (on_cpu, on_gpu):
        assert main(["export", str(path), "-o", str(path.with_suffix(".onnx")), *EXPORT]) == 0
    assert f"{on_gpu}: saved on cuda:0; loaded on the CPU" in caplog.messages
    assert not any("cpu.pt2: saved on" in m for m in caplog.messages)
    for got, want in zip(graph_outputs(on_gpu.with_suffix(".onnx"), IMAGES),
                         graph_outputs(on_cpu.with_suffix(".onnx"), IMAGES)):
        np.testing.assert_array_equal(got, want)


class Touch:
    """Unpickled, it creates `marker`: what a pickle can make torch.load run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def with_sample_inputs(payload):
    def change(name, data, archive):
        return torch_save(payload) if "/sample_inputs/" in name else data
    return change


def with_pickled_weight(payload):
    """The first weight stored as a pickle (use_pickle: torch.export.load reads it with
    torch.load(weights_only=False)) holding `payload`."""
    def change(name, data, archive):
        config_name = next(n for n in archive.namelist() if n.endswith("weights_config.json"))
        config = json.loads(archive.read(config_name))
        first = next(iter(config["config"].values()))
        if name == config_name:
            first["use_pickle"] = True
            return json.dumps(config).encode()
        return torch_save(payload) if name.endswith("/weights/" + first["path_name"]) else data
    return change


def with_symbolic_size(marker):
    """The first symbolic size's expr_str (which torch.export.load hands to sympy.sympify, an
    eval) made to create `marker` too."""
    return with_size_text(lambda symbol: f"(__import__('pathlib').Path('{marker}').touch() or {symbol})")


def with_size_text(text):
    """The first symbolic size's expr_str, a Symbol(...), replaced by text(that Symbol(...))."""
    def change(name, data, archive):
        if not name.endswith("models/model.json"):
            return data
        found = re.search(r'"expr_str": "(Symbol\([^"]*\))"', data.decode())
        return data.decode().replace(found.group(0), f'"expr_str": "{text(found.group(1))}"', 1).encode()
    return change


def with_constant(path_name, payload):
    """A constant stored as a pickle: `tensor_*` files are read with torch.load(weights_only=
    False), `opaque_obj_*` with pickle.loads, `custom_obj_*` with TorchScript's unpickler."""
    def change(name, data, archive):
        if name.endswith("model_constants_config.json"):
            config = json.loads(data)
            config["config"]["extra"] = {"path_name": path_name, "is_param": False, "use_pickle": True,
                                         "tensor_meta": None}
            return json.dumps(config).encode()
        return data
    return change, (f"data/constants/{path_name}", payload)


def with_node(target):
    def change(name, data, archive):
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        graph = program["graph_module"]["graph"]
        first = graph["nodes"][0]
        graph["nodes"].insert(0, {**first, "target": target, "name": "called"})
        return json.dumps(program).encode()
    return change


def with_input_named(marker):
    """The program's input renamed to a default argument that runs code: torch.fx writes names
    into the forward's source, which runs as the program loads; the body still reads the input."""
    return _input_renamed("x", f"x=[__import__('pathlib').Path('{marker}').touch(), locals().get('x')][1]")


def with_spec_import(module):
    """The input's tree spec (a JSON string in model.json) naming an enum of `module`, which
    torch's pytree imports as it reads the spec."""
    def change(name, data, archive):
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["in_spec"])
        spec[1]["children_spec"][1]["context"] = json.dumps([{"__enum__": True, "fqn": f"{module}:X", "name": "y"}])
        signature["in_spec"] = json.dumps(spec)
        return json.dumps(program).encode()
    return change


def with_program_entry_renamed(marker):
    """The symbolic size that runs code, in models/model.JSON: torch.export.load reads every
    entry under models/ whatever its suffix."""
    sized = with_symbolic_size(marker)

    def change(name, data, archive):
        return sized(name, data, archive)
    change.rename = lambda name: name[:-5] + ".JSON" if name.endswith("models/model.json") else name
    return change


class WithConstant(nn.Module):
    """A plain tensor attribute: torch.export lifts it into a tensor constant."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)
        self.scale = torch.ones(4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)) * self.scale)


def with_constant_named(marker):
    """The tensor constant renamed to Python: torch.fx writes it into getattr(self, "...") of
    the source program.module() runs; a quote ends the string, a carriage return (a line end to
    Python, not to torch.fx's indenting) puts the payload at module level."""
    evil = (f'scale")\rgetattr(getattr(__import__("pathlib"),"Path")("{marker}"),"touch")()\r'
            'def _after(self):\r    y = getattr(self,"scale')
    assert "." not in evil  # torch splits a get_attr target at dots
    return _module_renamed("scale", evil)


def torch_save(payload):
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def refused_archive(case, clean, target, marker):
    """`clean` changed as `case` says, at `target`."""
    added = None
    if case == "sample inputs":
        change = with_sample_inputs((Touch(marker),))
    elif case == "weight":
        change = with_pickled_weight(Touch(marker))
    elif case == "symbolic size":
        change = with_symbolic_size(marker)
    elif case == "tensor constant":
        change, added = with_constant("tensor_9", torch_save(Touch(marker)))
    elif case == "opaque constant":
        change, added = with_constant("opaque_obj_0", pickle.dumps(Touch(marker)))
    elif case == "custom object":
        change, added = with_constant("custom_obj_0", pickle.dumps(Touch(marker)))
    elif case == "input name":
        change = with_input_named(marker)
    elif case == "tree spec import":
        (target.parent / "planted.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nX = {{}}\n")
        change = with_spec_import("planted")
    elif case == "program entry renamed":
        change = with_program_entry_renamed(marker)
    elif case == "constant name":
        change = with_constant_named(marker)
    elif case == "dunder target":
        change = with_node("_operator._abs.__self__.eval")
    elif case == "node call":
        change = with_node("torch.export.custom_ops._call_custom_autograd_function_in_pre_dispatch")
    else:
        change = lambda name, data, archive: data  # noqa: E731
    rewritten(clean, target, change)
    with zipfile.ZipFile(clean) as archive:
        prefix = archive.namelist()[0].split("/")[0]
        model_json = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        original = archive.read(model_json)
    if case == "AOTInductor library":
        added = ("data/aotinductor/model/model.wrapper.so", b"\x7fELF not really")
    with zipfile.ZipFile(target, "a") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name
        if added:
            archive.writestr(f"{prefix}/{added[0]}", added[1])
        if case == "two entries of one name":
            # torch reads the first (the symbolic size that runs code), Python's zipfile the last
            archive.writestr(model_json, original)
    return target


# case, what the refusal names, whether torch.export.load runs the file's code (the premise)
REFUSED = [
    ("sample inputs", r"a pickle that is not only tensors \(GLOBAL getattr\)", True),
    ("weight", r"a pickle that is not only tensors \(GLOBAL getattr\)", True),
    ("tensor constant", r"a pickle that is not only tensors \(GLOBAL getattr\)", True),
    ("opaque constant", r"a pickle that is not only tensors \(a pickled Python object", True),
    ("custom object", r"a pickle that is not only tensors \(a pickled Python object", False),
    ("symbolic size", r"holds the symbolic size .*which is not arithmetic \(it calls __import__", True),
    ("two entries of one name", r"it holds two entries named \S+/models/model.json", True),
    ("AOTInductor library", r"it holds \S+/data/aotinductor/model/model.wrapper.so, an AOTInductor build", False),
    ("input name", r"the name \"x=\[__import__.* is no Python identifier", True),
    ("tree spec import", r"its in_spec's argument names .*'__enum__'", True),
    ("program entry renamed", r"it holds \S+/models/model.JSON where torch.export.save writes one models/model.json",
     True),
    ("constant name", r"the module path 'scale\"\)\\rgetattr", True),
    ("dunder target", r"target '_operator._abs.__self__.eval' reaches through a dunder attribute", False),
    ("node call", r"a node calls torch.export.custom_ops._call_custom_autograd_function_in_pre_dispatch, "
                  r"which is not one of torch's or Python's operators", False),
]


@pytest.mark.parametrize("case, named, runs", REFUSED, ids=[c[0] for c in REFUSED])
def test_a_pt2_that_would_run_code_when_loaded_is_refused_before_it_runs(tmp_path, capsys, monkeypatch, case,
                                                                         named, runs):
    """.pt/.pth are refused because unpickling runs code; a .pt2 ran it: torch.export.load
    retries sample inputs the safe load refuses with weights_only=False, reads pickled weights
    and tensor constants with weights_only=False and opaque constants with pickle.loads, hands
    each symbolic size's text to sympy.sympify (an eval), dlopens an AOTInductor library it
    finds, reads the first of two entries of one name where Python's zipfile reads the last,
    and every entry under models/ whatever its suffix; torch.fx writes the file's names into
    the source it runs, and torch's pytree imports modules a tree spec names."""
    marker = tmp_path / "ran"
    monkeypatch.syspath_prepend(str(tmp_path))  # a module planted there imports (`python -m camface` run there)
    if case == "constant name":
        clean = tmp_path / "clean.pt2"
        torch.export.save(torch.export.export(WithConstant().eval(), (torch.randn(2, 3, SIZE, SIZE),)), str(clean))
    else:
        _, clean = saved(tmp_path / "clean.pt2", batch=None)
    if case == "two entries of one name":
        evil = refused_archive("symbolic size", clean, tmp_path / "first.pt2", marker)
        evil = refused_archive(case, evil, tmp_path / "evil.pt2", marker)
    else:
        evil = refused_archive(case, clean, tmp_path / "evil.pt2", marker)
    out = tmp_path / "cam.onnx"
    assert main(["export", str(evil), "-o", str(out), *EXPORT]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(evil))}: refused: .*{named}", err), err
    assert "RUN CODE FROM THE FILE" in err and "torch.export.save" in err
    assert not marker.exists() and not out.exists()
    with pytest.raises(ModelError, match="refused"):  # the gallery and the API load through here too
        torch_model.to_onnx(evil)
    assert not marker.exists()
    if runs:  # what the file does when torch loads it: the test's premise
        logging.getLogger("torch").disabled = True  # torch's fallback warning has a format bug
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.export.load(str(evil)).module()  # what torch.onnx.export and a re-export call
        except Exception:  # noqa: BLE001 - a weight that is not a tensor may fail after it ran
            pass
        finally:
            logging.getLogger("torch").disabled = False
        assert marker.exists()


@pytest.fixture(scope="module")
def dynamic_pt2(tmp_path_factory):
    """ScaledCNN saved with a dynamic batch (its symbolic sizes: Symbol('s77', ...) and others)."""
    return saved(tmp_path_factory.mktemp("dynamic") / "clean.pt2", batch=None)[1]


def _times_zero(value):
    return lambda symbol: f"Add({symbol}, Mul(Integer(0), {value}))"  # the size unchanged, once evaluated


# past each bound, and yet quick for sympy (9**9**99 would hang the test without the checks)
UNBOUNDED = [
    ("power tower", _times_zero("Integer(2)**Integer(4096)"), r"the exponent Integer\(4096\) is no literal up to 64"),
    ("power function", _times_zero("PowByNatural(Integer(2), Integer(4096))"), r"the exponent Integer\(4096\)"),
    ("symbolic exponent", lambda s: _times_zero(f"Pow(Integer(2), {s})")(s), r"the exponent Symbol\('s\d+'"),
    ("power of powers", _times_zero("Pow(Pow(Integer(4611686018427387904), Integer(64)), Integer(64))"),
     r"its numbers could reach \d{6} bits, over 65536"),
    ("huge literal", _times_zero(f"Integer({2**64})"), r"the literal 18446744073709551616 is over 2\*\*63"),
    ("shift", _times_zero("LShift(Integer(1), Integer(4096))"), r"the exponent Integer\(4096\)"),
    ("xor", _times_zero("(Integer(2)^Integer(3))"), r"it has \^, a power to sympy"),
    ("deep", lambda s: "Add(" * 120 + s + ", Integer(0))" * 120, r"it nests over 100 levels deep"),
    ("long", lambda s: f"Add({s}" + ", Integer(0)" * 900 + ")", r"it is 10\d\d\d characters long, over 10000"),
]


@pytest.mark.parametrize("text, named", [c[1:] for c in UNBOUNDED], ids=[c[0] for c in UNBOUNDED])
def test_a_symbolic_size_sympy_could_not_evaluate_in_bounded_time_is_refused(dynamic_pt2, tmp_path, capsys, text,
                                                                               named):
    """A size's expr_str passed as arithmetic whatever its numbers: Integer(9)**Integer(9)**Integer(99)
    would have hung the load (sympy evaluates it as it parses). Literals over 2**63, powers and
    shifts by more than a literal up to 64, numbers past 2**16 bits, `^` (sympy's power), text
    over 10,000 characters or 100 levels deep are refused, naming the entry and the field."""
    evil = rewritten(dynamic_pt2, tmp_path / "evil.pt2", with_size_text(text))
    out = tmp_path / "cam.onnx"
    assert main(["export", str(evil), "-o", str(out), *EXPORT]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(evil))}: refused: \S+/models/model.json holds the symbolic size .* "
                     rf"\(expr_str\), which could take sympy unbounded time or memory \(.*{named}", err), err
    assert "loading it could hang or exhaust memory" in err and not out.exists()


def test_a_size_hint_past_64_bits_is_refused(dynamic_pt2, tmp_path, capsys):
    """A size's hint (an int in the program's JSON, which Python reads at any length) is a number
    sympy computes with, as with the size's literals: one past 64 bits is refused."""
    def change(name, data, archive):
        text = data.decode() if name.endswith("models/model.json") else None
        return text.replace('"hint": {"as_int": 2}', f'"hint": {{"as_int": {2**64}}}', 1).encode() if text else data

    evil = rewritten(dynamic_pt2, tmp_path / "evil.pt2", change)
    assert main(["export", str(evil), "-o", str(tmp_path / "cam.onnx"), *EXPORT]) == 2
    err = capsys.readouterr().err
    assert re.search(r"refused: \S+/models/model.json holds the number 18446744073709551616\.\.\., past 64 bits", err), err
    assert "loading it could hang or exhaust memory" in err


class Gram(nn.Module):
    """A Gram matrix of the positions: its sizes hold h*w squared (torch writes Pow(s, Integer(2)))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        features = self.conv(x).flatten(2)
        return torch.einsum("bci,bcj->bij", features, features).flatten(1).mean(1, keepdim=True)


def _module_renamed(old, new):
    """The tensor constant `old` renamed `new`, where torch.fx writes it (self.<name>)."""
    def change(name, data, archive):
        if name.endswith("models/model.json"):
            program = json.loads(data)
            for spec in program["graph_module"]["signature"]["input_specs"]:
                if "tensor_constant" in spec:
                    spec["tensor_constant"]["tensor_constant_name"] = new
            return json.dumps(program).encode()
        if name.endswith("model_constants_config.json"):
            config = json.loads(data)
            config["config"] = {new: config["config"][old]}
            return json.dumps(config).encode()
        return data
    return change


def _input_renamed(old, new):
    """A `change` for `archive_with`: the program's input named `new` instead of `old` (in the graph and
    the signature)."""
    def renamed(value):
        if isinstance(value, dict):
            return {(new if k == old else k): (new if k == "name" and v == old else renamed(v)) for k, v in value.items()}
        return [renamed(v) for v in value] if isinstance(value, list) else value

    def change(name, data, archive):
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        module = program["graph_module"]
        module["graph"], module["signature"] = renamed(module["graph"]), renamed(module["signature"])
        return json.dumps(program).encode()
    return change


@pytest.mark.parametrize("change, named", [
    (_module_renamed("scale", "ｆｃ"), r"the module path 'ｆｃ' (\(tensor_constant_name\) )?is not one in ASCII"),
    (_input_renamed("x", "ｘ"), r"the name 'ｘ' is not ASCII \(Python reads it as 'x'\)"),
    (_input_renamed("x", "xª"), r"the name 'xª' is not ASCII \(Python reads it as 'xa'\)"),
], ids=["full-width constant", "full-width input", "ordinal indicator"])
def test_a_name_python_reads_as_another_is_refused(tmp_path, capsys, change, named):
    """torch.fx writes a program's names into the source it runs, and Python reads a non-ASCII
    identifier as its NFKC form: a tensor constant named `ｆｃ` was read as self.fc (the Linear
    module, not the constant) and passed every name check. Names must be ASCII identifiers."""
    clean = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(WithConstant().eval(), (torch.randn(2, 3, SIZE, SIZE),)), str(clean))
    evil = rewritten(clean, tmp_path / "evil.pt2", change)
    out = tmp_path / "cam.onnx"
    assert main(["export", str(evil), "-o", str(out), *EXPORT]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(evil))}: refused: \S+\.json: {named}", err), err
    assert not out.exists()
    if "constant" in named:  # the premise: torch reads self.fc where the file names the constant
        with pytest.raises(RuntimeError, match="found type 'Module'"):
            torch.export.load(str(evil)).module()(torch.zeros(2, 3, SIZE, SIZE))


def test_a_pt2_s_guards_are_dropped_not_run(tmp_path, capsys):
    """A program's guards_code is Python that program.module() runs (torch.onnx.export calls it):
    camface checks shapes itself, so the guards are dropped; the export goes on as before."""
    marker = tmp_path / "ran"
    _, clean = saved(tmp_path / "clean.pt2", batch=None)

    def guarded(name, data, archive):
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        program["guards_code"] = [f"__import__('pathlib').Path('{marker}').touch() is None"]
        return json.dumps(program).encode()

    evil = rewritten(clean, tmp_path / "guarded.pt2", guarded)
    assert main(["export", str(evil), "-o", str(tmp_path / "cam.onnx"), *EXPORT]) == 0, capsys.readouterr().err
    assert not marker.exists()
    for got, want in zip(graph_outputs(tmp_path / "cam.onnx", IMAGES), graph_outputs(_exported(clean, tmp_path), IMAGES)):
        np.testing.assert_array_equal(got, want)
    torch.export.load(str(evil)).module()(torch.zeros(2, 3, SIZE, SIZE))  # the premise: the guards run on a call
    assert marker.exists()


def two_directories(benign: bytes, evil: bytes) -> bytes:
    """One file holding both archives (same entry names) with two central directories: Python's
    zipfile finds the directory at (end record - its size) and reads `benign`'s, torch's reader
    takes the end record's offset as written and reads `evil`'s."""
    import struct

    def parts(data):
        end = data.rfind(b"PK\x05\x06")
        count, size, offset = struct.unpack_from("<HII", data, end + 10)
        return data[:offset], bytearray(data[offset:offset + size]), count

    benign_entries, benign_directory, count = parts(benign)
    evil_entries, evil_directory, evil_count = parts(evil)
    assert (len(evil_directory), evil_count) == (len(benign_directory), count)
    padding = len(benign_directory)
    shift, at = padding + len(benign_entries), 0
    for _ in range(count):
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", evil_directory, at + 28)
        (offset,) = struct.unpack_from("<I", evil_directory, at + 42)
        struct.pack_into("<I", evil_directory, at + 42, offset + shift)
        at += 46 + name_length + extra_length + comment_length
    directory_at = padding + len(benign_entries) + len(evil_entries)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(benign_directory), directory_at, 0)
    return b"\0" * padding + benign_entries + evil_entries + bytes(evil_directory) + bytes(benign_directory) + end


def test_a_pt2_whose_zip_reads_otherwise_in_torch_loads_what_camface_checked(tmp_path, capsys):
    """camface checked the entries Python's zipfile reads and gave torch the file, whose reader
    can find other entries in the same bytes: torch now gets the checked entries, written again."""
    marker = tmp_path / "ran"
    _, clean = saved(tmp_path / "clean.pt2", batch=None)
    sized = rewritten(clean, tmp_path / "sized.pt2", with_symbolic_size(marker))
    # the same names and lengths: the payload replaces an expression of the same size
    benign = rewritten(clean, tmp_path / "benign.pt2", lambda name, data, archive: data)
    with zipfile.ZipFile(sized) as evil_zip, zipfile.ZipFile(benign) as benign_zip:
        assert [i.filename for i in evil_zip.infolist()] == [i.filename for i in benign_zip.infolist()]
    both = tmp_path / "both.pt2"
    both.write_bytes(two_directories(benign.read_bytes(), sized.read_bytes()))
    assert main(["export", str(both), "-o", str(tmp_path / "cam.onnx"), *EXPORT]) == 0, capsys.readouterr().err
    assert not marker.exists()
    for got, want in zip(graph_outputs(tmp_path / "cam.onnx", IMAGES),
                         graph_outputs(_exported(clean, tmp_path), IMAGES)):
        np.testing.assert_array_equal(got, want)
    logging.getLogger("torch").disabled = True
    try:
        torch.export.load(str(both))  # the premise: torch's reader finds the other directory
    except Exception:  # noqa: BLE001
        pass
    finally:
        logging.getLogger("torch").disabled = False
    assert marker.exists()


def _exported(path, folder):
    out = folder / f"{path.stem}.onnx"
    assert main(["export", str(path), "-o", str(out), *EXPORT]) == 0
    return out


def test_torch_load_elsewhere_is_left_as_it_is_while_a_pt2_loads(tmp_path, monkeypatch):
    """The unpicklers are guarded inside torch's .pt2 loader only: a torch.load the user's own
    code makes meanwhile (another thread) keeps its arguments (it was held to weights_only and
    the CPU while camface loaded a .pt2)."""
    from torch.export.pt2_archive import _package

    _, clean = saved(tmp_path / "clean.pt2", batch=None)
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(2)}, checkpoint)
    seen = []
    real = torch.export.load

    def load_and_look(source, **kwargs):
        seen.append(torch.load(checkpoint, map_location="meta", weights_only=False)["w"].device.type)
        seen.append(_package.torch.load is torch.load)
        return real(source, **kwargs)

    monkeypatch.setattr(torch.export, "load", load_and_look)
    torch_model.to_onnx(clean)
    assert seen == ["meta", False]
    assert _package.torch is torch  # and put back


def test_a_pt2_whose_pickles_hold_only_tensors_loads(tmp_path, capsys):
    """Pickles of plain tensors (a weight torch could not store as raw bytes) are what
    weights_only allows: such a program still exports, with the same graph."""
    _, clean = saved(tmp_path / "clean.pt2", batch=None)
    with zipfile.ZipFile(clean) as archive:
        config = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("weights_config.json"))))
    first_name, first = next(iter(config["config"].items()))
    weight = ScaledCNN().eval().state_dict()[first_name]
    assert first["path_name"] and weight.shape == tuple(d["as_int"] for d in first["tensor_meta"]["sizes"])
    pickled = rewritten(clean, tmp_path / "pickled.pt2", with_pickled_weight(nn.Parameter(weight)))
    for path in (clean, pickled):
        assert main(["export", str(path), "-o", str(path.with_suffix(".onnx")), *EXPORT]) == 0, capsys.readouterr().err
    for got, want in zip(graph_outputs(pickled.with_suffix(".onnx"), IMAGES),
                         graph_outputs(clean.with_suffix(".onnx"), IMAGES)):
        np.testing.assert_array_equal(got, want)


def test_the_command_line_shows_camface_messages_not_torch_info_logs(tmp_path):
    """The exporters were silenced by saving their loggers' levels before torch was imported and
    restoring them after: torch's own WARNING level on its logger came back as none, so at
    camface's INFO torch printed its dynamo and inductor summaries at exit (15 'I1204 ...
    eval_frame.py] TorchDynamo attempted to trace' lines after every .pt2 export), and loggers
    torch made inside the block kept their WARNING ('torchvision is not installed. Skipping
    torchvision::nms')."""
    _, path = saved(tmp_path / "net.pt2", batch=None)
    done = subprocess.run([sys.executable, "-m", "camface", "export", str(path), "-o", str(tmp_path / "cam.onnx"),
                           *EXPORT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    assert "verify gradcam" in printed  # camface's own lines still show
    torch_lines = [line for line in printed.splitlines() if line[:1] in "IWD" and line[1:5].isdigit()]
    assert torch_lines == [], torch_lines[:3]


class Branching(nn.Module):
    """torch.cond: its positional inputs are serialised with the name ""."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return torch.cond(y.mean() > 0, lambda t: t * 2, lambda t: t - 1, (y,)).mean((2, 3))


class Strided(nn.Module):
    """Strided convolution and pooling at a dynamic height and width: the program holds guards
    (Python source, dropped on load) and FloorDiv sizes."""

    def __init__(self):
        super().__init__()
        self.class_ = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))
        self.register_buffer("def_", torch.ones(4))

    def forward(self, x, *, scale: float = 1.0):
        y = self.class_(x) * self.def_.view(1, -1, 1, 1) * scale
        return {"logits": y.mean((2, 3)), "embedding": y.flatten(1)[:, :4]}


@pytest.mark.parametrize("model, dynamic", [(Branching, {0: "batch"}), (Strided, {0: "batch", 2: "h", 3: "w"}),
                                            (Gram, {0: "batch", 2: "h", 3: "w"})],
                         ids=["cond", "strided, dynamic size, dict output, keyword, keyword-like names",
                              "squared size"])
def test_legitimate_programs_pass_the_load_checks(tmp_path, model, dynamic):
    """What the checks must not refuse (a reviewer's cond program was refused for its "" names)."""
    torch.manual_seed(0)
    module = model().eval()
    example = torch.randn(2, 3, 33, 35)
    shapes = ({axis: torch.export.Dim(name, min=2, max=64) if axis == 0 else torch.export.Dim.AUTO
               for axis, name in dynamic.items()},)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(module, (example,), dynamic_shapes=shapes), str(path))
    with zipfile.ZipFile(path) as archive:
        saved_program = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("models/model.json"))))
    assert bool(saved_program["guards_code"]) == (model is Strided)  # the dropped guards' path is taken
    assert ("Pow(Symbol(" in json.dumps(saved_program)) == (model is Gram)  # a size squared, as torch writes it
    program = torch_model._load_program(path)
    expected, got = module(example), program.module()(example)
    for want, have in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)):
        torch.testing.assert_close(have, want)


class WithMode(nn.Module):
    """A second, string input: torch.export keeps it as a constant input whose value program.module()
    writes into the guard source it runs (L['mode'] == '<value>')."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x, mode: str):
        return self.fc(self.conv(x).mean((2, 3)))


def with_mode(marker):
    evil = f"x' or __import__('pathlib').Path('{marker}').touch() or 'x"  # the guard holds: the export goes on

    def change(name, data, archive):
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        module = program["graph_module"]
        for value in module["graph"]["inputs"]:
            if "as_string" in value:
                value["as_string"] = evil
        for spec in module["signature"]["input_specs"]:
            if "constant_input" in spec:
                spec["constant_input"]["value"]["as_string"] = evil
        return json.dumps(program).encode()
    change.value = evil
    return change


def test_a_string_input_that_escapes_its_guard_is_refused_and_guards_are_never_built(tmp_path, capsys, monkeypatch):
    """torch.onnx.export calls program.module(), which wrote a string input's value into guard
    source and ran it (a fourth review: the export went on, exit 0). camface refuses quotes in
    such strings, and no guard function is built while it exports."""
    from torch.export import _unlift

    marker = tmp_path / "ran"
    clean = tmp_path / "clean.pt2"
    batch = torch.export.Dim("batch", min=1, max=32)
    torch.export.save(torch.export.export(WithMode().eval(), (torch.randn(2, 3, SIZE, SIZE), "plain"),
                                          dynamic_shapes=({0: batch}, None)), str(clean))
    change = with_mode(marker)
    evil = rewritten(clean, tmp_path / "evil.pt2", change)
    assert main(["export", str(evil), "-o", str(tmp_path / "cam.onnx"), *EXPORT]) == 2
    assert "holds a quote or a backslash" in capsys.readouterr().err and not marker.exists()
    x = torch.zeros(2, 3, SIZE, SIZE)
    with pt2_archive.no_guard_code(evil):  # the second wall, with the first out of the way
        torch.export.load(str(evil)).module()(x, change.value)
    assert not marker.exists()
    torch.export.load(str(evil)).module()(x, change.value)  # the premise: torch builds and runs the guard
    assert marker.exists()
    seen = []
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: seen.append(_unlift._ok_to_generate_guards_fn()) or
                        real(*a, **k))
    torch_model.to_onnx(clean)
    assert seen == [False] and _unlift._ok_to_generate_guards_fn()


def test_a_damaged_pt2_is_one_line_naming_the_damage(tmp_path, capsys):
    """A .pt2 whose program entry is damaged (a byte changed: its CRC fails) ended in a zipfile
    traceback once camface read the archive itself; it is one line naming the entry."""
    _, clean = saved(tmp_path / "clean.pt2", batch=None)
    data = bytearray(clean.read_bytes())
    at = data.find(b'"graph_module"')
    data[at + 1] = ord("G")
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(bytes(data))
    out = tmp_path / "cam.onnx"
    assert main(["export", str(damaged), "-o", str(out), *EXPORT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a program saved with torch.export.save (Bad CRC-32 for file" in err[0]
    assert "models/model.json" in err[0] and not out.exists()
