"""The bundled BlazeFace `.tflite` detectors -> `.onnx` beside them (`make detectors`).

    python -m camface.export.detectors [--out-dir DIR]

Each model is converted as it is by tf2onnx (opset 17), to the same bytes on every run (its
walks in a fixed order: export/tf2onnx_order.py); the full-range model stores its convolution
weights sparse (46 DENSIFY ops, which tf2onnx 1.17 cannot read), so it is first densified:
TFLite's own interpreter (no delegate, so its DENSIFY kernels run) expands each sparse
constant once, the dense values become that op's output buffer, and the op is removed.
The converted model's outputs are then checked against TFLite's on random inputs (the
pre- and post-processing around them are camface.realtime.blazeface's).

Needs TensorFlow and tf2onnx (the `keras` extra); the live loop needs neither.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from camface.models import DETECTORS, DETECTORS_ONNX
from camface.outputs import output_path


DENSIFY = 124  # tflite BuiltinOperator.DENSIFY
OPSET = 17
TOLERANCE = 1e-3  # largest |onnx - tflite| on raw box/score outputs of magnitude up to ~140
# tf2onnx's command line in a process of its own, so that the counters in the names it makes
# (module globals) start afresh for each model: a model's file does not depend on which were
# converted before it. Within fixed_order (export/tf2onnx_order.py), so that it does not depend on
# the process's string hashes either (its constants were const_fold_opt__323 or __320).
TF2ONNX_IN_FIXED_ORDER = ("from camface.export.tf2onnx_order import fixed_order\n"
                          "from tf2onnx.convert import main\n"
                          "with fixed_order():\n"
                          "    main()\n")


def densified(source: Path, target: Path) -> int:
    """Write `source` with its sparse constants densified to `target`; returns how many."""
    import tensorflow as tf
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(source))
    graph = model.subgraphs[0]
    codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes]
    interpreter = tf.lite.Interpreter(
        model_path=str(source), experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    entry = interpreter.get_input_details()[0]
    interpreter.set_tensor(entry["index"], np.zeros(entry["shape"], entry["dtype"]))
    interpreter.invoke()
    kept, count = [], 0
    for op in graph.operators:
        if codes[op.opcodeIndex] != DENSIFY:
            kept.append(op)
            continue
        sparse, dense = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
        values = interpreter.get_tensor(op.outputs[0])
        if tuple(values.shape) != tuple(dense.shape):
            raise RuntimeError(f"{source}: densified {dense.name!r} has shape {values.shape}, expected {dense.shape}")
        model.buffers[dense.buffer].data = np.frombuffer(values.tobytes(), np.uint8)
        model.buffers[sparse.buffer].data = None  # the sparse copy is no longer read
        sparse.sparsity = None
        count += 1
    graph.operators = kept
    flatbuffer_utils.write_model(model, str(target))
    return count


def largest_difference(tflite_path: Path, onnx_path: Path, trials: int = 3) -> float:
    """Largest |ONNX - TFLite| over both outputs, on `trials` random inputs in [-1, 1]."""
    import onnxruntime as ort
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(tflite_path))
    interpreter.allocate_tensors()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    entry = interpreter.get_input_details()[0]
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(trials):
        x = rng.uniform(-1, 1, entry["shape"]).astype(np.float32)
        interpreter.set_tensor(entry["index"], x)
        interpreter.invoke()
        expected = {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}
        got = session.run(None, {session.get_inputs()[0].name: x})
        for output, value in zip(session.get_outputs(), got):
            worst = max(worst, float(np.abs(value - expected[output.name]).max()))
    return worst


def convert(name: str, out_dir: Path | None = None) -> Path:
    """Convert the bundled detector `name` ("short" or "full"); returns the .onnx path."""
    source, target = DETECTORS[name], DETECTORS_ONNX[name]
    if out_dir is not None:
        target = out_dir / target.name
    with tempfile.TemporaryDirectory() as tmp:
        tflite = Path(tmp) / source.name
        count = densified(source, tflite)
        command = [sys.executable, "-c", TF2ONNX_IN_FIXED_ORDER, "--tflite", str(tflite), "--output", str(target),
                   "--opset", str(OPSET)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"tf2onnx could not convert {source}: {done.stderr.strip().splitlines()[-1:]}")
    import onnx

    model = onnx.load(str(target))
    model.graph.doc_string = f"{source.name} converted by camface.export.detectors"  # not the temporary path
    onnx.save(model, str(target))
    worst = largest_difference(source, target)
    if worst > TOLERANCE:
        raise RuntimeError(f"{target}: outputs differ from {source}'s by {worst:.3g} (> {TOLERANCE})")
    print(f"{source.name} -> {target} ({count} sparse tensors densified; largest output difference {worst:.2g})")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m camface.export.detectors", description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=output_path, default=None, help="write here instead of beside the .tflite files")
    args = parser.parse_args(argv)
    for name in DETECTORS:
        convert(name, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
