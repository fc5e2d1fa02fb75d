"""The font corpus the builtin backbone is pretrained on: rendered digits, coloured, captioned.

Digits 0-9 are drawn with the fonts matplotlib ships (DejaVu, STIX, Computer Modern), at
random height, width, slant, rotation, stroke width and position, as 32x32 binary bitmaps
block-summed to 8x8 with values 0..16 (how scikit-learn's handwritten digits were made),
then coloured with a colour drawn from a broad palette independently of the digit, and
resized to the task's image size exactly like the colored_digits source does. Captions
name colour and digit in words, mostly in the colored_digits template "a {bias} {member}"
("a green seven"). The corpus never contains the task's images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from raybias.data.sources.colored_digits import colorize
from raybias.diffusion.tokenizer import DIGIT_WORDS
from raybias.palette import CORPUS_RGB

PALETTE_NAMES: List[str] = list(CORPUS_RGB)

# Fonts shipped in matplotlib's mpl-data/fonts/ttf that draw ordinary digits.
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "DejaVuSansDisplay.ttf",
    "DejaVuSerifDisplay.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf",
)

# Caption templates: the task's "a {colour} {digit}" most of the time, a few paraphrases so
# the words are learned as words, not as positions.
MAIN_TEMPLATE = "a {color} {digit}"
OTHER_TEMPLATES = ("{color} {digit}", "a {digit} in {color}", "the digit {digit} in {color}",
                   "a {color} digit {digit}", "a {color} number {digit}")
COLOR_ONLY = "a {color} digit"
MAX_INK = 0.42  # fraction of the digit's box that is ink (real digits: about a third)
DIGIT_ONLY = "a {digit}"


class FontError(RuntimeError):
    """matplotlib's fonts are missing or none of them draws digits."""


def font_dir() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


@lru_cache(maxsize=None)
def _glyph(font_file: str, digit: int) -> Optional[np.ndarray]:
    """The digit's glyph cropped to its ink, as a bool array (drawn once at 64 px)."""
    font = ImageFont.truetype(os.path.join(font_dir(), font_file), 64)
    canvas = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(canvas).text((20, 10), str(digit), fill=255, font=font)
    arr = np.asarray(canvas) > 127
    if not arr.any():
        return None
    rows, cols = np.where(arr.any(1))[0], np.where(arr.any(0))[0]
    return arr[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


@lru_cache(maxsize=1)
def usable_fonts() -> Tuple[str, ...]:
    """Fonts whose ten digit glyphs exist and differ from each other (no tofu boxes)."""
    out = []
    for name in FONT_FILES:
        if not os.path.isfile(os.path.join(font_dir(), name)):
            continue
        glyphs = [_glyph(name, d) for d in range(10)]
        if any(g is None for g in glyphs):
            continue
        keys = {(g.shape, g.tobytes()) for g in glyphs}
        if len(keys) == 10:
            out.append(name)
    if not out:
        raise FontError(f"no usable digit fonts in {font_dir()} (matplotlib's bundled fonts)")
    return tuple(out)


def render_digit(digit: int, rng: np.random.Generator, fonts: Sequence[str] | None = None) -> np.ndarray:
    """One digit as 8x8 intensities 0..16 (float32), like scikit-learn's digits."""
    fonts = fonts or usable_fonts()
    glyph = _glyph(fonts[int(rng.integers(len(fonts)))], digit)
    img = Image.fromarray((glyph * 255).astype(np.uint8))
    # slant (shear) and a small rotation, on a padded canvas so nothing is cut off
    h, w = glyph.shape
    pad = max(h, w)
    big = Image.new("L", (w + 2 * pad, h + 2 * pad), 0)
    big.paste(img, (pad, pad))
    shear = float(rng.uniform(-0.3, 0.3))
    big = big.transform(big.size, Image.AFFINE, (1, shear, -shear * big.size[1] / 2, 0, 1, 0),
                        resample=Image.BILINEAR)
    big = big.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
    arr = np.asarray(big) > 127
    if not arr.any():
        arr = glyph
    rows, cols = np.where(arr.any(1))[0], np.where(arr.any(0))[0]
    arr = arr[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    # size: nearly full height like the real digits, width from the glyph's aspect, jittered
    height = int(rng.integers(24, 33))
    aspect = arr.shape[1] / arr.shape[0] * float(rng.uniform(0.8, 1.35))
    width = int(np.clip(round(height * aspect), 6, 30))
    small = Image.fromarray((arr * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    # stroke width: dilate up to twice, but stop before the digit turns into a blob
    for _ in range(int(rng.choice([0, 1, 1, 2, 2]))):
        thicker = small.filter(ImageFilter.MaxFilter(3))
        if (np.asarray(thicker) > 127).mean() > MAX_INK:
            break
        small = thicker
    canvas = np.zeros((32, 32), dtype=bool)
    top = int(np.clip((32 - height) // 2 + rng.integers(-2, 3), 0, 32 - height))
    left = int(np.clip((32 - width) // 2 + rng.integers(-3, 4), 0, 32 - width))
    canvas[top:top + height, left:left + width] = np.asarray(small) > 127
    return canvas.reshape(8, 4, 8, 4).sum(axis=(1, 3)).astype(np.float32)


def caption(digit: int, color: str, rng: np.random.Generator) -> str:
    u = float(rng.random())
    if u < 0.8:
        template = MAIN_TEMPLATE
    elif u < 0.92:
        template = OTHER_TEMPLATES[int(rng.integers(len(OTHER_TEMPLATES)))]
    elif u < 0.96:
        template = COLOR_ONLY
    else:
        template = DIGIT_ONLY
    return template.format(color=color, digit=DIGIT_WORDS[digit])


@dataclass
class Corpus:
    images: np.ndarray  # uint8 N x H x W x 3
    digits: np.ndarray  # int64 N
    colors: np.ndarray  # int64 N, index into palette
    captions: List[str]
    palette: List[str]

    def __len__(self) -> int:
        return len(self.digits)


def colored(gray8: np.ndarray, rgb, size: int, rng: np.random.Generator, jitter: int = 12) -> np.ndarray:
    """Colour an 8x8 digit like colored_digits, with a small per-image jitter of the colour."""
    rgb = np.clip(np.asarray(rgb, np.float32) + rng.integers(-jitter, jitter + 1, size=3), 0, 255)
    return colorize(gray8, rgb, size)


def render_corpus(n: int, size: int = 16, seed: int = 0, palette: Sequence[str] | None = None,
                  progress: bool = False) -> Corpus:
    """`n` captioned images, digits and colours uniform and independent (deterministic)."""
    palette = list(palette or PALETTE_NAMES)
    rng = np.random.default_rng(seed)
    fonts = usable_fonts()
    digits = rng.integers(0, 10, size=n)
    colors = rng.integers(0, len(palette), size=n)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions = []
    it = range(n)
    if progress:
        from raybias.console import bar

        it = bar(iterable=it, desc="rendering corpus", unit="img", mininterval=2)
    for i in it:
        gray8 = render_digit(int(digits[i]), rng, fonts)
        images[i] = colored(gray8, CORPUS_RGB[palette[colors[i]]], size, rng)
        captions.append(caption(int(digits[i]), palette[colors[i]], rng))
    return Corpus(images=images, digits=digits.astype(np.int64), colors=colors.astype(np.int64),
                  captions=captions, palette=palette)
