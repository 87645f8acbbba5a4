"""Attention layouts (causal, Croc's mixed `visual`, the released code's `prefix`; packed or
not) and the core-attention module that runs them.

The layout of a micro-batch is described once, from the batch alone (``segment_ids``,
``visual_mask``, ``loss_mask``), by :func:`build_attention_layout`, and handed to every layer
as megatron-core's ``attention_mask`` argument (as :meth:`AttentionLayout.as_attention_mask`,
a tensor that carries it; see :class:`LayoutHandle`) — so every pipeline stage can build it
without communication, and the FlexAttention block mask is built once per micro-batch, not per
layer, nor again when activation recomputation reruns a layer's forward.

Visibility rule (SPEC §1.3), for a query q and key k of the same packed sample (segment):

- ``causal``: k <= q.
- ``visual``: k <= q, or q and k are visual positions of the same image (bidirectional
  within an image; text stays causal and sees whole images before it).
- ``prefix``: k <= q, or both q and k lie in the prompt prefix (every position up to and
  including the last one before the first supervised answer token).

No query attends to padding or to another packed sample. A padding query (segment 0) attends
to itself only, so its softmax is defined; its output carries no loss.

Backends: ``sdpa`` (torch SDPA with a dense boolean mask — exact, runs forward and backward on
the CPU) and ``flex`` (a FlexAttention block mask, compiled once per shape; the fast GPU path,
measured 0.8-1.0x causal flash attention on an H200). A plain causal layout without padding or
packing uses SDPA's ``is_causal`` (flash kernels on GPU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

AttentionVariant = Literal["causal", "visual", "prefix"]
Backend = Literal["sdpa", "flex"]


@dataclass(kw_only=True)
class AttentionLayout:
    """Which key each query may see, for one micro-batch. Shapes [B, S]."""

    variant: AttentionVariant
    segment_ids: torch.Tensor  # int, 0 = padding, 1.. = packed sample
    visual_span: torch.Tensor | None  # "visual" only: int, 0 = text/padding, else an image id in the row
    prefix_end: torch.Tensor | None  # "prefix" only: int, last prefix position of the query's segment
    backend: Backend
    plain_causal: bool  # causal, no padding, no packing: fused is_causal kernels apply
    _dense: Optional[torch.Tensor] = field(default=None, repr=False)
    _block_mask: object = field(default=None, repr=False)
    _handle: Optional["LayoutHandle"] = field(default=None, repr=False)

    def as_attention_mask(self) -> "LayoutHandle":
        """This layout as megatron-core's ``attention_mask`` argument (one handle per layout)."""
        if self._handle is None:
            self._handle = LayoutHandle.wrap(self)
        return self._handle

    def dense_mask(self) -> torch.Tensor:
        """Boolean [B, 1, S, S], True where the query may attend to the key."""
        if self._dense is None:
            self._dense = _dense_mask(self)[:, None]
        return self._dense

    def block_mask(self):
        if self._block_mask is None:
            self._block_mask = _build_block_mask(self)
        return self._block_mask


class LayoutHandle(torch.Tensor):
    """An :class:`AttentionLayout` in megatron-core's ``attention_mask`` slot: a zero-element
    tensor that carries the layout object.

    Why a tensor: megatron-core's activation recomputation (``tensor_parallel.checkpoint``,
    used by ``--recompute-granularity full`` for whole layers and by ``selective`` for core
    attention) passes ``attention_mask`` positionally through ``save_for_backward``, which takes
    tensors only, and hands the recomputed forward ``detach()``-ed copies of what it saved. The
    handle is saved like any tensor (zero bytes), and its ``detach()`` keeps the layout, so the
    recomputed forward sees the very same layout object — with its dense mask or FlexAttention
    block mask already built — and each micro-batch in flight in a pipeline schedule keeps its
    own layout until its backward. A module attribute or a global "current layout" could not do
    that: 1F1B runs later micro-batches' forwards before earlier ones' backwards.

    Every other operation on a handle gives a plain tensor; only :func:`layout_of` reads it.
    """

    attention_layout: AttentionLayout

    @staticmethod
    def wrap(layout: AttentionLayout, data: torch.Tensor | None = None) -> "LayoutHandle":
        if data is None:
            data = torch.empty(0, dtype=torch.bool, device=layout.segment_ids.device)
        handle = torch.Tensor._make_subclass(LayoutHandle, data)
        handle.attention_layout = layout
        return handle

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.detach:  # what recomputation does to its saved inputs
            return LayoutHandle.wrap(args[0].attention_layout, out)
        return out

    def __repr__(self) -> str:
        return f"LayoutHandle({self.attention_layout!r})"


