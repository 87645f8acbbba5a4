"""Memory of the Croc training step against the memory report's estimate (``--dry-run``,
``megatron_croc.training.memory``), with and without activation recomputation, in one run.

    PYTHONPATH=$PWD python bench/bench_memory.py                        # GPU: croc-1b (0.89B LLM + CLIP-L/336)
    PYTHONPATH=$PWD python bench/bench_memory.py --device cpu --tiny    # toy size, ~30 s on a CPU
    PYTHONPATH=$PWD python bench/bench_memory.py --device cpu --num-layers 2 --recompute none  # GBs of RSS

The step is bench_step's Croc step (bf16 ``Float16Module``, megatron-core DDP with an fp32
gradient buffer, megatron-core's Adam with fp32 master weights, ``forward_backward_no_pipelining``,
``--num-microbatches`` micro-batches), one GPU, for each ``--recompute`` setting in turn:

- model state: the bytes allocated after two optimizer steps, between steps (weights, gradient
  buffer, optimizer state) -- ``torch.cuda.memory_allocated`` on a GPU; on the CPU the bytes of
  live tensors and the growth of the process's resident set (RSS) since before the model;
- activations: on a GPU, the third step's ``torch.cuda.max_memory_allocated`` minus the model
  state (what the step adds at its peak: the in-flight activations and transient buffers).
  Not measured on the CPU (its kernels keep other tensors than the GPU's fused ones).

against the report for the same model and batch, computed in a process of its own (the report
plays ranks on fake process groups). Prints a table between ``=== memory table`` markers and a
``BENCH_MEMORY_JSON`` line.
"""

from __future__ import annotations

import gc
import itertools
import os
import sys
from typing import Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import (  # noqa: E402
    PRESETS,
    build_croc,
    build_model_config,
    croc_forward_step,
    make_batch,
    step_shape_parser,
    wrap_for_training,
)
from benchlib import device_name, emit_json  # noqa: E402

