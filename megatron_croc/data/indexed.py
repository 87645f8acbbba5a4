"""Our samples inside megatron-core's multimodal ``IndexedDataset`` (.bin/.idx) plus a sidecar.

Layout: one file pair per prefix, ``IndexedDatasetBuilder(dtype=int32, multimodal=True)``;
each sample is one *document* whose items carry an ``ItemMode`` tag:

====================  ======================================================================
item (mode)           content
====================  ======================================================================
TOKENS (0)            int32 token ids; the image is a single ``IMAGE_TOKEN_ID`` (-200)
LOSS_MASK (1)         int32 0/1 per token (1 = supervised answer / end-of-turn token)
SAMPLE_ID (4)         [n_bytes] + UTF-8 id of the source record, zero-padded to 4 bytes
IMAGE_PIXELS (2)      uint8 [3, S, S] pixels viewed as int32 (optional)
IMAGE_ENCODED (3)     [n_bytes] + the original encoded file, zero-padded (optional)
====================  ======================================================================

megatron-core's own reader reads these files (``IndexedDataset(prefix, multimodal=True)``);
``MultimodalIndexedDataset`` adds the typed view. The sidecar ``<prefix>.meta.json`` records the
tokenizer, template, image size/transform/storage and the counts; its name cannot collide with
a LLaVA ``<name>.json`` input next to the output.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_croc.data.constants import FORMAT_NAME, FORMAT_VERSION, ItemMode
from megatron_croc.data.images import process_image_bytes

META_SUFFIX = ".meta.json"
SKIP_SUFFIX = ".skipped.jsonl"


def meta_path(prefix: str | os.PathLike[str]) -> str:
    return os.fspath(prefix) + META_SUFFIX


def skip_report_path(prefix: str | os.PathLike[str]) -> str:
    return os.fspath(prefix) + SKIP_SUFFIX


def _bytes_to_int32(payload: bytes, *, with_length: bool) -> np.ndarray:
    pad = (-len(payload)) % 4
    # bytearray: a writable buffer, which torch.from_numpy in the builder wants.
    body = np.frombuffer(bytearray(payload + b"\x00" * pad), dtype=np.int32)
    if not with_length:
        return body
    return np.concatenate([np.asarray([len(payload)], dtype=np.int32), body])


def _int32_to_bytes(item: np.ndarray) -> bytes:
    n = int(item[0])
    return item[1:].view(np.uint8)[:n].tobytes()


@dataclass(kw_only=True)
class Sample:
    """One stored sample as the reader returns it."""

    tokens: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # uint8 [L]
    image: np.ndarray | None  # uint8 [3, S, S] or None (text-only)
    sample_id: str  # id from the source JSON
    index: int = -1  # index inside its dataset
    dataset: str = ""  # prefix of its dataset (for messages)
    position: int = -1  # global position in the blended stream (set by BlendedDataset)

    def describe(self) -> str:
        where = f"{self.dataset}[{self.index}]" if self.dataset else f"[{self.index}]"
        return f"sample {where} (id {self.sample_id!r}, global position {self.position})"


class IndexedSampleWriter:
    """Append samples to a new ``<prefix>.bin/.idx`` with megatron-core's builder."""

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = os.fspath(prefix)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._builder = IndexedDatasetBuilder(get_bin_path(self.prefix), dtype=np.int32, multimodal=True)
        self.count = 0

    def add(
        self,
        *,
        tokens: np.ndarray,
        loss_mask: np.ndarray,
        sample_id: str,
        image_pixels: np.ndarray | None = None,
        image_encoded: bytes | None = None,
    ) -> None:
        if image_pixels is not None and image_encoded is not None:
            raise ValueError("a sample stores its image either as pixels or encoded, not both")
        tokens = np.asarray(tokens, dtype=np.int32)
        loss_mask = np.asarray(loss_mask, dtype=np.int32)
        if tokens.shape != loss_mask.shape or tokens.ndim != 1:
            raise ValueError(f"tokens {tokens.shape} and loss mask {loss_mask.shape} must be equal 1-D")
        b = self._builder
        b.add_item(torch.from_numpy(tokens), ItemMode.TOKENS)
        b.add_item(torch.from_numpy(loss_mask), ItemMode.LOSS_MASK)
        b.add_item(torch.from_numpy(_bytes_to_int32(sample_id.encode("utf-8"), with_length=True)), ItemMode.SAMPLE_ID)
        if image_pixels is not None:
            pixels = np.ascontiguousarray(image_pixels, dtype=np.uint8)
            b.add_item(torch.from_numpy(_bytes_to_int32(pixels.tobytes(), with_length=False)), ItemMode.IMAGE_PIXELS)
        elif image_encoded is not None:
            b.add_item(torch.from_numpy(_bytes_to_int32(image_encoded, with_length=True)), ItemMode.IMAGE_ENCODED)
        b.end_document()
        self.count += 1

    def finalize(self, idx_path: str | None = None) -> None:
        self._builder.finalize(idx_path or get_idx_path(self.prefix))


