"""Megatron-style command-line flags -> typed configs. No global args object: the parser's
result is turned into frozen dataclasses once, in :func:`parse_args`, and only those travel.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Sequence

from megatron_croc.config import (
    MODEL_PRESETS,
    ConfigError,
    CrocConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    model_preset,
    padded_sequence_length,
)
from megatron_croc.training.checkpoint import CheckpointConfig
from megatron_croc.training.memory import MemoryReportConfig
from megatron_croc.training.optim import OptimConfig

# The embedded default: a tiny Croc model on the bundled demo data, sized for 2 CPU cores.
DEMO_DATA_DIR = "outputs/demo_data"


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    # (weight, prefix) pairs; weight None: blended by size, as Megatron does without weights
    data_path: tuple[tuple[float | None, str], ...]
    valid_data_path: tuple[tuple[float | None, str], ...] = ()
    seq_length: int = 2048
    pack_sequences: bool = False
    num_workers: int = 2
    demo: bool = False


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    data: DataConfig
    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    log_interval: int = 10
    eval_interval: int | None = None
    eval_iters: int = 10
    seed: int = 1234
    tensorboard_dir: str | None = None
    max_skipped_steps: int = 10  # consecutive non-finite steps before giving up
    overlap_grad_reduce: bool = False
    exit_after_iteration: int | None = None  # for tests of kill-and-resume
    # What parse_args adjusted and why (e.g. the sequence length padded for FP8), printed at start.
    notes: tuple[str, ...] = ()
    # --dry-run: print the memory report (training.memory) instead of training.
    memory_report: MemoryReportConfig | None = None


def _data_path(values: Sequence[str] | None, flag: str) -> tuple[tuple[float | None, str], ...]:
    """Megatron's ``--data-path [w1] prefix1 [w2 prefix2 ...]``, parsed by the data package;
    prefixes without weights are blended in proportion to their sizes, as in Megatron."""
    from megatron_croc.data.dataset import parse_data_path

    if not values:
        return ()
    try:
        pairs = parse_data_path(list(values))
    except ValueError as err:
        raise ConfigError(f"{flag}: {err}") from None
    return tuple(pairs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_croc.training.pretrain",
        description="Croc pretraining (align / croc / instruct stages) on megatron-core. With no "
        "--data-path, trains the tiny model on the bundled demo data (the embedded default).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=sorted(MODEL_PRESETS), help="model preset (LLM + vision encoder)")
    g.add_argument("--num-layers", type=int, default=None, help="override the preset's number of LLM layers")
    g.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary size (set automatically from the data's tokenizer)")
    g.add_argument("--unfreeze-vision", action="store_true", help="train the vision encoder too")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="activation recomputation: 'full' recomputes whole LLM layers in backward "
                        "(see --recompute-method), 'selective' parts of each layer (--recompute-modules)")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with --recompute-granularity full: 'uniform' recomputes every layer, in chunks of "
                        "--recompute-num-layers; 'block' only the first --recompute-num-layers layers of "
                        "each pipeline stage (less recomputation, more memory)")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="with --recompute-granularity full: layers per chunk (uniform) or per pipeline "
                        "stage (block); default 1")
    g.add_argument("--recompute-modules", nargs="+", default=None, metavar="MODULE",
                   help="with --recompute-granularity selective: what to recompute in every layer, from "
                        "core_attn, mlp (default: core_attn)")

    g = p.add_argument_group("croc")
    g.add_argument("--croc-stage", choices=["align", "croc", "instruct"], default="croc")
    g.add_argument("--croc-pool-size", type=int, default=None, help="prompt pool size K (preset default: 2048, tiny 64)")
    g.add_argument("--croc-mask-ratio", type=float, default=0.75)
    g.add_argument("--croc-matcher", choices=["hungarian", "nearest"], default="hungarian")
    g.add_argument("--croc-assignment-solver", choices=["auto", "scipy", "gpu"], default="auto")
    g.add_argument("--no-croc-assignment-lookahead", dest="croc_assignment_lookahead", action="store_false",
                   help="solve each micro-batch's assignment in its own forward instead of on the host "
                        "during the previous micro-batch (same result; for comparison)")
    g.add_argument("--croc-attention", choices=["visual", "prefix"], default="visual")
    g.add_argument("--croc-vtr-weight", type=float, default=10.0)
    g.add_argument("--croc-vtr-positions", choices=["all", "masked"], default="all")
    g.add_argument("--croc-pool-init", choices=["token_scale", "normal"], default="token_scale")

    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split the LLM's norms, residuals and dropouts along the sequence over the "
                        "tensor-parallel ranks (activations / TP there); with or without TransformerEngine")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None)
    g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8", "blockwise"], default="delayed")
    g.add_argument("--apply-rope-fusion", action="store_true")
    g.add_argument("--gradient-accumulation-fusion", action="store_true")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--log-interval", type=int, default=None)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--max-skipped-steps", type=int, default=10, help="stop after this many consecutive steps with non-finite loss or gradients")
    g.add_argument("--exit-after-iteration", type=int, default=None, help=argparse.SUPPRESS)

    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-fraction", type=float, default=0.03)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--projector-lr", type=float, default=None, help="peak LR of the projector (default: --lr)")
    g.add_argument("--pool-lr", type=float, default=None, help="peak LR of the prompt pool (default: --lr)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None, help="[weight] prefix pairs of preprocessed datasets")
    g.add_argument("--valid-data-path", nargs="+", default=None)
    g.add_argument("--pack-sequences", action="store_true", help="pack several samples per --seq-length row")
    g.add_argument("--num-workers", type=int, default=2)

    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept in --save")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--tensorboard-dir", default=None)

    g = p.add_argument_group("memory report")
    g.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device (no weights allocated, no GPU needed) and print "
                        "the memory each GPU needs: parameters, gradients, optimizer state with and without "
                        "the distributed optimizer, activations with and without recomputation and sequence "
                        "parallelism, and this run's total against --gpu-memory-gb; then exit")
    g.add_argument("--dry-run-world-size", type=int, default=None, metavar="N",
                   help="with --dry-run: the number of GPUs of the planned run (default: WORLD_SIZE when "
                        "launched by torchrun, else TP x PP)")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0,
                   help="with --dry-run: the memory of one GPU in GiB (80 for an 80 GB A100/H100)")
    return p


# What the embedded default and the presets use where a flag is not given.
_DEMO_DEFAULTS = dict(micro_batch_size=4, global_batch_size=16, train_iters=300, seq_length=160, lr=2e-3,
                      log_interval=20, projector_lr=None)
_REAL_DEFAULTS = dict(micro_batch_size=1, global_batch_size=256, train_iters=None, seq_length=2048, lr=2e-5,
                      log_interval=10, projector_lr=1.5e-4)


def parse_args(argv: Sequence[str] | None = None, *, world_size: int = 1) -> TrainConfig:
    args = build_parser().parse_args(argv)
    demo = args.data_path is None
    defaults = _DEMO_DEFAULTS if demo else _REAL_DEFAULTS

    def pick(name):
        value = getattr(args, name, None)
        return defaults[name] if value is None else value

    if demo and args.model != "tiny":
        raise ConfigError("the embedded demo (no --data-path) trains the tiny model; pass --data-path for other presets")
    train_iters = pick("train_iters")
    if train_iters is None:
        raise ConfigError("--train-iters is required with --data-path")

    base = model_preset(args.model)
    croc = CrocConfig(
        stage=args.croc_stage,
        pool_size=args.croc_pool_size or base.croc.pool_size,
        mask_ratio=args.croc_mask_ratio,
        matcher=args.croc_matcher,
        assignment_solver=args.croc_assignment_solver,
        assignment_lookahead=args.croc_assignment_lookahead,
        attention=args.croc_attention,
        vtr_weight=args.croc_vtr_weight,
        vtr_loss_positions=args.croc_vtr_positions,
        pool_init=args.croc_pool_init,
        seed=args.seed,
    )
    language = base.language
    if args.vocab_size is not None:
        language = dataclasses.replace(language, vocab_size=args.vocab_size)
    if args.num_layers is not None:
        language = dataclasses.replace(language, num_layers=args.num_layers)
    vision = base.vision
    if args.unfreeze_vision:
        vision = dataclasses.replace(vision, frozen=False)
    model = base.replace(
        vision=vision,
        language=language,
        croc=croc,
        parallel=ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
            sequence_parallel=args.sequence_parallel,
        ),
        precision=PrecisionConfig(bf16=args.bf16, fp8_format=args.fp8_format, fp8_recipe=args.fp8_recipe),
        apply_rope_fusion=args.apply_rope_fusion,
        gradient_accumulation_fusion=args.gradient_accumulation_fusion,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=(1 if args.recompute_num_layers is None and args.recompute_granularity == "full"
                              else args.recompute_num_layers),
        recompute_modules=tuple(args.recompute_modules) if args.recompute_modules is not None else None,
    )
    lr = pick("lr")
    optim = OptimConfig(
        lr=lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        lr_warmup_fraction=args.lr_warmup_fraction, lr_decay_style=args.lr_decay_style,
        projector_lr=pick("projector_lr"),
        pool_lr=args.pool_lr, use_distributed_optimizer=args.use_distributed_optimizer,
    )
    if args.min_lr > lr:
        raise ConfigError(f"--min-lr {args.min_lr} is larger than --lr {lr}")
    par = model.parallel
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    memory_report = None
    if args.dry_run:
        world_size = args.dry_run_world_size or (world_size if world_size > 1 else model_parallel)
        memory_report = MemoryReportConfig(world_size=world_size, gpu_memory_gb=args.gpu_memory_gb)
    elif args.dry_run_world_size is not None:
        raise ConfigError("--dry-run-world-size applies to --dry-run")
    if world_size % model_parallel:
        raise ConfigError(
            f"{world_size} processes cannot be split into tensor x pipeline = {model_parallel}-process "
            "model replicas; launch a multiple of TP x PP processes"
        )
    dp = world_size // model_parallel
    mbs, gbs = pick("micro_batch_size"), pick("global_batch_size")
    if gbs % (mbs * dp):
        raise ConfigError(
            f"--global-batch-size {gbs} must be a multiple of --micro-batch-size x data-parallel size "
            f"= {mbs} x {dp}"
        )
    if args.save_interval is not None and args.save is None:
        raise ConfigError("--save-interval needs --save DIR")
    checkpoint = CheckpointConfig(
        save=args.save, load=args.load, save_interval=args.save_interval, keep_last=args.keep_last,
        no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng,
    )
    seq_length, seq_note = padded_sequence_length(model, pick("seq_length"))
    data = DataConfig(
        data_path=_data_path(args.data_path, "--data-path"),
        valid_data_path=_data_path(args.valid_data_path, "--valid-data-path"),
        seq_length=seq_length, pack_sequences=args.pack_sequences, num_workers=args.num_workers,
        demo=demo,
    )
    return TrainConfig(
        model=model, optim=optim, checkpoint=checkpoint, data=data, micro_batch_size=mbs,
        global_batch_size=gbs, train_iters=train_iters, log_interval=pick("log_interval"),
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, seed=args.seed,
        tensorboard_dir=args.tensorboard_dir, max_skipped_steps=args.max_skipped_steps,
        overlap_grad_reduce=args.overlap_grad_reduce,
        exit_after_iteration=args.exit_after_iteration,
        notes=tuple(n for n in (seq_note,) if n),
        memory_report=memory_report,
    )
