"""megatron_croc.distributed: how a failing process reports and ends, and the multi-process
runner the converter and the tests share."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_croc.distributed import EXIT_PEER_FAILED, SpawnedRankError, spawn


def _fail(error: str, rank: str = "0"):
    code = ("from megatron_croc.distributed import exit_after_failure\n"
            "class Collective(RuntimeError): pass\n"
            "class Clear(ValueError): pass\n"
            f"try:\n    raise {error}\n"
            "except BaseException as e:\n"
            "    exit_after_failure(e, clear_errors=(Clear,), collective_errors=(Collective,))\n")
    env = {**os.environ, "RANK": rank}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("error,rank,code,expected", [
    ("Clear('bad input')", "3", 1, "error: [rank 3] bad input\n"),
    ("Collective('all ranks agreed to stop')", "0", 1, "error: all ranks agreed to stop\n"),
    ("Collective('all ranks agreed to stop')", "1", 1, ""),  # said once, by rank 0
    ("RuntimeError('[gloo] Read error: Connection closed by peer')", "2", EXIT_PEER_FAILED,
     "[rank 2] stopping: another process of the job failed ([gloo] Read error: Connection closed by peer)\n"),
    ("KeyboardInterrupt()", "0", 130, "interrupted (rank 0)\n"),
])
def test_failures_are_reported_once_and_end_the_process(error, rank, code, expected):
    proc = _fail(error, rank)
    assert proc.returncode == code and proc.stderr == expected, proc.stderr


def test_an_unexpected_error_shows_its_traceback():
    proc = _fail("ZeroDivisionError('boom')", "1")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: [rank 1] ZeroDivisionError: boom\nTraceback (most recent call last):")


def _ok(rank, world_size):
    return rank * 10


def _raises(rank, world_size):
    if rank == 1:
        raise ValueError("rank one is broken")
    import time

    time.sleep(60)  # would hang the run if the failure did not end it


def _dies(rank, world_size):
    os._exit(9)


def _hangs(rank, world_size):
    import time

    time.sleep(60)


def test_spawn_returns_results_in_rank_order():
    assert spawn(_ok, 3, timeout=120) == [0, 10, 20]


def test_spawn_ends_at_the_first_failure():
    with pytest.raises(SpawnedRankError, match="rank 1 failed:[\\s\\S]*ValueError: rank one is broken") as err:
        spawn(_raises, 2, timeout=120)
    assert err.value.rank == 1 and isinstance(err.value.error, ValueError)
    with pytest.raises(SpawnedRankError, match="died with exit code 9"):
        spawn(_dies, 2, timeout=120)
    with pytest.raises(SpawnedRankError, match="timed out after 3 s"):
        spawn(_hangs, 1, timeout=3)


def _returns_tensor(rank, world_size):
    import torch

    return torch.full((3,), float(rank))


def test_spawn_returns_tensors_by_value():
    """Results travel by value: a worker may exit before the parent reads its tensors."""
    import torch

    first, second = spawn(_returns_tensor, 2, timeout=120)
    assert torch.equal(first, torch.zeros(3)) and torch.equal(second, torch.ones(3))