def merge_indexed(parts: list[str], out_prefix: str, *, keep: list[np.ndarray | None] | None = None,
                  tmp_suffix: str = ".merging") -> None:
    """Concatenate partition datasets in order into ``out_prefix`` (atomic rename at the end).

    ``keep[i]``: which samples of part i to copy (a boolean mask), None for all of them. Whole
    parts are appended as files (megatron-core's ``add_index``), filtered ones sample by sample.
    """
    tmp = out_prefix + tmp_suffix
    builder = IndexedDatasetBuilder(get_bin_path(tmp), dtype=np.int32, multimodal=True)
    keep = keep if keep is not None else [None] * len(parts)
    # add_index runs gc.collect() per part; freezing the (large, long-lived) heap first keeps that
    # from scanning every object of torch/megatron hundreds of times.
    gc.freeze()
    try:
        for part, mask in zip(parts, keep):
            if mask is None or mask.all():
                builder.add_index(part)
            elif mask.any():
                ds = IndexedDataset(part, multimodal=True)
                docs = np.asarray(ds.document_indices)
                for d in np.flatnonzero(mask):
                    for item in range(int(docs[d]), int(docs[d + 1])):
                        values, mode = ds[item]
                        builder.add_item(torch.from_numpy(np.array(values)), int(mode))
                    builder.end_document()
                del ds
    finally:
        gc.unfreeze()
    builder.finalize(get_idx_path(tmp))
    os.replace(get_bin_path(tmp), get_bin_path(out_prefix))
    os.replace(get_idx_path(tmp), get_idx_path(out_prefix))


@dataclass(kw_only=True)
class StoredSummary:
    """What the counts need to know of one stored sample."""

    sample_id: str
    tokens: int
    supervised_tokens: int
    has_image: bool


def read_summaries(prefix: str, positions: np.ndarray) -> list[StoredSummary]:
    """Id, length, supervised tokens and image flag of samples ``positions`` of one .bin/.idx."""
    ds = IndexedDataset(prefix, multimodal=True)
    docs = np.asarray(ds.document_indices)
    out = []
    for d in positions:
        first = int(docs[d])
        tokens, _ = ds[first]
        mask, _ = ds[first + 1]
        sid, _ = ds[first + 2]
        out.append(StoredSummary(sample_id=_int32_to_bytes(sid).decode("utf-8"), tokens=len(tokens),
                                 supervised_tokens=int(np.asarray(mask).sum()),
                                 has_image=int(docs[d + 1]) - first == 4))
    return out


def read_meta(prefix: str | os.PathLike[str]) -> dict[str, Any]:
    path = meta_path(prefix)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"dataset sidecar {path!r} not found: {os.fspath(prefix)!r} is not a dataset written by "
            "tools/preprocess_data.py (expected <prefix>.bin, <prefix>.idx and <prefix>.meta.json)"
        ) from None
    if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path!r}: unsupported format {meta.get('format')!r} v{meta.get('format_version')}; "
                         f"this code reads {FORMAT_NAME} v{FORMAT_VERSION}")
    return meta


