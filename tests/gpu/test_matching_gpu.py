"""The host assignment of CUDA costs at the real size (4 x 432 x 2048): scipy's optimum, returned
on the device, and started without waiting for the device (pinned non-blocking copy + event)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from megatron_croc.models.matching import assign, assign_async

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

B, N, K, H = 4, 432, 2048, 4096


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


def _unit_pool_costs(seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    tokens = F.normalize(torch.randn(B, N, H, device="cuda", generator=g), dim=-1)
    pool = F.normalize(torch.randn(K, H, device="cuda", generator=g), dim=-1)
    return torch.cdist(tokens, pool.expand(B, -1, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_assign_on_cuda_is_optimal_and_returns_on_the_device(dtype):
    cost = _unit_pool_costs(seed=1).to(dtype)
    cols = assign(cost)
    assert cols.is_cuda
    _check_optimal(cost, cols)


def test_assign_async_on_cuda_does_not_wait_for_the_device():
    """assign_async returns while the stream is still busy (pinned non-blocking copy + event),
    and its result is scipy's optimum."""
    cost = _unit_pool_costs(3)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # keep the stream busy (~1 s on a 2 GHz clock)
    late = cost * 1.0  # queued behind the sleep
    pending = assign_async(late)
    busy = not torch.cuda.current_stream().query()
    assert busy, "assign_async waited for the device"
    cols = pending.result()
    _check_optimal(cost, cols)
