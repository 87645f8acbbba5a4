"""Assignment of visual tokens to pool entries (megatron_croc/models/matching.py), on the CPU.

The Hungarian path (scipy per sample, the samples concurrently) must reach the optimal total
cost: against brute force on tiny matrices, against a plain serial scipy loop in float64 on
larger ones, including tied and adversarial costs and low-precision inputs.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from megatron_croc.models.matching import assign


def _totals(cost: torch.Tensor, cols: torch.Tensor) -> np.ndarray:
    return cost.double().gather(2, cols[..., None]).sum(dim=(1, 2)).numpy()


def _scipy_totals(cost: torch.Tensor) -> np.ndarray:
    out = []
    for m in cost.double().numpy():
        r, c = linear_sum_assignment(m)
        out.append(m[r, c].sum())
    return np.array(out)


def _brute_totals(cost: torch.Tensor) -> np.ndarray:
    _, n, k = cost.shape
    out = []
    for m in cost.double().numpy():
        out.append(min(m[np.arange(n), list(p)].sum() for p in itertools.permutations(range(k), n)))
    return np.array(out)


def _check(cost: torch.Tensor, cols: torch.Tensor, expected: np.ndarray) -> None:
    b, n, k = cost.shape
    assert cols.shape == (b, n) and cols.dtype == torch.int64 and cols.device == cost.device
    assert bool(((cols >= 0) & (cols < k)).all())
    for s in range(b):
        assert cols[s].unique().numel() == n, f"sample {s} uses a column twice"
    np.testing.assert_allclose(_totals(cost, cols), expected, rtol=1e-6, atol=1e-9)


def _unit_cdist(b: int, n: int, k: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    x = F.normalize(torch.randn(b, n, dim, generator=gen), dim=-1)
    p = F.normalize(torch.randn(b, k, dim, generator=gen), dim=-1)
    return torch.cdist(x, p)


def _tiny_cases() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    cases = []
    for n, k in [(1, 1), (1, 4), (2, 2), (3, 5), (4, 4), (4, 6), (5, 6), (6, 6)]:
        cases += [
            (f"rand{n}x{k}", torch.rand(3, n, k, generator=g)),
            (f"ints{n}x{k}", torch.randint(0, 3, (3, n, k), generator=g).float()),
            (f"equal{n}x{k}", torch.full((2, n, k), 0.5)),
            (f"ixj{n}x{k}", (torch.arange(n)[:, None] * torch.arange(k)[None]).float()[None]),
            (f"unit{n}x{k}", _unit_cdist(2, n, k, 8, g)),
        ]
    return cases


def test_hungarian_matches_brute_force_on_tiny_matrices():
    for name, cost in _tiny_cases():
        cols = assign(cost)
        try:
            _check(cost, cols, _brute_totals(cost))
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from err


def _larger_cases() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    n, k = 40, 100
    i = torch.arange(n, dtype=torch.float32)[:, None]
    j = torch.arange(k, dtype=torch.float32)[None]
    base = torch.rand(1, 1, k, generator=g) + 1.0
    return [
        ("random", torch.rand(3, n, k, generator=g)),
        ("integer ties", torch.randint(0, 4, (2, n, k), generator=g).float()),
        ("all equal", torch.ones(2, n, k)),
        ("i*j", (i * j)[None]),
        # rows identical up to ~1e-7 relative: only the tiny differences decide
        ("near-identical rows", base * (1 + 1e-7 * torch.rand(2, n, k, generator=g))),
        ("unit-norm cdist", _unit_cdist(2, n, k, 64, g)),
        ("N(0,1) pool cdist", torch.cdist(F.normalize(torch.randn(2, n, 64, generator=g), dim=-1),
                                          torch.randn(2, k, 64, generator=g))),
        ("square", torch.rand(2, 60, 60, generator=g)),
        ("single row", torch.rand(4, 1, 50, generator=g)),
        ("many samples", torch.rand(9, 12, 30, generator=g)),
        ("fp16 input", torch.rand(2, n, k, generator=g).half()),
        ("bf16 input", torch.rand(2, n, k, generator=g).bfloat16()),
        ("fp64 input", torch.rand(2, n, k, generator=g, dtype=torch.float64)),
    ]


def test_concurrent_hungarian_gives_the_serial_loops_columns_sample_by_sample():
    """The samples are solved on several threads: each must come back in its own place, with
    exactly the columns a plain serial scipy loop finds on the same (fp32 or fp64) values."""
    for name, cost in _larger_cases():
        values = cost if cost.dtype == torch.float64 else cost.float()
        serial = torch.from_numpy(np.stack([linear_sum_assignment(m)[1] for m in values.numpy()]))
        cols = assign(cost)
        try:
            _check(cost, cols, _scipy_totals(values))
            assert torch.equal(cols, serial), "columns differ from the serial loop's"
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from err


def test_nearest_is_argmin_and_may_reuse_columns():
    cost = torch.tensor([[[0.1, 0.9, 0.5], [0.2, 0.8, 0.7]]])  # both rows prefer column 0
    cols = assign(cost, method="nearest")
    assert cols.tolist() == [[0, 0]]
    g = torch.Generator().manual_seed(6)
    cost = torch.rand(4, 20, 30, generator=g)
    assert torch.equal(assign(cost, method="nearest"), cost.argmin(dim=2))
    assert assign(cost, method="hungarian").tolist() != cost.argmin(dim=2).tolist()


def test_gradients_and_empty_batches():
    cost = torch.rand(2, 3, 5, requires_grad=True)
    for method in ("hungarian", "nearest"):
        assert assign(cost, method=method).shape == (2, 3)
        assert assign(torch.rand(0, 3, 5), method=method).shape == (0, 3)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(3, 4), "shape"),
    (torch.rand(1, 2, 3, 4), "shape"),
    (torch.rand(2, 5, 4), "more rows than columns"),
    (torch.ones(2, 3, 4, dtype=torch.long), "floating-point"),
])
def test_bad_shapes_and_dtypes_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        assign(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_costs_name_the_sample(value):
    cost = torch.rand(4, 3, 5)
    cost[2, 1, 1] = value
    with pytest.raises(ValueError, match="sample index 2"):
        assign(cost)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown assignment method 'greedy'"):
        assign(torch.rand(1, 2, 3), method="greedy")


# -- assign_async: the solve in the background -------------------------------------------------


def test_assign_async_returns_before_the_solve_and_gives_the_scipy_optimum(monkeypatch):
    from megatron_croc.models import matching

    gate = threading.Event()
    solve = matching._lsap_columns

    def gated(matrix):
        assert gate.wait(60), "the gate was never opened"
        return solve(matrix)

    monkeypatch.setattr(matching, "_lsap_columns", gated)
    cost = torch.rand(3, 6, 11, generator=torch.Generator().manual_seed(5))
    pending = matching.assign_async(cost, method="hungarian")
    # The solver threads are held at the gate: assign_async must have returned without solving.
    assert not pending.done()
    gate.set()
    got = pending.result()
    assert got.dtype == torch.int64 and got.shape == (3, 6)
    for sample in range(3):
        rows, cols = linear_sum_assignment(cost[sample].numpy())
        assert len(set(got[sample].tolist())) == 6
        assert float(cost[sample, torch.arange(6), got[sample]].sum()) == pytest.approx(
            float(cost[sample].numpy()[rows, cols].sum()), rel=1e-6)
    assert pending.done() and pending.result() is got  # solved once, kept


def test_assign_async_nearest_is_ready_at_once_and_bad_costs_raise_on_result():
    from megatron_croc.models import matching

    cost = torch.rand(2, 4, 7, generator=torch.Generator().manual_seed(6))
    nearest = matching.assign_async(cost, method="nearest")
    assert nearest.done() and torch.equal(nearest.result(), cost.argmin(dim=2))
    with pytest.raises(ValueError, match="unknown assignment method"):
        matching.assign_async(cost, method="lapjv")
    # the background path checks the costs on the host, where the solver threads read them
    bad = torch.stack([cost[0], cost[1] * float("nan"), cost[0], cost[1] * float("inf")])
    pending = matching.assign_async(bad)
    with pytest.raises(ValueError, match=r"NaN or Inf in sample index 1 \(and 1 more samples\)"):
        pending.result()
    with pytest.raises(ValueError, match="NaN or Inf in sample index 0"):
        matching.assign_async(bad[1:2]).result()
