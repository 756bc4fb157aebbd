"""The original study's comparison figure (PNG) and the per-layer Grad-CAM animation (GIF).

Figure: one row per explained crop, columns
    image | one overlay per heatmap method the model has at the layer | Guided Backprop | Guided Grad-CAM
(the study showed the image, the CAM and Grad-CAM overlays and Guided Grad-CAM; the methods come
from the registry, camface.methods, so a new method gets its column, and a model without a CAM
head gets no empty CAM column). Each overlay is drawn by the live loop's overlay function, so it
looks as `camface live` shows it, optionally with the study's localisation box: the bounding box
of the largest connected region above 20% of the map's maximum. Each row is titled with the
predicted class (a snapshot's: the class it recorded, which smoothing or an int8 / fp16 graph may
have made other than the model's argmax) and the model's probability of it, and the explained
class when it differs.

matplotlib is used with the non-interactive Agg canvas, created per figure (no pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from camface import methods
from camface.color_order import ColorOrder
from camface.guided.explain import Explanation, LayerMaps
from camface.outputs import replace_whole

GUIDED_COLUMNS = ("Guided Backprop", "Guided Grad-CAM")
BOX_FRACTION = 0.2  # the study's localisation threshold, fraction of the map's maximum


def columns_for(method_names: Sequence[str]) -> list[str]:
    """The figure's column titles for explanations holding `method_names`' heatmaps."""
    return ["image", *(methods.get(name).title for name in method_names), *GUIDED_COLUMNS]


def shown_overlay(image_rgb: np.ndarray, heatmap: np.ndarray, method: str) -> np.ndarray:
    """uint8 RGB [H, W, 3]: the heatmap over the crop, by the one overlay function (which works
    in BGR, as the live loop)."""
    from camface.realtime.overlay import overlay

    return overlay(np.ascontiguousarray(image_rgb[..., ::-1]), heatmap, method)[..., ::-1]


def localisation_box(heatmap: np.ndarray, method: str, size: tuple[int, int], fraction: float = BOX_FRACTION):
    """(x, y, w, h) in crop pixels of the largest region above `fraction` of the normalised,
    upsampled map's maximum (CAM paper, arXiv:1512.04150 sec. 3.1), or None: the live loop's own
    function, so the figure and the live overlay draw the same box."""
    from camface.realtime.render import localisation_box as live_localisation_box

    from camface.realtime.overlay import upsample as live_upsample

    return live_localisation_box(live_upsample(methods.normalize(heatmap, method), size), fraction)


def gradient_image(gradient: np.ndarray, color_order: str = "GRAY") -> np.ndarray:
    """Show an input gradient [H, W, C]: centred, scaled to 0.1 per standard deviation around
    0.5 grey (the usual deprocessing for Guided Backprop), clipped to [0, 1].
    Returns float32 [H, W] for one channel, [H, W, 3] RGB for three."""
    g = np.asarray(gradient, np.float32)
    g = (g - g.mean()) / (g.std() + 1e-12) * 0.1 + 0.5
    g = np.clip(g, 0.0, 1.0)
    if g.shape[-1] == 1:
        return g[..., 0]
    return ColorOrder.of(color_order).to_rgb(g)


def _row_title(item: Explanation, labels: Sequence[str]) -> str:
    def name(index: int) -> str:
        return labels[index] if index < len(labels) else f"class {index}"

    title = f"{item.name}\n{name(item.predicted)} {item.probs[item.predicted]:.3f}"
    if item.explained != item.predicted:
        title += f"\nexplaining {name(item.explained)}\n({item.probs[item.explained]:.3f})"
    return title


def comparison_figure(items: Sequence[Explanation], labels: Sequence[str], *,
                      boxes: bool = True, color_order: str = "GRAY", gradient_label: str = "",
                      cam_note: str = ""):
    """Build the comparison figure: len(items) rows x `columns_for(methods)` columns of axes, in
    row-major order, the methods being those of the first item's heatmaps.

    Returns a matplotlib Figure (Agg canvas); save it with `fig.savefig(path)`.
    `gradient_label` names the input-gradient columns ("Gradient (no ReLU)" for models
    without ReLU); it defaults to Guided Backprop. `cam_note` says why CAM is absent (shown
    under the title).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    names = tuple(items[0].heatmaps) if items else ()
    columns = columns_for(names)
    if gradient_label and gradient_label != "Guided Backprop":
        columns[-2] = gradient_label
        columns[-1] = f"{gradient_label.split(' (')[0]} x Grad-CAM"
    rows = max(len(items), 1)
    fig = Figure(figsize=(2.0 * len(columns) + 0.6, 2.15 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, len(columns), squeeze=False)
    layer = items[0].layer if items else ""
    title = f"camface guided: maps at layer {layer!r}"
    note = cam_note.removeprefix("CAM ") if cam_note else ""
    fig.suptitle(title + (f"\n(no CAM: {note})" if note else ""), fontsize=10 if note else 12)

    for row, item in zip(axes, items):
        size = item.image_rgb.shape[:2]
        panels = [item.image_rgb]
        panels += [shown_overlay(item.image_rgb, item.heatmaps[name], name) for name in names]
        panels += [gradient_image(item.input_gradient, color_order), gradient_image(item.guided_gradcam, color_order)]
        for column, (ax, image) in enumerate(zip(row, panels)):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1 if image.ndim == 2 else None)
            if boxes and 1 <= column <= len(names):
                name = names[column - 1]
                box = localisation_box(item.heatmaps[name], name, size)
                if box is not None:
                    x, y, w, h = box
                    ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="lime", linewidth=2))
        row[0].set_ylabel(_row_title(item, labels), fontsize=10, rotation=0, ha="right",
                          va="center", labelpad=8)
    for ax, title in zip(axes[0], columns):
        ax.set_title(title, fontsize=10)
    return fig


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Write `fig` to `path` (format from its suffix), whole or not at all."""
    replace_whole(path, lambda partial: fig.savefig(str(partial), dpi=dpi,
                                                    format=Path(path).suffix.lstrip(".").lower()))


def layer_frames(sweep: Sequence[LayerMaps], crops_rgb: Sequence[np.ndarray],
                 labels: Sequence[str], names: Sequence[str], dpi: int = 90) -> list[np.ndarray]:
    """One RGB frame (uint8 [H, W, 3]) per layer: each crop with its Grad-CAM overlay,
    the layer's name, index and resolution in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    frames = []
    count = len(crops_rgb)
    for number, item in enumerate(sweep, start=1):
        fig = Figure(figsize=(max(2.2 * count + 0.4, 4.4), 2.9), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, count, squeeze=False)[0]
        h, w = item.gradcam.shape[1:]
        fig.suptitle(f"Grad-CAM at layer {number}/{len(sweep)}: {item.layer} ({h}x{w})",
                     fontsize=11)
        for i, ax in enumerate(axes):
            ax.imshow(shown_overlay(crops_rgb[i], item.gradcam[i], "gradcam"))
            explained = int(item.explained[i])
            label = labels[explained] if explained < len(labels) else f"class {explained}"
            ax.set_title(f"{names[i]}: {label}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.canvas.draw()
        frames.append(np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy())
    return frames


def save_gif(frames: Sequence[np.ndarray], path: str | Path, frame_ms: int = 700) -> None:
    """Write RGB frames as a looping GIF (Pillow, which matplotlib depends on), whole or not at all."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    replace_whole(path, lambda partial: images[0].save(str(partial), format="GIF", save_all=True,
                                                       append_images=images[1:], duration=frame_ms, loop=0))
