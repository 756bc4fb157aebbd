"""ONNX_OPS (camface.export.onnx_ops) against camface.methods.NumpyOps, op by op, and every
registry method written as ONNX nodes against its numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
from onnx_helpers import run_nodes  # noqa: E402

from camface import methods  # noqa: E402
from camface.export.onnx_builder import GraphBuilder  # noqa: E402
from camface.export.onnx_ops import ONNX_OPS, OnnxTensor  # noqa: E402


class Reference(methods.NumpyOps):
    """NumpyOps plus numpy for the extra ops (the numpy meaning ONNX_OPS must match)."""

    def __getattr__(self, name):
        return {"maximum": np.maximum, "minimum": np.minimum, "matmul": np.matmul,
                "transpose": np.transpose, "reshape": np.reshape, "sqrt": np.sqrt,
                "abs": np.abs, "exp": np.exp, "log": np.log, "sign": np.sign, "tanh": np.tanh,
                "max": lambda x, axis=None, keepdims=False: np.max(x, axis=axis, keepdims=keepdims),
                "min": lambda x, axis=None, keepdims=False: np.min(x, axis=axis, keepdims=keepdims),
                "prod": lambda x, axis=None, keepdims=False: np.prod(x, axis=axis, keepdims=keepdims),
                "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "negative": np.negative,
                "clip": np.clip, "expand_dims": np.expand_dims, "squeeze": np.squeeze}[name]


CASES = {
    "sum_axes": lambda o, x, y: o.sum(x, axis=(1, 2)),
    "sum_keepdims": lambda o, x, y: o.sum(x, axis=-1, keepdims=True),
    "mean": lambda o, x, y: o.mean(x, axis=(1, 2), keepdims=True),
    "relu": lambda o, x, y: o.relu(x),
    "square": lambda o, x, y: o.square(x),
    "safe_divide": lambda o, x, y: o.safe_divide(x, o.relu(y)),
    "operators": lambda o, x, y: (2.0 * x + 1.0 - y) / 3.0 - x * y,
    "reflected": lambda o, x, y: 1.0 - x / (2.0 + o.square(y)),
    "power": lambda o, x, y: o.relu(x) ** 3.0,
    "negation": lambda o, x, y: -x,
    "max": lambda o, x, y: o.max(x, axis=(1, 2)),
    "min": lambda o, x, y: o.min(x, axis=-1, keepdims=True),
    "prod": lambda o, x, y: o.prod(x, axis=3),
    "maximum": lambda o, x, y: o.maximum(x, y),
    "maximum_scalar": lambda o, x, y: o.maximum(x, 0.25),
    "minimum": lambda o, x, y: o.minimum(x, y),
    "clip": lambda o, x, y: o.clip(x, -0.5, 0.5),
    "matmul": lambda o, x, y: o.matmul(x, o.transpose(y, (0, 1, 3, 2))),
    "transpose": lambda o, x, y: o.transpose(x, (0, 3, 1, 2)),
    "reshape": lambda o, x, y: o.reshape(x, (2, -1, 5)),
    "sqrt": lambda o, x, y: o.sqrt(o.abs(x)),
    "abs": lambda o, x, y: o.abs(x),
    "exp": lambda o, x, y: o.exp(x),
    "log": lambda o, x, y: o.log(o.abs(x) + 1.0),
    "sign": lambda o, x, y: o.sign(x - y),
    "tanh": lambda o, x, y: o.tanh(x),
    "sigmoid": lambda o, x, y: o.sigmoid(x),
    "negative": lambda o, x, y: o.negative(x),
    "expand_squeeze": lambda o, x, y: o.squeeze(o.expand_dims(x, 1), 1),
    "floor": lambda o, x, y: o.floor(3.0 * x),
    "cumsum_rows": lambda o, x, y: o.cumsum(x, axis=0),
    "cumsum_last": lambda o, x, y: o.cumsum(x, axis=3),
    "take": lambda o, x, y: o.take(x, np.array([4, 0, 4]), axis=3),
    # one_hot takes int64 handles, which no float case makes: Ablation-CAM runs it (test_gradient_free.py)
}


def _run(compute, x, y):
    builder = GraphBuilder(opset=18)
    out = compute(ONNX_OPS, OnnxTensor(builder, "x"), OnnxTensor(builder, "y"))
    return run_nodes(builder.nodes, {"x": x, "y": y}, [out.name], builder.initializers)[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_op_matches_numpy(name):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    y = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    y[0, 0] = 0.0  # safe_divide's zeros
    expected = np.asarray(CASES[name](Reference(), x, y), np.float32)
    got = _run(CASES[name], x, y)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in methods.names() if not methods.get(n).reruns])
def test_every_registry_method_as_onnx_nodes(name):
    """(The methods that run the model again need a whole graph: tests/test_gradient_free.py.)"""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    g = (rng.standard_normal((3, 4, 5, 6)) * 1e-2).astype(np.float32)
    g[1, 0] = 0.0
    w = rng.standard_normal((3, 1, 1, 6)).astype(np.float32)
    method = methods.get(name)
    builder = GraphBuilder(opset=18)
    handles = [OnnxTensor(builder, n, shape=(None, *array.shape[1:])) for n, array in (("a", a), ("g", g), ("w", w))]
    out = method.compute(ONNX_OPS, *handles)
    got = run_nodes(builder.nodes, {"a": a, "g": g, "w": w}, [out.name], builder.initializers)[0]
    np.testing.assert_allclose(got, method.reference(a, g, w), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_reductions_follow_the_opset(opset):
    builder = GraphBuilder(opset=opset)
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = ONNX_OPS.mean(OnnxTensor(builder, "x"), axis=(1, 2))
    got = run_nodes(builder.nodes, {"x": x}, [out.name], builder.initializers, opset=opset)[0]
    np.testing.assert_allclose(got, x.mean(axis=(1, 2)))


def test_onnx_ops_offers_every_numpy_op():
    """An op added to NumpyOps (the registry's reference namespace) needs its ONNX twin here."""
    wanted = {name for name in dir(methods.NumpyOps) if not name.startswith("_")}
    assert wanted <= {name for name in dir(ONNX_OPS) if not name.startswith("_")}
