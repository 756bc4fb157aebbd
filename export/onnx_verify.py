"""The ONNX engine's self-check, framework-free (ONNX Runtime only), on one smooth random batch:

1. forward: `probs` (the model's own Softmax/Sigmoid output, else the softmax of its logits)
   and `activations` of the CAM graph against the original model run on the
   same normalised images (|diff| <= 1e-4 min(1, max|ref|) + 1e-3 max|ref|, verify.TOLERANCE fp32);
2. gradient: the graph's d logit_c / dA against central finite differences of the original
   model's logit_c with the target tensor overridden (the extracted head), step eps = FD_STEP |A|:
   a. along the gradient's own direction: |fd - |g|| <= 2e-2 |g| + 1e-4 (1 + |logit_c|) / eps
      + KINK_FACTOR |fd - fd'| (fd' below) (a gradient scaled or of the wrong sign);
   b. along RANDOM_DIRECTIONS random unit directions v_k, which see what (a) cannot: a rule that
      loses part of the gradient where the computed one is zero or small (a LeakyReLU taken for
      a ReLU, a dropped Add/Concat branch, a Mul missing one operand's term, a MaxPool routing
      to the wrong element). <g, v> is about |g| / sqrt(n) for n elements, so in that unit:
         error   = rms_k |fd_k - <g, v_k>|
         allowed = RANDOM_RTOL + rms_k(NOISE_FACTOR noise / eps + KINK_FACTOR |fd_k - fd_k'|)
      with fd_k' the central difference at eps / 2 (ReLU kinks crossed and curvature change it
      with the step, a lost term does not) and noise the largest change of logit_c when the
      target moves by a few ulps (`ulp_perturbed`, NOISE_PROBES seeds): both are measured on
      the model and the CPU at hand, no machine's rounding is built in;
   both move only the target's elements whose value occurs once in the sample and lies more
   than eps from the values that repeat (`untied`): a max pool or ReduceMax over tied elements
   (a ReLU target's zeros) has one-sided slopes, no derivative, and the rule's choice among
   them (torch's) is as right as another;
3. heatmaps: each output against `Method.reference` (camface.methods, numpy) on the graph's own
   activations and gradient (verify.TOLERANCE fp32), the tolerance widened by CONDITIONING times
   how far the reference itself moves when those move by a few ulps (`ulp_perturbed`): a map
   that rounding alone decides (Eigen-CAM where the first two singular values nearly tie, e.g.
   at the LayerNorm tokens of an untrained ViT, whose channel sums, the power iteration's start,
   are 0) is judged by what rounding can do to it, a well-conditioned one as tightly as before.
Any check above its tolerance fails the export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from camface import methods
from camface.errors import ModelError
from camface.export import onnx_cam, verify
from camface.export.verify import Difference

FD_RTOL = 2e-2


class Check(Difference):
    """A `verify.Difference` against the original model or the numpy reference (not TF)."""

    def __str__(self) -> str:
        return (super().__str__().replace("|onnx - tf|", "|graph - ref|")
                .replace("max |tf|", "max |ref|")
                .replace("for float16 activations", "for the map's conditioning"))

FD_STEP = 1e-3  # the step moves the target tensor by this fraction of its norm
RANDOM_DIRECTIONS = 8  # random unit directions per sample
RANDOM_RTOL = 0.05  # allowed rms error along them, in units of |g| / sqrt(n)
HEAD_BATCH = 16  # rows a run of the head takes (a .pt2's batch dimension may stop at 32);
# a multiple of 4 (one random direction's rows)
NOISE_PROBES = 3  # ulp_perturbed copies of the target that measure the logit's rounding noise
NOISE_FACTOR = 4.0  # x (largest logit change under them) / eps
KINK_FACTOR = 4.0  # x |fd at eps - fd at eps/2|: kinks crossed and curvature grow with the step
CONDITIONING = 16  # a heatmap's tolerance += this x its reference's change under ulp_perturbed


@dataclass(frozen=True)
class RandomDirections(Difference):
    """The random-direction gradient check, in units of |g| / sqrt(n) (reference_max 1)."""

    target: str = ""  # the target tensor

    @property
    def ratio(self) -> float:
        return self.max_abs / self.allowed

    def __str__(self) -> str:
        mark = "ok" if self.ok else "FAIL"
        return (f"target layer {self.target!r}: the in-graph gradient disagrees with finite "
                f"differences along random directions by {self.max_abs:.3g} (allowed "
                f"{self.allowed:.3g} incl. {self.sensitivity:.3g} for {self.cause}; rms over "
                f"{RANDOM_DIRECTIONS} directions, in units of |g|/sqrt(n))  {mark}")


def ulp_perturbed(x, seed: int, ulps: int = 4) -> np.ndarray:
    """float32 x with every element moved by a seeded whole number of units in the last place,
    at most `ulps` either way (x * (1 + k 2^-23), |k| <= ulps): how another runtime's rounding
    moves a computed tensor."""
    steps = np.random.default_rng(seed).integers(-ulps, ulps + 1, np.shape(x))
    return (np.asarray(x, np.float32) * (1 + steps * np.float32(2.0 ** -23))).astype(np.float32)


def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _with_outputs(model, names: list[str]):
    """A copy of `model` that also returns the tensors `names` (float32)."""
    import onnx
    from onnx import TensorProto, helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                             for n in names if n not in present)
    return copy


def head_model(model, target: str):
    """The original model with `target` made an input (its producer writes elsewhere): logits as
    a function of the target activations, everything before the target held fixed."""
    import onnx
    from onnx import TensorProto, helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        node.output[:] = [f"{o}__overridden" if o == target else o for o in node.output]
    copy.graph.input.append(helper.make_tensor_value_info(target, TensorProto.FLOAT, None))
    return copy


def _normalised(classifier, images, scale, offset) -> np.ndarray:
    x = images.astype(np.float32) * np.asarray(scale, np.float32) + np.asarray(offset, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if classifier.input_layout == "NCHW" else x)


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def check(classifier, built: onnx_cam.Built, scale, offset, batch: int = 3,
          source: object = "model") -> list[Difference]:
    """Run the three checks; raise ModelError naming every output over its tolerance, or
    ONNX Runtime's refusal of the model itself (`source`)."""
    import onnxruntime as ort

    images, classes = verify.sample_batch(classifier.input_size, classifier.channels,
                                          classifier.num_classes, batch)
    x = _normalised(classifier, images, scale, offset)
    try:
        original = _session(_with_outputs(classifier.model, [built.target, classifier.logits]))
        names = [o.name for o in original.get_outputs()]
        ref = dict(zip(names, original.run(None, {classifier.input_name: x})))
    except Exception as exc:  # ONNX Runtime's own types: a kernel it does not have, or refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{source}: ONNX Runtime {ort.__version__} does not run the model, so "
                         f"neither would a CAM graph of it ({first})") from exc
    logits = ref[classifier.logits]
    probs = ref[classifier.output_name] if classifier.final_activation in ("Softmax", "Sigmoid") \
        else _softmax(logits)
    target = ref[built.target]
    to_nhwc = (lambda t: t.transpose(0, 2, 3, 1)) if built.layout == "NCHW" else (lambda t: t)
    extra = [onnx_cam.GRADIENT] if any(methods.GRADIENTS in methods.get(h).needs
                                       for h in built.heatmaps) else []
    graph = _session(_with_outputs(built.model, extra))
    got = dict(zip([o.name for o in graph.get_outputs()],
                   graph.run(None, {"image": images, "class_index": classes})))
    differences = verify.compare(got, {"probs": probs,
                                       "activations": to_nhwc(target)})
    chosen = np.where(classes < 0, logits.argmax(-1), classes)
    gradient_nhwc = got.get(onnx_cam.GRADIENT)
    if gradient_nhwc is not None:
        differences += _finite_differences(classifier, built, x, target, chosen, gradient_nhwc)
    weights = None if built.class_weights is None else \
        built.class_weights[chosen][:, None, None, :]
    reference = {name: methods.get(name).reference(got["activations"], gradient_nhwc, weights)
                 for name in built.heatmaps}
    # the largest of NOISE_PROBES perturbations: where rounding decides a map (singular values
    # nearly tied), one draw can move it less than another runtime's rounding does (ONNX
    # Runtime without its graph optimisations moved a ViT's Eigen-CAM past one draw's allowance)
    sensitivity = dict.fromkeys(built.heatmaps, 0.0)
    for seed in range(NOISE_PROBES):
        moved_a = ulp_perturbed(got["activations"], 2 * seed + 1)
        moved_g = None if gradient_nhwc is None else ulp_perturbed(gradient_nhwc, 2 * seed + 2)
        for name in built.heatmaps:
            change = np.abs(methods.get(name).reference(moved_a, moved_g, weights) - reference[name])
            sensitivity[name] = max(sensitivity[name], CONDITIONING * float(change.max(initial=0.0)))
    differences += verify.compare(got, reference, sensitivity=sensitivity)
    differences = [d if isinstance(d, RandomDirections)
                   else Check(d.output, d.max_abs, d.reference_max, d.allowed, d.sensitivity)
                   for d in differences]
    failed = [d for d in differences if not d.ok]
    if failed:
        raise ModelError("the CAM graph fails its self-check: "
                         + "; ".join(str(d) for d in failed))
    return differences


