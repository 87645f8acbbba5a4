"""Our sample layout inside megatron-core's IndexedDataset: write, read back, reject non-datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_helpers import make_dataset, png_bytes
from PIL import Image

from megatron_croc.data.constants import FORMAT_NAME, FORMAT_VERSION, IMAGE_TOKEN_ID, ItemMode
from megatron_croc.data.indexed import IndexedSampleWriter, MultimodalIndexedDataset, merge_indexed, meta_path


def _meta(prefix: Path, size: int) -> None:
    Path(meta_path(prefix)).write_text(json.dumps({
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tokenizer": {"sha256": "x", "pad_id": 0},
        "image": {"size": size, "transform": "pad", "storage": "pixels"}}))


def test_round_trip_pixels_encoded_text_only(tmp_path):
    size = 5  # 75 bytes: exercises the zero padding to int32
    pixels = np.arange(75, dtype=np.uint8).reshape(3, 5, 5)
    encoded = png_bytes(Image.fromarray(np.full((5, 5, 3), 200, np.uint8)))
    w = IndexedSampleWriter(tmp_path / "d")
    w.add(tokens=np.array([1, IMAGE_TOKEN_ID, 7, 2]), loss_mask=np.array([0, 0, 1, 1]), sample_id="päß/ü-1",
          image_pixels=pixels)
    w.add(tokens=np.array([1, 9, 2]), loss_mask=np.array([0, 1, 1]), sample_id="text")
    w.add(tokens=np.array([1, IMAGE_TOKEN_ID, 2]), loss_mask=np.array([0, 0, 1]), sample_id="enc", image_encoded=encoded)
    w.finalize()
    _meta(tmp_path / "d", size)
    ds = MultimodalIndexedDataset(tmp_path / "d")
    assert len(ds) == 3 and ds.has_image.tolist() == [True, False, True]
    a, b, c = ds[0], ds[1], ds[2]
    assert a.sample_id == "päß/ü-1" and a.tokens.tolist() == [1, IMAGE_TOKEN_ID, 7, 2]
    assert a.loss_mask.tolist() == [0, 0, 1, 1] and np.array_equal(a.image, pixels)
    assert b.image is None and b.tokens.tolist() == [1, 9, 2] and b.sample_id == "text"
    assert c.image.shape == (3, 5, 5) and (c.image == 200).all()  # decoded by the reader
    assert ds.expanded_lengths(10).tolist() == [13, 3, 12]
    assert ds[-1].sample_id == "enc"
    with pytest.raises(IndexError):
        ds[3]


def test_megatron_reader_sees_documents_and_modes(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = make_dataset(tmp_path / "d", [6, 5], with_image=[True, False])
    raw = IndexedDataset(prefix, multimodal=True)
    assert raw.document_indices.tolist() == [0, 4, 7]
    assert raw.index.sequence_modes.tolist() == [ItemMode.TOKENS, ItemMode.LOSS_MASK, ItemMode.SAMPLE_ID,
                                                 ItemMode.IMAGE_PIXELS, ItemMode.TOKENS, ItemMode.LOSS_MASK,
                                                 ItemMode.SAMPLE_ID]
    tokens, mode = raw[4]
    assert mode == ItemMode.TOKENS and tokens.tolist() == [1, 1001, 5, 5, 2]


def test_merge_preserves_order(tmp_path):
    a = make_dataset(tmp_path / "a", [5, 6])
    b = make_dataset(tmp_path / "b", [7])
    merge_indexed([a, b], str(tmp_path / "m"))
    _meta(tmp_path / "m", 4)
    m = MultimodalIndexedDataset(tmp_path / "m")
    assert [m[i].tokens.tolist()[:2] for i in range(3)] == [[1, 1000], [1, 1001], [1, 1000]]
    assert m.token_lengths.tolist() == [5, 6, 7]


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess_data.py"):
        MultimodalIndexedDataset(tmp_path / "nothing")
    # A plain (non-multimodal-layout) indexed dataset with our sidecar is refused.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    import torch

    b = IndexedDatasetBuilder(str(tmp_path / "plain.bin"), dtype=np.int32, multimodal=True)
    b.add_item(torch.tensor([1, 2, 3], dtype=torch.int32))
    b.end_document()
    b.finalize(str(tmp_path / "plain.idx"))
    _meta(tmp_path / "plain", 4)
    with pytest.raises(ValueError, match="item layout"):
        MultimodalIndexedDataset(tmp_path / "plain")
    w = IndexedSampleWriter(tmp_path / "empty")
    w.finalize()
    _meta(tmp_path / "empty", 4)
    with pytest.raises(ValueError, match="no samples"):
        MultimodalIndexedDataset(tmp_path / "empty")


def test_merge_with_an_empty_part(tmp_path):
    a = make_dataset(tmp_path / "a", [5])
    w = IndexedSampleWriter(tmp_path / "empty")
    w.finalize()
    b = make_dataset(tmp_path / "b", [6])
    merge_indexed([a, str(tmp_path / "empty"), b], str(tmp_path / "m"))
    _meta(tmp_path / "m", 4)
    assert MultimodalIndexedDataset(tmp_path / "m").token_lengths.tolist() == [5, 6]