def layout_of(attention_mask) -> AttentionLayout | None:
    """The layout that megatron-core handed a layer as ``attention_mask``: a
    :class:`LayoutHandle`, or None for layers whose mask type says it all."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, LayoutHandle):
        return attention_mask.attention_layout
    raise TypeError(
        "CrocCoreAttention expects attention_mask to be AttentionLayout.as_attention_mask() or None, "
        f"got {type(attention_mask).__name__}"
    )


def build_attention_layout(
    variant: AttentionVariant,
    *,
    segment_ids: torch.Tensor,
    visual_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    backend: Backend | None = None,
    one_sample_per_row: bool | None = None,
) -> AttentionLayout:
    """Describe the attention of a micro-batch from its layout tensors (all [B, S]).

    ``segment_ids`` number the samples of each row 1, 2, ... (0 = padding), as the data
    loader's collator does, so they never exceed S. ``loss_mask[t]`` marks that the token at
    t+1 is a supervised answer token (it is aligned with the labels), so a segment's prompt
    prefix ends at the first t with ``loss_mask[t]``. ``one_sample_per_row``: whether every
    position belongs to sample 1 (no packing, no padding), when the caller knows it from the
    host copy (training.step); otherwise the causal variant reads it back from the device.
    """
    if segment_ids.dim() != 2 or segment_ids.shape != visual_mask.shape:
        raise ValueError(
            f"segment_ids {tuple(segment_ids.shape)} and visual_mask {tuple(visual_mask.shape)} "
            "must both be [batch, seq]"
        )
    if variant not in ("causal", "visual", "prefix"):
        raise ValueError(f"unknown attention variant {variant!r}")
    device = segment_ids.device
    if backend is None:
        backend = "flex" if device.type == "cuda" else "sdpa"
    seg = segment_ids.long()
    # Each variant builds only what its rule reads (_allowed); this runs on every stage and
    # micro-batch.
    visual_span = _visual_spans(seg, visual_mask) if variant == "visual" else None
    prefix_end = _prefix_ends(seg, loss_mask) if variant == "prefix" else None
    if variant == "causal" and one_sample_per_row is None:
        one_sample_per_row = bool((seg == 1).all().item())  # a device sync on a GPU
    plain_causal = variant == "causal" and bool(one_sample_per_row)
    return AttentionLayout(
        variant=variant,
        segment_ids=seg,
        visual_span=visual_span,
        prefix_end=prefix_end,
        backend=backend,
        plain_causal=plain_causal,
    )


def _visual_spans(seg: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] int: 0 at text/padding, else an id unique per image in the row."""
    visual = visual_mask.bool() & (seg > 0)
    # An image span starts where a visual position follows a non-visual one or a new segment.
    prev_visual = F.pad(visual[:, :-1], (1, 0), value=False)
    prev_seg = F.pad(seg[:, :-1], (1, 0), value=-1)
    starts = visual & (~prev_visual | (prev_seg != seg))
    return torch.cumsum(starts.long(), dim=1) * visual.long()


def _prefix_ends(seg: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] int: the last prompt-prefix position of each query's segment."""
    bsz, seq = seg.shape
    device = seg.device
    positions = torch.arange(seq, device=device).expand(bsz, seq)
    # Per segment: the first supervised position t0 (prefix = positions <= t0); a segment
    # without supervision is all prefix. Segments are numbered per row, so index by (row, seg).
    # Segment ids are 0 (padding) .. at most seq: a bound known without reading the ids back
    # from the device (a sync per micro-batch); the [B, S + 1] scratch is tiny.
    num_segments = seq + 1
    flat = (torch.arange(bsz, device=device)[:, None] * num_segments + seg).reshape(-1)
    seg_end = torch.full((bsz * num_segments,), -1, dtype=torch.long, device=device)
    seg_end.scatter_reduce_(0, flat, positions.reshape(-1), reduce="amax")
    first_supervised = torch.where(loss_mask.bool(), positions, torch.full_like(positions, seq))
    t0 = torch.full((bsz * num_segments,), seq, dtype=torch.long, device=device)
    t0.scatter_reduce_(0, flat, first_supervised.reshape(-1), reduce="amin")
    return torch.minimum(t0, seg_end)[flat].reshape(bsz, seq)


