"""The heatmap methods: one registry entry per method, read by every command.

An entry holds the method's name (its output in the CAM graph and its `--method` choice), its
title, its paper, what it needs from the graph, how it is normalised for display, and ONE
`compute` function. `compute` is written against a small array namespace `ops` (see `Ops`), so
the same equations run in numpy (the reference used by tests and `camface guided`), in
TensorFlow (the Keras exporter, `camface.export.graph.TF_OPS`) and as ONNX nodes (the ONNX
exporter). Adding a method means adding an entry here and its test, then re-exporting the
bundled graph (`make models`); `--method`, the window's `m` key, `camface bench`, `camface info`,
the guided figure and graph_spec's list of heatmap outputs all read `METHODS`.

Two kinds of method. Most compute a map from (A, g, w) alone. Gradient-free methods that run
part of the model again (Ablation-CAM, Score-CAM) need HEAD or FORWARD and are handed a runtime
`ops` (see `ModelOps`) that also offers `ops.head(variants, count, chunk)` (the target -> logits
part on modified activations) and `ops.forward(variants, count, chunk)` (the whole model on
modified normalised images, `ops.images`); each runtime provides them: `ModelCalls` here (numpy,
around callables: a TensorFlow model, an ONNX Runtime session, a torch model), the sub-models in
TensorFlow (`camface.export.graph`) and, in ONNX, the head or model cloned inside the CAM graph
in a Loop over chunks, its weights shared (`camface.export.onnx_rerun`). Adding such a method is
still one entry here and its test.

Notation (all at the target layer's resolution h x w, unnormalised): A = activations
[N, h, w, K]; g = d logit_c / dA [N, h, w, K] with logit_c the PRE-softmax score of the
explained class c; w = the linear head's weights of class c per crop, [N, 1, 1, K] (CAM only).
Every `compute` returns [N, h, w] and never modifies its inputs.

This module imports numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# The version of the methods' maths, recorded in every CAM graph at export (graph_spec
# META_METHODS_VERSION): bump it whenever a `compute` below changes what it returns (an equation,
# a constant such as EIGEN_SQUARINGS), so that a graph whose maps were built by
# other formulas than this camface's numpy references is told apart. Adding a method does not
# change the others' maths: no bump.
VERSION = 1

GRADIENTS = "gradients"  # needs g = d logit_c / dA
CLASS_WEIGHTS = "class_weights"  # needs a pooling -> one linear layer head
HEAD = "head"  # runs the head (target -> logits) again: ops.head, ops.class_logit
FORWARD = "forward"  # runs the whole model again: ops.forward, ops.images
RERUNS = frozenset({HEAD, FORWARD})  # the gradient-free methods that re-run part of the model

POSITIVE = "positive"  # ReLU, then divided by the maximum (maps of positive evidence)
MINMAX = "minmax"  # (map - min) / (max - min): maps whose sign carries no "against" meaning
FLAT_PEAK = 1e-12  # `normalize` shows a map whose peak (ReLU'd or shifted) is at most this as zeros


class Ops(Protocol):
    """The array operations a `compute` function may use (besides +, -, *, /, unary - and Python
    float scalars, which are float32 constants: the random baseline's hash needs float32
    arithmetic, without fused multiply-adds). A compute function may read `a.shape[1:]` of the
    activations it is given (static height, width and channels; not of results of ops).

    axis: an int or a tuple of ints; keepdims as numpy.
    """

    def sum(self, x, axis, keepdims: bool = False): ...
    def mean(self, x, axis, keepdims: bool = False): ...
    def relu(self, x): ...
    def square(self, x): ...
    def safe_divide(self, numerator, denominator):
        """numerator / denominator where denominator != 0, else 0."""
    def max(self, x, axis, keepdims: bool = False):
        """Largest element along `axis` (a reduction, as numpy.max)."""
    def sqrt(self, x): ...
    def floor(self, x): ...
    def cumsum(self, x, axis: int):
        """Inclusive cumulative sum along one axis (an int), as numpy.cumsum."""
    def matmul(self, a, b):
        """Matrix product over the last two axes, [N, m, k] x [N, k, n], as numpy.matmul."""
    def transpose(self, x, axes: tuple[int, ...]):
        """x with its axes permuted, as numpy.transpose with an explicit `axes`."""
    def reshape(self, x, shape: tuple[int, ...]):
        """x in a new shape (ints, one of them -1: the batch), as numpy.reshape."""
    def min(self, x, axis, keepdims: bool = False): ...
    def exp(self, x): ...
    def expand_dims(self, x, axis: int):
        """x with a new axis of length 1 at `axis` (an int), as numpy.expand_dims."""
    def take(self, x, indices, axis: int):
        """x's entries at int64 `indices` [B] along `axis`, as numpy.take."""
    def one_hot(self, indices, depth: int):
        """float32 [B, depth], row b one at indices[b] (int64 [B]) and zero elsewhere."""


