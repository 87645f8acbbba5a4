"""FlexAttention layouts on CUDA against the dense boolean mask (SPEC §1.3: exact), forward and
backward; the block mask built once per micro-batch and reused by every layer; a new
micro-batch of the same shape reuses the compiled kernels (no recompilation)."""

from __future__ import annotations

import pytest
import torch

from megatron_croc.models import attention as attention_module
from megatron_croc.models.attention import attention, build_attention_layout
from megatron_croc.testing import synthetic_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# ||x - ref|| / ||ref||: fp32 lands far under 1e-4 (TF32 would be near 3e-4), bf16 near 1e-2.
FP32_TOL = 5e-5
T = 32  # visual tokens per image
S = 256
HEADS, GROUPS, DIM = 4, 2, 64  # grouped-query attention, as in the LLM

# Packed rows (several samples, each with its own image), a text-only sample, an image at the
# very start, and padding at the end of every row.
ROWS = [
    [dict(prompt=5, image=True, question=3, answer=40), dict(prompt=2, image=True, question=0, answer=20)],
    [dict(prompt=0, image=True, question=10, answer=60)],
    [dict(prompt=7, image=False, question=5, answer=50), dict(prompt=3, image=True, question=2, answer=30)],
]
OTHER_ROWS = [  # a different micro-batch of the same shape
    [dict(prompt=20, image=True, question=1, answer=100)],
    [dict(prompt=1, image=True, question=1, answer=5), dict(prompt=1, image=True, question=1, answer=5),
     dict(prompt=1, image=True, question=1, answer=5)],
    [dict(prompt=3, image=False, question=0, answer=9)],
]


@pytest.fixture(autouse=True)
def _no_tf32(no_tf32):
    """fp32 means fp32 in every test here (conftest's no_tf32)."""


def _layout(variant, rows=ROWS, backend=None, seed=0):
    batch = synthetic_batch(num_image_tokens=T, image_size=1, vocab_size=100, seq_length=S, rows=rows, seed=seed)
    cuda = {k: batch[k].cuda() for k in ("segment_ids", "visual_mask", "loss_mask")}
    layout = build_attention_layout(variant, backend=backend, **cuda)
    return layout


def _qkv(dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def make(heads):  # [S, B, H, D] permuted, the strides CrocCoreAttention passes
        t = torch.randn(S, len(ROWS), heads, DIM, device="cuda", dtype=dtype, generator=g)
        return t.permute(1, 2, 0, 3).detach().requires_grad_(True)

    q, k, v = make(HEADS), make(GROUPS), make(GROUPS)
    dout = torch.randn(len(ROWS), HEADS, S, DIM, device="cuda", dtype=dtype, generator=g)
    return q, k, v, dout


def _run(fn, q, k, v, dout):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), tuple(t.grad.detach() for t in (q, k, v))


def _reference(q, k, v, dout, mask):
    """Explicit softmax in float64 with the dense boolean mask."""
    rep = HEADS // GROUPS
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    scores = q64 @ k64.repeat_interleave(rep, 1).transpose(-1, -2) * DIM**-0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    out = probs @ v64.repeat_interleave(rep, 1)
    out.backward(dout.double())
    return out.detach(), (q64.grad, k64.grad, v64.grad)


def _rel(a, b):
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _flex(layout):
    return lambda q, k, v: attention(q, k, v, layout, causal=True, scale=DIM**-0.5)


@pytest.mark.parametrize("variant", ["visual", "prefix", "causal"])
def test_flex_is_exact_against_the_dense_mask_fp32(variant):
    layout = _layout(variant)
    assert layout.backend == "flex" and not layout.plain_causal
    q, k, v, dout = _qkv(torch.float32)
    out, grads = _run(_flex(layout), q, k, v, dout)
    ref_out, ref_grads = _reference(q, k, v, dout, layout.dense_mask())
    assert _rel(out, ref_out) < FP32_TOL
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < FP32_TOL
    # and against SDPA with the same dense boolean mask, at the same precision
    dense = _layout(variant, backend="sdpa")
    sdpa_out, sdpa_grads = _run(_flex(dense), q, k, v, dout)
    assert _rel(out, sdpa_out) < FP32_TOL
    for g, r in zip(grads, sdpa_grads):
        assert _rel(g, r) < FP32_TOL


@pytest.mark.parametrize("variant", ["visual"])
def test_flex_bf16_is_close_to_the_fp64_reference(variant):
    layout = _layout(variant)
    q, k, v, dout = _qkv(torch.bfloat16, seed=1)
    out, grads = _run(_flex(layout), q, k, v, dout)
    ref_out, ref_grads = _reference(q, k, v, dout, layout.dense_mask())
    assert _rel(out, ref_out) < 2e-2
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 3e-2


def test_block_mask_is_built_once_per_layout_and_shared_by_every_layer(monkeypatch):
    calls = []
    real = attention_module._build_block_mask

    def counting(layout):
        calls.append(layout)
        return real(layout)

    monkeypatch.setattr(attention_module, "_build_block_mask", counting)
    layout = _layout("visual")
    q, k, v, dout = _qkv(torch.float32)
    for _ in range(3):  # three "layers"
        _run(_flex(layout), q, k, v, dout)
    assert len(calls) == 1
    block_mask = layout.block_mask()
    assert block_mask is layout.block_mask() and len(calls) == 1
    # the block-sparsity pattern is the dense mask's, block by block
    dense = layout.dense_mask()[:, 0]
    bq, bk = block_mask.BLOCK_SIZE
    nq, nk = -(-S // bq), -(-S // bk)
    padded = torch.zeros(len(ROWS), nq * bq, nk * bk, dtype=torch.bool, device="cuda")
    padded[:, :S, :S] = dense
    expected = padded.view(len(ROWS), nq, bq, nk, bk).any(dim=4).any(dim=2)
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), expected)


