"""What cluster jobs do to a run, through the README's launcher (torchrun, gloo, 2 CPU
processes): a failing rank ends the job with its message; a SIGKILLed rank ends the job;
SIGTERM saves and exits 0, and the resumed run is bit-identical to an uninterrupted one; a
rerun continues or says it is done; a longer resume follows the chosen schedule flag or is
refused; bad inputs are one line and exit 2 before any rank starts. docs/RELIABILITY.md lists
each case with what the user sees.

The subprocess timeouts are the requirement itself (a job must end within 60 s of a failure,
plus ~15 s of start-up here), not a speed claim: a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from megatron_croc.testing import run_launcher, start_launcher

pytestmark = pytest.mark.parallel

STARTUP_S = 30  # the launcher's checks and two ranks importing megatron-core, on a loaded 2-core machine
FAILURE_DEADLINE_S = 60


def _wait_for_line(job, prefix: str, timeout: float) -> str:
    """The first stdout line of ``job`` starting with ``prefix``; the job is killed (and the
    test fails) if none comes within ``timeout`` seconds."""
    watchdog = threading.Timer(timeout, job.kill)
    watchdog.start()
    try:
        for line in job.stdout:
            if line.startswith(prefix):
                return line
    finally:
        watchdog.cancel()
    raise AssertionError(f"the job ended (or hung) before printing {prefix!r}: {job.stderr.read()[-3000:]}")


def _job_processes(output_dir) -> list[psutil.Process]:
    """Processes still running for the job writing to ``output_dir``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(output_dir) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.mark.parametrize("layout,fault,tag", [
    ([], "1:3:forward", "rank 1 (TP 0, PP 1, DP 0)"),  # the demo's PP=2: the last stage fails
    ([], "0:2:data", "rank 0 (TP 0, PP 0, DP 0)"),  # the first stage, reading its batch
    (["--tensor-model-parallel-size", "2"], "1:2:backward", "rank 1 (TP 1, PP 0, DP 0)"),
    (["--pipeline-model-parallel-size", "1"], "0:3:optimizer", "rank 0 (TP 0, PP 0, DP 0)"),  # DP=2
    (["--save-interval", "2"], "1:2:save", "rank 1 (TP 0, PP 1, DP 0)"),  # the others wait inside the save
], ids=["pp-stage1-forward", "pp-stage0-data", "tp-rank1-backward", "dp-rank0-optimizer", "pp-stage1-save"])
def test_a_failing_rank_ends_the_job_with_its_message(tmp_path, layout, fault, tag):
    where = fault.split(":")[2]
    start = time.monotonic()
    out = run_launcher(["--train-iters", "20", *layout], output_dir=tmp_path / "run",
                       env={"MEGATRON_CROC_INJECT_FAULT": fault}, timeout=STARTUP_S + FAILURE_DEADLINE_S)
    elapsed = time.monotonic() - start
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    message = f"error: [{tag}] InjectedFault: injected fault at {where} of iteration"
    assert out.stderr.count(message) == 1, out.stderr  # once, tagged with the rank and its coordinates
    rank = fault.split(":")[0]
    assert re.search(rf"^error: rank {rank} failed \(exit code 1; its error is above\); the job was stopped",
                     out.stderr, re.M), out.stderr
    assert "Traceback" not in out.stderr.split(message)[0]  # nothing before the cause
    assert "ChildFailedError" not in out.stderr and "torch.distributed.elastic" not in out.stderr
    assert not _job_processes(tmp_path / "run"), f"processes left after {elapsed:.0f} s"


