"""The training entry point: setup, loop, shutdown.

    torchrun --nproc-per-node N -m megatron_croc.training.pretrain [Megatron-style flags]

(``examples/pretrain_croc.sh`` runs this through :mod:`megatron_croc.training.launcher`.) With
no ``--data-path`` it runs the embedded default: the tiny Croc model on the bundled demo data
(generated in seconds on first use), on the CPU when there is no GPU.

How a run ends:
- done (``--train-iters`` reached), or stopped early by ``--exit-signal-handler``,
  ``--exit-duration-in-mins`` or ``--exit-interval``: a checkpoint (with ``--save``), exit 0;
- a bad input: one ``error:`` line from rank 0, exit 2, before any process group exists;
- an exception on any rank: its message once, tagged with the rank's TP/PP/DP coordinates, and
  that process exits at once (``distributed.exit_after_failure``); the launcher then stops the
  other ranks. Nothing waits on a peer that has died: no barrier in a ``finally``.

Heavy imports (torch, megatron-core) happen inside the functions, so ``--help`` is instant.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from megatron_croc.config import ConfigError
from megatron_croc.training.config import TrainConfig

if TYPE_CHECKING:
    import torch

    from megatron_croc.platform import Platform
    from megatron_croc.training.preflight import RunPlan
    from megatron_croc.training.step import StepStats


class TrainingError(RuntimeError):
    """Training cannot go on, as all ranks agreed (e.g. too many consecutive non-finite steps)."""


def _rank0_print(*args) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def init_distributed(config: TrainConfig, platform: "Platform") -> None:
    from megatron_croc.distributed import init_model_parallel, init_process_group

    init_process_group(platform.backend)
    par = config.model.parallel
    init_model_parallel(tensor_parallel=par.tensor_model_parallel_size, pipeline_parallel=par.pipeline_model_parallel_size,
                        virtual_pipeline_parallel=par.virtual_pipeline_model_parallel_size, seed=config.seed)


def build_model_chunks(model_config, platform: "Platform") -> list:
    """One CrocModel per virtual pipeline stage held by this rank, wrapped for bf16. Built
    directly on the device, where each draws its (layout-independent) initial weights."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    from megatron_croc.models.croc import CrocModel

    vp = model_config.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for v in range(vp or 1):
        vp_stage = v if vp else None
        with torch.device(platform.device):
            chunk = CrocModel(
                model_config,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                use_te=platform.has_te,
                vp_stage=vp_stage,
            )
        chunk.to(platform.device)
        if model_config.precision.bf16:
            chunk = Float16Module(chunk.config, chunk)
        chunks.append(chunk)
    return chunks


def wrap_ddp(chunks: list, config: TrainConfig) -> list:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=config.overlap_grad_reduce,
        use_distributed_optimizer=config.optim.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk's buckets overlap with backward (Megatron-LM's rule).
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]


def _data_iterators(config: TrainConfig, consumed_samples: int, *, pin_memory: bool, valid: bool = False):
    from megatron.core import parallel_state as ps

    from megatron_croc.data.dataset import DataLoaderConfig, build_data_loader

    paths = config.data.valid_data_path if valid else config.data.data_path
    if not paths:
        return None
    loader_config = DataLoaderConfig(
        data_path=paths, seq_length=config.data.seq_length, num_image_tokens=config.model.vision.num_image_tokens,
        micro_batch_size=config.micro_batch_size, global_batch_size=config.global_batch_size,
        seed=config.seed, packing=config.data.pack_sequences, num_workers=config.data.num_workers,
        shuffle=not valid,
        # pinned batches copy to the GPU without waiting for it (pageable ones may sync the stream)
        pin_memory=pin_memory,
    )
    vp = config.model.parallel.virtual_pipeline_model_parallel_size or 1
    # Every model chunk reads the same stream: each stage needs the micro-batch's layout.
    return [
        build_data_loader(loader_config, dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                          consumed_samples=consumed_samples)
        for _ in range(vp)
    ]


