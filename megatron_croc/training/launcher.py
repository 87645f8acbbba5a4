"""The job launcher behind ``examples/pretrain_croc.sh`` and the Slurm script: it checks the
run before starting anything, then runs torchrun in this process and reports how the job ended.

    python -m megatron_croc.training.launcher [trainer flags]

Environment (defaults in brackets), as the shell script documents:
  STAGE [croc]           --croc-stage, unless the flag is given
  TP [1], PP [1]         --tensor/pipeline-model-parallel-size, unless the flags are given
  NPROC_PER_NODE         processes on this node [one per GPU; 2 on a machine without GPUs]
  NNODES [1], NODE_RANK [0], MASTER_ADDR [127.0.0.1], MASTER_PORT [29500], RDZV_ID [croc]
  OUTPUT_DIR [outputs/croc_run]  --save (OUTPUT_DIR/checkpoints) and --tensorboard-dir when not given

Which wins: an explicit flag over the STAGE/TP/PP variables, and both over the embedded demo's
layout (no --data-path, 2 CPU processes, neither TP nor PP chosen: one pipeline stage each,
which measured fastest on 2 cores). Flags may be written ``--flag value`` or ``--flag=value``.

What the launcher adds:
- the trainer's argument and file checks (training.preflight) run here, once, before any rank
  starts: a bad input is one ``error:`` line and exit 2; a finished run says so and exits 0;
- with no --save and no --load, the run saves under OUTPUT_DIR and resumes from there when
  rerun (``--auto-resume``), so a rerun continues instead of starting over;
- signals: SIGTERM and the trainer's ``--exit-signal`` are passed on to every rank (which stop
  at the next iteration boundary and save with ``--exit-signal-handler``), and the launcher waits
  for them; torchrun itself would give ranks only 30 s and report a failure. SIGINT (Ctrl-C)
  stops the job at once;
- one summary line when a rank fails, instead of torchrun's traceback (each rank printed its
  own error, tagged with its rank, already).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Sequence

from megatron_croc.config import ConfigError

DEFAULT_OUTPUT_DIR = "outputs/croc_run"


def _given_flags(argv: Sequence[str]) -> dict:
    """The trainer flags present in ``argv`` (whatever their spelling), with their values."""
    from megatron_croc.training.arguments import build_parser

    parser = build_parser()
    # argparse has no public "was this given" query; a default of SUPPRESS leaves absent flags out
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(list(argv)))


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{name}={raw!r}: expected a positive integer")
    return int(raw)


def _num_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def build_trainer_argv(argv: Sequence[str], *, num_gpus: int) -> tuple[list[str], int, list[str], bool]:
    """The trainer's command line from the user's and the environment: (argv, processes per
    node, notes for the user, whether the launcher chose --save)."""
    given = _given_flags(argv)
    out = list(argv)
    notes: list[str] = []
    demo = "data_path" not in given
    stage = os.environ.get("STAGE", "").strip()
    if stage and "croc_stage" not in given:
        out += ["--croc-stage", stage]
    elif stage and given.get("croc_stage") != stage:
        notes.append(f"STAGE={stage} ignored: --croc-stage {given['croc_stage']} given")

    nproc = _env_int("NPROC_PER_NODE") or (num_gpus if num_gpus > 0 else 2)
    layout = {}
    for var, dest, flag in (("TP", "tensor_model_parallel_size", "--tensor-model-parallel-size"),
                            ("PP", "pipeline_model_parallel_size", "--pipeline-model-parallel-size")):
        env = _env_int(var)
        if dest in given:
            layout[var] = given[dest]
            if env is not None and env != given[dest]:
                notes.append(f"{var}={env} ignored: {flag} {given[dest]} given")
        elif env is not None:
            layout[var] = env
            out += [flag, str(env)]
    nnodes = _env_int("NNODES") or 1
    if demo and not layout and num_gpus == 0 and nproc == 2 and nnodes == 1:
        out += ["--pipeline-model-parallel-size", "2"]
        notes.append("embedded demo on 2 CPU processes: one pipeline stage each (PP=2); set TP/PP or pass "
                     "--tensor/pipeline-model-parallel-size to choose another layout")
    if demo and "num_workers" not in given:
        out += ["--num-workers", "0"]  # the demo's samples are tiny: worker processes cost more than they save
    output_dir = os.environ.get("OUTPUT_DIR") or DEFAULT_OUTPUT_DIR
    chose_save = "save" not in given
    if chose_save:
        out += ["--save", os.path.join(output_dir, "checkpoints")]
        if "save_interval" not in given:
            out += ["--save-interval", "100"]
        if "load" not in given and "auto_resume" not in given:
            out += ["--auto-resume"]  # a rerun continues its own run
    if "tensorboard_dir" not in given:
        out += ["--tensorboard-dir", os.path.join(output_dir, "tensorboard")]
    return out, nproc, notes, chose_save


def _torchrun_argv(nproc: int, trainer_argv: list[str]) -> list[str]:
    nnodes = _env_int("NNODES") or 1
    if nnodes == 1:
        rdzv = ["--standalone"]  # a free local port, no rendezvous server needed
    else:
        rdzv = ["--nnodes", str(nnodes), "--node-rank", str(_env_int("NODE_RANK") or 0), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}",
                "--rdzv-id", os.environ.get("RDZV_ID", "croc")]
    # torchrun handles these itself (SIGINT: stop now); SIGTERM and --exit-signal are ours (see the module doc)
    return [*rdzv, "--nproc-per-node", str(nproc), "--signals-to-handle", "SIGINT,SIGHUP,SIGQUIT",
            "--module", "megatron_croc.training.pretrain", *trainer_argv]


class _SignalForwarder:
    """Passes the stop signals to the worker processes (this process's children) and
    remembers them; the workers decide what to do (save and exit 0, or die)."""

    def __init__(self, names: set[str]) -> None:
        self.received: str | None = None
        for name in names:
            signal.signal(getattr(signal, name), self._forward)

    def _forward(self, signum, frame) -> None:
        import psutil

        self.received = signal.Signals(signum).name
        for child in psutil.Process().children():
            try:
                child.send_signal(signum)
            except psutil.Error:
                pass


def _report(error, forwarder: _SignalForwarder) -> int:
    """One summary of a failed job; returns the launcher's exit code."""
    from megatron_croc.distributed import EXIT_PEER_FAILED

    failures = error.failures
    own = {r: f for r, f in failures.items() if f.exitcode not in (EXIT_PEER_FAILED,) and f.exitcode > 0}
    killed = {r: f for r, f in failures.items() if f.exitcode < 0}
    if forwarder.received and not own:
        print(f"error: the job was stopped by {forwarder.received} before it could save "
              "(pass --exit-signal-handler to save and exit 0 on it)", file=sys.stderr, flush=True)
        return 128 + getattr(signal, forwarder.received)
    if own:
        rank, failure = min(own.items())
        what = f"rank {rank} failed (exit code {failure.exitcode}; its error is above)"
        code = 2 if failure.exitcode == 2 else 1
    else:
        rank, failure = min(killed.items()) if killed else min(failures.items())
        what = f"rank {rank} was killed by {failure.signal_name()}"
        code = 1
    others = len(failures) - 1
    print(f"error: {what}; the job was stopped" + (f" ({others} other process{'es' if others > 1 else ''} "
          "ended with it)" if others else ""), file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_croc.quiet import quiet_known_warnings

    quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        trainer_argv, nproc, notes, chose_save = build_trainer_argv(argv, num_gpus=_num_gpus())
        from megatron_croc.platform import probe_platform
        from megatron_croc.training.arguments import parse_args
        from megatron_croc.training.preflight import plan_run

        nnodes = _env_int("NNODES") or 1
        config = parse_args(trainer_argv, world_size=nproc * nnodes)
        platform = probe_platform()  # the ranks initialise it; this process only checks the run
        plan = plan_run(config, has_te=platform.has_te, has_apex=platform.has_apex,
                        has_cuda=platform.has_cuda)
    except ConfigError as err:
        hint = ""
        if "--save" in str(err) and "chose_save" in locals() and chose_save:
            hint = (f" (the launcher set --save from OUTPUT_DIR={os.environ.get('OUTPUT_DIR') or DEFAULT_OUTPUT_DIR}; "
                    "set OUTPUT_DIR or pass --save)")
        print(f"error: {err}{hint}", file=sys.stderr, flush=True)
        return 2
    for note in notes:
        print(f"launcher: {note}", flush=True)
    if plan.nothing_to_do:
        print(plan.nothing_to_do, flush=True)
        return 0
    par = plan.config.model.parallel
    world = nproc * (_env_int("NNODES") or 1)
    print(f"launcher: {nproc} processes on this node, {world} in all (TP={par.tensor_model_parallel_size} "
          f"PP={par.pipeline_model_parallel_size} DP={world // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size)})",
          flush=True)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun's own log lines (its environment defaults, the failure it observed) say what the
    # summary below says, which replaces them.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.run").setLevel(logging.CRITICAL)
    forwarder = _SignalForwarder({"SIGTERM", plan.config.exit.signal} - {"SIGINT"})
    try:
        run(get_args_parser().parse_args(_torchrun_argv(nproc, trainer_argv)))
    except ChildFailedError as error:
        return _report(error, forwarder)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as error:  # torchrun's SignalException and rendezvous errors: one line, no traceback
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
