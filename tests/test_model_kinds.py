"""A model file of another kind given where a CAM graph is expected (`camface.load`, `camface
info`, live, evaluate) is named for what it is, with the command that makes a CAM graph of it,
in the same words everywhere (`camface.model_kinds.not_a_graph`)."""

import re
import sys
import zipfile

import pytest

import camface
from camface.cli import main as camface_main
from camface.errors import ModelError
from camface.models import DETECTORS, EMOTION_KERAS

DETECTOR = r"is a face-detector TFLite model \(MediaPipe BlazeFace\), not a CAM graph: camface runs its own " \
           r"\(detector='short' or 'full', --detector\); the CAM graph is a face classifier's, made by " \
           r"`camface export CLASSIFIER -o cam.onnx` from a Keras, ONNX or .pt2 classifier \(no model given: " \
           r"the bundled emotion graph\)$"


def _zip(path, names):
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(name, b"{}")
    return path


def _tflite(path, body=b"\x00" * 64):
    """A TFLite flatbuffer's first bytes: a root offset, then the identifier TFL3."""
    path.write_bytes(b"\x1c\x00\x00\x00TFL3" + body)
    return path


def _write(path, data):
    path.write_bytes(data)
    return path


def _copy(source):
    def make(tmp):
        target = tmp / source.name
        target.write_bytes(source.read_bytes())
        return target
    return make


CASES = [
    # both bundled BlazeFace detectors, and one renamed .onnx: found by their content
    *[(_copy(path), "{path} " + DETECTOR) for path in DETECTORS.values()],
    (lambda tmp: _write(tmp / "model.onnx", DETECTORS["short"].read_bytes()), "{path} " + DETECTOR),
    (lambda tmp: _tflite(tmp / "mobilenet.tflite"),
     r"{path} is a TFLite model, not a CAM graph, and camface does not read TFLite: convert it to ONNX "
     r"\(`python -m tf2onnx.convert --tflite {path} --output model.onnx`\) and make a CAM graph of that with "
     r"`camface export model.onnx -o cam.onnx --preset PRESET`, or export the Keras model it came from$"),
    (_copy(EMOTION_KERAS), r"{path} is a Keras model, not a CAM graph: make one with `camface export {path} -o cam.onnx`$"),
    (lambda tmp: _zip(tmp / "m.keras", ["metadata.json", "config.json", "model.weights.h5"]),
     r"{path} is a Keras model, not a CAM graph: make one with `camface export {path} -o cam.onnx`$"),
    # a Keras HDF5 renamed .onnx: export goes by the suffix, so the command names it .h5
    (lambda tmp: _write(tmp / "cam.onnx", EMOTION_KERAS.read_bytes()),
     r"{path} is a Keras model, not a CAM graph: make one with `camface export {stem}.h5 -o cam.onnx` "
     r"\(renamed .h5: export reads a model by its suffix\)$"),
    (lambda tmp: _zip(tmp / "m.pt2", ["m/models/model.json", "m/archive_format", "m/data/weights/weight_0"]),
     r"{path} is a PyTorch exported program \(.pt2\), not a CAM graph: make one with "
     r"`camface export {path} -o cam.onnx --preset torch`$"),
    # named .hdf5, which export reads as a Keras HDF5: the command named it .hdf5
    (lambda tmp: _zip(tmp / "m.hdf5", ["m/models/model.json", "m/archive_format", "m/data/weights/weight_0"]),
     r"{path} is a PyTorch exported program \(.pt2\), not a CAM graph: make one with "
     r"`camface export {stem}.pt2 -o cam.onnx --preset torch` \(renamed .pt2: export reads a model by its suffix\)$"),
    (lambda tmp: _zip(tmp / "m.hdf5", ["metadata.json", "config.json", "model.weights.h5"]),
     r"{path} is a Keras model, not a CAM graph: make one with `camface export {stem}.keras -o cam.onnx` "
     r"\(renamed .keras: export reads a model by its suffix\)$"),
    (lambda tmp: _zip(tmp / "m.pt", ["m/data.pkl", "m/version", "m/data/0"]),
     r"{path} is a PyTorch pickle \(torch.save\), not a CAM graph, and camface does not load pickles \(unpickling "
     r"runs code\): save the model with torch.export.save as a .pt2, then "
     r"`camface export model.pt2 -o cam.onnx --preset torch`$"),
    (lambda tmp: _zip(tmp / "m.pth", ["m/data.pkl", "m/constants.pkl", "m/code/__torch__/m.py"]),
     r"{path} is a TorchScript archive \(torch.jit.save\), not a CAM graph, and camface does not load pickles"),
    # named .onnx: the parser's reason is said too (test_a_damaged_onnx_file_is_said_with_the_parsers_reason)
    (lambda tmp: _write(tmp / "notes.onnx", b"hello world\n"),
     r"{path} is not an ONNX model \(.*\): a CAM graph is the .onnx that `camface export` writes$"),
    (lambda tmp: _write(tmp / "notes.txt", b"hello world\n"),
     r"{path} is not an ONNX model: a CAM graph is the .onnx that `camface export` writes$"),
    (lambda tmp: _write(tmp / "empty.onnx", b""),
     r"{path} is empty \(0 bytes\), not a CAM graph$"),
    # said by its name: info read a video whole before refusing it
    (lambda tmp: _write(tmp / "talk.mp4", bytes(100)),
     r"{path} is a video, not a CAM graph \(.onnx\): a video is a source \(`process_video`, --source\)$"),
]


