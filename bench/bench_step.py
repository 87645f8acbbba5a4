"""The Croc comprehension-stage training step versus a plain megatron-core GPT step of the same
LLM, batch and sequence length, on one GPU, in one run.

    PYTHONPATH=$PWD python bench/bench_step.py                      # ~1B LLM + CLIP-L/336, bf16
    PYTHONPATH=$PWD python bench/bench_step.py --device cpu --tiny  # toy size, < 60 s on a CPU

Rows (full training steps: forward + backward + optimizer, after warm-up; median step time):

- bf16 matrix multiply 8192^3 on this card (the rate the targets are stated against);
- GPT, our spec: megatron-core ``GPTModel`` with ``megatron_croc.models.specs.language_layer_spec``
  (megatron-core's local layer with CrocCoreAttention: SDPA flash, causal) -- the baseline;
- GPT, megatron local spec: ``get_gpt_layer_local_spec`` unchanged (its unfused
  DotProductAttention), a second baseline;
- Croc: ``CrocModel`` at stage ``croc`` (CLIP-L/336 frozen encoder, projector, 2048-entry pool,
  mask ratio 0.75, Hungarian assignment with the default solver and the look-ahead that solves
  micro-batch m+1 on the host during micro-batch m, mixed attention through FlexAttention, VTR
  head, LM + 10 VTR loss), through the training package's own forward step
  (``megatron_croc.training.step``);
- the same Croc step with the nearest matcher (an argmin on the device: the step without the
  assignment's cost; their difference is the assignment's exposed time), and with the
  look-ahead off (each micro-batch solves its own assignment in its forward);
- with TransformerEngine: the GPT and Croc steps again on TE specs in bf16 and in FP8.

All models run the same way users' training does: bf16 ``Float16Module``, megatron-core DDP
(fp32 grad buffer), megatron-core's optimizer (``megatron_croc.training.optim.build_optimizer``:
Adam, fp32 main weights, grad clipping), ``forward_backward_no_pipelining``.

Model TFLOP/s counts ``megatron_croc.training.logging.model_flops_per_step`` (GPT: the LLM part
only; Croc: LLM + vision encoder + projector + VTR head). tokens/s counts sequence positions
(text and visual) of the micro-batches.

The Croc step's breakdown (vision encoder, assignment, attention, mask build) is measured by
running each component alone at the step's exact shapes and dtype, with the live model's modules
(CUDA events, median of N), divided by the Croc step time per micro-batch. Not by hooks inside
the step: module hooks cannot bracket backward kernels of one module reliably, and extra events
and syncs inside the step would perturb the step being measured.

Prints a table between ``=== step table`` markers and a ``BENCH_STEP_JSON`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import os
import sys
import time
import traceback
from functools import partial
from typing import Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    BenchInterrupted, device_name, emit_json, host_syncs, median, stop_on_sigterm, synchronize, time_ms, wall_ms,
)

# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

PRESETS = {
    # ~0.9B Llama-architecture LLM (GQA) with CLIP-L/336: fits one H100 with room to spare.
    "croc-1b": dict(
        language=dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=8,
                      ffn_hidden_size=5632, vocab_size=32000, max_position_embeddings=4096),
        vision="clip-l-336", pool_size=2048, seq_length=2048, micro_batch_size=4, num_microbatches=4,
        prompt=35, question=12, warmup=2, iters=6, matmul_n=8192,
    ),
    # the CPU smoke size: 2 layers, h64, 16 visual tokens per image
    "tiny": dict(
        language="tiny", vision="tiny", pool_size=64, seq_length=64, micro_batch_size=2, num_microbatches=2,
        prompt=4, question=4, warmup=2, iters=2, matmul_n=256,
    ),
}


def build_model_config(args, *, precision=None):
    from megatron_croc.config import (
        LANGUAGE_PRESETS, VISION_PRESETS, CrocConfig, LanguageModelConfig, ModelConfig, PrecisionConfig,
    )

    preset = PRESETS[args.preset]
    language = preset["language"]
    language = LANGUAGE_PRESETS[language] if isinstance(language, str) else LanguageModelConfig(**language)
    if args.num_layers:
        language = dataclasses.replace(language, num_layers=args.num_layers)
    if language.max_position_embeddings < args.seq_length:
        language = dataclasses.replace(language, max_position_embeddings=args.seq_length)
    croc = CrocConfig(stage="croc", pool_size=args.pool_size or preset["pool_size"], mask_ratio=0.75,
                      attention=args.attention, assignment_solver="auto")
    return ModelConfig(
        vision=VISION_PRESETS[preset["vision"]], language=language, croc=croc,
        precision=precision or PrecisionConfig(bf16=args.dtype == "bf16"),
    )


def make_batch(config, args) -> dict[str, torch.Tensor]:
    """One micro-batch (CPU tensors): ``samples_per_row`` samples per row, each a prompt, one
    image, a question and a supervised answer filling the row (no padding)."""
    from megatron_croc.testing import synthetic_batch

    preset = PRESETS[args.preset]
    per_row = args.samples_per_row
    doc = args.seq_length // per_row
    t = config.vision.num_image_tokens
    answer = doc - preset["prompt"] - t - preset["question"]
    if answer < 1:
        raise SystemExit(f"error: a sample of {doc} tokens cannot hold a {t}-token image and the prompt")
    sample = dict(prompt=preset["prompt"], image=True, question=preset["question"], answer=answer)
    rows = [[dict(sample, answer=answer + (args.seq_length - doc * per_row if i == per_row - 1 else 0))
             for i in range(per_row)] for _ in range(args.micro_batch_size)]
    batch = synthetic_batch(
        num_image_tokens=t, image_size=config.vision.image_size, vocab_size=config.language.vocab_size,
        seq_length=args.seq_length, rows=rows, seed=args.seed,
    )
    batch["image_sample_ids"] = batch["image_keys"]  # the data loader's name for the mask keys
    return batch


# ---------------------------------------------------------------------------------------------
# building and stepping models
# ---------------------------------------------------------------------------------------------


def wrap_for_training(chunk, model_config, device):
    """bf16 Float16Module + megatron-core DDP, as megatron_croc.training.pretrain does."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    chunk.to(device)
    if model_config.precision.bf16:
        chunk = Float16Module(chunk.config, chunk)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    return DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk)


