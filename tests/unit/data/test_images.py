"""Images: every input mode converted correctly, transforms' geometry, bad files skipped."""

from __future__ import annotations

import io

import numpy as np
import pytest
from data_helpers import jpeg_bytes, png16_rgb_bytes, png_bytes
from PIL import Image

from megatron_croc.data.constants import SkipReason, SkipSample
from megatron_croc.data.images import (
    ALPHA_BACKGROUND,
    CLIP_MEAN,
    CLIP_MEAN_RGB,
    decode_image,
    process_image_bytes,
    read_image_file,
    transform_image,
)


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data)).astype(int)


def test_clip_constants():
    assert CLIP_MEAN_RGB == (122, 116, 104)  # LLaVA's pad colour
    assert CLIP_MEAN == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_cmyk_jpeg_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    data = jpeg_bytes(cmyk, quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert np.abs(rgb(data)[4, 4] - [255, 0, 0]).max() <= 3


def test_16bit_grey_png_is_scaled_not_clipped():
    arr = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    data = png_bytes(Image.fromarray(arr))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = rgb(data)
    assert out[0, :, 0].tolist() == [0, 64, 128, 255]  # a bare convert('RGB') gives 0,255,255,255
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_rgb_png():
    arr = np.zeros((2, 2, 3), dtype=np.uint16)
    arr[0, 0] = (65535, 0, 32768)
    arr[1, 1] = (257 * 10, 257 * 20, 257 * 30)
    out = rgb(png16_rgb_bytes(arr))
    assert out[0, 0].tolist() == [255, 0, 128]
    assert out[1, 1].tolist() == [10, 20, 30]


def test_palette_png_with_and_without_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    assert rgb(png_bytes(p))[0].tolist() == [[255, 0, 0], [0, 0, 255]]
    out = rgb(png_bytes(p, transparency=1))  # index 1 transparent -> background
    assert out[0].tolist() == [[255, 0, 0], list(ALPHA_BACKGROUND)]


def test_alpha_composited_on_white():
    a = np.zeros((1, 3, 4), dtype=np.uint8)
    a[0, 0] = (0, 0, 0, 0)  # fully transparent black: must not show as black
    a[0, 1] = (0, 0, 0, 255)
    a[0, 2] = (0, 0, 0, 128)
    out = rgb(png_bytes(Image.fromarray(a, "RGBA")))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert abs(out[0, 2, 0] - 127) <= 1
    la = Image.fromarray(np.array([[[200, 0], [200, 255]]], dtype=np.uint8), "LA")
    assert rgb(png_bytes(la))[0].tolist() == [[255, 255, 255], [200, 200, 200]]


def test_grey_and_bilevel():
    assert rgb(png_bytes(Image.new("L", (1, 1), 77)))[0, 0].tolist() == [77, 77, 77]
    assert rgb(png_bytes(Image.new("1", (1, 1), 1)))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_applied():
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (2, 4)


def test_pad_to_square_geometry():
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    out = transform_image(img, size=4, transform="pad")
    assert out.shape == (3, 4, 4) and out.dtype == np.uint8
    hwc = out.transpose(1, 2, 0)
    assert (hwc[0] == CLIP_MEAN_RGB).all() and (hwc[3] == CLIP_MEAN_RGB).all()
    assert (hwc[1:3] == (255, 0, 0)).all()


def test_resize_center_crop_geometry():
    arr = np.zeros((4, 8, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(8) * 10  # column index in the red channel
    out = transform_image(Image.fromarray(arr), size=4, transform="crop")
    assert out[0, 0].tolist() == [20, 30, 40, 50]  # centre columns 2..5
    big = transform_image(Image.fromarray(np.full((30, 60, 3), 9, np.uint8)), size=10, transform="crop")
    assert big.shape == (3, 10, 10) and (big == 9).all()


def test_jpeg_draft_close_to_full_decode():
    rng = np.random.default_rng(0)
    base = Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).resize((640, 480), Image.BICUBIC)
    data = jpeg_bytes(base)
    full = process_image_bytes(data, size=64, transform="pad").astype(int)
    fast = process_image_bytes(data, size=64, transform="pad", jpeg_draft=True).astype(int)
    assert np.abs(full - fast).mean() < 3


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", SkipReason.IMAGE_EMPTY),
        (b"this is not an image at all", SkipReason.IMAGE_DECODE_ERROR),
    ],
)
def test_bad_bytes(data, reason):
    with pytest.raises(SkipSample) as exc:
        decode_image(data)
    assert exc.value.reason == reason


def test_truncated_jpeg_and_png():
    img = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    for data in (jpeg_bytes(img), png_bytes(img)):
        with pytest.raises(SkipSample) as exc:
            decode_image(data[: len(data) // 2])
        assert exc.value.reason == SkipReason.IMAGE_TRUNCATED


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(SkipSample) as exc:
        read_image_file(tmp_path / "nope.jpg")
    assert exc.value.reason == SkipReason.IMAGE_MISSING
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(SkipSample) as exc:
        read_image_file(tmp_path / "empty.jpg")
    assert exc.value.reason == SkipReason.IMAGE_EMPTY


def test_decompression_bomb_skipped(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(SkipSample) as exc:
        decode_image(png_bytes(Image.new("RGB", (20, 20))))
    assert exc.value.reason == SkipReason.IMAGE_TOO_LARGE