RECOMPUTE = {
    "none": dict(recompute_granularity=None),
    "selective": dict(recompute_granularity="selective", recompute_modules=("core_attn", "mlp")),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def _model_config(args, recompute: str):
    return build_model_config(args).replace(**RECOMPUTE[recompute])


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _allocated(device) -> int:
    from megatron_croc.testing import live_tensor_bytes

    return torch.cuda.memory_allocated(device) if device.type == "cuda" else live_tensor_bytes()


def _measure_worker(rank, world_size, args):
    """Every --recompute setting in turn in this process: model state and the step's peak."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from megatron_croc.platform import init_platform
    from megatron_croc.testing import init_distributed
    from megatron_croc.training.optim import OptimConfig, build_optimizer

    platform = init_platform(force_cpu=args.device == "cpu")
    init_distributed(seed=args.seed)
    device = platform.device
    results = {}
    for recompute in args.recompute:
        config = _model_config(args, recompute)
        batch = make_batch(config, args)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rss0, allocated0 = _rss(), _allocated(device)
        ddp = wrap_for_training(build_croc(config, use_te=False), config, device)
        optimizer = build_optimizer(OptimConfig(lr=1e-5), [ddp], bf16=config.precision.bf16)
        tc = get_model_config(ddp)
        tc.no_sync_func = ddp.no_sync
        tc.finalize_model_grads_func = finalize_model_grads
        tc.grad_scale_func = optimizer.scale_loss
        forward_step = croc_forward_step(config, device, args.num_microbatches)
        data = itertools.repeat(batch)

        def step():
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=data, model=[ddp],
                num_microbatches=args.num_microbatches, seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size, forward_only=False)
            ok, _, _ = optimizer.step()
            assert ok, "the step was skipped (non-finite gradients)"

        step()
        step()  # the optimizer's state exists from the first update on
        state = _allocated(device) - allocated0
        rss = _rss() - rss0
        peak = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - allocated0
        results[recompute] = dict(state=state, rss=rss, activations=None if peak is None else peak - state)
        del ddp, optimizer, tc, forward_step, step
    return results


def _report_worker(rank, world_size, args):
    """The report for each setting (its own process: fake process groups, CPU platform)."""
    from megatron_croc.training.memory import build_report, RunShape

    out = {}
    for recompute in args.recompute:
        shape = RunShape(model=_model_config(args, recompute), world_size=1, micro_batch_size=args.micro_batch_size,
                         seq_length=args.seq_length, num_microbatches=args.num_microbatches,
                         use_distributed_optimizer=False)
        report = build_report(shape)
        (stage,) = report.stages
        state, act = report.state(stage), report.activations(stage)
        out[recompute] = dict(state=state.total, weights=state.weights, grads=state.grads, optimizer=state.optimizer,
                              activations=act.peak, per_microbatch=act.per_microbatch, workspace=act.workspace)
    return out


def format_table(result: dict) -> str:
    big = max(row["report"]["state"] for row in result["rows"].values()) >= 2**30
    unit, scale = ("GiB", 2**30) if big else ("MiB", 2**20)
    gib = lambda n: "-" if n is None else f"{n / scale:.2f}"  # noqa: E731
    ratio = lambda a, b: "-" if a is None or not b else f"{a / b:.2f}"  # noqa: E731
    lines = ["=== memory table", f"{result['device']}; {result['model']}",
             f"{'recompute':<10} {'model state ' + unit:<28} {'activations at peak ' + unit:<30} {'total ' + unit:<26}",
             f"{'':<10} {'report  measured  ratio':<28} {'report  measured  ratio':<30} {'report  measured  ratio':<26}"]
    for name, row in result["rows"].items():
        rep, got = row["report"], row["measured"]
        total = None if got["activations"] is None else got["state"] + got["activations"]
        lines.append(
            f"{name:<10} {gib(rep['state']):<7} {gib(got['state']):<9} {ratio(got['state'], rep['state']):<10} "
            f"{gib(rep['activations']):<7} {gib(got['activations']):<9} {ratio(got['activations'], rep['activations']):<12} "
            f"{gib(rep['state'] + rep['activations']):<7} {gib(total):<9} "
            f"{ratio(total, rep['state'] + rep['activations'])}")
        if result["device_type"] == "cpu":
            lines.append(f"{'':<10} RSS growth {gib(got['rss'])} {unit} (model state, and the first row: the "
                         "allocator's and libraries' own)")
    lines.append("===")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None):
    p = step_shape_parser(__doc__.split("\n")[0])
    p.add_argument("--recompute", nargs="+", choices=list(RECOMPUTE), default=list(RECOMPUTE))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.tiny else "croc-1b")
    preset = PRESETS[args.preset]
    for name in ("seq_length", "micro_batch_size", "num_microbatches"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    # what bench_step's helpers read
    args.pool_size, args.attention, args.samples_per_row = None, "visual", 1
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible; use --device cpu --tiny")
    from megatron_croc.testing import run_distributed

    reports = run_distributed(_report_worker, 1, args=args, timeout=600)[0]
    if args.device == "cpu":
        os.environ["MEGATRON_CROC_FORCE_CPU"] = "1"
    measured = run_distributed(_measure_worker, 1, args=args, timeout=1800)[0]
    lm = build_model_config(args).language
    result = {
        "device": device_name(torch.device(args.device)), "device_type": args.device,
        "model": f"{args.preset}: LLM {lm.num_layers} layers, hidden {lm.hidden_size}; {args.dtype}; micro-batch "
                 f"{args.micro_batch_size} x {args.seq_length}, {args.num_microbatches} micro-batches per step",
        "rows": {name: {"report": reports[name], "measured": measured[name]} for name in args.recompute},
    }
    print(format_table(result), flush=True)
    emit_json("BENCH_MEMORY_JSON", result, args.json_out)
    return result


if __name__ == "__main__":
    main()