def test_a_sigkilled_rank_ends_the_job(tmp_path):
    job = start_launcher(["--train-iters", "300", "--log-interval", "1"], output_dir=tmp_path / "run")
    try:
        _wait_for_line(job, "iteration", STARTUP_S + 60)
        workers = psutil.Process(job.pid).children()
        assert len(workers) == 2, workers
        workers[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = job.communicate(timeout=FAILURE_DEADLINE_S)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1 and time.monotonic() - killed_at < FAILURE_DEADLINE_S
    assert "was killed by SIGKILL; the job was stopped" in stderr, stderr
    assert not _job_processes(tmp_path / "run")


def _final_state(checkpoints: Path, iteration: int) -> dict:
    """Every tensor of a saved checkpoint (model, optimizer), read without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = checkpoints.parent / f"state_{iteration}.pt"
    dcp_to_torch_save(str(checkpoints / f"iter_{iteration:07d}"), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_sigterm_saves_exits_0_and_the_resume_is_bit_identical(tmp_path):
    iters = ["--train-iters", "40", "--log-interval", "1", "--exit-signal-handler"]
    straight = run_launcher(iters, output_dir=tmp_path / "straight", timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    job = start_launcher(iters, output_dir=tmp_path / "stopped")
    try:
        _wait_for_line(job, "iteration      4/40", STARTUP_S + 60)
        job.send_signal(signal.SIGTERM)  # to the launcher, as Slurm or an operator would
        rest, stderr = job.communicate(timeout=FAILURE_DEADLINE_S)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, rest + stderr
    stopped = re.search(r"^stopping at iteration (\d+) of 40: signal SIGTERM \(--exit-signal-handler\); checkpoint saved",
                        rest, re.M)
    assert stopped, rest
    at = int(stopped.group(1))
    checkpoints = tmp_path / "stopped" / "checkpoints"
    assert json.loads((checkpoints / "run_state.json").read_text()) == {
        "iteration": at, "train_iters": 40, "complete": False, "stopped_by": "signal SIGTERM (--exit-signal-handler)"}
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == str(at)

    resumed = run_launcher(iters, output_dir=tmp_path / "stopped", timeout=300)  # the rerun continues
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"done: {40 - at} iterations this run (iterations {at + 1}..40) of 40" in resumed.stdout
    a = _final_state(tmp_path / "straight" / "checkpoints", 40)
    b = _final_state(checkpoints, 40)
    assert a.keys() == b.keys() and len(a) > 50
    different = [k for k in a if not (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].equal(b[k]))]
    assert not different, different[:5]  # model and optimizer state, bit for bit


def test_rerun_and_longer_resume(tmp_path):
    run = tmp_path / "run"
    base = ["--train-iters", "6", "--log-interval", "1"]
    first = run_launcher(base, output_dir=run, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]

    again = run_launcher(base, output_dir=run, timeout=120)
    assert again.returncode == 0 and "already at iteration 6 of --train-iters 6" in again.stdout, again.stdout

    longer = run_launcher(["--train-iters", "8", "--log-interval", "1"], output_dir=run, timeout=120)
    assert longer.returncode == 2
    (line,) = longer.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("error: the LR schedule differs from the checkpoint's") and "decay length" in line
    assert "--override-opt-param-scheduler" in line and "--use-checkpoint-opt-param-scheduler" in line

    zero = run_launcher(["--train-iters", "8", "--use-checkpoint-opt-param-scheduler"], output_dir=run, timeout=120)
    assert zero.returncode == 2 and "iterations 7..8 would train at LR 0" in zero.stderr, zero.stderr

    override = run_launcher(["--train-iters", "8", "--log-interval", "1", "--override-opt-param-scheduler"],
                            output_dir=run, timeout=300)
    assert override.returncode == 0, override.stderr[-3000:]
    assert "done: 2 iterations this run (iterations 7..8) of 8" in override.stdout
    lrs = [float(x) for x in re.findall(r"^iteration +[78]/8 .*\| lr main: ([0-9.e+-]+)", override.stdout, re.M)]
    assert len(lrs) == 2 and lrs[0] > 0, override.stdout  # iteration 8 ends the decay (LR 0 after it)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    done = run_launcher(["--train-iters", "2"], output_dir=out, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "checkpoints"


@pytest.fixture(scope="module")
def demo_prefix(tmp_path_factory):
    from megatron_croc.data.demo import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("demo"), num_samples=32, seq_length=160).prefix


def _error_cases(prefix: str, checkpoints: Path):
    real = ["--data-path", prefix, "--train-iters", "4", "--seq-length", "160"]
    return [
        (["--data-path", prefix, "--train-iters", "4"], {}, "--seq-length 2048 exceeds the tiny model's 1024 positions"),
        (["--data-path", prefix + "_nope", "--train-iters", "4", "--seq-length", "160"], {}, "not found; give the --output-prefix"),
        ([*real, "--vocab-size", "100"], {}, "--vocab-size is 100; pass --vocab-size 640 or more"),
        ([*real, "--tensor-model-parallel-size", "3"], {}, "2 processes cannot be split into"),
        ([*real, "--tensor-model-parallel-size", "4"], {"NPROC_PER_NODE": "4"}, "does not divide the query groups"),
        ([*real, "--load", str(checkpoints), "--num-layers", "4"], {}, "2 LLM layers (this model: 4; --num-layers)"),
        ([*real, "--save", str(checkpoints)], {}, "already holds checkpoints of a run"),
        ([*real, "--load", str(checkpoints), "--croc-stage", "align", "--save", str(checkpoints)], {},
         "saving here would overwrite it"),
    ]


def test_bad_inputs_are_one_line_and_exit_2_before_any_rank_starts(saved_run, demo_prefix, capsys, monkeypatch):
    """In-process (the launcher's own code, torchrun patched to fail if reached), every case;
    one case below runs as a real process."""
    import torch.distributed.run

    from megatron_croc.training import launcher

    def no_torchrun(*a, **k):
        raise AssertionError("torchrun started although the arguments were bad")

    monkeypatch.setattr(torch.distributed.run, "run", no_torchrun)
    for argv, env, message in _error_cases(demo_prefix, saved_run):
        for var in ("NPROC_PER_NODE", "TP", "PP", "STAGE"):
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        monkeypatch.setenv("OUTPUT_DIR", str(saved_run.parent / "other"))
        assert launcher.main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, err)


def test_a_bad_input_as_the_user_sees_it(demo_prefix, tmp_path):
    out = run_launcher(["--data-path", demo_prefix, "--train-iters", "4"], output_dir=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == ("error: --seq-length 2048 exceeds the tiny model's 1024 positions "
                                  "(max_position_embeddings); use --seq-length 1024 or less")