IDS = ["detector short", "detector full", "detector renamed", "tflite", "keras h5", "keras zip", "keras renamed",
       "pt2", "pt2 named hdf5", "keras zip named hdf5", "pickle", "torchscript", "text", "text not named onnx",
       "empty", "video"]


@pytest.mark.parametrize("make, message", CASES, ids=IDS)
@pytest.mark.parametrize("reader", ["load", "info", "info without onnx"])
def test_another_kind_of_model_is_named_alike_by_load_and_info(tmp_path, capsys, monkeypatch, make, message, reader):
    """The BlazeFace .tflite was 'not an ONNX model (ONNX Runtime cannot parse it)' to `load` and
    'not an ONNX model (Error parsing message with type 'onnx.ModelProto': Wire format was
    corrupt)' to `info`; a .pt or a .tflite the same."""
    path = make(tmp_path)
    expected = "^" + message.format(path=re.escape(str(path)), stem=re.escape(str(path.with_suffix(""))))
    said = _said(path, reader, capsys, monkeypatch)
    assert re.search(expected, said), said


def _said(path, reader, capsys, monkeypatch) -> str:
    """The one line `reader` (load, info, info without onnx) refuses `path` with."""
    if reader == "load":
        with pytest.raises(ModelError) as caught:
            camface.load(path, device="cpu")
        return str(caught.value)
    if reader == "info without onnx":  # the live-loop install reads it with ONNX Runtime
        monkeypatch.setitem(sys.modules, "onnx", None)
    assert camface_main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("camface: error: "), err
    return err[0].removeprefix("camface: error: ")


# ONNX Runtime's reason is said as it words it: only camface's part is asserted (its "ONNX
# Runtime: " label, and ORT's status code "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : " taken off),
# not ORT's sentence, which changes between ORT versions ("Load model from X failed:Protobuf parsing
# failed", "Failed to load model because protobuf parsing failed")
ORT_REASON = r"ONNX Runtime: (?!.*ONNXRuntimeError)(?!.*INVALID_)\S.*"


@pytest.mark.parametrize("damage, reader, reason", [
    ("cut", "load", ORT_REASON),
    ("cut", "info", r"Error parsing message with type 'onnx.ModelProto'.*"),
    ("cut", "info without onnx", ORT_REASON),
    # a protobuf that parses, its graph gone (only the IR version left)
    ("no graph", "load", ORT_REASON),
    ("no graph", "info", r"no graph was found in the protobuf"),
    ("no graph", "info without onnx", ORT_REASON),
])
def test_a_damaged_onnx_file_is_said_with_the_parsers_reason(tmp_path, capsys, monkeypatch, damage, reader, reason):
    """A CAM graph cut short (a copy that stopped) was only 'is not an ONNX model' since the kinds
    of model files were named (protobuf's reason, which `camface info` printed before, was lost);
    a file named .onnx is meant to be one, so the parser's words are said too."""
    said = _said(_damaged(tmp_path, damage), reader, capsys, monkeypatch)
    _assert_not_an_onnx_model(said, tmp_path / "cut.onnx", reason)


