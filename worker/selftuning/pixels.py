"""Pixel conversions without torch, shared by the engine's decoder and the web's thumbnails
so that a preview shows the pixels a model is trained on."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable

import numpy as np
from PIL import Image

# Files taken as images by their extension; others by their content (`looks_like_image`).
# Uploads and the command line read a dataset alike.
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif",
)
SUPPORTED_TEXT = "JPEG, PNG, WebP, BMP, TIFF or GIF"
# Enough of a file's start for every signature in `looks_like_image`.
SNIFF_BYTES = 32
# The DIB header sizes after a BMP's 14-byte file header that Pillow reads.
BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}
TIFF_PREFIXES = (b"II*\x00", b"MM\x00*", b"II\x00*", b"MM*\x00", b"II+\x00", b"MM\x00+")


def looks_like_image(head: bytes) -> bool:
    """Whether a file's first SNIFF_BYTES carry the signature of a supported format (only
    files without an image extension are asked; Pillow then verifies the whole file)."""
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")):
        return True
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return True
    if head.startswith(TIFF_PREFIXES):
        return True
    # "BM" alone starts plenty of text; the DIB header size after it must make sense too.
    return head.startswith(b"BM") and int.from_bytes(head[14:18], "little") in BMP_HEADER_SIZES


# Modes whose values can exceed 8 bits: 16-bit and 32-bit integer, and float.
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


# The white levels high-bit-depth images are written with: 8, 10, 12, 14 and 16 bits, and
# 1 for floating-point images of 0-1 (and masks of 0 and 1), which read as 8-bit values
# trained black.
WHITE_LEVELS = (1, 255, 1023, 4095, 16383, 65535)


def to_8_bit(image: Image.Image, white_level: int | None = None) -> Image.Image:
    """A high-bit-depth image as 8-bit grayscale ("L"), scaled rather than clipped: by
    `white_level`, the brightest value its dataset can hold (`white_level_of`), or without
    one, values above 255 read as 16-bit (divided by 257) and smaller ones kept. Other images
    as they are."""
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    # NaN ("no data" in scientific float images) reads as black; infinities clip.
    values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=np.inf,
                           neginf=-np.inf)
    if white_level is not None:
        values = values * (255.0 / white_level)
    elif values.max(initial=0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image, white_level: int | None = None) -> Image.Image:
    """The RGB pixels a plain timm user's `Image.open(p).convert('RGB')` gives, high-bit-depth
    images scaled to 8 bits first (`to_8_bit`): what a model trains on, and what a preview
    shows. Transparency is dropped, not painted over a background: a transparent pixel shows
    the colour it stores."""
    image = to_8_bit(image, white_level)
    with warnings.catch_warnings():
        # Palette images with transparency warn on conversion; dropping alpha is intended.
        warnings.simplefilter("ignore", UserWarning)
        return image.convert("RGB")


def white_level_of(paths: Iterable[str | os.PathLike]) -> int | None:
    """The white level of a dataset's high-bit-depth images: the fewest bits (1, 8, 10, 12,
    14 or 16) that hold the brightest value of any of them, as 2**bits - 1. A 12-bit camera
    writes 16-bit files whose values end at 4095; divided as 16-bit values they would train
    nearly black. None when no image has more than 8 bits (only those are read whole; the
    others' headers say so)."""
    brightest: float | None = None
    for path in paths:
        try:
            with Image.open(path) as image:
                image.seek(0)
                high = brightest_value(image)
        except (OSError, ValueError, SyntaxError):
            continue  # an image that does not decode: its decoder says so, naming it
        if high is not None:
            brightest = high if brightest is None else max(brightest, high)
    return white_level_for(brightest)


def brightest_value(image: Image.Image) -> float | None:
    """The largest value of a high-bit-depth image (what `white_level_for` takes), None for
    an image of 8 bits."""
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return None
    values = np.asarray(image, dtype=np.float32)
    # Only finite values: NaN or an infinity (float TIFFs' "no data") made the white level
    # math.ceil(nan) or math.ceil(inf), a 500 on upload and a failed run.
    return float(values.max(initial=0, where=np.isfinite(values)))


def white_level_for(brightest: float | None) -> int | None:
    """The white level holding `brightest`, the largest value of a dataset's high-bit-depth
    images (None when it has none)."""
    if brightest is None:
        return None
    return next((level for level in WHITE_LEVELS if brightest <= level), math.ceil(brightest))
