"""A PyTorch program saved with `torch.export.save` (.pt2) -> forward-only ONNX model, through
`torch.onnx.export(..., dynamo=True)`; the ONNX engine (`onnx_export`) does the rest, so every
framework shares one gradient engine and one set of heatmap equations.

`.pt` / `.pth` files are refused: loading them unpickles, which runs code from the file.
torch is imported inside functions (the `camface[torch]` extra; the live loop never needs it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from camface.errors import CamfaceError, ModelError
from camface.outputs import check_model_file

PICKLE_SUFFIXES = (".pt", ".pth")
DEFAULT_OPSET = 18  # ScatterElements(add) for MaxPool's gradient needs >= 16


HOW_TO_EXPORT = ("ep = torch.export.export(model.eval(), (torch.randn(2, 3, H, W),), "
                 "dynamic_shapes=({0: torch.export.Dim('batch', min=1, max=32)},)); "
                 "torch.export.save(ep, 'model.pt2')")


def _what_it_is(path: Path, exc: Exception) -> str:
    """What a file torch.export.load refused is, when its zip says so (a TorchScript archive or
    a torch.save pickle, renamed), else torch's message without the warnings it points to (they
    are silenced)."""
    import zipfile

    try:
        names = zipfile.ZipFile(path).namelist()
    except (OSError, zipfile.BadZipFile):
        names = []
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "it is a TorchScript archive, saved with torch.jit.save"
    if any(n.endswith("/data.pkl") for n in names):
        return "it is a pickle saved with torch.save (a state dict or a whole model)"
    return str(exc).split(" Please check the warnings above")[0].strip()


def refuse_pickle(path: Path) -> None:
    """ModelError for .pt / .pth: unpickling runs code, like Keras' unsafe mode."""
    raise ModelError(
        f"{path}: camface does not load {path.suffix} files: torch.load unpickles them, which "
        "RUNS CODE FROM THE FILE (like Keras' unsafe mode). Save the model as an exported "
        f"program instead: {HOW_TO_EXPORT}; then camface export model.pt2 ...")


def to_onnx(path: str | Path, opset: int = DEFAULT_OPSET, input_size: tuple[int, int] | None = None):
    """onnx.ModelProto of the exported program at `path` (dynamic batch kept as exported);
    input_size: (H, W) of a program whose height and width are dynamic (ModelError without)."""
    path = Path(path)
    check_model_file(path)
    try:
        import torch
    except ImportError as exc:
        raise CamfaceError(f"{path}: .pt2 models need PyTorch: pip install 'camface[torch]'") from exc
    try:
        # torch logs a traceback (as a warning) for a file it cannot read before it raises:
        # the error below says it in one line
        with _quiet("torch.export"):
            program = torch.export.load(str(path))
    except Exception as exc:  # a zip that is not an exported program raises many types
        raise ModelError(f"{path}: not a program saved with torch.export.save ({_what_it_is(path, exc)}); "
                         f"make one with {HOW_TO_EXPORT}") from exc
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"
                    and n.name in program.graph_signature.user_inputs]
    if len(placeholders) != 1:
        raise ModelError(f"{path}: camface needs a program with one image input "
                         f"(it has {len(placeholders)})")
    example = placeholders[0].meta.get("val")
    if example is None or example.dim() != 4:
        raise ModelError(f"{path}: the program's input must be a 4-D image batch")
    shape = list(example.shape)
    hw = (2, 3) if isinstance(shape[1], int) and shape[1] in (1, 3) else (1, 2)
    if not all(isinstance(shape[a], int) for a in hw):
        if input_size is None:
            raise ModelError(f"{path}: the program's input {[str(d) for d in shape]} has a dynamic "
                             "height and width; pass the size the model was trained on with "
                             "--input-size HxW")
        for axis, value in zip(hw, input_size):
            shape[axis] = int(value)
        # torch.onnx cannot convert every dynamic size (a height of 2*h fails, "expected
        # sympy.Symbol"): the program is exported again at the fixed size, the batch as it was
        batch = None if isinstance(shape[0], int) else {0: torch.export.Dim("batch", min=1, max=32)}
        shape = [d if isinstance(d, int) else 2 for d in shape]
        try:
            with _quiet("torch.export"):
                program = torch.export.export(program.module(), (torch.zeros(shape),),
                                              dynamic_shapes=(batch,) if batch else None)
        except Exception as exc:
            raise ModelError(f"{path}: the program does not run at --input-size "
                             f"{input_size[0]}x{input_size[1]} ({str(exc).splitlines()[0]})") from exc
    shape = [d if isinstance(d, int) else 2 for d in shape]  # SymInt: the dynamic batch
    args = (torch.zeros(shape, dtype=torch.float32),)
    import contextlib
    import io

    try:  # the exporter's optimiser prints its passes to stdout
        with contextlib.redirect_stdout(io.StringIO()):
            exported = torch.onnx.export(program, args, dynamo=True,
                                         opset_version=max(opset, 16), verbose=False)
    except Exception as exc:
        import re

        first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()[0]  # no terminal colours
        raise ModelError(f"{path}: torch.onnx.export fails ({first})") from exc
    return exported.model_proto


@contextlib.contextmanager
def _quiet(logger: str):
    """Logger `logger` at ERROR inside the block (its warnings dropped)."""
    import logging

    log_ = logging.getLogger(logger)
    level = log_.level
    log_.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log_.setLevel(level)
