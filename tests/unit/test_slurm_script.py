"""examples/slurm/pretrain_croc.sbatch with stand-ins for srun and scontrol (no Slurm here):
what it passes to every node, how it reads GPUs per node, and when it requeues itself."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "slurm" / "pretrain_croc.sbatch"

# srun stand-in: records its environment and arguments, then plays the training job's end
# (FAKE_RUN_STATE: the run_state.json the trainer would write; FAKE_STATUS: its exit status).
FAKE_SRUN = """#!/usr/bin/env bash
{ echo "NPROC_PER_NODE=$NPROC_PER_NODE PYTHON=$PYTHON OUTPUT_DIR=$OUTPUT_DIR"; printf '%s\\n' "$@"; } > "$FAKE_LOG/srun"
save=""; prev=""
for a in "$@"; do [ "$prev" = "--save" ] && save=$a; prev=$a; done
if [ -n "${FAKE_RUN_STATE:-}" ]; then mkdir -p "$save"; printf '%s' "$FAKE_RUN_STATE" > "$save/run_state.json"; fi
exit "${FAKE_STATUS:-0}"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [ "$1" = show ]; then echo node001; echo node002; exit 0; fi
echo "$@" >> "$FAKE_LOG/scontrol"
"""


@pytest.fixture
def slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)

    def run(*args, gpus="h100:8", state=None, status=0):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(tmp_path), SLURM_JOB_ID="4242", SLURM_NNODES="2",
                   SLURM_JOB_NODELIST="node[001-002]", SLURM_GPUS_PER_NODE=gpus, SLURM_SUBMIT_DIR=str(REPO),
                   OUTPUT_DIR=str(tmp_path / "out"), FAKE_STATUS=str(status))
        if state is not None:
            env["FAKE_RUN_STATE"] = json.dumps(state)
        proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)
        srun = (tmp_path / "srun").read_text().splitlines() if (tmp_path / "srun").exists() else []
        scontrol = (tmp_path / "scontrol").read_text() if (tmp_path / "scontrol").exists() else ""
        return proc, srun, scontrol

    return run


@pytest.mark.parametrize("gpus,expected", [("8", "8"), ("h100:8", "8"), ("gpu:h100:4", "4"), ("8(x2)", "8")])
def test_every_node_gets_the_resumable_exit_flags_and_its_gpu_count(slurm, tmp_path, gpus, expected):
    proc, srun, _ = slurm("--model", "vicuna-7b", gpus=gpus, state={"complete": True})
    assert proc.returncode == 0, proc.stderr
    assert srun[0].startswith(f"NPROC_PER_NODE={expected} PYTHON={REPO}/.venv/bin/python")
    args = srun[1:]
    save = str(tmp_path / "out" / "checkpoints")
    for flag in (["--save", save], ["--auto-resume"], ["--exit-signal-handler"], ["--exit-signal", "SIGUSR1"],
                 ["--model", "vicuna-7b"]):
        assert any(args[i:i + len(flag)] == flag for i in range(len(args))), (flag, args)


def test_an_incomplete_run_requeues_the_job(slurm):
    proc, _, scontrol = slurm(state={"iteration": 120, "train_iters": 500, "complete": False,
                                     "stopped_by": "signal SIGUSR1 (--exit-signal-handler)"})
    assert proc.returncode == 0 and scontrol.strip() == "requeue 4242", proc.stdout + proc.stderr
    assert "requeueing" in proc.stdout


def test_a_complete_run_or_a_crash_is_not_requeued(slurm):
    proc, _, scontrol = slurm(state={"complete": True})
    assert proc.returncode == 0 and scontrol == ""
    proc, _, scontrol = slurm(state={"complete": False}, status=1)
    assert proc.returncode == 1 and scontrol == ""


def test_save_is_set_through_save_dir(slurm):
    proc, srun, _ = slurm("--save=ckpts/x")
    assert proc.returncode == 2 and "set SAVE_DIR instead of passing --save" in proc.stderr and srun == []
