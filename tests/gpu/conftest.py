"""GPU-only tests (skipped without CUDA). One process compiles FlexAttention for several
variants, dtypes and shapes: raise torch.compile's per-function recompile limit (past it the
function silently runs eagerly, which would hide what these tests check)."""

from __future__ import annotations

import pytest
import torch

if torch.cuda.is_available():
    from megatron_croc.models.attention import raise_recompile_limit

    raise_recompile_limit()


@pytest.fixture
def no_tf32():
    """fp32 means fp32 in a test that asks for it (matmuls, cuDNN and FlexAttention follow the
    TF32 settings)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
