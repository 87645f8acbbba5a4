"""Helpers shared by the tests and the benchmarks: a multi-process gloo world (through
megatron_croc.distributed, which production code uses too), the README's training launcher as a
subprocess, and a synthetic micro-batch that follows the batch contract of megatron_croc.data
(without depending on it). Production code imports nothing from here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_croc.distributed import free_port, init_model_parallel, init_process_group, spawn  # noqa: F401


def run_distributed(worker: Callable[..., Any], world_size: int, *, timeout: float = 600, **kwargs) -> list[Any]:
    """Run ``worker(rank=, world_size=, **kwargs)`` in ``world_size`` spawned processes (the
    worker sets up its own process group from the usual env vars) and return the results in
    rank order. A failure in any rank raises with that rank's traceback; a hang fails after
    ``timeout`` seconds (:func:`megatron_croc.distributed.spawn`)."""
    return spawn(worker, world_size, timeout=timeout, **kwargs)


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process, each storage counted once: what a
    run has allocated in tensors, measured (the memory report's checks compare against it)."""
    import gc

    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def init_distributed(*, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                     virtual_pipeline_parallel: int | None = None, seed: int = 1234) -> None:
    """Process group (gloo on CPU, NCCL on GPU) and megatron-core's parallel state, for a
    process started by torchrun or :func:`run_distributed`."""
    from megatron_croc.platform import init_platform

    init_process_group(init_platform().backend)
    init_model_parallel(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                        virtual_pipeline_parallel=virtual_pipeline_parallel, seed=seed)


def croc_forward_backward(model, config, batch: dict, *, backward: bool = True, **forward_kwargs):
    """One forward (+ backward) of a CrocModel on a ``synthetic_batch``, as the training step
    runs it: the attention layout from the batch, then ``croc_loss``. Returns (output, loss, parts)."""
    from megatron_croc.models.attention import build_attention_layout
    from megatron_croc.models.croc import croc_loss

    layout = build_attention_layout(config.croc.attention_variant, segment_ids=batch["segment_ids"],
                                    visual_mask=batch["visual_mask"], loss_mask=batch["loss_mask"])
    out = model(tokens=batch["tokens"], position_ids=batch["position_ids"], layout=layout,
                visual_mask=batch["visual_mask"], labels=batch["labels"], images=batch["images"],
                image_keys=batch["image_keys"], **forward_kwargs)
    loss, parts = croc_loss(out, batch["loss_mask"], config)
    if backward:
        loss.backward()
    return out, loss, parts


def synthetic_batch(
    *,
    num_image_tokens: int,
    image_size: int,
    vocab_size: int,
    seq_length: int,
    rows: list[list[dict]],
    seed: int = 0,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """A micro-batch in the data package's collated format.

    ``rows``: for each row, the packed samples it holds, each a dict with ``prompt`` (text
    tokens before the image), ``image`` (bool), ``question`` (text tokens between image and
    answer) and ``answer`` (supervised tokens). The rest of the row is padding.
    """
    g = torch.Generator().manual_seed(seed)
    bsz = len(rows)
    tokens = torch.full((bsz, seq_length), pad_token_id, dtype=torch.long)
    labels = torch.full((bsz, seq_length), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros(bsz, seq_length)
    position_ids = torch.zeros(bsz, seq_length, dtype=torch.long)
    segment_ids = torch.zeros(bsz, seq_length, dtype=torch.int32)
    visual_mask = torch.zeros(bsz, seq_length, dtype=torch.bool)
    images = []
    image_keys = []
    for b, samples in enumerate(rows):
        pos = 0
        for s_idx, sample in enumerate(samples, start=1):
            parts = [("text", sample.get("prompt", 0))]
            if sample.get("image", False):
                parts.append(("image", num_image_tokens))
            parts += [("text", sample.get("question", 0)), ("answer", sample.get("answer", 0))]
            start = pos
            for kind, n in parts:
                if kind == "image":
                    visual_mask[b, pos : pos + n] = True
                    images.append(torch.randint(0, 256, (3, image_size, image_size), generator=g, dtype=torch.uint8))
                    image_keys.append(len(image_keys) + 1000 * seed)
                else:
                    tokens[b, pos : pos + n] = torch.randint(1, vocab_size, (n,), generator=g)
                if kind == "answer" and n:
                    # the positions *predicting* answer tokens carry the loss
                    loss_mask[b, pos - 1 : pos + n - 1] = 1.0
                pos += n
            if pos > seq_length:
                raise ValueError(f"row {b} needs {pos} positions, more than {seq_length}")
            segment_ids[b, start:pos] = s_idx
            position_ids[b, start:pos] = torch.arange(pos - start)
            labels[b, start : pos - 1] = tokens[b, start + 1 : pos]
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "visual_mask": visual_mask,
        "images": torch.stack(images) if images else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8),
        "image_keys": torch.tensor(image_keys, dtype=torch.long),
    }


def _launcher_call(args: list[str], output_dir: str, env: dict[str, str] | None):
    root = Path(__file__).resolve().parents[1]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    clean.update(PYTHON=sys.executable, OUTPUT_DIR=str(output_dir), **(env or {}))
    return ["bash", str(root / "examples" / "pretrain_croc.sh"), *args], root, clean


def run_launcher(args: list[str], *, output_dir: str, env: dict[str, str] | None = None,
                 timeout: float = 900) -> subprocess.CompletedProcess:
    """``bash examples/pretrain_croc.sh ARGS`` (the README's main command) with this
    interpreter, outputs under ``output_dir``, and no distributed variables inherited from the
    calling process (its torchrun picks its own)."""
    cmd, cwd, clean = _launcher_call(args, output_dir, env)
    return subprocess.run(cmd, cwd=cwd, env=clean, capture_output=True, text=True, timeout=timeout)


def start_launcher(args: list[str], *, output_dir: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """:func:`run_launcher` without waiting: the job runs while the caller signals it. Its
    stdout is a text pipe read line by line; stderr is collected separately."""
    cmd, cwd, clean = _launcher_call(args, output_dir, env)
    return subprocess.Popen(cmd, cwd=cwd, env=clean, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
