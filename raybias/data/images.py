"""Image encode/decode helpers shared by every stage.

Dataset files are read, checked to decode whole, center-cropped to a square, resized and
re-encoded (`load_file`); `load_files` does that for many files on a thread pool (Pillow
releases the GIL while it decodes, resizes and compresses), so a 200k-file dataset loads
on every core of the machine that runs `prepare`. Any failure is one `ImageError` naming
the file.
"""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_FORMATS = ("png", "jpeg")
JPEG_QUALITY = 95


class ImageError(ValueError):
    """An image file is missing, corrupt or truncated."""


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 HxWx3 (or HxW) array -> PNG bytes (deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode(arr: np.ndarray, image_format: str = "png") -> bytes:
    """uint8 HxWx3 array -> PNG (lossless) or JPEG (quality 95, about 5x smaller for photos)."""
    if image_format == "png":
        return encode_png(arr)
    if image_format == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()
    raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, not {image_format!r}")


_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode(data: bytes, size: int | None = None, where: str = "image") -> np.ndarray:
    """Encoded bytes -> uint8 HxWx3 array, optionally resized to size x size."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{where}: cannot decode image ({exc})") from exc
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _square_crop_box(w: int, h: int):
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def decode_square(data: bytes, size: int, center_crop: bool = True, where: str = "image") -> np.ndarray:
    """Encoded bytes -> uint8 size x size x 3: the centred square (or the whole image, stretched)."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if img.format == "JPEG" and w > 0 and h > 0:
            # Let the JPEG decoder downscale by a power of two while still covering
            # the output: much less work for 178x218 CelebA faces at 64 px.
            side = min(w, h) if center_crop else None
            want = ((math.ceil(size * w / side), math.ceil(size * h / side)) if side else (size, size))
            img.draft("RGB", want)
        img.load()  # decodes everything: a truncated file fails here
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{where}: cannot decode image ({exc})") from exc
    img = img.convert("RGB")
    if center_crop and img.size[0] != img.size[1]:
        img = img.crop(_square_crop_box(*img.size))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_file(path: str, size: int, center_crop: bool = False, image_format: str = "png") -> bytes:
    """Read an image file, check it decodes whole, crop/resize, return encoded bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as exc:
        raise ImageError(f"image file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"image path is a folder, not a file: {path}") from exc
    except OSError as exc:
        raise ImageError(f"cannot read image file {path}: {exc}") from exc
    if not raw:
        raise ImageError(f"{path}: cannot decode image (the file is empty)")
    return encode(decode_square(raw, size, center_crop, where=path), image_format)


def default_workers() -> int:
    # Threads, not processes: decoding releases the GIL; extra threads hide file latency
    # (network filesystems) without costing memory.
    return min(32, 2 * (os.cpu_count() or 1))


def load_files(paths: Sequence[str], size: int, center_crop: bool = True, image_format: str = "png",
               workers: int = 0, progress=None, pool: Optional[ThreadPoolExecutor] = None) -> List[bytes]:
    """Load many files in parallel, in order. The first failing file (in `paths` order) is
    raised as its ImageError and the files not yet started are cancelled.

    `progress`: a tqdm bar to advance; `pool`: an executor to reuse across calls.
    """
    def one(p: str) -> bytes:
        data = load_file(p, size, center_crop, image_format)
        if progress is not None:
            progress.update(1)
        return data

    if pool is not None:
        return list(pool.map(one, paths))
    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="raybias-load") as own:
        return list(own.map(one, paths))


def decode_batch(images: Sequence[bytes], size: int | None = None) -> np.ndarray:
    """List of encoded images -> float32 N x 3 x H x W in [0, 1]."""
    arrs = [decode(b, size) for b in images]
    x = np.stack(arrs).astype(np.float32) / 255.0
    return x.transpose(0, 3, 1, 2)
