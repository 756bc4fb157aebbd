"""camface: real-time class-activation maps for face classifiers.

    import camface
    with camface.load() as cam:
        result = cam.explain(frame)   # uint8 BGR [H, W, 3] -> camface.FrameResult

See `camface.api`. The names below load on first use, so `import camface` (and the `camface`
command's --help) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from camface.errors import CamfaceError, ModelError, OutputError, SourceError, UsageError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from camface.api import Picture, Pipeline, load
    from camface.realtime.config import LiveConfig
    from camface.realtime.results import Face, FrameResult, Prediction

__all__ = ["CamfaceError", "Face", "FrameResult", "LiveConfig", "ModelError", "OutputError", "Picture",
           "Pipeline", "Prediction", "SourceError", "UsageError", "__version__", "load"]

_LAZY = {"load": "camface.api", "Pipeline": "camface.api", "Picture": "camface.api",
         "LiveConfig": "camface.realtime.config", "Face": "camface.realtime.results",
         "FrameResult": "camface.realtime.results", "Prediction": "camface.realtime.results"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'camface' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy names too, so `dir(camface)` and a notebook's completion list `load`."""
    return sorted(set(globals()) | set(__all__))
