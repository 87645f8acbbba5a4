"""The README's main command on one GPU (NCCL, world of one): a few steps of the embedded
default with the look-ahead, evaluation and a checkpoint. The CPU tests run the same loop on
gloo, which also reduces CPU tensors; NCCL does not, so only this run covers the loop's
reductions on the device."""

from __future__ import annotations

import re

import pytest
import torch

from megatron_croc.testing import run_launcher

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_launcher_trains_on_one_gpu(tmp_path):
    out = run_launcher(["--train-iters", "40", "--log-interval", "10", "--save-interval", "40",
                        "--eval-interval", "20", "--eval-iters", "1"], output_dir=tmp_path / "run",
                       env={"NPROC_PER_NODE": "1"}, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"^training .* on cuda \(nccl\)", out.stdout, re.M), out.stdout[-3000:]
    losses = [float(m) for m in re.findall(r"^iteration .*?\| lm loss: ([0-9.]+)", out.stdout, re.M)]
    # The CPU run of the same command (tests/parallel/test_demo_launcher.py) falls by > 0.5 in
    # 40 iterations; a loop whose reductions are wrong on the device would not learn.
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, out.stdout
    validation = [float(v) for v in re.findall(r"^validation at iteration \d+: lm loss: ([0-9.]+)", out.stdout, re.M)]
    assert len(validation) == 2 and validation[1] < validation[0], out.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
