"""The sanity checks for Guided Backprop and Guided Grad-CAM, in TensorFlow on the Keras model
the graph was exported from (they are not in the ONNX graph: `camface guided` computes them).

The same two tests and criteria as `camface.evaluate.sanity`, on the maps `camface guided`
draws (`camface.guided.explain.Explainer`, at the graph's target layer), summed |gradient| over
the colour channels at the crop's resolution. Cascade: the Keras layers that hold trainable
weights, from the logits down, grouped as the ONNX cascade groups them (the last layer, the
other layers after the target, then the layers before it in `FEATURE_STEPS` groups); each
trainable variable is drawn again from a normal distribution with its own mean and standard
deviation, seeded by (seed, the layer's position in the cascade, the variable's index), not
by the layer's name (a model built again gets other automatic names: `conv2d_1` for `conv2d`).
Batch normalisation's moving statistics are not trainable and are kept (a drawn variance could
be negative); the ONNX graph has them folded into the weights, so its cascade re-draws them with
the layer.
"""

from __future__ import annotations

import numpy as np

from camface.evaluate.randomize import FEATURE_STEPS, cascade, redraw
from camface.evaluate.sanity import MethodSanity, _median, compared_size, shown, spearman, ssim

GUIDED = ("guidedbackprop", "guidedgradcam")


def all_layers(model) -> list:
    """Every layer, first to last, nested models walked into (the models themselves left out)."""
    import keras

    found = []
    for layer in model.layers:
        found.extend(all_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return found


def weighted_layers(model) -> list:
    """Layers holding trainable weights (not all equal), first to last, nested models walked into."""
    return [layer for layer in all_layers(model) if any(np.ptp(v.numpy()) > 0 for v in layer.trainable_weights)]


def _maps(explainer, crops: np.ndarray, classes: np.ndarray) -> dict[str, list[np.ndarray]]:
    size = compared_size(crops.shape[1:3])
    items = explainer.explain(crops, classes, only=())  # Grad-CAM alone: Guided Grad-CAM's weight
    return {"guidedbackprop": [shown(np.abs(e.input_gradient).sum(axis=-1), size) for e in items],
            "guidedgradcam": [shown(np.abs(e.guided_gradcam).sum(axis=-1), size) for e in items]}


def check(model, preprocessing, layer: str, crops: np.ndarray, predicted: np.ndarray, other: np.ndarray,
          drawn: list[int], seed: int = 0, feature_steps: int = FEATURE_STEPS,
          progress: bool = False) -> tuple[list[MethodSanity], dict]:
    """Both tests for Guided Backprop and Guided Grad-CAM of Keras `model` (left untouched) at
    `layer`, explaining `predicted` (int [N]) on crops uint8 [N, H, W, C]; random logit against
    `other` (int [N]). Returns the figures and {method: [steps + 1][len(drawn)] maps}."""
    import keras
    from tqdm import tqdm

    from camface.guided.explain import Explainer

    explainer = Explainer(model, layer, preprocessing)
    want = _maps(explainer, crops, predicted)
    switched = _maps(explainer, crops, other)
    order = [layer_.name for layer_ in all_layers(model)]
    inner = model
    for name in explainer.layer.split("/"):
        inner = inner.get_layer(name)
    # a nested model as the target (`backbone`): its output is its last layer's (all_layers
    # lists the layers inside it, never the model itself)
    target = order.index((all_layers(inner)[-1] if isinstance(inner, keras.Model) else inner).name)
    weighted = [[layer_.name] for layer_ in reversed(weighted_layers(model))]  # from the logits down
    position = {names[0]: i for i, names in enumerate(weighted)}
    steps = cascade([w for w in weighted if order.index(w[0]) > target],
                    [w for w in weighted if order.index(w[0]) <= target], feature_steps)
    usable = {m: [i for i, x in enumerate(want[m]) if x.max() > 0] for m in GUIDED}
    spearmen, ssims = {m: [] for m in GUIDED}, {m: [] for m in GUIDED}
    figure = {m: [[want[m][i] for i in drawn]] for m in GUIDED}
    for step in tqdm(steps, desc="sanity (guided)", unit="step", disable=not progress, leave=False):
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        chosen = set(step.weights)
        for layer_ in weighted_layers(clone):
            if layer_.name in chosen:
                for index, variable in enumerate(layer_.trainable_weights):
                    variable.assign(redraw(variable.numpy(), seed, f"keras/{position[layer_.name]}/{index}"))
        got = _maps(Explainer(clone, layer, preprocessing), crops, predicted)
        for m in GUIDED:
            spearmen[m].append(_median([spearman(got[m][i], want[m][i]) for i in usable[m]]))
            ssims[m].append(_median([ssim(got[m][i], want[m][i]) for i in usable[m]]))
            figure[m].append([got[m][i] for i in drawn])
    results = [MethodSanity(m, tuple(s.name for s in steps), tuple(spearmen[m]), tuple(ssims[m]),
                            _median([ssim(switched[m][i], want[m][i]) for i in usable[m]]), len(usable[m]))
               for m in GUIDED]
    return results, figure