class ModelOps(Ops, Protocol):
    """`Ops` plus the model, for the methods that need HEAD or FORWARD. Bound to one batch of N
    crops, each with its explained class c_n.

    variants(k) -> the modified batch for the variant indices k (int64 [B], 0 <= k < count),
    [N, B, ...] (crop n's variant k[b] at [n, b]); the runtime calls it once per chunk of at most
    `chunk` indices (so at most N * chunk rows run at once) and returns the explained class's
    pre-softmax logit of every variant, float32 [N, count].
    """

    images: object  # the normalised model input, float32 [N, H, W, C] (NHWC, the model's colour order)
    class_logit: object  # logit_c of each unmodified crop, float32 [N, 1]

    def head(self, variants: Callable, count: int, chunk: int):
        """logit_c of the head (target -> logits) on variants [N, B, h, w, K] of A."""
    def forward(self, variants: Callable, count: int, chunk: int):
        """logit_c of the whole model on variants [N, B, H, W, C] of `images`."""


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

    def max(self, x, axis, keepdims=False):
        return np.max(x, axis=axis, keepdims=keepdims)

    def sqrt(self, x):
        return np.sqrt(x)

    def floor(self, x):
        return np.floor(x)

    def cumsum(self, x, axis):
        return np.cumsum(x, axis=axis, dtype=x.dtype)

    def matmul(self, a, b):
        return np.matmul(a, b)

    def transpose(self, x, axes):
        return np.transpose(x, axes)

    def reshape(self, x, shape):
        return np.reshape(x, shape)

    def min(self, x, axis, keepdims=False):
        return np.min(x, axis=axis, keepdims=keepdims)

    def exp(self, x):
        return np.exp(x)

    def expand_dims(self, x, axis):
        return np.expand_dims(x, axis)

    def take(self, x, indices, axis):
        return np.take(x, indices, axis=axis)

    def one_hot(self, indices, depth):
        return np.eye(depth, dtype=np.float32)[indices]


NUMPY = NumpyOps()


class Chunked:
    """`ModelOps.head` / `.forward` as a loop over chunks of variants, for runtimes that run
    Python per call (numpy, TensorFlow tracing). The class needs `_logits_of_head(x)`,
    `_logits_of_model(x)` (float32 rows -> [rows, classes]), `_classes` (float32 one-hot
    [N, classes] of the explained classes), `_indices(start, stop)` and `_concat(parts, axis)`."""

    def head(self, variants, count, chunk):
        return self._scores(self._logits_of_head, variants, count, chunk)

    def forward(self, variants, count, chunk):
        return self._scores(self._logits_of_model, variants, count, chunk)

    def _scores(self, logits_of, variants, count, chunk):
        parts = []
        for start in range(0, int(count), int(chunk)):
            stop = min(start + int(chunk), int(count))
            batch = variants(self._indices(start, stop))  # [N, B, ...]
            rows = self.reshape(batch, (-1, *(int(d) for d in batch.shape[2:])))
            logits = self.reshape(logits_of(rows), (-1, stop - start, int(self._classes.shape[-1])))
            parts.append(self.sum(logits * self.expand_dims(self._classes, 1), axis=-1))  # [N, B]
        return self._concat(parts, 1)


