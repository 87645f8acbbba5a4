"""The training entry point: setup, loop, shutdown.

    torchrun --nproc-per-node N -m megatron_croc.training.pretrain [Megatron-style flags]

With no ``--data-path`` it runs the embedded default: the tiny Croc model on the bundled demo
data (generated in seconds on first use), on the CPU when there is no GPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_croc.config import ConfigError, ModelConfig, validate
from megatron_croc.platform import Platform, get_platform, init_platform
from megatron_croc.training.arguments import DEMO_DATA_DIR, TrainConfig, parse_args
from megatron_croc.training.checkpoint import load_checkpoint, save_checkpoint
from megatron_croc.training.logging import TrainingLogger
from megatron_croc.training.optim import build_optimizer, build_scheduler
from megatron_croc.training.step import StepStats, make_forward_step


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


def _rank0_print(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def init_distributed(config: TrainConfig, platform: Platform) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m ...`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            from megatron_croc.testing import free_port

            os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(platform.backend)
    par = config.model.parallel
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
    )
    # Same seed on every rank: the model is initialised identically everywhere (CPU init),
    # megatron-core's tracker derives the per-TP-rank dropout streams from it.
    torch.manual_seed(config.seed)
    model_parallel_cuda_manual_seed(config.seed)


def build_model_chunks(model_config: ModelConfig, platform: Platform) -> list:
    """One CrocModel per virtual pipeline stage held by this rank, wrapped for bf16 and DDP."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    from megatron_croc.models.croc import CrocModel

    vp = model_config.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for v in range(vp or 1):
        vp_stage = v if vp else None
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


def _resolve_data(config: TrainConfig) -> TrainConfig:
    """Point the embedded default at the demo data (built on first use) and size the
    vocabulary from the data's tokenizer."""
    from megatron_croc.data.indexed import read_meta

    data = config.data
    model = config.model
    if data.demo:
        from megatron_croc.data.demo import ensure_demo_dataset

        demo_kwargs = dict(image_size=model.vision.image_size, num_image_tokens=model.vision.num_image_tokens,
                           seq_length=data.seq_length)
        if dist.get_rank() == 0:  # built once, by one rank; then every rank opens it
            ensure_demo_dataset(DEMO_DATA_DIR, **demo_kwargs)
            ensure_demo_dataset(DEMO_DATA_DIR, num_samples=128, seed=config.seed + 1, **demo_kwargs)
        dist.barrier()
        train = ensure_demo_dataset(DEMO_DATA_DIR, **demo_kwargs)
        valid = ensure_demo_dataset(DEMO_DATA_DIR, num_samples=128, seed=config.seed + 1, **demo_kwargs)
        data = dataclasses.replace(data, data_path=((None, train.prefix),), valid_data_path=((None, valid.prefix),))
    metas = [read_meta(prefix) for _, prefix in data.data_path]
    vocab = max(m["tokenizer"]["vocab_size"] for m in metas)
    image_size = {m["image"]["size"] for m in metas if m["image"].get("size")}
    if image_size and image_size != {model.vision.image_size}:
        raise ConfigError(
            f"--data-path images are {sorted(image_size)} px but the {model.vision.image_size} px vision encoder "
            "needs its own size; preprocess again with --image-size "
            f"{model.vision.image_size}"
        )
    language = model.language
    if data.demo or config.model.language.vocab_size < vocab:
        if not data.demo:
            raise ConfigError(
                f"the data's tokenizer has {vocab} tokens but the model's vocabulary has "
                f"{language.vocab_size}; pass --vocab-size or preprocess with the model's tokenizer"
            )
        language = dataclasses.replace(language, vocab_size=vocab)
    return dataclasses.replace(config, data=data, model=model.replace(language=language))


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