def _head_logits(session, index, input_name, target_name, x_row, targets, c) -> np.ndarray:
    """logit_c of the head for each row of `targets` [rows, ...] (float64): runs of HEAD_BATCH
    rows (the last one padded: every run the same size, so the same kernels round every row),
    one row a run where the head will not take a batch (a fixed batch of 1, or a batch folded
    into another axis: as many logits out as rows in, or one row a run)."""
    targets = np.asarray(targets, np.float32)

    def run(rows):
        feeds = {input_name: np.repeat(x_row, len(rows), axis=0), target_name: rows}
        logits = session.run(None, feeds)[index]
        if len(logits) != len(rows):  # a head that folds the batch into another axis
            raise ValueError(f"{len(rows)} rows in, {len(logits)} out")
        return logits[:, c].astype(np.float64)

    padded = np.concatenate([targets, np.repeat(targets[-1:], -len(targets) % HEAD_BATCH, 0)])
    try:
        values = np.concatenate([run(padded[i:i + HEAD_BATCH])
                                 for i in range(0, len(padded), HEAD_BATCH)])
    except Exception:  # noqa: BLE001 - onnxruntime's errors have no common base class
        values = np.concatenate([run(targets[i:i + 1]) for i in range(len(targets))])
    return values[:len(targets)]


