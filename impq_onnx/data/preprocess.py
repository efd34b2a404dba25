"""How images become model input: size, crop, channel order, scaling, normalisation and layout.

A :class:`Preprocess` is plain frozen data. It comes from a preset (``PRESETS``), a YAML file
(:func:`preprocess_from_yaml`, keys 1:1 with the fields) or a guess from the model's input shape
(:func:`infer_preprocess`). ``mean`` and ``std`` are per model-input channel, in ``channels`` order
(for ``BGR`` list the blue channel first), and apply to pixels scaled to ``[0, value_scale]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from impq_onnx.data.limits import MAX_IMAGE_PIXELS, MAX_SAMPLE_PIXELS
from impq_onnx.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "Preprocess",
    "PRESETS",
    "preprocess_from_yaml",
    "preprocess_from_mapping",
    "infer_preprocess",
    "fit_image",
    "to_model_input",
]

CHANNEL_ORDERS = ("RGB", "BGR", "L")
LAYOUTS = ("NCHW", "NHWC")
# crop: shorter side to `resize`, centre crop (or straight to size without `resize`); stretch: straight to
# size; pad: keep the aspect ratio, fit inside size, pad with `fill` at `pad_position`; letterbox: pad, centred.
RESIZE_MODES = ("crop", "stretch", "pad", "letterbox")
PAD_POSITIONS = ("center", "side")  # side: the image at the top left, padding right and bottom (PaddleOCR)
INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "area": Image.BOX, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """One recipe from a decoded image to one model-input sample."""

    size: tuple[int, int]  # (height, width) fed to the model
    resize: int | None  # shorter side resized to this, then centre crop; None: resize straight to size
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_scale: float = 1.0  # pixels are divided by 255, then multiplied by this
    channels: str = "RGB"  # "RGB", "BGR" or "L"
    layout: str = "NCHW"  # or "NHWC"
    resize_mode: str = "crop"  # see RESIZE_MODES
    interpolation: str = "bilinear"  # see INTERPOLATIONS (Pillow's filters; area = box)
    fill: tuple[int, ...] = (0, 0, 0)  # padding colour, 0-255 per channel (one value for all channels)
    pad_position: str = "center"  # see PAD_POSITIONS
    value_range: tuple[float, float] | None = None  # pixels mapped to [lo, hi] (instead of [0, value_scale])

    def __post_init__(self) -> None:
        # Accept lists (YAML gives lists) but store tuples, so instances stay hashable and comparable.
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(int(v) for v in self.size)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", tuple(float(v) for v in _sequence(self.mean, "mean")))
        object.__setattr__(self, "std", tuple(float(v) for v in _sequence(self.std, "std")))
        object.__setattr__(self, "value_scale", float(self.value_scale))
        fill = tuple(int(v) for v in _sequence(self.fill, "fill"))
        object.__setattr__(self, "fill", fill * 3 if len(fill) == 1 else fill)
        if self.value_range is not None:
            value_range = tuple(float(v) for v in _sequence(self.value_range, "value_range"))
            if len(value_range) != 2 or not value_range[0] < value_range[1]:
                raise ConfigError(f"preprocess value_range {self.value_range!r} must be [low, high] with low < high, "
                                  "e.g. [-1, 1]")
            object.__setattr__(self, "value_range", value_range)
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"preprocess resize_mode {self.resize_mode!r} must be one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"preprocess interpolation {self.interpolation!r} must be one of "
                              f"{', '.join(INTERPOLATIONS)}")
        if self.pad_position not in PAD_POSITIONS:
            raise ConfigError(f"preprocess pad_position {self.pad_position!r} must be one of "
                              f"{', '.join(PAD_POSITIONS)}")
        if len(self.fill) != 3 or any(not 0 <= v <= 255 for v in self.fill):
            raise ConfigError(f"preprocess fill {list(self.fill)} must be one value or [r, g, b], each 0-255")
        if self.resize is not None and self.resize_mode in ("stretch", "pad", "letterbox"):
            raise ConfigError(f"preprocess resize {self.resize} applies to resize_mode crop only; set resize: null "
                              f"for resize_mode {self.resize_mode}")
        if len(size) != 2 or min(size) < 1:
            raise ConfigError(f"preprocess size {self.size!r} must be [height, width] of positive integers")
        if self.resize is not None and (int(self.resize) != self.resize or self.resize < min(size)):
            raise ConfigError(
                f"preprocess resize {self.resize!r} must be an integer >= the crop size {min(size)}, or null"
            )
        if size[0] * size[1] > MAX_SAMPLE_PIXELS or (self.resize is not None and self.resize**2 > MAX_SAMPLE_PIXELS):
            raise ConfigError(f"preprocess size {list(size)} (resize {self.resize}) is over the limit of "
                              f"{MAX_SAMPLE_PIXELS} pixels per image; use a smaller model input")
        if self.channels not in CHANNEL_ORDERS:
            raise ConfigError(f"preprocess channels {self.channels!r} must be one of {', '.join(CHANNEL_ORDERS)}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"preprocess layout {self.layout!r} must be one of {', '.join(LAYOUTS)}")
        n = self.num_channels
        if len(self.mean) != n or len(self.std) != n:
            raise ConfigError(
                f"preprocess mean and std need {n} value(s) each for channels {self.channels}, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        numbers = {"mean": self.mean, "std": self.std, "value_scale": (self.value_scale,),
                   "value_range": self.value_range or ()}
        for key, values in numbers.items():
            if not all(math.isfinite(v) for v in values):  # nan passes every comparison below
                raise ConfigError(f"preprocess {key} {list(values)} must be finite numbers")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocess std {list(self.std)} must be positive")
        if self.value_scale <= 0:
            raise ConfigError(f"preprocess value_scale {self.value_scale} must be positive")

    @property
    def num_channels(self) -> int:
        return 1 if self.channels == "L" else 3

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The shape of one sample as the model sees it (no batch dimension)."""
        h, w = self.size
        c = self.num_channels
        return (c, h, w) if self.layout == "NCHW" else (h, w, c)

    def replace(self, **changes: Any) -> Preprocess:
        return dataclasses.replace(self, **changes)


