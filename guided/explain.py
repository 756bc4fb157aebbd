"""Explain face crops with every map the comparison figure shows, in TensorFlow.

One `Explainer` per (model, layer): a forward/backward pass at the layer, every heatmap of the
method registry (camface.methods, its numpy references) from it, and a guided copy of the model
for Guided Backprop. Guided Grad-CAM is Guided
Backprop times Grad-CAM upsampled (bilinear) to the input (Selvaraju et al., arXiv:1610.02391,
sec. 3 "Guided Grad-CAM"); Grad-CAM is normalised to [0, 1] first, as its column shows it
(`camface.methods.normalize`), so the product keeps the units of the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from camface import methods
from camface.color_order import ColorOrder
from camface.guided import gradcam as grads  # layers, model cuts and gradients in TF
from camface.guided.snapshot import Preprocessing
from camface.realtime.overlay import upsample  # noqa: F401 (the one bilinear upsample, (H, W))
from camface.realtime.results import predicted_classes


def to_rgb(crop: np.ndarray, color_order: str) -> np.ndarray:
    """uint8 [H, W, C] in `color_order` -> uint8 [H, W, 3] RGB for display."""
    return ColorOrder.of(color_order).to_rgb(crop)


@dataclass(frozen=True)
class Explanation:
    """All maps for one crop and one explained class.

    heatmaps: method name -> float32 [h, w] at the layer's resolution, unnormalised, for every
    registry method the model allows at this layer, in registry order (no `cam` when the head
    does not allow CAM). `input_gradient` and `guided_gradcam` are float32 [H, W, C] at the
    crop's resolution, in the crop's colour order, with respect to raw uint8 pixel values.
    """

    name: str
    image_rgb: np.ndarray  # uint8 [H, W, 3] the crop as the graph saw it, shown in RGB
    probs: np.ndarray  # float32 [classes]
    predicted: int
    explained: int
    layer: str
    heatmaps: dict[str, np.ndarray]
    input_gradient: np.ndarray
    guided_gradcam: np.ndarray
    guided: bool  # False: input_gradient is a plain gradient (model without ReLU)


class Explainer:
    """CAM / Grad-CAM / Grad-CAM++ / Guided Backprop / Guided Grad-CAM for one model and layer.

    `layer`: a layer name or `backbone/layer` path; None = the default target layer.
    `cam_reason` says why CAM is absent ("" when present)."""

    def __init__(self, model, layer: str | None, preprocessing: Preprocessing):
        from camface.guided.backprop import GuidedBackprop

        self.layer = grads.resolve_layer(model, layer)
        self.preprocessing = preprocessing
        self._runner = grads.GradientRunner(model, [self.layer])
        self._cam_weights, self.cam_reason = grads.cam_weights(model, self.layer)
        self._backprop = GuidedBackprop(grads.logits_model(model))
        self._model = model  # Ablation-CAM / Score-CAM run its head or itself again (`_calls`)

    @property
    def methods(self) -> tuple[str, ...]:
        """The registry methods this model allows at the layer, in menu order."""
        return tuple(m.name for m in methods.METHODS.values()
                     if m.display and (methods.CLASS_WEIGHTS not in m.needs or self._cam_weights is not None))

    def _calls(self, images, activations, class_index, wanted):
        """methods.ModelCalls of the Keras model for the `wanted` methods that run it again (its
        head cut at the layer as the exporter cuts it, and the model to its logits); lazily
        built, None when none of them does."""
        if not any(methods.get(name).reruns for name in wanted):
            return None
        if getattr(self, "_parts", None) is None:
            from camface.export.keras_model import split_model

            self._parts = (split_model(self._model, self.layer.split("/")), grads.logits_model(self._model))
        split, logits = self._parts
        return methods.ModelCalls(lambda a: np.asarray(split.head(a)), lambda x: np.asarray(logits(x, training=False)),
                                  images, activations, class_index)

    @property
    def guided(self) -> bool:
        return self._backprop.guided

    @property
    def gradient_label(self) -> str:
        return self._backprop.label

    def explain(self, crops: np.ndarray, class_index: np.ndarray,
                names: tuple[str, ...] = (), recorded: np.ndarray | None = None,
                only: tuple[str, ...] | None = None) -> list[Explanation]:
        """crops: uint8 [N, H, W, C] in the preprocessing's colour order; class_index: int [N],
        -1 = the predicted class. recorded: int [N], the class a snapshot recorded as predicted
        (named predicted instead of the model's own argmax, which smoothing or an int8 / fp16
        graph may have changed), -1 = none. only: the heatmaps to compute (Grad-CAM always, for
        Guided Grad-CAM); None = all of `methods` (Score-CAM runs the model again K times a crop).
        Returns one Explanation per crop."""
        images = self.preprocessing.apply(crops)
        passes = self._runner.run(images, class_index)
        # The class named predicted and, for -1, explained: live's (the first of tied top
        # probabilities, where a sigmoid saturates: two 1.0s); every map follows `explained`.
        predicted, explained = predicted_classes(passes.probs), passes.explained
        if recorded is not None:
            predicted = np.where(np.asarray(recorded) >= 0, recorded, predicted)
        activations, gradients = passes.activations[0], passes.gradients[0]
        weights = (self._cam_weights.T[explained][:, None, None, :] if self._cam_weights is not None else None)
        wanted = [name for name in self.methods if only is None or name in only or name == "gradcam"]
        calls = self._calls(images, activations, explained, wanted)
        heatmaps = {name: methods.get(name).reference(activations, gradients, weights, model=calls)
                    for name in wanted}
        gradcam = heatmaps["gradcam"]
        # Chain rule through x * scale + offset: gradient w.r.t. raw pixel values.
        input_gradient = (self._backprop.gradients(images, explained)
                          * np.asarray(self.preprocessing.scale, np.float32))
        size = crops.shape[1:3]
        results = []
        for i in range(len(crops)):
            # Grad-CAM as its column shows it (one normalisation: a map of rounding residue, its
            # peak at most methods.FLAT_PEAK, is empty there and weighs nothing here)
            weight = upsample(methods.normalize(gradcam[i], "gradcam"), size)
            results.append(Explanation(
                name=names[i] if i < len(names) else f"face {i}",
                image_rgb=to_rgb(crops[i], self.preprocessing.color_order),
                probs=passes.probs[i], predicted=int(predicted[i]), explained=int(explained[i]),
                layer=self.layer, heatmaps={name: maps_[i] for name, maps_ in heatmaps.items()},
                input_gradient=input_gradient[i],
                guided_gradcam=input_gradient[i] * weight[:, :, None], guided=self.guided))
        return results


@dataclass(frozen=True)
class LayerMaps:
    """Grad-CAM of every crop at one layer (for the --layers all animation)."""

    layer: str
    gradcam: np.ndarray  # float32 [N, h, w], unnormalised
    explained: np.ndarray  # int64 [N]


def layer_sweep(model, layers: list[str], crops: np.ndarray, class_index: np.ndarray,
                preprocessing: Preprocessing) -> list[LayerMaps]:
    """Grad-CAM for the chosen classes at each of `layers`, in one forward/backward pass."""
    runner = grads.GradientRunner(model, layers)
    passes = runner.run(preprocessing.apply(crops), class_index)
    gradcam = methods.get("gradcam")
    return [LayerMaps(layer, gradcam.reference(a, g), passes.explained)
            for layer, a, g in zip(layers, passes.activations, passes.gradients)]
