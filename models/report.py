"""What `camface train` leaves beside the model: metrics.json, confusion.png, cam_montage.png and
report.md. Metrics are plain numpy (no scikit-learn); figures use matplotlib's object API
(`Figure`, no pyplot state), so nothing here needs a display.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           labels: Sequence[str]) -> dict:
    """Accuracy, per-class precision / recall / F1 / support, macro averages and the confusion
    matrix (rows: true class, columns: predicted class) for int class indices [N].

    Two baselines beside the accuracy: "chance" (1 / classes, guessing uniformly) and
    "majority" (the test split's share of its largest class, `majority_class`: what always
    predicting that class scores). With imbalanced classes the majority share is the one to
    beat: test counts 9/2/2/2/2 give chance 0.200 but 0.529 for always answering the first class.

    A class never predicted has precision 0 (and F1 0), the scikit-learn convention with
    zero_division=0.
    """
    k = len(labels)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    per_class = {}
    for c, label in enumerate(labels):
        tp = int(confusion[c, c])
        predicted = int(confusion[:, c].sum())
        support = int(confusion[c, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    n = len(y_true)
    supports = confusion.sum(axis=1)
    largest = int(np.argmax(supports)) if k else 0  # ties: the first class in label order
    return {
        "accuracy": float(np.trace(confusion) / n) if n else 0.0,
        "chance": 1.0 / k,
        "majority": float(supports[largest] / n) if n else 0.0,
        "majority_class": labels[largest] if k else None,
        "test_images": n,
        "per_class": per_class,
        "macro": {m: float(np.mean([v[m] for v in per_class.values()]))
                  for m in ("precision", "recall", "f1")},
        "confusion": confusion.tolist(),
        "labels": list(labels),
    }


def save_confusion(confusion: np.ndarray, labels: Sequence[str], path: Path,
                   title: str = "Test split") -> None:
    """Confusion matrix as a PNG: counts in each cell, rows = true class, columns = predicted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    confusion = np.asarray(confusion)
    k = len(labels)
    side = max(3.5, 0.6 * k + 2)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(confusion, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = confusion.max() / 2 if confusion.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center",
                    color="white" if confusion[i, j] > threshold else "black")
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    """`fig` as a PNG at `path`, whole or not at all (beside `path`, then renamed): a full disk
    is an OutputError naming `path`, no half image left."""
    from camface.outputs import replace_whole

    replace_whole(path, lambda partial: fig.savefig(partial, dpi=100))


def overlay_heatmap(crop_bgr: np.ndarray, heatmap: np.ndarray, method: str = "gradcam",
                    alpha: float | None = None, colormap: str | None = None) -> np.ndarray:
    """A new uint8 BGR [S, S, 3] image: `heatmap` (float [h, w], unnormalised, feature
    resolution) over `crop_bgr` (uint8 [S, S, 3] BGR), drawn by the live loop's one overlay
    function (camface.realtime.overlay) with its defaults (None: LiveConfig's alpha and
    colormap), so the montage looks as `camface live` does. An all-zero map leaves the crop as it is."""
    from camface.realtime.overlay import LIVE, overlay

    return overlay(crop_bgr, heatmap, method, colormap or LIVE["colormap"], LIVE["alpha"] if alpha is None else alpha)


def pick_montage(y_true: np.ndarray, y_pred: np.ndarray, max_tiles: int) -> np.ndarray:
    """Indices for the montage: round-robin over true classes (so each class shows), mistakes
    first within a class, at most `max_tiles`."""
    by_class = []
    for c in np.unique(y_true):
        members = np.flatnonzero(y_true == c)
        wrong = members[y_pred[members] != c]
        right = members[y_pred[members] == c]
        by_class.append(list(wrong) + list(right))
    picked: list[int] = []
    while len(picked) < max_tiles and any(by_class):
        for queue in by_class:
            if queue and len(picked) < max_tiles:
                picked.append(int(queue.pop(0)))
    return np.asarray(picked, dtype=np.int64)


def save_cam_montage(crops_bgr: np.ndarray, heatmaps: np.ndarray, y_true: np.ndarray,
                     probs: np.ndarray, labels: Sequence[str], path: Path,
                     method: str = "Grad-CAM", columns: int = 6) -> None:
    """Grid of test crops with their heatmap overlays, each titled "true -> predicted p".

    crops_bgr: uint8 [N, S, S, 3] BGR; heatmaps: float [N, h, w] for each crop's predicted
    class; y_true: int [N]; probs: float [N, classes]. Wrong predictions get a red title.
    """
    _save_figure(cam_montage_figure(crops_bgr, heatmaps, y_true, probs, labels, method, columns), path)


