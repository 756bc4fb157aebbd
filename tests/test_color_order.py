"""ColorOrder: the one place where crops change channel order; values checked against OpenCV."""

import json

import cv2
import numpy as np
import pytest

from camface.color_order import ColorOrder
from camface.graph_spec import GraphInfo

BGR = np.random.default_rng(1).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)  # a batch of 3 crops


def test_from_bgr_matches_opencv_on_a_batch():
    gray = ColorOrder.GRAY.from_bgr(BGR)
    assert gray.shape == (3, 5, 7, 1)
    for crop, got in zip(BGR, gray):
        np.testing.assert_array_equal(got[..., 0], cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY))
    np.testing.assert_array_equal(ColorOrder.RGB.from_bgr(BGR), BGR[..., ::-1])
    assert ColorOrder.BGR.from_bgr(BGR) is BGR


@pytest.mark.parametrize("order", list(ColorOrder))
def test_opencv_files_round_trip_and_display_is_rgb(order):
    crop = order.from_bgr(BGR[0])
    written = order.to_opencv(crop)
    assert written.shape == ((5, 7) if order is ColorOrder.GRAY else (5, 7, 3))
    np.testing.assert_array_equal(order.from_opencv(written), crop)
    rgb = order.to_rgb(crop)
    np.testing.assert_array_equal(rgb, cv2.cvtColor(order.to_bgr(crop), cv2.COLOR_BGR2RGB))
    if order is not ColorOrder.GRAY:
        np.testing.assert_array_equal(rgb, BGR[0][..., ::-1])


def test_a_colour_order_is_its_name():
    assert ColorOrder.GRAY == "GRAY" and f"{ColorOrder.RGB} 64x64" == "RGB 64x64" and str(ColorOrder.BGR) == "BGR"
    assert json.dumps({"color_order": ColorOrder.GRAY}) == '{"color_order": "GRAY"}'
    assert ColorOrder.of("RGB") is ColorOrder.RGB and ColorOrder.RGB.channels == 3 and ColorOrder.GRAY.channels == 1
    with pytest.raises(ValueError, match="unknown colour order 'YUV'; expected GRAY, RGB or BGR"):
        ColorOrder.of("YUV")


def test_graph_info_holds_the_enum_and_writes_the_name():
    info = GraphInfo(labels=("a",), input_size=(4, 4), color_order="RGB", target_layer="t", heatmaps=())
    assert info.color_order is ColorOrder.RGB and info.channels == 3
    assert info.to_metadata()["color_order"] == "RGB" and type(info.to_metadata()["color_order"]) is str
    assert GraphInfo.from_metadata(info.to_metadata()) == info
    with pytest.raises(ValueError, match="unknown colour order 'rgb'"):
        GraphInfo(labels=("a",), input_size=(4, 4), color_order="rgb", target_layer="t", heatmaps=())