def _reduce_step(losses: list[dict], stats: "StepStats", chunks: list, device: "torch.device", *,
                 check_grads: bool, stop_request: int = 0) -> tuple[dict[str, float], int, int, bool, int]:
    """The step's reported numbers, whether it is finite, and the agreed exit request (a code
    of training.exits), agreed by all ranks: on the last stage one data-parallel all-reduce of
    [loss parts averaged over micro-batches, samples, images]; then one all-rank MAX of
    ["losses or (``check_grads``) gradients not finite", this rank's exit request]. On the
    device (NCCL reduces no CPU tensors), read back once each."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    flags = torch.tensor([0.0, float(stop_request)], device=device)
    parts: dict[str, float] = {}
    num_samples = num_images = 0
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    if last:
        keys = sorted(losses[0]) if losses else []
        means = [torch.stack([mb[k].double() for mb in losses]).mean() for k in keys]
        counts = torch.tensor([stats.num_samples, stats.num_images], dtype=torch.float64, device=device)
        packed = torch.cat([torch.stack(means).to(device) if means else counts[:0], counts])
        dist.all_reduce(packed, group=ps.get_data_parallel_group())
        flags[0] = (~torch.isfinite(packed)).any().float()
    if check_grads:
        grads = [torch.isfinite(b.grad_data).all() for chunk in chunks for b in chunk.buffers]
        if grads:
            flags[0] = torch.maximum(flags[0], (~torch.stack(grads).all()).float().to(device))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    not_finite, stop = flags.tolist()
    if last:
        host = packed.tolist()
        dp = ps.get_data_parallel_world_size()
        parts = {k: v / dp for k, v in zip(keys, host)}
        num_samples, num_images = int(host[-2]), int(host[-1])
    return parts, num_samples, num_images, not_finite == 0.0, int(stop)


def evaluate(config: TrainConfig, forward_backward, chunks, iterators, forward_step, stats: "StepStats",
             num_microbatches: int, seq_length: int) -> dict[str, float]:
    """Mean loss parts over ``--eval-iters`` global batches of the validation data."""
    import torch

    from megatron_croc.platform import get_platform

    for chunk in chunks:
        chunk.eval()
    totals: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(config.eval_iters):
            stats.reset()
            losses = forward_backward(
                forward_step_func=forward_step, data_iterator=iterators if len(iterators) > 1 else iterators[0],
                model=chunks, num_microbatches=num_microbatches, seq_length=seq_length,
                micro_batch_size=config.micro_batch_size, forward_only=True,
            )
            parts, _, _, _, _ = _reduce_step(losses, stats, chunks, get_platform().device, check_grads=False)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v / config.eval_iters
    for chunk in chunks:
        chunk.train()
    return totals


def train(config: TrainConfig, *, plan: "RunPlan | None" = None) -> dict[str, object]:
    """Run training; returns a summary (per-iteration losses, paths, how it ended) for callers
    and tests. ``plan``: the checked plan of :func:`preflight.plan_run` (made here if absent)."""
    import torch.distributed as dist

    from megatron_croc.platform import init_platform
    from megatron_croc.training.checkpoint import load_checkpoint
    from megatron_croc.training.exits import ExitConditions
    from megatron_croc.training.optim import build_optimizer, build_scheduler
    from megatron_croc.training.preflight import plan_run

    platform = init_platform()
    if plan is None:
        plan = plan_run(config, has_te=platform.has_te, has_apex=platform.has_apex,
                        has_cuda=platform.has_cuda)
    config = plan.config
    if plan.nothing_to_do:
        return {"history": [], "last_checkpoint": None, "wall_time_s": 0.0, "iteration": plan.resume_iteration,
                "start_iteration": plan.resume_iteration, "iterations_run": 0, "skipped": 0,
                "is_writer": True, "stopped_by": None, "nothing_to_do": plan.nothing_to_do}
    init_distributed(config, platform)
    model_config = config.model
    rank, world = dist.get_rank(), dist.get_world_size()
    is_writer = rank == world - 1  # on the last pipeline stage, where the losses are

    chunks = wrap_ddp(build_model_chunks(model_config, platform), config)
    optimizer = build_optimizer(config.optim, chunks, bf16=model_config.precision.bf16)
    scheduler = build_scheduler(config.optim, optimizer, train_iters=config.train_iters,
                                global_batch_size=config.global_batch_size)

    iteration, consumed = 0, 0
    carried_state: dict = {}
    if config.checkpoint.load:
        common = load_checkpoint(
            config.checkpoint.load, model_chunks=chunks, optimizer=optimizer, scheduler=scheduler,
            stage=model_config.croc.stage, no_load_optim=config.checkpoint.no_load_optim,
            no_load_rng=config.checkpoint.no_load_rng, finetune=config.checkpoint.finetune,
            override_scheduler=config.optim.override_opt_param_scheduler,
        )
        iteration = int(common["iteration"])
        # what tools/convert_checkpoint.py recorded (the HF source), so exports need no flags
        if "hf_conversion" in common:
            carried_state["hf_conversion"] = common["hf_conversion"]
        consumed = int(common.get("data", {}).get("consumed_samples", 0))
        _rank0_print(f"loaded {config.checkpoint.load} at iteration {iteration} "
                     f"(optimizer state: {'yes' if common['loaded_optimizer'] else 'no, fresh'}; "
                     f"initialised fresh: {', '.join(common['initialised_fresh']) or 'nothing'})")

    pin = platform.device.type == "cuda"
    # before the data loader starts its workers: they inherit the handler (see training.exits)
    exits = ExitConditions(config=config.exit).install()
    try:
        return _train_loop(config, plan, platform, chunks, optimizer, scheduler, exits, iteration=iteration,
                           consumed=consumed, carried_state=carried_state, pin=pin, is_writer=is_writer, world=world)
    finally:
        exits.uninstall()


def _train_loop(config, plan, platform, chunks, optimizer, scheduler, exits, *, iteration, consumed, carried_state,
                pin, is_writer, world):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from megatron_croc.models.croc import pipeline_tensor_seq_length
    from megatron_croc.training.checkpoint import save_checkpoint, write_run_state
    from megatron_croc.training.fault_injection import nonfinite_iterations, planned_fault
    from megatron_croc.training.logging import TrainingLogger
    from megatron_croc.training.optim import lr_schedule
    from megatron_croc.training.step import StepStats, make_forward_step

    model_config = config.model
    start_iteration = iteration
    dp = ps.get_data_parallel_world_size()
    num_microbatches = config.global_batch_size // (config.micro_batch_size * dp)
    seq_length = pipeline_tensor_seq_length(model_config, config.data.seq_length)
    train_iters = _data_iterators(config, consumed, pin_memory=pin)
    valid_iters = _data_iterators(config, 0, pin_memory=pin, valid=True) if config.eval_interval else None

    tc = get_model_config(chunks[0])
    tc.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    tc.finalize_model_grads_func = finalize_model_grads
    tc.grad_scale_func = optimizer.scale_loss
    if platform.backend == "gloo":
        # gloo matches the several sends/receives of one batch_isend_irecv between the same two
        # ranks in no fixed order: the interleaved schedule then received other micro-batches'
        # activations (measured: losses off by 1e-4). Separate, ordered p2p calls are exact.
        tc.batch_p2p_comm = False
    forward_backward = get_forward_backward_func()
    fault = planned_fault()
    stats = StepStats(fault)
    # one forward step for training and evaluation (the schedule calls it num_microbatches times)
    forward_step = make_forward_step(model_config, platform.device, stats, num_microbatches=num_microbatches)
    logger = TrainingLogger(model_config=model_config, log_interval=config.log_interval, world_size=world,
                            tensorboard_dir=config.tensorboard_dir, is_writer=is_writer)
    inject_nonfinite = nonfinite_iterations()
    history: list[dict[str, float]] = []
    consecutive_skips = total_skips = 0
    last_saved = None
    stopped_by = None
    schedule = lr_schedule(config.optim, train_iters=config.train_iters, global_batch_size=config.global_batch_size)

    def save(at: int):
        if fault is not None:
            fault.fire("save", at)
        return save_checkpoint(
            config.checkpoint.save, at, model_chunks=chunks, optimizer=optimizer, scheduler=scheduler,
            extra_state={"data": {"consumed_samples": train_iters[0].consumed_samples},
                         "croc_stage": model_config.croc.stage, "lr_schedule": schedule,
                         "model_config": {"vocab_size": model_config.language.vocab_size}, **carried_state},
            keep_last=config.checkpoint.keep_last,
        )

    _rank0_print(
        f"training {model_config.croc.stage} stage: TP={model_config.parallel.tensor_model_parallel_size} "
        f"PP={model_config.parallel.pipeline_model_parallel_size} DP={dp} on {platform.device.type} "
        f"({platform.backend}), {num_microbatches} micro-batches of "
        f"{config.micro_batch_size} x {config.data.seq_length} tokens per step, iterations "
        f"{iteration + 1}..{config.train_iters}"
    )
    for note in plan.notes:
        _rank0_print(f"note: {note}")
    start_time = time.perf_counter()
    while iteration < config.train_iters:
        stats.reset()
        stats.iteration = iteration + 1
        stats.inject_nonfinite = (iteration + 1) in inject_nonfinite
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=forward_step,
            data_iterator=train_iters if len(train_iters) > 1 else train_iters[0],
            model=chunks, num_microbatches=num_microbatches, seq_length=seq_length,
            micro_batch_size=config.micro_batch_size, forward_only=False,
        )
        parts, num_samples, num_images, finite, stop = _reduce_step(
            losses, stats, chunks, platform.device, check_grads=True, stop_request=exits.local_request())
        grad_norm = None
        if finite:
            stats.maybe_fail("optimizer")
            update_ok, grad_norm, _ = optimizer.step()
            finite = bool(update_ok) and (grad_norm is None or math.isfinite(grad_norm))
        iteration += 1
        lr_used = next(iter(_group_lrs(optimizer).values()))  # the first group's (align trains no "main")
        if finite:
            scheduler.step(increment=config.global_batch_size)  # as Megatron: not after a skipped update
            consecutive_skips = 0
        else:
            consecutive_skips += 1
            total_skips += 1
            _rank0_print(f"iteration {iteration}: non-finite loss or gradients; step skipped "
                         f"({consecutive_skips} in a row)")
            if consecutive_skips >= config.max_skipped_steps:
                raise TrainingError(
                    f"{consecutive_skips} consecutive steps had non-finite loss or gradients (last at iteration "
                    f"{iteration}); stopping. Lower --lr, check the data, or resume from the last checkpoint."
                )
        if finite:
            history.append({"iteration": iteration, **parts, "lr": lr_used})
            logger.record(losses=parts, num_tokens=config.global_batch_size * config.data.seq_length,
                          num_samples=num_samples, num_images=num_images, seq_length=config.data.seq_length)
        logger.maybe_log(iteration, config.train_iters, lrs=_group_lrs(optimizer), grad_norm=grad_norm,
                         skipped=total_skips)
        if valid_iters and config.eval_interval and iteration % config.eval_interval == 0:
            val = evaluate(config, forward_backward, chunks, valid_iters, forward_step, stats, num_microbatches,
                           seq_length)
            if is_writer:
                print(f"validation at iteration {iteration}: " + " | ".join(f"{k}: {v:.4g}" for k, v in val.items()),
                      flush=True)
        stopped_by = exits.describe(stop, iteration) if iteration < config.train_iters else None
        should_save = config.checkpoint.save and (
            (config.checkpoint.save_interval and iteration % config.checkpoint.save_interval == 0)
            or iteration == config.train_iters or stopped_by is not None
        )
        if should_save:
            last_saved = save(iteration)
        if stopped_by is not None:
            _rank0_print(f"stopping at iteration {iteration} of {config.train_iters}: {stopped_by}"
                         + (f"; checkpoint saved (resume with --load {config.checkpoint.save})"
                            if config.checkpoint.save else "; no --save, nothing saved"))
            break
    if config.checkpoint.save:
        write_run_state(config.checkpoint.save, iteration=iteration, train_iters=config.train_iters,
                        stopped_by=stopped_by)
    logger.close()
    wall = time.perf_counter() - start_time
    return {"history": history, "last_checkpoint": str(last_saved) if last_saved else None, "wall_time_s": wall,
            "iteration": iteration, "start_iteration": start_iteration, "iterations_run": iteration - start_iteration,
            "skipped": total_skips, "is_writer": is_writer, "stopped_by": stopped_by, "nothing_to_do": None}


def _group_lrs(optimizer) -> dict[str, float]:
    """The LR of each distinct group (main, projector, pool) for logging."""
    groups = optimizer.param_groups
    lrs: dict[str, float] = {}
    for group in groups:
        name = "main" if group.get("default_config", True) else f"group{len(lrs)}"
        lrs.setdefault(name, group["lr"])
    return lrs


def _print_summary(summary: dict, config: TrainConfig) -> None:
    history = summary["history"]
    ran, start = summary["iterations_run"], summary["start_iteration"]
    span = f"iterations {start + 1}..{summary['iteration']}" if ran else "no iterations"
    line = f"done: {ran} iterations this run ({span}) of {config.train_iters} in {summary['wall_time_s']:.1f} s"
    if summary["stopped_by"]:
        line += f"; stopped early by {summary['stopped_by']}"
    if history:
        fmt = lambda h: ", ".join(f"{k} {v:.4f}" for k, v in h.items() if k != "iteration")  # noqa: E731
        line += f"; first step: {fmt(history[0])}; last step: {fmt(history[-1])}"
    print(line, flush=True)
    if summary["last_checkpoint"]:
        print(f"checkpoint: {summary['last_checkpoint']} (resume with --load {Path(summary['last_checkpoint']).parent})",
              flush=True)
    if config.tensorboard_dir:
        print(f"TensorBoard logs: {config.tensorboard_dir} (tensorboard --logdir {config.tensorboard_dir})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_croc.quiet import quiet_known_warnings

    quiet_known_warnings()
    from megatron_croc.training.arguments import parse_args

    world = int(os.environ.get("WORLD_SIZE", "1"))
    first_rank = os.environ.get("RANK", "0") == "0"
    try:
        config = parse_args(argv, world_size=world)
        if config.memory_report is not None:  # --dry-run: the memory report instead of training
            if first_rank:
                from megatron_croc.training.memory import dry_run

                print(dry_run(config).format(), flush=True)
            return 0
        from megatron_croc.platform import init_platform
        from megatron_croc.training.preflight import plan_run

        platform = init_platform()
        plan = plan_run(config, has_te=platform.has_te, has_apex=platform.has_apex,
                        has_cuda=platform.has_cuda)
    except ConfigError as err:
        if first_rank:  # every rank finds the same; one says it
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if plan.nothing_to_do:
        if first_rank:
            print(plan.nothing_to_do, flush=True)
        return 0
    try:
        summary = train(plan.config, plan=plan)
    except BaseException as err:  # noqa: BLE001 - every failure ends this process at once, reported once
        from megatron_croc.distributed import exit_after_failure

        exit_after_failure(err, clear_errors=(ConfigError,), collective_errors=(TrainingError,))
    if summary["is_writer"]:
        _print_summary(summary, plan.config)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's async writer forks
    sys.exit(main())
