"""Optimizer (megatron-core's, distributed or not), parameter groups and the LR schedule.

Parameter groups (all through megatron-core's ``config_overrides``, nothing hand-rolled):
- no weight decay on norms, biases (every 1-d tensor) and the prompt pool;
- the projector at ``--projector-lr`` and the pool at ``--pool-lr`` when given, each decaying
  to the same fraction of its peak as the main LR (min_lr / lr).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


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


PROJECTOR_PARAMS = "*vision.projector.*"
POOL_PARAMS = "*pool.weight"


def param_group_overrides(config: OptimConfig) -> dict:
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    def no_decay(param: torch.nn.Parameter, name: str) -> bool:
        return param.dim() == 1 or getattr(param, "no_weight_decay", False)

    overrides: dict = {
        ParamKey(with_name_predicate=ParamWithNamePredicate(name="no_weight_decay", fn=no_decay)): {"wd_mult": 0.0}
    }
    floor = config.min_lr / config.lr if config.lr else 0.0
    for pattern, lr in ((PROJECTOR_PARAMS, config.projector_lr), (POOL_PARAMS, config.pool_lr)):
        if lr is not None:
            overrides[ParamKey(name=pattern)] = {"max_lr": lr, "min_lr": lr * floor}
    return overrides


def build_optimizer(config: OptimConfig, model_chunks: list, *, bf16: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=config.lr,
        min_lr=config.min_lr,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_eps=config.adam_eps,
        clip_grad=config.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=config.use_distributed_optimizer,
    )
    return get_megatron_optimizer(optimizer_config, model_chunks, config_overrides=param_group_overrides(config))


def build_scheduler(config: OptimConfig, optimizer, *, train_iters: int, global_batch_size: int):
    """megatron-core's OptimizerParamScheduler, stepped in samples like Megatron-LM."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    total = train_iters * global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=int(config.lr_warmup_fraction * total),
        lr_decay_steps=total,
        lr_decay_style=config.lr_decay_style,
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
    )
