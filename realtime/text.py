"""Text on frames: `TextPainter.put(frame, text, org, scale, colour)` draws IN PLACE on a uint8
BGR frame, `TextPainter.size(text, scale)` measures, both with cv2.putText's conventions (`org`
is the left end of the baseline; size is ((width, height above the baseline), baseline)).

Labels are user strings (a gallery's names, a label file in any language). OpenCV's built-in
fonts draw a fixed set of characters and every other one as "?", so:

- text whose every character cv2.putText draws (all ASCII, Latin-1 and whatever else the
  installed OpenCV's font has; probed once per character) takes cv2.putText exactly as before:
  the live loop's fast path, same pixels;
- any other text is drawn with a TrueType font through Pillow: the first font of
  `candidate_fonts()` that has a glyph for each of its characters (the CAMFACE_FONT
  environment variable first, then DejaVu Sans and common CJK/Noto fonts, then what fontconfig's
  `fc-list` finds). Rendered strings are cached (an LRU of alpha masks), so a label that repeats
  every frame costs a blit. When no font has every glyph, the font with the most is used
  (missing characters come out as boxes) and ONE warning per painter says how to fix it.

Right-to-left scripts are shaped and ordered only when Pillow has libraqm
(`PIL.features.check("raqm")`); without it, Arabic letters come out unjoined, left to right.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import threading
import unicodedata
from collections import OrderedDict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)

FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_ENV = "CAMFACE_FONT"

# Fonts tried after CAMFACE_FONT, in order, where they exist: broad Latin/Greek/Cyrillic/Arabic/
# Hebrew coverage first (DejaVu: Debian's fonts-dejavu-core, and the copy matplotlib bundles),
# then CJK (Debian's fonts-noto-cjk, fonts-wqy-zenhei, fonts-droid-fallback; macOS; Windows).
SYSTEM_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/arial.ttf",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/malgun.ttf",
)


def _bundled_dejavu() -> str | None:
    """matplotlib's own DejaVuSans.ttf, found without importing matplotlib (slow to import)."""
    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return str(path)
    return None


def candidate_fonts() -> list[str]:
    """Font files to try, in order: CAMFACE_FONT (one path, or several joined by os.pathsep;
    a path that is not a file is skipped with a warning), the SYSTEM_FONTS that exist, and
    matplotlib's bundled DejaVu Sans."""
    chosen = []
    for path in filter(None, os.environ.get(FONT_ENV, "").split(os.pathsep)):
        if Path(path).is_file():
            chosen.append(path)
        else:
            log.warning("%s=%s: no such font file; ignored", FONT_ENV, path)
    chosen += [path for path in SYSTEM_FONTS if Path(path).is_file()]
    bundled = _bundled_dejavu()
    return chosen + ([bundled] if bundled else [])


