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
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

from megatron_croc.data.constants import CLIP_MEAN, SkipReason, SkipSample

# LLaVA's pad colour: tuple(int(x * 255) for x in image_mean) = (122, 116, 104).
CLIP_MEAN_RGB: tuple[int, int, int] = tuple(int(x * 255) for x in CLIP_MEAN)  # type: ignore[assignment]
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

TRANSFORMS = ("pad", "crop")


DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20  # far above any training image; bounds what one record can make us read


def read_image_file(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """Bytes of a *regular* image file of at most ``max_bytes``, or ``SkipSample`` saying why not.

    Only regular files are opened: a FIFO would block the run forever, a device such as
    ``/dev/zero`` never ends, and opening some devices has side effects; their type is checked
    with ``stat`` first, then again on the opened descriptor (``O_NONBLOCK`` so that a file
    swapped for a FIFO in between cannot block the open, ``O_NOFOLLOW`` so that the last path
    component cannot have become a symlink). At most ``max_bytes + 1`` bytes are read.
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise SkipSample(SkipReason.IMAGE_MISSING, f"no such file: {name}") from None
    except (OSError, ValueError) as err:
        raise SkipSample(SkipReason.IMAGE_MISSING, f"cannot stat {name}: {err}") from None
    _check_regular(st, name)
    _check_size(st.st_size, name, max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags)
    except FileNotFoundError:
        raise SkipSample(SkipReason.IMAGE_MISSING, f"no such file: {name}") from None
    except OSError as err:
        raise SkipSample(SkipReason.IMAGE_MISSING, f"cannot open {name}: {err}") from None
    try:
        st = os.fstat(fd)
        _check_regular(st, name)
        _check_size(st.st_size, name, max_bytes)
        with open(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise SkipSample(SkipReason.IMAGE_MISSING, f"cannot read {name}: {err}") from None
    finally:
        os.close(fd)
    _check_size(len(data), name, max_bytes)  # the file grew after the stat
    if not data:
        raise SkipSample(SkipReason.IMAGE_EMPTY, f"zero-byte file: {name}")
    return data


def _check_regular(st: os.stat_result, name: str) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "special file")
    raise SkipSample(SkipReason.IMAGE_NOT_REGULAR_FILE, f"{name} is a {kind}, not a regular file; it is not opened")


_FILE_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
               (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


def _check_size(size: int, name: str, max_bytes: int) -> None:
    if size > max_bytes:
        raise SkipSample(SkipReason.IMAGE_TOO_LARGE,
                         f"{name} has {size if size <= max_bytes + 1 else 'more than ' + str(max_bytes)} bytes > "
                         f"--max-image-bytes {max_bytes}; raise the limit if such files are meant")


class ImageFolder:
    """Where the ``image`` paths of records may lead, and the one way to read them.

    Records come from datasets nobody here wrote, so their paths are not trusted: a path is
    resolved inside ``root`` (after following symlinks) and one that leaves it (``..``, an
    absolute path, a symlink pointing outside) is skipped as ``image_outside_folder`` without
    being opened. ``allow_absolute`` accepts absolute paths (for records that carry them) and
    ``allow_symlinks_outside`` symlinks inside ``root`` that point elsewhere (a folder that links
    to shared storage); ``..`` never leaves ``root``. Either way only regular files of at most
    ``max_bytes`` are read (see :func:`read_image_file`).

    The check is made when the path is resolved; a folder that an adversary rewrites while the
    run reads it (swapping a checked directory for a symlink) is outside this threat model.
    """

    def __init__(self, root: str | os.PathLike[str], *, allow_absolute: bool = False,
                 allow_symlinks_outside: bool = False, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
        self.root = os.path.realpath(root)
        self.allow_absolute = allow_absolute
        self.allow_symlinks_outside = allow_symlinks_outside
        self.max_bytes = max_bytes

    def resolve(self, image: str) -> str:
        """The real path of the file ``image`` names, or ``SkipSample`` when it may not be read."""
        if "\x00" in image:
            raise SkipSample(SkipReason.MALFORMED_SAMPLE, f"'image' {image!r} contains a NUL character")
        if os.path.isabs(image):
            if not self.allow_absolute:
                raise SkipSample(SkipReason.IMAGE_OUTSIDE_FOLDER,
                                 f"{image!r} is an absolute path; image paths are relative to --image-folder "
                                 "(pass --allow-absolute-image-paths if the records are trusted to carry them)")
            return os.path.realpath(image)
        lexical = os.path.normpath(image)
        if lexical == ".." or lexical.startswith(".." + os.sep):
            raise SkipSample(SkipReason.IMAGE_OUTSIDE_FOLDER, f"{image!r} leaves --image-folder {self.root} with '..'")
        real = os.path.realpath(os.path.join(self.root, image))
        if not self.allow_symlinks_outside and not _inside(real, self.root):
            raise SkipSample(SkipReason.IMAGE_OUTSIDE_FOLDER,
                             f"{image!r} resolves to {real}, outside --image-folder {self.root} (a symlink); pass "
                             "--allow-image-symlinks-outside if the folder links to other storage on purpose")
        return real

    def read(self, image: str) -> bytes:
        """The bytes of the image a record names (see the class docstring for what is refused)."""
        return read_image_file(self.resolve(image), max_bytes=self.max_bytes)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


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
