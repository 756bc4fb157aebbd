"""The heatmap methods: one registry entry per method, read by every command.

An entry holds the method's name (its output in the CAM graph and its `--method` choice), its
title, its paper, what it needs from the graph, how it is normalised for display, and ONE
`compute` function. `compute` is written against a small array namespace `ops` (see `Ops`), so
the same equations run in numpy (the reference used by tests and `camface guided`), in
TensorFlow (the Keras exporter, `camface.export.graph.TF_OPS`) and as ONNX nodes (the ONNX
exporter). Adding a method means adding an entry here and its test, then re-exporting the
bundled graph (`make models`); `--method`, the window's `m` key, `camface bench`, `camface info`,
the guided figure and graph_spec's list of heatmap outputs all read `METHODS`.

Notation (all at the target layer's resolution h x w, unnormalised): A = activations
[N, h, w, K]; g = d logit_c / dA [N, h, w, K] with logit_c the PRE-softmax score of the
explained class c; w = the linear head's weights of class c per crop, [N, 1, 1, K] (CAM only).
Every `compute` returns [N, h, w] and never modifies its inputs.

This module imports numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

GRADIENTS = "gradients"  # needs g = d logit_c / dA
CLASS_WEIGHTS = "class_weights"  # needs a pooling -> one linear layer head

POSITIVE = "positive"  # ReLU, then divided by the maximum (maps of positive evidence)
MINMAX = "minmax"  # (map - min) / (max - min): maps whose sign carries no "against" meaning


class Ops(Protocol):
    """The array operations a `compute` function may use (besides +, -, *, / and scalars).

    axis: an int or a tuple of ints; keepdims as numpy.
    """

    def sum(self, x, axis, keepdims: bool = False): ...
    def mean(self, x, axis, keepdims: bool = False): ...
    def relu(self, x): ...
    def square(self, x): ...
    def safe_divide(self, numerator, denominator):
        """numerator / denominator where denominator != 0, else 0."""


class NumpyOps:
    """`Ops` on numpy arrays (float32 in, float32 out)."""

    def sum(self, x, axis, keepdims=False):
        return np.sum(x, axis=axis, keepdims=keepdims)

    def mean(self, x, axis, keepdims=False):
        return np.mean(x, axis=axis, keepdims=keepdims)

    def relu(self, x):
        return np.maximum(x, 0.0)

    def square(self, x):
        return np.square(x)

    def safe_divide(self, numerator, denominator):
        nonzero = denominator != 0
        return np.where(nonzero, numerator / np.where(nonzero, denominator, 1.0), 0.0)


NUMPY = NumpyOps()


@dataclass(frozen=True)
class Method:
    """One heatmap method.

    name: graph output, `--method` choice and what the HUD shows. title: shown in figures.
    paper: citation with the equation used. compute: `compute(ops, A, g, w) -> [N, h, w]`
    (g or w is None when the method does not need it). needs: GRADIENTS and/or CLASS_WEIGHTS.
    normalization: POSITIVE or MINMAX (see `normalize`). tolerance: per precision, a factor on
    the export self-check's tolerance for ill-conditioned maps (1 when absent). display: offered
    in `--method` and the `m` key (a baseline that is not an explanation is not).
    """

    name: str
    title: str
    paper: str
    compute: Callable
    needs: frozenset[str]
    normalization: str = POSITIVE
    tolerance: dict[str, float] = field(default_factory=dict)
    display: bool = True

    def reference(self, activations, gradients=None, class_weights=None) -> np.ndarray:
        """The numpy reference: float [N, h, w, K] inputs -> float32 [N, h, w]."""
        a = np.asarray(activations, np.float32)
        g = None if gradients is None else np.asarray(gradients, np.float32)
        w = None if class_weights is None else np.asarray(class_weights, np.float32)
        return np.asarray(self.compute(NUMPY, a, g, w), np.float32)


def gradcam(ops, a, g, w=None):
    """Grad-CAM (Selvaraju et al., arXiv:1610.02391, eq. 1-2): alpha_k = mean_ij g_ijk,
    map = ReLU(sum_k alpha_k A_k)."""
    alpha = ops.mean(g, axis=(1, 2), keepdims=True)
    return ops.relu(ops.sum(alpha * a, axis=-1))


def gradcampp(ops, a, g, w=None):
    """Grad-CAM++ (Chattopadhay et al., arXiv:1710.11063, eq. 19, closed form for the score
    exp(logit_c)): alpha_ijk = g^2 / (2 g^2 + sum_ab A_abk g^3), w_k = sum_ij alpha_ijk
    ReLU(g_ijk), map = ReLU(sum_k w_k A_k). The positive factor exp(logit_c) scales every w_k
    alike and is dropped. No epsilon in the denominator (pytorch-grad-cam adds 1e-7, which
    dominates when gradients are ~1e-4): alpha is 0 where the denominator is exactly 0 (g = 0
    there, so that position contributes nothing either way)."""
    g2 = ops.square(g)
    g3 = g2 * g
    sum_a = ops.sum(a, axis=(1, 2), keepdims=True)
    alpha = ops.safe_divide(g2, 2.0 * g2 + sum_a * g3)
    weights = ops.sum(alpha * ops.relu(g), axis=(1, 2), keepdims=True)
    return ops.relu(ops.sum(weights * a, axis=-1))


def cam(ops, a, g=None, w=None):
    """CAM (Zhou et al., arXiv:1512.04150, eq. 2): map = sum_k W_kc A_k, with W the weights of
    the linear layer after global average pooling (w: class c's column per crop, [N, 1, 1, K]).
    Signed: negative where the features speak against class c."""
    return ops.sum(w * a, axis=-1)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("gradcam", "Grad-CAM", "Selvaraju et al. 2017, arXiv:1610.02391, eq. 1-2",
           gradcam, frozenset({GRADIENTS})),
    # Grad-CAM++ divides by 2 g^2 + sum(A) g^3, which nears 0 where activations sum negative (a
    # target layer without ReLU): rounding differences between runtimes grow there.
    Method("gradcampp", "Grad-CAM++", "Chattopadhay et al. 2018, arXiv:1710.11063, eq. 19",
           gradcampp, frozenset({GRADIENTS}), tolerance={"fp32": 10.0, "fp16": 2.0}),
    Method("cam", "CAM", "Zhou et al. 2016, arXiv:1512.04150, eq. 2",
           cam, frozenset({CLASS_WEIGHTS}), normalization=MINMAX),
)}


def names(display_only: bool = False) -> tuple[str, ...]:
    """Method names in menu order (the registry's order)."""
    return tuple(name for name, m in METHODS.items() if m.display or not display_only)


def get(name: str) -> Method:
    """The entry for `name`; KeyError listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown heatmap method {name!r}; choose from {', '.join(METHODS)}") from None


def normalize(heatmap: np.ndarray, method: str) -> np.ndarray:
    """Unnormalised heatmap float [h, w] -> float32 [h, w] in [0, 1] for display, as the
    method's entry says: POSITIVE maps are ReLU'd and divided by their maximum (Grad-CAM eq. 2
    keeps only positive influence); MINMAX maps are shifted by their minimum first. A constant
    (or all-negative POSITIVE) map becomes all zeros. The input is not modified."""
    heatmap = np.asarray(heatmap, np.float32)
    entry = METHODS.get(method)
    if entry is not None and entry.normalization == MINMAX and heatmap.size:
        heatmap = heatmap - heatmap.min()
    else:
        heatmap = np.maximum(heatmap, 0.0)
    peak = float(heatmap.max()) if heatmap.size else 0.0
    return heatmap / peak if peak > 1e-12 else np.zeros_like(heatmap)
