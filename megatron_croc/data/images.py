"""Images: any input file -> RGB -> the vision encoder's square input, as uint8 [3, S, S].

Normalisation (mean/std) is the model's job; data stores uint8 RGB at the encoder resolution.

Transforms (SPEC §1.5), matching LLaVA + CLIPImageProcessor:
- ``pad``  (stages 1.5/2): pad to a square with the CLIP mean colour, image centred, then a
  bicubic resize to S×S.
- ``crop`` (stage 1): bicubic resize of the shortest side to S, then a centre crop to S×S.

Input modes are converted deliberately, not by a bare ``convert("RGB")``:
- 16-bit (``I;16``/``I``) is scaled to 8 bits (PIL's conversion would clip everything above 255
  to white);
- alpha (RGBA, LA, PA, palette or grey with a transparent colour) is composited onto white
  (dropping alpha would expose whatever colour hides under transparent pixels, often black);
- CMYK, palette, grey, bilevel, YCbCr, LAB are converted by PIL's own conversions;
- the EXIF orientation is applied, so phone pictures are upright.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from megatron_croc.data.constants import CLIP_MEAN, SkipReason, SkipSample

# LLaVA's pad colour: tuple(int(x * 255) for x in image_mean) = (122, 116, 104).
CLIP_MEAN_RGB: tuple[int, int, int] = tuple(int(x * 255) for x in CLIP_MEAN)  # type: ignore[assignment]
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

TRANSFORMS = ("pad", "crop")


def read_image_file(path: str | os.PathLike[str]) -> bytes:
    """Bytes of an image file; a missing or empty file is a skip, not a crash."""
    try:
        data = open(path, "rb").read()
    except FileNotFoundError:
        raise SkipSample(SkipReason.IMAGE_MISSING, f"no such file: {os.fspath(path)}") from None
    except IsADirectoryError:
        raise SkipSample(SkipReason.IMAGE_MISSING, f"is a directory: {os.fspath(path)}") from None
    except OSError as err:
        raise SkipSample(SkipReason.IMAGE_MISSING, f"cannot read {os.fspath(path)}: {err}") from None
    if not data:
        raise SkipSample(SkipReason.IMAGE_EMPTY, f"zero-byte file: {os.fspath(path)}")
    return data


def decode_image(data: bytes, *, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode bytes to an RGB PIL image, or raise ``SkipSample`` saying why not.

    ``draft_size``: let the JPEG decoder downscale by a power of two while staying at least this
    large (much faster for big JPEGs; pixels differ slightly from a full decode).
    """
    if not data:
        raise SkipSample(SkipReason.IMAGE_EMPTY, "zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SkipSample(SkipReason.IMAGE_TOO_LARGE, str(err)) from None
    except Image.UnidentifiedImageError:
        raise SkipSample(SkipReason.IMAGE_DECODE_ERROR, "not an image, or a format PIL cannot read") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        msg = f"{type(err).__name__}: {err}"
        if "truncated" in str(err).lower() or isinstance(err, EOFError):
            raise SkipSample(SkipReason.IMAGE_TRUNCATED, msg) from None
        raise SkipSample(SkipReason.IMAGE_DECODE_ERROR, msg) from None
    try:
        return to_rgb(img)
    except Exception as err:
        raise SkipSample(SkipReason.IMAGE_DECODE_ERROR, f"cannot convert mode {img.mode}: {err}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docstring for why each case)."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = arr.astype(np.float64)
            hi = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
            arr8 = np.clip(np.nan_to_num(arr) / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            arr = arr.astype(np.int64)
            # 16-bit data (or "I" holding 16-bit values): map 0..65535 onto 0..255.
            if mode.startswith("I;16") or (arr.size and arr.max() > 255):
                arr8 = ((np.clip(arr, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
            else:
                arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        img = img.convert("RGB")
    return img


def pad_to_square(img: Image.Image, color: tuple[int, int, int] = CLIP_MEAN_RGB) -> Image.Image:
    """LLaVA's expand2square: centre the image on a square canvas of the pad colour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """CLIPImageProcessor: shortest side to ``size`` (bicubic), then a centre crop."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, max(size, int(size * h / w))
    else:
        new_w, new_h = max(size, int(size * w / h)), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def transform_image(img: Image.Image, *, size: int, transform: str) -> np.ndarray:
    """RGB PIL image -> uint8 [3, size, size] with the stage's transform."""
    if transform == "pad":
        img = pad_to_square(img)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
    elif transform == "crop":
        img = resize_center_crop(img, size)
    else:
        raise ValueError(f"unknown image transform {transform!r}; use one of {TRANSFORMS}")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def draft_size_for(width: int, height: int, *, size: int, transform: str) -> tuple[int, int]:
    """Smallest decode size that still gives ``transform`` at least ``size`` pixels to work from."""
    if transform == "pad":
        scale = size / max(width, height)
    else:
        scale = size / min(width, height)
    return (max(1, int(np.ceil(width * scale))), max(1, int(np.ceil(height * scale))))


def process_image_bytes(data: bytes, *, size: int, transform: str, jpeg_draft: bool = False) -> np.ndarray:
    """Encoded image bytes -> uint8 [3, size, size]; raises ``SkipSample`` on bad input."""
    draft = None
    if jpeg_draft:
        try:
            with Image.open(io.BytesIO(data)) as probe:
                draft = draft_size_for(*probe.size, size=size, transform=transform)
        except Exception:
            draft = None  # decode_image reports the real problem below
    img = decode_image(data, draft_size=draft)
    return transform_image(img, size=size, transform=transform)
