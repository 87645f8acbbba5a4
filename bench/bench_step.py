"""The Croc training step vs a plain megatron-core GPT step and vs the paper's stack, one GPU.

The Croc comprehension-stage training step versus a plain megatron-core GPT step of the same
LLM, batch and sequence length, and versus the paper's own stack, on one GPU, in one run.

    PYTHONPATH=$PWD python bench/bench_step.py                          # ~1B LLM + CLIP-L/336, bf16
    PYTHONPATH=$PWD python bench/bench_step.py --model vicuna-7b        # 7B width, 8 layers (--num-layers)
    PYTHONPATH=$PWD python bench/bench_step.py --device cpu --tiny      # toy size, < 60 s on a CPU

``--model`` (alias ``--preset``) picks the model: ``croc-1b`` (default: a 0.9B Llama-architecture
LLM, GQA 16/8 heads, CLIP-L/336), ``vicuna-7b`` (Vicuna-7B's width -- hidden 4096, 32 heads,
MLP 11008 -- with CLIP-L/336, 8 of its 32 layers by default so that every row fits one 80 GB
GPU; ``--num-layers`` sets the depth) or ``tiny`` (the CPU smoke size; ``--tiny``).

Rows (full training steps: forward + backward + optimizer, after warm-up; median step time):

- bf16 matrix multiply 8192^3 on this card (the rate the targets are stated against);
- GPT, our spec: megatron-core ``GPTModel`` with ``megatron_croc.models.specs.language_layer_spec``
  (megatron-core's local layer with CrocCoreAttention: SDPA flash, causal) -- the baseline;
- Croc: ``CrocModel`` at stage ``croc`` (frozen CLIP encoder, projector, pool, mask ratio 0.75,
  Hungarian assignment by scipy on the host with the look-ahead that solves micro-batch m+1
  during micro-batch m, mixed attention, VTR head, LM + 10 VTR loss), through the
  training package's own forward step (``megatron_croc.training.step``);
- the paper's stack on the same device, batch and sequence: transformers'
  ``LlavaForConditionalGeneration`` (the repository's HF export class, which adds Croc's L2 norm
  after the mlp2x_gelu projector) of the same sizes -- CLIP tower frozen, all its layers run and
  the penultimate read as LLaVA does, Llama LM on SDPA with Croc's dense boolean 4D mask --, the
  pool replacement solved by serial scipy ``linear_sum_assignment`` on the host per sample, a
  VTR head (one bidirectional ``LlamaDecoderLayer`` + Linear, SmoothL1 on the masked visual
  tokens), torch AdamW on bf16 weights (no fp32 master copy: a cheaper optimizer than ours),
  gradient clipping 1.0, HF-Trainer-style accumulation over the same micro-batches. Built after
  ours is freed; skipped with the reason printed when the device lacks the memory for it;
- optional, while ``--budget-s`` allows (each is skipped when its expected time, from the Croc
  row's, would overrun the budget), in this order: the Croc step with the nearest matcher (an
  argmin on the device: the step without the assignment's cost; the difference is the
  assignment's exposed time) and with the look-ahead off; the exposed-assignment sweep: the
  Croc step and the nearest-matcher step at the default micro-batch count and at
  ``--sweep-microbatches`` (default 8 and 16) per step, in both pool regimes (``--pool-init``
  sets the main rows': unit-norm ``token_scale`` rows, the model's default, or N(0,1)
  ``normal`` rows as in the released code, where scipy is far slower), median of
  ``--sweep-iters`` steps; the GPT step on megatron-core's local spec (its unfused
  DotProductAttention); with TransformerEngine, the GPT and Croc steps on TE specs in bf16 and
  FP8.

Our models run the same way users' training does: bf16 ``Float16Module``, megatron-core DDP
(fp32 grad buffer), megatron-core's optimizer (``megatron_croc.training.optim.build_optimizer``:
Adam, fp32 main weights, grad clipping), ``forward_backward_no_pipelining``.

Model TFLOP/s counts ``megatron_croc.training.logging.model_flops_per_step`` (GPT: the LLM part
only; Croc and the paper's stack: LLM + vision encoder + projector + VTR head, the useful work,
the same for both). tokens/s counts sequence positions (text and visual) of the micro-batches.

Two views of where the Croc step's time goes:

- components alone: each component run by itself at the step's exact shapes and dtype with the
  live model's modules (CUDA events, median of N), per micro-batch;
- the profiled step: one real step (the same forward_backward + optimizer step that is timed)
  under torch.profiler, its device time attributed to vision encoder, projector, pool and
  assignment, LLM core attention, LLM linear layers, the rest of the LLM, VTR layer and head,
  losses, gradient accumulation, optimizer and other, plus the idle device time (host waits),
  which together add up to the profiled step's wall time (``benchlib.attribute_profile``: the
  scopes are put on the live model from here, the backward inherits its forward's scope). On a
  CPU the same table attributes the self CPU time of the aten ops, and "idle" is the host's time
  outside ops (Python, waits).

``--breakdown off`` and ``--paper-baseline off`` drop those two (the profiled step costs two
extra steps and the profile's processing; the paper's stack a model build and four steps).

Prints a table between ``=== step table`` markers and a ``BENCH_STEP_JSON`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import math
import os
import re
import sys
import time
import traceback
from functools import partial
from typing import Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    BenchInterrupted, Scopes, attribute_profile, device_name, emit_json, host_syncs, matmul_tflops, median,
    profile_one_call, stop_on_sigterm, synchronize, time_ms, wall_ms,
)

# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

_CLIP_L_STEP = dict(vision="clip-l-336", pool_size=2048, seq_length=2048, micro_batch_size=4, num_microbatches=4,
                    prompt=35, question=12, matmul_n=8192, sweep=(8, 16))
PRESETS = {
    # ~0.9B Llama-architecture LLM (GQA) with CLIP-L/336: fits one H100 with room to spare.
    "croc-1b": dict(
        _CLIP_L_STEP,
        language=dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=8,
                      ffn_hidden_size=5632, vocab_size=32000, max_position_embeddings=4096),
        warmup=2, iters=6,
    ),
    # Vicuna-7B's width (megatron_croc.config.LANGUAGE_PRESETS["vicuna-7b"]: hidden 4096, 32 heads,
    # MLP 11008) at 8 of its 32 layers: ~1.9B LLM parameters, ~38 GB of model and optimizer state
    # with fp32 main weights and Adam, so every row fits one 80 GB GPU (--num-layers to change).
    "vicuna-7b": dict(_CLIP_L_STEP, language="vicuna-7b", num_layers=8, warmup=2, iters=4),
    # the CPU smoke size: 2 layers, h64, 16 visual tokens per image
    "tiny": dict(
        language="tiny", vision="tiny", pool_size=64, seq_length=64, micro_batch_size=2, num_microbatches=2,
        prompt=4, question=4, warmup=2, iters=2, matmul_n=256, sweep=(4,),
    ),
}
POOL_INITS = ("token_scale", "normal")  # megatron_croc.models.prompt_pool.PromptPool's inits


def build_model_config(args, *, precision=None):
    from megatron_croc.config import (
        LANGUAGE_PRESETS, VISION_PRESETS, CrocConfig, LanguageModelConfig, ModelConfig, PrecisionConfig,
    )

    preset = PRESETS[args.preset]
    language = preset["language"]
    language = LANGUAGE_PRESETS[language] if isinstance(language, str) else LanguageModelConfig(**language)
    num_layers = args.num_layers or preset.get("num_layers")
    if num_layers:
        language = dataclasses.replace(language, num_layers=num_layers)
    if language.max_position_embeddings < args.seq_length:
        language = dataclasses.replace(language, max_position_embeddings=args.seq_length)
    croc = CrocConfig(stage="croc", pool_size=args.pool_size or preset["pool_size"], mask_ratio=0.75,
                      attention=args.attention,
                      pool_init=getattr(args, "pool_init", None) or CrocConfig.pool_init)
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



def croc_forward_step(model_config, device, num_microbatches, *, scoped: bool = False):
    """The training package's forward step; ``scoped`` (the profiled step): its loss function
    runs inside the ``losses`` scope."""
    from megatron_croc.training.step import StepStats, make_forward_step

    stats = StepStats()
    step = make_forward_step(model_config, device, stats, num_microbatches=num_microbatches)

    def forward_step(data_iterator, model):
        stats.reset()
        output, loss_func = step(data_iterator, model)
        if scoped:
            loss_func = _scoped_call(loss_func, "losses")
        return output, loss_func

    return forward_step


def _scoped_call(fn, key: str):
    def scoped(*args, **kwargs):
        with Scopes.scope(key):
            return fn(*args, **kwargs)

    return scoped


def time_training_steps(ddp, model_config, forward_step, batch, args, device, *, num_microbatches: int,
                        warmup: int, iters: int, count_syncs: bool = True, profiled_forward_step=None,
                        install_scopes=None) -> dict:
    """Warm-up, then ``iters`` timed optimizer steps of ``num_microbatches`` micro-batches.

    With ``profiled_forward_step`` and ``install_scopes`` (a function that puts the breakdown's
    scopes on the live model and returns the :class:`Scopes`), one more step runs with the
    scopes (any recompilation they cause happens there), then one under the profiler, with
    that forward step; ``breakdown`` holds its attribution."""
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

    def step(step_func=forward_step, scoped=False):
        with Scopes.scope("optimizer") if scoped else contextlib.nullcontext():
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=step_func, data_iterator=data, model=[ddp],
            num_microbatches=num_microbatches, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=False,
        )
        with Scopes.scope("optimizer") if scoped else contextlib.nullcontext():
            ok, _, _ = optimizer.step()
        if reduced:
            losses.append(float(sum(float(v) for v in reduced[-1].values())))
        return ok

    t0 = time.perf_counter()
    step()
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    times = []
    for i in range(warmup - 1 + iters):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        if i >= warmup - 1:
            times.append(time.perf_counter() - t0)
    out = {"step_s": median(times), "first_step_s": first_step_s, "step_times_s": times,
           "last_loss": losses[-1] if losses else float("nan"), "host_syncs": None}
    if count_syncs:
        # the host syncs of the schedule's forward and backward (not the optimizer's grad-norm read)
        out["host_syncs"] = host_syncs(lambda: forward_backward(
            forward_step_func=forward_step, data_iterator=data, model=[ddp], num_microbatches=num_microbatches,
            seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, forward_only=False), device)
    if profiled_forward_step is not None:
        # A failing breakdown is reported (and fails the run) without losing the timed step.
        t0 = time.perf_counter()
        scopes = install_scopes()
        # finalize_model_grads: the DDP's gradient sync at the end of the schedule
        tc.finalize_model_grads_func = _scoped_call(finalize_model_grads, "grads")
        try:
            step(profiled_forward_step, scoped=True)
            synchronize(device)
            results = profile_one_call(lambda: step(profiled_forward_step, scoped=True), device)
            out["breakdown"] = dict(
                attribute_profile(results, on_device=device.type == "cuda", accumulate_key="grads"),
                scopes=scopes.installed, missing_scopes=scopes.missing, wall_s=time.perf_counter() - t0)
        except Exception as err:
            traceback.print_exc()
            out["breakdown_error"] = f"{type(err).__name__}: {err}"
        finally:
            scopes.remove()
            tc.finalize_model_grads_func = finalize_model_grads
    return out


# The profiled step's rows, in the order printed: (key, label). The keys are the Scopes keys
# install_croc_scopes puts on the model; "grads" and "other" come from attribute_profile.
BREAKDOWN_ROWS = (
    ("vision_encoder", "vision encoder (frozen)"),
    ("projector", "projector (mlp2x_gelu + L2 norm)"),
    ("pool", "pool: mask positions, costs, assignment, replacement"),
    ("llm_attention", "LLM core attention ({layers} layers)"),
    ("llm_linear", "LLM linear layers (QKV, out proj, MLP fc1/fc2)"),
    ("llm_rest", "LLM rest of the layers (norms, RoPE, SwiGLU, residual)"),
    ("llm_io", "LLM embedding + output layer"),
    ("vtr", "VTR layer and head"),
    ("losses", "losses (LM cross-entropy, VTR SmoothL1, total)"),
    ("grads", "gradient accumulation (fp32 buffer) + DDP finalize"),
    ("optimizer", "optimizer step + zero_grad"),
    ("other", "other (data to device, layout, splicing, unscoped)"),
)
IDLE_LABEL = {"cuda": "idle GPU (host waits)", "cpu": "host outside aten ops (Python, waits)"}
# Scopes the breakdown cannot do without: missing, their time would land in another row silently.
_REQUIRED_SCOPES = ("vision_encoder", "projector", "pool", "llm_attention", "llm_linear", "vtr")

_LLM_LAYER = r"language_model\.decoder\.layers\.\d+\."


def install_croc_scopes(model) -> Scopes:
    """Put the breakdown's scopes on a live CrocModel, by module name (as CrocModel and
    megatron-core name them) and by method.

    The vision tower is scoped through its ``encode``/``project`` methods, not hooks on its
    modules: a compiled or CUDA-graphed encoder must not get hooks (they would force a
    recompile, or are refused), and whatever runs the encoder calls these methods. The VTR
    head's own layer is not scoped as LLM attention/linear: only modules under
    ``language_model.decoder.layers`` are. The innermost scope wins, so e.g. the LM output layer
    inside the language model's scope counts as ``llm_io``, the VTR head inside ``_vtr_loss``
    as ``vtr``."""
    scopes = Scopes()
    by_pattern = (
        (_LLM_LAYER + r"self_attention\.core_attention", "llm_attention"),
        (_LLM_LAYER + r"(self_attention\.linear_(qkv|proj)|mlp\.linear_fc[12])", "llm_linear"),
        (r"language_model\.(embedding|output_layer)", "llm_io"),
        (r"language_model", "llm_rest"),
        (r"pool", "pool"),
        (r"vtr_head", "vtr"),
    )
    for name, module in model.named_modules():
        for pattern, key in by_pattern:
            if re.fullmatch(pattern, name):
                scopes.module(module, key, name)
                break
    vision = getattr(model, "vision", None)
    for owner, where, method, key in (
        (vision, "vision", "encode", "vision_encoder"),
        (vision, "vision", "project", "projector"),
        (model, "model", "_start_pool", "pool"),
        (getattr(model, "pool", None), "pool", "cost", "pool"),
        (model.language_model, "language_model", "compute_language_model_loss", "losses"),
        (model, "model", "_vtr_loss", "losses"),
    ):
        if owner is None:
            scopes.missing.append(f"{where}.{method} ({key}): no {where}")
        else:
            scopes.method(owner, method, key, where)
    found = {entry.rsplit(" -> ", 1)[1] for entry in scopes.installed}
    scopes.missing += [f"no scope for {key}" for key in _REQUIRED_SCOPES if key not in found]
    return scopes


def free(device):
    """Give the previous row's memory back to the device before the next row is built (a
    model's modules hold reference cycles, so only a collection frees them). Not on a CPU: its
    toy rows need no room, and a collection with torch and transformers loaded costs ~0.2 s."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------


