"""The learnable prompt-token pool, the seeded per-image masks, and the replacement (SPEC §1.2).

Masks are a pure function of (seed, image key): the same on every tensor-parallel rank and on
every pipeline stage (the last stage recomputes them for the masked-only VTR loss), different
across images and steps when the key is the image's position in the training stream, and
reproducible on resume.
"""

from __future__ import annotations

import hashlib

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_croc.platform import host_to_device



def _mask_seed(seed: int, key: int) -> int:
    # A hash, not seed + key: nearby (seed, key) pairs must not give correlated streams.
    digest = hashlib.blake2b(f"croc-mask:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_mask_positions(
    *, seed: int, keys: torch.Tensor, num_tokens: int, num_masked: int, device: torch.device
) -> torch.Tensor:
    """int64 [len(keys), num_masked]: the visual-token positions each image has replaced,
    ascending, ``num_masked`` of ``num_tokens`` uniform without replacement, drawn from a
    generator seeded by (seed, key).

    Positions rather than a boolean mask: gathering and scattering at known positions needs no
    host sync on a GPU, where boolean indexing reads the mask's count back first.
    """
    rows = []
    for key in keys.tolist():  # keys on the host: no device sync (training.step)
        generator = torch.Generator().manual_seed(_mask_seed(seed, int(key)))
        rows.append(torch.randperm(num_tokens, generator=generator)[:num_masked].sort().values)
    positions = torch.stack(rows) if rows else torch.zeros(0, num_masked, dtype=torch.long)
    return host_to_device(positions, device)


class PromptPool(MegatronModule):
    """A pool P of ``pool_size`` learnable tokens (replicated on tensor-parallel ranks: it is
    small next to the LLM and every rank needs all of it for the assignment)."""

    def __init__(self, config, *, pool_size: int, hidden_size: int, init: str, seed: int):
        super().__init__(config=config)
        generator = torch.Generator().manual_seed(_mask_seed(seed, -1))
        # drawn on the CPU whatever the default device: the same pool on every machine
        weight = torch.randn(pool_size, hidden_size, generator=generator, device="cpu")
        if init == "token_scale":
            # Visual tokens are unit-norm; an N(0,1) pool has norms ~sqrt(H), and then the
            # nearest entry is decided by the pool norms alone (SPEC §1.2 pitfall).
            weight = weight / weight.norm(dim=-1, keepdim=True)
        elif init != "normal":
            raise ValueError(f"unknown pool init {init!r}: use 'token_scale' or 'normal'")
        self.weight = torch.nn.Parameter(weight.to(device=torch.get_default_device(), dtype=config.params_dtype))
        # Read by the optimizer's parameter groups: the pool takes no weight decay.
        self.weight.no_weight_decay = True

    def cost(self, visual_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Euclidean distances [N, n_masked, pool_size] (fp32, no grad) between each image's
        tokens at ``positions`` and every pool entry: what the assignment minimises."""
        num_images, _, hidden = visual_tokens.shape
        with torch.no_grad():
            selected = visual_tokens.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden)).float()
            return torch.cdist(selected, self.weight.float().unsqueeze(0).expand(num_images, -1, -1))

    def forward(
        self, visual_tokens: torch.Tensor, positions: torch.Tensor, assignment: torch.Tensor
    ) -> torch.Tensor:
        """Replace the visual tokens at ``positions`` by their assigned pool entries.

        visual_tokens [N, T, H], positions [N, n_masked] (:func:`draw_mask_positions`),
        assignment [N, n_masked]: the pool entry for each position, solved from :meth:`cost`
        (``matching.assign``). Returns the replaced tokens [N, T, H]. Gradients reach the
        assigned pool rows; the assignment itself is not differentiated.
        """
        entries = self.weight[assignment].to(visual_tokens.dtype)  # [N, n_masked, H]
        index = positions.unsqueeze(-1).expand(-1, -1, visual_tokens.shape[-1])
        return visual_tokens.scatter(1, index, entries)
