"""GPU-only tests (skipped without CUDA). One process compiles FlexAttention for several
variants, dtypes and shapes: raise torch.compile's per-function recompile limit (past it the
function silently runs eagerly, which would hide what these tests check)."""

from __future__ import annotations

import torch

if torch.cuda.is_available():
    from megatron_croc.models.attention import raise_recompile_limit

    raise_recompile_limit()
