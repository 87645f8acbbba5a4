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

The rule as key ranges: for every variant the keys a query sees are one contiguous range, so a
layout holds, per query, the first and the last key it sees (``key_lo``, ``key_hi``, [B, S]),
computed once per micro-batch on the device without reading anything back to the host:
lo = the first position of the query's sample; hi = q for a text query (every query of
``causal``), the last position of the query's image for a visual query (``visual``),
max(q, prefix end) for ``prefix``; a padding query has lo = hi = q. Query q of row b sees key k
iff ``key_lo[b, q] <= k <= key_hi[b, q]``. The dense mask and the FlexAttention ``mask_mod``
both read only these query-indexed tensors (an earlier rule also gathered segment and image ids
at k, a load per score inside the FlexAttention kernel). It assumes what the data package's
collator guarantees: each sample is one contiguous run of positions, numbered 1, 2, ... along
its row; checked when the tensors are on the CPU (on a GPU the check would read back from the
device).

Routes (``AttentionLayout.backend``, chosen by ``build_attention_layout(backend=...)``, i.e.
``--attention-backend``):

- ``sdpa``: torch SDPA with the dense boolean mask. Exact, forward and backward on the CPU (the
  CPU default); on a GPU an arbitrary mask has no flash kernel (2.3x causal flash measured on
  an H200 at B4 S2048 H16/8).
- ``flex``: FlexAttention with a block mask from the ranges, built once per micro-batch
  (compiled ``create_block_mask``) and shared by every layer; optional ``kernel_options`` and a
  compile ``mode`` for its compiled kernels (bench/bench_attention.py sweeps them). The CUDA
  default.
- ``split``: for micro-batches with one sample per row (right padding allowed): SDPA
  ``is_causal`` (flash on a GPU) over every row, then the query rows of each image recomputed
  by a second SDPA against the keys [0, image end] of its row and written back out of place.
  Without a mask when every image of the micro-batch ends at the same position, with a
  key-length mask otherwise. What it needs to know is read from the host copy of the batch
  (:func:`plan_split`, called by training.step) so it never syncs; a packed micro-batch takes
  the ``auto`` route instead (``layout.backend`` says which one ran). Exact for every
  non-padding query; padding queries attend causally rather than to themselves only, which no
  real query sees (padding is on the right) and no loss reads. Covers ``causal`` (then one SDPA
  call) and ``visual``.
- ``auto``: ``flex`` on CUDA, ``sdpa`` elsewhere.

A causal layout without padding or packing uses SDPA's ``is_causal`` whatever the route.
bench/bench_attention.py times every route side by side and prints the fastest per shape.
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
Backend = Literal["sdpa", "flex", "split"]
BackendChoice = Literal["auto", "flex", "split", "sdpa"]
BACKEND_CHOICES: tuple[str, ...] = ("auto", "flex", "split", "sdpa")
# torch.compile modes for the FlexAttention kernels (None: torch.compile's default).
FLEX_COMPILE_MODES = (None, "default", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True, kw_only=True)
class SplitPlan:
    """What the ``split`` route needs to know about a micro-batch, read from its host copy by
    :func:`plan_split` (host numbers: the route then never reads the device back)."""

    why_not: str | None  # None: the route applies; else why it does not (packed rows, ...)
    num_images: int = 0
    tokens_per_image: int = 0
    key_length: int = 0  # keys [0, key_length) of a row hold every image's keys: the last image end + 1
    ends_aligned: bool = True  # every image ends at key_length - 1: its keys need no mask


@dataclass(kw_only=True)
class SplitRoute:
    """The ``split`` route of one micro-batch, on the device: which query rows are recomputed."""

    image_rows: torch.Tensor | None  # [N] long: the batch row of each image (None: no images)
    query_positions: torch.Tensor | None  # [N, T] long: its positions in the row
    key_length: int
    key_mask: torch.Tensor | None  # [N, 1, 1, key_length] bool, key <= image end; None when aligned


