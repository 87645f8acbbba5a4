"""Assignment of visual tokens to pool entries (megatron_croc/models/matching.py), on the CPU.

Both Hungarian solvers must reach the optimal total cost: against brute force on tiny
matrices, against scipy on larger ones, including tied and adversarial costs. The batched
solver runs here on the CPU (tests/gpu/test_matching_gpu.py repeats the checks on CUDA).
"""

from __future__ import annotations

import itertools
import logging
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from megatron_croc.models.matching import _BatchedAuction, _gpu_assign, SolverStats, assign

SOLVERS = ["scipy", "gpu"]
# tests/conftest.py skips every test with "gpu" among its keywords on CPU-only machines, and a
# parameter value becomes a keyword: name the batched solver's cases "batched".
SOLVER_PARAMS = [pytest.param("scipy", id="scipy"), pytest.param("gpu", id="batched")]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The solver's tensors are tiny here: torch's intra-op threads only add overhead, which
    made this file 7x slower on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
def test_hungarian_matches_brute_force_on_tiny_matrices(solver):
    for name, cost in _tiny_cases():
        cols = assign(cost, solver=solver)
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
        ("fp16 input", torch.rand(2, n, k, generator=g).half()),
    ]


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
def test_hungarian_matches_scipy_on_random_tied_and_adversarial_costs(solver):
    for name, cost in _larger_cases():
        cols = assign(cost, solver=solver)
        try:
            _check(cost, cols, _scipy_totals(cost.float()))
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from err


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
def test_hungarian_at_100x300(solver):
    """Unit-norm distances as the pool matching produces (scaled down), and the two hardest
    adversarial patterns at the same size."""
    g = torch.Generator().manual_seed(2)
    i = torch.arange(100, dtype=torch.float32)[:, None]
    j = torch.arange(300, dtype=torch.float32)[None]
    near = (torch.rand(1, 1, 300, generator=g) + 1.0) * (1 + 1e-7 * torch.rand(1, 100, 300,
                                                                             generator=g))
    for name, cost in [("unit-norm cdist", _unit_cdist(2, 100, 300, 128, g)),
                       ("i*j", (i * j)[None]),
                       ("near-identical rows", near)]:
        try:
            _check(cost, assign(cost, solver=solver), _scipy_totals(cost))
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from err


def test_batched_solver_fuzz_against_scipy():
    """Many small random shapes with heavy ties, exact and near (within 1e-7 relative)."""
    g = torch.Generator().manual_seed(7)
    for trial in range(40):
        n = int(torch.randint(1, 13, (1,), generator=g))
        k = n + int(torch.randint(0, 13, (1,), generator=g))
        b = int(torch.randint(1, 4, (1,), generator=g))
        levels = int(torch.randint(1, 5, (1,), generator=g))
        cost = torch.randint(0, levels, (b, n, k), generator=g).double()
        if trial % 2:
            cost = 1 + cost + 1e-7 * torch.rand(b, n, k, generator=g, dtype=torch.float64)
        cols, stats = _gpu_assign(cost)
        try:
            _check(cost, cols, _scipy_totals(cost))
        except AssertionError as err:
            raise AssertionError(f"trial {trial} ({b}x{n}x{k}): {err}") from err
        assert stats.fallbacks == 0


def test_batched_solver_reports_no_fallback_and_exact_certificate():
    g = torch.Generator().manual_seed(3)
    cost = torch.randint(0, 5, (4, 30, 70), generator=g).float()
    cols, stats = _gpu_assign(cost)
    _check(cost, cols, _scipy_totals(cost))
    assert stats.fallbacks == 0 and stats.phases >= 1


def test_certificate_rejects_a_suboptimal_assignment():
    """The optimality proof is a real check: swapping two rows' columns breaks it."""
    cost = torch.tensor([[[0.0, 10.0, 5.0], [10.0, 0.0, 5.0]]])
    solver = _BatchedAuction(cost, SolverStats(), max_iterations=10_000)
    assert bool(solver.run().all()) and bool(solver.certified().all())
    solver.row_col = solver.row_col.flip(1)
    solver.col_row = torch.tensor([[1, 0, -1]])
    assert not bool(solver.certified().any())


def test_iteration_cap_falls_back_to_scipy_and_logs(caplog):
    g = torch.Generator().manual_seed(4)
    cost = torch.rand(2, 20, 50, generator=g)
    with caplog.at_level(logging.WARNING, logger="megatron_croc.models.matching"):
        cols, stats = _gpu_assign(cost, max_iterations=1)
    assert stats.fallbacks == 2
    assert "re-solving them with scipy" in caplog.text
    _check(cost, cols, _scipy_totals(cost))


def test_auto_is_scipy_on_cpu_and_results_are_deterministic():
    g = torch.Generator().manual_seed(5)
    cost = torch.rand(3, 12, 30, generator=g)
    assert torch.equal(assign(cost), assign(cost, solver="scipy"))
    assert torch.equal(assign(cost, solver="gpu"), assign(cost, solver="gpu"))


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
    for solver in SOLVERS:
        assert assign(cost, solver=solver).shape == (2, 3)
        assert assign(torch.rand(0, 3, 5), solver=solver).shape == (0, 3)


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
    for solver in SOLVERS:
        with pytest.raises(ValueError, match="sample index 2"):
            assign(cost, solver=solver)


def test_unknown_method_or_solver_raise():
    cost = torch.rand(1, 2, 3)
    with pytest.raises(ValueError, match="unknown assignment method"):
        assign(cost, method="greedy")
    with pytest.raises(ValueError, match="unknown assignment solver"):
        assign(cost, solver="lapjv")


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
    pending = matching.assign_async(cost, method="hungarian", solver="auto")
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


def test_assign_async_of_device_side_methods_is_ready_at_once():
    from megatron_croc.models import matching

    cost = torch.rand(2, 4, 7, generator=torch.Generator().manual_seed(6))
    nearest = matching.assign_async(cost, method="nearest")
    assert nearest.done() and torch.equal(nearest.result(), cost.argmin(dim=2))
    batched = matching.assign_async(cost, method="hungarian", solver="gpu")
    assert batched.done() and torch.equal(batched.result(), matching.assign(cost, solver="scipy"))
    with pytest.raises(ValueError, match="unknown assignment solver"):
        matching.assign_async(cost, solver="lapjv")
    # the background path checks the costs on the host, where the solver threads read them
    bad = torch.stack([cost[0], cost[1] * float("nan"), cost[0], cost[1] * float("inf")])
    pending = matching.assign_async(bad, solver="scipy")
    with pytest.raises(ValueError, match=r"NaN or Inf in sample index 1 \(and 1 more samples\)"):
        pending.result()
    with pytest.raises(ValueError, match="NaN or Inf in sample index 0"):
        matching.assign_async(bad[1:2], solver="scipy").result()
    with pytest.raises(ValueError, match="NaN or Inf in sample index 1"):
        matching.assign_async(bad, solver="gpu")
