"""forward_step and loss for megatron-core's pipeline schedules."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from megatron_croc.config import ModelConfig
from megatron_croc.models.attention import build_attention_layout
from megatron_croc.models.croc import CrocModel, CrocOutputs, croc_loss

# What the model needs from a collated batch (megatron_croc.data.dataset.BatchCollator).
MODEL_INPUTS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids", "visual_mask", "images",
                "image_sample_ids")


def unwrap(model) -> CrocModel:
    """The CrocModel inside DDP / Float16Module wrappers."""
    while not isinstance(model, CrocModel):
        model = model.module
    return model


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    missing = [k for k in MODEL_INPUTS if k not in batch]
    if missing:
        raise KeyError(f"the batch lacks {missing}; is the data loader megatron_croc.data's?")
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS}


class StepStats:
    """Per-step accumulators, filled on the last pipeline stage: samples and images seen, and
    the reported loss parts of every micro-batch."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.num_images = 0
        self.num_samples = 0
        self.losses: list[dict[str, torch.Tensor]] = []


def make_forward_step(model_config: ModelConfig, device: torch.device, stats: StepStats,
                      inject_nonfinite: bool = False):
    """The ``forward_step_func`` that megatron-core's schedules call once per micro-batch and
    model chunk. Every stage reads the batch (the layout); only the first stage uses images."""

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator), device)
        croc_model = unwrap(model)
        layout = build_attention_layout(
            model_config.croc.attention_variant, segment_ids=batch["segment_ids"],
            visual_mask=batch["visual_mask"], loss_mask=batch["loss_mask"],
        )
        if croc_model.post_process:  # counted where the losses are reported
            stats.num_images += int(batch["visual_mask"].sum()) // croc_model.num_image_tokens
            stats.num_samples += int(batch["segment_ids"].amax(dim=1).sum())
        output = model(
            tokens=batch["tokens"], position_ids=batch["position_ids"], layout=layout,
            visual_mask=batch["visual_mask"], labels=batch["labels"],
            images=batch["images"] if croc_model.pre_process else None,
            image_keys=batch["image_sample_ids"],
        )
        return output, partial(_loss_func, batch["loss_mask"], model_config, stats, inject_nonfinite)

    return forward_step


def _loss_func(loss_mask, model_config, stats, inject_nonfinite, output: CrocOutputs):
    total, parts = croc_loss(output, loss_mask, model_config)
    if inject_nonfinite:
        total = total * float("nan")
        parts = {k: v * float("nan") for k, v in parts.items()}
    stats.losses.append(parts)
    return total, parts