@dataclass(kw_only=True)
class AttentionLayout:
    """Which key each query may see, for one micro-batch, and the route that runs it."""

    variant: AttentionVariant
    segment_ids: torch.Tensor  # [B, S] long, 0 = padding, 1.. = packed sample
    key_lo: torch.Tensor  # [B, S] int32: the first key each query sees
    key_hi: torch.Tensor  # [B, S] int32: the last key each query sees
    backend: Backend
    plain_causal: bool  # causal, no padding, no packing: fused is_causal kernels apply
    split: SplitRoute | None = None  # backend "split" only
    kernel_options: dict | None = None  # FlexAttention kernel options (backend "flex")
    flex_compile_mode: str | None = None  # torch.compile mode of the FlexAttention kernels
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

    def mask_mod(self):
        """The rule as a FlexAttention ``mask_mod``: two loads per query row, none per key."""
        return _range_mask_mod(self.key_lo, self.key_hi)

    def block_mask(self):
        if self._block_mask is None:
            self._block_mask = _build_block_mask(self)
        return self._block_mask


def _dense_mask(layout: AttentionLayout) -> torch.Tensor:
    """[B, S, S] bool from the key ranges."""
    keys = torch.arange(layout.segment_ids.shape[1], device=layout.segment_ids.device)[None, None, :]
    return (keys >= layout.key_lo[:, :, None]) & (keys <= layout.key_hi[:, :, None])


def _range_mask_mod(key_lo: torch.Tensor, key_hi: torch.Tensor):
    # A closure over the two tensors only (not the layout), so compiled code captures just them.
    def mask_mod(b, h, q, k):
        return (k >= key_lo[b, q]) & (k <= key_hi[b, q])

    return mask_mod


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
    backend: BackendChoice | None = None,
    one_sample_per_row: bool | None = None,
    split_plan: SplitPlan | None = None,
    visual_index: torch.Tensor | None = None,
    kernel_options: dict | None = None,
    flex_compile_mode: str | None = None,
) -> AttentionLayout:
    """Describe the attention of a micro-batch from its layout tensors (all [B, S]).

    ``segment_ids`` number the samples of each row 1, 2, ... (0 = padding), as the data
    loader's collator does, so they never exceed S. ``loss_mask[t]`` marks that the token at
    t+1 is a supervised answer token (it is aligned with the labels), so a segment's prompt
    prefix ends at the first t with ``loss_mask[t]``. ``one_sample_per_row``: whether every
    position belongs to sample 1 (no packing, no padding), when the caller knows it from the
    host copy (training.step); otherwise the causal variant reads it back from the device.

    ``backend``: one of :data:`BACKEND_CHOICES` (None = ``auto``). The ``split`` route needs
    ``split_plan`` (:func:`plan_split` of the host copy) and ``visual_index`` (the flat indices
    of ``visual_mask``'s positions, on the device); both are derived here when the tensors are
    on the CPU. ``kernel_options`` and ``flex_compile_mode`` go to the FlexAttention kernels
    when the ``flex`` route runs.
    """
    if segment_ids.dim() != 2 or segment_ids.shape != visual_mask.shape:
        raise ValueError(
            f"segment_ids {tuple(segment_ids.shape)} and visual_mask {tuple(visual_mask.shape)} "
            "must both be [batch, seq]"
        )
    if loss_mask.shape != segment_ids.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must be [batch, seq] like segment_ids "
                         f"{tuple(segment_ids.shape)}")
    if variant not in ("causal", "visual", "prefix"):
        raise ValueError(f"unknown attention variant {variant!r}")
    if backend is not None and backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(BACKEND_CHOICES)}")
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise TypeError("kernel_options must be a dict of FlexAttention kernel options, got "
                        f"{type(kernel_options).__name__}")
    if flex_compile_mode not in FLEX_COMPILE_MODES:
        raise ValueError(f"flex_compile_mode must be one of {FLEX_COMPILE_MODES}, got {flex_compile_mode!r}")
    device = segment_ids.device
    seg = segment_ids.long()
    on_host = device.type == "cpu"
    if on_host:
        _check_segments(seg)
    automatic: Backend = "flex" if device.type == "cuda" else "sdpa"
    chosen: Backend = automatic if backend in (None, "auto") else backend
    split = None
    if chosen == "split":
        if variant == "prefix":
            raise ValueError("the split route covers the causal and visual variants; the prefix variant needs "
                             "--attention-backend flex, sdpa or auto")
        if split_plan is None:
            if not on_host:
                raise ValueError("the split route on a GPU needs split_plan=plan_split(host segment_ids, host "
                                 "visual_mask) and visual_index (reading the device tensors would sync the host)")
            split_plan = plan_split(seg, visual_mask)
        if split_plan.why_not is not None:
            chosen = automatic  # a packed micro-batch: the route does not apply
        else:
            if visual_index is None and on_host:
                visual_index = visual_mask.flatten().nonzero().squeeze(1)
            images = split_plan if variant == "visual" else SplitPlan(why_not=None)
            split = _split_route(images, visual_index, seq=seg.shape[1])
    key_lo, key_hi = _key_ranges(variant, seg, visual_mask, loss_mask)
    if variant == "causal" and one_sample_per_row is None:
        one_sample_per_row = bool((seg == 1).all().item())  # a device sync on a GPU
    return AttentionLayout(
        variant=variant,
        segment_ids=seg,
        key_lo=key_lo,
        key_hi=key_hi,
        backend=chosen,
        plain_causal=variant == "causal" and bool(one_sample_per_row),
        split=split,
        kernel_options=kernel_options,
        flex_compile_mode=flex_compile_mode,
    )


