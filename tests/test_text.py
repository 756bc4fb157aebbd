"""Labels in any script (camface.realtime.text): what OpenCV's font draws keeps cv2.putText's
pixels; Greek, Cyrillic and other names are drawn with a TrueType font instead of "?"; a
missing font says so once; rendered labels are cached. Fonts: DejaVu Sans (Debian's
fonts-dejavu-core, or the copy matplotlib bundles)."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from camface.realtime import text as text_module
from camface.realtime.render import BarsAnnotator, BoxAnnotator
from camface.realtime.results import Face, FrameResult, Prediction
from camface.realtime.text import FONT, TextPainter, candidate_fonts

GREEK, CYRILLIC, OTHER_CYRILLIC = "Σοφία", "Иван", "Мария"


def _font_with(chars: str) -> str:
    """The first candidate font that has every glyph of `chars`, else the test is skipped."""
    painter = TextPainter()
    for path in candidate_fonts():
        if all(painter._has_glyph(path, c) for c in chars):
            return path
    pytest.skip(f"no font here has {chars!r} (install fonts-dejavu-core or the keras extra's matplotlib)")


def _drawn(painter: TextPainter, text: str, scale: float = 0.5) -> np.ndarray:
    frame = np.zeros((40, 240, 3), np.uint8)
    painter.put(frame, text, (4, 28), scale, (255, 255, 255))
    return frame


def _question_marks(text: str) -> np.ndarray:
    """What cv2.putText draws for a label whose every character is missing from its font."""
    frame = np.zeros((40, 240, 3), np.uint8)
    cv2.putText(frame, "?" * len(text), (4, 28), FONT, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return frame


def _result(labels: tuple[str, ...], box=(40, 50, 60, 60)) -> FrameResult:
    prediction = Prediction(probs=np.array([0.7, 0.2, 0.1], np.float32), heatmap=np.ones((4, 4), np.float32),
                            predicted=0, explained=1, method="gradcam")
    return FrameResult(index=0, faces=(Face(box, 0.9, crop_box=box),), predictions=(prediction,),
                       method="gradcam", labels=labels)


@pytest.mark.parametrize("labels", [("Ivan", "Maria", "x"), ("José", "Zoë Müller", "Ærø")])
def test_labels_opencv_draws_keep_cv2_puttext_pixels(labels):
    """ASCII and Latin-1 labels: the same pixels as the cv2 calls BoxAnnotator and BarsAnnotator made before."""
    result = _result(labels)
    frame = np.full((160, 320, 3), 90, np.uint8)  # wide enough: a label past the edge is moved in (3c2a778)
    BoxAnnotator().annotate(frame, result)
    BarsAnnotator().annotate(frame, result)

    want = np.full((160, 320, 3), 90, np.uint8)
    x, y, w, h = result.faces[0].box
    cv2.rectangle(want, (x, y), (x + w - 1, y + h - 1), (0, 200, 0), 2)
    caption = result.predictions[0].caption(labels)
    (tw, th), base = cv2.getTextSize(caption, FONT, 0.5, 1)
    top = y - th - base - 2
    cv2.rectangle(want, (x, top), (x + tw + 4, top + th + base + 2), (0, 200, 0), -1)
    cv2.putText(want, caption, (x + 2, top + th + 1), FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for rank, k in enumerate((0, 1, 2)):
        row_y = y + h + 2 + rank * 14
        cv2.rectangle(want, (x, row_y), (x + 90, row_y + 11), (0, 0, 0), -1)
        cv2.rectangle(want, (x, row_y), (x + int(round(float(result.predictions[0].probs[k]) * 90)), row_y + 11),
                      (0, 200, 0), -1)
        cv2.putText(want, f"{labels[k]} {result.predictions[0].probs[k]:.2f}", (x + 94, row_y + 10), FONT, 0.4,
                    (255, 255, 255), 1, cv2.LINE_AA)
    np.testing.assert_array_equal(frame, want)


@pytest.mark.parametrize("as_opencv_4", [False, True])
@pytest.mark.parametrize("name, other", [(GREEK, "Νίκος"), (CYRILLIC, OTHER_CYRILLIC)])
def test_greek_and_cyrillic_names_are_drawn_not_question_marks(name, other, as_opencv_4):
    """`as_opencv_4`: as where OpenCV's font has no character past Latin-1 (OpenCV 5.1 draws Cyrillic)."""
    _font_with(name + other)
    painter = TextPainter()
    if as_opencv_4:
        painter._cv_draws.update({c: ord(c) < 256 for c in name + other})
        assert not painter.opencv_draws(name) and not painter.opencv_draws(other)
    drawn, other_drawn = _drawn(painter, name), _drawn(painter, other)
    assert drawn.any()
    assert not np.array_equal(drawn, _question_marks(name))
    assert not np.array_equal(other_drawn, _question_marks(other))
    assert not np.array_equal(drawn, other_drawn)  # two names, two drawings
    boxes = _drawn(TextPainter(fonts=[_font_with(name)]), "\U0010ffff" * len(name))  # a font's missing glyphs
    assert boxes.any() and not np.array_equal(drawn, boxes)