def _finite_differences(classifier, built, x, target, chosen, gradient_nhwc) -> list[Difference]:
    """The gradient's own direction (as before) and RANDOM_DIRECTIONS random ones per sample
    (module docstring, check 2)."""
    session = _session(_with_outputs(head_model(classifier.model, built.target),
                                     [classifier.logits]))
    index = [o.name for o in session.get_outputs()].index(classifier.logits)
    grad = gradient_nhwc.transpose(0, 3, 1, 2) if built.layout == "NCHW" else gradient_nhwc
    rng = np.random.default_rng(1)
    worst, worst_allowed, scale = 0.0, np.inf, 0.0
    random_worst: RandomDirections | None = None
    for n, c in enumerate(chosen):
        a = target[n].astype(np.float64)
        eps = FD_STEP * float(np.linalg.norm(a))
        free = untied(target[n], eps)
        g = grad[n].astype(np.float64) * free
        norm = float(np.linalg.norm(g))
        scale = max(scale, norm)
        unit_g = g / max(norm, 1e-30)
        randoms = rng.standard_normal((RANDOM_DIRECTIONS, *g.shape)) * free
        randoms /= np.sqrt((randoms ** 2).sum(axis=tuple(range(1, randoms.ndim)), keepdims=True))
        # rows: +-eps and +-eps/2 along each random direction (4 a direction, whole directions
        # a run); +-eps along g; the target as it is and moved by a few ulps (NOISE_PROBES
        # seeds): the logit's rounding noise
        rows = [a + sign * step * v for v in (*randoms, unit_g) for step in (eps, eps / 2)
                for sign in (1.0, -1.0)]
        rows += [a] + [ulp_perturbed(a.astype(np.float32), 100 + s) for s in range(NOISE_PROBES)]
        values = _head_logits(session, index, classifier.input_name, built.target,
                              x[n:n + 1], np.stack(rows), c)
        along_g = values[4 * RANDOM_DIRECTIONS:]
        fd = (along_g[0] - along_g[1]) / (2 * eps)
        fd_half = (along_g[2] - along_g[3]) / eps
        allowed = (FD_RTOL * norm + 1e-4 * (1 + abs(along_g[0])) / eps
                   + KINK_FACTOR * abs(fd - fd_half))
        error = abs(fd - norm)
        if error - allowed > worst - worst_allowed or worst_allowed == np.inf:
            worst, worst_allowed = error, allowed
        noise = float(np.abs(along_g[5:] - along_g[4]).max())
        found = _random_directions(values[:4 * RANDOM_DIRECTIONS], randoms, g, eps, noise,
                                   built.target)
        if random_worst is None or found.ratio > random_worst.ratio:
            random_worst = found
    return [Difference("gradient", worst, scale, worst_allowed), random_worst]