def _reduce_step(losses: list[dict[str, torch.Tensor]], stats: StepStats, chunks: list, device: torch.device, *,
                 check_grads: bool) -> tuple[dict[str, float], int, int, bool]:
    """The step's reported numbers and whether it is finite, agreed by all ranks: on the last
    stage one data-parallel all-reduce of [loss parts averaged over micro-batches, samples,
    images]; then one all-rank MAX of "losses or (``check_grads``) gradients not finite". On the
    device (NCCL reduces no CPU tensors), read back once each."""
    from megatron.core import parallel_state as ps

    not_finite = torch.zeros((), device=device)
    parts: dict[str, float] = {}
    num_samples = num_images = 0
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    if last:
        keys = sorted(losses[0]) if losses else []
        means = [torch.stack([mb[k].double() for mb in losses]).mean() for k in keys]
        counts = torch.tensor([stats.num_samples, stats.num_images], dtype=torch.float64, device=device)
        packed = torch.cat([torch.stack(means).to(device) if means else counts[:0], counts])
        dist.all_reduce(packed, group=ps.get_data_parallel_group())
        not_finite = (~torch.isfinite(packed)).any().float()
    if check_grads:
        grads = [torch.isfinite(b.grad_data).all() for chunk in chunks for b in chunk.buffers]
        if grads:
            not_finite = torch.maximum(not_finite, (~torch.stack(grads).all()).float().to(device))
    dist.all_reduce(not_finite, op=dist.ReduceOp.MAX)
    finite = not_finite.item() == 0.0
    if last:
        host = packed.tolist()
        dp = ps.get_data_parallel_world_size()
        parts = {k: v / dp for k, v in zip(keys, host)}
        num_samples, num_images = int(host[-2]), int(host[-1])
    return parts, num_samples, num_images, finite


def evaluate(config: TrainConfig, forward_backward, chunks, iterators, forward_step, stats: StepStats,
             num_microbatches: int, seq_length: int) -> dict[str, float]:
    """Mean loss parts over ``--eval-iters`` global batches of the validation data."""
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
            parts, _, _, _ = _reduce_step(losses, stats, chunks, get_platform().device, check_grads=False)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v / config.eval_iters
    for chunk in chunks:
        chunk.train()
    return totals


