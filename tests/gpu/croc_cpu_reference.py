"""The tiny CrocModel case shared by test_model_gpu.py and its CPU reference.

Run as a script (by the test, in a fresh process with CUDA hidden, i.e. exactly the CPU path
with megatron_croc's CPU shims), it loads the model weights and the batch the GPU test saved
in DIR, runs forward and backward on the CPU, and saves the losses and gradients to DIR/ref.pt:

    CUDA_VISIBLE_DEVICES= MEGATRON_CROC_FORCE_CPU=1 python tests/gpu/croc_cpu_reference.py DIR
"""

from __future__ import annotations

import os
import sys

import torch

ROWS = [  # packing, padding, a text-only sample
    [dict(prompt=3, image=True, question=2, answer=5)],
    [dict(prompt=1, image=True, question=0, answer=4), dict(prompt=2, image=False, question=1, answer=3)],
]
SEQ = 48


def make_config(*, bf16: bool = False):
    """Tiny Croc stage (the Hungarian assignment: scipy's exact optimum on either device)."""
    from megatron_croc.config import CrocConfig, PrecisionConfig, model_preset

    return model_preset("tiny", croc=CrocConfig(stage="croc", pool_size=64),
                        precision=PrecisionConfig(bf16=bf16))


def make_batch(config) -> dict[str, torch.Tensor]:
    from megatron_croc.testing import synthetic_batch

    return synthetic_batch(
        num_image_tokens=config.vision.num_image_tokens, image_size=config.vision.image_size,
        vocab_size=config.language.vocab_size, seq_length=SEQ, rows=ROWS, seed=0,
    )


def run(model, config, batch, device, *, prefetch: bool = False) -> dict:
    """Forward + backward of one micro-batch; the losses, per-token LM loss and every grad (CPU).
    With ``prefetch`` the vision work and the assignment are started ahead, as the training
    step's look-ahead does."""
    from megatron_croc.models.attention import build_attention_layout
    from megatron_croc.models.croc import croc_loss

    b = {k: v.to(device) for k, v in batch.items()}
    layout = build_attention_layout(config.croc.attention_variant, segment_ids=b["segment_ids"],
                                    visual_mask=b["visual_mask"], loss_mask=b["loss_mask"])
    inner = model.module if hasattr(model, "module") else model  # inside Float16Module
    ahead = inner.prefetch_visual(b["images"], b["image_keys"]) if prefetch else None
    out = model(tokens=b["tokens"], position_ids=b["position_ids"], layout=layout, visual_mask=b["visual_mask"],
                labels=b["labels"], images=b["images"], image_keys=b["image_keys"], visual_prefetch=ahead)
    loss, parts = croc_loss(out, b["loss_mask"], config)
    loss.backward()
    grads = {}
    for name, p in inner.named_parameters():
        g = getattr(p, "main_grad", None) if p.grad is None else p.grad
        if p.requires_grad and g is not None:
            grads[name] = g.detach().float().cpu()
    return {
        "backend": layout.backend,
        "loss": loss.detach().float().cpu(),
        "lm": parts["lm loss"].float().cpu(),
        "vtr": parts["vtr loss"].float().cpu(),
        "per_token": out.lm_loss_per_token.detach().float().cpu(),
        "grads": grads,
    }


def _main(directory: str) -> None:
    from megatron_croc.models.croc import CrocModel
    from megatron_croc.testing import free_port, init_distributed

    assert not torch.cuda.is_available(), "run with CUDA_VISIBLE_DEVICES= (the CPU reference)"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    init_distributed()
    config = make_config()
    model = CrocModel(config)
    model.load_state_dict(torch.load(os.path.join(directory, "state.pt")))
    batch = torch.load(os.path.join(directory, "batch.pt"))
    torch.save(run(model, config, batch, torch.device("cpu")), os.path.join(directory, "ref.pt"))
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv[1])
