"""The training forward step under megatron-core's schedule, one process: the assignment
look-ahead reads the next micro-batch ahead only within an optimizer step and changes nothing
in the result."""

from __future__ import annotations

import torch

from megatron_croc.config import CrocConfig, model_preset
from megatron_croc.models.croc import CrocModel
from megatron_croc.testing import synthetic_batch
from megatron_croc.training.step import StepStats, make_forward_step

NUM_MICROBATCHES = 3
SEQ = 40
ROWS = [
    [dict(prompt=3, image=True, question=2, answer=5)],
    [dict(prompt=1, image=True, question=0, answer=4), dict(prompt=2, image=False, question=1, answer=3)],
]


class LoggedBatches:
    """An endless micro-batch stream that logs every read in a shared event list."""

    def __init__(self, config, events: list[str]):
        self.config, self.events, self.count = config, events, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = synthetic_batch(
            num_image_tokens=self.config.vision.num_image_tokens, image_size=self.config.vision.image_size,
            vocab_size=self.config.language.vocab_size, seq_length=SEQ, rows=ROWS, seed=self.count,
        )
        # the data loader's key for the images' positions in the stream (they seed the masks)
        batch["image_sample_ids"] = batch["image_keys"] + 10 * self.count
        self.events.append(f"read {self.count}")
        self.count += 1
        return batch


def _train(lookahead: bool, steps: int = 2):
    """``steps`` schedule calls of NUM_MICROBATCHES micro-batches; between them the pool is
    redrawn (a stand-in for an optimizer step that moves the costs a lot). Returns the
    per-micro-batch losses, the pool gradient of the last step and the event log."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = model_preset("tiny", croc=CrocConfig(stage="croc", pool_size=64, assignment_lookahead=lookahead))
    torch.manual_seed(0)
    model = CrocModel(config)
    events: list[str] = []
    model.register_forward_pre_hook(lambda *_: events.append("forward"))
    data = LoggedBatches(config, events)
    stats = StepStats()
    forward_step = make_forward_step(config, torch.device("cpu"), stats, num_microbatches=NUM_MICROBATCHES)
    losses = []
    generator = torch.Generator().manual_seed(7)
    for step in range(steps):
        if step:
            with torch.no_grad():
                fresh = torch.randn(model.pool.weight.shape, generator=generator)
                model.pool.weight.copy_(fresh / fresh.norm(dim=-1, keepdim=True))
        model.zero_grad(set_to_none=True)
        stats.reset()
        reported = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=[model],
            num_microbatches=NUM_MICROBATCHES, seq_length=SEQ, micro_batch_size=2, forward_only=False,
        )
        losses += [{k: float(v) for k, v in parts.items()} for parts in reported]
        events.append("end")
    return losses, model.pool.weight.grad.clone(), events


def test_lookahead_reads_one_ahead_within_the_step_and_changes_nothing(megatron_world):
    plain_losses, plain_grad, plain_events = _train(lookahead=False)
    ahead_losses, ahead_grad, ahead_events = _train(lookahead=True)

    step = ["read", "forward"] * NUM_MICROBATCHES + ["end"]
    assert [e.split()[0] for e in plain_events] == step * 2
    # micro-batch m+1 is read (and its vision work and assignment started) before m's
    # forward, and no read crosses the step's end
    ahead = ["read", "read", "forward", "read", "forward", "forward", "end"]
    assert [e.split()[0] for e in ahead_events] == ahead * 2
    assert [e for e in ahead_events if e.startswith("read")] == [f"read {i}" for i in range(6)]

    # Same result to the bit: the pool was redrawn between the steps, so a prefetch made
    # before that (across the step) would have solved other costs and changed step 2.
    assert ahead_losses == plain_losses and len(ahead_losses) == 2 * NUM_MICROBATCHES
    assert torch.equal(ahead_grad, plain_grad)


def test_lookahead_is_off_where_it_would_not_help(megatron_world):
    """The nearest matcher has nothing to solve on the host: the plain read order."""
    config = model_preset("tiny", croc=CrocConfig(stage="croc", pool_size=64, matcher="nearest"))
    model = CrocModel(config)
    assert config.croc.assignment_lookahead and not model.prefetches_visual
    events: list[str] = []
    model.register_forward_pre_hook(lambda *_: events.append("forward"))
    forward_step = make_forward_step(config, torch.device("cpu"), StepStats(), num_microbatches=2)
    data = LoggedBatches(config, events)
    for _ in range(2):
        output, loss_func = forward_step(data, model)
        loss_func(output)
    assert events == ["read 0", "forward", "read 1", "forward"]


def test_image_keys_stay_on_the_host_and_visual_positions_are_found_there():
    """The pool masks are drawn on the host from the image keys, and the visual positions are
    indexed there; on a GPU, reading either back from the device costs a sync per micro-batch."""
    from megatron_croc.training.step import MODEL_INPUTS, to_device

    config = model_preset("tiny")
    batch = next(LoggedBatches(config, []))
    moved = to_device(batch, torch.device("meta"))
    host_facts = ("one_sample_per_row", "num_samples", "split_plan")
    assert set(moved) == set(MODEL_INPUTS) | {"visual_index", *host_facts}
    assert moved["image_sample_ids"] is batch["image_sample_ids"]
    assert all(v.is_meta for k, v in moved.items() if k not in ("image_sample_ids", *host_facts))
    assert moved["one_sample_per_row"] is False  # ROWS pack two samples in row 1
    assert moved["num_samples"] == 3
    # the split route's plan is read on the host only for a model that runs that route
    assert moved["split_plan"] is None
    planned = to_device(batch, torch.device("meta"), split_route=True)["split_plan"]
    assert planned is not None and planned.why_not == "packed rows (several samples in a row)"
    # the visual positions, found on the host: what the model would otherwise read back
    host = to_device(batch, torch.device("cpu"))
    assert torch.equal(host["visual_index"], batch["visual_mask"].flatten().nonzero().squeeze(1))
    assert host["visual_index"].numel() == len(batch["image_sample_ids"]) * config.vision.num_image_tokens
