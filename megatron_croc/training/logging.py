"""Console and TensorBoard logging of losses, learning rates, grad norm, throughput, model
TFLOP/s and memory.

Model FLOPs (what "model TFLOP/s" counts; hardware FLOPs of recomputation are not counted):

- LLM, per token: 6 * P_llm (forward + backward of every matrix, the output layer included,
  the input embedding lookup excluded) + 12 * L * H * S (attention scores and values, forward
  and backward; Megatron's convention, no discount for causal masking).
- Vision encoder, per image (frozen, forward only): 2 * P_vision * (T + 1) + 4 * L_v * H_v * (T + 1)^2.
  An unfrozen encoder costs 3x that.
- Projector, per visual token: 6 * P_projector. VTR head, per visual token: 6 * P_vtr + 12 * H * T.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatron_croc.config import ModelConfig


def _llm_matrix_params(config: ModelConfig) -> int:
    lm = config.language
    h, f = lm.hidden_size, lm.ffn_hidden_size
    kv = lm.num_query_groups * lm.kv_channels
    attention = h * (h + 2 * kv) + h * h
    mlp = 3 * h * f  # SwiGLU: gate, up, down
    return lm.num_layers * (attention + mlp) + h * lm.vocab_size


def model_flops_per_step(config: ModelConfig, *, num_tokens: int, seq_length: int, num_images: int) -> float:
    """Model FLOPs of one optimizer step over ``num_tokens`` tokens (padding included, as
    computed) and ``num_images`` images."""
    lm, vis = config.language, config.vision
    flops = num_tokens * (6 * _llm_matrix_params(config) + 12 * lm.num_layers * lm.hidden_size * seq_length)
    patches = vis.num_image_tokens + 1
    vis_params = vis.num_built_layers * (4 * vis.hidden_size**2 + 2 * vis.hidden_size * vis.ffn_hidden_size)
    encoder = 2 * vis_params * patches + 4 * vis.num_built_layers * vis.hidden_size * patches**2
    flops += num_images * encoder * (1 if vis.frozen else 3)
    visual_tokens = num_images * vis.num_image_tokens
    projector = vis.hidden_size * lm.hidden_size + lm.hidden_size**2
    flops += visual_tokens * 6 * projector
    if config.croc.uses_pool:
        h = lm.hidden_size
        vtr = 4 * h * h + 3 * h * lm.ffn_hidden_size + h * h
        flops += visual_tokens * (6 * vtr + 12 * h * vis.num_image_tokens)
    return float(flops)


@dataclass(kw_only=True)
class TrainingLogger:
    """Accumulates per-step numbers and writes them every ``log_interval`` steps. Only the
    writer (``is_writer``: the last rank, on the last pipeline stage, where the DP-averaged
    losses are) prints and writes TensorBoard; nothing is sent."""

    model_config: ModelConfig
    log_interval: int
    world_size: int
    tensorboard_dir: str | None = None
    is_writer: bool = False
    _writer: object = None
    _sums: dict = field(default_factory=dict)
    _count: int = 0
    _tokens: int = 0
    _samples: int = 0
    _flops: float = 0.0
    _start: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.is_writer and self.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.tensorboard_dir)

    def record(self, *, losses: dict[str, float], num_tokens: int, num_samples: int, num_images: int,
               seq_length: int) -> None:
        for k, v in losses.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1
        self._tokens += num_tokens
        self._samples += num_samples
        self._flops += model_flops_per_step(
            self.model_config, num_tokens=num_tokens, seq_length=seq_length, num_images=num_images
        )

    def maybe_log(self, iteration: int, train_iters: int, *, lrs: dict[str, float], grad_norm: float | None,
                  skipped: int) -> None:
        if iteration % self.log_interval or self._count == 0:
            return
        elapsed = time.perf_counter() - self._start
        stats = {k: v / self._count for k, v in self._sums.items()}
        stats.update(
            {
                "tokens/s": self._tokens / elapsed,
                "samples/s": self._samples / elapsed,
                "model TFLOP/s per GPU": self._flops / elapsed / self.world_size / 1e12,
                "iteration time (s)": elapsed / self._count,
            }
        )
        if grad_norm is not None:
            stats["grad norm"] = grad_norm
        stats.update({f"lr {name}": lr for name, lr in lrs.items()})
        if torch.cuda.is_available():
            stats["max memory (GiB)"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            stats["max RSS (GiB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if self.is_writer:
            parts = [f"iteration {iteration:>6}/{train_iters}"]
            parts += [f"{k}: {v:.4g}" for k, v in stats.items()]
            if skipped:
                parts.append(f"skipped (non-finite) steps: {skipped}")
            print(" | ".join(parts), flush=True)
            if self._writer is not None:
                for k, v in stats.items():
                    self._writer.add_scalar(k.replace(" ", "_").replace("/", "_per_"), v, iteration)
                self._writer.flush()
        self._sums, self._count, self._tokens, self._samples, self._flops = {}, 0, 0, 0, 0.0
        self._start = time.perf_counter()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
