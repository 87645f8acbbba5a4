"""Megatron-style command-line flags -> typed configs. No global args object: the parser's
result is turned into frozen dataclasses once, in :func:`parse_args`, and only those travel.

Only checks that the flags alone decide live here; what also depends on files (data prefixes,
the tokenizer, checkpoints) is checked by :mod:`megatron_croc.training.preflight`, still before
any process group exists. This module imports neither torch nor megatron-core at import time,
so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Sequence

from megatron_croc.config import (
    MODEL_PRESETS,
    ConfigError,
    CrocConfig,
    ParallelConfig,
    PrecisionConfig,
    model_preset,
    padded_sequence_length,
)
from megatron_croc.training.config import (
    DEMO_DATA_DIR,
    CheckpointConfig,
    DataConfig,
    ExitConfig,
    OptimConfig,
    TrainConfig,
)
from megatron_croc.training.memory import MemoryReportConfig

__all__ = ["DEMO_DATA_DIR", "TrainConfig", "build_parser", "parse_args", "EXIT_SIGNALS"]

# What the embedded default (no --data-path: the tiny model on the demo data) and real runs use
# where a flag is not given.
_DEMO_DEFAULTS = dict(micro_batch_size=4, global_batch_size=16, train_iters=300, seq_length=160, lr=2e-3,
                      log_interval=20, projector_lr=None, eval_interval=100, eval_iters=4)
_REAL_DEFAULTS = dict(micro_batch_size=1, global_batch_size=256, train_iters=None, seq_length=2048, lr=2e-5,
                      log_interval=10, projector_lr=1.5e-4, eval_interval=1000, eval_iters=10)

# Signals --exit-signal accepts: SIGTERM (Slurm's time limit and preemption, torchrun's stop),
# SIGUSR1/SIGUSR2 (what `#SBATCH --signal=USR1@600` sends ahead of the limit), SIGINT.
EXIT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


def _default_text(name: str) -> str:
    def shown(value):
        if value is None:
            return "--lr" if name == "projector_lr" else "required"
        return value

    return f"(default: {shown(_REAL_DEFAULTS[name])}; embedded demo: {shown(_DEMO_DEFAULTS[name])})"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where it is None (the help text then says what
    happens) or already written into the help text."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.default in (None, argparse.SUPPRESS) or action.option_strings == ["-h", "--help"]:
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.nargs == 0:  # store_true flags: off unless given
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_croc.training.pretrain",
        usage="%(prog)s [flags]   (or: bash examples/pretrain_croc.sh [flags])",
        description="Croc pretraining (align / croc / instruct stages) on megatron-core, with Megatron-LM's "
        "flag names. With no --data-path, trains the tiny model on the bundled demo data (the embedded "
        "default). Launch several processes with examples/pretrain_croc.sh (torchrun) or "
        "examples/slurm/pretrain_croc.sbatch.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=sorted(MODEL_PRESETS),
                   help="model preset: the LLM and its vision encoder")
    g.add_argument("--num-layers", type=int, default=None, help="number of LLM layers (default: the preset's)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="LLM vocabulary size (default: the data's tokenizer's, as recorded by "
                        "tools/preprocess_data.py). A larger value is kept, e.g. to match a converted checkpoint; "
                        "a smaller one is an error")
    g.add_argument("--unfreeze-vision", action="store_true", help="train the vision encoder too (frozen by default)")
    g.add_argument("--vision-cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU at tensor-parallel size 1, replay the frozen vision encoder's forward as CUDA "
                        "graphs, one per image count (the same kernels; --no-vision-cuda-graph runs it eagerly)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="activation recomputation: 'full' recomputes whole LLM layers in backward "
                        "(see --recompute-method), 'selective' parts of each layer (--recompute-modules) "
                        "(default: none)")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with --recompute-granularity full: 'uniform' recomputes every layer, in chunks of "
                        "--recompute-num-layers; 'block' only the first --recompute-num-layers layers of "
                        "each pipeline stage (less recomputation, more memory)")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="with --recompute-granularity full: layers per chunk (uniform) or per pipeline "
                        "stage (block) (default: 1)")
    g.add_argument("--recompute-modules", nargs="+", default=None, metavar="MODULE",
                   help="with --recompute-granularity selective: what to recompute in every layer, from "
                        "core_attn, mlp (default: core_attn)")

    g = p.add_argument_group("croc (the comprehension stage and the stage being trained)")
    g.add_argument("--croc-stage", choices=["align", "croc", "instruct"], default="croc",
                   help="training stage: align (projector only, captions), croc (comprehension stage: pool, "
                        "mixed attention, VTR loss), instruct (instruction tuning)")
    g.add_argument("--croc-pool-size", type=int, default=None,
                   help="prompt-pool size K (default: the preset's: 2048, tiny 64)")
    g.add_argument("--croc-mask-ratio", type=float, default=0.75,
                   help="fraction of each image's visual tokens replaced by pool entries")
    g.add_argument("--croc-matcher", choices=["hungarian", "nearest"], default="hungarian",
                   help="visual token -> pool entry assignment: one-to-one Hungarian (the paper), or "
                        "many-to-one nearest entry (the released code)")
    g.add_argument("--croc-assignment-lookahead", action=argparse.BooleanOptionalAction, default=True,
                   help="solve the next micro-batch's assignment on the host while the current one runs "
                        "(same result; --no-croc-assignment-lookahead solves it inside each forward)")
    g.add_argument("--croc-attention", choices=["visual", "prefix"], default="visual",
                   help="comprehension-stage attention: bidirectional among an image's visual tokens and causal "
                        "for text (visual, the paper), or a prefix LM up to the first answer token (prefix, "
                        "the released code)")
    g.add_argument("--croc-vtr-weight", type=float, default=10.0,
                   help="weight alpha of the visual-token-reconstruction loss (L = L_lm + alpha * L_vtr)")
    g.add_argument("--croc-vtr-positions", choices=["all", "masked"], default="all",
                   help="visual positions the VTR loss covers: all of them, or only the replaced ones")
    g.add_argument("--croc-pool-init", choices=["token_scale", "normal"], default="token_scale",
                   help="pool initialisation: unit-norm rows at the visual tokens' scale, or N(0,1) as the "
                        "released code")

    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--tensor-model-parallel-size", type=int, default=None,
                   help="tensor-parallel size (default: 1; the launcher's TP variable when set)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=None,
                   help="pipeline-parallel size (default: 1; the launcher's PP variable when set). Data "
                        "parallelism takes the remaining processes")
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                   help="model chunks per pipeline stage (interleaved 1F1B schedule; default: 1)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split the LLM's norms, residuals and dropouts along the sequence over the "
                        "tensor-parallel ranks (activations / TP there); with or without TransformerEngine")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over the data-parallel group (Megatron's ZeRO-1)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the data-parallel gradient reduction with the backward pass")
    g.add_argument("--bf16", action="store_true", help="bf16 weights and compute (fp32 master weights and gradients)")
    g.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None,
                   help="FP8 GEMMs in the LLM's layers (needs TransformerEngine; default: off)")
    g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8", "blockwise"], default="delayed",
                   help="FP8 scaling recipe, with --fp8-format")
    g.add_argument("--apply-rope-fusion", action="store_true", help="TransformerEngine's fused RoPE kernel")
    g.add_argument("--gradient-accumulation-fusion", action="store_true",
                   help="fused weight-gradient accumulation (needs apex or TransformerEngine)")
    g.add_argument("--attention-backend", choices=["auto", "flex", "split", "sdpa"], default="auto",
                   help="mixed-attention route (croc stage): flex (FlexAttention block mask), split (causal "
                        "flash attention + each image's rows recomputed; micro-batches without packing, others "
                        "take auto's route), sdpa (dense boolean mask), auto (flex on CUDA, sdpa on the CPU)")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help=f"rows per micro-batch per data-parallel rank {_default_text('micro_batch_size')}")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help=f"rows per optimizer step over all data-parallel ranks {_default_text('global_batch_size')}")
    g.add_argument("--train-iters", type=int, default=None,
                   help=f"optimizer steps of the whole run (a resumed run continues up to it) "
                        f"{_default_text('train_iters')}")
    g.add_argument("--seq-length", type=int, default=None,
                   help=f"tokens per row, visual tokens included {_default_text('seq_length')}")
    g.add_argument("--seed", type=int, default=1234,
                   help="seed of the initial weights (the same at every parallel layout), the data order and "
                        "the pool masks")
    g.add_argument("--log-interval", type=int, default=None,
                   help=f"iterations between log lines {_default_text('log_interval')}")
    g.add_argument("--eval-interval", type=int, default=None,
                   help=f"iterations between validation runs, when there is validation data "
                        f"{_default_text('eval_interval')}")
    g.add_argument("--eval-iters", type=int, default=None,
                   help=f"global batches per validation run {_default_text('eval_iters')}")
    g.add_argument("--max-skipped-steps", type=int, default=10,
                   help="stop after this many consecutive steps with non-finite loss or gradients")

    g = p.add_argument_group("optimizer and learning-rate schedule")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate {_default_text('lr')}")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-warmup-fraction", type=float, default=0.03,
                   help="fraction of --train-iters spent warming the LR up from 0")
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine",
                   help="LR decay from the peak to --min-lr over the rest of --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay (never on norms, biases or the pool)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient clipping by global norm")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--projector-lr", type=float, default=None,
                   help=f"peak LR of the projector {_default_text('projector_lr')}")
    g.add_argument("--pool-lr", type=float, default=None, help="peak LR of the prompt pool (default: --lr)")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, follow this command's LR schedule (lr, min-lr, warm-up, decay, "
                        "--train-iters) where it differs from the checkpoint's")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's LR schedule where it differs from this command's")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="datasets written by tools/preprocess_data.py: 'prefix ...' (blended by size) or "
                        "'weight prefix weight prefix ...' (default: the bundled demo data)")
    g.add_argument("--valid-data-path", nargs="+", default=None,
                   help="validation datasets, as --data-path (default: none; the demo has its own)")
    g.add_argument("--pack-sequences", action="store_true", help="pack several samples per --seq-length row")
    g.add_argument("--num-workers", type=int, default=2,
                   help="data-loader worker processes per rank (0: load in the training process)")

    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save", default=None, help="folder to save checkpoints in (default: none saved)")
    g.add_argument("--load", default=None,
                   help="checkpoint to start from: a --save folder (its latest iteration) or one iteration's "
                        "folder; the same stage resumes (optimizer, schedule, data position), another stage "
                        "or a converted checkpoint gives the starting weights")
    g.add_argument("--auto-resume", action="store_true",
                   help="resume from --save when it already holds a checkpoint of this run (a requeued or "
                        "rerun job); --load then only gives the starting weights of a fresh run")
    g.add_argument("--save-interval", type=int, default=None,
                   help="iterations between checkpoints (default: only at the end, with --save)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept in --save (0: all)")
    g.add_argument("--no-load-optim", action="store_true",
                   help="with --load, restore the weights but start a fresh optimizer")
    g.add_argument("--no-load-rng", action="store_true", help="with --load, do not restore the RNG states")
    g.add_argument("--finetune", action="store_true",
                   help="with --load, take only its weights, also from a checkpoint of the same stage: iteration "
                        "0, a fresh optimizer, schedule and RNG, the data from its start (e.g. a second run of a "
                        "stage on other data; another stage's checkpoint always loads this way)")
    g.add_argument("--tensorboard-dir", default=None, help="folder for TensorBoard logs (default: none)")

    g = p.add_argument_group("stopping early (cluster time limits and preemption)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal, every rank stops at the next iteration boundary, saves a checkpoint "
                        "(with --save) and exits 0")
    g.add_argument("--exit-signal", choices=EXIT_SIGNALS, default="SIGTERM",
                   help="the signal --exit-signal-handler catches besides SIGTERM (Slurm: match `#SBATCH --signal`)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop, save and exit 0 once the run has lasted this many minutes (default: no limit)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop, save and exit 0 at the first iteration divisible by this (default: never)")

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


def parse_args(argv: Sequence[str] | None = None, *, world_size: int = 1) -> TrainConfig:
    """Flags -> TrainConfig. Raises ConfigError for what the flags alone make impossible."""
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
    for flag, value in (("--train-iters", train_iters), ("--micro-batch-size", pick("micro_batch_size")),
                        ("--global-batch-size", pick("global_batch_size")), ("--seq-length", pick("seq_length")),
                        ("--log-interval", pick("log_interval")), ("--eval-interval", pick("eval_interval")),
                        ("--save-interval", args.save_interval or 1), ("--exit-interval", args.exit_interval or 1)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")

    data_path = _data_path(args.data_path, "--data-path")
    valid_data_path = _data_path(args.valid_data_path, "--valid-data-path")
    base = model_preset(args.model)
    croc = CrocConfig(
        stage=args.croc_stage,
        pool_size=args.croc_pool_size or base.croc.pool_size,
        mask_ratio=args.croc_mask_ratio,
        matcher=args.croc_matcher,
        assignment_lookahead=args.croc_assignment_lookahead,
        attention=args.croc_attention,
        vtr_weight=args.croc_vtr_weight,
        vtr_loss_positions=args.croc_vtr_positions,
        pool_init=args.croc_pool_init,
        seed=args.seed,
    )
    language = base.language
    if args.vocab_size is not None:
        if args.vocab_size < 1:
            raise ConfigError(f"--vocab-size must be at least 1, got {args.vocab_size}")
        language = dataclasses.replace(language, vocab_size=args.vocab_size)
    if args.num_layers is not None:
        language = dataclasses.replace(language, num_layers=args.num_layers)
    vision = base.vision
    if args.unfreeze_vision:
        vision = dataclasses.replace(vision, frozen=False)
    if not args.vision_cuda_graph:
        vision = dataclasses.replace(vision, cuda_graph=False)
    model = base.replace(
        vision=vision,
        language=language,
        croc=croc,
        parallel=ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size or 1,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size or 1,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
            sequence_parallel=args.sequence_parallel,
        ),
        precision=PrecisionConfig(bf16=args.bf16, fp8_format=args.fp8_format, fp8_recipe=args.fp8_recipe),
        apply_rope_fusion=args.apply_rope_fusion,
        gradient_accumulation_fusion=args.gradient_accumulation_fusion,
        attention_backend=args.attention_backend,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=(1 if args.recompute_num_layers is None and args.recompute_granularity == "full"
                              else args.recompute_num_layers),
        recompute_modules=tuple(args.recompute_modules) if args.recompute_modules is not None else None,
        seed=args.seed,
    )
    lr = pick("lr")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each "
                          "other; pass one")
    optim = OptimConfig(
        lr=lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        lr_warmup_fraction=args.lr_warmup_fraction, lr_decay_style=args.lr_decay_style,
        projector_lr=pick("projector_lr"),
        pool_lr=args.pool_lr, use_distributed_optimizer=args.use_distributed_optimizer,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
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
            f"{world_size} processes cannot be split into --tensor-model-parallel-size x "
            f"--pipeline-model-parallel-size = {par.tensor_model_parallel_size} x {par.pipeline_model_parallel_size} "
            f"= {model_parallel}-process model replicas; launch a multiple of {model_parallel} processes or "
            "change the sizes"
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
    if args.finetune and args.load is None:
        raise ConfigError("--finetune starts from the weights of --load; pass --load DIR")
    if args.auto_resume and args.save is None:
        raise ConfigError("--auto-resume resumes from --save; pass --save DIR")
    checkpoint = CheckpointConfig(
        save=args.save, load=args.load, save_interval=args.save_interval, keep_last=args.keep_last,
        no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng, auto_resume=args.auto_resume,
        finetune=args.finetune,
    )
    requested_seq = pick("seq_length")
    positions = model.language.max_position_embeddings
    if requested_seq > positions:
        raise ConfigError(
            f"--seq-length {requested_seq} exceeds the {args.model} model's {positions} positions "
            f"(max_position_embeddings); use --seq-length {positions} or less"
        )
    seq_length, seq_note = padded_sequence_length(model, requested_seq)
    data = DataConfig(
        data_path=data_path, valid_data_path=valid_data_path, seq_length=seq_length, pack_sequences=args.pack_sequences, num_workers=args.num_workers,
        demo=demo,
    )
    exit_config = ExitConfig(signal_handler=args.exit_signal_handler, signal=args.exit_signal,
                             duration_in_mins=args.exit_duration_in_mins, interval=args.exit_interval)
    if exit_config.duration_in_mins is not None and exit_config.duration_in_mins <= 0:
        raise ConfigError(f"--exit-duration-in-mins must be positive, got {exit_config.duration_in_mins}")
    return TrainConfig(
        model=model, model_name=args.model, vocab_size=args.vocab_size, optim=optim, checkpoint=checkpoint,
        data=data, exit=exit_config, micro_batch_size=mbs,
        global_batch_size=gbs, train_iters=train_iters, log_interval=pick("log_interval"),
        eval_interval=pick("eval_interval"), eval_iters=pick("eval_iters"), seed=args.seed,
        tensorboard_dir=args.tensorboard_dir, max_skipped_steps=args.max_skipped_steps,
        overlap_grad_reduce=args.overlap_grad_reduce,
        notes=tuple(n for n in (seq_note,) if n),
        memory_report=memory_report,
    )


def _data_path(values: Sequence[str] | None, flag: str) -> tuple[tuple[float | None, str], ...]:
    """Megatron's ``--data-path [w1] prefix1 [w2 prefix2 ...]``, parsed by the data package;
    prefixes without weights are blended in proportion to their sizes, as in Megatron."""
    if not values:
        return ()
    from megatron_croc.data.dataset import parse_data_path

    try:
        pairs = parse_data_path(list(values))
    except ValueError as err:
        raise ConfigError(f"{flag}: {err}") from None
    return tuple(pairs)
