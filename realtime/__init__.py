"""The live loop (`camface live`), on numpy, OpenCV, MediaPipe and ONNX Runtime only.

Modules along the data flow: sources (and sample) -> detect -> crop -> graph (classify +
explain) -> smooth -> render -> sinks / snapshot; loop wires them with threads, timing times
them, controls says what the keys change, window shows frames, cli is the command.
"""
