"""The launcher on NCCL (tests/parallel/test_reliability.py runs the same cases on gloo): a
failing rank ends the job with its message; SIGTERM saves a checkpoint and exits 0. One rank
per GPU, up to two."""

from __future__ import annotations

import re
import signal

import pytest
import torch

from megatron_croc.testing import run_launcher, start_launcher

pytestmark = pytest.mark.gpu


def _nproc() -> dict[str, str]:
    return {"NPROC_PER_NODE": str(min(2, torch.cuda.device_count()))}


def test_a_failing_rank_ends_the_nccl_job(tmp_path):
    last = int(_nproc()["NPROC_PER_NODE"]) - 1
    out = run_launcher(["--train-iters", "20"], output_dir=tmp_path, timeout=240,
                       env={**_nproc(), "MEGATRON_CROC_INJECT_FAULT": f"{last}:3:forward"})
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stderr.count("InjectedFault: injected fault at forward of iteration 3") == 1, out.stderr
    assert f"error: rank {last} failed (exit code 1; its error is above)" in out.stderr


def test_sigterm_saves_and_exits_0_on_nccl(tmp_path):
    job = start_launcher(["--train-iters", "200", "--log-interval", "1", "--exit-signal-handler"], output_dir=tmp_path,
                         env=_nproc())
    try:
        for line in job.stdout:
            if line.startswith("iteration      3/200"):
                job.send_signal(signal.SIGTERM)
                break
        rest, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, rest + stderr
    assert re.search(r"^stopping at iteration \d+ of 200: signal SIGTERM", rest, re.M), rest