@pytest.mark.parametrize("text", ["Ivan 0.93", "Σοφία 0.71 (why Иван?)", "Дмитрий Щукин 0.40", "Ψάρης"])
def test_the_measured_size_holds_the_ink(text):
    """Label backgrounds come from `size`: the ink stays within (width, height) above the
    baseline and `baseline` below it (1 px of anti-aliasing aside), whichever path draws it."""
    _font_with(text)
    painter = TextPainter()
    (width, height), baseline = painter.size(text, 0.5)
    frame = np.zeros((60, 300, 3), np.uint8)
    org = (10, 35)
    painter.put(frame, text, org, 0.5, (255, 255, 255))
    rows, cols = np.nonzero(frame.max(axis=2) > 40)
    assert rows.size
    assert cols.min() >= org[0] - 1 and cols.max() <= org[0] + width + 1
    assert rows.min() >= org[1] - height - 1 and rows.max() <= org[1] + baseline + 1
    assert height >= cv2.getTextSize("H", FONT, 0.5, 1)[0][1] and width > 6 * len(text) // 2


def test_a_greek_gallery_label_sits_on_its_background():
    _font_with(GREEK + "Νίκος")
    frame = np.zeros((160, 240, 3), np.uint8)
    BoxAnnotator().annotate(frame, _result((GREEK, "Νίκος", "x"), box=(20, 60, 60, 60)))
    label = frame[:60]  # above the face box: the background and the text on it
    rows, cols = np.nonzero(label.any(axis=2))
    background = label[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert (background[:, -1] == (0, 200, 0)).all() and (background[:, 0] == (0, 200, 0)).all()
    assert (background.astype(int).sum(axis=2) < 150).sum() > 20  # dark text on the green


def test_a_label_no_font_has_warns_once_and_draws(monkeypatch, caplog):
    dejavu = _font_with(GREEK)
    monkeypatch.setattr(text_module, "fontconfig_fonts", lambda chars: [])  # as on a machine without CJK fonts
    painter = TextPainter(fonts=[dejavu])
    with caplog.at_level(logging.WARNING, logger="camface.realtime.text"):
        frames = [_drawn(painter, label) for label in ("李雷 0.93", "李雷 0.94", "王芳 0.50")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "李雷" in warnings[0] and "CAMFACE_FONT" in warnings[0] and "fonts-noto-cjk" in warnings[0]
    assert all(frame.any() for frame in frames)
    assert not np.array_equal(frames[0], frames[1])  # the digits are drawn


def test_rendered_labels_are_cached(monkeypatch):
    _font_with(GREEK + CYRILLIC)
    painter = TextPainter(cache_size=2)
    renders = []
    pillow = painter._pillow
    monkeypatch.setattr(painter, "_pillow", lambda *args: renders.append(args[0]) or pillow(*args))
    first = _drawn(painter, GREEK)
    painter.size(GREEK, 0.5)
    again = _drawn(painter, GREEK)
    assert renders == [GREEK] and np.array_equal(first, again)
    _drawn(painter, CYRILLIC + " α")
    _drawn(painter, GREEK + " 1")  # a third string: the least recently used (GREEK) goes
    _drawn(painter, GREEK)
    assert renders == [GREEK, CYRILLIC + " α", GREEK + " 1", GREEK]
    _drawn(painter, "Ivan")  # cv2.putText's
    assert len(renders) == 4


def test_camface_font_comes_first(monkeypatch, caplog, tmp_path):
    dejavu = _font_with(GREEK)
    monkeypatch.setenv("CAMFACE_FONT", f"{tmp_path / 'missing.ttf'}:{dejavu}")
    with caplog.at_level(logging.WARNING, logger="camface.realtime.text"):
        fonts = candidate_fonts()
    assert fonts[0] == dejavu and str(tmp_path / "missing.ttf") not in fonts
    assert "missing.ttf: no such font file" in caplog.text


def test_labels_outside_the_frame_are_clipped():
    _font_with(GREEK)
    painter = TextPainter()
    for org, inked in [((-20, 20), True), ((250, 20), False), ((-500, -500), False), ((200, 42), True)]:
        frame = np.zeros((40, 240, 3), np.uint8)
        assert painter.put(frame, GREEK, org, 0.5, (255, 255, 255)) is frame
        assert frame.any() == inked, org


def test_one_painter_draws_from_several_threads():
    """serve draws every client's frames with one renderer, from a thread pool."""
    from concurrent.futures import ThreadPoolExecutor

    _font_with(GREEK)
    painter = TextPainter(cache_size=3)
    labels = [f"{GREEK} 0.{i:02d}" for i in range(12)]

    def draw(i: int) -> bool:
        return _drawn(painter, labels[i % len(labels)]).any()

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(draw, range(200)))