def untied(target: np.ndarray, step: float = 0.0) -> np.ndarray:
    """1 where the target's value occurs once in the sample and lies more than `step` (the
    largest move of an element by the check: eps along a unit direction) from every value that
    repeats, 0 elsewhere (the zeros a ReLU leaves, a clip's bound, and the elements a step
    would carry onto or across them): the gradient check moves only the former. A max pool or
    a ReduceMax over tied elements has no derivative there, only one-sided slopes, and a rule's
    choice among the tied elements (MaxPool's first one, ReduceMax's equal shares, as torch's)
    is as right as another; finite differences across such ties measure the tie being broken,
    not the rule. An element a hair above a ReLU's zeros before a max pool of them (conv, BN,
    ReLU, max pool: a ResNet's stem) is such a kink at every step down to the rounding, so
    halving the step cannot show it. Where every value repeats, every element is moved."""
    values, inverse, counts = np.unique(target, return_inverse=True, return_counts=True)
    once = counts[inverse.reshape(-1)] == 1
    tied = values[counts > 1].astype(np.float64)
    if step > 0 and len(tied):
        flat = np.asarray(target, np.float64).reshape(-1)
        at = np.clip(np.searchsorted(tied, flat), 1, len(tied)) - 1
        nearest = np.minimum(np.abs(flat - tied[at]), np.abs(flat - tied[np.minimum(at + 1, len(tied) - 1)]))
        far = once & (nearest > step)
        once = far if far.any() else once
    once = once.reshape(target.shape)
    return once.astype(np.float64) if once.any() else np.ones(target.shape)


def _random_directions(values, directions, g, eps, noise, target) -> RandomDirections:
    """values: logit_c at a +- eps v, a +- eps/2 v per direction v (rows of 4). In units of
    |g| / sqrt(n), the typical <g, v>: rms over directions of |fd_eps - <g, v>| against
    RANDOM_RTOL + rms(NOISE_FACTOR noise / eps + KINK_FACTOR |fd_eps - fd_eps/2|)."""
    values = np.asarray(values).reshape(-1, 4)
    fd = (values[:, 0] - values[:, 1]) / (2 * eps)
    fd_half = (values[:, 2] - values[:, 3]) / eps
    expected = np.array([(g * v).sum() for v in directions])
    moved = max(int(np.count_nonzero(directions[0])), 1)  # the elements the directions move
    unit = max(float(np.linalg.norm(g)) / np.sqrt(moved), 1e-30)
    error = np.sqrt(np.mean((fd - expected) ** 2)) / unit
    measured = NOISE_FACTOR * noise / eps + KINK_FACTOR * np.abs(fd - fd_half)
    allowed = RANDOM_RTOL + np.sqrt(np.mean(measured ** 2)) / unit
    return RandomDirections(f"gradient {RANDOM_DIRECTIONS} random directions", float(error),
                            1.0, float(allowed), float(allowed - RANDOM_RTOL),
                            "measured rounding noise and kinks", target)
