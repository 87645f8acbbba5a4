"""The attention layouts against a brute-force reference written from SPEC §1.3, and the
core-attention module against an explicit softmax."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from megatron_croc.models.attention import attention, build_attention_layout, plan_split
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
    "packed, images touching": [  # one sample ends with its image, the next starts with one
        [dict(prompt=2, image=True, question=0, answer=0), dict(prompt=0, image=True, question=1, answer=2)],
        [dict(prompt=1, image=True, question=1, answer=1), dict(prompt=3, image=False, question=0, answer=0)],
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
    # the FlexAttention mask_mod is the same rule, element by element
    bsz, seq = batch["segment_ids"].shape
    assert torch.equal(create_mask(layout.mask_mod(), bsz, None, seq, seq, device="cpu")[:, 0], expected)


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
    flat = dict(visual_mask=torch.zeros(1, 6, dtype=torch.bool), loss_mask=torch.zeros(1, 6))
    with pytest.raises(ValueError, match="contiguous run"):  # sample 1 in two pieces: not one key range
        build_attention_layout("causal", segment_ids=torch.tensor([[1, 1, 2, 2, 1, 0]]), **flat)
    with pytest.raises(ValueError, match="unknown attention backend"):
        build_attention_layout("visual", segment_ids=torch.ones(1, 6), backend="triton", **flat)
    with pytest.raises(ValueError, match="flex_compile_mode"):
        build_attention_layout("visual", segment_ids=torch.ones(1, 6), flex_compile_mode="fast", **flat)
    with pytest.raises(ValueError, match="loss_mask"):
        build_attention_layout("visual", segment_ids=torch.ones(1, 6), visual_mask=flat["visual_mask"],
                               loss_mask=torch.zeros(1, 5))


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
    block_mask = layout.block_mask()  # create_block_mask runs eagerly on the CPU
    got = flex_attention(q, k, v, block_mask=block_mask, scale=0.25, enable_gqa=True)
    want = _explicit_attention(q.double(), k.double(), v.double(), layout.dense_mask(), 0.25)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    # the block-sparsity pattern is the dense mask's, block by block (partial last block included)
    bq, bk = block_mask.BLOCK_SIZE
    nq, nk = -(-300 // bq), -(-300 // bk)
    padded = torch.zeros(2, nq * bq, nk * bk, dtype=torch.bool)
    padded[:, :300, :300] = layout.dense_mask()[:, 0]
    expected = padded.view(2, nq, bq, nk, bk).any(dim=4).any(dim=2)
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), expected)


def test_the_mask_reads_only_query_indexed_tensors():
    """The rule is two loads per query row: a key index past the sequence is never gathered."""
    batch = synthetic_batch(num_image_tokens=T, image_size=8, vocab_size=50, seq_length=24,
                            rows=LAYOUTS["packed, mixed rows"])
    for variant in ("causal", "visual", "prefix"):
        layout = build_attention_layout(variant, segment_ids=batch["segment_ids"], visual_mask=batch["visual_mask"],
                                        loss_mask=batch["loss_mask"], backend="flex")
        b, q = torch.arange(3)[:, None, None], torch.arange(24)[None, :, None]
        far_keys = torch.tensor([10**6, -(10**6)])[None, None, :]
        assert not layout.mask_mod()(b, None, q, far_keys).any()
        assert layout.key_lo.dtype == layout.key_hi.dtype == torch.int32


# ---------------------------------------------------------------------------------------------
# the split route: causal SDPA over every row, then each image's rows against [0, image end]
# ---------------------------------------------------------------------------------------------

SPLIT_ROWS = {  # one sample per row, right padding, a row without an image
    "images end together": [
        [dict(prompt=3, image=True, question=2, answer=6)],
        [dict(prompt=3, image=True, question=0, answer=2)],
        [dict(prompt=5, image=False, question=0, answer=4)],
    ],
    "images end apart": [
        [dict(prompt=3, image=True, question=2, answer=6)],
        [dict(prompt=0, image=True, question=1, answer=12)],
        [dict(prompt=7, image=True, question=0, answer=1)],
    ],
}


def _fwd_bwd(fn, q, k, v, dout, real_rows):
    """Output and q/k/v gradients of sum(out * dout) over the real (non-padding) query rows."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    (out * dout * real_rows).sum().backward()
    return out.detach(), (q.grad, k.grad, v.grad)


