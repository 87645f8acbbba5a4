"""The memory report's arithmetic on one process (the model-state numbers are checked against a
measured run in tests/parallel/test_memory_report.py; activations against a GPU's peak in
tests/gpu/test_memory_gpu.py)."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_croc.config import ConfigError
from megatron_croc.training.arguments import parse_args
from megatron_croc.training.memory import (
    GIB,
    MemoryReport,
    StageParams,
    activations,
    in_flight_microbatches,
    model_state,
    run_shape,
    stage_params,
)


def _shape(*flags, world=8):
    config = parse_args(["--model", "vicuna-7b", "--data-path", "x", "--train-iters", "1", "--bf16",
                         "--micro-batch-size", "1", "--global-batch-size", "256", "--seq-length", "2048",
                         "--dry-run", "--dry-run-world-size", str(world), *flags])
    return run_shape(config)


def _stage(shape, stage, layers, *, params=2_000_000_000, trainable=1_800_000_000):
    pp = shape.pipeline_parallel
    return StageParams(stage=stage, ranks=(stage,), num_params=params, num_trainable=trainable,
                       llm_layers_per_chunk=layers, pre_process=stage == 0, post_process=stage == pp - 1)


def test_dry_run_flags():
    shape = _shape("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    assert (shape.world_size, shape.data_parallel, shape.num_microbatches) == (8, 2, 128)
    one_replica = run_shape(parse_args(["--dry-run", "--tensor-model-parallel-size", "2"]))
    assert one_replica.world_size == 2 and one_replica.data_parallel == 1
    with pytest.raises(ConfigError, match="--dry-run-world-size applies to --dry-run"):
        parse_args(["--dry-run-world-size", "8"])
    with pytest.raises(ConfigError, match="cannot be split"):
        parse_args(["--dry-run", "--dry-run-world-size", "3", "--tensor-model-parallel-size", "2"])


def test_micro_batches_in_flight_follow_megatron_cores_schedules():
    pp4 = _shape("--pipeline-model-parallel-size", "4")
    assert [in_flight_microbatches(pp4, s) for s in range(4)] == [4, 3, 2, 1]
    few = dataclasses.replace(pp4, num_microbatches=2)
    assert [in_flight_microbatches(few, s) for s in range(4)] == [2, 2, 2, 1]
    # interleaved, PP=2 x VP=2: warm-up 2 (PP - r - 1) + (VP - 1) PP chunks, + 1, each half a stage
    vp = _shape("--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
                "--num-layers", "32")
    assert [in_flight_microbatches(vp, s) for s in range(2)] == [2.5, 1.5]
    assert in_flight_microbatches(_shape(), 0) == 1


def test_optimizer_state_by_megatrons_rules():
    shape = _shape("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                   "--use-distributed-optimizer")
    state = model_state(shape, _stage(shape, 0, (16,)))
    n = 1_800_000_000
    assert state.weights == 2 * 2_000_000_000 and state.grads == 4 * n  # bf16 weights, fp32 grad buffer
    assert state.optimizer_replicated == 12 * n and state.optimizer == state.optimizer_distributed == 6 * n  # / DP=2
    fp32 = dataclasses.replace(shape, model=shape.model.replace(precision=dataclasses.replace(
        shape.model.precision, bf16=False)), use_distributed_optimizer=False)
    assert model_state(fp32, _stage(fp32, 0, (16,))).optimizer == 8 * n  # no master copy


def test_activations_shrink_with_recomputation_and_sequence_parallelism():
    base = _shape("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    stage = _stage(base, 1, (16,))

    def act(*flags, layers=(16,)):
        variant = _shape("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", *flags)
        return activations(variant, dataclasses.replace(stage, llm_layers_per_chunk=layers))

    none, sp = act(), act("--sequence-parallel")
    selective = act("--recompute-granularity", "selective")
    selective_mlp = act("--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp")
    uniform1 = act("--recompute-granularity", "full", "--recompute-method", "uniform")
    uniform4 = act("--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "4")
    block4 = act("--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "4")
    assert uniform4.per_microbatch < uniform1.per_microbatch < selective_mlp.per_microbatch \
        < selective.per_microbatch < none.per_microbatch
    assert uniform1.per_microbatch < block4.per_microbatch < none.per_microbatch
    assert sp.per_microbatch < none.per_microbatch
    # the last stage's own (final norm, cross entropy, VTR head), without LLM layers
    head = act(layers=(0,)).per_microbatch
    # full recomputation keeps each layer's input: 2048 tokens x 4096 x bf16
    assert (uniform1.per_microbatch - head) / 16 == pytest.approx(2048 * 4096 * 2, rel=1e-6)
    # chunks of 4 keep a quarter of those inputs, and recompute 4 layers at a time in backward
    assert (uniform4.per_microbatch - head) * 4 == pytest.approx(uniform1.per_microbatch - head, rel=1e-6)
    assert uniform1.workspace < uniform4.workspace
    # Vicuna-7B, TP=2, one micro-batch of 2048 tokens: ~0.2 GiB per layer without recomputation
    assert 0.15 * GIB < (none.per_microbatch - head) / 16 < 0.25 * GIB


def test_report_table_names_every_stage_and_choice():
    shape = _shape("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                   "--use-distributed-optimizer")
    report = MemoryReport(shape=shape, stages=(_stage(shape, 0, (16,)), _stage(shape, 1, (16,))))
    text = report.format()
    for expected in ("TP=2 PP=2 DP=2 (8 GPUs)", "selective (core_attn, mlp)", "full, uniform, 1 layer", "SP on",
                     "stage 0", "stage 1", "of 80 GiB"):
        assert expected in text, expected
    assert report.fits() and text.count("fits") == 2
    tight = dataclasses.replace(report, shape=dataclasses.replace(shape, gpu_memory_gb=20))
    assert not tight.fits() and "exceeds by" in tight.format()


def test_report_needs_a_process_without_a_process_group(megatron_world):
    with pytest.raises(RuntimeError, match="without torch.distributed initialised"):
        stage_params(_shape())


def test_dry_run_checks_the_layout_like_training(capsys):
    from megatron_croc.training.pretrain import main

    assert main(["--dry-run", "--model", "vicuna-7b", "--data-path", "x", "--train-iters", "1",
                 "--tensor-model-parallel-size", "3"]) == 2
    assert "error: --tensor-model-parallel-size 3 does not divide" in capsys.readouterr().err
