"""The original study's comparison figure (PNG) and the per-layer Grad-CAM animation (GIF).

Figure: one row per explained crop, columns
    image | CAM | Grad-CAM | Grad-CAM++ | CAM overlay | Grad-CAM overlay | Guided Backprop | Guided Grad-CAM
(the study showed image, CAM, Grad-CAM, both overlays and Guided Grad-CAM). Each row is titled
with the predicted class and its probability, and the explained class when it differs. Overlays
can show the study's localisation box: the bounding box of the largest connected region above
20% of the map's maximum.

matplotlib is used with the non-interactive Agg canvas, created per figure (no pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from camface.guided.explain import Explanation, LayerMaps, upsample

COLUMNS = ("image", "CAM", "Grad-CAM", "Grad-CAM++", "CAM overlay", "Grad-CAM overlay",
           "Guided Backprop", "Guided Grad-CAM")
BOX_FRACTION = 0.2  # the study's localisation threshold, fraction of the map's maximum


def normalise(heatmap: np.ndarray) -> np.ndarray:
    """Scale a map to [0, 1] for display: divide by the max for non-negative maps (Grad-CAM),
    min-max for maps with negative values (CAM). Constant maps become zeros."""
    heatmap = np.asarray(heatmap, np.float32)
    low = min(float(heatmap.min()), 0.0)
    span = float(heatmap.max()) - low
    return (heatmap - low) / span if span > 0 else np.zeros_like(heatmap)


def localisation_box(heatmap01: np.ndarray, fraction: float = BOX_FRACTION):
    """(x, y, w, h) in the map's pixels of the largest region above `fraction` of the map's
    maximum (CAM paper, arXiv:1512.04150 sec. 3.1), or None: the live loop's own function, so
    the figure and the live overlay draw the same box."""
    from camface.realtime.render import localisation_box as live_localisation_box

    return live_localisation_box(np.asarray(heatmap01, np.float32), fraction)


def gradient_image(gradient: np.ndarray, color_order: str = "GRAY") -> np.ndarray:
    """Show an input gradient [H, W, C]: centred, scaled to 0.1 per standard deviation around
    0.5 grey (the usual deprocessing for Guided Backprop), clipped to [0, 1].
    Returns float32 [H, W] for one channel, [H, W, 3] RGB for three."""
    g = np.asarray(gradient, np.float32)
    g = (g - g.mean()) / (g.std() + 1e-12) * 0.1 + 0.5
    g = np.clip(g, 0.0, 1.0)
    if g.shape[-1] == 1:
        return g[..., 0]
    return g[..., ::-1] if color_order == "BGR" else g


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
    """Build the comparison figure: len(items) rows x 8 columns of axes, in row-major order.

    Returns a matplotlib Figure (Agg canvas); save it with `fig.savefig(path)`.
    `gradient_label` names the input-gradient columns ("Gradient (no ReLU)" for models
    without ReLU); it defaults to Guided Backprop. `cam_note` says why CAM is absent.
    """
    import textwrap

    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    columns = list(COLUMNS)
    if gradient_label and gradient_label != "Guided Backprop":
        columns[6] = gradient_label
        columns[7] = f"{gradient_label.split(' (')[0]} x Grad-CAM"
    rows = max(len(items), 1)
    fig = Figure(figsize=(2.0 * len(columns) + 0.6, 2.15 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, len(columns), squeeze=False)
    layer = items[0].layer if items else ""
    fig.suptitle(f"camface guided: maps at layer {layer!r}", fontsize=12)

    for row, item in zip(axes, items):
        size = item.image_rgb.shape[:2]
        gradcam_up = normalise(upsample(item.gradcam, size))
        cam_up = normalise(upsample(item.cam, size)) if item.cam is not None else None
        panels = [
            ("image", item.image_rgb, None),
            ("CAM", normalise(item.cam) if item.cam is not None else None, "jet"),
            ("Grad-CAM", normalise(item.gradcam), "jet"),
            ("Grad-CAM++", normalise(item.gradcampp), "jet"),
            ("CAM overlay", cam_up, "jet"),
            ("Grad-CAM overlay", gradcam_up, "jet"),
            ("guided", gradient_image(item.input_gradient, color_order), "gray"),
            ("guided-gradcam", gradient_image(item.guided_gradcam, color_order), "gray"),
        ]
        for column, (ax, (kind, image, cmap)) in enumerate(zip(row, panels)):
            ax.set_xticks([])
            ax.set_yticks([])
            if image is None:
                note = textwrap.fill((cam_note or "not defined for this layer")
                                     .removeprefix("CAM "), 20)
                ax.text(0.5, 0.5, f"CAM n/a:\n{note}", ha="center", va="center", fontsize=8,
                        transform=ax.transAxes)
                continue
            if kind.endswith("overlay"):
                ax.imshow(item.image_rgb)
                ax.imshow(image, cmap=cmap, alpha=0.5, vmin=0, vmax=1)
                box = localisation_box(image) if boxes else None
                if box is not None:
                    x, y, w, h = box
                    ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False,
                                           edgecolor="lime", linewidth=2))
            elif image.ndim == 2:
                ax.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest"
                          if image.shape != size else "antialiased")
            else:
                ax.imshow(image)
        row[0].set_ylabel(_row_title(item, labels), fontsize=10, rotation=0, ha="right",
                          va="center", labelpad=8)
    for ax, title in zip(axes[0], columns):
        ax.set_title(title, fontsize=10)
    return fig


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    fig.savefig(str(path), dpi=dpi)


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
            crop = crops_rgb[i]
            ax.imshow(crop)
            ax.imshow(normalise(upsample(item.gradcam[i], crop.shape[:2])), cmap="jet",
                      alpha=0.5, vmin=0, vmax=1)
            explained = int(item.explained[i])
            label = labels[explained] if explained < len(labels) else f"class {explained}"
            ax.set_title(f"{names[i]}: {label}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.canvas.draw()
        frames.append(np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy())
    return frames


def save_gif(frames: Sequence[np.ndarray], path: str | Path, frame_ms: int = 700) -> None:
    """Write RGB frames as a looping GIF (Pillow, which matplotlib depends on)."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(str(path), save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
