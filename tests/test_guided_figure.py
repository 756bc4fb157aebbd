"""Writing `camface guided`'s figure and animation (no TensorFlow): whole or not at all, and the
input-gradient panels of maps that are all zero or constant."""

import errno

import numpy as np
import pytest

from camface.errors import OutputError
from camface.guided.figure import gradient_image, save_figure, save_gif


class _DiskFullFigure:
    """A figure whose savefig writes half a file, then fails as a full disk does."""

    def savefig(self, path, **_):
        with open(path, "wb") as out:
            out.write(b"half a figure")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_figure_write_keeps_the_previous_figure(tmp_path):
    out = tmp_path / "guided.png"
    out.write_bytes(b"the figure of the last run")
    with pytest.raises(OutputError, match=f"^cannot write {out}: No space left on device$"):
        save_figure(_DiskFullFigure(), out)
    assert out.read_bytes() == b"the figure of the last run"
    assert [p.name for p in tmp_path.iterdir()] == ["guided.png"]  # no partial file left


def test_a_failed_gif_write_keeps_the_previous_gif(tmp_path, monkeypatch):
    from PIL import Image

    def disk_full(self, path, *args, **kwargs):
        with open(path, "wb") as out:
            out.write(b"GIF89a half")
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "layers.gif"
    out.write_bytes(b"the animation of the last run")
    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OutputError, match=f"^cannot write {out}: No space left on device$"):
        save_gif([np.zeros((4, 4, 3), np.uint8)] * 2, out)
    assert out.read_bytes() == b"the animation of the last run"
    assert [p.name for p in tmp_path.iterdir()] == ["layers.gif"]


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".svg", ".pdf"])
def test_figure_and_gif_replace_the_previous_file_whole(tmp_path, suffix):
    from matplotlib.figure import Figure
    from PIL import Image

    out = tmp_path / f"figure{suffix}"
    out.write_bytes(b"old")
    fig = Figure(figsize=(1, 1))
    fig.subplots().imshow(np.eye(4))
    save_figure(fig, out)
    head = {".png": b"\x89PNG", ".jpg": b"\xff\xd8", ".svg": b"<?xml", ".pdf": b"%PDF"}[suffix]
    assert out.read_bytes().startswith(head)
    gif = tmp_path / "layers.gif"
    save_gif([np.full((4, 4, 3), v, np.uint8) for v in (0, 255)], gif)
    with Image.open(gif) as animation:
        assert animation.n_frames == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, gif.name])


@pytest.mark.parametrize("value", [0.0, 3.5, -1e-30])
@pytest.mark.parametrize("color_order, shape", [("GRAY", (5, 5)), ("BGR", (5, 5, 3))])
def test_gradient_panel_of_a_constant_map_is_flat_grey(value, color_order, shape):
    """A gradient that is all zero (a face where the class gets no positive evidence) or
    constant shows as flat 0.5 grey: no NaN from the division by its standard deviation."""
    channels = 1 if color_order == "GRAY" else 3
    shown = gradient_image(np.full((5, 5, channels), value, np.float32), color_order)
    assert shown.shape == shape and shown.dtype == np.float32
    np.testing.assert_array_equal(shown, 0.5)


def test_gradient_panel_is_shown_in_rgb():
    """A BGR gradient with evidence in its blue channel only shows blue (RGB for matplotlib)."""
    gradient = np.zeros((4, 4, 3), np.float32)
    gradient[..., 0] = np.linspace(0, 1, 16).reshape(4, 4)  # B of BGR
    shown = gradient_image(gradient, "BGR")
    spread = shown.reshape(-1, 3).std(axis=0)
    assert spread[2] > 0 and spread[0] == 0 and spread[1] == 0