class MultimodalIndexedDataset:
    """Typed, random-access view of one preprocessed dataset (no shuffling, no blending)."""

    def __init__(self, prefix: str | os.PathLike[str], *, mmap: bool = True) -> None:
        self.prefix = os.fspath(prefix)
        self.meta = read_meta(self.prefix)
        self._mmap = mmap
        self._open()

    def part_prefixes(self) -> list[str]:
        """The .bin/.idx pairs holding the samples: the prefix itself, or the unmerged partitions
        (``--no-merge``) listed in the sidecar relative to the prefix's folder."""
        parts = self.meta.get("parts")
        if not parts:
            return [self.prefix]
        folder = os.path.dirname(os.path.abspath(self.prefix))
        return [os.path.join(folder, p) for p in parts]

    def _open(self) -> None:
        self._parts: list[IndexedDataset] = []
        part_of, starts_all, has_image, token_lengths = [], [], [], []
        for prefix in self.part_prefixes():
            if not IndexedDataset.exists(prefix):
                raise FileNotFoundError(f"{prefix}.bin/.idx not found (dataset {self.prefix!r})")
            if os.path.getsize(get_bin_path(prefix)) == 0:
                continue  # every record of this part was skipped; an empty file cannot be mapped
            ds = IndexedDataset(prefix, multimodal=True, mmap=self._mmap)
            index = ds.index
            docs = np.asarray(index.document_indices, dtype=np.int64)
            starts = docs[:-1]
            items_per_doc = docs[1:] - docs[:-1]
            modes = np.asarray(index.sequence_modes)
            if len(starts) and not (
                np.all((items_per_doc == 3) | (items_per_doc == 4))
                and np.all(modes[starts] == ItemMode.TOKENS)
                and np.all(modes[starts + 1] == ItemMode.LOSS_MASK)
                and np.all(modes[starts + 2] == ItemMode.SAMPLE_ID)
            ):
                raise ValueError(f"{prefix!r} does not have the item layout of {FORMAT_NAME}")
            part_of.append(np.full(len(starts), len(self._parts), dtype=np.int32))
            starts_all.append(starts)
            has_image.append(items_per_doc == 4)
            token_lengths.append(np.asarray(index.sequence_lengths)[starts].astype(np.int64))
            self._parts.append(ds)
        if not self._parts or not sum(len(x) for x in starts_all):
            raise ValueError(f"dataset {self.prefix!r} holds no samples (see its skip report "
                             f"{skip_report_path(self.prefix)!r})")
        self._part_of = np.concatenate(part_of)
        self._doc_start = np.concatenate(starts_all)
        self.has_image = np.concatenate(has_image)
        self.token_lengths = np.concatenate(token_lengths)
        image = self.meta["image"]
        self.image_size = int(image["size"])
        self.image_transform = str(image["transform"])

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers reopen the memory maps instead of pickling them.
        return {"prefix": self.prefix, "meta": self.meta, "mmap": self._mmap}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.prefix, self.meta, self._mmap = state["prefix"], state["meta"], state["mmap"]
        self._open()

    def __len__(self) -> int:
        return len(self._doc_start)

    def expanded_lengths(self, num_image_tokens: int) -> np.ndarray:
        """Length of each sample once its image placeholder becomes ``num_image_tokens``."""
        return self.token_lengths + self.has_image.astype(np.int64) * (num_image_tokens - 1)

    @property
    def pad_id(self) -> int:
        return int(self.meta["tokenizer"]["pad_id"])

    def __getitem__(self, index: int) -> Sample:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.prefix!r} with {n} samples")
        index = int(index) % n
        ds = self._parts[self._part_of[index]]
        first = int(self._doc_start[index])
        tokens, _ = ds[first]
        loss_mask, _ = ds[first + 1]
        sid, _ = ds[first + 2]
        image = None
        if self.has_image[index]:
            raw, mode = ds[first + 3]
            if mode == ItemMode.IMAGE_PIXELS:
                s = self.image_size
                image = raw.view(np.uint8)[: 3 * s * s].reshape(3, s, s)
            else:
                image = process_image_bytes(
                    _int32_to_bytes(raw), size=self.image_size, transform=self.image_transform
                )
        return Sample(
            tokens=tokens,
            loss_mask=loss_mask.astype(np.uint8),
            image=image,
            sample_id=_int32_to_bytes(sid).decode("utf-8"),
            index=index,
            dataset=self.prefix,
        )
