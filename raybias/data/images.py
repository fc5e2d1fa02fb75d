"""Image encode/decode helpers shared by every stage."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image file is missing, corrupt or truncated."""


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 HxWx3 (or HxW) array -> PNG bytes (deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode(data: bytes, size: int | None = None, where: str = "image") -> np.ndarray:
    """Encoded bytes -> uint8 HxWx3 array, optionally resized to size x size."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{where}: cannot decode image ({exc})") from exc
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_file(path: str, size: int) -> bytes:
    """Read an image file, check it decodes whole, resize, return PNG bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as exc:
        raise ImageError(f"image file not found: {path}") from exc
    except OSError as exc:
        raise ImageError(f"cannot read image file {path}: {exc}") from exc
    return encode_png(decode(raw, size, where=path))


def decode_batch(images: Sequence[bytes], size: int | None = None) -> np.ndarray:
    """List of encoded images -> float32 N x 3 x H x W in [0, 1]."""
    arrs = [decode(b, size) for b in images]
    x = np.stack(arrs).astype(np.float32) / 255.0
    return x.transpose(0, 3, 1, 2)
