"""Optimizer (megatron-core's, distributed or not), parameter groups and the LR schedule.

Parameter groups (all through megatron-core's ``config_overrides``, nothing hand-rolled):
- no weight decay on norms, biases (every 1-d tensor) and the prompt pool;
- the projector at ``--projector-lr`` and the pool at ``--pool-lr`` when given, each decaying
  to the same fraction of its peak as the main LR (min_lr / lr).
"""

from __future__ import annotations

import torch

from megatron_croc.training.config import OptimConfig


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


def lr_schedule(config: OptimConfig, *, train_iters: int, global_batch_size: int) -> dict:
    """The LR schedule a run follows, in the scheduler's units (samples, like Megatron-LM):
    what a checkpoint records, and what a resumed run is compared against."""
    total = train_iters * global_batch_size
    return {
        "lr": config.lr, "min_lr": config.min_lr, "lr_warmup_steps": int(config.lr_warmup_fraction * total),
        "lr_decay_steps": total, "lr_decay_style": config.lr_decay_style,
        "projector_lr": config.projector_lr, "pool_lr": config.pool_lr, "global_batch_size": global_batch_size,
    }


def schedule_from_scheduler_state(state: dict) -> dict:
    """:func:`lr_schedule`'s keys from megatron-core's scheduler state (older checkpoints)."""
    return {"lr": state["max_lr"], "min_lr": state["min_lr"], "lr_warmup_steps": state["lr_warmup_steps"],
            "lr_decay_steps": state["lr_decay_steps"], "lr_decay_style": state["lr_decay_style"]}


def build_scheduler(config: OptimConfig, optimizer, *, train_iters: int, global_batch_size: int):
    """megatron-core's OptimizerParamScheduler, stepped in samples like Megatron-LM. On resume,
    it follows Megatron's override / use-checkpoint flags (preflight has refused a silent change)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    schedule = lr_schedule(config, train_iters=train_iters, global_batch_size=global_batch_size)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=schedule["lr"],
        min_lr=schedule["min_lr"],
        lr_warmup_steps=schedule["lr_warmup_steps"],
        lr_decay_steps=schedule["lr_decay_steps"],
        lr_decay_style=schedule["lr_decay_style"],
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=schedule["lr_decay_steps"],
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=config.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=config.override_opt_param_scheduler,
    )
