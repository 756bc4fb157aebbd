"""The WebSocket protocol between the page and `camface serve`, and its checks (pure, no I/O).

Page -> server:
  binary  one camera frame: 4-byte big-endian sequence number, then a JPEG or PNG image
          (at most MAX_MESSAGE_BYTES in all, at most MAX_SIDE pixels a side, a JPEG at most
          MAX_SCANS scans).
  text    a control message, a JSON object with known fields only:
          {"type": "controls", "method": str, "explained_class": int | null, "hud": bool,
           "smooth": bool}   (each field optional)
          {"type": "snapshot"}
          {"type": "record", "on": bool, "fps": number (optional, 1..120)}
Server -> page:
  text    {"type": "hello", ...} once, {"type": "snapshot" | "recording" | "recorded", ...};
          "recording" has the file and its fps, and "already": true and a "note" when a
          recording was in progress (it goes on at its own fps; another fps is ignored)
  binary  one processed frame: 4-byte big-endian length L, L bytes of UTF-8 JSON (the frame's
          `result_message`), then the annotated frame as a JPEG.
A message that breaks these rules closes that client's socket with a code and a reason.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

MAX_MESSAGE_BYTES = 2 * 1024 * 1024  # 2 MiB: a 4096x4096 JPEG at ordinary quality is smaller
MAX_SIDE = 4096  # pixels, width and height
MAX_CONTROL_BYTES = 4096
# Scans of a JPEG: each is one more pass over the whole image. Encoders write 1 (baseline) or
# about 10 (progressive); a 2 MiB file of repeated scans would take minutes to decode.
MAX_SCANS = 32

# WebSocket close codes (RFC 6455 sec. 7.4.1; 4000-4999 are the application's own)
POLICY = 1008  # token or Origin refused
UNSUPPORTED = 1003  # a message that is not what the protocol allows
TOO_BIG = 1009
TRY_LATER = 1013  # the server is full (--max-clients)
# the server is shutting down: what uvicorn sends the sockets it holds at shutdown (1012, service
# restart), which the page retries once the server answers again (1001 was not retried)
SHUTTING_DOWN = 1012


class ProtocolError(ValueError):
    """A message the protocol does not allow; `code` is the WebSocket close code to send."""

    def __init__(self, message: str, code: int = UNSUPPORTED):
        super().__init__(message)
        self.code = code


def image_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from a JPEG or PNG header, without decoding the pixels, so an
    oversized image is refused before it is decompressed. Raises ProtocolError otherwise."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ProtocolError("frame is a truncated PNG (no IHDR header)")
        width, height = struct.unpack(">II", data[16:24])
        return "png", width, height
    if data[:3] != b"\xff\xd8\xff":
        raise ProtocolError("frame is not a JPEG or PNG image")
    pos = 2
    while pos + 4 <= len(data):  # walk the JPEG segments to the start-of-frame (SOFn)
        if data[pos] != 0xFF:
            raise ProtocolError("frame is a corrupt JPEG (bad segment marker)")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # segments without a length
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return "jpeg", width, height
        if marker == 0xDA or length < 2:  # scan data before any frame header
            break
        pos += 2 + length
    raise ProtocolError("frame is a truncated or corrupt JPEG (no frame header)")


def parse_frame(message: bytes) -> tuple[int, bytes]:
    """(sequence number, image bytes) from a binary frame message, its size and image header
    checked (`image_size`); raises ProtocolError naming the rule broken."""
    if len(message) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"frame message of {len(message)} bytes is over the "
                            f"{MAX_MESSAGE_BYTES // (1024 * 1024)} MiB cap", TOO_BIG)
    if len(message) < 5:
        raise ProtocolError(f"frame message of {len(message)} bytes: expected a 4-byte sequence number "
                            "and an image")
    sequence = struct.unpack(">I", message[:4])[0]
    image = message[4:]
    kind, width, height = image_size(image)
    if not (width and height):  # a corrupt header, or a JPEG whose height comes later (DNL: libjpeg refuses it)
        raise ProtocolError(f"frame of {width}x{height} pixels: its {kind.upper()} header gives a side of 0")
    if not (width <= MAX_SIDE and height <= MAX_SIDE):
        raise ProtocolError(f"frame of {width}x{height} pixels is over the {MAX_SIDE}x{MAX_SIDE} cap", TOO_BIG)
    # start-of-scan markers: never inside entropy-coded data (an FF there is followed by 00 or
    # a restart marker); bytes of an APPn payload may count too, which a cap this loose absorbs
    if kind == "jpeg" and (scans := image.count(b"\xff\xda")) > MAX_SCANS:
        raise ProtocolError(f"frame is a JPEG of {scans} scans, over the {MAX_SCANS} cap", TOO_BIG)
    return sequence, image


def decode_image(image: bytes):
    """uint8 BGR [H, W, 3] from JPEG/PNG bytes already checked by `parse_frame`."""
    import cv2
    import numpy as np

    frame = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
    if frame is None:
        raise ProtocolError("frame does not decode as a JPEG or PNG image")
    return frame


@dataclass(frozen=True)
class Control:
    """A parsed control message: kind is "controls", "snapshot" or "record"; `fields` holds
    the checked fields it carried."""

    kind: str
    fields: dict


# type -> {field: (allowed types, check or None)}
_CONTROL_FIELDS = {
    "controls": {"method": (str,), "explained_class": (int, type(None)), "hud": (bool,), "smooth": (bool,)},
    "snapshot": {},
    "record": {"on": (bool,), "fps": (int, float)},
}


def parse_control(text: str, methods: tuple[str, ...], classes: int) -> Control:
    """A Control from a text message; raises ProtocolError for anything not allowed (not JSON,
    unknown type or field, wrong type, a method the graph lacks, a class out of range)."""
    if len(text.encode()) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message over {MAX_CONTROL_BYTES} bytes", TOO_BIG)
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"control message is not JSON ({exc.msg})") from None
    except RecursionError:  # thousands of nested [ or { fit in MAX_CONTROL_BYTES
        raise ProtocolError("control message is nested too deeply") from None
    kind = message.get("type") if isinstance(message, dict) else None
    if not isinstance(kind, str) or kind not in _CONTROL_FIELDS:  # a list or dict type is unhashable
        raise ProtocolError(f"control message needs a type among {', '.join(_CONTROL_FIELDS)}")
    del message["type"]
    allowed = _CONTROL_FIELDS[kind]
    for name, value in message.items():
        if name not in allowed:
            raise ProtocolError(f"unknown field {name!r} in {kind!r} message")
        types = allowed[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError(f"field {name!r} of {kind!r} has the wrong type ({type(value).__name__})")
    if "method" in message and message["method"] not in (*methods, "none"):
        raise ProtocolError(f"method {message['method']!r} unknown; the graph offers {', '.join(methods)}, none")
    k = message.get("explained_class")
    if k is not None and not 0 <= k < classes:
        raise ProtocolError(f"explained_class {k} out of range 0..{classes - 1}")
    if "fps" in message and not 1 <= message["fps"] <= 120:
        raise ProtocolError(f"fps {message['fps']} out of range 1..120")
    return Control(kind, message)


def result_message(sequence: int, result, stage_ms: dict, dropped_frames: int, batch_frames: int,
                   recording: bool) -> dict:
    """The JSON sent with an annotated frame: its sequence number, each face (box x, y, w, h
    in pixels of the frame, detector score, probabilities, predicted and explained class, the
    predicted label (`Prediction.label`: `unknown (best: NAME 0.31)` on a gallery graph below its
    threshold), track id, and a gallery graph's similarities, with `saturated: true` where its
    heatmap explains the projection, `Prediction.saturated`), the method and explained class, this frame's per-stage milliseconds, stale
    frames of this client dropped so far, how many frames shared the graph call, and whether
    it was recorded."""
    faces = [{"box": [int(v) for v in face.box], "score": round(float(face.score), 4),
              "probs": [round(float(p), 4) for p in prediction.probs],
              "predicted": int(prediction.predicted), "explained": int(prediction.explained),
              "predicted_label": prediction.label(result.labels, result.threshold),
              "track_id": int(face.track_id),
              **({"similarity": [round(float(s), 4) for s in prediction.similarity]}
                 if prediction.similarity.size else {}),
              **({"saturated": True} if prediction.saturated else {})}
             for face, prediction in zip(result.faces, result.predictions)]
    return {"type": "result", "seq": sequence, "index": result.index, "faces": faces,
            "faces_dropped": result.dropped, "method": result.method,
            "explained_class": result.explained_class,
            "stage_ms": {k: round(v, 2) for k, v in stage_ms.items()},
            "frames_dropped": dropped_frames, "batch_frames": batch_frames, "recording": recording}


def pack_result(message: dict, jpeg: bytes) -> bytes:
    """The binary reply: 4-byte big-endian JSON length, the JSON, the JPEG."""
    body = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body + jpeg


def unpack_result(data: bytes) -> tuple[dict, bytes]:
    """(message, jpeg) from `pack_result`'s bytes (for tests and Python clients)."""
    length = struct.unpack(">I", data[:4])[0]
    return json.loads(data[4:4 + length]), data[4 + length:]