def croc_components(ddp, model_config, batch, args, device) -> dict:
    """Each component of the Croc micro-batch alone, at the step's shapes, with the live model."""
    from megatron.core.utils import unwrap_model

    from megatron_croc.models.attention import attention
    from megatron_croc.training.step import to_device

    model = unwrap_model(ddp)
    dtype = model_config.params_dtype
    lm = model_config.language
    warm, iters = (1, 3) if args.tiny else (2, 10)
    out: dict[str, object] = {}
    t_start = time.perf_counter()
    images = batch["images"].to(device)
    keys = batch["image_sample_ids"]  # on the host, as the training step keeps them
    # what the step's forward gets, host-derived fields included
    moved = to_device(batch, device, split_route=model_config.attention_backend == "split")
    num_images = images.shape[0]

    # vision encoder (frozen, forward) + projector forward and backward
    probe = model.vision(images)
    grad = torch.randn_like(probe)
    del probe
    out["vision_ms"] = median(time_ms(lambda: model.vision(images).backward(grad), device=device,
                                      warmup=warm, iters=iters))
    # its model FLOPs: model_flops_per_step's vision part (a stage without the pool counts no VTR head)
    from megatron_croc.training.logging import model_flops_per_step

    without_pool = model_config.replace(croc=dataclasses.replace(model_config.croc, stage="align"))
    out["vision_tflops"] = model_flops_per_step(without_pool, num_tokens=0, seq_length=args.seq_length,
                                                num_images=num_images) / (out["vision_ms"] * 1e-3) / 1e12

    # assignment as the forward runs it without the look-ahead (positions, cost, solve, replace),
    # then the step's solver alone vs serial scipy
    with torch.no_grad():
        visual = model.vision(images)

        def pool_forward():
            positions, assignment = model._start_pool(visual, keys)
            return model.pool(visual, positions, assignment.result())

        out["pool_forward_ms"] = median(time_ms(pool_forward, device=device, warmup=warm, iters=iters))
        cost = model.pool.cost(visual, model._mask_positions(keys, device))
    out["cost_shape"] = list(cost.shape)
    out.update(assignment_comparison(cost, device, tiny=args.tiny))

    # attention: every LLM layer's core attention with this micro-batch's layout, and the VTR layer
    layout = _build_mask(model_config, moved)
    out["attention_backend"] = layout.backend
    out["mask_build_ms"] = median(time_ms(lambda: _build_mask(model_config, moved), device=device, warmup=1,
                                          iters=iters))
    heads, groups, dim = lm.num_attention_heads, lm.num_query_groups, lm.kv_channels
    scale = dim**-0.5
    bsz, seq = moved["segment_ids"].shape
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


