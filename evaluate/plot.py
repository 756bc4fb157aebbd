"""`camface evaluate --plot`: mean deletion and insertion curves per method (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from camface.errors import OutputError


def plot_curves(report: dict, path: Path) -> Path:
    """Two panels (deletion, insertion): the mean of what was scored (settings["scored"]: the
    probability of the explained class, a gallery graph's cosine similarity) against the
    fraction of pixels removed / revealed, one line per method, the random baseline dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OutputError("--plot needs matplotlib, a camface dependency: pip install 'matplotlib>=3.8'") from exc
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (key, title) in zip(axes, (("deletion", "Deletion (lower is better)"),
                                       ("insertion", "Insertion (higher is better)"))):
        for name, m in report["methods"].items():
            values = m[f"{key}_curve"]
            xs = [i / (len(values) - 1) for i in range(len(values))]
            ax.plot(xs, values, "--" if name == "random" else "-", color="black" if name == "random" else None,
                    label=f"{name} ({m[f'{key}_auc']:.3f})")
        ax.set_title(title)
        ax.set_xlabel(f"fraction of pixels {'removed' if key == 'deletion' else 'revealed'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(report["settings"].get("scored", "probability of the explained class"))  # older reports
    settings = report["settings"]
    figure.suptitle(f"{Path(settings['model']).name}: {settings['crops']} crops of {settings['source']}", fontsize=10)
    return _save(figure, path, dpi=110)


def plot_sanity(report: dict, figure_data: dict, path: Path) -> Path:
    """The cascading-randomisation figure (Adebayo et al. 2018, fig. 2): per method, a row per
    shown crop; columns: the crop, its original map, then each randomisation step's map (|map|
    normalised, as compared); each method's row title gives its verdicts."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OutputError("--plot needs matplotlib, a camface dependency: pip install 'matplotlib>=3.8'") from exc
    from camface.evaluate.report import sanity_cell

    crops, steps, maps = figure_data["crops"], figure_data["steps"], figure_data["maps"]
    rows = [(name, i) for name in maps for i in range(len(crops))]
    columns = 1 + max(len(step_maps) for step_maps in maps.values())  # the guided cascade may differ
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.25 * columns, 1.3 * len(rows) + 0.6), squeeze=False)
    for row, (name, i) in enumerate(rows):
        gray = crops[i].shape[-1] == 1  # crops are in the graph's colour order
        rgb = crops[i][..., ::-1] if report["settings"].get("color_order") == "BGR" else crops[i]
        axes[row, 0].imshow(crops[i][..., 0] if gray else rgb, cmap="gray" if gray else None)
        for column, step_maps in enumerate(maps[name]):
            axes[row, column + 1].imshow(step_maps[i], cmap="jet", vmin=0, vmax=1)
        axes[row, 0].set_ylabel(name if i == 0 else "", fontsize=7)
        if i == 0:
            own = report["sanity"][name]["model_randomization"]["steps"]
            note = "" if own == steps else f" (steps: {', '.join(own)})"
            axes[row, 1].set_title(f"{name}: {sanity_cell(report['sanity'][name])}{note}", fontsize=6, loc="left")
    for column, title in enumerate(["crop", "original", *steps]):
        axes[-1, column].set_xlabel(title, fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    settings = report["settings"]
    figure.suptitle(f"Sanity check: {Path(settings['model']).name} at {settings['target_layer']}, weights re-drawn "
                    f"from the logits down (seed {settings.get('sanity_seed', 0)})", fontsize=8)
    return _save(figure, path, dpi=100)


def _save(figure, path: Path, dpi: int) -> Path:
    """Lay out, write and close a matplotlib figure; OutputError naming `path` when it cannot be written."""
    import matplotlib.pyplot as plt

    from camface.outputs import replace_whole

    figure.tight_layout()
    try:  # a full disk leaves an earlier figure whole, not half a PNG (OutputError naming it)
        replace_whole(path, lambda partial: figure.savefig(partial, dpi=dpi,
                                                           format=Path(path).suffix.lstrip(".").lower() or None))
    except OSError as exc:  # about another file savefig read: named as it is
        raise OutputError(f"cannot write {path}: {exc}") from exc
    finally:
        plt.close(figure)
    return path