def build_gpt(model_config, *, spec: str, use_te: bool):
    """A plain megatron-core GPTModel of the same LLM as CrocModel.language_model."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_croc.config import language_transformer_config
    from megatron_croc.models import specs

    # Initialised by megatron-core on the device: the baseline is megatron-core's own model (the
    # Croc model draws its weights itself, layout-independently; speed does not depend on it).
    lm_config = dataclasses.replace(language_transformer_config(model_config), use_cpu_initialization=False,
                                    perform_initialization=True)
    if spec == "ours":
        layer_spec = specs.language_layer_spec(use_te=use_te)
    elif spec == "local":
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    else:
        raise ValueError(spec)
    lm = model_config.language
    return GPTModel(
        config=lm_config, transformer_layer_spec=layer_spec, vocab_size=model_config.padded_vocab_size,
        max_sequence_length=lm.max_position_embeddings, pre_process=True, post_process=True,
        share_embeddings_and_output_weights=not lm.untie_embeddings, position_embedding_type="rope",
        rotary_base=int(lm.rotary_base),
    )


def build_croc(model_config, *, use_te: bool):
    from megatron_croc.models.croc import CrocModel

    return CrocModel(model_config, pre_process=True, post_process=True, use_te=use_te)


def _gpt_loss(loss_mask, model_config, output):
    """The Croc step's LM loss (croc_loss without a VTR part), so both rows report alike."""
    from megatron_croc.models.croc import CrocOutputs, croc_loss

    return croc_loss(CrocOutputs(lm_loss_per_token=output, vtr_loss=None), loss_mask, model_config)


def gpt_forward_step(model_config, device):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens, labels, position_ids, loss_mask = (
            batch[k].to(device, non_blocking=True) for k in ("tokens", "labels", "position_ids", "loss_mask"))
        output = model(input_ids=tokens, position_ids=position_ids, attention_mask=None, labels=labels)
        return output, partial(_gpt_loss, loss_mask, model_config)

    return forward_step


