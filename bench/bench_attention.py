"""Mixed attention versus causal attention, forward + backward, every route side by side.

    PYTHONPATH=$PWD python bench/bench_attention.py                 # on a GPU (bf16)
    PYTHONPATH=$PWD python bench/bench_attention.py --budget-s 600  # ... with the whole kernel sweep
    PYTHONPATH=$PWD python bench/bench_attention.py --device cpu --tiny

For each shape (B batch rows, S sequence, Hq query heads, Hkv key/value heads, D head dim; a
576-token image at offset 35 of every sample) it times, forward + backward, through the model's
``attention()`` (the routes are described in megatron_croc/models/attention.py):

- ``causal``: no layout = torch SDPA ``is_causal`` (flash on GPU) -- the baseline every other
  row is divided by;
- ``visual`` / ``flex ranges``: Croc's mixed mask, the ``auto`` route: FlexAttention with the
  block mask of the per-query key ranges on CUDA; SDPA with the dense mask on the CPU, where
  FlexAttention has no backward;
- ``visual`` / ``split``: SDPA ``is_causal`` over every row, then each image's rows against
  the keys up to the image's end (one sample per row);
- ``visual`` / ``sdpa dense mask`` (CUDA): the mask as a dense boolean ``attn_mask`` -- what an
  arbitrary mask costs without a block-sparse kernel, and the released code's route;
- ``prefix``: the released code's prefix-LM variant, ``auto`` route;
- ``packed visual``: several samples per row (each with its own image, documents masked from
  each other), ``auto`` route, compared with plain causal over the whole row.

Order: the rows above at B4 S2048 H16/8 (the step's shape) and B1 S8192 H32, then, on CUDA,
at those two shapes: ``flex per-element rule`` (the rule before key ranges, which gathered
segment and image ids at every key; kept here as the comparison) and a sweep of FlexAttention
kernel options and compile modes over the ``flex ranges`` route (:data:`KERNEL_SWEEP`: Hopper
tile sizes, warps, stages, TMA, ``max-autotune-no-cudagraphs``), then the other shapes. With
``--budget-s``, a row or shape starts only if its expected compile time still fits (the first
shape always runs); what does not fit is listed as skipped. A configuration that does not
compile or run is a failed row (listed with its error), not a crash.

Every row also reports the layout build time (``build_attention_layout`` + the compiled
``create_block_mask`` or the dense mask, once per micro-batch; median over fresh layouts), the
time of its first call (compilation), and the max abs error of the output and of the q/k/v
gradients against a dense fp32 reference (SDPA on fp32 copies with the dense boolean mask).
The split route's host part, :func:`plan_split` on the host copy, is timed on its own line; on
CUDA the host syncs of building a layout and running the split route are counted (expected 0).
After the table: the fastest route for the visual variant per shape (one sample per row).

Timing: warm-up calls first (compiles), then CUDA events around each fwd+bwd, median of N.
Prints a table between ``=== attention table`` markers and a ``BENCH_ATTENTION_JSON`` line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    BenchInterrupted, device_name, emit_json, host_syncs, median, stop_on_sigterm, synchronize, time_ms,
)


def layout_inputs(*, batch: int, seq: int, docs_per_row: int, num_visual: int, offset: int,
                  device: torch.device, seed: int = 0, pad: int = 0) -> dict[str, torch.Tensor]:
    """segment_ids / visual_mask / loss_mask [B, S] on ``device`` for rows of ``docs_per_row``
    samples of equal length (the last ``pad`` positions of every row padding), each ``offset``
    text tokens, one image of ``num_visual`` tokens, a short question and a supervised answer."""
    from megatron_croc.testing import synthetic_batch

    doc_len = (seq - pad) // docs_per_row
    question = min(12, max(0, doc_len - offset - num_visual - 1) // 4)
    answer = doc_len - offset - num_visual - question
    if answer < 1:
        raise ValueError(f"a sample of {doc_len} tokens cannot hold {offset}+{num_visual} prompt/visual tokens")
    rows = [[dict(prompt=offset, image=True, question=question, answer=answer)] * docs_per_row] * batch
    b = synthetic_batch(num_image_tokens=num_visual, image_size=1, vocab_size=1000, seq_length=seq,
                        rows=rows, seed=seed)
    return {k: b[k].to(device) for k in ("segment_ids", "visual_mask", "loss_mask")}


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    packed_docs: int = 0  # >1: also time rows packed with this many samples each
    prefix: bool = True  # also time the prefix variant (one more compile per shape)
    sweep: bool = False  # the optional rows: per-element rule, kernel-option sweep (CUDA)

    @property
    def label(self) -> str:
        gqa = f"/{self.kv_heads}" if self.kv_heads != self.heads else ""
        return f"B{self.batch} S{self.seq} H{self.heads}{gqa} D{self.head_dim}"


GPU_SHAPES = [  # most informative first: a time budget drops the tail
    # bench_step's LLM shape (GQA): its compiled kernels are then cached for bench_step
    Shape(4, 2048, 16, 8, 128, prefix=True, sweep=True),
    Shape(1, 8192, 32, 32, 128, packed_docs=8, prefix=False, sweep=True),
    Shape(8, 1024, 32, 32, 128, prefix=False),
    Shape(2, 4096, 32, 32, 128, packed_docs=4, prefix=False),
]
TINY_SHAPES = [
    Shape(2, 128, 4, 2, 32),
    Shape(1, 256, 4, 4, 32, packed_docs=2, prefix=False),
]


@dataclass(frozen=True)
class KernelConfig:
    """One row of the sweep: FlexAttention ``kernel_options`` and/or a torch.compile mode, and
    the compile time to expect (a row starts only if it fits the remaining budget)."""

    name: str
    kernel_options: dict | None = None
    compile_mode: str | None = None
    expected_s: float = 15.0


# Priority order. The Hopper (sm90) defaults of torch 2.11 for bf16 D128 are fwd BLOCK_M/N
# 128/64, 8 warps, 3 stages; bwd BLOCK_M1/N1/M2/N2 64/128/128/64, 8 warps, 3 stages.
# Left out on purpose: ROWS_GUARANTEED_SAFE and BLOCKS_ARE_CONTIGUOUS. The first needs every
# query row to see a key in the first tile the kernel visits, which padding queries (they see
# only themselves) and queries of a second packed sample do not (NaN rows); the second needs
# each query block's partial (and full) key blocks to be consecutive, which a sample starting
# inside a block breaks. PRESCALE_QK trades accuracy for speed.
KERNEL_SWEEP = [
    KernelConfig("fwd 128x128 w8 s2", {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8,
                                        "fwd_num_stages": 2}),
    KernelConfig("fwd 64x64 w4 s3", {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}),
    KernelConfig("fwd 128x64 w4 s3", {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4,
                                       "fwd_num_stages": 3}),
    KernelConfig("bwd 64x64 w4 s3", {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                                      "bwd_BLOCK_N2": 64, "bwd_num_warps": 4, "bwd_num_stages": 3}),
    KernelConfig("bwd 64x128 w8 s2", {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                       "bwd_BLOCK_N2": 64, "bwd_num_warps": 8, "bwd_num_stages": 2}),
    KernelConfig("TMA", {"USE_TMA": True}),
    # autotunes every candidate tile config of the forward and the backward: minutes, unmeasured
    KernelConfig("max-autotune-no-cudagraphs", None, "max-autotune-no-cudagraphs", expected_s=180.0),
]
PER_ELEMENT_EXPECTED_S = 20.0  # its own compiled create_block_mask and flex kernels
MAIN_EXPECTED_S = 15.0  # a shape's main rows after the first shape (flex compiles for a new shape)

FLEX_RANGES = "flex ranges"
SPLIT = "split"
SDPA_DENSE = "sdpa dense mask"
PER_ELEMENT = "flex per-element rule"


@dataclass
class Row:
    shape: str
    case: str
    kernel: str
    fwd_bwd_ms: float
    vs_causal: float
    build_ms: float
    first_call_s: float
    max_err_out: float
    max_err_grad: float


@dataclass
class FailedRow:
    shape: str
    case: str
    kernel: str
    error: str


def _reference(q, k, v, dout, mask, scale):
    """Dense fp32 reference: output and q/k/v grads (GQA expanded explicitly)."""
    rep = q.shape[1] // k.shape[1]
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    kk, vv = (t.repeat_interleave(rep, dim=1) if rep > 1 else t for t in (k32, v32))
    out = F.scaled_dot_product_attention(q32, kk, vv, attn_mask=mask, scale=scale)
    out.backward(dout.float())
    return out.detach(), (q32.grad, k32.grad, v32.grad)


def _errors(out, grads, ref_out, ref_grads) -> tuple[float, float]:
    err_out = (out.float() - ref_out).abs().max().item()
    err_grad = max((g.float() - r).abs().max().item() for g, r in zip(grads, ref_grads))
    return err_out, err_grad


def per_element_mask_mod(segment_ids: torch.Tensor, visual_mask: torch.Tensor):
    """The visual rule as it was before key ranges, for comparison: segment and image ids
    gathered at the query and at every key (``_allowed`` in the old models/attention.py)."""
    seg = segment_ids.long()
    visual = visual_mask.bool() & (seg > 0)
    prev_visual = F.pad(visual[:, :-1], (1, 0), value=False)
    prev_seg = F.pad(seg[:, :-1], (1, 0), value=-1)
    image_id = torch.cumsum((visual & (~prev_visual | (prev_seg != seg))).long(), dim=1) * visual.long()

    def mask_mod(b, h, q, k):
        seg_q, image_q = seg[b, q], image_id[b, q]
        visible = (k <= q) | ((image_q > 0) & (image_q == image_id[b, k]))
        return ((seg_q == seg[b, k]) & (seg_q > 0) & visible) | ((seg_q == 0) & (q == k))

    return mask_mod


@dataclass
class ShapeRun:
    """What the rows of one shape share: inputs, the causal baseline, fp32 references."""

    shape: Shape
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    scale: float
    base_ms: float = float("nan")
    references: dict = field(default_factory=dict)  # (variant, docs) -> (mask, ref_out, ref_grads)


class Bench:
    def __init__(self, *, device, dtype, backend, num_visual, offset, warmup, iters, builds):
        from megatron_croc.models.attention import attention, build_attention_layout, plan_split

        self.attention, self.build_attention_layout, self.plan_split = attention, build_attention_layout, plan_split
        self.device, self.dtype, self.backend = device, dtype, backend
        self.num_visual, self.offset = num_visual, offset
        self.warmup, self.iters, self.builds = warmup, iters, builds
        self.syncs: dict[str, dict] = {}
        self.plan_ms: dict[str, float] = {}

    # -- inputs ----------------------------------------------------------------------------

    def start(self, shape: Shape) -> ShapeRun:
        g = torch.Generator(device=self.device).manual_seed(0)

        def make(heads):
            # [S, B, H, D] permuted to [B, H, S, D]: the strides CrocCoreAttention hands over
            t = torch.randn(shape.seq, shape.batch, heads, shape.head_dim, device=self.device, dtype=self.dtype,
                            generator=g)
            return t.permute(1, 2, 0, 3).detach().requires_grad_(True)

        q, k, v = make(shape.heads), make(shape.kv_heads), make(shape.kv_heads)
        dout = torch.randn(shape.batch, shape.heads, shape.seq, shape.head_dim, device=self.device, dtype=self.dtype,
                           generator=g)
        return ShapeRun(shape=shape, q=q, k=k, v=v, dout=dout, scale=shape.head_dim ** -0.5)

    def inputs(self, shape: Shape, variant: str, docs: int, seed: int = 0) -> dict[str, torch.Tensor]:
        if variant == "causal":
            seg = torch.ones(shape.batch, shape.seq, dtype=torch.int32, device=self.device)
            zeros = torch.zeros_like(seg, dtype=torch.bool)
            return dict(segment_ids=seg, visual_mask=zeros, loss_mask=zeros.float())
        return layout_inputs(batch=shape.batch, seq=shape.seq, docs_per_row=docs, num_visual=self.num_visual,
                             offset=self.offset, device=self.device, seed=seed)

    def layout(self, shape: Shape, variant: str, docs: int, backend, seed: int = 0, **options):
        """A micro-batch's layout built as the training step builds it: the split route's plan
        from the host copy, the visual positions already on the device."""
        inputs = self.inputs(shape, variant, docs, seed)
        if backend == "split":
            host = {k: v.cpu() for k, v in inputs.items()}
            options.update(split_plan=self.plan_split(host["segment_ids"], host["visual_mask"]),
                           visual_index=host["visual_mask"].flatten().nonzero().squeeze(1).to(self.device))
        return self.build_attention_layout(variant, backend=backend, **inputs, **options)

    def build_ms(self, shape: Shape, variant: str, docs: int, backend, **options) -> float:
        """Median time of building a micro-batch's layout (+ its block mask or dense mask) from its
        tensors already on the device, as the training step does (host facts precomputed)."""
        inputs = self.inputs(shape, variant, docs, seed=1)
        if backend == "split":
            host = {k: v.cpu() for k, v in inputs.items()}
            options.update(split_plan=self.plan_split(host["segment_ids"], host["visual_mask"]),
                           visual_index=host["visual_mask"].flatten().nonzero().squeeze(1).to(self.device))

        def build():
            layout = self.build_attention_layout(variant, backend=backend, **inputs, **options)
            if layout.backend == "flex":
                layout.block_mask()
            elif layout.backend == "sdpa" and not layout.plain_causal:
                layout.dense_mask()
        return median(time_ms(build, device=self.device, warmup=1, iters=self.builds))

    def reference(self, run: ShapeRun, variant: str, docs: int):
        key = (variant, docs)
        if key not in run.references:
            mask = self.layout(run.shape, variant, docs, backend="sdpa").dense_mask()
            run.references[key] = _reference(run.q, run.k, run.v, run.dout, mask, run.scale)
            del mask
        return run.references[key]

    # -- one row ---------------------------------------------------------------------------

    def time_case(self, run: ShapeRun, fn: Callable, variant: str, docs: int):
        """First call (compile) time, median fwd+bwd ms, and errors against the fp32 reference."""
        q, k, v, dout = run.q, run.k, run.v, run.dout

        def step():
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v).backward(dout)

        t0 = time.perf_counter()
        step()
        synchronize(self.device)
        first = time.perf_counter() - t0
        out = fn(q, k, v)
        for t in (q, k, v):
            t.grad = None
        out.backward(dout)
        grads = tuple(t.grad.detach().clone() for t in (q, k, v))
        ref_out, ref_grads = self.reference(run, variant, docs)
        err = _errors(out.detach(), grads, ref_out, ref_grads)
        del out, grads
        ms = median(time_ms(step, device=self.device, warmup=self.warmup, iters=self.iters))
        return first, ms, err

    def layout_row(self, run: ShapeRun, case: str, variant: str, docs: int, backend, kernel: str | None = None,
                   **options) -> Row:
        """A row through ``attention()`` with a layout of ``backend`` (its first build, which
        compiles ``create_block_mask`` on CUDA, counted in the first call)."""
        t0 = time.perf_counter()
        layout = self.layout(run.shape, variant, docs, backend, **options)
        if layout.backend == "flex":
            layout.block_mask()
        synchronize(self.device)
        first_build = time.perf_counter() - t0
        scale = run.scale
        first, ms, err = self.time_case(
            run, lambda q, k, v: self.attention(q, k, v, layout, causal=True, scale=scale), variant, docs)
        kernel = kernel or {"flex": FLEX_RANGES, "split": SPLIT, "sdpa": SDPA_DENSE}[layout.backend]
        return Row(run.shape.label, case, kernel, ms, ms / run.base_ms,
                   self.build_ms(run.shape, variant, docs, backend, **options), first + first_build, *err)

    # -- the rows of a shape ---------------------------------------------------------------

    def main_rows(self, run: ShapeRun) -> list[Row]:
        shape, scale = run.shape, run.scale
        first, base_ms, err = self.time_case(
            run, lambda q, k, v: self.attention(q, k, v, None, causal=True, scale=scale), "causal", 1)
        run.base_ms = base_ms
        kernel = "sdpa is_causal" + (" (flash)" if self.device.type == "cuda" else "")
        rows = [Row(shape.label, "causal", kernel, base_ms, 1.0, float("nan"), first, *err)]
        rows.append(self.layout_row(run, "visual", "visual", 1, self.backend))
        rows.append(self.layout_row(run, "visual", "visual", 1, "split"))
        if shape.prefix:
            rows.append(self.layout_row(run, "prefix", "prefix", 1, self.backend))
        if shape.packed_docs > 1:
            rows.append(self.layout_row(run, f"packed visual ({shape.packed_docs}/row)", "visual", shape.packed_docs,
                                        self.backend))
        if self.device.type == "cuda" and rows[1].kernel != SDPA_DENSE:
            rows.append(self.layout_row(run, "visual", "visual", 1, "sdpa"))
        self._host_facts(run)
        return rows

    def _host_facts(self, run: ShapeRun) -> None:
        """plan_split's host time; on CUDA the host syncs of layout builds and the split route."""
        shape = run.shape
        host = {k: v.cpu() for k, v in self.inputs(shape, "visual", 1).items()}
        t0 = time.perf_counter()
        for _ in range(20):
            self.plan_split(host["segment_ids"], host["visual_mask"])
        self.plan_ms[shape.label] = (time.perf_counter() - t0) / 20 * 1e3
        if self.device.type != "cuda":
            return

        # the input tensors are made (and copied to the host) outside the counted region
        inputs = self.inputs(shape, "visual", 1)
        host = {k: v.cpu() for k, v in inputs.items()}
        plan = self.plan_split(host["segment_ids"], host["visual_mask"])
        index = host["visual_mask"].flatten().nonzero().squeeze(1).to(self.device)
        synchronize(self.device)

        def counted():
            split = self.build_attention_layout("visual", backend="split", split_plan=plan, visual_index=index,
                                                **inputs)
            self.build_attention_layout("visual", backend="flex", **inputs).block_mask()
            self.attention(run.q, run.k, run.v, split, causal=True, scale=run.scale).backward(run.dout)

        self.syncs[shape.label] = host_syncs(counted, self.device)

    def optional_rows(self, run: ShapeRun, out_of_time: Callable[[float], bool]):
        """The per-element rule and the kernel sweep, one row at a time, each only if its
        expected compile time fits the budget. Yields a Row, a FailedRow, or a str (a skipped
        row's name)."""
        shape = run.shape
        jobs = [(PER_ELEMENT, PER_ELEMENT_EXPECTED_S, self._per_element_row)]
        jobs += [(f"{FLEX_RANGES} [{c.name}]", c.expected_s, lambda run, c=c: self._sweep_row(run, c))
                 for c in KERNEL_SWEEP]
        for name, expected_s, job in jobs:
            if out_of_time(expected_s):
                yield f"{shape.label} {name}"
                continue
            try:
                result = job(run)
            except BenchInterrupted:
                raise
            except Exception as err:  # a config that does not compile or run: a failed row
                result = FailedRow(shape.label, "visual", name, f"{type(err).__name__}: {str(err)[:300]}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            yield result

    def _sweep_row(self, run: ShapeRun, config: KernelConfig) -> Row:
        return self.layout_row(run, "visual", "visual", 1, "flex", kernel=f"{FLEX_RANGES} [{config.name}]",
                               kernel_options=config.kernel_options, flex_compile_mode=config.compile_mode)

    def _per_element_row(self, run: ShapeRun) -> Row:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        shape, scale = run.shape, run.scale
        compiled_create = torch.compile(create_block_mask)
        compiled_flex = torch.compile(flex_attention, dynamic=False)
        gqa = shape.heads != shape.kv_heads

        def block_mask(inputs):
            return compiled_create(per_element_mask_mod(inputs["segment_ids"], inputs["visual_mask"]), shape.batch,
                                   None, shape.seq, shape.seq, device=self.device)

        timed_inputs, fresh_inputs = self.inputs(shape, "visual", 1, seed=0), self.inputs(shape, "visual", 1, seed=1)
        synchronize(self.device)
        t0 = time.perf_counter()
        mask = block_mask(timed_inputs)
        synchronize(self.device)
        first_build = time.perf_counter() - t0
        first, ms, err = self.time_case(
            run, lambda q, k, v: compiled_flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa), "visual", 1)
        build = median(time_ms(lambda: block_mask(fresh_inputs), device=self.device, warmup=1, iters=self.builds))
        return Row(shape.label, "visual", PER_ELEMENT, ms, ms / run.base_ms, build, first + first_build, *err)