class ModelCalls(Chunked, NumpyOps):
    """`ModelOps` in numpy around callables (the reference of HEAD / FORWARD methods).

    head: float32 activations [M, h, w, K] (NHWC) -> logits [M, classes]; forward: normalised
    images float32 [M, H, W, C] (NHWC) -> logits [M, classes]; images: the batch's normalised
    images [N, H, W, C]; activations: its A [N, h, w, K]; class_index int [N] (-1: predicted).
    Either callable may be None when no method asks for it. Wrap a TensorFlow model, an ONNX
    Runtime session or a torch model (with its NCHW transposes) in these callables.
    """

    def __init__(self, head, forward, images, activations, class_index):
        self._head, self._forward = head, forward
        self.images = np.asarray(images, np.float32)
        activations = np.asarray(activations, np.float32)
        logits = np.asarray(head(activations) if head is not None else forward(self.images), np.float32)
        index = np.asarray(class_index).astype(np.int64)
        chosen = np.where(index < 0, logits.argmax(-1), index)
        self._classes = np.eye(logits.shape[-1], dtype=np.float32)[chosen]
        self.class_logit = logits[np.arange(len(chosen)), chosen][:, None]

    def _logits_of_head(self, rows):
        return np.asarray(self._head(rows), np.float32)

    def _logits_of_model(self, rows):
        return np.asarray(self._forward(np.ascontiguousarray(rows)), np.float32)

    def _indices(self, start, stop):
        return np.arange(start, stop, dtype=np.int64)

    def _concat(self, parts, axis):
        return np.concatenate(parts, axis=axis)


@dataclass(frozen=True)
class Method:
    """One heatmap method.

    name: graph output, `--method` choice and what the HUD shows. title: shown in figures.
    paper: citation with the equation used. compute: `compute(ops, A, g, w) -> [N, h, w]`
    (g or w is None when the method does not need it). needs: GRADIENTS and/or CLASS_WEIGHTS.
    normalization: POSITIVE or MINMAX (see `normalize`). display: offered
    in `--method` and the `m` key (a baseline that is not an explanation is not). chunk (HEAD /
    FORWARD methods): variants per crop in one pass of the head or model (`ModelOps`).
    """

    name: str
    title: str
    paper: str
    compute: Callable
    needs: frozenset[str]
    normalization: str = POSITIVE
    display: bool = True
    chunk: int = 0

    @property
    def reruns(self) -> bool:
        """True for a method that runs the head or the model again (HEAD / FORWARD)."""
        return bool(self.needs & RERUNS)

    def passes(self, channels: int) -> str:
        """What one crop costs beyond the graph's forward pass, in words (`camface info`, bench)."""
        if FORWARD in self.needs:
            return f"{channels} forward passes per crop"
        if HEAD in self.needs:
            return f"{channels} head passes per crop"
        return "one backward pass through the head" if GRADIENTS in self.needs else "activations only"

    def reference(self, activations, gradients=None, class_weights=None, model: ModelCalls | None = None
                  ) -> np.ndarray:
        """The numpy reference: float [N, h, w, K] inputs -> float32 [N, h, w]. model: the
        batch's `ModelCalls`, for HEAD / FORWARD methods (ValueError without it)."""
        a = np.asarray(activations, np.float32)
        g = None if gradients is None else np.asarray(gradients, np.float32)
        w = None if class_weights is None else np.asarray(class_weights, np.float32)
        if self.reruns and model is None:
            raise ValueError(f"{self.name} runs the model again: pass model=ModelCalls(...)")
        return np.asarray(self.compute(model if self.reruns else NUMPY, a, g, w), np.float32)