def croc_forward_step(model_config, device, num_microbatches):
    from megatron_croc.training.step import StepStats, make_forward_step

    stats = StepStats()
    step = make_forward_step(model_config, device, stats, num_microbatches=num_microbatches)

    def forward_step(data_iterator, model):
        stats.reset()
        return step(data_iterator, model)

    return forward_step


def time_training_steps(ddp, model_config, forward_step, batch, args, device) -> dict:
    """Warm-up, then ``iters`` timed optimizer steps of ``num_microbatches`` micro-batches."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from megatron_croc.training.optim import OptimConfig, build_optimizer

    optimizer = build_optimizer(OptimConfig(lr=1e-5, clip_grad=1.0), [ddp], bf16=model_config.precision.bf16)
    tc = get_model_config(ddp)
    tc.no_sync_func = ddp.no_sync
    tc.finalize_model_grads_func = finalize_model_grads
    tc.grad_scale_func = optimizer.scale_loss
    forward_backward = get_forward_backward_func()
    data = itertools.repeat(batch)
    losses: list[float] = []

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=forward_step, data_iterator=data, model=[ddp],
            num_microbatches=args.num_microbatches, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=False,
        )
        ok, _, _ = optimizer.step()
        if reduced:
            losses.append(float(sum(float(v) for v in reduced[-1].values())))
        return ok

    t0 = time.perf_counter()
    step()
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    times = []
    for i in range(args.warmup - 1 + args.iters):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        if i >= args.warmup - 1:
            times.append(time.perf_counter() - t0)
    # the host syncs of the schedule's forward and backward (not the optimizer's grad-norm read)
    syncs = host_syncs(lambda: forward_backward(
        forward_step_func=forward_step, data_iterator=data, model=[ddp], num_microbatches=args.num_microbatches,
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, forward_only=False), device)
    return {"step_s": median(times), "first_step_s": first_step_s, "step_times_s": times,
            "last_loss": losses[-1] if losses else float("nan"), "host_syncs": syncs}


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------


def matmul_tflops(device, dtype, n: int) -> float:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    ms = median(time_ms(lambda: a @ b, device=device, warmup=3, iters=20 if device.type == "cuda" else 3))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def croc_components(ddp, model_config, batch, args, device) -> dict:
    """Each component of the Croc micro-batch alone, at the step's shapes, with the live model."""
    from megatron_croc.models.attention import attention, build_attention_layout
    from megatron.core.utils import unwrap_model

    model = unwrap_model(ddp)
    dtype = model_config.params_dtype
    lm = model_config.language
    warm, iters = (1, 3) if args.tiny else (2, 10)
    out: dict[str, object] = {}
    t_start = time.perf_counter()
    images = batch["images"].to(device)
    keys = batch["image_sample_ids"]  # on the host, as the training step keeps them
    seg, vis, loss_mask = (batch[k].to(device) for k in ("segment_ids", "visual_mask", "loss_mask"))
    num_images = images.shape[0]

    # vision encoder (frozen, forward) + projector forward and backward
    probe = model.vision(images)
    grad = torch.randn_like(probe)
    del probe
    out["vision_ms"] = median(time_ms(lambda: model.vision(images).backward(grad), device=device,
                                      warmup=warm, iters=iters))

    # assignment as the forward runs it without the look-ahead (positions, cost, solve, replace),
    # then the solver alone vs scipy
    with torch.no_grad():
        visual = model.vision(images)
        out["step_solver"] = model_config.croc.assignment_solver

        def pool_forward():
            positions, assignment = model._start_pool(visual, keys)
            return model.pool(visual, positions, assignment.result())

        out["pool_forward_ms"] = median(time_ms(pool_forward, device=device, warmup=warm, iters=iters))
        cost = model.pool.cost(visual, model._mask_positions(keys, device))
    out["cost_shape"] = list(cost.shape)
    out.update(assignment_comparison(cost, device, tiny=args.tiny))

    # attention: every LLM layer's core attention with this micro-batch's layout, and the VTR layer
    variant = model_config.croc.attention_variant
    layout = build_attention_layout(variant, segment_ids=seg, visual_mask=vis, loss_mask=loss_mask)
    out["attention_backend"] = layout.backend
    out["mask_build_ms"] = median(time_ms(
        lambda: _build_mask(variant, seg, vis, loss_mask), device=device, warmup=1, iters=iters))
    heads, groups, dim = lm.num_attention_heads, lm.num_query_groups, lm.kv_channels
    scale = dim**-0.5
    bsz, seq = seg.shape
    mixed = _attention_ms(lambda q, k, v: attention(q, k, v, layout, causal=True, scale=scale),
                          seq, bsz, heads, groups, dim, dtype, device, warm, iters)
    causal = _attention_ms(lambda q, k, v: attention(q, k, v, None, causal=True, scale=scale),
                           seq, bsz, heads, groups, dim, dtype, device, warm, iters)
    t = model_config.vision.num_image_tokens
    vtr = _attention_ms(lambda q, k, v: attention(q, k, v, None, causal=False, scale=scale),
                        t, num_images, heads, groups, dim, dtype, device, warm, iters)
    out["attention_layer_mixed_ms"] = mixed
    out["attention_layer_causal_ms"] = causal
    out["attention_vtr_ms"] = vtr
    out["attention_ms"] = lm.num_layers * mixed + vtr
    out["attention_gpt_ms"] = lm.num_layers * causal
    out["components_wall_s"] = time.perf_counter() - t_start
    return out


