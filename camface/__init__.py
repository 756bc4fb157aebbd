"""camface: real-time class-activation maps for face classifiers."""

__version__ = "0.1.0"
