"""The ONNX engine's self-check, framework-free (ONNX Runtime only), on one smooth random batch:

1. forward: `probs` (the model's own Softmax/Sigmoid output, else the softmax of its logits)
   and `activations` of the CAM graph against the original model run on the
   same normalised images (|diff| <= 1e-4 + 1e-3 max|ref|, verify.TOLERANCE fp32);
2. gradient: the graph's d logit_c / dA against central finite differences of the original
   model's logit_c with the target tensor overridden (the extracted head), along the gradient's
   own direction and a random one: |fd - <g, v>| <= 2e-2 |g| + 1e-4 (1 + |logit_c|) / eps for
   unit v and step eps (ReLU kinks crossed by the step and float32 rounding stay below it);
3. heatmaps: each output against `Method.reference` (camface.methods, numpy) on the graph's own
   activations and gradient (verify.TOLERANCE fp32), the tolerance widened by CONDITIONING times
   how far the reference itself moves when those move by a few ulps (`ulp_perturbed`): a map
   that rounding alone decides (Eigen-CAM where the first two singular values nearly tie, e.g.
   at the LayerNorm tokens of an untrained ViT, whose channel sums, the power iteration's start,
   are 0) is judged by what rounding can do to it, a well-conditioned one as tightly as before.
Any check above its tolerance fails the export.
"""

from __future__ import annotations

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
CONDITIONING = 16  # a heatmap's tolerance += this x its reference's change under ulp_perturbed


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


def check(classifier, built: onnx_cam.Built, scale, offset, batch: int = 3) -> list[Difference]:
    """Run the three checks; raise ModelError naming every output over its tolerance."""
    images, classes = verify.sample_batch(classifier.input_size, classifier.channels,
                                          classifier.num_classes, batch)
    x = _normalised(classifier, images, scale, offset)
    original = _session(_with_outputs(classifier.model, [built.target, classifier.logits]))
    names = [o.name for o in original.get_outputs()]
    ref = dict(zip(names, original.run(None, {classifier.input_name: x})))
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
        differences.append(_finite_differences(classifier, built, x, target, chosen,
                                               gradient_nhwc))
    weights = None if built.class_weights is None else \
        built.class_weights[chosen][:, None, None, :]
    reference = {name: methods.get(name).reference(got["activations"], gradient_nhwc, weights)
                 for name in built.heatmaps}
    moved_a = ulp_perturbed(got["activations"], 1)
    moved_g = None if gradient_nhwc is None else ulp_perturbed(gradient_nhwc, 2)
    sensitivity = {name: CONDITIONING * float(np.abs(methods.get(name).reference(moved_a, moved_g, weights)
                                                     - reference[name]).max(initial=0.0))
                   for name in built.heatmaps}
    differences += verify.compare(got, reference, sensitivity=sensitivity)
    differences = [Check(d.output, d.max_abs, d.reference_max, d.allowed, d.sensitivity) for d in differences]
    failed = [d for d in differences if not d.ok]
    if failed:
        raise ModelError("the CAM graph fails its self-check: "
                         + "; ".join(str(d) for d in failed))
    return differences


def _finite_differences(classifier, built, x, target, chosen, gradient_nhwc) -> Difference:
    session = _session(_with_outputs(head_model(classifier.model, built.target),
                                     [classifier.logits]))
    index = [o.name for o in session.get_outputs()].index(classifier.logits)
    grad = gradient_nhwc.transpose(0, 3, 1, 2) if built.layout == "NCHW" else gradient_nhwc
    rng = np.random.default_rng(1)
    worst, worst_allowed, scale = 0.0, np.inf, 0.0
    for n, c in enumerate(chosen):
        g = grad[n:n + 1].astype(np.float64)
        norm = float(np.linalg.norm(g))
        scale = max(scale, norm)
        eps = FD_STEP * float(np.linalg.norm(target[n]))
        random = rng.standard_normal(g.shape)
        for v in (g / max(norm, 1e-30), random / np.linalg.norm(random)):
            values = []
            for sign in (1.0, -1.0):
                moved = (target[n:n + 1] + sign * eps * v).astype(np.float32)
                feeds = {classifier.input_name: x[n:n + 1], built.target: moved}
                values.append(float(session.run(None, feeds)[index][0, c]))
            fd = (values[0] - values[1]) / (2 * eps)
            allowed = FD_RTOL * norm + 1e-4 * (1 + abs(values[0])) / eps
            error = abs(fd - float((g * v).sum()))
            if error - allowed > worst - worst_allowed or worst_allowed == np.inf:
                worst, worst_allowed = error, allowed
    return Difference("gradient", worst, scale, worst_allowed)