def gradcam(ops, a, g, w=None):
    """Grad-CAM (Selvaraju et al., arXiv:1610.02391, eq. 1-2): alpha_k = mean_ij g_ijk,
    map = ReLU(sum_k alpha_k A_k)."""
    alpha = ops.mean(g, axis=(1, 2), keepdims=True)
    return ops.relu(ops.sum(alpha * a, axis=-1))


def gradcampp(ops, a, g, w=None):
    """Grad-CAM++ (Chattopadhay et al., arXiv:1710.11063, eq. 19, closed form for the score
    exp(logit_c)): alpha_ijk = g^2 / (2 g^2 + S_k g^3) with S_k = sum_ab A_abk, w_k = sum_ij
    alpha_ijk ReLU(g_ijk), map = ReLU(sum_k w_k A_k). The positive factor exp(logit_c) scales
    every w_k alike and is dropped.

    Where g > 0 (the only places ReLU(g) keeps), alpha ReLU(g) = g / (2 + S_k g): that form is
    computed, so no g^3 is formed and nothing is divided by a vanishing g^2.

    Target layers without ReLU (camface's choice): the
    paper derives alpha for A >= 0, where S_k >= 0 and alpha lies in (0, 1/2]. Where a channel's
    activations sum negative, 2 + S_k g passes through 0 as g grows and the weight changes sign
    or explodes with the rounding of S_k (at the bundled model's add_3 this made the map depend
    on the CPU). camface uses S_k^+ = max(S_k, 0): identical to the paper wherever A >= 0, and
    otherwise alpha stays in (0, 1/2] (each position with g > 0 adds g / 2 to w_k, as if S_k = 0),
    so the denominator is at least 2 and the map is as well conditioned as Grad-CAM's. No
    epsilon (pytorch-grad-cam adds 1e-7 to the denominator, which dominates when gradients are
    ~1e-4)."""
    positive = ops.relu(g)
    sum_a = ops.relu(ops.sum(a, axis=(1, 2), keepdims=True))  # S_k^+ [N, 1, 1, K]
    weights = ops.sum(positive / (2.0 + sum_a * positive), axis=(1, 2), keepdims=True)
    return ops.relu(ops.sum(weights * a, axis=-1))


def cam(ops, a, g=None, w=None):
    """CAM (Zhou et al., arXiv:1512.04150, eq. 2): map = sum_k W_kc A_k, with W the weights of
    the linear layer after global average pooling (w: class c's column per crop, [N, 1, 1, K]).
    Signed: negative where the features speak against class c."""
    return ops.sum(w * a, axis=-1)


def hirescam(ops, a, g, w=None):
    """HiResCAM (Draelos & Carin, arXiv:2011.08891, sec. 3): map = sum_k g_k * A_k, the
    element-wise product summed over channels, without Grad-CAM's spatial averaging of g.
    Signed (negative: against class c); the display keeps the positive part (POSITIVE)."""
    return ops.sum(g * a, axis=-1)


def gradcamelementwise(ops, a, g, w=None):
    """Grad-CAM element-wise (pytorch-grad-cam's GradCAMElementWise, a HiResCAM variant):
    map = sum_k ReLU(g_k * A_k): every position's positive contributions only."""
    return ops.sum(ops.relu(g * a), axis=-1)


def xgradcam(ops, a, g, w=None):
    """XGrad-CAM (Fu et al., arXiv:2008.02312, its weight alpha_k): w_k = sum_ij (A_ijk /
    sum_ab |A_abk|) g_ijk, map = ReLU(sum_k w_k A_k).

    Target layers without ReLU (camface's choice): the paper derives the weight for A >= 0,
    where sum_ab A = sum_ab |A|. A channel of mixed signs can sum to ~0, and the paper's
    sum_ab A in the denominator then gives it an arbitrarily large weight whose size and sign
    follow the rounding of that sum. camface divides by sum_ab |A_abk| instead: identical to the
    paper wherever A >= 0, and |w_k| <= max |g_k| everywhere, so the map is as well conditioned
    as Grad-CAM's. w_k is 0 where the channel is zero everywhere (its numerator is 0 too). No
    epsilon (pytorch-grad-cam adds 1e-7, which changes the weights of weak channels)."""
    magnitude = ops.sum(ops.relu(a) + ops.relu(-a), axis=(1, 2), keepdims=True)  # sum |A|, exact
    weights = ops.safe_divide(ops.sum(g * a, axis=(1, 2), keepdims=True), magnitude)
    return ops.relu(ops.sum(weights * a, axis=-1))