def cam_montage_figure(crops_bgr: np.ndarray, heatmaps: np.ndarray, y_true: np.ndarray,
                       probs: np.ndarray, labels: Sequence[str], method: str = "Grad-CAM",
                       columns: int = 6):
    """The matplotlib Figure that save_cam_montage saves (same arguments)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(crops_bgr)
    columns = max(1, min(columns, n))
    rows = max(1, -(-n // columns))
    # at least 6 inches wide, so the title fits a test split of one or two crops
    fig = Figure(figsize=(max(2.2 * columns, 6.0), 2.6 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{method} of the predicted class on test crops (from model.onnx)")
    for i in range(rows * columns):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.axis("off")
        if i >= n:
            continue
        shown = overlay_heatmap(crops_bgr[i], heatmaps[i])
        ax.imshow(shown[:, :, ::-1])
        predicted = int(np.argmax(probs[i]))
        # "true", "-> predicted p" wrapped to the tile: long class names ran into the next tile
        title = [labels[int(y_true[i])], f"-> {labels[predicted]} {probs[i, predicted]:.2f}"]
        ax.set_title("\n".join(line for part in title for line in textwrap.wrap(part, 30)),
                     fontsize=8, color="black" if predicted == int(y_true[i]) else "red")
    return fig


def write_json(path: Path, data: Mapping) -> None:
    """`data` as strict JSON: an undefined number (a diverged stage's NaN loss) is null, never
    the `NaN` / `Infinity` that strict JSON readers (jq, browsers) fail on."""
    write_text(path, json.dumps(_finite_or_null(data), indent=2, allow_nan=False) + "\n")


def _finite_or_null(value):
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite_or_null(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def write_text(path: Path, text: str) -> None:
    """`text` written whole or not at all (beside `path`, then renamed); an OutputError naming
    `path` on a failure (a full disk), no partial file left."""
    from camface.outputs import replace_whole

    replace_whole(path, lambda partial: Path(partial).write_text(text))


def write_report(path: Path, *, command: str, labels: Sequence[str],
                 counts: Mapping[str, Mapping[str, int]], unreadable: Mapping[str, str | None] | Sequence[str],
                 duplicates: Sequence[str] = (),
                 split_sizes: Mapping[str, int], stages: Sequence[Mapping], metrics: Mapping,
                 settings: Mapping[str, object], seconds: float) -> None:
    """report.md: the exact command, the data (kept / skipped per class), the training stages,
    the test metrics and links to the other outputs."""
    lines = ["# camface train report", "", "Command:", "", "```", command, "```", ""]
    lines += ["## Settings", ""] + [f"- {k}: `{v}`" for k, v in settings.items()] + [""]
    lines += ["## Data", "",
              "| class | photos | used | no face | several faces | unreadable |",
              "|---|---:|---:|---:|---:|---:|"]
    for label in labels:
        c = counts.get(label, {})
        lines.append(f"| {label} | {sum(c.values())} | {c.get('ok', 0)} | {c.get('no_face', 0)} | "
                     f"{c.get('many_faces', 0)} | {c.get('unreadable', 0)} |")
    lines.append("")
    if unreadable:  # path -> why (`dataset.read_photo`), or paths
        reasons = unreadable if isinstance(unreadable, Mapping) else dict.fromkeys(unreadable)
        lines += ["Unreadable files (skipped):", ""] + [f"- `{p}`" + (f": {why}" if why else "")
                                                       for p, why in reasons.items()] + [""]
    if duplicates:
        lines += ["Copies of another photo of the same class (counted as used above, left out of "
                  "the split):", ""] + [f"- `{p}`" for p in duplicates] + [""]
    lines += ["Split (stratified, each sub-folder of a class folder in one part): " + ", ".join(f"{k} {v}" for k, v in split_sizes.items()), ""]
    lines += ["## Training", "",
              "Checkpoint: best validation accuracy, ties to the lower validation loss; a stage "
              "with best epoch '-' did not beat the one before it.", "",
              "| stage | epochs run | best val accuracy | its val loss | best epoch |",
              "|---|---:|---:|---:|---:|"]
    for stage in stages:
        lines.append(f"| {stage['name']} | {stage['epochs_run']} | "
                     f"{stage['best_val_accuracy']:.3f} | {stage['best_val_loss']:.3f} | "
                     f"{stage['best_epoch'] or '-'} |")
    lines += ["", f"Total time: {seconds:.0f} s", "",
              "## Test split (model.onnx on ONNX Runtime)", "",
              f"Accuracy **{metrics['accuracy']:.3f}** on {metrics['test_images']} crops "
              f"(chance {metrics['chance']:.3f}; always predicting the test split's largest class, "
              f"{metrics['majority_class']}, scores {metrics['majority']:.3f}).", ""]
    if metrics["accuracy"] <= metrics["majority"]:
        lines += [f"**The accuracy does not beat always predicting {metrics['majority_class']}** "
                  f"({metrics['accuracy']:.3f} <= {metrics['majority']:.3f}): on this test split the "
                  "model does no better than one that ignores the faces.", ""]
    lines += ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for label, m in metrics["per_class"].items():
        lines.append(f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
                     f"{m['support']} |")
    lines += ["", "![confusion matrix](confusion.png)", "",
              "![Grad-CAM montage](cam_montage.png)", "",
              "## Files", "",
              "- `model.keras`: the best checkpoint (validation accuracy)",
              "- `labels.txt`: class names, one per line, in output order",
              "- `model.onnx`: the CAM graph; run it with `camface live --model model.onnx`",
              "- `metrics.json`, `confusion.png`, `cam_montage.png`: the test split",
              "- `crops/`: cached face crops (re-runs with the same settings reuse them)", ""]
    write_text(path, "\n".join(lines))
