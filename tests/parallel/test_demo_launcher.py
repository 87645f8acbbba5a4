"""The README's main command, shortened: examples/pretrain_croc.sh with no data trains the
tiny model on the demo data, the loss falls, a checkpoint and TensorBoard logs are written and
the last lines say where."""

from __future__ import annotations

import re

import pytest

from megatron_croc.testing import run_launcher

pytestmark = pytest.mark.parallel


def test_demo_launcher_end_to_end(tmp_path):
    out = run_launcher(["--train-iters", "40", "--log-interval", "10", "--save-interval", "20",
                        "--eval-interval", "20", "--eval-iters", "2"], output_dir=tmp_path / "run")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"^iteration .*?\| lm loss: ([0-9.]+)", out.stdout, re.M)]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, out.stdout
    validation = re.findall(r"^validation at iteration (\d+): lm loss: ([0-9.]+) \| vtr loss: ([0-9.]+)", out.stdout, re.M)
    assert [v[0] for v in validation] == ["20", "40"], out.stdout
    assert "PP=2 DP=1 on cpu (gloo)" in out.stdout  # two CPU processes, one pipeline stage each
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000020", "iter_0000040"]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    tail = out.stdout.strip().splitlines()[-3:]
    assert tail[0].startswith("done: 40 iterations this run (iterations 1..40) of 40")
    assert "checkpoint:" in tail[1] and "TensorBoard" in tail[2]
    # only the project's own lines: known third-party warnings are silenced, nothing else came
    assert out.stderr == "" and "warn" not in out.stdout.lower(), out.stderr[-3000:]
    assert all(line.startswith(("launcher:", "training ", "iteration ", "validation ", "done:", "checkpoint:",
                                "TensorBoard")) for line in out.stdout.strip().splitlines()), out.stdout