def layercam(ops, a, g, w=None):
    """LayerCAM (Jiang et al., IEEE TIP 30:5875, 2021): map = ReLU(sum_k ReLU(g_k) * A_k),
    each position weighted by its own positive gradient."""
    return ops.relu(ops.sum(ops.relu(g) * a, axis=-1))


EIGEN_SQUARINGS = 6  # 2^6 = 64 power-iteration steps (convergence: benchmarks/eigen_convergence.py)


def first_component(ops, x, dims: tuple[int, int, int], squarings: int = EIGEN_SQUARINGS):
    """Projection on the first principal component: x float [N, h, w, K] (dims = (h, w, K),
    static), seen per crop as the
    (h w) x K matrix X of positions x channels, centred per channel (minus its spatial mean);
    returns X v_1 [N, h, w], v_1 the first right singular vector of X (numpy:
    `U, S, Vt = svd(X); X @ Vt[0]`), with the sign that makes the largest-magnitude entry
    positive. ONNX has no SVD, so: the power method on the Gram matrix G = X X^T [h w, h w],
    u = G^(2^squarings) X 1 (the channel sum as the start vector), with G squared `squarings`
    times (each time divided by its largest entry, G being positive semi-definite), then
    v = X^T u / |X^T u|, map = X v. The error of u shrinks as (s_2 / s_1)^(2^(squarings + 1))
    for singular values s_1 > s_2. When the map has more positions than channels (h w > K), the
    same v comes from the K x K matrix C = X^T X instead: X^T G^(2^s) X 1 = C^(2^s) C 1, so
    v = C^(2^s) C 1 / |...| (equal up to rounding; C squared `squarings` times the same way).
    Cost per crop: min(h w, K)^2 max(h w, K) + squarings min(h w, K)^3 multiply-adds (8x8x64:
    1.8 M; 7x7x2048: 5.6 M; a 32x32 map of 8 channels: 0.07 M, against 6.4 G on its positions).
    A crop whose X is 0 gives a map of zeros. X is divided by (about) its largest magnitude first
    and the map multiplied back by it: |X^T u|^2 holds X to the fourth power, which left float32's
    range for activations near 1e-11 (a random-weight MobileNetV2): TensorFlow flushed it to 0
    (an all-zero map) where ONNX Runtime kept a subnormal (a map), and the export failed."""
    height, width, channels = (int(d) for d in dims)
    x = ops.reshape(x - ops.mean(x, axis=(1, 2), keepdims=True), (-1, height * width, channels))
    # between max |X| and twice it, 0 only where X is 0; [N, 1, 1]
    scale = ops.relu(ops.max(x, axis=(1, 2), keepdims=True)) + ops.relu(ops.max(-x, axis=(1, 2), keepdims=True))
    x = ops.safe_divide(x, scale)
    if height * width <= channels:
        gram = _squared(ops, ops.matmul(x, ops.transpose(x, (0, 2, 1))), squarings)  # [N, hw, hw]
        u = ops.matmul(gram, ops.sum(x, axis=-1, keepdims=True))  # [N, hw, 1]
        v = _unit(ops, ops.sum(x * u, axis=1, keepdims=True))  # [N, 1, K]
    else:
        covariance = ops.matmul(ops.transpose(x, (0, 2, 1)), x)  # [N, K, K]
        start = ops.sum(covariance, axis=-1, keepdims=True)  # C 1 = X^T X 1: [N, K, 1]
        v = _unit(ops, ops.transpose(ops.matmul(_squared(ops, covariance, squarings), start), (0, 2, 1)))
    projection = ops.sum(x * v, axis=-1)  # [N, hw]
    peak = ops.max(projection, axis=1, keepdims=True)
    trough = ops.max(-projection, axis=1, keepdims=True)
    return ops.reshape(_sign_or_one(ops, peak - trough) * projection * ops.reshape(scale, (-1, 1)),
                       (-1, height, width))


