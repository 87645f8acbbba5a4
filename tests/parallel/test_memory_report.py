"""The memory report (``--dry-run``, megatron_croc.training.memory) against what a training run
really allocates, on the CPU: the trainer's own model chunks, DDP wrapping, optimizer and one
step, on two gloo processes, at three layouts; per rank, the bytes of live tensors that each part
added (weights; gradient buffers; the optimizer with its first update), against the report
built on the meta device for the same flags.

Tolerance: the report leaves out the model's non-parameter buffers (rotary frequencies, CLIP's
pixel statistics and position ids), DDP's bucket padding and the optimizer's step counters and
scalars: measured +0.01-0.06% (weights), +0.00% (gradients), +0.5-0.9% (optimizer) for this tiny
model, far less for a 7B one. A wrong dtype, a missed sharding or a missed master copy is a
factor of 1.5-4.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from megatron_croc.testing import live_tensor_bytes, run_distributed, synthetic_batch

pytestmark = pytest.mark.parallel

SEQ = 64
# On two processes (the machine's two cores): each part of the estimate at least once.
LAYOUTS = {
    # the demo's layout: stages hold different modules; bf16 with fp32 master weights
    "pp2-bf16": ["--pipeline-model-parallel-size", "2", "--bf16"],
    # master weights and Adam's moments sharded over the data-parallel ranks
    "dp2-bf16-distopt": ["--bf16", "--use-distributed-optimizer"],
    # tensor-parallel shards; fp32, no master copy
    "tp2-fp32": ["--tensor-model-parallel-size", "2"],
}
WORLD = 2


def _argv(extra):
    return ["--data-path", "unused", "--train-iters", "1", "--seq-length", str(SEQ), "--micro-batch-size", "2",
            "--global-batch-size", "8", "--num-layers", "4", *extra]


def _measure_worker(rank, world_size):
    from megatron_croc.platform import init_platform
    from megatron_croc.training.arguments import parse_args
    from megatron_croc.training.pretrain import init_distributed

    platform = init_platform()
    measured = {}
    for name, extra in LAYOUTS.items():
        config = parse_args(_argv(extra), world_size=world_size)
        init_distributed(config, platform)
        measured[name] = _measure(config, platform)  # everything it built is gone when it returns
    return measured


def _measure(config, platform):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config, unwrap_model

    from megatron_croc.models.croc import pipeline_tensor_seq_length
    from megatron_croc.training.optim import build_optimizer
    from megatron_croc.training.pretrain import build_model_chunks, wrap_ddp
    from megatron_croc.training.step import StepStats, make_forward_step

    m = config.global_batch_size // (config.micro_batch_size * ps.get_data_parallel_world_size())
    batches = []
    for i in range(m):
        batch = synthetic_batch(num_image_tokens=16, image_size=32, vocab_size=config.model.language.vocab_size,
                                seq_length=SEQ, rows=[[dict(prompt=3, image=True, question=2, answer=6)]] * 2, seed=i)
        batch["image_sample_ids"] = batch.pop("image_keys")
        batches.append(batch)
    start = live_tensor_bytes()
    chunks = build_model_chunks(config.model, platform)
    built = live_tensor_bytes()
    ddp = wrap_ddp(chunks, config)
    wrapped = live_tensor_bytes()
    optimizer = build_optimizer(config.optim, ddp, bf16=config.model.precision.bf16)
    tc = get_model_config(ddp[0])
    tc.no_sync_func = ddp[0].no_sync
    tc.finalize_model_grads_func = finalize_model_grads
    tc.grad_scale_func = optimizer.scale_loss
    tc.batch_p2p_comm = False
    # one step: Adam's state exists from the first update on
    get_forward_backward_func()(
        forward_step_func=make_forward_step(config.model, platform.device, StepStats(), num_microbatches=m),
        data_iterator=iter(batches), model=ddp, num_microbatches=m,
        seq_length=pipeline_tensor_seq_length(config.model, SEQ), micro_batch_size=2, forward_only=False)
    update_ok, _, _ = optimizer.step()
    assert update_ok
    for chunk in chunks:  # the last micro-batch's received activations: not optimizer state
        unwrap_model(chunk).set_input_tensor(None)
    stepped = live_tensor_bytes()
    return dict(stage=ps.get_pipeline_model_parallel_rank(), weights=built - start, grads=wrapped - built,
                optimizer=stepped - wrapped)


def _report_worker(rank, world_size):
    """The reports, in a process of its own (the report builds fake process groups): the two
    layouts, and the whole Vicuna-7B model on one GPU."""
    from megatron_croc.training.arguments import parse_args
    from megatron_croc.training.memory import build_report, run_shape

    reports = {}
    for name, extra in LAYOUTS.items():
        config = parse_args(_argv([*extra, "--dry-run", "--dry-run-world-size", str(WORLD)]))
        report = build_report(run_shape(config))
        reports[name] = {s.stage: dict(ranks=s.ranks, weights=report.state(s).weights, grads=report.state(s).grads,
                                       optimizer=report.state(s).optimizer) for s in report.stages}
    config = parse_args(["--dry-run", "--model", "vicuna-7b", "--data-path", "unused", "--train-iters", "1", "--bf16"])
    (stage,) = build_report(run_shape(config)).stages
    return reports, (stage.num_params, stage.num_trainable)


@pytest.fixture(scope="module")
def reports():
    return run_distributed(_report_worker, 1, timeout=300)[0]


def test_report_matches_what_a_run_allocates(reports):
    reports, _ = reports
    measured = run_distributed(_measure_worker, WORLD, timeout=400)
    for name in LAYOUTS:
        for rank, per_rank in enumerate(measured):
            got = per_rank[name]
            estimate = reports[name][got["stage"]]
            assert rank in estimate["ranks"], (name, rank, estimate["ranks"])
            for part in ("weights", "grads", "optimizer"):
                want = estimate[part]
                assert want > 0
                assert abs(got[part] - want) <= 0.015 * want + 8 * 1024, (
                    f"{name} rank {rank} {part}: report {want} bytes, measured {got[part]}")


def test_dry_run_prints_the_7b_report_in_seconds():
    """The README's example through the trainer's command line: a 7B model is never allocated."""
    argv = [sys.executable, "-m", "megatron_croc.training.pretrain", "--dry-run", "--model", "vicuna-7b",
            "--data-path", "unused", "--train-iters", "1", "--tensor-model-parallel-size", "2",
            "--pipeline-model-parallel-size", "2", "--dry-run-world-size", "8", "--micro-batch-size", "1",
            "--global-batch-size", "256", "--seq-length", "2048", "--bf16", "--use-distributed-optimizer",
            "--sequence-parallel", "--recompute-granularity", "full", "--recompute-method", "uniform",
            "--gpu-memory-gb", "16"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    start = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "TP=2 PP=2 DP=2 (8 GPUs)" in text and "recompute full, uniform, 1 layer, sequence parallel on" in text
    assert "0      0-3" in text and "1      4-7" in text
    # 80 GB fits this layout; 16 GiB does not hold the model state of a stage
    assert text.count("exceeds by") == 2, text
    assert elapsed < 60, f"the 7B dry run took {elapsed:.0f} s"


def test_meta_build_has_the_published_parameter_counts(reports):
    """The meta-device build is the real architecture: Vicuna-7B's 6,738,415,616 LLM parameters
    (HF count), CLIP ViT-L/14-336 without its unused last layer and post-norm, the projector,
    the 2048 x 4096 pool and the VTR head (one Llama layer, position embedding, Linear H->H)."""
    _, (num_params, num_trainable) = reports
    h, f = 4096, 11008
    llama_layer = 4 * h * h + 3 * h * f + 2 * h
    clip_layer = 4 * 1024 * 1024 + 4 * 1024 + 2 * 1024 * 4096 + 4096 + 1024 + 4 * 1024  # attn, mlp, 2 LNs
    clip = 23 * clip_layer + 3 * 14 * 14 * 1024 + 1024 + 577 * 1024 + 2 * 1024  # patch conv, class token, pos, ln_pre
    projector = 1024 * h + h + h * h + h
    pool = 2048 * h
    vtr = llama_layer + 576 * h + h * h + h
    assert num_params == 6_738_415_616 + clip + projector + pool + vtr
    assert num_trainable == num_params - clip  # the frozen encoder
