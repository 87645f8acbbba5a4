"""Helpers for the data tests: the HF word-level test vocabulary and image/JSONL writers."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# The HF test tokenizer: word-level, so expectations can be written token by token. Every word,
# punctuation mark and whitespace character is its own token; specials have fixed ids.
HF_SPECIALS = ["<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|im_start|>", "<|im_end|>", "<pad>"]
HF_WORDS = ["\n", " ", ".", ",", ":", "?", "'", "A", "Be", "brief", "USER", "ASSISTANT", "system", "user",
            "assistant", "What", "is", "it", "red", "circle", "a", "Describe", "image", "Count", "Two", "Hi",
            "Hello", "<", "|", "_", "im", "end", ">", "/", "s"]
HF_VOCAB = {t: i for i, t in enumerate(HF_SPECIALS + HF_WORDS)}


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png16_rgb_bytes(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), written by hand."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def make_dataset(prefix: Path, lengths: list[int], *, image_size: int = 4, with_image: list[bool] | None = None,
                 tokenizer_sha: str = "test-tokenizer", pad_id: int = 0) -> str:
    """A small dataset written with our writer: sample i has ``lengths[i]`` tokens.

    tokens = [1, 1000+i, (IMAGE), 5, 5, ..., 2]; the last two tokens are supervised; the image
    is filled with i % 256.
    """
    from megatron_croc.data.constants import FORMAT_NAME, FORMAT_VERSION, IMAGE_TOKEN_ID
    from megatron_croc.data.indexed import IndexedSampleWriter, meta_path

    w = IndexedSampleWriter(prefix)
    for i, n in enumerate(lengths):
        img = with_image[i] if with_image is not None else True
        toks = [1, 1000 + i] + ([IMAGE_TOKEN_ID] if img else []) + [5] * (n - 3 - int(img)) + [2]
        assert len(toks) == n, (n, len(toks))
        mask = [0] * (n - 2) + [1, 1]
        image = np.full((3, image_size, image_size), i % 256, np.uint8) if img else None
        w.add(tokens=np.array(toks), loss_mask=np.array(mask), sample_id=f"s{i}", image_pixels=image)
    w.finalize()
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "tokenizer": {"sha256": tokenizer_sha, "pad_id": pad_id},
            "image": {"size": image_size, "transform": "pad", "storage": "pixels"}}
    Path(meta_path(prefix)).write_text(json.dumps(meta))
    return str(prefix)


def supervised_runs(tokens, loss_mask) -> list[list[int]]:
    """The maximal runs of supervised tokens (answer + EOS each), in order."""
    runs, cur = [], []
    for t, m in zip(list(tokens), list(loss_mask)):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs
