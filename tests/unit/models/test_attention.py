"""The attention layouts against a brute-force reference written from SPEC §1.3, and the
core-attention module against an explicit softmax."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_croc.models.attention import attention, build_attention_layout
from megatron_croc.testing import synthetic_batch

T = 4  # visual tokens per image in these tests


def reference_mask(variant, segment_ids, visual_mask, loss_mask):
    """Loop over every (row, query, key), straight from the spec's wording."""
    bsz, seq = segment_ids.shape
    out = torch.zeros(bsz, seq, seq, dtype=torch.bool)
    for b in range(bsz):
        seg = segment_ids[b].tolist()
        vis = visual_mask[b].tolist()
        for q in range(seq):
            if seg[q] == 0:
                out[b, q, q] = True  # padding query: itself only
                continue
            same = [k for k in range(seq) if seg[k] == seg[q]]
            # which image a visual position belongs to: its contiguous run in the segment
            def image_of(p):
                if not vis[p]:
                    return None
                start = p
                while start - 1 >= 0 and vis[start - 1] and seg[start - 1] == seg[p]:
                    start -= 1
                return start
            supervised = [t for t in same if loss_mask[b, t] > 0]
            prefix_last = supervised[0] if supervised else max(same)
            for k in same:
                ok = k <= q
                if variant == "visual" and vis[q] and vis[k] and image_of(q) == image_of(k):
                    ok = True
                if variant == "prefix" and q <= prefix_last and k <= prefix_last:
                    ok = True
                out[b, q, k] = ok
    return out


LAYOUTS = {
    "one image, padding": [
        [dict(prompt=3, image=True, question=2, answer=4)],
        [dict(prompt=1, image=True, question=0, answer=2)],
    ],
    "packed, mixed rows": [
        [dict(prompt=2, image=True, question=1, answer=3), dict(prompt=1, image=True, question=2, answer=2)],
        [dict(prompt=4, image=False, question=0, answer=5), dict(prompt=0, image=True, question=1, answer=1)],
        [dict(prompt=2, image=False, question=3, answer=0)],
    ],
    "image first, no padding": [
        [dict(prompt=0, image=True, question=6, answer=10)],
    ],
}