def _build_mask(variant, seg, vis, loss_mask):
    from megatron_croc.models.attention import build_attention_layout

    layout = build_attention_layout(variant, segment_ids=seg, visual_mask=vis, loss_mask=loss_mask)
    if layout.backend == "flex":
        layout.block_mask()
    elif not layout.plain_causal:
        layout.dense_mask()


def _attention_ms(fn, seq, bsz, heads, groups, dim, dtype, device, warm, iters) -> float:
    g = torch.Generator(device=device).manual_seed(1)

    def make(h):  # [S, B, H, D] -> [B, H, S, D], the strides CrocCoreAttention passes
        return torch.randn(seq, bsz, h, dim, device=device, dtype=dtype, generator=g).permute(1, 2, 0, 3) \
            .requires_grad_(True)

    q, k, v = make(heads), make(groups), make(groups)
    dout = torch.randn(bsz, heads, seq, dim, device=device, dtype=dtype, generator=g)

    def run():
        for x in (q, k, v):
            x.grad = None
        fn(q, k, v).backward(dout)

    return median(time_ms(run, device=device, warmup=warm, iters=iters))


def assignment_comparison(cost, device, *, tiny: bool) -> dict:
    """The solvers vs serial scipy on one micro-batch's cost [N, n, K]: wall time (they wait on
    the host) and agreement with scipy's optimal total cost."""
    from bench_assignment import serial_scipy, totals

    from megatron_croc.models.matching import assign

    reps = 2 if tiny else 5
    out: dict[str, object] = {}
    out["scipy_serial_ms"], reference = wall_ms(lambda: serial_scipy(cost), device=device, repeat=reps)
    ref_total = totals(cost, reference)
    for solver in ("scipy", "gpu"):
        try:
            out[f"{solver}_ms"], cols = wall_ms(lambda: assign(cost, method="hungarian", solver=solver),
                                                device=device, repeat=reps)
            out[f"{solver}_one_to_one"] = all(len(set(row.tolist())) == len(row) for row in cols.cpu())
            out[f"{solver}_max_rel_cost_diff"] = float(((totals(cost, cols) - ref_total).abs() / ref_total.abs()).max())
        except Exception as err:  # reported in the table, the rest of the benchmark goes on
            out[f"{solver}_error"] = f"{type(err).__name__}: {err}"
    return out


