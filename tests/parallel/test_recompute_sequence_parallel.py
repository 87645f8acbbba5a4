"""Activation recomputation and sequence parallelism at PP=2, TP=2 and TP2xPP2, through the
trainer's own path: its model chunks and DDP wrapping (training.pretrain), its forward step
(training.step) and megatron-core's pipeline schedule with finalize_model_grads, for one
optimizer step of several micro-batches of the comprehension stage (mixed attention, packed rows,
padding, text-only samples; 1F1B keeps several micro-batches in flight, each with its own layout).

- Recomputation (selective; full with uniform and block) is compared with no recomputation at
  the same layout: losses and every parameter's gradient bit-identical (CPU, fp32: the
  recomputed forward reruns the same kernels on the same inputs).
- Sequence parallelism at TP=2 (and TP2xPP2) is compared with TP=1 (and TP1xPP2) from the same
  weights: losses and gradients within 1e-5 relative (fp32; TP splits GEMMs and sums partial
  results in another order; sequence parallelism replaces all-reduces by reduce-scatter +
  all-gather, another order again). A missing gradient reduction of a norm, a wrong splice of
  the visual tokens or a VTR head reading the wrong positions changes them at 1e-2 or more.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_croc.testing import run_distributed

pytestmark = pytest.mark.parallel

SEQ = 64
MICRO_BATCHES = 4
RTOL = 1e-5
RECOMPUTE = {
    "selective": ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"],
    "full-uniform": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "full-block": ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"],
}
# Each micro-batch its own packing: images, text-only samples, padding.
MICRO_BATCH_ROWS = [
    [[dict(prompt=3, image=True, question=2, answer=5), dict(prompt=2, image=False, question=1, answer=3)],
     [dict(prompt=1, image=True, question=0, answer=4)]],
    [[dict(prompt=0, image=True, question=2, answer=6), dict(prompt=1, image=True, question=1, answer=2)],
     [dict(prompt=4, image=False, question=1, answer=8)]],
]


def _batches(model_config):
    from megatron_croc.testing import synthetic_batch

    batches = []
    for m in range(MICRO_BATCHES):
        batch = synthetic_batch(num_image_tokens=model_config.vision.num_image_tokens,
                                image_size=model_config.vision.image_size,
                                vocab_size=model_config.language.vocab_size, seq_length=SEQ,
                                rows=MICRO_BATCH_ROWS[m % len(MICRO_BATCH_ROWS)], seed=m)
        batch["image_sample_ids"] = batch.pop("image_keys")  # the data loader's name
        batches.append(batch)
    return batches


def _config(tp, pp, world, extra):
    """The trainer's config from its flags (the tiny preset with 4 layers: 2 per stage at PP=2,
    so uniform and block recomputation differ)."""
    from megatron_croc.training.arguments import parse_args

    dp = world // (tp * pp)
    return parse_args(["--data-path", "unused", "--train-iters", "1", "--num-layers", "4", "--seq-length", str(SEQ),
                       "--micro-batch-size", "2", "--global-batch-size", str(2 * MICRO_BATCHES * dp),
                       "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp), *extra],
                      world_size=world)


def _step(tp, pp, extra, weights):
    """One step at layout TP x PP with flags ``extra`` from full-size ``weights`` (None: keep
    the initialisation). Returns this rank's loss parts per micro-batch (last stage) and full
    (TP-gathered) weights and gradients of its stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from megatron_croc.models.croc import pipeline_tensor_seq_length
    from megatron_croc.models.parallel_plan import full_tensors, load_full_state
    from megatron_croc.platform import init_platform
    from megatron_croc.training.pretrain import build_model_chunks, init_distributed, wrap_ddp
    from megatron_croc.training.step import StepStats, make_forward_step

    config = _config(tp, pp, int(os.environ["WORLD_SIZE"]), extra)
    platform = init_platform()
    init_distributed(config, platform)
    chunks = build_model_chunks(config.model, platform)
    (model,) = chunks
    tp_group = ps.get_tensor_model_parallel_group()
    if weights is not None:
        load_full_state(model, weights, ps.get_tensor_model_parallel_rank(), tp)
    full_weights = full_tensors(model, {n: p.detach().clone() for n, p in model.named_parameters()}, tp_group)
    ddp = wrap_ddp(chunks, config)
    tc = get_model_config(ddp[0])
    tc.no_sync_func = ddp[0].no_sync
    tc.finalize_model_grads_func = finalize_model_grads
    tc.batch_p2p_comm = False  # as the trainer on gloo
    forward_step = make_forward_step(config.model, platform.device, StepStats(), num_microbatches=MICRO_BATCHES)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(_batches(config.model)), model=ddp,
        num_microbatches=MICRO_BATCHES, seq_length=pipeline_tensor_seq_length(config.model, SEQ),
        micro_batch_size=2, forward_only=False,
    )
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return ([{k: float(v) for k, v in mb.items()} for mb in losses], full_weights,
            full_tensors(model, grads, tp_group))


