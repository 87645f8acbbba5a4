"""The host assignment split over the ranks that hold the same costs (tensor-parallel ranks):
each rank solves its share, every rank gets the whole optimal assignment, and a bad sample on
one rank neither hangs the others nor goes unreported."""

from __future__ import annotations

import pytest
import torch

from megatron_croc.testing import run_distributed

pytestmark = pytest.mark.parallel


def _worker(rank, world_size):
    import torch.distributed as dist
    from scipy.optimize import linear_sum_assignment

    from megatron_croc.models import matching

    dist.init_process_group("gloo")
    solved = []
    solve = matching._lsap_columns

    def counting(matrix):
        solved.append(float(matrix[0, 0]))  # which sample: its first cost is unique below
        return solve(matrix)

    matching._lsap_columns = counting
    out = {}
    generator = torch.Generator().manual_seed(0)  # the same costs on both ranks
    for batch in (5, 1, 0):
        cost = torch.rand(batch, 7, 19, generator=generator)
        cost[:, 0, 0] = torch.arange(batch, dtype=torch.float32) + 10  # tag each sample
        solved.clear()
        got = matching.assign_async(cost, group=dist.group.WORLD).result()
        expected = []
        for m in cost.numpy():
            rows, cols = linear_sum_assignment(m)
            expected.append(float(m[rows, cols].sum()))
        totals = cost.gather(2, got.unsqueeze(-1)).squeeze(-1).sum(dim=1).tolist() if batch else []
        out[batch] = dict(shape=tuple(got.shape), totals=totals, expected=expected,
                          solved=sorted(int(v) - 10 for v in solved), assignment=got.tolist())
    bad = torch.rand(4, 3, 6, generator=generator)
    bad[3, 1, 2] = float("nan")  # sample 3 belongs to rank 1 (samples 1 and 3)
    try:
        matching.assign_async(bad, group=dist.group.WORLD).result()
        out["bad"] = "no error"
    except ValueError as err:
        out["bad"] = str(err)
    return out


def test_split_assignment_over_two_ranks():
    results = run_distributed(_worker, 2, timeout=120)
    for batch in (5, 1, 0):
        a, b = results[0][batch], results[1][batch]
        assert a["shape"] == b["shape"] == (batch, 7)
        assert a["assignment"] == b["assignment"]  # one assignment shared by the ranks
        assert a["totals"] == pytest.approx(a["expected"], rel=1e-6)
        for row in a["assignment"]:
            assert len(set(row)) == 7
        # rank r solved samples r, r + 2, ...: half the host work each
        assert a["solved"] == list(range(0, batch, 2)) and b["solved"] == list(range(1, batch, 2))
    # the rank that solved the bad sample names it; the other is not left waiting
    assert results[0]["bad"] == "no error"
    assert results[1]["bad"] == "cost contains NaN or Inf in sample index 3"
