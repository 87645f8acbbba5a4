"""The batched assignment solver on CUDA at the real size (8 x 432 x 2048) against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from megatron_croc.models.matching import _gpu_assign, assign, assign_async

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

B, N, K, H = 8, 432, 2048, 4096


def _scipy_totals(cost: torch.Tensor) -> np.ndarray:
    host = cost.double().cpu().numpy()
    out = []
    for m in host:
        r, c = linear_sum_assignment(m)
        out.append(m[r, c].sum())
    return np.array(out)


def _check_optimal(cost: torch.Tensor, cols: torch.Tensor) -> None:
    assert cols.device == cost.device and cols.dtype == torch.int64
    assert cols.shape == cost.shape[:2]
    cols_h = cols.cpu()
    for b in range(cost.shape[0]):
        assert cols_h[b].unique().numel() == cost.shape[1], f"sample {b} reuses a column"
    ours = cost.double().gather(2, cols[..., None]).sum(dim=(1, 2)).cpu().numpy()
    ref = _scipy_totals(cost)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


def _costs(pool_init: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    tokens = F.normalize(torch.randn(B, N, H, device="cuda", generator=g), dim=-1)
    pool = torch.randn(K, H, device="cuda", generator=g)
    if pool_init == "unit":
        pool = F.normalize(pool, dim=-1)
    return torch.cdist(tokens, pool.expand(B, -1, -1))


@pytest.mark.parametrize("pool_init", ["unit", "normal"])
def test_gpu_solver_matches_scipy_at_real_size(pool_init):
    cost = _costs(pool_init, seed=0)
    cols, stats = _gpu_assign(cost)
    _check_optimal(cost, cols)
    assert stats.fallbacks == 0


def test_auto_on_cuda_is_optimal_and_returns_on_the_device():
    cost = _costs("unit", seed=1)
    cols = assign(cost)
    assert cols.is_cuda
    _check_optimal(cost, cols)


def test_gpu_solver_on_ties_and_correlated_rows_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(2)
    ties = torch.randint(0, 3, (4, 200, 600), device="cuda", generator=g).float()
    base = torch.rand(1, 1, 600, device="cuda", generator=g)
    near = base + 1e-6 * torch.rand(4, 200, 600, device="cuda", generator=g)
    for cost in (ties, near):
        cols, stats = _gpu_assign(cost)
        _check_optimal(cost, cols)
        assert stats.fallbacks == 0


def test_assign_async_on_cuda_does_not_wait_for_the_device():
    """assign_async returns while the stream is still busy (pinned non-blocking copy + event),
    and its result is scipy's optimum."""
    cost = _costs("unit", 3)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # keep the stream busy (~1 s on a 2 GHz clock)
    late = cost * 1.0  # queued behind the sleep
    pending = assign_async(late)
    busy = not torch.cuda.current_stream().query()
    assert busy, "assign_async waited for the device"
    cols = pending.result()
    _check_optimal(cost, cols)
