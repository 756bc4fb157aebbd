"""A small ONNX node writer shared by the gradient rules (`onnx_grad`) and the heatmap ops
(`onnx_ops`): unique names, constants as initializers, reductions that follow the opset.

Only `onnx` (and numpy) are imported; nothing here runs a model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np


class GraphBuilder:
    """Collects nodes and initializers to append to an ONNX graph.

    op(op_type, inputs, **attributes) -> the name of the (first) output; `outputs=n` gives n
    names. const(value, dtype) -> an initializer's name (equal constants are shared). Names are
    `prefix` + a counter, so they never clash with the graph they join (`taken` names).
    """

    def __init__(self, opset: int, prefix: str = "camface/", taken: Iterable[str] = ()):
        self.opset = int(opset)
        self.prefix = prefix
        self.nodes: list = []
        self.initializers: list = []
        self._taken = set(taken)
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def name(self, hint: str = "t") -> str:
        """A fresh tensor/node name starting with `prefix`."""
        while True:
            self._count += 1
            candidate = f"{self.prefix}{hint}_{self._count}"
            if candidate not in self._taken:
                self._taken.add(candidate)
                return candidate

    def op(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1,
           hint: str | None = None, **attributes):
        """Append one node; returns its output name (or the list when outputs is not 1)."""
        from onnx import helper

        hint = hint or op_type.lower()
        names = ([self.name(hint) for _ in range(outputs)] if isinstance(outputs, int)
                 else list(outputs))
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name(hint),
                                           **attributes))
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype=np.float32) -> str:
        """An initializer holding `value` as `dtype` (shared between equal constants)."""
        from onnx import numpy_helper

        array = np.asarray(value, dtype=dtype)
        data = array.tobytes()
        # large ones by digest (a clone per chunk asks for the same interpolation matrices)
        key = (array.dtype.str, array.shape, data if array.size <= 64 else hashlib.sha256(data).digest())
        if key in self._consts:
            return self._consts[key]
        name = self.name("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        self._consts[key] = name
        return name

    def ints(self, values) -> str:
        """An int64 1-D constant (axes, shapes, slice bounds)."""
        return self.const(np.asarray(values, np.int64).reshape(-1), np.int64)

    # Reductions take their axes as an input from opset 18 on (ReduceSum from 13).
    def reduce(self, op_type: str, x: str, axes: Sequence[int] | None, keepdims: bool) -> str:
        """ReduceSum/Mean/Max/Min/Prod over `axes` (None: every axis)."""
        keep = int(bool(keepdims))
        as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes is None:
            return self.op(op_type, [x], keepdims=keep)
        axes = [int(a) for a in axes]
        if as_input:
            return self.op(op_type, [x, self.ints(axes)], keepdims=keep)
        return self.op(op_type, [x], axes=axes, keepdims=keep)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", [x, self.ints(axes)])

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Squeeze", [x, self.ints(axes)])

    def count(self, big: str, small: str) -> str:
        """float32 scalar Size(big) / Size(small): elements averaged per output element."""
        from onnx import TensorProto

        sizes = [self.op("Cast", [self.op("Size", [t])], to=TensorProto.FLOAT) for t in (big, small)]
        return self.op("Div", sizes)