def _build_mask(model_config, moved):
    """The micro-batch's attention layout as training.step builds it (same route, same
    host-derived inputs), with the mask its route reads built (the split route's is built with
    the layout)."""
    from megatron_croc.models.attention import build_attention_layout

    layout = build_attention_layout(
        model_config.croc.attention_variant, segment_ids=moved["segment_ids"], visual_mask=moved["visual_mask"],
        loss_mask=moved["loss_mask"], one_sample_per_row=moved["one_sample_per_row"],
        backend=model_config.attention_backend, split_plan=moved["split_plan"], visual_index=moved["visual_index"])
    if layout.backend == "flex":
        layout.block_mask()
    elif layout.backend == "sdpa" and not layout.plain_causal:
        layout.dense_mask()
    return layout


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
    """The step's solver (scipy, the samples concurrently on the solver threads) vs serial
    scipy, the released code's loop, on one micro-batch's cost [N, n, K]: wall time (both wait
    on the host) and agreement with serial scipy's optimal total cost."""
    from bench_assignment import serial_scipy, totals

    from megatron_croc.models.matching import assign

    reps = 2 if tiny else 5
    out: dict[str, object] = {}
    out["scipy_serial_ms"], reference = wall_ms(lambda: serial_scipy(cost), device=device, repeat=reps)
    ref_total = totals(cost, reference)
    out["scipy_ms"], cols = wall_ms(lambda: assign(cost, method="hungarian"), device=device, repeat=reps)
    out["scipy_one_to_one"] = all(len(set(row.tolist())) == len(row) for row in cols.cpu())
    out["scipy_max_rel_cost_diff"] = float(((totals(cost, cols) - ref_total).abs() / ref_total.abs()).max())
    return out


def llm_params(model_config) -> float:
    from megatron_croc.training.logging import _llm_matrix_params

    lm = model_config.language
    return _llm_matrix_params(model_config) + lm.hidden_size * lm.vocab_size  # + input embedding



# ---------------------------------------------------------------------------------------------
# the paper's own stack: transformers LLaVA + dense mask + serial scipy + torch AdamW
# ---------------------------------------------------------------------------------------------


class PaperVTRHead(torch.nn.Module):
    """The VTR head as the paper's stack would write it with transformers: a learned position
    embedding over an image's T positions, one bidirectional ``LlamaDecoderLayer`` (no RoPE:
    rotation by angle 0), Linear H->H."""

    def __init__(self, text_config, *, num_tokens: int):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        super().__init__()
        hidden = text_config.hidden_size
        self.position_embedding = torch.nn.Parameter(torch.randn(num_tokens, hidden) * 0.02)
        self.layer = LlamaDecoderLayer(text_config, layer_idx=0)
        self.layer.self_attn.is_causal = False  # SDPA without a mask and without is_causal
        self.output = torch.nn.Linear(hidden, hidden)
        self.head_dim = getattr(text_config, "head_dim", None) or hidden // text_config.num_attention_heads

    def forward(self, visual_hidden: torch.Tensor) -> torch.Tensor:
        """[N, T, H] -> [N, T, H]."""
        x = visual_hidden + self.position_embedding.to(visual_hidden.dtype)
        n, t, _ = x.shape
        cos = torch.ones(n, t, self.head_dim, device=x.device, dtype=x.dtype)
        out = self.layer(x, attention_mask=None, position_embeddings=(cos, torch.zeros_like(cos)))
        return self.output(out[0] if isinstance(out, tuple) else out)