def train(config: TrainConfig) -> dict[str, object]:
    """Run training; returns a summary (per-iteration losses, paths) for callers and tests."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from megatron_croc.models.croc import pipeline_tensor_seq_length

    platform = init_platform()
    validate(config.model, has_te=platform.has_te, has_apex=platform.has_apex)
    init_distributed(config, platform)
    config = _resolve_data(config)  # only the vocabulary size changes, which validate does not check
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
            no_load_rng=config.checkpoint.no_load_rng,
        )
        iteration = int(common["iteration"])
        # what tools/convert_checkpoint.py recorded (the HF source), so exports need no flags
        if "hf_conversion" in common:
            carried_state["hf_conversion"] = common["hf_conversion"]
        consumed = int(common.get("data", {}).get("consumed_samples", 0))
        _rank0_print(f"loaded {config.checkpoint.load} at iteration {iteration} "
                     f"(optimizer state: {'yes' if common['loaded_optimizer'] else 'no, fresh'}; "
                     f"initialised fresh: {common['initialised_fresh'] or 'nothing'})")

    dp = ps.get_data_parallel_world_size()
    num_microbatches = config.global_batch_size // (config.micro_batch_size * dp)
    seq_length = pipeline_tensor_seq_length(model_config, config.data.seq_length)
    pin = platform.device.type == "cuda"
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
    stats = StepStats()
    # one forward step for training and evaluation (the schedule calls it num_microbatches times)
    forward_step = make_forward_step(model_config, platform.device, stats, num_microbatches=num_microbatches)
    logger = TrainingLogger(model_config=model_config, log_interval=config.log_interval, world_size=world,
                            tensorboard_dir=config.tensorboard_dir, is_writer=is_writer)
    inject = set(_inject_nonfinite_iterations())
    history: list[dict[str, float]] = []
    consecutive_skips = total_skips = 0
    last_saved = None
    _rank0_print(
        f"training {model_config.croc.stage} stage: TP={model_config.parallel.tensor_model_parallel_size} "
        f"PP={model_config.parallel.pipeline_model_parallel_size} DP={dp}, {num_microbatches} micro-batches of "
        f"{config.micro_batch_size} x {config.data.seq_length} tokens per step, iterations {iteration}..{config.train_iters}"
    )
    for note in config.notes:
        _rank0_print(f"note: {note}")
    start_time = time.perf_counter()
    while iteration < config.train_iters:
        stats.reset()
        stats.inject_nonfinite = (iteration + 1) in inject
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=forward_step,
            data_iterator=train_iters if len(train_iters) > 1 else train_iters[0],
            model=chunks, num_microbatches=num_microbatches, seq_length=seq_length,
            micro_batch_size=config.micro_batch_size, forward_only=False,
        )
        parts, num_samples, num_images, finite = _reduce_step(losses, stats, chunks, platform.device,
                                                              check_grads=True)
        grad_norm = None
        if finite:
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
        should_save = config.checkpoint.save and (
            (config.checkpoint.save_interval and iteration % config.checkpoint.save_interval == 0)
            or iteration == config.train_iters
        )
        if should_save:
            last_saved = save_checkpoint(
                config.checkpoint.save, iteration, model_chunks=chunks, optimizer=optimizer, scheduler=scheduler,
                extra_state={"data": {"consumed_samples": train_iters[0].consumed_samples},
                             "croc_stage": model_config.croc.stage, **carried_state},
                keep_last=config.checkpoint.keep_last,
            )
        if config.exit_after_iteration is not None and iteration >= config.exit_after_iteration:
            break
    logger.close()
    wall = time.perf_counter() - start_time
    return {"history": history, "last_checkpoint": str(last_saved) if last_saved else None, "wall_time_s": wall,
            "iteration": iteration, "skipped": total_skips, "is_writer": is_writer}


def _group_lrs(optimizer) -> dict[str, float]:
    """The LR of each distinct group (main, projector, pool) for logging."""
    groups = optimizer.param_groups
    lrs: dict[str, float] = {}
    for group in groups:
        name = "main" if group.get("default_config", True) else f"group{len(lrs)}"
        lrs.setdefault(name, group["lr"])
    return lrs


def _inject_nonfinite_iterations() -> list[int]:
    """Testing aid: MEGATRON_CROC_INJECT_NONFINITE="5,6" makes those iterations' loss NaN,
    to exercise the skip-and-report path end to end."""
    raw = os.environ.get("MEGATRON_CROC_INJECT_NONFINITE", "")
    return [int(x) for x in raw.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = parse_args(argv, world_size=world)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if config.memory_report is not None:  # --dry-run: the memory report instead of training
        if int(os.environ.get("RANK", "0")) == 0:
            from megatron_croc.training.memory import dry_run

            try:
                print(dry_run(config).format(), flush=True)
            except ConfigError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        return 0
    try:
        summary = train(config)
    except (ConfigError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.barrier()
    if summary["is_writer"]:
        history = summary["history"]
        if history:
            first, last = history[0], history[-1]
            fmt = lambda h: ", ".join(f"{k} {v:.4f}" for k, v in h.items() if k != "iteration")
            print(f"done: {summary['iteration']} iterations in {summary['wall_time_s']:.1f} s; "
                  f"first step: {fmt(first)}; last step: {fmt(last)}", flush=True)
        if summary["last_checkpoint"]:
            print(f"checkpoint: {summary['last_checkpoint']} (resume with --load {Path(summary['last_checkpoint']).parent})")
        if config.tensorboard_dir:
            print(f"TensorBoard logs: {config.tensorboard_dir} (tensorboard --logdir {config.tensorboard_dir})")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's async writer forks
    sys.exit(main())