def _worker(rank, world_size, tp, pp, variants):
    """The reference at TP=1 (same PP), then each variant at TP x PP from its weights.
    Gradients go back as numpy arrays: tensors would travel as shared-memory handles that the
    parent can only open while this process is still alive."""
    ref_losses, weights, ref_grads = _step(1, pp, [], None)
    results = {"reference": (ref_losses, ref_grads)}
    for name, extra in variants.items():
        losses, _, grads = _step(tp, pp, extra, weights)
        results[name] = (losses, grads)
    return {name: (losses, {k: g.numpy() for k, g in grads.items()}) for name, (losses, grads) in results.items()}


def _differences(got, want, *, exact):
    """Human-readable differences between two (losses, grads) results."""
    (losses, grads), (ref_losses, ref_grads) = got, want
    grads = {k: torch.from_numpy(g) for k, g in grads.items()}
    ref_grads = {k: torch.from_numpy(g) for k, g in ref_grads.items()}
    out = []
    if len(losses) != len(ref_losses):
        return [f"{len(losses)} micro-batch losses, expected {len(ref_losses)}"]
    for m, (mb, ref) in enumerate(zip(losses, ref_losses)):
        for key in ref:
            if (mb[key] != ref[key]) if exact else abs(mb[key] - ref[key]) > RTOL * abs(ref[key]) + 1e-8:
                out.append(f"micro-batch {m} {key}: {mb[key]!r} vs {ref[key]!r}")
    if set(grads) != set(ref_grads):
        return out + [f"parameters differ: {sorted(set(grads) ^ set(ref_grads))}"]
    for name, ref in ref_grads.items():
        if exact:
            if not torch.equal(grads[name], ref):
                out.append(f"gradient of {name} not bit-identical (max diff {(grads[name] - ref).abs().max():.2e})")
        else:
            diff = float((grads[name] - ref).norm() / ref.norm().clamp(min=1e-12))
            if diff > RTOL:
                out.append(f"gradient of {name}: relative difference {diff:.2e}")
    return out


def _check(results, *, baselines):
    """``baselines``: variant -> (what it must equal, exactly?)."""
    problems = []
    for rank, per_rank in enumerate(results):
        losses, grads = per_rank["reference"]
        assert len(grads) > 10 and all(torch.isfinite(torch.from_numpy(g)).all() for g in grads.values())
        for name, (baseline, exact) in baselines.items():
            problems += [f"rank {rank} {name} vs {baseline}: {p}"
                         for p in _differences(per_rank[name], per_rank[baseline], exact=exact)]
    assert not problems, "\n".join(problems[:20])
    last_stage_losses = [r["reference"][0] for r in results if r["reference"][0]]
    assert last_stage_losses and all(len(ls) == MICRO_BATCHES for ls in last_stage_losses)
    assert all(ls[0]["vtr loss"] > 0 for ls in last_stage_losses)


def test_recomputation_at_pp2_is_bit_identical():
    variants = {"none": []} | RECOMPUTE
    results = run_distributed(_worker, 2, tp=1, pp=2, variants=variants, timeout=300)
    _check(results, baselines={"none": ("reference", True)} | {name: ("none", True) for name in RECOMPUTE})


def test_sequence_parallelism_and_recomputation_at_tp2():
    sp = ["--sequence-parallel"]
    variants = {"tp2": [], "tp2-sp": sp} | {f"tp2-{n}": f for n, f in RECOMPUTE.items()} | {
        f"tp2-sp-{n}": sp + f for n, f in RECOMPUTE.items()}
    results = run_distributed(_worker, 2, tp=2, pp=1, variants=variants, timeout=300)
    _check(results, baselines={"tp2": ("reference", False), "tp2-sp": ("reference", False)}
           | {f"tp2-{n}": ("tp2", True) for n in RECOMPUTE} | {f"tp2-sp-{n}": ("tp2-sp", True) for n in RECOMPUTE})


def test_sequence_parallelism_and_recomputation_at_tp2_pp2():
    sp = ["--sequence-parallel"]
    variants = {"tp2pp2": [], "tp2pp2-sp": sp, "tp2pp2-full-uniform": RECOMPUTE["full-uniform"]} | {
        f"tp2pp2-sp-{n}": sp + f for n, f in RECOMPUTE.items()}
    results = run_distributed(_worker, 4, tp=2, pp=2, variants=variants, timeout=400)
    _check(results, baselines={"tp2pp2": ("reference", False), "tp2pp2-sp": ("reference", False),
                               "tp2pp2-full-uniform": ("tp2pp2", True)}
           | {f"tp2pp2-sp-{n}": ("tp2pp2-sp", True) for n in RECOMPUTE})
