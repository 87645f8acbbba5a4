"""The README's main command on one GPU (NCCL, world of one): a few steps of the embedded
default with the look-ahead, evaluation and a checkpoint. The CPU tests run the same loop on
gloo, which also reduces CPU tensors; NCCL does not, so only this run covers the loop's
reductions on the device."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[2]


def test_launcher_trains_on_one_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(PYTHON=sys.executable, OUTPUT_DIR=str(tmp_path / "run"), NPROC_PER_NODE="1")
    out = subprocess.run(
        ["bash", str(ROOT / "examples" / "pretrain_croc.sh"), "--train-iters", "20", "--log-interval", "10",
         "--save-interval", "20", "--eval-interval", "20", "--eval-iters", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"^iteration .*?\| lm loss: ([0-9.]+)", out.stdout, re.M)]
    assert len(losses) == 2 and all(l == l for l in losses), out.stdout
    assert re.search(r"^validation at iteration 20: lm loss", out.stdout, re.M), out.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "20"