def _check_segments(seg: torch.Tensor) -> None:
    """Each sample one contiguous run, numbered 1, 2, ... along its row (read on the CPU only)."""
    if (seg < 0).any():
        raise ValueError("segment_ids must be >= 0 (0 = padding)")
    real = seg > 0
    run_start = real & (seg != F.pad(seg[:, :-1], (1, 0), value=0))
    before = F.pad(seg.cummax(dim=1).values[:, :-1], (1, 0), value=0)
    if (run_start & (seg <= before)).any():
        raise ValueError("segment_ids must number the samples of a row 1, 2, ... in order, each sample one "
                         "contiguous run of positions (as megatron_croc.data's collator packs them)")


def _key_ranges(variant: AttentionVariant, seg: torch.Tensor, visual_mask: torch.Tensor,
                loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_lo, key_hi), int32 [B, S]: the first and last key each query sees (module docstring)."""
    bsz, seq = seg.shape
    positions = torch.arange(seq, device=seg.device).expand(bsz, seq)
    real = seg > 0
    run_start = seg != F.pad(seg[:, :-1], (1, 0), value=-1)
    run_end = seg != F.pad(seg[:, 1:], (0, 1), value=-1)
    sample_start = torch.where(run_start, positions, 0).cummax(dim=1).values
    key_lo = torch.where(real, sample_start, positions)
    if variant == "causal":
        key_hi = positions
    elif variant == "visual":
        visual = visual_mask.bool() & real
        # An image is a run of visual positions within one sample.
        image_end_here = visual & (~F.pad(visual[:, 1:], (0, 1), value=False) | run_end)
        key_hi = torch.where(visual, _next_marked(image_end_here, positions), positions)
    else:  # prefix: the prefix ends at the sample's first supervised position, or at its end
        sample_end = _next_marked(run_end, positions)
        first_supervised = _next_marked(loss_mask.bool(), positions).gather(1, sample_start)
        prefix_end = torch.minimum(first_supervised, sample_end)
        key_hi = torch.where(real, torch.maximum(positions, prefix_end), positions)
    return key_lo.int(), key_hi.int()


def _next_marked(marks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, S]: the first marked position at or after each position (S where none)."""
    seq = marks.shape[1]
    candidates = torch.where(marks, positions, seq)
    return candidates.flip(1).cummin(dim=1).values.flip(1)


def plan_split(segment_ids: torch.Tensor, visual_mask: torch.Tensor) -> SplitPlan:
    """The ``split`` route's plan for a micro-batch, from its host copy ([B, S] CPU tensors).

    It applies to rows holding at most one sample each, padding only on the right, and images
    (runs of visual positions) all of the same length — the visual positions in row-major
    order are then ``num_images`` runs of ``tokens_per_image``, so the device copy of their flat
    indices (``visual_index``) tells each image's row and positions without a read-back.
    """
    if segment_ids.device.type != "cpu" or visual_mask.device.type != "cpu":
        raise ValueError("plan_split reads the host copy of the batch (reading device tensors would sync the host)")
    if segment_ids.dim() != 2 or segment_ids.shape != visual_mask.shape:
        raise ValueError(f"segment_ids {tuple(segment_ids.shape)} and visual_mask {tuple(visual_mask.shape)} "
                         "must both be [batch, seq]")
    seg = segment_ids.long()
    seq = seg.shape[1]
    if (seg > 1).any():
        return SplitPlan(why_not="packed rows (several samples in a row)")
    if (seg[:, 1:] > seg[:, :-1]).any():
        return SplitPlan(why_not="padding before a sample (only right padding keeps causal attention exact)")
    visual = visual_mask.bool()
    if (visual & (seg == 0)).any():
        return SplitPlan(why_not="visual positions in padding")
    starts = (visual & ~F.pad(visual[:, :-1], (1, 0), value=False)).flatten().nonzero().squeeze(1)
    ends = (visual & ~F.pad(visual[:, 1:], (0, 1), value=False)).flatten().nonzero().squeeze(1)
    if starts.numel() == 0:
        return SplitPlan(why_not=None)
    lengths = ends - starts + 1
    if (lengths != lengths[0]).any():
        return SplitPlan(why_not="images of unequal length")
    end_positions = ends % seq
    key_length = int(end_positions.max()) + 1
    return SplitPlan(why_not=None, num_images=starts.numel(), tokens_per_image=int(lengths[0]),
                     key_length=key_length, ends_aligned=bool((end_positions == key_length - 1).all()))


