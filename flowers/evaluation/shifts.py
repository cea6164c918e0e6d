"""Named, seeded image shifts: what other people's photos do to a model trained on Flowers-102.

Each shift is a pure function of a decoded RGB image, one number (its strength) and a seeded
random generator; it returns a new RGB image and never touches the input. Shifts run *before*
the model's own eval preprocessing (resize + centre crop), as a user's photo would.

    from flowers.evaluation.shifts import parse_shifts, apply_shift
    for s in parse_shifts("all"):            # or "jpeg10,small64,rotate15=30"
        shifted = apply_shift(img, s, seed=(0, image_index))

A spec ``NAME=VALUE`` changes the shift's strength; a value outside the shift's range, or an
unknown name, raises `ShiftError` (a `ConfigError`: one line, exit 2 at the command line).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from flowers.config import ConfigError

Rng = np.random.Generator
ShiftFn = Callable[[Image.Image, float, Rng], Image.Image]


class ShiftError(ConfigError):
    """An unknown shift name or a strength out of its range."""


# ----------------------------------------------------------------------------- the functions


def _short_side(img: Image.Image) -> int:
    return min(img.size)


def small(img: Image.Image, side: float, rng: Rng) -> Image.Image:
    """A small photo: short side down to `side` pixels, then upsampled back to the original size."""
    w, h = img.size
    s = side / _short_side(img)
    if s >= 1:
        return img.copy()
    tiny = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC, reducing_gap=3.0)
    return tiny.resize((w, h), Image.BILINEAR)


def upsample(img: Image.Image, factor: float, rng: Rng) -> Image.Image:
    """An upsampled photo (`factor` x each side, bicubic)."""
    w, h = img.size
    return img.resize((round(w * factor), round(h * factor)), Image.BICUBIC)


def squash(img: Image.Image, aspect: float, rng: Rng) -> Image.Image:
    """Non-uniform resize: the long side squashed so that long/short becomes `aspect` (1 = a square,
    as apps that force square thumbnails do); the whole frame stays in view, distorted."""
    w, h = img.size
    short = _short_side(img)
    long_ = max(short, round(short * aspect))
    return img.resize((long_, short) if w >= h else (short, long_), Image.BICUBIC)


def _crop_box(w: int, h: int, area: float, fx: float, fy: float) -> tuple[int, int, int, int]:
    cw, ch = max(1, round(w * math.sqrt(area))), max(1, round(h * math.sqrt(area)))
    x, y = round((w - cw) * fx), round((h - ch) * fy)
    return x, y, x + cw, y + ch


def crop_center(img: Image.Image, area: float, rng: Rng) -> Image.Image:
    """A tight framing: the centre `area` fraction of the image (same aspect)."""
    return img.crop(_crop_box(*img.size, area, 0.5, 0.5))


def crop_offcenter(img: Image.Image, area: float, rng: Rng) -> Image.Image:
    """An off-centre framing: an `area` fraction of the image in a corner drawn by `rng`."""
    fx, fy = rng.integers(0, 2, size=2)
    return img.crop(_crop_box(*img.size, area, float(fx), float(fy)))


def zoom_out(img: Image.Image, scale: float, rng: Rng) -> Image.Image:
    """The subject small in a larger frame: the photo shrunk to `scale` of each side, centred on a
    canvas of the original size filled with the photo's mean colour."""
    w, h = img.size
    inner = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
    mean = tuple(int(round(c)) for c in np.asarray(img, dtype=np.float32).reshape(-1, 3).mean(0))
    canvas = Image.new("RGB", (w, h), mean)
    canvas.paste(inner, ((w - inner.width) // 2, (h - inner.height) // 2))
    return canvas


def jpeg(img: Image.Image, quality: float, rng: Rng) -> Image.Image:
    """JPEG re-encoding at `quality` (1..95, 4:2:0 chroma subsampling)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(round(quality)))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def blur(img: Image.Image, sigma: float, rng: Rng) -> Image.Image:
    """Gaussian blur (out of focus, camera shake), sigma as a fraction of the short side."""
    return img.filter(ImageFilter.GaussianBlur(radius=sigma * _short_side(img)))


def noise(img: Image.Image, sigma: float, rng: Rng) -> Image.Image:
    """Sensor noise: additive Gaussian per pixel and channel, sigma as a fraction of 255."""
    a = np.asarray(img, dtype=np.float32)
    a = a + rng.normal(0.0, sigma * 255.0, size=a.shape).astype(np.float32)
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


def brightness(img: Image.Image, factor: float, rng: Rng) -> Image.Image:
    """Under/over exposure: every pixel times `factor` (0.6 = -40 %)."""
    return ImageEnhance.Brightness(img).enhance(factor)


def contrast(img: Image.Image, factor: float, rng: Rng) -> Image.Image:
    """Low contrast (haze, a flat phone profile): blend towards the mean grey, `factor` of the contrast kept."""
    return ImageEnhance.Contrast(img).enhance(factor)


def colour_cast(img: Image.Image, strength: float, rng: Rng) -> Image.Image:
    """A colour cast: red up and blue down by `strength` (warm, tungsten light); negative: cool (shade)."""
    a = np.asarray(img, dtype=np.float32) * np.array([1 + strength, 1.0, 1 - strength], dtype=np.float32)
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


def rotate(img: Image.Image, degrees: float, rng: Rng) -> Image.Image:
    """A tilted camera: rotate by `degrees` and keep the largest centred crop of the same aspect with
    no empty corners (multiples of 90 are exact transposes)."""
    if degrees % 90 == 0:
        k = int(degrees // 90) % 4
        return img.copy() if k == 0 else img.transpose([None, Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270][k])
    w, h = img.size
    t = math.radians(abs(degrees) % 180)
    c, s = abs(math.cos(t)), abs(math.sin(t))
    k = min(w / (w * c + h * s), h / (w * s + h * c))
    out = img.rotate(degrees, resample=Image.BICUBIC, expand=False)
    cw, ch = max(1, int(w * k)), max(1, int(h * k))
    x, y = (w - cw) // 2, (h - ch) // 2
    return out.crop((x, y, x + cw, y + ch))


def grayscale(img: Image.Image, amount: float, rng: Rng) -> Image.Image:
    """A black-and-white photo (`amount` 1: fully grey; between 0 and 1: desaturated)."""
    return ImageEnhance.Color(img).enhance(1.0 - amount) if amount < 1 else ImageOps.grayscale(img).convert("RGB")


# ----------------------------------------------------------------------------- the named suite


@dataclass(frozen=True)
class Shift:
    """A named shift: its function, strength and the range a strength may take."""

    name: str
    fn: ShiftFn
    value: float
    low: float
    high: float
    what: str

    def with_value(self, value: float) -> "Shift":
        if not (self.low <= value <= self.high) or not math.isfinite(value):
            raise ShiftError(f"shift '{self.name}': value {value:g} is out of range [{self.low:g}, {self.high:g}] "
                             f"({self.what})")
        return Shift(self.name, self.fn, float(value), self.low, self.high, self.what)

    @property
    def label(self) -> str:
        """The name, with the value when it differs from the default (shown in tables)."""
        default = SHIFTS.get(self.name)
        return self.name if default is None or default.value == self.value else f"{self.name}={self.value:g}"


def _s(name: str, fn: ShiftFn, value: float, low: float, high: float, what: str) -> Shift:
    return Shift(name, fn, value, low, high, what)


SUITE: tuple[Shift, ...] = (
    _s("small64", small, 64, 8, 2048, "short side in pixels, upsampled back"),
    _s("small112", small, 112, 8, 2048, "short side in pixels, upsampled back"),
    _s("small160", small, 160, 8, 2048, "short side in pixels, upsampled back"),
    _s("upsample2x", upsample, 2.0, 1.0, 4.0, "upsampling factor per side"),
    _s("squash", squash, 1.0, 1.0, 4.0, "long/short side ratio after squashing"),
    _s("crop_center", crop_center, 0.5, 0.05, 1.0, "area fraction kept, centred"),
    _s("crop_offcenter", crop_offcenter, 0.5, 0.05, 1.0, "area fraction kept, in a corner"),
    _s("zoom_out", zoom_out, 0.5, 0.1, 1.0, "side fraction of the photo in the frame"),
    _s("jpeg30", jpeg, 30, 1, 95, "JPEG quality"),
    _s("jpeg10", jpeg, 10, 1, 95, "JPEG quality"),
    _s("blur", blur, 0.01, 0.0, 0.1, "Gaussian sigma as a fraction of the short side"),
    _s("noise", noise, 0.08, 0.0, 0.5, "Gaussian sigma as a fraction of 255"),
    _s("dark", brightness, 0.6, 0.05, 1.0, "brightness factor"),
    _s("bright", brightness, 1.4, 1.0, 3.0, "brightness factor"),
    _s("low_contrast", contrast, 0.4, 0.05, 1.0, "contrast factor"),
    _s("warm", colour_cast, 0.15, 0.0, 0.5, "red up / blue down"),
    _s("cool", colour_cast, -0.15, -0.5, 0.0, "red down / blue up"),
    _s("rotate15", rotate, 15.0, -180.0, 180.0, "degrees, crop without empty corners"),
    _s("rotate90", rotate, 90.0, -180.0, 180.0, "degrees"),
    _s("grayscale", grayscale, 1.0, 0.0, 1.0, "desaturation (1 = grey)"),
)
SHIFTS: dict[str, Shift] = {s.name: s for s in SUITE}


def parse_shifts(spec: str | Sequence[str]) -> list[Shift]:
    """`"all"` or a comma-separated list of names, each optionally `NAME=VALUE`; ShiftError on bad input."""
    items = [x.strip() for x in (spec.split(",") if isinstance(spec, str) else spec) if x and x.strip()]
    if not items:
        raise ShiftError("no shift named; use 'all' or a comma-separated list of: " + ", ".join(SHIFTS))
    out: list[Shift] = []
    for item in items:
        if item == "all":
            out.extend(SUITE)
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in SHIFTS:
            raise ShiftError(f"unknown shift '{name}' (known: {', '.join(SHIFTS)}, or 'all')")
        shift = SHIFTS[name]
        if value:
            try:
                number = float(value)
            except ValueError:
                raise ShiftError(f"shift '{name}': value '{value}' is not a number") from None
            shift = shift.with_value(number)
        out.append(shift)
    seen: dict[str, Shift] = {}
    for s in out:  # the same shift twice (e.g. 'all,jpeg10') is scored once
        seen.setdefault(s.label, s)
    return list(seen.values())


def apply_shift(img: Image.Image, shift: Shift, seed: int | Sequence[int] = 0) -> Image.Image:
    """`shift` applied to an RGB image with a generator seeded by `seed` (same seed, same pixels)."""
    out = shift.fn(img.convert("RGB") if img.mode != "RGB" else img, shift.value, np.random.default_rng(seed))
    return out if out.mode == "RGB" else out.convert("RGB")