def _sequence(value: Any, key: str) -> Sequence[Any]:
    if isinstance(value, (int, float)):
        return (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"preprocess {key} {value!r} must be a number or a list of numbers")
    return value


PRESETS: dict[str, Preprocess] = {
    "imagenet": Preprocess(size=(224, 224), resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "cifar": Preprocess(size=(32, 32), resize=None, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "fashion-mnist": Preprocess(size=(28, 28), resize=None, mean=(0.2860,), std=(0.3530,), channels="L"),
}

_FIELDS = tuple(f.name for f in dataclasses.fields(Preprocess))
_KEYS = ("preset",) + _FIELDS


def _unknown(kind: str, name: str, valid: Sequence[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(valid)}"
    return ConfigError(f"{source}: unknown {kind} {name!r}; {hint}")


def preprocess_from_mapping(config: Mapping[str, Any], source: str = "preprocess") -> Preprocess:
    """A Preprocess from a mapping with the field names as keys and an optional ``preset`` base.

    Without ``preset``, ``size``, ``mean`` and ``std`` are required; ``resize`` defaults to null.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: expected a mapping of preprocess keys, got {type(config).__name__}")
    for key in config:
        if key not in _KEYS:
            raise _unknown("key", str(key), _KEYS, source)
    values: dict[str, Any] = {}
    if "preset" in config:
        name = config["preset"]
        if name not in PRESETS:
            raise _unknown("preset", str(name), tuple(PRESETS), source)
        values = dataclasses.asdict(PRESETS[name])
    else:
        missing = [k for k in ("size", "mean", "std") if k not in config]
        if missing:
            raise ConfigError(
                f"{source}: missing key(s) {', '.join(missing)}; give them or a base "
                f"'preset: <{'|'.join(PRESETS)}>'"
            )
        values["resize"] = None
    values.update({k: v for k, v in config.items() if k != "preset"})
    try:
        return Preprocess(**values)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: bad preprocess value ({err})") from err


def preprocess_from_yaml(path: str | Path) -> Preprocess:
    """Read a YAML preprocess file (see :func:`preprocess_from_mapping` for its keys)."""
    from impq_onnx.config import read_yaml_mapping

    return preprocess_from_mapping(read_yaml_mapping(path, "preprocess file"), source=str(Path(path)))


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


def infer_preprocess(input_shape: Sequence[Any], layout: str | None = None,
                     data_size: tuple[int, int] | None = None) -> Preprocess:
    """Guess the preprocessing from a model input shape such as ``[N, 3, 32, 32]``.

    Dimensions that are not positive integers (``"N"``, ``None``, ``-1``) are dynamic. The layout is
    NCHW when dimension 1 is 1 or 3, else NHWC when the last dimension is; pass ``layout`` to decide.
    3 channels at 32x32 is CIFAR, 1 channel is Fashion-MNIST statistics, anything else ImageNet's;
    a dynamic height or width takes ``data_size`` (the data's image size, no resize) when given, else
    the ImageNet preset (resize 256, crop 224); either is said in a warning.
    """
    if len(input_shape) != 4:
        raise DataError(
            f"model input shape {list(input_shape)} is not an image batch [N, C, H, W] or [N, H, W, C]; "
            "give a preprocess YAML file"
        )
    dims = [_static(d) for d in input_shape]
    if layout is None:
        layout = "NHWC" if dims[1] not in (1, 3) and dims[3] in (1, 3) else "NCHW"
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} must be one of {', '.join(LAYOUTS)}")
    c, h, w = (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
    if c not in (None, 1, 3):
        raise DataError(
            f"model input shape {list(input_shape)} has {c} channels; only 1 (grayscale) or 3 (colour) "
            "input channels are supported"
        )
    if c == 1:
        stats = PRESETS["fashion-mnist"]
    elif (h, w) == (32, 32):
        stats = PRESETS["cifar"]
    else:
        stats = PRESETS["imagenet"]
    if (h is None or w is None) and data_size is not None:
        size, resize = (h or data_size[0], w or data_size[1]), None
        logger.warning("model input %s has a dynamic height/width: images are fed at %dx%d, the data's size "
                       "(first image); set --preprocess to choose another", list(input_shape), *size)
    elif h is None or w is None:
        size, resize = PRESETS["imagenet"].size, PRESETS["imagenet"].resize
        logger.warning("model input %s has a dynamic height/width and the data gives no size: images are resized "
                       "to 256 and cropped to 224x224; set --preprocess to choose another", list(input_shape))
    elif min(h, w) >= 64:
        # The ImageNet convention: resize, then crop the central 87.5%.
        size, resize = (h, w), round(min(h, w) / 0.875)
    else:
        size, resize = (h, w), None
    if size[0] * size[1] > MAX_SAMPLE_PIXELS or (resize or 0) ** 2 > MAX_SAMPLE_PIXELS:
        raise DataError(
            f"model input shape {list(input_shape)}: {size[0]}x{size[1]} images are over the limit of "
            f"{MAX_SAMPLE_PIXELS} pixels per image (one batch would take GBs); use a model with a smaller input"
        )
    return stats.replace(size=size, resize=resize, layout=layout)


def fit_image(image: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """Convert, resize and centre-crop one decoded image to ``uint8 [H, W, C]`` (C is 1 or 3, RGB order).

    Matches torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` on PIL images (bilinear, antialiased).
    16-bit grayscale (Pillow modes ``I;16*`` and ``I``, as 16-bit PNGs open) is scaled to 8 bits
    (``v · 255 / 65535``, rounded), not clipped at 255 as Pillow's ``convert`` does.
    """
    if image.mode == "I" or image.mode.startswith("I;16"):
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    image = image.convert("L" if preprocess.channels == "L" else "RGB")
    h, w = preprocess.size
    resample = INTERPOLATIONS[preprocess.interpolation]
    if preprocess.resize_mode in ("pad", "letterbox"):
        image = _padded(image, preprocess, resample)
    elif preprocess.resize is None:
        if image.size != (w, h):
            image = image.resize((w, h), resample)
    else:
        width, height = image.size
        scale = preprocess.resize / min(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        if new_w * new_h > MAX_IMAGE_PIXELS:
            raise DataError(f"a {width}x{height} image resized to a shorter side of {preprocess.resize} would have "
                            f"{new_w}x{new_h} pixels; crop its extreme aspect ratio or delete it")
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample)
        left, top = round((new_w - w) / 2.0), round((new_h - h) / 2.0)
        image = image.crop((left, top, left + w, top + h))
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _padded(image: Image.Image, preprocess: Preprocess, resample: int) -> Image.Image:
    """``image`` scaled to fit inside ``size`` with its aspect ratio kept (up or down), on a ``fill`` canvas:
    centred (``letterbox``, or ``pad`` with ``pad_position: center``) or at the top left (``side``)."""
    h, w = preprocess.size
    width, height = image.size
    scale = min(w / width, h / height)
    new_w, new_h = min(w, max(1, round(width * scale))), min(h, max(1, round(height * scale)))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample)
    fill = preprocess.fill[0] if image.mode == "L" else preprocess.fill
    canvas = Image.new(image.mode, (w, h), fill)
    centred = preprocess.resize_mode == "letterbox" or preprocess.pad_position == "center"
    left, top = ((w - new_w) // 2, (h - new_h) // 2) if centred else (0, 0)
    canvas.paste(image, (left, top))
    return canvas


def to_model_input(pixels: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """A batch of pixels ``[B, H, W, C]`` (RGB or L order) to float32 model input.

    ``uint8`` pixels are in [0, 255], float pixels in [0, 1]; both are scaled to ``[0, value_scale]``
    (or to ``value_range``), normalised per channel, put in ``channels`` order and in ``layout``.
    """
    low, high = preprocess.value_range or (0.0, preprocess.value_scale)
    if pixels.dtype == np.uint8:
        x = pixels.astype(np.float32) * np.float32((high - low) / 255.0)
    else:
        x = pixels.astype(np.float32) * np.float32(high - low)
    if low != 0.0:
        x += np.float32(low)
    if preprocess.channels == "BGR":
        x = x[..., ::-1]
    x -= np.asarray(preprocess.mean, np.float32)
    x /= np.asarray(preprocess.std, np.float32)
    if preprocess.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)