@pytest.mark.parametrize("reader", ["load", "info without onnx"])
@pytest.mark.parametrize("status, words", [
    ("7 : INVALID_PROTOBUF", "Load model from {path} failed:Protobuf parsing failed."),
    ("7 : INVALID_PROTOBUF", "Failed to load model because protobuf parsing failed."),
    ("2 : INVALID_ARGUMENT", "No graph was found in the protobuf."),
])
def test_onnx_runtimes_reason_is_said_whatever_its_words(tmp_path, capsys, monkeypatch, reader, status, words):
    """The same line for the sentences ONNX Runtime has worded a file it cannot parse with (its
    session made to raise them): the test above pinned one ORT version's sentence for `info`
    without onnx ("Load model from ... failed:Protobuf parsing failed") and failed on another's."""
    import onnxruntime

    path = _damaged(tmp_path, "cut")
    error = f"[ONNXRuntimeError] : {status} : {words.format(path=path)}"

    def refuse(*args, **kwargs):
        raise RuntimeError(error)

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    said = _said(path, reader, capsys, monkeypatch)
    _assert_not_an_onnx_model(said, path, ORT_REASON)
    assert words.format(path=path).rstrip(".") in said, said  # ORT's reason kept, its status code left out


def _damaged(tmp_path, damage):
    """cut.onnx: the bundled graph cut short ("cut"), or a protobuf with no graph ("no graph")."""
    from camface.models import EMOTION_ONNX

    return _write(tmp_path / "cut.onnx", EMOTION_ONNX.read_bytes()[:50_000] if damage == "cut" else b"\x08\x07")


def _assert_not_an_onnx_model(said, path, reason):
    """`said` names `path` as no ONNX model, for `reason` (a regex), with the command that makes one."""
    assert re.fullmatch(f"{re.escape(str(path))} is not an ONNX model \\({reason}\\): a CAM graph is the .onnx "
                        "that `camface export` writes", said), said


@pytest.mark.parametrize("command", [["live", "--source", "sample", "--no-show"], ["evaluate", "--source", "sample"]])
def test_the_bundled_face_detector_as_the_model_of_a_command(capsys, command):
    path = DETECTORS["short"]
    assert camface_main([*command, "--model", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(f"^camface: error: {re.escape(str(path))} {DETECTOR}", err[0]), err


def _broken_zip(path, broken):
    """A zip of one entry (m/\u00e9/data.pkl) with its central directory record made `broken`:
    "name" (flagged UTF-8, not UTF-8) or "version" (needs zip 12.1 to extract)."""
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("m/\u00e9/data.pkl", b"{}")
    data = bytearray(buffer.getvalue())
    record = data.index(b"PK\x01\x02")
    if broken == "name":
        at = data.index("\u00e9".encode(), record)
        data[at:at + 2] = b"\xff\xfe"
    else:
        data[record + 6] = 121  # the version needed to extract, in tenths
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("make", [
    # an entry flagged UTF-8 whose name is not: zipfile raised UnicodeDecodeError
    lambda tmp: _broken_zip(tmp / "broken.onnx", "name"),
    # an entry whose "version needed" is 12.1: zipfile raised NotImplementedError
    lambda tmp: _broken_zip(tmp / "broken.onnx", "version"),
], ids=["utf-8 name", "zip version"])
@pytest.mark.parametrize("reader", ["load", "info"])
def test_a_broken_zip_is_not_an_onnx_model_in_one_line(tmp_path, capsys, monkeypatch, make, reader):
    """A broken archive renamed .onnx: sniffing it for a PyTorch or Keras zip raised zipfile's
    UnicodeDecodeError or NotImplementedError, a traceback in place of the one line."""
    path = make(tmp_path)
    said = _said(path, reader, capsys, monkeypatch)
    assert re.fullmatch(f"{re.escape(str(path))} is not an ONNX model \\(.*parsing.*\\): a CAM graph "
                        "is the .onnx that `camface export` writes", said), said
