"""Pixel conversions without torch, shared by the engine's decoder and the web's thumbnails
so that a preview shows the pixels a model is trained on."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Modes whose values can exceed 8 bits: 16-bit and 32-bit integer, and float.
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


def to_8_bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth image as 8-bit grayscale ("L"), scaled rather than clipped: values
    above 255 are read as 16-bit (divided by 257), smaller ones kept. Other images as they are."""
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    values = np.asarray(image, dtype=np.float32)
    if values.max(initial=0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L")