def _split_route(plan: SplitPlan, visual_index: torch.Tensor | None, *, seq: int) -> SplitRoute:
    if plan.num_images == 0:
        return SplitRoute(image_rows=None, query_positions=None, key_length=0, key_mask=None)
    expected = plan.num_images * plan.tokens_per_image
    if visual_index is None or visual_index.dim() != 1 or visual_index.numel() != expected:
        shape = None if visual_index is None else tuple(visual_index.shape)
        raise ValueError(f"the split route needs visual_index, the flat indices of the {expected} visual "
                         f"positions ({plan.num_images} images of {plan.tokens_per_image}); got {shape}")
    flat = visual_index.long().reshape(plan.num_images, plan.tokens_per_image)
    image_rows = flat[:, 0] // seq
    query_positions = flat - (image_rows * seq)[:, None]
    key_mask = None
    if not plan.ends_aligned:
        keys = torch.arange(plan.key_length, device=flat.device)
        key_mask = (keys[None, :] <= query_positions[:, -1:])[:, None, None, :]
    return SplitRoute(image_rows=image_rows, query_positions=query_positions, key_length=plan.key_length,
                      key_mask=key_mask)


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
def _compiled_flex_attention(mode: str | None = None):
    """flex_attention compiled, one function per torch.compile ``mode``."""
    from torch.nn.attention.flex_attention import flex_attention

    raise_recompile_limit()
    return torch.compile(flex_attention, dynamic=False, mode=mode)


def _build_block_mask(layout: AttentionLayout):
    bsz, seq = layout.segment_ids.shape
    create = _compiled_create_block_mask() if layout.segment_ids.is_cuda else None
    if create is None:
        from torch.nn.attention.flex_attention import create_block_mask as create
    return create(layout.mask_mod(), bsz, None, seq, seq, device=layout.segment_ids.device)


def _split_attention(query, key, value, route: SplitRoute, *, scale: float, dropout_p: float, gqa: bool):
    """Causal SDPA over every row, then each image's query rows against the keys [0, image end]
    of its row, written back out of place (autograd sees an index_put)."""
    causal = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                            dropout_p=dropout_p, enable_gqa=gqa)
    if route.image_rows is None:
        return causal
    rows, positions, length = route.image_rows, route.query_positions, route.key_length
    # [B, H, S, D] seen as [B, S, H, D]: index (row, position) pairs, [N, T, H, D] -> [N, H, T, D]
    image_queries = query.transpose(1, 2)[rows[:, None], positions].transpose(1, 2)
    image_keys, image_values = (t[:, :, :length].index_select(0, rows) for t in (key, value))
    image_gqa = gqa
    if route.key_mask is not None and gqa:
        # with a mask SDPA leaves flash; not every other kernel takes grouped keys
        repeat = query.shape[1] // key.shape[1]
        image_keys, image_values = (t.repeat_interleave(repeat, dim=1) for t in (image_keys, image_values))
        image_gqa = False
    image_out = F.scaled_dot_product_attention(image_queries, image_keys, image_values, attn_mask=route.key_mask,
                                               scale=scale, dropout_p=dropout_p, enable_gqa=image_gqa)
    merged = torch.index_put(causal.transpose(1, 2), (rows[:, None], positions), image_out.transpose(1, 2))
    return merged.transpose(1, 2)


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
        return _compiled_flex_attention(layout.flex_compile_mode)(
            query, key, value, block_mask=layout.block_mask(), scale=scale, enable_gqa=gqa,
            kernel_options=layout.kernel_options,
        )
    if layout.backend == "split":
        return _split_attention(query, key, value, layout.split, scale=scale, dropout_p=dropout_p, gqa=gqa)
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
