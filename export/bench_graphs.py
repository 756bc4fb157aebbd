"""CAM graphs of the study's big backbones with random weights, for `camface bench --backbone`.

Users see what a large backbone costs on their machine without downloading ImageNet weights:
the speed of a network does not depend on its weights. Graphs are built once, seeded, and kept
in a cache folder (with the Keras model, which `--baseline keras` needs).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CLASSES = 7  # as many as the bundled emotion model, so the heads cost the same


def backbone_graph(builder: str, size: int, folder: str | Path) -> tuple[Path, Path]:
    """(CAM graph .onnx, Keras model .keras) of `models.builders.BUILDERS[builder]` at
    `size` x `size` pixels with seeded random weights, in `folder`; built and exported on first
    use (minutes for ResNet50), reused afterwards."""
    from camface.models.builders import BUILDERS, PRESETS

    if builder not in BUILDERS:
        raise ValueError(f"unknown backbone {builder!r}; expected one of {', '.join(BUILDERS)}")
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{builder}_{size}_random_seed0"
    onnx_path, keras_path = folder / f"{stem}.onnx", folder / f"{stem}.keras"
    if onnx_path.is_file() and keras_path.is_file() and _has_every_method(onnx_path):
        return onnx_path, keras_path

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from camface.export.exporter import ExportOptions, export
    from camface.outputs import writing, written_beside

    log.info("building %s at %dx%d with random weights and exporting it to %s (once)",
             builder, size, size, onnx_path)
    keras.utils.set_random_seed(0)
    model = BUILDERS[builder](CLASSES, input_size=size, weights=None)
    # Both written beside their names and renamed over them together (camface.outputs): a
    # concurrent run never reads half a file, and a failure (the export, a rename, Ctrl-C) leaves
    # no new Keras model beside an older graph, errors naming the cached files
    with written_beside(keras_path, onnx_path) as (staged_keras, staged_onnx):
        with writing(staged_keras):
            model.save(staged_keras)
        export(staged_keras, staged_onnx, ExportOptions(preset=PRESETS[builder]), source_name=keras_path.name)
    return onnx_path, keras_path


def _has_every_method(path: Path) -> bool:
    """Whether a cached graph holds every method of the registry (one exported before a method
    was added does not, and is exported again)."""
    import json

    import onnx

    from camface import methods

    model = onnx.load(str(path), load_external_data=False)
    heatmaps = json.loads({p.key: p.value for p in model.metadata_props}.get("heatmaps", "[]"))
    return set(methods.names()) <= set(heatmaps)