def llm_params(model_config) -> float:
    from megatron_croc.training.logging import _llm_matrix_params

    lm = model_config.language
    return _llm_matrix_params(model_config) + lm.hidden_size * lm.vocab_size  # + input embedding


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def run_row(name, *, kind, model_config, args, batch, device, use_te, spec="ours", components=False) -> dict:
    from megatron_croc.training.logging import model_flops_per_step

    free(device)
    reset_peak(device)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    if kind == "gpt":
        chunk = build_gpt(model_config, spec=spec, use_te=use_te)
        forward_step = gpt_forward_step(model_config, device)
        num_images = 0
    else:
        chunk = build_croc(model_config, use_te=use_te)
        forward_step = croc_forward_step(model_config, device, args.num_microbatches)
        num_images = batch["images"].shape[0] * args.num_microbatches
    ddp = wrap_for_training(chunk, model_config, device)
    build_s = time.perf_counter() - t0
    timing = time_training_steps(ddp, model_config, forward_step, batch, args, device)
    tokens = args.micro_batch_size * args.seq_length * args.num_microbatches
    flops = model_flops_per_step(model_config, num_tokens=tokens, seq_length=args.seq_length, num_images=num_images)
    llm_flops = model_flops_per_step(model_config, num_tokens=tokens, seq_length=args.seq_length, num_images=0)
    row = {
        "name": name, "kind": kind, "spec": spec, "te": use_te, "fp8": model_config.precision.fp8_format,
        "build_s": build_s, **timing,
        "tokens_per_s": tokens / timing["step_s"],
        "model_tflops": flops / timing["step_s"] / 1e12,
        "llm_tflops": llm_flops / timing["step_s"] / 1e12,
        "peak_gib": peak_gib(device),
    }
    if components:
        row["components"] = croc_components(ddp, model_config, batch, args, device)
    del ddp, chunk
    free(device)
    print(f"  {name}: step {row['step_s'] * 1e3:.1f} ms, {row['tokens_per_s']:.0f} tokens/s, "
          f"{row['model_tflops']:.1f} model TFLOP/s, peak {row['peak_gib']:.1f} GiB "
          f"(build {build_s:.1f} s, first step {timing['first_step_s']:.1f} s)", flush=True)
    return row