@pytest.mark.parametrize("variant", ["visual", "causal"])
@pytest.mark.parametrize("name", list(SPLIT_ROWS))
def test_split_route_is_exact_on_real_queries(variant, name):
    """Against the explicit softmax with the dense mask (float64, grouped-query keys): the
    outputs of every non-padding query and the q/k/v gradients of a loss that ignores padding."""
    seq = 24
    batch = synthetic_batch(num_image_tokens=T, image_size=8, vocab_size=50, seq_length=seq, rows=SPLIT_ROWS[name])
    inputs = dict(segment_ids=batch["segment_ids"], visual_mask=batch["visual_mask"], loss_mask=batch["loss_mask"])
    split = build_attention_layout(variant, backend="split", **inputs)
    dense = build_attention_layout(variant, backend="sdpa", **inputs)
    assert split.backend == "split" and not split.plain_causal
    plan = plan_split(batch["segment_ids"], batch["visual_mask"])
    assert plan.why_not is None and (plan.num_images, plan.tokens_per_image) == (3 if "apart" in name else 2, T)
    assert plan.ends_aligned == ("together" in name)
    assert (split.split.key_mask is None) == (plan.ends_aligned or variant == "causal")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, seq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(3, 2, seq, 8, generator=g, dtype=torch.float64)
    v = torch.randn(3, 2, seq, 8, generator=g, dtype=torch.float64)
    dout = torch.randn(3, 4, seq, 8, generator=g, dtype=torch.float64)
    real_rows = (batch["segment_ids"] > 0)[:, None, :, None]
    assert not real_rows.all()  # padding is there, and ignored
    got, got_grads = _fwd_bwd(lambda q, k, v: attention(q, k, v, split, causal=True, scale=0.3),
                              q, k, v, dout, real_rows)
    want, want_grads = _fwd_bwd(lambda q, k, v: _explicit_attention(q, k, v, dense.dense_mask(), 0.3),
                                q, k, v, dout, real_rows)
    torch.testing.assert_close(got * real_rows, want * real_rows, rtol=1e-10, atol=1e-10)
    for g_split, g_ref in zip(got_grads, want_grads):
        torch.testing.assert_close(g_split, g_ref, rtol=1e-10, atol=1e-10)


def test_split_route_applies_only_where_it_is_exact():
    packed = synthetic_batch(num_image_tokens=T, image_size=8, vocab_size=50, seq_length=24,
                             rows=LAYOUTS["packed, mixed rows"])
    inputs = dict(segment_ids=packed["segment_ids"], visual_mask=packed["visual_mask"], loss_mask=packed["loss_mask"])
    assert "packed" in plan_split(packed["segment_ids"], packed["visual_mask"]).why_not
    # a packed micro-batch takes the automatic route (the dense mask on the CPU), still exact
    layout = build_attention_layout("visual", backend="split", **inputs)
    assert layout.backend == "sdpa" and layout.split is None
    with pytest.raises(ValueError, match="causal and visual variants"):
        build_attention_layout("prefix", backend="split", **inputs)
    single = synthetic_batch(num_image_tokens=T, image_size=8, vocab_size=50, seq_length=24,
                             rows=SPLIT_ROWS["images end apart"])
    inputs = dict(segment_ids=single["segment_ids"], visual_mask=single["visual_mask"], loss_mask=single["loss_mask"])
    plan = plan_split(single["segment_ids"], single["visual_mask"])
    with pytest.raises(ValueError, match="needs visual_index"):
        build_attention_layout("visual", backend="split", split_plan=plan, visual_index=torch.arange(5), **inputs)
    left_padded = single["segment_ids"].flip(1)
    assert "right padding" in plan_split(left_padded, single["visual_mask"].flip(1)).why_not
    uneven = single["visual_mask"].clone()
    uneven[0, 2] = True  # a longer first image
    assert "unequal" in plan_split(single["segment_ids"], uneven).why_not