def fontconfig_fonts(chars: str) -> list[str]:
    """Font files that fontconfig says have every character of `chars` ([] without `fc-list`)."""
    if not shutil.which("fc-list"):
        return []
    pattern = ":charset=" + " ".join(f"{ord(c):x}" for c in sorted(set(chars)))
    try:
        listed = subprocess.run(["fc-list", "--format", "%{file}\n", pattern], capture_output=True,
                                text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({line for line in listed.splitlines() if line.lower().endswith((".ttf", ".otf", ".ttc"))})


def _needs_glyph(char: str) -> bool:
    """False for characters that draw nothing (spaces, controls, format characters)."""
    return unicodedata.category(char)[0] not in "ZC"


class TextPainter:
    """Measures and draws text (see the module docstring). Holds caches, so keep one per
    renderer: which characters cv2.putText draws, which font covers a string, and the
    `cache_size` most recent Pillow renderings. Safe to share between threads."""

    def __init__(self, font: int = FONT, fonts: list[str] | None = None, cache_size: int = 256):
        self.font, self.cache_size = font, cache_size
        self._fonts = fonts  # None: candidate_fonts() on first use
        self._cv_draws: dict[str, bool] = {}
        self._faces: dict[tuple[str, float], Any] = {}
        self._covers: dict[tuple[str, str], bool] = {}
        self._notdef: dict[str, tuple] = {}
        self._cap_per_scale: float | None = None
        self._font_of: dict[str, str | None] = {}  # by the characters that need a glyph
        self._asked: set[str] = set()  # characters fontconfig was asked about
        self._rendered: OrderedDict[tuple[str, float, int], tuple | None] = OrderedDict()
        self.warned = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ which path
    def opencv_draws(self, text: str) -> bool:
        """True when cv2.putText draws every character of `text` (none comes out as '?')."""
        if text.isascii():
            return True
        return all(self._cv_draws[c] if c in self._cv_draws else self._probe(c) for c in text)

    def _probe(self, char: str) -> bool:
        def drawn(s: str) -> np.ndarray:
            canvas = np.zeros((64, 64), np.uint8)
            cv2.putText(canvas, s, (8, 44), self.font, 1.0, 255, 1, cv2.LINE_8)
            return canvas

        self._cv_draws[char] = ok = char == "?" or not np.array_equal(drawn(char), drawn("?"))
        return ok

    # ------------------------------------------------------------------ public verbs
    def size(self, text: str, scale: float, thickness: int = 1) -> tuple[tuple[int, int], int]:
        """((width, height above the baseline), pixels below the baseline) of `text`, as
        cv2.getTextSize; for Pillow-drawn text, of the glyphs' real extent (never smaller than
        cv2's height and baseline at this scale, so boxes keep their size between paths)."""
        rendered = None if self.opencv_draws(text) else self._render(text, scale, thickness)
        if rendered is None:
            (width, height), baseline = cv2.getTextSize(text, self.font, scale, thickness)
            return (width, height), baseline
        return rendered[4]

    def put(self, frame: np.ndarray, text: str, org: tuple[int, int], scale: float,
            colour: tuple[int, int, int], thickness: int = 1) -> np.ndarray:
        """Draws `text` IN PLACE on the uint8 BGR `frame` with its baseline starting at `org`
        (x, y pixels), in BGR `colour`; clipped at the frame's edges. Returns `frame`."""
        rendered = None if self.opencv_draws(text) else self._render(text, scale, thickness)
        if rendered is None:
            cv2.putText(frame, text, org, self.font, scale, colour, thickness, cv2.LINE_AA)
            return frame
        under, over, left, top, _ = rendered
        x0, y0 = org[0] + left, org[1] + top
        fx0, fy0 = max(x0, 0), max(y0, 0)
        fx1, fy1 = min(x0 + under.shape[1], frame.shape[1]), min(y0 + under.shape[0], frame.shape[0])
        if fx1 <= fx0 or fy1 <= fy0:
            return frame
        rows, cols = slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0)
        region = frame[fy0:fy1, fx0:fx1]
        ink = np.empty_like(region)
        ink[...] = colour
        region[...] = cv2.blendLinear(region, ink, under[rows, cols], over[rows, cols])
        return frame

    # ------------------------------------------------------------------ the Pillow path
    def _render(self, text: str, scale: float, thickness: int) -> tuple | None:
        """(1 - alpha, alpha, left, top, size): float32 [h, w] weights in [0, 1] of the frame and
        of the text colour (cv2.blendLinear's), their top-left at org + (left, top), and `size`'s
        answer; cached. None (cv2.putText draws it, with its "?") when Pillow cannot: not
        installed, or a font file that fails to load; said once."""
        key = (text, scale, thickness)
        with self._lock:  # serve draws for several clients at once with one renderer
            if key in self._rendered:
                self._rendered.move_to_end(key)
                return self._rendered[key]
            entry: tuple | None
            try:
                entry = self._pillow(text, scale, thickness)
            except (ImportError, OSError, ValueError) as error:
                if not self.warned:
                    self.warned = True
                    log.warning("label %r: cannot draw it with a TrueType font (%s); characters OpenCV's "
                                "font lacks show as '?'", text, error)
                entry = None
            self._rendered[key] = entry
            if len(self._rendered) > self.cache_size:
                self._rendered.popitem(last=False)
            return entry

    def _pillow(self, text: str, scale: float, thickness: int) -> tuple:
        """`_render`'s answer, uncached."""
        from PIL import Image, ImageDraw

        face = self._face(self._font_for(text), scale)
        stroke = max(thickness - 1, 0)
        left, top, right, bottom = face.getbbox(text, anchor="ls", stroke_width=stroke)
        image = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
        ImageDraw.Draw(image).text((-left, -top), text, fill=255, font=face, anchor="ls", stroke_width=stroke)
        (_, height), baseline = cv2.getTextSize("H", self.font, scale, thickness)
        size = ((max(int(right), 1), max(-int(top), height)), max(int(bottom), baseline))
        over = np.asarray(image, np.float32) * (1 / 255)
        return 1 - over, over, int(left), int(top), size

    def _face(self, path: str | None, scale: float):
        """The Pillow font for `path` (Pillow's built-in one when None) whose capital H is as
        tall as cv2.putText's at `scale`."""
        from PIL import ImageFont

        key = (path or "", scale)
        if key not in self._faces:
            want = self._cap_height(scale)
            if path is None:
                self._faces[key] = ImageFont.load_default(size=max(want / 0.73, 4))
            else:
                probe = ImageFont.truetype(path, 100)
                cap = max(-probe.getbbox("H", anchor="ls")[1], 1)
                self._faces[key] = ImageFont.truetype(path, max(int(round(100 * want / cap)), 4))
        return self._faces[key]

    def _cap_height(self, scale: float) -> float:
        """Height in pixels of the ink of cv2.putText's "H" at `scale` (measured at scale 4)."""
        if self._cap_per_scale is None:
            canvas = np.zeros((200, 200), np.uint8)
            cv2.putText(canvas, "H", (20, 160), self.font, 4.0, 255, 1, cv2.LINE_AA)
            inked = np.nonzero(canvas.max(axis=1) > 127)[0]
            self._cap_per_scale = (inked.max() - inked.min() + 1) / 4.0 if inked.size else 20.0
        return self._cap_per_scale * scale

    def _has_glyph(self, path: str, char: str) -> bool:
        """Whether the font at `path` has `char`: its rendering differs from the font's missing-
        glyph box (.notdef, what U+10FFFF, a noncharacter, renders as)."""
        if not _needs_glyph(char):
            return True
        key = (path, char)
        if key not in self._covers:
            face = self._face(path, 1.0)

            def mask(c: str) -> tuple:
                m = face.getmask(c)
                return m.size, bytes(m)

            if path not in self._notdef:
                self._notdef[path] = mask("\U0010ffff")
            self._covers[key] = mask(char) != self._notdef[path]
        return self._covers[key]

    def _font_for(self, text: str) -> str | None:
        """The first font that has every glyph of `text`; else (one warning) the one with most.
        Characters no candidate has are looked up once with fontconfig."""
        chars = "".join(sorted({c for c in text if _needs_glyph(c)}))
        if chars in self._font_of:
            return self._font_of[chars]
        if self._fonts is None:
            self._fonts = [path for path in candidate_fonts() if self._loads(path)]
        lacking = "".join(c for c in chars if not any(self._has_glyph(p, c) for p in self._fonts))
        if lacking and lacking not in self._asked:
            self._asked.add(lacking)
            self._fonts += [p for p in fontconfig_fonts(lacking) if p not in self._fonts and self._loads(p)]
        chosen = next((p for p in self._fonts if all(self._has_glyph(p, c) for c in chars)), None)
        if chosen is None:
            chosen = max(self._fonts, key=lambda p: sum(self._has_glyph(p, c) for c in chars), default=None)
            if not self.warned:
                self.warned = True
                missing = "".join(c for c in chars if chosen is None or not self._has_glyph(chosen, c))
                log.warning("label %r: no font found here has the characters %r (drawn as boxes); install a "
                            "font that has them (e.g. `apt install fonts-noto-cjk` for Chinese, Japanese, "
                            "Korean) or set %s=/path/to/font.ttf", text, missing, FONT_ENV)
        self._font_of[chars] = chosen
        return chosen

    def _loads(self, path: str) -> bool:
        """Whether Pillow opens the font file at `path` (a warning when not)."""
        try:
            self._face(path, 1.0)
        except OSError as error:
            log.warning("font %s: %s; skipped", path, error)
            return False
        return True
