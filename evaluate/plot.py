"""`camface evaluate --plot`: mean deletion and insertion curves per method (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from camface.errors import OutputError


def plot_curves(report: dict, path: Path) -> Path:
    """Two panels (deletion, insertion): mean probability of the explained class against the
    fraction of pixels removed / revealed, one line per method, the random baseline dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OutputError("--plot needs matplotlib (pip install 'camface[keras]')") from exc
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
    axes[0].set_ylabel("probability of the explained class")
    settings = report["settings"]
    figure.suptitle(f"{Path(settings['model']).name}: {settings['crops']} crops of {settings['source']}", fontsize=10)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=110)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc
    finally:
        plt.close(figure)
    return path
