"""Image encode/decode helpers shared by every stage.

Dataset files are read, checked to decode whole, center-cropped to a square, resized and
re-encoded (`load_file`); `load_files` does that for many files on a thread pool (Pillow
releases the GIL while it decodes, resizes and compresses), so a 200k-file dataset loads
on every core of the machine that runs `prepare`. Any failure is one `ImageError` naming
the file. Only regular files are read (a named pipe would block forever), only the
raster formats of `READ_FORMATS` are decoded (Pillow's other plugins, e.g. EPS through
Ghostscript, are never reached), and 16-bit grey images are scaled to 8 bits.
"""

from __future__ import annotations

import io
import math
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from raybias.config import IMAGE_FORMATS  # png, jpeg, webp

JPEG_QUALITY = 95  # the default quality of the lossy formats (generate.image_quality)
# The only Pillow formats raybias decodes (pass as `Image.open(..., formats=READ_FORMATS)`
# wherever an image from outside raybias is opened): the raster formats datasets ship in.
# Without it Pillow tries every plugin it has, e.g. an EPS file named .jpg is handed to
# Ghostscript. (Pillow's JPEG entry also reads MPO, the multi-picture JPEG of cameras.)
READ_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# Grey images wider than 8 bits: 16-bit PNG/TIFF ("I;16*") and 32-bit integer ("I").
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An image file is missing, corrupt or truncated."""


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 HxWx3 (or HxW) array -> PNG bytes (deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode(arr: np.ndarray, image_format: str = "png", quality: Optional[int] = None) -> bytes:
    """uint8 HxWx3 array -> PNG (lossless), JPEG or WebP bytes (lossy, `quality` 1..100,
    default JPEG_QUALITY). JPEG at 95 is ~18x faster to encode than PNG for a 512-px photo
    and ~4.5x smaller; PNG ignores `quality` (lossless)."""
    if image_format == "png":
        return encode_png(arr)
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, not {image_format!r}")
    q = JPEG_QUALITY if quality is None else int(quality)
    if not 1 <= q <= 100:
        raise ValueError(f"image quality must be in 1..100, not {quality!r}")
    buf = io.BytesIO()
    img = Image.fromarray(np.asarray(arr, dtype=np.uint8))
    if image_format == "jpeg":
        img.save(buf, format="JPEG", quality=q)
    else:
        # method 0: the fastest WebP encoder setting; at 512 px it is ~3x faster than the
        # default (4) for a file ~1 % larger
        img.save(buf, format="WEBP", quality=q, method=0)
    return buf.getvalue()


_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _open(data: bytes, where: str) -> Image.Image:
    """Pillow's lazy open of encoded bytes, restricted to READ_FORMATS."""
    try:
        return Image.open(io.BytesIO(data), formats=READ_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageError(f"{where}: cannot decode image: not a {', '.join(READ_FORMATS)} file "
                         "(other formats are refused)") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{where}: cannot decode image ({exc})") from exc


def to_rgb(img: Image.Image, where: str = "image") -> Image.Image:
    """A decoded image as 8-bit RGB. Grey images of more than 8 bits (16-bit PNG/TIFF) are
    scaled to 0..255 (65535 -> 255); `convert("RGB")` would clip them to white."""
    if img.mode in _WIDE_GREY:
        arr = np.asarray(img)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageError(f"{where}: {img.mode} grey image with values {lo}..{hi}, outside the 16-bit range "
                             "0..65535 that raybias scales to 8 bits; convert it to an 8-bit image")
        grey = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        img = Image.fromarray(grey, mode="L")
    elif img.mode == "F":
        raise ImageError(f"{where}: a floating-point (mode F) image; convert it to an 8-bit image")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(data: bytes, size: int | None = None, where: str = "image") -> np.ndarray:
    """Encoded bytes -> uint8 HxWx3 array, optionally resized to size x size."""
    img = _open(data, where)
    try:
        img.load()
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{where}: cannot decode image ({exc})") from exc
    img = to_rgb(img, where)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _square_crop_box(w: int, h: int):
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def decode_square(data: bytes, size: int, center_crop: bool = True, where: str = "image") -> np.ndarray:
    """Encoded bytes -> uint8 size x size x 3: the centred square (or the whole image, stretched)."""
    img = _open(data, where)
    try:
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
    img = to_rgb(img, where)
    if center_crop and img.size[0] != img.size[1]:
        img = img.crop(_square_crop_box(*img.size))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


_NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def read_image_file(path: str) -> bytes:
    """The bytes of a regular file. Anything else (a named pipe, which would block the read
    forever, a device, a folder) is an ImageError naming it. The file is opened without
    blocking and checked on the open descriptor, so it cannot be swapped in between."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError as exc:
        raise ImageError(f"image file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"image path is a folder, not a file: {path}") from exc
    except OSError as exc:
        raise ImageError(f"cannot read image file {path}: {exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
            raise ImageError(f"image path is {kind}, not a regular file: {path}")
        with os.fdopen(fd, "rb") as f:
            fd = -1  # closed by the file object
            return f.read()
    except OSError as exc:
        raise ImageError(f"cannot read image file {path}: {exc}") from exc
    finally:
        if fd >= 0:
            os.close(fd)


def load_file(path: str, size: int, center_crop: bool = False, image_format: str = "png") -> bytes:
    """Read an image file, check it decodes whole, crop/resize, return encoded bytes."""
    raw = read_image_file(path)
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