def _squared(ops, gram, squarings: int):
    """gram^(2^squarings) [N, m, m], divided by its largest entry before each squaring (a
    positive semi-definite gram's largest entry is on its diagonal: no overflow)."""
    for _ in range(squarings):
        gram = ops.safe_divide(gram, ops.max(gram, axis=(1, 2), keepdims=True))
        gram = ops.matmul(gram, gram)
    return gram


def _unit(ops, x):
    """x / |x|_2 over the last axis (0 where |x| = 0)."""
    return ops.safe_divide(x, ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True)))


def _sign_or_one(ops, x):
    """sign(x), with 1 where x = 0."""
    magnitude = ops.sqrt(ops.square(x))
    return ops.safe_divide(x, magnitude) + 1.0 - ops.safe_divide(magnitude, magnitude)


def eigencam(ops, a, g=None, w=None):
    """Eigen-CAM (Muhammad & Yeasin, arXiv:2008.00299): the activations projected on
    their first principal component, L = A_centred v_1 (see `first_component`: power iteration,
    fixed sign). Class-agnostic. pytorch-grad-cam leaves the SVD's sign to chance and then
    applies ReLU, which shows an empty map whenever the sign comes out negative."""
    return first_component(ops, a, a.shape[1:])


def eigengradcam(ops, a, g, w=None):
    """Eigen-Grad-CAM (pytorch-grad-cam's EigenGradCAM): the first principal component
    projection of g * A (as Eigen-CAM, on the class-specific element-wise products)."""
    return first_component(ops, g * a, a.shape[1:])


def random_weights(ops, a):
    """w_nk ~ U(-1, 1) [N, 1, 1, K], seeded by crop n's row in the batch and channel k: a fixed
    hash of the integers (n + 1) * 4099 + (k + 1) with float32 products, sums and floor only
    ("hash without sine", D. Hoskins), so numpy, TensorFlow and every ONNX runtime compute the
    same bits and every run the same weights. Not seeded from the crop's pixels or activations:
    runtimes round activations differently, and a hash of them would differ between them."""
    ones = ops.mean(a * 0.0, axis=(1, 2), keepdims=True) + 1.0  # [N, 1, 1, K]
    seed = ops.cumsum(ones, axis=0) * 4099.0 + ops.cumsum(ones, axis=3)
    p = _fraction(ops, seed * 0.1031)
    p = p * (p + 33.33)
    p = _fraction(ops, p * (p + p))
    return 2.0 * p - 1.0


def _fraction(ops, x):
    return x - ops.floor(x)


def random_baseline(ops, a, g=None, w=None):
    """Random baseline (the "random" floor of faithfulness scores, e.g. Petsiuk et al.,
    arXiv:1806.07421 sec. 4): map = sum_k w_k A_k with w_k ~ U(-1, 1) (see `random_weights`),
    knowing nothing of the class or the gradients. Not offered for display."""
    return ops.sum(random_weights(ops, a) * a, axis=-1)


# variants per crop in one pass: pytorch-grad-cam's batch sizes (AblationCAM 32, ScoreCAM 16)
ABLATION_CHUNK, SCORE_CHUNK = 32, 16