def test_attention_backend_flag_reaches_the_training_step(megatron_world, monkeypatch):
    """--attention-backend split through the config and training.step's forward step: the
    layers run the split route on an unpacked micro-batch (auto's on a packed one) and the loss
    and gradients are those of the default route."""
    import typing

    from megatron_croc.config import CrocConfig, ModelConfig, model_preset
    from megatron_croc.models import attention as attention_module
    from megatron_croc.models.croc import CrocModel
    from megatron_croc.training import step
    from megatron_croc.training.arguments import build_parser

    assert set(typing.get_args(typing.get_type_hints(ModelConfig)["attention_backend"])) == \
        set(attention_module.BACKEND_CHOICES)
    assert build_parser().parse_args(["--attention-backend", "split"]).attention_backend == "split"
    layouts = []
    real_build = step.build_attention_layout
    monkeypatch.setattr(step, "build_attention_layout", lambda *a, **kw: layouts.append(real_build(*a, **kw))
                        or layouts[-1])
    base = model_preset("tiny", croc=CrocConfig(stage="croc", pool_size=64, assignment_lookahead=False))
    unpacked = [[dict(prompt=3, image=True, question=2, answer=5)], [dict(prompt=1, image=True, question=0, answer=4)]]
    packed = [[dict(prompt=1, image=True, question=0, answer=4), dict(prompt=2, image=False, question=1, answer=3)]]
    results = {}
    for backend in ("auto", "split"):
        config = base.replace(attention_backend=backend)
        torch.manual_seed(0)
        model = CrocModel(config)
        forward_step = step.make_forward_step(config, torch.device("cpu"), step.StepStats(), num_microbatches=1)
        losses = []
        for rows in (unpacked, packed):
            batch = synthetic_batch(num_image_tokens=config.vision.num_image_tokens,
                                    image_size=config.vision.image_size, vocab_size=config.language.vocab_size,
                                    seq_length=40, rows=rows)
            batch["image_sample_ids"] = batch.pop("image_keys")
            output, loss_func = forward_step(iter([batch]), model)
            total, _ = loss_func(output)
            total.backward()
            losses.append(total.detach())
        results[backend] = losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert [layout.backend for layout in layouts] == ["sdpa", "sdpa", "split", "sdpa"]
    (auto_losses, auto_grads), (split_losses, split_grads) = results["auto"], results["split"]
    torch.testing.assert_close(split_losses, auto_losses, rtol=1e-5, atol=1e-6)
    assert auto_grads.keys() == split_grads.keys() and len(auto_grads) > 10
    for name, grad in auto_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_flex_kernel_options_and_compile_mode_reach_the_kernel(monkeypatch):
    """The layout's kernel options go to every flex_attention call, compiled with its mode."""
    from megatron_croc.models import attention as attention_module

    calls = []

    def compiled(mode=None):
        return lambda q, k, v, **kw: calls.append((mode, kw["kernel_options"], kw["block_mask"])) or q

    monkeypatch.setattr(attention_module, "_compiled_flex_attention", compiled)
    batch = synthetic_batch(num_image_tokens=T, image_size=8, vocab_size=50, seq_length=20,
                            rows=LAYOUTS["one image, padding"])
    options = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}
    layout = build_attention_layout("visual", segment_ids=batch["segment_ids"], visual_mask=batch["visual_mask"],
                                    loss_mask=batch["loss_mask"], backend="flex", kernel_options=options,
                                    flex_compile_mode="max-autotune-no-cudagraphs")
    q = torch.zeros(2, 4, 20, 8)
    for _ in range(2):  # two layers: one block mask
        attention(q, q[:, :2], q[:, :2], layout, causal=True, scale=1.0)
    assert calls == [("max-autotune-no-cudagraphs", options, layout.block_mask())] * 2
