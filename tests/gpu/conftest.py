"""GPU-only tests (skipped without CUDA). One process compiles FlexAttention for several
variants, dtypes and shapes: raise torch.compile's per-function recompile limit (8 by default;
past it the function silently runs eagerly, which would hide what these tests check)."""

from __future__ import annotations

import torch


def _raise_recompile_limit(limit: int = 64) -> None:
    import torch._dynamo

    cfg = torch._dynamo.config
    if hasattr(cfg, "recompile_limit"):
        cfg.recompile_limit = max(cfg.recompile_limit, limit)
    else:
        cfg.cache_size_limit = max(cfg.cache_size_limit, limit)


if torch.cuda.is_available():
    _raise_recompile_limit()