def ablationcam(ops, a, g=None, w=None):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020, eq. 3): w_k = (y_c - y_c^k) / y_c, with y_c
    the explained class's logit and y_c^k the logit when channel k of A is set to 0 (the head
    only runs again: K head passes per crop, `chunk` at a time), map = ReLU(sum_k w_k A_k).

    As pytorch-grad-cam 1.5.7's AblationCAM (ablation_cam.py, ablation_layer.py): the target is
    the pre-softmax logit (ClassifierOutputTarget), every channel is ablated
    (ratio_channels_to_ablate 1.0), the weights are divided by y_c (so a negative y_c flips the
    map, as there), the map is ReLU'd before display. Ablation value: always 0, as the paper.
    pytorch-grad-cam uses 0 only when min(A) == 0 (a post-ReLU target, the usual case, where
    both agree) and min(A) - 1e7 otherwise; camface keeps 0 at targets that can be negative (the
    bundled model's add_3): a 1e7 activation drives the head far outside anything it was
    trained on. Division: 0 where y_c = 0."""
    channels = int(a.shape[3])

    def ablated(k):  # [N, B, h, w, K]: crop n with channel k[b] zeroed
        keep = 1.0 - ops.one_hot(k, channels)  # [B, K]
        return ops.expand_dims(a, 1) * ops.reshape(keep, (1, -1, 1, 1, channels))

    scores = ops.head(ablated, channels, ABLATION_CHUNK)  # [N, K]
    weights = ops.safe_divide(ops.class_logit - scores, ops.class_logit)
    return ops.relu(ops.sum(ops.reshape(weights, (-1, 1, 1, channels)) * a, axis=-1))


def bilinear_matrix(source: int, size: int) -> np.ndarray:
    """float32 [size, source]: 1-D linear interpolation from `source` samples to `size`, corners
    aligned (torch.nn.UpsamplingBilinear2d, i.e. align_corners=True: output i reads input
    i * (source - 1) / (size - 1)). Rows sum to 1."""
    matrix = np.zeros((size, source), np.float64)
    where = np.arange(size) * ((source - 1) / (size - 1) if size > 1 else 0.0)
    low = np.minimum(np.floor(where).astype(int), source - 1)
    high = np.minimum(low + 1, source - 1)
    frac = where - low
    np.add.at(matrix, (np.arange(size), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(size), high), frac)
    return matrix.astype(np.float32)


def scorecam(ops, a, g=None, w=None):
    """Score-CAM (Wang et al., CVPRW 2020, arXiv:1910.01279, eq. 3-4 and Alg. 1): each channel
    A_k, upsampled bilinearly to the input size and min-max normalised to [0, 1], masks the
    normalised input image; the masked images' class scores, softmaxed over the K channels, are
    the weights: map = ReLU(sum_k w_k A_k). K forward passes per crop, `chunk` at a time.

    As pytorch-grad-cam 1.5.7's ScoreCAM (score_cam.py), which departs from the paper: the score
    is the pre-softmax logit of the class (the paper: the softmax probability, minus the
    baseline's), the softmax runs over the channels' logits, the upsampling aligns corners
    (UpsamplingBilinear2d), the normalisation adds 1e-8 to max - min, and the mask multiplies
    the normalised model input (after mean / std, not the pixels). Upsampling is two small
    interpolation matrices (`bilinear_matrix`), so every runtime computes it alike."""
    height, width, channels = (int(d) for d in a.shape[1:])
    image_height, image_width = (int(d) for d in ops.images.shape[1:3])
    rows = bilinear_matrix(height, image_height)  # [H, h]
    columns = np.ascontiguousarray(bilinear_matrix(width, image_width).T)  # [w, W]

    def masked(k):  # [N, B, H, W, C]: crop n's image times channel k[b]'s mask
        maps = ops.transpose(ops.take(a, k, axis=3), (0, 3, 1, 2))  # [N, B, h, w]
        up = ops.matmul(ops.matmul(rows, maps), columns)  # [N, B, H, W]
        low = ops.min(up, axis=(2, 3), keepdims=True)
        high = ops.max(up, axis=(2, 3), keepdims=True)
        mask = (up - low) / (high - low + 1e-8)
        return ops.expand_dims(ops.images, 1) * ops.expand_dims(mask, 4)

    scores = ops.forward(masked, channels, SCORE_CHUNK)  # [N, K]
    weights = ops.exp(scores - ops.max(scores, axis=1, keepdims=True))
    weights = weights / ops.sum(weights, axis=1, keepdims=True)
    return ops.relu(ops.sum(ops.reshape(weights, (-1, 1, 1, channels)) * a, axis=-1))


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("gradcam", "Grad-CAM", "Selvaraju et al. 2017, arXiv:1610.02391, eq. 1-2",
           gradcam, frozenset({GRADIENTS})),
    # Grad-CAM++ and XGrad-CAM: conditioned at target layers without ReLU (see their docstrings).
    Method("gradcampp", "Grad-CAM++", "Chattopadhay et al. 2018, arXiv:1710.11063, eq. 19 (camface: S+)",
           gradcampp, frozenset({GRADIENTS})),
    Method("cam", "CAM", "Zhou et al. 2016, arXiv:1512.04150, eq. 2",
           cam, frozenset({CLASS_WEIGHTS}), normalization=MINMAX),
    # HiResCAM is signed; its positive part is the evidence for the class (as Grad-CAM's).
    Method("hirescam", "HiResCAM", "Draelos & Carin 2020, arXiv:2011.08891: sum_k g * A",
           hirescam, frozenset({GRADIENTS})),
    Method("gradcamelementwise", "Grad-CAM element-wise", "pytorch-grad-cam GradCAMElementWise",
           gradcamelementwise, frozenset({GRADIENTS})),
    Method("xgradcam", "XGrad-CAM", "Fu et al. 2020, arXiv:2008.02312 (camface: sum |A| as the denominator)",
           xgradcam, frozenset({GRADIENTS})),
    Method("layercam", "LayerCAM", "Jiang et al. 2021, IEEE TIP 30:5875: ReLU(g) * A",
           layercam, frozenset({GRADIENTS})),
    # Eigen maps: the sign is a convention and 0 is the spatial mean (centring), so neither sign
    # means "against": min-max.
    Method("eigencam", "Eigen-CAM", "Muhammad & Yeasin 2020, arXiv:2008.00299: first principal component",
           eigencam, frozenset(), normalization=MINMAX),
    Method("eigengradcam", "Eigen-Grad-CAM", "pytorch-grad-cam EigenGradCAM (Eigen-CAM of g * A)",
           eigengradcam, frozenset({GRADIENTS}), normalization=MINMAX),
    # Gradient-free, re-running part of the model (ModelOps).
    Method("ablationcam", "Ablation-CAM", "Desai & Ramaswamy 2020, WACV, eq. 3 (as pytorch-grad-cam 1.5.7)",
           ablationcam, frozenset({HEAD}), chunk=ABLATION_CHUNK),
    Method("scorecam", "Score-CAM", "Wang et al. 2020, arXiv:1910.01279 (as pytorch-grad-cam 1.5.7)",
           scorecam, frozenset({FORWARD}), chunk=SCORE_CHUNK),
    Method("random", "Random", "random channel weights, the faithfulness floor",
           random_baseline, frozenset(), normalization=MINMAX, display=False),
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
    MINMAX map, and a POSITIVE map with nothing above 0, become all zeros; a constant positive
    POSITIVE map becomes all ones (the same evidence everywhere). The input is not modified.
    An unknown `method` raises KeyError listing the valid names (as `get`)."""
    heatmap = np.asarray(heatmap, np.float32)
    if get(method).normalization == MINMAX and heatmap.size:
        heatmap = heatmap - heatmap.min()
    else:
        heatmap = np.maximum(heatmap, 0.0)
    peak = float(heatmap.max()) if heatmap.size else 0.0
    return heatmap / peak if peak > FLAT_PEAK else np.zeros_like(heatmap)
