"""Mixed attention versus causal attention, forward + backward, in one run.

    PYTHONPATH=$PWD python bench/bench_attention.py                 # on a GPU (bf16)
    PYTHONPATH=$PWD python bench/bench_attention.py --device cpu --tiny

For each shape (B batch rows, S sequence, Hq query heads, Hkv key/value heads, D head dim; a
576-token image at offset 35 of every sample) it times, forward + backward:

- ``causal``: our ``attention()`` with no layout = torch SDPA ``is_causal`` (flash on GPU) --
  the baseline every other row is divided by;
- ``visual``: Croc's mixed mask through ``attention()`` with an AttentionLayout (FlexAttention
  block mask on CUDA; SDPA with the dense mask on the CPU, where FlexAttention has no backward);
- ``prefix``: the released code's prefix-LM variant, same path;
- ``packed visual``: several samples per row (each with its own image, documents masked from
  each other), compared with plain causal over the whole row;
- ``sdpa dense``: the visual mask as a dense boolean ``attn_mask`` to SDPA (what an arbitrary
  mask costs without a block-sparse kernel), for reference.

Every row also reports the mask build time (``build_attention_layout`` + the compiled
``create_block_mask``, once per micro-batch; median over fresh layouts after the compile), the
time of its first call (compilation), and the max abs error of the output and of the q/k/v
gradients against a dense fp32 reference (SDPA on fp32 copies with the dense boolean mask).

Timing: warm-up calls first (compiles), then CUDA events around each fwd+bwd, median of N.
Prints a table between ``=== attention table`` markers and a ``BENCH_ATTENTION_JSON`` line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    BenchInterrupted, device_name, emit_json, median, stop_on_sigterm, synchronize, time_ms,
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

    @property
    def label(self) -> str:
        gqa = f"/{self.kv_heads}" if self.kv_heads != self.heads else ""
        return f"B{self.batch} S{self.seq} H{self.heads}{gqa} D{self.head_dim}"


GPU_SHAPES = [  # most informative first: a time budget drops the tail
    # bench_step's LLM shape (GQA): its compiled kernels are then cached for bench_step
    Shape(4, 2048, 16, 8, 128, prefix=True),
    Shape(1, 8192, 32, 32, 128, packed_docs=8, prefix=False),
    Shape(8, 1024, 32, 32, 128, prefix=False),
    Shape(2, 4096, 32, 32, 128, packed_docs=4, prefix=False),
]
TINY_SHAPES = [
    Shape(2, 128, 4, 2, 32),
    Shape(1, 256, 4, 4, 32, packed_docs=2, prefix=False),
]


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


def bench_case(*, fn, q, k, v, dout, ref_mask, scale, device, warmup, iters):
    """First call (compile) time, median fwd+bwd ms, and errors against the fp32 reference."""
    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(dout)

    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - t0
    out = fn(q, k, v)
    for t in (q, k, v):
        t.grad = None
    out.backward(dout)
    grads = tuple(t.grad.detach().clone() for t in (q, k, v))
    ref_out, ref_grads = _reference(q, k, v, dout, ref_mask, scale)
    err = _errors(out.detach(), grads, ref_out, ref_grads)
    del ref_out, ref_grads, out, grads
    ms = median(time_ms(step, device=device, warmup=warmup, iters=iters))
    return first, ms, err


def run_shape(shape: Shape, *, device, dtype, backend, num_visual, offset, warmup, iters, builds) -> list[Row]:
    from megatron_croc.models.attention import attention, build_attention_layout

    g = torch.Generator(device=device).manual_seed(0)
    scale = shape.head_dim ** -0.5

    def qkv():
        # [S, B, H, D] permuted to [B, H, S, D]: the strides CrocCoreAttention hands over
        def make(heads):
            t = torch.randn(shape.seq, shape.batch, heads, shape.head_dim, device=device, dtype=dtype, generator=g)
            return t.permute(1, 2, 0, 3).detach().requires_grad_(True)
        return make(shape.heads), make(shape.kv_heads), make(shape.kv_heads)

    q, k, v = qkv()
    dout = torch.randn(shape.batch, shape.heads, shape.seq, shape.head_dim, device=device, dtype=dtype, generator=g)
    rows: list[Row] = []
    common = dict(q=q, k=k, v=v, dout=dout, scale=scale, device=device, warmup=warmup, iters=iters)

    def inputs_for(variant, docs, seed=0):
        if variant == "causal":
            seg = torch.ones(shape.batch, shape.seq, dtype=torch.int32, device=device)
            zeros = torch.zeros_like(seg, dtype=torch.bool)
            return dict(segment_ids=seg, visual_mask=zeros, loss_mask=zeros.float())
        return layout_inputs(batch=shape.batch, seq=shape.seq, docs_per_row=docs, num_visual=num_visual,
                             offset=offset, device=device, seed=seed)

    def layout_for(variant, docs, layout_backend=backend):
        return build_attention_layout(variant, backend=layout_backend, **inputs_for(variant, docs))

    def build_ms(variant, docs, layout_backend):
        """Median time of building a micro-batch's layout (+ its block mask or dense mask) from
        its [B, S] tensors already on the device, as the training step does."""
        inputs = inputs_for(variant, docs, seed=1)

        def build():
            layout = build_attention_layout(variant, backend=layout_backend, **inputs)
            if layout.backend == "flex":
                layout.block_mask()
            else:
                layout.dense_mask()
        return median(time_ms(build, device=device, warmup=1, iters=builds))

    # baseline: plain causal (SDPA is_causal)
    causal_mask = layout_for("causal", 1).dense_mask()
    first, base_ms, err = bench_case(
        fn=lambda q, k, v: attention(q, k, v, None, causal=True, scale=scale), ref_mask=causal_mask, **common)
    del causal_mask
    kernel = "sdpa is_causal" + (" (flash)" if device.type == "cuda" else "")
    rows.append(Row(shape.label, "causal", kernel, base_ms, 1.0, float("nan"), first, *err))

    cases = [("visual", "visual", 1)]
    if shape.prefix:
        cases.append(("prefix", "prefix", 1))
    if shape.packed_docs > 1:
        cases.append((f"packed visual ({shape.packed_docs}/row)", "visual", shape.packed_docs))
    for case, variant, docs in cases:
        layout = layout_for(variant, docs)
        kern = "flex block mask" if layout.backend == "flex" else "sdpa dense mask"
        t0 = time.perf_counter()
        if layout.backend == "flex":
            layout.block_mask()  # first (compiling) build counted in first_call_s
        synchronize(device)
        first_build = time.perf_counter() - t0
        first, ms, err = bench_case(
            fn=lambda q, k, v, layout=layout: attention(q, k, v, layout, causal=True, scale=scale),
            ref_mask=layout.dense_mask(), **common)
        rows.append(Row(shape.label, case, kern, ms, ms / base_ms, build_ms(variant, docs, layout.backend),
                        first + first_build, *err))
        layout._dense = None  # free the dense mask

    if (backend or ("flex" if device.type == "cuda" else "sdpa")) != "sdpa":
        layout = layout_for("visual", 1, layout_backend="sdpa")
        mask = layout.dense_mask()
        first, ms, err = bench_case(
            fn=lambda q, k, v: attention(q, k, v, layout, causal=True, scale=scale), ref_mask=mask, **common)
        rows.append(Row(shape.label, "visual", "sdpa dense mask", ms, ms / base_ms,
                        build_ms("visual", 1, "sdpa"), first, *err))
        del layout, mask
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'shape':<22} {'case':<22} {'kernel':<22} {'fwd+bwd ms':>10} {'x causal':>8} " \
           f"{'build ms':>8} {'1st call s':>10} {'max|dOut|':>9} {'max|dGrad|':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        build = "-" if math.isnan(r.build_ms) else f"{r.build_ms:.3f}"
        lines.append(
            f"{r.shape:<22} {r.case:<22} {r.kernel:<22} {r.fwd_bwd_ms:>10.3f} {r.vs_causal:>8.2f} "
            f"{build:>8} {r.first_call_s:>10.2f} {r.max_err_out:>9.2e} {r.max_err_grad:>10.2e}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy shapes (CPU smoke run)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--backend", choices=["auto", "flex", "sdpa"], default="auto",
                   help="layout backend: auto = flex on CUDA, sdpa (dense mask) on CPU")
    p.add_argument("--shapes", nargs="*", default=None,
                   help="custom shapes BxSxHqxHkvxD[xDOCS], e.g. 8x1024x32x32x128 1x8192x32x32x128x8")
    p.add_argument("--visual-tokens", type=int, default=None, help="visual tokens per image (576; tiny: 16)")
    p.add_argument("--offset", type=int, default=None, help="text tokens before the image (35; tiny: 5)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--builds", type=int, default=None, help="fresh layouts timed for the build column")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="skip the remaining shapes once this many seconds have passed")
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
        for spec in args.shapes:
            parts = [int(x) for x in spec.lower().split("x")]
            shapes.append(Shape(*parts[:5], packed_docs=parts[5] if len(parts) > 5 else 0))
    else:
        shapes = TINY_SHAPES if tiny else GPU_SHAPES
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
    rows: list[Row] = []
    skipped: list[str] = []
    interrupted = None
    stop_on_sigterm()
    for shape in shapes:
        if interrupted or time.perf_counter() - start > args.budget_s:
            skipped.append(shape.label)
            continue
        t0 = time.perf_counter()
        try:
            new = run_shape(shape, device=device, dtype=dtype, backend=backend, num_visual=num_visual,
                            offset=offset, warmup=warmup, iters=iters, builds=builds)
        except BenchInterrupted as err:
            interrupted = f"interrupted ({err}) during {shape.label}"
            skipped.append(shape.label)
            continue
        rows += new
        print(format_table(new).split("\n", 2)[-1], f"  [{time.perf_counter() - t0:.1f} s]", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n=== attention table ({device_name(device)}, {args.dtype}, fwd+bwd, median ms) ===")
    print(format_table(rows))
    if interrupted:
        print(interrupted)
    if skipped:
        print(f"skipped (time budget {args.budget_s:.0f} s or interrupted): {', '.join(skipped)}")
    print("x causal: time over SDPA is_causal at the same shape (packed rows too: causal over the whole row). "
          "build ms: build_attention_layout + compiled create_block_mask per micro-batch. "
          "errors: max abs vs dense fp32 SDPA reference (output; grads of q, k, v).")
    print("=== end attention table ===", flush=True)
    result = {
        "device": device_name(device), "torch": torch.__version__, "dtype": args.dtype,
        "backend": effective_backend, "rows": [asdict(r) for r in rows], "skipped": skipped,
        "interrupted": interrupted,
        "wall_s": time.perf_counter() - start,
    }
    emit_json("BENCH_ATTENTION_JSON", result, args.json_out)
    return result


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:])["interrupted"] else 0)
