"""Helpers for the ONNX engine's tests: run a few nodes on ONNX Runtime, and inline PyTorch
models (torchvision does not import beside the pinned torch)."""

from __future__ import annotations

import numpy as np


def run_nodes(nodes, inputs: dict[str, np.ndarray], outputs: list[str], initializers=(),
              opset: int = 18) -> list[np.ndarray]:
    """Build a float32 graph of `nodes` reading `inputs`, run it on ONNX Runtime's CPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        list(nodes), "t",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, inputs)
