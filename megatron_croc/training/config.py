"""The training run's typed configuration: frozen, keyword-only dataclasses, built once from the
command line by :mod:`megatron_croc.training.arguments` and passed explicitly (no global args).

Kept free of heavy imports (no torch, no megatron-core) so that ``--help`` and the launcher's
argument checks answer in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from megatron_croc.config import ModelConfig

if TYPE_CHECKING:
    from megatron_croc.training.memory import MemoryReportConfig

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
class OptimConfig:
    lr: float = 2e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_fraction: float = 0.03
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    projector_lr: float | None = None
    pool_lr: float | None = None
    use_distributed_optimizer: bool = False
    # Megatron's resume semantics when the command's LR schedule differs from the checkpoint's:
    # take the command's (override) or the checkpoint's (use_checkpoint); neither: refuse.
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    keep_last: int = 2
    no_load_optim: bool = False
    no_load_rng: bool = False
    # --finetune: --load gives weights only, even from the same stage (Megatron's flag)
    finetune: bool = False
    # Resume from --save when it holds a checkpoint (then --load only gives a fresh run's
    # starting weights): what a requeued Slurm job and a rerun demo need.
    auto_resume: bool = False


@dataclass(frozen=True, kw_only=True)
class ExitConfig:
    """When a run stops before --train-iters, saving a checkpoint first (Megatron's flags)."""

    signal_handler: bool = False  # --exit-signal-handler
    signal: str = "SIGTERM"  # --exit-signal
    duration_in_mins: float | None = None  # --exit-duration-in-mins
    interval: int | None = None  # --exit-interval


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig
    model_name: str = "tiny"  # the --model preset, for messages
    # --vocab-size as given; None: preflight takes the checkpoint's or the data tokenizer's
    vocab_size: int | None = None
    optim: OptimConfig
    checkpoint: CheckpointConfig
    data: DataConfig
    exit: ExitConfig = ExitConfig()
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
    # What parse_args adjusted and why (e.g. the sequence length padded for FP8), printed at start.
    notes: tuple[str, ...] = ()
    # --dry-run: print the memory report (training.memory) instead of training.
    memory_report: "MemoryReportConfig | None" = None