@pytest.mark.parametrize("variant", ["causal", "visual", "prefix"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dense_mask_equals_brute_force(variant, name):
    batch = synthetic_batch(num_image_tokens=T, image_size=8, vocab_size=50, seq_length=20, rows=LAYOUTS[name])
    layout = build_attention_layout(
        variant, segment_ids=batch["segment_ids"], visual_mask=batch["visual_mask"], loss_mask=batch["loss_mask"]
    )
    expected = reference_mask(variant, batch["segment_ids"], batch["visual_mask"], batch["loss_mask"])
    assert torch.equal(layout.dense_mask()[:, 0], expected)


def test_variants_differ_where_the_spec_says():
    batch = synthetic_batch(num_image_tokens=T, image_size=8, vocab_size=50, seq_length=16,
                            rows=[[dict(prompt=2, image=True, question=2, answer=3)]])
    args = dict(segment_ids=batch["segment_ids"], visual_mask=batch["visual_mask"], loss_mask=batch["loss_mask"])
    causal = build_attention_layout("causal", **args).dense_mask()[0, 0]
    visual = build_attention_layout("visual", **args).dense_mask()[0, 0]
    prefix = build_attention_layout("prefix", **args).dense_mask()[0, 0]
    first_visual, last_visual = 2, 2 + T - 1
    assert not causal[first_visual, last_visual]
    assert visual[first_visual, last_visual]  # visual tokens see their whole image
    assert not visual[1, 2]  # text before the image stays causal
    assert not visual[first_visual, last_visual + 1]  # a visual query never sees later text
    assert prefix[0, last_visual + 1]  # the question is in the prefix
    answer_start = 2 + T + 2
    assert not prefix[answer_start, answer_start + 1]  # answers stay causal
    assert not prefix[0, answer_start]  # no prefix query sees an answer token


def test_padding_and_packed_samples_are_never_visible():
    batch = synthetic_batch(num_image_tokens=T, image_size=8, vocab_size=50, seq_length=24,
                            rows=LAYOUTS["packed, mixed rows"])
    for variant in ("causal", "visual", "prefix"):
        m = build_attention_layout(variant, segment_ids=batch["segment_ids"], visual_mask=batch["visual_mask"],
                                   loss_mask=batch["loss_mask"]).dense_mask()[:, 0]
        seg = batch["segment_ids"]
        cross = seg[:, :, None] != seg[:, None, :]
        pad_key = (seg == 0)[:, None, :].expand_as(m)
        real_query = (seg > 0)[:, :, None].expand_as(m)
        assert not (m & cross).any()
        assert not (m & pad_key & real_query).any()


def test_plain_causal_is_detected_only_without_padding_and_packing():
    full = torch.ones(2, 8, dtype=torch.int32)
    args = dict(visual_mask=torch.zeros(2, 8, dtype=torch.bool), loss_mask=torch.ones(2, 8))
    assert build_attention_layout("causal", segment_ids=full, **args).plain_causal
    padded = full.clone()
    padded[1, 6:] = 0
    assert not build_attention_layout("causal", segment_ids=padded, **args).plain_causal
    assert not build_attention_layout("visual", segment_ids=full, **args).plain_causal
    # a caller that knows it from the host copy says so; the tensors are then not read
    assert build_attention_layout("causal", segment_ids=full, one_sample_per_row=True, **args).plain_causal
    assert not build_attention_layout("causal", segment_ids=full, one_sample_per_row=False, **args).plain_causal


def _explicit_attention(q, k, v, mask, scale):
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("variant", ["causal", "visual", "prefix"])
def test_sdpa_backend_matches_explicit_softmax_with_gqa(variant):
    batch = synthetic_batch(num_image_tokens=T, image_size=8, vocab_size=50, seq_length=24,
                            rows=LAYOUTS["packed, mixed rows"])
    layout = build_attention_layout(variant, segment_ids=batch["segment_ids"], visual_mask=batch["visual_mask"],
                                    loss_mask=batch["loss_mask"])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 24, 8, generator=g, dtype=torch.float64)
    k = torch.randn(3, 2, 24, 8, generator=g, dtype=torch.float64)
    v = torch.randn(3, 2, 24, 8, generator=g, dtype=torch.float64)
    scale = 1 / math.sqrt(8)
    got = attention(q, k, v, layout, causal=True, scale=scale)
    want = _explicit_attention(q, k, v, layout.dense_mask(), scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bad_layout_inputs_are_refused():
    with pytest.raises(ValueError, match="must both be"):
        build_attention_layout("visual", segment_ids=torch.ones(2, 4), visual_mask=torch.zeros(2, 5, dtype=torch.bool),
                               loss_mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown attention variant"):
        build_attention_layout("diagonal", segment_ids=torch.ones(1, 4), visual_mask=torch.zeros(1, 4, dtype=torch.bool),
                               loss_mask=torch.zeros(1, 4))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose
@pytest.mark.parametrize("variant", ["visual", "prefix"])
def test_flex_block_mask_is_the_dense_mask(variant):
    """The FlexAttention path's block mask comes from the same rule as the dense mask; eager
    FlexAttention on the CPU (the GPU runs it compiled, tests/gpu) gives the same attention,
    over several 128-blocks including a partial one, packed rows and padding."""
    from torch.nn.attention.flex_attention import flex_attention

    rows = [
        [dict(prompt=30, image=True, question=20, answer=40), dict(prompt=5, image=True, question=9, answer=60)],
        [dict(prompt=3, image=False, question=0, answer=90), dict(prompt=10, image=True, question=4, answer=20)],
    ]
    batch = synthetic_batch(num_image_tokens=64, image_size=8, vocab_size=50, seq_length=300, rows=rows)
    layout = build_attention_layout(variant, segment_ids=batch["segment_ids"], visual_mask=batch["visual_mask"],
                                    loss_mask=batch["loss_mask"], backend="flex")
    assert layout.backend == "flex" and not layout.plain_causal
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 300, 16, generator=g)
    k = torch.randn(2, 2, 300, 16, generator=g)
    v = torch.randn(2, 2, 300, 16, generator=g)
    got = flex_attention(q, k, v, block_mask=layout.block_mask(), scale=0.25, enable_gqa=True)
    want = _explicit_attention(q.double(), k.double(), v.double(), layout.dense_mask(), 0.25)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