def paper_state_bytes(model_config) -> int:
    """Weights, gradients and AdamW state (bf16, as the paper's stack keeps them) of the HF
    model: trainable parameters 8 bytes each, the frozen CLIP tower 2."""
    lm, vis = model_config.language, model_config.vision
    h = lm.hidden_size
    clip = vis.num_layers * (4 * vis.hidden_size**2 + 2 * vis.hidden_size * vis.ffn_hidden_size)
    vtr = 4 * h * h + 3 * h * lm.ffn_hidden_size + h * h
    trainable = llm_params(model_config) + vtr + vis.hidden_size * h + h * h + model_config.croc.pool_size * h
    return int(8 * trainable + 2 * clip)


def build_paper_stack(model_config, device):
    """transformers' LLaVA of our sizes (the HF export's class and config mapping), the pool and
    the VTR head, in bf16 on ``device``; the CLIP tower frozen."""
    from megatron_croc.convert.hf import llava_config
    from megatron_croc.convert.hf_modeling.modeling_croc import CrocLlavaForConditionalGeneration

    lm, vis = model_config.language, model_config.vision
    dtype = model_config.params_dtype
    image_id = lm.vocab_size  # an added <image> row, as LLaVA-1.5 adds it
    rows = -(-(lm.vocab_size + 1) // 64) * 64
    # All of CLIP's layers, the penultimate read (vision_feature_layer=-2): what LLaVA runs.
    hf_config = llava_config(model_config, None, None, vision_layers_out=vis.num_layers, feature_layer=-2,
                              image_id=image_id, added_row=True, hf_rows=rows, dtype=dtype, record={})
    with torch.device(device):
        llava = CrocLlavaForConditionalGeneration._from_config(hf_config, attn_implementation="sdpa", dtype=dtype)
        g = torch.Generator(device="cpu").manual_seed(model_config.croc.seed)
        pool = torch.randn(model_config.croc.pool_size, lm.hidden_size, generator=g, device="cpu")
        if model_config.croc.pool_init == "token_scale":
            pool = pool / pool.norm(dim=-1, keepdim=True)
        pool = torch.nn.Parameter(pool.to(device=device, dtype=dtype))
        vtr = PaperVTRHead(hf_config.text_config, num_tokens=vis.num_image_tokens).to(device=device, dtype=dtype)
    llava = llava.to(device)  # in case a transformers version builds outside the device context
    llava.model.vision_tower.requires_grad_(False)
    llava.train()
    return llava, pool, vtr, image_id


def paper_step_fn(model_config, llava, pool, vtr, image_id, batch, args, device, num_microbatches):
    """One optimizer step of the paper's stack over ``num_microbatches`` copies of ``batch``."""
    from bench_assignment import serial_scipy

    from megatron_croc.config import CLIP_MEAN, CLIP_STD, masked_count
    from megatron_croc.models.attention import build_attention_layout
    from megatron_croc.models.prompt_pool import draw_mask_positions

    croc = model_config.croc
    dtype = model_config.params_dtype
    num_tokens = model_config.vision.num_image_tokens
    num_masked = masked_count(model_config)
    params = [p for p in itertools.chain(llava.parameters(), vtr.parameters(), [pool]) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1) * 255
    keys = batch["image_sample_ids"]
    tokens_host = batch["tokens"].masked_fill(batch["visual_mask"].bool(), image_id)  # LLaVA's placeholders
    if device.type == "cuda":  # pinned, as the rest of the batch and as a data loader delivers it
        tokens_host = tokens_host.pin_memory()
    replaced: dict[str, torch.Tensor] = {}

    def replace_with_pool(module, inputs, visual):
        """Forward hook on the projector: the released code's replacement -- costs to the host,
        serial scipy per sample, pool rows scattered in; the unreplaced tokens kept as targets."""
        replaced["targets"] = visual.detach()
        positions = replaced["positions"]
        index = positions.unsqueeze(-1).expand(-1, -1, visual.shape[-1])
        with torch.no_grad():
            selected = visual.gather(1, index).float()
            cost = torch.cdist(selected, pool.detach().float().unsqueeze(0).expand(visual.shape[0], -1, -1))
        columns = serial_scipy(cost)
        return visual.scatter(1, index, pool[columns].to(visual.dtype))

    hook = llava.model.multi_modal_projector.register_forward_hook(replace_with_pool)

    def micro_batch():
        tokens = tokens_host.to(device, non_blocking=True)
        labels, loss_mask, position_ids, seg, visual_mask = (
            batch[k].to(device, non_blocking=True)
            for k in ("labels", "loss_mask", "position_ids", "segment_ids", "visual_mask"))
        images = batch["images"].to(device, non_blocking=True)
        pixels = ((images.float() - mean) / std).to(dtype)
        mask = build_attention_layout(croc.attention_variant, segment_ids=seg, visual_mask=visual_mask,
                                      loss_mask=loss_mask, backend="sdpa").dense_mask()
        replaced["positions"] = draw_mask_positions(seed=croc.seed, keys=keys, num_tokens=num_tokens,
                                                    num_masked=num_masked, device=device)
        # LlavaForConditionalGeneration.forward is model + lm_head; called apart to keep the
        # final (normed) hidden states the VTR head reads
        hidden = llava.model(input_ids=tokens, pixel_values=pixels, attention_mask=mask, position_ids=position_ids,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             use_cache=False).last_hidden_state
        logits = llava.lm_head(hidden)
        per_token = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        lm_loss = (per_token * loss_mask.flatten()).sum() / loss_mask.sum().clamp(min=1.0)
        visual_hidden = hidden[visual_mask.bool()].view(-1, num_tokens, hidden.shape[-1])
        prediction = vtr(visual_hidden)
        index = replaced["positions"].unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        vtr_loss = torch.nn.functional.smooth_l1_loss(prediction.gather(1, index).float(),
                                                      replaced["targets"].gather(1, index).float(),
                                                      beta=croc.vtr_smooth_l1_beta)
        loss = lm_loss + croc.vtr_weight * vtr_loss
        (loss / num_microbatches).backward()
        return loss.detach()

    def step():
        losses = [micro_batch() for _ in range(num_microbatches)]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(losses[-1])

    step.remove_hook = hook.remove
    return step


def run_paper_row(name, *, model_config, args, batch, device) -> dict:
    """The paper's stack, timed like our rows; skipped (with the reason) where its weights,
    gradients and optimizer state alone would not fit the free device memory."""
    from megatron_croc.training.logging import model_flops_per_step

    free(device)
    reset_peak(device)
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        need = paper_state_bytes(model_config)
        if need > 0.8 * free_bytes:
            return {"name": name, "skipped": f"its weights, gradients and AdamW state need ~{need / 2**30:.0f} GiB, "
                                             f"{free_bytes / 2**30:.0f} GiB free"}
    num_microbatches = args.num_microbatches
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    llava, pool, vtr, image_id = build_paper_stack(model_config, device)
    step = paper_step_fn(model_config, llava, pool, vtr, image_id, batch, args, device, num_microbatches)
    build_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        step()
        synchronize(device)
        first_step_s = time.perf_counter() - t0
        warmup, iters = 1, min(args.iters, 3)
        times, last_loss = [], float("nan")
        for i in range(warmup - 1 + iters):
            synchronize(device)
            t0 = time.perf_counter()
            last_loss = step()
            synchronize(device)
            if i >= warmup - 1:
                times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as err:
        del llava, pool, vtr, step
        free(device)
        return {"name": name, "skipped": f"out of device memory ({str(err).splitlines()[0]})"}
    step.remove_hook()
    step_s = median(times)
    tokens = args.micro_batch_size * args.seq_length * num_microbatches
    num_images = batch["images"].shape[0] * num_microbatches
    flops = model_flops_per_step(model_config, num_tokens=tokens, seq_length=args.seq_length, num_images=num_images)
    llm_flops = model_flops_per_step(model_config, num_tokens=tokens, seq_length=args.seq_length, num_images=0)
    row = {
        "name": name, "kind": "paper", "spec": "transformers", "te": False, "fp8": None, "build_s": build_s,
        "step_s": step_s, "first_step_s": first_step_s, "step_times_s": times, "last_loss": last_loss,
        "host_syncs": None, "tokens_per_s": tokens / step_s, "model_tflops": flops / step_s / 1e12,
        "llm_tflops": llm_flops / step_s / 1e12, "peak_gib": peak_gib(device),
    }
    del llava, pool, vtr, step
    free(device)
    print(f"  {name}: step {step_s * 1e3:.1f} ms, {row['tokens_per_s']:.0f} tokens/s, "
          f"{row['model_tflops']:.1f} model TFLOP/s, peak {row['peak_gib']:.1f} GiB "
          f"(build {build_s:.1f} s, first step {first_step_s:.1f} s)", flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def run_row(name, *, kind, model_config, args, batch, device, use_te, spec="ours", components=False,
            breakdown=False, num_microbatches=None, warmup=None, iters=None, count_syncs=True) -> dict:
    from megatron_croc.training.logging import model_flops_per_step

    num_microbatches = num_microbatches or args.num_microbatches
    free(device)
    reset_peak(device)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    profiled = {}
    if kind == "gpt":
        chunk = build_gpt(model_config, spec=spec, use_te=use_te)
        forward_step = gpt_forward_step(model_config, device)
        num_images = 0
    else:
        chunk = build_croc(model_config, use_te=use_te)
        forward_step = croc_forward_step(model_config, device, num_microbatches)
        num_images = batch["images"].shape[0] * num_microbatches
        if breakdown:
            profiled = dict(profiled_forward_step=croc_forward_step(model_config, device, num_microbatches,
                                                                    scoped=True),
                            install_scopes=lambda: install_croc_scopes(chunk))
    ddp = wrap_for_training(chunk, model_config, device)
    build_s = time.perf_counter() - t0
    timing = time_training_steps(ddp, model_config, forward_step, batch, args, device,
                                 num_microbatches=num_microbatches, warmup=warmup or args.warmup,
                                 iters=iters or args.iters, count_syncs=count_syncs, **profiled)
    tokens = args.micro_batch_size * args.seq_length * num_microbatches
    flops = model_flops_per_step(model_config, num_tokens=tokens, seq_length=args.seq_length, num_images=num_images)
    llm_flops = model_flops_per_step(model_config, num_tokens=tokens, seq_length=args.seq_length, num_images=0)
    row = {
        "name": name, "kind": kind, "spec": spec, "te": use_te, "fp8": model_config.precision.fp8_format,
        "num_microbatches": num_microbatches, "pool_init": model_config.croc.pool_init,
        "matcher": model_config.croc.matcher, "lookahead": model_config.croc.assignment_lookahead,
        "build_s": build_s, **timing,
        "tokens_per_s": tokens / timing["step_s"],
        "model_tflops": flops / timing["step_s"] / 1e12,
        "llm_tflops": llm_flops / timing["step_s"] / 1e12,
        "peak_gib": peak_gib(device),
    }
    if "breakdown" in row:
        row["breakdown"] = breakdown_rows(row.pop("breakdown"), step_s=row["step_s"], device=device)
    if components:
        row["components"] = croc_components(ddp, model_config, batch, args, device)
    del ddp, chunk
    free(device)
    print(f"  {name}: step {row['step_s'] * 1e3:.1f} ms, {row['tokens_per_s']:.0f} tokens/s, "
          f"{row['model_tflops']:.1f} model TFLOP/s, peak {row['peak_gib']:.1f} GiB "
          f"(build {build_s:.1f} s, first step {timing['first_step_s']:.1f} s)", flush=True)
    return row


def breakdown_rows(profile: dict, *, step_s: float, device) -> dict:
    """attribute_profile's ns per scope key as the table's rows (ms), in BREAKDOWN_ROWS order;
    keys the table does not name (a scope added without a row) are folded into ``other``."""
    by_key = {k: dict(v) for k, v in profile["by_key"].items()}
    known = {key for key, _ in BREAKDOWN_ROWS}
    for key in [k for k in by_key if k not in known]:
        extra = by_key.pop(key)
        other = by_key.setdefault("other", {"fwd": 0.0, "bwd": 0.0})
        for phase in ("fwd", "bwd"):
            other[phase] += extra[phase]
    rows = []
    for key, label in BREAKDOWN_ROWS:
        ns = by_key.get(key, {"fwd": 0.0, "bwd": 0.0})
        rows.append({"key": key, "label": label, "ms": (ns["fwd"] + ns["bwd"]) / 1e6, "bwd_ms": ns["bwd"] / 1e6})
    rows.append({"key": "idle", "label": IDLE_LABEL[device.type], "ms": profile["idle_ns"] / 1e6, "bwd_ms": None})
    total = sum(r["ms"] for r in rows)
    window_ms = profile["window_ns"] / 1e6
    return {"rows": rows, "sum_ms": total, "profiled_step_ms": window_ms, "residual_ms": window_ms - total,
            "busy_ms": profile["busy_ns"] / 1e6, "timed_step_ms": step_s * 1e3,
            "device_events": profile["device_events"], "unlinked_device_events": profile["unlinked_device_events"],
            "scopes": profile["scopes"], "missing_scopes": profile["missing_scopes"], "wall_s": profile["wall_s"]}


def sweep_items(config, args) -> list[dict]:
    """The exposed-assignment configurations beyond the main rows, most wanted first: at each
    micro-batch count (the default, then ``--sweep-microbatches`` ascending) the Croc step in
    each pool regime and the same step with the nearest matcher (the regime does not change
    its work), leaving out the main rows' own configurations."""
    counts = [args.num_microbatches] + sorted(set(args.sweep_microbatches) - {args.num_microbatches})
    items = []
    for count in counts:
        default = count == args.num_microbatches
        for pool_init in [config.croc.pool_init] + [p for p in POOL_INITS if p != config.croc.pool_init]:
            if default and pool_init == config.croc.pool_init:
                continue  # the Croc row
            croc = dataclasses.replace(config.croc, pool_init=pool_init)
            items.append(dict(name=f"Croc step, {count} micro-batches, {pool_init} pool", kind="croc",
                              model_config=config.replace(croc=croc), use_te=False, num_microbatches=count,
                              sweep=True))
        if not default:
            croc = dataclasses.replace(config.croc, matcher="nearest")
            items.append(dict(name=f"Croc step, nearest matcher, {count} micro-batches", kind="croc",
                              model_config=config.replace(croc=croc), use_te=False, num_microbatches=count,
                              sweep=True))
    return items


def exposed_assignment(result: dict) -> list[dict]:
    """Per (micro-batches, pool regime): the Croc step minus the same step with the nearest
    matcher, from the main rows and the sweep."""
    rows = [r for r in result["rows"] + result["sweep"] if "step_s" in r and r.get("kind") == "croc" and not r["te"]]
    hungarian = {(r["num_microbatches"], r["pool_init"]): r for r in rows if r["matcher"] == "hungarian"
                 and r["lookahead"]}
    nearest = {r["num_microbatches"]: r for r in rows if r["matcher"] == "nearest"}
    out = []
    for (count, pool_init), row in sorted(hungarian.items()):
        if count in nearest:
            exposed = row["step_s"] - nearest[count]["step_s"]
            out.append({"num_microbatches": count, "pool_init": pool_init, "step_s": row["step_s"],
                        "nearest_step_s": nearest[count]["step_s"], "exposed_s": exposed,
                        "share": exposed / row["step_s"]})
    return out


def format_report(result: dict) -> str:
    rows = result["rows"]
    matmul = result["matmul_tflops"]
    base = next((r for r in rows if r["name"] == BASELINE), None)
    base_ok = base is not None and "step_s" in base
    lines = []
    head = f"{'step':<56} {'step ms':>8} {'tokens/s':>10} {'model TFLOP/s':>13} {'% matmul':>8} " \
           f"{'x GPT tok/s':>11} {'peak GiB':>8}"
    lines += [head, "-" * len(head)]
    label = f"{result['dtype']} matmul {result['matmul_n']}^3 (this card)"
    lines.append(f"{label:<56} {'':>8} {'':>10} {matmul:>13.1f} {100.0:>7.0f}%")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<56} FAILED: {r['error']}")
            continue
        if "skipped" in r:
            lines.append(f"{r['name']:<56} SKIPPED: {r['skipped']}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base_ok else float("nan")
        lines.append(
            f"{r['name']:<56} {r['step_s'] * 1e3:>8.1f} {r['tokens_per_s']:>10.0f} {r['model_tflops']:>13.1f} "
            f"{100 * r['model_tflops'] / matmul:>7.1f}% {ratio:>11.3f} {r['peak_gib']:>8.1f}"
        )
    croc = next((r for r in rows if r["name"] == CROC and "step_s" in r), None)
    paper = next((r for r in rows if r["name"] == PAPER and "step_s" in r), None)
    target_gpt = 0.95 if result["model"] == "vicuna-7b" else 0.9
    if croc and base_ok:
        ratio = croc["tokens_per_s"] / base["tokens_per_s"]
        tflops = croc["model_tflops"] / base["model_tflops"]
        lines.append(f"Croc / GPT tokens/s: {ratio:.3f} (target >= {target_gpt}: "
                     f"{'met' if ratio >= target_gpt else 'NOT met'}); Croc / GPT model TFLOP/s: {tflops:.3f} "
                     f"(target >= 0.95); GPT step at {100 * base['model_tflops'] / matmul:.1f}% of the matmul rate"
                     f"{' (target >= 55%)' if result['model'] == 'croc-1b' else ''}; "
                     f"Croc LLM-only TFLOP/s {croc['llm_tflops']:.1f}")
    if croc and paper:
        ratio = croc["tokens_per_s"] / paper["tokens_per_s"]
        lines.append(f"Croc / paper's stack tokens/s (same batch, seq, device): {ratio:.2f} "
                     f"(target >= 3: {'met' if ratio >= 3 else 'NOT met'})")
    nearest = next((r for r in rows if r["name"] == CROC_NEAREST and "step_s" in r), None)
    serial = next((r for r in rows if r["name"] == CROC_NO_LOOKAHEAD and "step_s" in r), None)
    if croc and nearest:
        exposed = croc["step_s"] - nearest["step_s"]
        lines.append(f"assignment exposed in the step (Croc step - same step with the nearest matcher): "
                     f"{exposed * 1e3:.1f} ms = {100 * exposed / croc['step_s']:.1f}% of the step "
                     f"(target <= 1%; look-ahead {'on' if result['lookahead'] else 'off'})")
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
        lines += ["", *_components_table(croc, result)]
    if croc and "breakdown" in croc:
        lines += ["", *_breakdown_table(croc["breakdown"], result)]
    if croc and "breakdown_error" in croc:
        lines += ["", f"Croc step, profiled: FAILED: {croc['breakdown_error']}"]
    exposed = result.get("exposed_assignment") or []
    if exposed:
        lines += ["", "exposed assignment per step (Croc step - the same step with the nearest matcher, look-ahead on; "
                      f"beyond the main rows: median of {result['sweep_iters']} step(s) after one warm-up)",
                  f"{'micro-batches':>13} {'pool init':<12} {'Croc ms':>9} {'nearest ms':>10} {'exposed ms':>10} "
                  f"{'share':>7}  target <= 1%"]
        for e in exposed:
            lines.append(f"{e['num_microbatches']:>13} {e['pool_init']:<12} {e['step_s'] * 1e3:>9.1f} "
                         f"{e['nearest_step_s'] * 1e3:>10.1f} {e['exposed_s'] * 1e3:>10.1f} {100 * e['share']:>6.1f}%"
                         f"  {'met' if e['share'] <= 0.01 else 'NOT met'}")
    for r in result["sweep"]:
        if "error" in r:
            lines.append(f"{r['name']}: FAILED: {r['error']}")
    lines.append("")
    lines.append(result["fp8_line"])
    return "\n".join(lines)


def _components_table(croc: dict, result: dict) -> list[str]:
    c = croc["components"]
    per_mb = croc["step_s"] * 1e3 / result["num_microbatches"]
    lines = [f"Croc step, components alone, per micro-batch ({per_mb:.1f} ms): each component run by itself at the "
             "step's shapes with the live modules (median; CUDA events on a GPU)",
             f"{'component':<62} {'ms':>9} {'share':>7}"]

    def comp(label, ms):
        share = f"{100 * ms / per_mb:>6.1f}%" if math.isfinite(ms) else f"{'n/a':>7}"
        lines.append(f"{label:<62} {ms:>9.3f} {share}")

    comp("vision encoder fwd (frozen) + projector fwd+bwd", c["vision_ms"])
    lines.append(f"  = {c['vision_tflops']:.1f} TFLOP/s, {100 * c['vision_tflops'] / result['matmul_tflops']:.1f}% "
                 "of the matmul rate (target >= 50%)")
    comp("assignment, solved in the forward: cdist + scipy solve + replace", c["pool_forward_ms"])
    comp("  assign() alone (scipy, the samples concurrently)", c["scipy_ms"])
    comp("  serial scipy linear_sum_assignment loop", c["scipy_serial_ms"])
    comp(f"attention: {result['num_layers']} LLM layers mixed ({c['attention_backend']}) + VTR layer, fwd+bwd",
         c["attention_ms"])
    comp(f"  (GPT: {result['num_layers']} layers causal SDPA flash, fwd+bwd)", c["attention_gpt_ms"])
    comp("attention layout + block mask build (once per micro-batch)", c["mask_build_ms"])
    ratio = c["attention_layer_mixed_ms"] / c["attention_layer_causal_ms"]
    lines.append(f"mixed / causal attention per layer: {ratio:.2f} (target <= 1.3 at S2048, <= 1.1 at S >= 4096)")
    lines.append(f"assignment {tuple(c['cost_shape'])}: concurrent scipy {c['scipy_ms']:.3f} ms vs serial "
                 f"{c['scipy_serial_ms']:.3f} ms per micro-batch; max rel. total-cost diff "
                 f"{c['scipy_max_rel_cost_diff']:.2e}, one-to-one: {c['scipy_one_to_one']}")
    return lines


def _breakdown_table(b: dict, result: dict) -> list[str]:
    mb = result["num_microbatches"]
    what = "device kernel time" if result["device_type"] == "cuda" else "self CPU time of aten ops"
    lines = [f"Croc step, profiled: one real step under torch.profiler, {what} by part ({mb} micro-batches; "
             "backward attributed to its forward's scope)",
             f"{'part':<58} {'ms/step':>9} {'of which bwd':>12} {'ms/micro-batch':>14} {'share':>7}"]
    for r in b["rows"]:
        label = r["label"].format(layers=result["num_layers"])
        bwd = f"{r['bwd_ms']:>12.2f}" if r["bwd_ms"] is not None else f"{'':>12}"
        lines.append(f"{label:<58} {r['ms']:>9.2f} {bwd} {r['ms'] / mb:>14.2f} "
                     f"{100 * r['ms'] / b['profiled_step_ms']:>6.1f}%")
    lines.append(f"{'sum of the rows':<58} {b['sum_ms']:>9.2f}")
    lines.append(f"{'profiled step (wall, host)':<58} {b['profiled_step_ms']:>9.2f}   residual {b['residual_ms']:.4f} ms "
                 f"({100 * b['residual_ms'] / b['profiled_step_ms']:.3f}%)")
    lines.append(f"{'timed step (median, unprofiled)':<58} {b['timed_step_ms']:>9.2f}   profiler overhead "
                 f"{100 * (b['profiled_step_ms'] / b['timed_step_ms'] - 1):+.1f}%")
    if b["unlinked_device_events"]:
        lines.append(f"  {b['unlinked_device_events']} of {b['device_events']} device events had no recorded "
                     "launching op (counted in other)")
    if b["missing_scopes"]:
        lines.append(f"  NOT scoped (their time is in an enclosing row or other): {'; '.join(b['missing_scopes'])}")
    return lines


BASELINE = "GPT, our spec (SDPA flash causal)"
CROC = "Croc stage step (mixed attention)"
PAPER = "Paper's stack (HF LLaVA, SDPA dense mask, serial scipy)"
CROC_NEAREST = "Croc step, nearest matcher (no host solve)"
CROC_NO_LOOKAHEAD = "Croc step, assignment look-ahead off"


def step_shape_parser(description: str) -> argparse.ArgumentParser:
    """The flags that choose the model and the step's shape, shared with bench_memory."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy model and batch (CPU smoke run): --model tiny")
    p.add_argument("--model", "--preset", dest="preset", choices=sorted(PRESETS), default=None,
                   help="default croc-1b (tiny with --tiny); vicuna-7b: 7B width, 8 layers unless --num-layers")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--num-microbatches", type=int, default=None,
                   help="micro-batches per optimizer step (preset default: 4; the assignment look-ahead "
                        "overlaps micro-batch m+1's solve with micro-batch m)")
    p.add_argument("--num-layers", type=int, default=None, help="override the LLM depth")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None):
    p = step_shape_parser(__doc__.split("\n")[0])
    p.add_argument("--samples-per-row", type=int, default=1, help=">1 packs samples (each with an image)")
    p.add_argument("--pool-size", type=int, default=None)
    p.add_argument("--pool-init", choices=POOL_INITS, default=None,
                   help="the main rows' pool regime (default: the model's, token_scale: unit-norm rows; "
                        "normal: N(0,1) rows); the exposed-assignment sweep measures both")
    p.add_argument("--attention", choices=["visual", "prefix"], default="visual")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--sweep-microbatches", type=_positive, nargs="*", default=None,
                   help="micro-batch counts at which to measure the exposed assignment beyond the default "
                        "(preset: 8 16; tiny: 4); none: only the default count")
    p.add_argument("--sweep-iters", type=_positive, default=None,
                   help="timed steps per sweep configuration (after one warm-up; default 3, tiny 1)")
    p.add_argument("--breakdown", choices=["on", "off"], default="on",
                   help="the profiled step's breakdown of the Croc step (one extra step plus one profiled)")
    p.add_argument("--paper-baseline", choices=["on", "off"], default="on",
                   help="the paper's-stack row (transformers LLaVA + serial scipy + AdamW)")
    p.add_argument("--skip-local", action="store_true", help="skip the megatron local-spec GPT row")
    p.add_argument("--te", choices=["auto", "off"], default="auto", help="TE/FP8 rows when TE is importable")
    p.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default="hybrid")
    p.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8", "blockwise"], default="delayed")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="the main rows (GPT, Croc, paper's stack) always run; the optional ones (nearest matcher, "
                        "look-ahead off, the exposed-assignment sweep, local spec, TE) only while they are "
                        "expected to finish within this many seconds of the start")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.tiny and args.preset not in (None, "tiny"):
        p.error(f"--tiny is --model tiny; it cannot be combined with --model {args.preset}")
    args.preset = args.preset or ("tiny" if args.tiny else "croc-1b")
    args.tiny = args.preset == "tiny"
    if args.num_layers is not None and args.num_layers < 1:
        p.error(f"--num-layers must be >= 1, got {args.num_layers}")
    preset = PRESETS[args.preset]
    for name in ("seq_length", "micro_batch_size", "num_microbatches", "warmup", "iters"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if args.sweep_microbatches is None:
        args.sweep_microbatches = list(preset["sweep"])
    if args.sweep_iters is None:
        args.sweep_iters = 1 if args.tiny else 3
    args.warmup = max(1, args.warmup)
    return args


def _init(args) -> torch.device:
    if args.device == "cpu":
        os.environ["MEGATRON_CROC_FORCE_CPU"] = "1"
        if args.tiny:
            # Toy shapes gain nothing from intra-op threads, and on a shared machine OpenMP's
            # spinning workers made the CPU smoke run's step times swing 10x.
            torch.set_num_threads(1)
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


def _expected_s(item: dict, croc: dict | None, args) -> float:
    """How long an optional Croc configuration should take, from the Croc row (0 if unknown)."""
    if croc is None or item.get("kind") != "croc":
        return 0.0
    count = item.get("num_microbatches") or args.num_microbatches
    steps = 1 + (1 if item.get("sweep") else args.warmup) + (args.sweep_iters if item.get("sweep") else args.iters)
    return croc["build_s"] + steps * croc["step_s"] * count / args.num_microbatches


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    device = _init(args)
    from megatron_croc.config import PrecisionConfig, padded_sequence_length, validate
    from megatron_croc.platform import apex_available, te_available

    config = build_model_config(args)
    validate(config, has_te=False, has_apex=False)
    batch = make_batch(config, args)
    if device.type == "cuda":  # as the training data loader delivers batches on CUDA
        batch = {k: v.pin_memory() for k, v in batch.items()}
    lm = config.language
    dtype = config.params_dtype
    num_images = batch["images"].shape[0]
    print(f"bench_step on {device_name(device)}; torch {torch.__version__}; {args.dtype}; model {args.preset}: "
          f"LLM {llm_params(config) / 1e9:.2f}B ({lm.num_layers} layers, hidden {lm.hidden_size}, "
          f"{lm.num_attention_heads} heads / {lm.num_query_groups} kv groups, ffn {lm.ffn_hidden_size}, "
          f"vocab {lm.vocab_size}); vision {PRESETS[args.preset]['vision']}; pool {config.croc.pool_size} "
          f"({config.croc.pool_init}); micro-batch {args.micro_batch_size} x seq {args.seq_length}, {num_images} "
          f"images of {config.vision.num_image_tokens} tokens, {args.num_microbatches} micro-batch(es)/step; "
          f"median of {args.iters} steps after {args.warmup} warm-up", flush=True)

    result: dict[str, object] = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__, "dtype": args.dtype,
        "model": args.preset, "preset": args.preset, "num_layers": lm.num_layers, "hidden_size": lm.hidden_size,
        "num_attention_heads": lm.num_attention_heads, "ffn_hidden_size": lm.ffn_hidden_size,
        "vision": PRESETS[args.preset]["vision"], "seq_length": args.seq_length,
        "micro_batch_size": args.micro_batch_size, "num_microbatches": args.num_microbatches,
        "num_images": num_images, "pool_init": config.croc.pool_init, "lookahead": config.croc.assignment_lookahead,
        "llm_params": llm_params(config), "sweep_iters": args.sweep_iters, "rows": [], "sweep": [], "skipped": [],
    }
    n = PRESETS[args.preset]["matmul_n"]
    result["matmul_n"] = n
    result["matmul_tflops"] = matmul_tflops(device, dtype, n)
    print(f"  {args.dtype} matmul {n}^3: {result['matmul_tflops']:.1f} TFLOP/s", flush=True)

    plan = [
        dict(name=BASELINE, kind="gpt", spec="ours", model_config=config, use_te=False),
        dict(name=CROC, kind="croc", model_config=config, use_te=False, components=True,
             breakdown=args.breakdown == "on"),
    ]
    if args.paper_baseline == "on":
        plan.append(dict(name=PAPER, kind="paper", model_config=config))
    # The assignment's cost inside the step: the same step with the nearest matcher (an argmin
    # on the device, no host solve) is the step without it; the step without the look-ahead
    # shows what overlapping the host solve with the previous micro-batch saves.
    optional = [
        dict(name=CROC_NEAREST, kind="croc", model_config=config.replace(
            croc=dataclasses.replace(config.croc, matcher="nearest")), use_te=False),
        dict(name=CROC_NO_LOOKAHEAD, kind="croc", model_config=config.replace(
            croc=dataclasses.replace(config.croc, assignment_lookahead=False)), use_te=False),
        *sweep_items(config, args),
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
    for i, item in enumerate(plan + optional):
        croc = next((r for r in result["rows"] if r["name"] == CROC and "step_s" in r), None)
        if interrupted or (i >= len(plan) and time.perf_counter() - start + _expected_s(item, croc, args) > args.budget_s):
            result["skipped"].append(item["name"])
            continue
        item = dict(item)
        target = result["sweep"] if item.pop("sweep", False) else result["rows"]
        item_start = time.perf_counter()
        try:
            if item["kind"] == "paper":
                row = run_paper_row(item["name"], model_config=item["model_config"], args=args, batch=batch,
                                    device=device)
                if "skipped" in row:
                    print(f"  {item['name']}: skipped: {row['skipped']}", flush=True)
            else:
                sweep = target is result["sweep"]
                row = run_row(args=args, batch=batch, device=device, count_syncs=not sweep,
                              **(dict(warmup=1, iters=args.sweep_iters) if sweep else {}), **item)
            if "breakdown_error" in row:
                failures += 1
            row["wall_s"] = time.perf_counter() - item_start
            print(f"    ({row['wall_s']:.1f} s for this row; {time.perf_counter() - start:.0f} s so far)", flush=True)
            target.append(row)
        except BenchInterrupted as err:
            interrupted = f"interrupted ({err}) during {item['name']}"
            failures += 1
            target.append({"name": item["name"], "error": interrupted})
        except Exception as err:
            failures += 1
            traceback.print_exc()
            target.append({"name": item["name"], "error": f"{type(err).__name__}: {err}"})
            free(device)

    result["exposed_assignment"] = exposed_assignment(result)
    rows = {r["name"]: r for r in result["rows"] if "step_s" in r}
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

    print(f"\n=== step table ({result['device']}, {args.dtype}, model {args.preset}, LLM "
          f"{result['llm_params'] / 1e9:.2f}B, {lm.num_layers} layers, micro-batch {args.micro_batch_size} x "
          f"{args.seq_length}) ===")
    print(format_report(result))
    print(f"(bench_step wall time {result['wall_s']:.0f} s)")
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