def _allowed(layout: AttentionLayout, b, q, k):
    """The visibility rule, written once for both the dense and the FlexAttention masks.

    ``b``, ``q``, ``k`` are broadcastable index tensors.
    """
    seg, span, pend = layout.segment_ids, layout.visual_span, layout.prefix_end
    seg_q, seg_k = seg[b, q], seg[b, k]
    visible = k <= q
    if layout.variant == "visual":
        span_q = span[b, q]
        visible = visible | ((span_q > 0) & (span_q == span[b, k]))
    elif layout.variant == "prefix":
        pend_q = pend[b, q]
        visible = visible | ((q <= pend_q) & (k <= pend_q))
    same_sample = (seg_q == seg_k) & (seg_q > 0)
    padding_self = (seg_q == 0) & (q == k)
    return (same_sample & visible) | padding_self


def _dense_mask(layout: AttentionLayout) -> torch.Tensor:
    bsz, seq = layout.segment_ids.shape
    device = layout.segment_ids.device
    b = torch.arange(bsz, device=device)[:, None, None]
    q = torch.arange(seq, device=device)[None, :, None]
    k = torch.arange(seq, device=device)[None, None, :]
    return _allowed(layout, b, q, k)


def raise_recompile_limit(limit: int = 64) -> None:
    """Every (shape, variant, dtype, GQA) of the compiled FlexAttention functions is a graph of
    its own; past dynamo's default of 8 per function they would silently run eagerly (dense and
    slow). Called by the compiled functions below, and by benchmarks and tests that compile many."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    raise_recompile_limit()
    # Eager create_block_mask costs ~7 ms per call (more than a layer's attention);
    # compiled it is ~0.1-0.4 ms (measured on an H200, B8 S1024 to B4 S2048).
    return torch.compile(create_block_mask)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    raise_recompile_limit()
    return torch.compile(flex_attention, dynamic=False)


def _build_block_mask(layout: AttentionLayout):
    bsz, seq = layout.segment_ids.shape

    def mask_mod(b, h, q, k):
        return _allowed(layout, b, q, k)

    create = _compiled_create_block_mask() if layout.segment_ids.is_cuda else None
    if create is None:
        from torch.nn.attention.flex_attention import create_block_mask as create
    return create(mask_mod, bsz, None, seq, seq, device=layout.segment_ids.device)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: AttentionLayout | None,
    *,
    causal: bool,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention over [B, heads, S, D] tensors (grouped-query keys allowed).

    ``layout=None`` means no per-batch layout: causal or fully bidirectional per ``causal``.
    """
    gqa = query.shape[1] != key.shape[1]
    if layout is None or layout.plain_causal:
        return F.scaled_dot_product_attention(
            query, key, value, is_causal=causal if layout is None else True,
            scale=scale, dropout_p=dropout_p, enable_gqa=gqa,
        )
    if layout.backend == "flex":
        if dropout_p:
            raise ValueError("attention dropout is not supported with the FlexAttention backend")
        return _compiled_flex_attention()(
            query, key, value, block_mask=layout.block_mask(), scale=scale, enable_gqa=gqa
        )
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=layout.dense_mask(), scale=scale,
        dropout_p=dropout_p, enable_gqa=gqa,
    )


class CrocCoreAttention(MegatronModule):
    """megatron-core core attention (drop-in for DotProductAttention in a layer spec) that
    runs the micro-batch's :class:`AttentionLayout` with fused kernels.

    megatron-core calls it with query [sq, b, heads, d] and key/value [sk, b, groups, d]
    (this rank's heads) and expects [sq, b, heads * d]. ``attention_mask`` is the layout's
    :class:`LayoutHandle`, or None for layers whose mask type says it all (causal LLM without a
    layout, bidirectional ViT and VTR-head layers).
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism is not supported by CrocCoreAttention")
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError(
                "CrocCoreAttention takes packing through its AttentionLayout, not "
                "attention_bias/packed_seq_params"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        layout = layout_of(attention_mask)
        sq, bsz, heads, dim = query.shape
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = attention(
            q, k, v, layout,
            causal=mask_type == AttnMaskType.causal,
            scale=self.softmax_scale,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, bsz, heads * dim)