def test_a_new_micro_batch_of_the_same_shape_reuses_the_compiled_kernels():
    import torch._dynamo

    q, k, v, dout = _qkv(torch.float32, seed=2)
    _run(_flex(_layout("visual")), q, k, v, dout)  # compiled here (or earlier in this session)
    other = _layout("visual", rows=OTHER_ROWS, seed=3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out, grads = _run(_flex(other), q, k, v, dout)
    ref_out, ref_grads = _reference(q, k, v, dout, other.dense_mask())
    assert _rel(out, ref_out) < FP32_TOL
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < FP32_TOL


def test_plain_causal_without_layout_uses_sdpa_and_matches_the_reference():
    q, k, v, dout = _qkv(torch.float32, seed=4)
    out, grads = _run(lambda q, k, v: attention(q, k, v, None, causal=True, scale=DIM**-0.5), q, k, v, dout)
    mask = torch.ones(S, S, dtype=torch.bool, device="cuda").tril()
    ref_out, ref_grads = _reference(q, k, v, dout, mask)
    assert _rel(out, ref_out) < FP32_TOL
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < FP32_TOL


# ---------------------------------------------------------------------------------------------
# the split route (causal flash + each image's rows) and the host-sync budget of the layouts
# ---------------------------------------------------------------------------------------------

SPLIT_ROWS = {  # one sample per row, right padding, a row without an image
    "images end together": [
        [dict(prompt=9, image=True, question=4, answer=100)],
        [dict(prompt=9, image=True, question=0, answer=30)],
        [dict(prompt=40, image=False, question=0, answer=60)],
    ],
    "images end apart": [
        [dict(prompt=9, image=True, question=4, answer=100)],
        [dict(prompt=0, image=True, question=1, answer=150)],
        [dict(prompt=70, image=True, question=0, answer=10)],
    ],
}


def _routed(layout):
    return lambda q, k, v: attention(q, k, v, layout, causal=True, scale=DIM**-0.5)


def _split_inputs(rows, seed=0):
    from megatron_croc.models.attention import plan_split

    batch = synthetic_batch(num_image_tokens=T, image_size=1, vocab_size=100, seq_length=S, rows=rows, seed=seed)
    host = {k: batch[k] for k in ("segment_ids", "visual_mask", "loss_mask")}
    plan = plan_split(host["segment_ids"], host["visual_mask"])
    index = host["visual_mask"].flatten().nonzero().squeeze(1).cuda()
    return {k: v.cuda() for k, v in host.items()}, plan, index


@pytest.mark.parametrize("name", list(SPLIT_ROWS))
def test_split_route_is_exact_on_real_queries_fp32(name):
    """Non-padding outputs, and q/k/v gradients of a loss that ignores padding queries, against
    the float64 reference with the dense mask (padding queries attend causally on this route)."""
    cuda, plan, index = _split_inputs(SPLIT_ROWS[name])
    layout = build_attention_layout("visual", backend="split", split_plan=plan, visual_index=index, **cuda)
    assert layout.backend == "split" and (layout.split.key_mask is None) == ("together" in name)
    q, k, v, dout = _qkv(torch.float32, seed=5)
    real = (cuda["segment_ids"] > 0)[:, None, :, None]
    out, grads = _run(_routed(layout), q, k, v, dout * real)
    ref_out, ref_grads = _reference(q, k, v, dout * real, build_attention_layout("visual", backend="sdpa", **cuda)
                                    .dense_mask())
    assert _rel(out * real, ref_out * real) < FP32_TOL
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < FP32_TOL


def test_split_route_bf16_is_close_to_the_fp64_reference():
    cuda, plan, index = _split_inputs(SPLIT_ROWS["images end together"])
    layout = build_attention_layout("visual", backend="split", split_plan=plan, visual_index=index, **cuda)
    q, k, v, dout = _qkv(torch.bfloat16, seed=6)
    real = (cuda["segment_ids"] > 0)[:, None, :, None]
    out, grads = _run(_routed(layout), q, k, v, dout * real)
    ref_out, ref_grads = _reference(q, k, v, dout * real, build_attention_layout("visual", backend="sdpa", **cuda)
                                    .dense_mask())
    assert _rel(out * real, ref_out * real) < 2e-2
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 3e-2


def test_layouts_and_the_split_route_never_sync_the_host():
    """A micro-batch's layout (ranges, block mask, split route) and the split route's fwd+bwd
    queue work without the host waiting for the device."""
    q, k, v, dout = _qkv(torch.float32, seed=7)
    warm, plan, index = _split_inputs(SPLIT_ROWS["images end apart"])
    for variant in ("visual", "prefix"):  # compiles create_block_mask (outside the check)
        build_attention_layout(variant, **warm).block_mask()
    cuda, plan, index = _split_inputs(SPLIT_ROWS["images end apart"], seed=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for variant in ("visual", "prefix"):
            build_attention_layout(variant, **cuda).block_mask()
        split = build_attention_layout("visual", backend="split", split_plan=plan, visual_index=index, **cuda)
        _routed(split)(q, k, v).backward(dout)
    finally:
        torch.cuda.set_sync_debug_mode("default")
