"""What the CAM graph does to its uint8 input before the model sees it: x * scale + offset.

The live loop sends uint8 crops in the colour order recorded in the graph; the graph casts to
float32 and applies the per-channel affine map recorded here (metadata `normalization`).
Presets name the conventions of common models:

  emotion         GRAY, x / 127.5 - 1          the bundled FER2013 mini-Xception
  tf              RGB,  x / 127.5 - 1          keras.applications "tf" mode (MobileNetV2)
  torch           RGB,  (x / 255 - mean) / std keras.applications "torch" mode (ImageNet mean/std)
  imagenet-caffe  BGR,  x - [103.939, 116.779, 123.68]
                                               keras.applications "caffe" mode (ResNet50, VGG16):
                                               BGR channel order, ImageNet mean subtracted
  arcface         RGB,  (x - 127.5) / 127.5    ArcFace / InsightFace recognition models (112x112)
  facenet         RGB,  (x - 127.5) / 128      FaceNet (160x160, facenet-pytorch's fixed_image_standardization)
  unit            RGB,  x / 255
  none            RGB,  x                      raw 0..255 floats
A one-channel model is always GRAY.
"""

from __future__ import annotations

from dataclasses import dataclass

from camface.errors import ModelError

COLOR_ORDERS = ("GRAY", "RGB", "BGR")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

PRESETS: dict[str, tuple[str, tuple[float, ...], tuple[float, ...]]] = {
    "emotion": ("GRAY", (1 / 127.5,), (-1.0,)),
    "tf": ("RGB", (1 / 127.5,), (-1.0,)),
    "torch": ("RGB", tuple(1 / (255 * s) for s in _IMAGENET_STD),
              tuple(-m / s for m, s in zip(_IMAGENET_MEAN, _IMAGENET_STD))),
    "imagenet-caffe": ("BGR", (1.0,), (-103.939, -116.779, -123.68)),
    "arcface": ("RGB", (1 / 127.5,), (-1.0,)),
    "facenet": ("RGB", (1 / 128,), (-127.5 / 128,)),
    "unit": ("RGB", (1 / 255,), (0.0,)),
    "none": ("RGB", (1.0,), (0.0,)),
}


@dataclass(frozen=True)
class Preprocessing:
    """uint8 [N, H, W, C] in `color_order` -> float32 x * scale + offset (per channel)."""

    color_order: str
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    preset: str = ""

    @property
    def channels(self) -> int:
        return 1 if self.color_order == "GRAY" else 3

    def to_metadata(self) -> dict:
        """The `normalization` metadata value (graph_spec.META_NORMALIZATION)."""
        out = {"scale": list(self.scale), "offset": list(self.offset)}
        if self.preset:
            out["preset"] = self.preset
        return out

    @classmethod
    def resolve(cls, channels: int, preset: str = "none", color_order: str | None = None,
                scale: list[float] | None = None, offset: list[float] | None = None
                ) -> "Preprocessing":
        """The preset, overridden by explicit values; scale/offset hold 1 or `channels` values,
        in the channel order of the input (`color_order`): a preset's own values follow its
        colours when `color_order` swaps RGB and BGR (torch's BGR: the blue mean first)."""
        if preset not in PRESETS:
            raise ModelError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        order, preset_scale, preset_offset = PRESETS[preset]
        if color_order is not None:
            order = color_order.upper()
            if order not in COLOR_ORDERS:
                raise ModelError(f"unknown colour order {color_order!r}; choose GRAY, RGB or BGR")
        if channels == 1:
            if order != "GRAY" and color_order is not None:
                raise ModelError(f"the model takes 1 channel; colour order {order} needs 3")
            order = "GRAY"
        elif channels == 3 and order == "GRAY":
            if color_order is not None:
                raise ModelError("the model takes 3 channels; colour order GRAY needs 1")
            order = "RGB"
        elif channels not in (1, 3):
            raise ModelError(f"the model takes {channels} channels; camface supports 1 or 3")
        if {order, PRESETS[preset][0]} == {"RGB", "BGR"}:
            # a preset's per-channel values belong to colours (torch's mean of red is 0.485):
            # the other order takes them reversed; --scale/--offset are in the order given
            preset_scale, preset_offset = preset_scale[::-1], preset_offset[::-1]
        scale_values = _per_channel(scale if scale is not None else preset_scale, channels,
                                    "--scale" if scale is not None else f"--preset {preset}'s scale")
        offset_values = _per_channel(offset if offset is not None else preset_offset, channels,
                                     "--offset" if offset is not None else f"--preset {preset}'s offset")
        explicit = scale is not None or offset is not None or color_order is not None
        return cls(order, scale_values, offset_values, preset if not explicit else f"{preset}+custom")


def _per_channel(values, channels: int, what: str) -> tuple[float, ...]:
    """`values` per input channel (one value is every channel's); ModelError naming `what`
    (the flag, or the preset it came from) when they do not fit the model's channels."""
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) == channels:
        return values
    if channels == 1 and len(set(values)) == 1:
        return values[:1]
    fits = "1 value" if channels == 1 else f"1 or {channels} values"
    raise ModelError(f"{what} has {len(values)} values, but the model's input has {channels} channel"
                     f"{'s' if channels != 1 else ''}: give {fits}")


def add_input_arguments(parser, preset_help: str) -> None:
    """`--preset` (help: `preset_help`), `--color-order`, `--scale` and `--offset`: how a model's
    uint8 input is normalised, as `camface export`, `enroll` and `compare` take it."""
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None, help=preset_help)
    parser.add_argument("--color-order", choices=COLOR_ORDERS, default=None, type=str.upper,
                        help="override the preset's channel order of the uint8 input (its per-channel "
                             "mean and std follow their colours; --scale/--offset are in this order)")
    parser.add_argument("--scale", type=_finite, nargs="+", default=None, metavar="S",
                        help="override: x * scale + offset (1 value or one per channel)")
    parser.add_argument("--offset", type=_finite, nargs="+", default=None, metavar="O",
                        help="override: x * scale + offset (1 value or one per channel)")


def _finite(text: str) -> float:
    """argparse type: a finite number (nan or inf would make every input nan or inf)."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value
