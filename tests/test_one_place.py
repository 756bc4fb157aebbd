"""One place per concept (STYLE.md 12): the overlay's look defaults to LiveConfig's, and the
pipeline's pieces are chosen where `camface.load` chooses them. The source scans guard the
wiring the front ends share; each names what it found where."""

import inspect
import re
from pathlib import Path

import numpy as np

from camface.realtime.config import LiveConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGE = ("camface", "realtime", "serve", "batch", "evaluate", "export", "guided", "models")


def sources() -> dict[str, str]:
    return {str(path.relative_to(REPO)): path.read_text() for folder in PACKAGE
            for path in sorted((REPO / folder).rglob("*.py"))}


def where(pattern: str) -> list[str]:
    return sorted(name for name, text in sources().items() if re.search(pattern, text, re.M))


def test_every_overlay_defaults_to_live_configs_look():
    from camface.guided.figure import shown_overlay
    from camface.models.report import overlay_heatmap
    from camface.realtime.overlay import overlay
    from camface.realtime.render import HeatmapAnnotator, Renderer

    live = LiveConfig()
    for function in (overlay, HeatmapAnnotator, Renderer):
        parameters = inspect.signature(function).parameters
        assert (parameters["alpha"].default, parameters["colormap"].default) == (live.alpha, live.colormap), function
    image = np.full((32, 32, 3), 90, np.uint8)
    heatmap = np.arange(16, dtype=np.float32).reshape(4, 4)
    want = overlay(image, heatmap, "gradcam", live.colormap, live.alpha)
    np.testing.assert_array_equal(overlay_heatmap(image, heatmap), want)  # the training montage
    np.testing.assert_array_equal(shown_overlay(image[..., ::-1], heatmap, "gradcam"), want[..., ::-1])  # figures
    assert where(r"alpha: float = 0\.\d") == ["realtime/config.py"]  # (builders.py: MobileNet width)


def test_the_pipelines_pieces_are_chosen_in_one_place():
    assert where(r"\bEMOTION_ONNX\b") == ["camface/api.py", "guided/image.py", "models/__init__.py"]  # guided:
    # the bundled graph as the one made from the bundled Keras model, not a default
    assert where(r"\b(Onnx)?FaceDetector\(") == ["camface/api.py"]
    assert where(r"\bRenderer\(") == []  # Renderer.from_config(config) everywhere
    assert where(r"cv2\.(putText|getTextSize)\(") == ["realtime/text.py"]  # labels in any script: TextPainter
    assert where(r"\.__enter__\(\)") == ["realtime/pace.py"]  # LoopingSource re-enters the source it wraps
    assert where(r"^class Controls\b") == ["realtime/controls.py"] and "Controls" not in sources()["realtime/window.py"]
    assert where(r"[\"']snapshot\.json[\"']") == ["realtime/snapshot.py"]
    assert where(r"^class BatchJob") == ["batch/pipeline.py"]
    assert "config: LiveConfig" in sources()["batch/pipeline.py"]
    assert where(r"print\(f?\"camface \w+: error") == []  # the one error line is camface/cli.py's