def format_report(result: dict) -> str:
    rows = result["rows"]
    matmul = result["matmul_tflops"]
    base = next((r for r in rows if r["name"] == BASELINE), None)
    lines = []
    head = f"{'step':<46} {'step ms':>8} {'tokens/s':>10} {'model TFLOP/s':>13} {'% matmul':>8} " \
           f"{'x GPT tok/s':>11} {'peak GiB':>8}"
    lines += [head, "-" * len(head)]
    label = f"{result['dtype']} matmul {result['matmul_n']}^3 (this card)"
    lines.append(f"{label:<46} {'':>8} {'':>10} "
                 f"{matmul:>13.1f} {100.0:>7.0f}%")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<46} FAILED: {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base and "error" not in base else float("nan")
        lines.append(
            f"{r['name']:<46} {r['step_s'] * 1e3:>8.1f} {r['tokens_per_s']:>10.0f} {r['model_tflops']:>13.1f} "
            f"{100 * r['model_tflops'] / matmul:>7.1f}% {ratio:>11.3f} {r['peak_gib']:>8.1f}"
        )
    croc = next((r for r in rows if r["name"] in (CROC, f"{CROC_SHORT}, scipy solver (retry)")
                 and "error" not in r), None)
    if croc and base and "error" not in base:
        ratio = croc["tokens_per_s"] / base["tokens_per_s"]
        lines.append(f"Croc / GPT tokens/s: {ratio:.3f} (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'}); "
                     f"GPT step at {100 * base['model_tflops'] / matmul:.1f}% of the matmul rate (target >= 40%); "
                     f"Croc LLM-only TFLOP/s {croc['llm_tflops']:.1f}")
    nearest = next((r for r in rows if r["name"] == CROC_NEAREST and "error" not in r), None)
    serial = next((r for r in rows if r["name"] == CROC_NO_LOOKAHEAD and "error" not in r), None)
    if croc and nearest:
        exposed = croc["step_s"] - nearest["step_s"]
        lines.append(f"assignment exposed in the step (Croc step - same step with the nearest matcher): "
                     f"{exposed * 1e3:.1f} ms = {100 * exposed / croc['step_s']:.1f}% of the step "
                     f"(target <= 2%; look-ahead {'on' if result['lookahead'] else 'off'})")
        serial_ms = croc.get("components", {}).get("scipy_serial_ms")
        if serial_ms:
            per_mb = exposed * 1e3 / result["num_microbatches"]
            lines.append(f"  per micro-batch: {per_mb:.2f} ms exposed vs {serial_ms:.2f} ms for serial scipy "
                         f"= {serial_ms / per_mb if per_mb > 0 else float('inf'):.0f}x (target >= 100x)")
    if croc and serial:
        saved = serial["step_s"] - croc["step_s"]
        lines.append(f"look-ahead: step {croc['step_s'] * 1e3:.1f} ms vs {serial['step_s'] * 1e3:.1f} ms "
                     f"without ({100 * saved / serial['step_s']:.1f}% saved)")
    for r in (base, croc):
        if r and r.get("host_syncs"):
            syncs = r["host_syncs"]
            lines.append(f"host syncs in one step's forward+backward ({r['name']}, {result['num_microbatches']} "
                         f"micro-batches): {syncs['count']}" + (f" at {', '.join(syncs['sites'][:6])}"
                                                                  if syncs["sites"] else ""))
    if croc and "components" in croc:
        c = croc["components"]
        per_mb = croc["step_s"] * 1e3 / result["num_microbatches"]
        lines.append("")
        lines.append(f"Croc step breakdown, per micro-batch ({per_mb:.1f} ms): each component run alone at the "
                     "step's shapes with the live modules (CUDA events, median)")
        lines.append(f"{'component':<62} {'ms':>9} {'share':>7}  target")

        def comp(label, ms, target=""):
            share = f"{100 * ms / per_mb:>6.1f}%" if math.isfinite(ms) else f"{'n/a':>7}"
            lines.append(f"{label:<62} {ms:>9.3f} {share}  {target}")

        comp("vision encoder fwd (frozen) + projector fwd+bwd", c["vision_ms"])
        comp(f"assignment, solved in the forward: cdist + solve ({c['step_solver']}) + replace",
             c["pool_forward_ms"])
        for solver in ("gpu", "scipy"):
            if f"{solver}_ms" in c:
                comp(f"  assign(solver={solver!r}) alone", c[f"{solver}_ms"])
        comp("  serial scipy linear_sum_assignment loop", c["scipy_serial_ms"])
        comp(f"attention: {result['num_layers']} LLM layers mixed ({c['attention_backend']}) + VTR layer, fwd+bwd",
             c["attention_ms"])
        comp(f"  (GPT: {result['num_layers']} layers causal SDPA flash, fwd+bwd)", c["attention_gpt_ms"])
        comp("attention layout + block mask build (once per micro-batch)", c["mask_build_ms"])
        ratio = c["attention_layer_mixed_ms"] / c["attention_layer_causal_ms"]
        lines.append(f"mixed / causal attention per layer: {ratio:.2f} (target <= 1.1)")
        if "gpu_ms" in c:
            speedup = c["scipy_serial_ms"] / c["gpu_ms"]
            lines.append(
                f"assignment {tuple(c['cost_shape'])}: gpu {c['gpu_ms']:.3f} ms vs serial scipy "
                f"{c['scipy_serial_ms']:.3f} ms per micro-batch = {speedup:.1f}x (target >= 100x); "
                f"max rel. total-cost diff vs scipy {c['gpu_max_rel_cost_diff']:.2e}, "
                f"one-to-one: {c['gpu_one_to_one']}")
        for solver in ("gpu", "scipy"):
            if f"{solver}_error" in c:
                lines.append(f"assign(solver={solver!r}) failed: {c[f'{solver}_error']}")
    lines.append("")
    lines.append(result["fp8_line"])
    return "\n".join(lines)


BASELINE = "GPT, our spec (SDPA flash causal)"
CROC = "Croc stage step (mixed attention)"
CROC_SHORT = "Croc step"
CROC_NEAREST = "Croc step, nearest matcher (no host solve)"
CROC_NO_LOOKAHEAD = "Croc step, assignment look-ahead off"


def step_shape_parser(description: str) -> argparse.ArgumentParser:
    """The flags that choose the model and the step's shape, shared with bench_memory."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy model and batch (CPU smoke run)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default croc-1b (tiny with --tiny)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--num-microbatches", type=int, default=None,
                   help="micro-batches per optimizer step (preset default: 4; the assignment look-ahead "
                        "overlaps micro-batch m+1's solve with micro-batch m)")
    p.add_argument("--num-layers", type=int, default=None, help="override the LLM depth")
    return p


def parse_args(argv: Sequence[str] | None):
    p = step_shape_parser(__doc__.split("\n")[0])
    p.add_argument("--samples-per-row", type=int, default=1, help=">1 packs samples (each with an image)")
    p.add_argument("--pool-size", type=int, default=None)
    p.add_argument("--attention", choices=["visual", "prefix"], default="visual")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--skip-local", action="store_true", help="skip the megatron local-spec GPT row")
    p.add_argument("--te", choices=["auto", "off"], default="auto", help="TE/FP8 rows when TE is importable")
    p.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default="hybrid")
    p.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8", "blockwise"], default="delayed")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="skip the optional rows (local spec, TE) once this many seconds have passed")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.tiny else "croc-1b")
    args.tiny = args.tiny or args.preset == "tiny"
    preset = PRESETS[args.preset]
    for name in ("seq_length", "micro_batch_size", "num_microbatches", "warmup", "iters"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.warmup = max(1, args.warmup)
    return args


def _init(args) -> torch.device:
    if args.device == "cpu":
        os.environ["MEGATRON_CROC_FORCE_CPU"] = "1"
    elif not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible; use --device cpu --tiny")
    from megatron_croc.distributed import init_model_parallel, init_process_group
    from megatron_croc.platform import init_platform

    platform = init_platform(force_cpu=args.device == "cpu")
    init_process_group(platform.backend)  # a world of one unless launched by torchrun
    init_model_parallel(seed=args.seed)
    from megatron_croc.models.attention import raise_recompile_limit

    raise_recompile_limit()
    return platform.device


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    device = _init(args)
    from megatron_croc.config import PrecisionConfig, padded_sequence_length, validate
    from megatron_croc.models.matching import resolve_solver
    from megatron_croc.platform import apex_available, te_available

    config = build_model_config(args)
    validate(config, has_te=False, has_apex=False)
    batch = make_batch(config, args)
    if device.type == "cuda":  # as the training data loader delivers batches on CUDA
        batch = {k: v.pin_memory() for k, v in batch.items()}
    lm = config.language
    dtype = config.params_dtype
    num_images = batch["images"].shape[0]
    print(f"bench_step on {device_name(device)}; torch {torch.__version__}; {args.dtype}; "
          f"LLM {llm_params(config) / 1e9:.2f}B ({lm.num_layers} layers, hidden {lm.hidden_size}, "
          f"{lm.num_attention_heads} heads / {lm.num_query_groups} kv groups, ffn {lm.ffn_hidden_size}, "
          f"vocab {lm.vocab_size}); vision {args.preset and PRESETS[args.preset]['vision']}; "
          f"micro-batch {args.micro_batch_size} x seq {args.seq_length}, {num_images} images of "
          f"{config.vision.num_image_tokens} tokens, {args.num_microbatches} micro-batch(es)/step; "
          f"median of {args.iters} steps after {args.warmup} warm-up", flush=True)

    result: dict[str, object] = {
        "device": device_name(device), "torch": torch.__version__, "dtype": args.dtype, "preset": args.preset,
        "num_layers": lm.num_layers, "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
        "num_microbatches": args.num_microbatches, "num_images": num_images,
        "lookahead": config.croc.assignment_lookahead,
        "llm_params": llm_params(config), "rows": [], "skipped": [],
    }
    n = PRESETS[args.preset]["matmul_n"]
    result["matmul_n"] = n
    result["matmul_tflops"] = matmul_tflops(device, dtype, n)
    print(f"  {args.dtype} matmul {n}^3: {result['matmul_tflops']:.1f} TFLOP/s", flush=True)

    plan = [
        dict(name=BASELINE, kind="gpt", spec="ours", model_config=config, use_te=False),
        dict(name=CROC, kind="croc", model_config=config, use_te=False, components=True),
    ]
    # The assignment's cost inside the step: the same step with the nearest matcher (an argmin
    # on the device, no host solve) is the step without it; and the step without the look-ahead
    # shows what overlapping the host solve with the previous micro-batch saves.
    optional = [
        dict(name=CROC_NEAREST, kind="croc", model_config=config.replace(
            croc=dataclasses.replace(config.croc, matcher="nearest")), use_te=False),
        dict(name=CROC_NO_LOOKAHEAD, kind="croc", model_config=config.replace(
            croc=dataclasses.replace(config.croc, assignment_lookahead=False)), use_te=False),
    ]
    if not args.skip_local:
        optional.append(dict(name="GPT, megatron local spec (unfused attention)", kind="gpt", spec="local",
                             model_config=config, use_te=False))
    has_te = args.te == "auto" and te_available()
    if has_te:
        fp8 = config.replace(precision=PrecisionConfig(bf16=True, fp8_format=args.fp8_format,
                                                       fp8_recipe=args.fp8_recipe))
        bf16 = config.replace(precision=PrecisionConfig(bf16=True))
        validate(fp8, has_te=True, has_apex=apex_available())
        _, note = padded_sequence_length(fp8, args.seq_length)
        if note:  # the same batch runs every row: it must suit FP8 as it is
            raise SystemExit(f"error: for the FP8 rows, {note}; pass that --seq-length or --te off")
        tag = f"FP8 {args.fp8_format}/{args.fp8_recipe}"
        optional += [
            dict(name="GPT, TE spec, bf16", kind="gpt", spec="ours", model_config=bf16, use_te=True),
            dict(name=f"GPT, TE spec, {tag}", kind="gpt", spec="ours", model_config=fp8, use_te=True),
            dict(name="Croc, TE spec, bf16", kind="croc", model_config=bf16, use_te=True),
            dict(name=f"Croc, TE spec, {tag}", kind="croc", model_config=fp8, use_te=True),
        ]
    failures = 0
    interrupted = None
    stop_on_sigterm()
    queue = plan + optional
    for i, item in enumerate(queue):
        if interrupted or (i >= len(plan) and time.perf_counter() - start > args.budget_s):
            result["skipped"].append(item["name"])
            continue
        try:
            result["rows"].append(run_row(args=args, batch=batch, device=device, **item))
        except BenchInterrupted as err:
            interrupted = f"interrupted ({err}) during {item['name']}"
            failures += 1
            result["rows"].append({"name": item["name"], "error": interrupted})
        except Exception as err:
            failures += 1
            traceback.print_exc()
            result["rows"].append({"name": item["name"], "error": f"{type(err).__name__}: {err}"})
            free(device)
            if item["name"] == CROC and resolve_solver(config.croc.assignment_solver) != "scipy":
                # still measure the rest of the Croc step if the GPU assignment solver is at fault
                scipy_config = config.replace(croc=dataclasses.replace(config.croc, assignment_solver="scipy"))
                queue.insert(i + 1, dict(item, name=f"{CROC_SHORT}, scipy solver (retry)", model_config=scipy_config))

    rows = {r["name"]: r for r in result["rows"] if "error" not in r}
    if has_te:
        gains = []
        for kind in ("GPT", "Croc"):
            b = rows.get(f"{kind}, TE spec, bf16")
            f = next((r for name, r in rows.items() if name.startswith(f"{kind}, TE spec, FP8")), None)
            if b and f:
                gains.append(f"{kind} {f['tokens_per_s'] / b['tokens_per_s']:.2f}x")
        result["fp8_line"] = f"FP8 gain over TE bf16 (tokens/s): {', '.join(gains) or 'n/a (rows failed)'}"
    elif args.te == "off":
        result["fp8_line"] = "FP8: n/a (--te off)"
    else:
        result["fp8_line"] = "FP8: n/a (TransformerEngine not installed)"
    if result["skipped"]:
        result["fp8_line"] += (f"\nskipped (time budget {args.budget_s:.0f} s or interrupted): "
                               f"{', '.join(result['skipped'])}")
    result["failures"] = failures
    result["wall_s"] = time.perf_counter() - start

    print(f"\n=== step table ({result['device']}, {args.dtype}, LLM {result['llm_params'] / 1e9:.2f}B, "
          f"micro-batch {args.micro_batch_size} x {args.seq_length}) ===")
    print(format_report(result))
    print("=== end step table ===", flush=True)
    emit_json("BENCH_STEP_JSON", result, args.json_out)
    return result


if __name__ == "__main__":
    outcome = main(sys.argv[1:])
    code = 1 if outcome["failures"] else 0
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
