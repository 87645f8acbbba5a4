"""Collated batch contract, blending, per-epoch shuffle, packing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from data_helpers import make_dataset

from megatron_croc.data.constants import IMAGE_TOKEN_ID
from megatron_croc.data.dataset import (
    BatchCollator,
    BlendedDataset,
    PackedRows,
    SampleTooLongError,
    open_blend,
    parse_data_path,
)
from megatron_croc.data.indexed import MultimodalIndexedDataset, Sample

IMG = IMAGE_TOKEN_ID


def sample(tokens, mask, image=None, position=0, sid="x"):
    return Sample(tokens=np.array(tokens, np.int32), loss_mask=np.array(mask, np.uint8), image=image,
                  sample_id=sid, index=position, position=position)


def test_collate_expands_image_and_aligns_labels_with_loss_mask():
    img = np.full((3, 2, 2), 7, np.uint8)
    s1 = sample([1, 10, IMG, 11, 12, 2], [0, 0, 0, 0, 1, 1], img, position=40)
    s2 = sample([1, 20, 21, 2], [0, 0, 1, 1], None, position=41)
    col = BatchCollator(seq_length=12, num_image_tokens=3, pad_token_id=0, image_size=2)
    b = col([[s1], [s2]])
    assert b["tokens"].tolist() == [[1, 10, 0, 0, 0, 11, 12, 2, 0, 0, 0, 0], [1, 20, 21, 2] + [0] * 8]
    assert b["labels"].tolist() == [[10, 0, 0, 0, 11, 12, 2, 0, 0, 0, 0, 0], [20, 21, 2] + [0] * 9]
    assert b["loss_mask"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0], [0, 1, 1] + [0] * 9]
    assert b["position_ids"].tolist() == [list(range(8)) + [0] * 4, [0, 1, 2, 3] + [0] * 8]
    assert b["segment_ids"].tolist() == [[1] * 8 + [0] * 4, [1] * 4 + [0] * 8]
    assert b["visual_mask"][0].tolist() == [False, False, True, True, True] + [False] * 7
    assert not b["visual_mask"][1].any()
    assert b["images"].shape == (1, 3, 2, 2) and b["images"].dtype == torch.uint8 and (b["images"] == 7).all()
    assert b["sample_ids"].tolist() == [40, 41] and b["image_sample_ids"].tolist() == [40]
    dtypes = {k: v.dtype for k, v in b.items()}
    assert dtypes == {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
                      "position_ids": torch.int64, "segment_ids": torch.int32, "visual_mask": torch.bool,
                      "images": torch.uint8, "sample_ids": torch.int64, "image_sample_ids": torch.int64}


def test_collate_packed_row_has_boundaries():
    a = sample([1, 10, IMG, 2], [0, 0, 0, 1], np.full((3, 2, 2), 1, np.uint8), position=5)
    b = sample([1, 20, 2], [0, 1, 1], None, position=6)
    c = sample([1, IMG, 30, 2], [0, 0, 1, 1], np.full((3, 2, 2), 3, np.uint8), position=7)
    col = BatchCollator(seq_length=16, num_image_tokens=2, pad_token_id=9, image_size=2)
    out = col([[a, b, c]])
    assert out["tokens"][0].tolist() == [1, 10, 9, 9, 2, 1, 20, 2, 1, 9, 9, 30, 2, 9, 9, 9]
    assert out["segment_ids"][0].tolist() == [1] * 5 + [2] * 3 + [3] * 5 + [0] * 3
    assert out["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 0, 0, 0]
    assert out["labels"][0].tolist() == [10, 9, 9, 2, 9, 20, 2, 9, 9, 9, 30, 2, 9, 9, 9, 9]
    # no loss where the label would cross into the next sample (positions 4, 7, 12)
    assert out["loss_mask"][0].tolist() == [0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert out["visual_mask"][0].nonzero().flatten().tolist() == [2, 3, 9, 10]
    assert out["images"][:, 0, 0, 0].tolist() == [1, 3]
    assert out["sample_ids"].tolist() == [5, 6, 7] and out["image_sample_ids"].tolist() == [5, 7]


def test_collate_no_images_gives_empty_tensor_and_too_long_names_sample():
    col = BatchCollator(seq_length=6, num_image_tokens=4, pad_token_id=0, image_size=3)
    out = col([[sample([1, 2], [0, 1])]])
    assert out["images"].shape == (0, 3, 3, 3)
    with pytest.raises(SampleTooLongError, match="id 'long-one'.*9 positions.*--seq-length is 6"):
        col([[sample([1, 5, IMG, 6, 6, 2], [0, 0, 0, 0, 1, 1], np.zeros((3, 3, 3), np.uint8), sid="long-one")]])


def test_single_dataset_per_epoch_shuffle_is_deterministic(tmp_path):
    ds = MultimodalIndexedDataset(make_dataset(tmp_path / "d", [5] * 10))
    a = BlendedDataset([ds], seed=3)
    e0 = a.locate(np.arange(10))[1].tolist()
    e1 = a.locate(np.arange(10, 20))[1].tolist()
    assert sorted(e0) == list(range(10)) and sorted(e1) == list(range(10)) and e0 != e1
    assert BlendedDataset([ds], seed=3).locate(np.arange(20))[1].tolist() == e0 + e1
    assert BlendedDataset([ds], seed=4).locate(np.arange(10))[1].tolist() != e0
    assert BlendedDataset([ds], seed=3, shuffle=False).locate(np.arange(12))[1].tolist() == list(range(10)) + [0, 1]
    s = a[13]
    assert s.position == 13 and s.index == e1[3] and s.tokens[1] == 1000 + e1[3]


def test_blending_by_weight(tmp_path):
    big = MultimodalIndexedDataset(make_dataset(tmp_path / "big", [5] * 30))
    small = MultimodalIndexedDataset(make_dataset(tmp_path / "small", [6] * 10))
    bl = BlendedDataset([big, small], [0.5, 0.5], seed=1)
    assert bl.epoch_size == 40
    d, s = bl.locate(np.arange(80))
    assert (d[:40] == 1).sum() == 20 and (d[40:] == 1).sum() == 20
    # The small dataset is up-weighted: each of its epochs is a full permutation.
    small_draws = s[d == 1]
    for e in range(4):
        assert sorted(small_draws[10 * e: 10 * (e + 1)].tolist()) == list(range(10))
    # The big one is down-weighted: its first 30 draws (over two blend epochs) are all distinct.
    assert sorted(s[d == 0][:30].tolist()) == list(range(30))
    # Interleaved, not in blocks.
    assert set(d[:4].tolist()) == {0, 1}
    # Weights omitted = proportional to size (one pass over each per blend epoch).
    cat = BlendedDataset([big, small], seed=1)
    d2, s2 = cat.locate(np.arange(40))
    assert (d2 == 1).sum() == 10 and sorted(s2[d2 == 0].tolist()) == list(range(30))


def test_blend_refuses_different_tokenizers_or_image_sizes(tmp_path):
    a = MultimodalIndexedDataset(make_dataset(tmp_path / "a", [5] * 3))
    b = MultimodalIndexedDataset(make_dataset(tmp_path / "b", [5] * 3, tokenizer_sha="other"))
    c = MultimodalIndexedDataset(make_dataset(tmp_path / "c", [5] * 3, image_size=8))
    with pytest.raises(ValueError, match="different tokenizers"):
        BlendedDataset([a, b], seed=0)
    with pytest.raises(ValueError, match="--image-size"):
        BlendedDataset([a, c], seed=0)


def test_parse_data_path():
    assert parse_data_path(["p"]) == [(None, "p")]
    assert parse_data_path("0.3 a 0.7 b") == [(0.3, "a"), (0.7, "b")]
    assert parse_data_path(["a", "b"]) == [(None, "a"), (None, "b")]
    for bad in (["0.3", "a", "b"], [], ["-1", "a"], ["1", "2"]):
        with pytest.raises(ValueError):
            parse_data_path(bad)


def test_open_blend_from_data_path(tmp_path):
    a = make_dataset(tmp_path / "a", [5] * 4)
    b = make_dataset(tmp_path / "b", [5] * 4)
    bl = open_blend(parse_data_path(["1", a, "3", b]), seed=0)
    d, _ = bl.locate(np.arange(8))
    assert (d == 1).sum() == 6


def test_packed_rows_cover_every_sample_once_and_fit(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 30, size=50).tolist()
    ds = MultimodalIndexedDataset(make_dataset(tmp_path / "d", lengths))
    bl = BlendedDataset([ds], seed=2)
    K, S = 6, 64
    packer = PackedRows(bl, seq_length=S, num_image_tokens=K)
    plan0 = packer.plan(0)
    assert sorted(g for row in plan0 for g in row) == list(range(50))
    for row in plan0:
        assert bl.expanded_lengths(np.array(row), K).sum() <= S
    fill = sum(bl.expanded_lengths(np.array(r), K).sum() for r in plan0) / (len(plan0) * S)
    assert fill > 0.8 and len(plan0) < 50
    # rows(start) is a consistent stream across blend epochs (resume anywhere).
    head = list(itertools.islice(packer.rows(0), len(plan0) + 10))
    assert head[: len(plan0)] == plan0 and all(g >= 50 for row in head[len(plan0):] for g in row)
    fresh = PackedRows(bl, seq_length=S, num_image_tokens=K)
    assert list(itertools.islice(fresh.rows(len(plan0) - 3), 13)) == head[len(plan0) - 3:]
