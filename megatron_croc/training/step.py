"""forward_step and loss for megatron-core's pipeline schedules."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from megatron.core.utils import unwrap_model

from megatron_croc.config import ModelConfig
from megatron_croc.models.attention import build_attention_layout, plan_split
from megatron_croc.models.croc import CrocModel, CrocOutputs, croc_loss
from megatron_croc.platform import host_to_device
from megatron_croc.training.fault_injection import FaultPlan

# What the model needs from a collated batch (megatron_croc.data.dataset.BatchCollator).
MODEL_INPUTS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids", "visual_mask", "images",
                "image_sample_ids")


# Read on the host only (they seed the pool masks): moving them would cost a device sync to read back.
HOST_INPUTS = ("image_sample_ids",)


def to_device(batch: dict[str, Any], device: torch.device, *, split_route: bool = False) -> dict[str, torch.Tensor]:
    """The model's inputs on ``device`` (image keys stay on the host), plus what the step
    would otherwise read back from the device, found on the host where the loader's batch is:
    ``visual_index``, the visual positions as flat indices (their count is checked on every
    stage), ``one_sample_per_row`` (plain causal attention needs no mask) and, when the model
    runs the ``split`` attention route (``split_route``), ``split_plan`` (whether and how it
    applies: models.attention.plan_split; None otherwise, so other routes pay nothing for it)."""

    missing = [k for k in MODEL_INPUTS if k not in batch]
    if missing:
        raise KeyError(f"the batch lacks {missing}; is the data loader megatron_croc.data's?")
    moved = {k: batch[k] if k in HOST_INPUTS else host_to_device(batch[k], device) for k in MODEL_INPUTS}
    moved["visual_index"] = host_to_device(batch["visual_mask"].flatten().nonzero().squeeze(1), device)
    moved["one_sample_per_row"] = bool((batch["segment_ids"] == 1).all())
    moved["split_plan"] = plan_split(batch["segment_ids"], batch["visual_mask"]) if split_route else None
    moved["num_samples"] = int(batch["segment_ids"].amax(dim=1).sum())  # segments are numbered 1..n per row
    return moved


class StepStats:
    """Per-step state shared with the forward step: the (1-based) iteration being computed,
    images and samples seen, counted on the last pipeline stage (host numbers, no device read),
    and the test-only faults of training.fault_injection (this step's losses made non-finite,
    an exception planted at some point of the step)."""

    def __init__(self, fault: FaultPlan | None = None) -> None:
        self.iteration = 0
        self.fault = fault
        self.reset()

    def reset(self) -> None:
        self.num_images = 0
        self.num_samples = 0
        self.inject_nonfinite = False

    def maybe_fail(self, where: str) -> None:
        if self.fault is not None:
            self.fault.fire(where, self.iteration)


class _LookaheadFeed:
    """One model chunk's micro-batches with the next one's vision work started ahead.

    Micro-batch m+1 is read and its :meth:`CrocModel.prefetch_visual` queued before micro-batch
    m's forward, so its assignment is solved on the host while the device runs m's forward and
    backward; only the first micro-batch of a step waits for its own solve. Never across
    optimizer steps: the costs depend on the projector and the pool, which the step updates.
    The schedules call the forward step exactly ``num_microbatches`` times per chunk and step,
    so the position in the step is a counter; the feed reads exactly as many batches as it
    returns.
    """

    def __init__(self, num_microbatches: int, device: torch.device, *, split_route: bool) -> None:
        self.num_microbatches = num_microbatches
        self.device = device
        self.split_route = split_route
        self.position = 0
        self.ahead: tuple[dict[str, torch.Tensor], Any] | None = None

    def _read(self, data_iterator, model: CrocModel):
        batch = to_device(next(data_iterator), self.device, split_route=self.split_route)
        return batch, model.prefetch_visual(batch["images"], batch["image_sample_ids"])

    def next(self, data_iterator, model: CrocModel):
        current = self.ahead if self.ahead is not None else self._read(data_iterator, model)
        self.ahead = None
        self.position += 1
        if self.position < self.num_microbatches:
            self.ahead = self._read(data_iterator, model)
        else:
            self.position = 0
        return current


def make_forward_step(model_config: ModelConfig, device: torch.device, stats: StepStats, *,
                      num_microbatches: int):
    """The ``forward_step_func`` that megatron-core's schedules call once per micro-batch and
    model chunk. Every stage reads the batch (the layout); only the first stage uses images.
    The loss parts of each micro-batch are what the schedule returns (last stage).

    ``num_microbatches`` per call of the schedule (an optimizer step): with
    ``croc.assignment_lookahead`` the first stage solves the next micro-batch's assignment
    during the current one, never beyond the step (see :class:`_LookaheadFeed`).
    """
    feeds: dict[int, _LookaheadFeed] = {}
    split_route = model_config.attention_backend == "split"

    def forward_step(data_iterator, model):
        stats.maybe_fail("data")
        croc_model = unwrap_model(model)
        prefetch = None
        if model_config.croc.assignment_lookahead and croc_model.prefetches_visual:
            feed = feeds.setdefault(id(model), _LookaheadFeed(num_microbatches, device, split_route=split_route))
            batch, prefetch = feed.next(data_iterator, croc_model)
        else:
            batch = to_device(next(data_iterator), device, split_route=split_route)
        layout = build_attention_layout(
            model_config.croc.attention_variant, segment_ids=batch["segment_ids"],
            visual_mask=batch["visual_mask"], loss_mask=batch["loss_mask"],
            one_sample_per_row=batch["one_sample_per_row"], backend=model_config.attention_backend,
            split_plan=batch["split_plan"], visual_index=batch["visual_index"],
        )
        if croc_model.post_process:  # counted where the losses are reported
            stats.num_images += len(batch["image_sample_ids"])  # one key per image, on the host
            stats.num_samples += batch["num_samples"]
        stats.maybe_fail("forward")
        output = model(
            tokens=batch["tokens"], position_ids=batch["position_ids"], layout=layout,
            visual_mask=batch["visual_mask"], labels=batch["labels"],
            images=batch["images"] if croc_model.pre_process else None,
            image_keys=batch["image_sample_ids"], visual_prefetch=prefetch, visual_index=batch["visual_index"],
        )
        return output, partial(_loss_func, batch["loss_mask"], model_config, stats)

    return forward_step


def _loss_func(loss_mask, model_config, stats: StepStats, output: CrocOutputs):
    total, parts = croc_loss(output, loss_mask, model_config)
    if stats.inject_nonfinite:
        total = total * float("nan")
        parts = {k: v * float("nan") for k, v in parts.items()}
    if stats.fault is not None and stats.fault.due("backward", stats.iteration) and total.requires_grad:
        def fail_in_backward(grad):
            stats.maybe_fail("backward")
            return grad

        total.register_hook(fail_in_backward)
    return total, parts
