"""Safe, fast image decoding: one function every reader, dataset and server goes through.

Also home of the data-layer exceptions, because every other module here depends on this one.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
"""Extensions treated as images (compare with ``suffix.lower()``)."""

MAX_IMAGE_PIXELS: int = 40_000_000
"""Largest declared width*height we agree to decode (decompression-bomb guard)."""


class DataError(Exception):
    """Bad dataset/image input; the message names the file and says what to do."""


class ImageDecodeError(DataError):
    """An image could not be decoded (missing, empty, not an image, truncated, too large)."""


def _describe(src: bytes | str | os.PathLike) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return str(src)


def open_image(src: bytes | str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Decode ``src`` (raw bytes or a path) into a fully loaded RGB image.

    ``draft_size`` lets JPEGs decode through DCT scaling to the smallest size whose sides are
    still >= ``draft_size`` (a 2-8x speed-up for large photos that get resized anyway).
    Every failure raises :class:`ImageDecodeError`.
    """
    name = _describe(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageDecodeError(f"image is empty (0 bytes): {name}; send the file contents")
        fp: io.BytesIO | Path = io.BytesIO(bytes(src))
    else:
        fp = Path(src)
        try:
            st = fp.stat()
        except FileNotFoundError:
            raise ImageDecodeError(f"image file not found: {fp}") from None
        if fp.is_dir():
            raise ImageDecodeError(f"not a file but a folder: {fp}")
        if st.st_size == 0:
            raise ImageDecodeError(f"image file is empty (0 bytes): {fp}; re-download or remove it")
    try:
        # PIL raises its own DecompressionBombError at open() only for sizes far above our
        # limit; everything between is caught by the size check below, before any decoding.
        with Image.open(fp) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(
                    f"declared size {w}x{h} exceeds the {MAX_IMAGE_PIXELS:,} pixel limit: {name}; "
                    "refusing to decode (possible decompression bomb), resize the image first"
                )
            if draft_size is not None and img.format == "JPEG":
                # draft() only picks a DCT scale that keeps both sides >= the request.
                img.draft("RGB", (draft_size, draft_size))
            try:
                img.load()  # force the full decode here so truncated files fail now, not later
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageDecodeError(f"image is truncated or corrupt: {name}: {e}") from e
            if img.mode == "P" and "transparency" in img.info:
                # going through RGBA avoids PIL's palette-transparency warning and keeps colours right
                return img.convert("RGBA").convert("RGB")
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                # high-bit-depth greyscale: convert("RGB") would clip, so scale to 8 bit first
                return img.point(lambda v: v / 256).convert("L").convert("RGB")
            return img.convert("RGB")  # copies when already RGB, so the file can be closed
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(
            f"declared size exceeds the {MAX_IMAGE_PIXELS:,} pixel limit: {name}: {e}"
        ) from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"not a recognised image: {name}; expected JPEG/PNG/WebP/BMP") from e
    except FileNotFoundError:
        raise ImageDecodeError(f"image file not found: {name}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"image is truncated or corrupt: {name}: {e}") from e