def fastest_routes(rows: list[Row]) -> list[str]:
    """Per shape, the visual-variant rows (one sample per row) from fastest to slowest."""
    lines = []
    for label in dict.fromkeys(r.shape for r in rows):
        visual = sorted((r for r in rows if r.shape == label and r.case == "visual"), key=lambda r: r.fwd_bwd_ms)
        if visual:
            best, rest = visual[0], visual[1:]
            others = ", ".join(f"{r.kernel} {r.vs_causal:.2f}x" for r in rest)
            lines.append(f"fastest visual route at {label}: {best.kernel} {best.vs_causal:.2f}x causal"
                         + (f" (then {others})" if others else ""))
    return lines


def format_table(rows: list[Row], failed: Sequence[FailedRow] = ()) -> str:
    head = f"{'shape':<22} {'case':<22} {'kernel':<44} {'fwd+bwd ms':>10} {'x causal':>8} " \
           f"{'build ms':>8} {'1st call s':>10} {'max|dOut|':>9} {'max|dGrad|':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        build = "-" if math.isnan(r.build_ms) else f"{r.build_ms:.3f}"
        lines.append(
            f"{r.shape:<22} {r.case:<22} {r.kernel:<44} {r.fwd_bwd_ms:>10.3f} {r.vs_causal:>8.2f} "
            f"{build:>8} {r.first_call_s:>10.2f} {r.max_err_out:>9.2e} {r.max_err_grad:>10.2e}"
        )
    for f in failed:
        lines.append(f"{f.shape:<22} {f.case:<22} {f.kernel:<44} FAILED: {f.error}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy shapes (CPU smoke run)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--backend", choices=["auto", "flex", "sdpa"], default="auto",
                   help="route of the visual/prefix/packed rows: auto = flex on CUDA, sdpa (dense mask) on CPU "
                        "(the split route and, on CUDA, the dense mask always get rows of their own)")
    p.add_argument("--shapes", nargs="*", default=None,
                   help="custom shapes BxSxHqxHkvxD[xDOCS], e.g. 8x1024x32x32x128 1x8192x32x32x128x8 "
                        "(the optional rows at the first two)")
    p.add_argument("--no-sweep", action="store_true",
                   help="skip the optional CUDA rows (per-element rule, kernel-option sweep)")
    p.add_argument("--visual-tokens", type=int, default=None, help="visual tokens per image (576; tiny: 16)")
    p.add_argument("--offset", type=int, default=None, help="text tokens before the image (35; tiny: 5)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--builds", type=int, default=None, help="fresh layouts timed for the build column")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="skip the remaining rows and shapes once this many seconds have passed")
    p.add_argument("--json-out", default=None, help="also write the JSON result here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible; use --device cpu --tiny")
    tiny = args.tiny
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    backend = None if args.backend == "auto" else args.backend
    if backend == "flex" and device.type == "cpu":
        raise SystemExit("error: FlexAttention has no backward on the CPU; use --backend sdpa")
    effective_backend = backend or ("flex" if device.type == "cuda" else "sdpa")
    if args.shapes:
        shapes = []
        for i, spec in enumerate(args.shapes):
            parts = [int(x) for x in spec.lower().split("x")]
            if len(parts) not in (5, 6):
                raise SystemExit(f"error: shape {spec!r} is not BxSxHqxHkvxD[xDOCS]")
            shapes.append(Shape(*parts[:5], packed_docs=parts[5] if len(parts) > 5 else 0, sweep=i < 2))
    else:
        shapes = TINY_SHAPES if tiny else GPU_SHAPES
    sweep = device.type == "cuda" and not args.no_sweep  # FlexAttention has no backward on the CPU
    num_visual = args.visual_tokens or (16 if tiny else 576)
    offset = args.offset if args.offset is not None else (5 if tiny else 35)
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    iters = args.iters if args.iters is not None else (2 if tiny else 20)
    builds = args.builds if args.builds is not None else (2 if tiny else 5)
    from megatron_croc.models.attention import raise_recompile_limit

    raise_recompile_limit()

    print(f"bench_attention on {device_name(device)}; torch {torch.__version__}; {args.dtype}; "
          f"layout backend {effective_backend}; image of {num_visual} tokens at offset {offset}; "
          f"median of {iters} fwd+bwd after {warmup} warm-up", flush=True)
    bench = Bench(device=device, dtype=dtype, backend=backend, num_visual=num_visual, offset=offset,
                  warmup=warmup, iters=iters, builds=builds)
    rows: list[Row] = []
    failed: list[FailedRow] = []
    skipped: list[str] = []
    interrupted = None
    runs: dict[str, ShapeRun] = {}

    def out_of_time(need_s: float = 0.0) -> bool:
        return interrupted is not None or time.perf_counter() - start + need_s > args.budget_s

    # main rows of the swept shapes, their optional rows, then the main rows of the others
    tasks = [("main", s) for s in shapes if s.sweep] + [("sweep", s) for s in shapes if s.sweep and sweep] \
        + [("main", s) for s in shapes if not s.sweep]
    stop_on_sigterm()
    for kind, shape in tasks:
        if kind == "sweep" and shape.label not in runs:
            continue  # its main rows were skipped
        if (rows or skipped) and out_of_time(MAIN_EXPECTED_S):  # the first shape always runs
            skipped.append(shape.label + ("" if kind == "main" else " (optional rows)"))
            continue
        t0 = time.perf_counter()
        new: list[Row] = []
        new_failed: list[FailedRow] = []
        try:
            if kind == "main":
                run = bench.start(shape)
                new = bench.main_rows(run)
                runs[shape.label] = run
            else:
                for result in bench.optional_rows(runs[shape.label], out_of_time):
                    if isinstance(result, str):
                        skipped.append(result)
                        continue
                    if isinstance(result, Row):
                        new.append(result)
                        line = format_table([result])
                    else:
                        new_failed.append(result)
                        line = format_table([], [result])
                    print(line.split("\n", 2)[-1], f"  [{time.perf_counter() - t0:.1f} s]", flush=True)
                runs.pop(shape.label)
        except BenchInterrupted as err:
            interrupted = f"interrupted ({err}) during {shape.label} ({kind})"
            skipped.append(shape.label)
        rows += new
        failed += new_failed
        if kind == "main" and new:
            print(format_table(new).split("\n", 2)[-1], f"  [{time.perf_counter() - t0:.1f} s]", flush=True)
        if kind == "main" and not (sweep and shape.sweep) and shape.label in runs:
            runs.pop(shape.label)  # no optional rows to come: free its tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n=== attention table ({device_name(device)}, {args.dtype}, fwd+bwd, median ms) ===")
    print(format_table(rows, failed))
    if interrupted:
        print(interrupted)
    if skipped:
        print(f"skipped (time budget {args.budget_s:.0f} s or interrupted): {', '.join(skipped)}")
    print("x causal: time over SDPA is_causal at the same shape (packed rows too: causal over the whole row). "
          "build ms: build_attention_layout (+ compiled create_block_mask for flex, the dense mask for sdpa) per "
          "micro-batch. errors: max abs vs dense fp32 SDPA reference (output; grads of q, k, v).")
    for label, ms in bench.plan_ms.items():
        syncs = bench.syncs.get(label)
        sync_note = "" if syncs is None else f"; host syncs building split + flex layouts and running split " \
                                             f"fwd+bwd: {syncs['count']}" + (f" ({'; '.join(syncs['sites'][:3])})"
                                                                              if syncs["count"] else "")
        print(f"{label}: plan_split on the host copy {ms:.3f} ms per micro-batch{sync_note}")
    for line in fastest_routes(rows):
        print(line)
    print("=== end attention table ===", flush=True)
    result = {
        "device": device_name(device), "torch": torch.__version__, "dtype": args.dtype,
        "backend": effective_backend, "rows": [asdict(r) for r in rows], "failed": [asdict(f) for f in failed],
        "skipped": skipped, "interrupted": interrupted, "plan_split_ms": bench.plan_ms, "host_syncs": bench.syncs,
        "fastest": fastest_routes(rows), "wall_s": time.perf_counter() - start,
    }
    emit_json("BENCH_ATTENTION_JSON", result, args.json_out)
    return result


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:])["interrupted"] else 0)
