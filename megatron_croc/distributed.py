"""Processes: a torch.distributed world and megatron-core's parallel state, which rank is which,
and a job that ends promptly when one of its processes fails.

One module for everything that starts or joins processes — the trainer, the checkpoint
converter, the benchmarks and the tests' multi-process runner — so they all start, name and
stop ranks the same way.

Why a failing rank exits with ``os._exit`` (see :func:`exit_after_failure`): after an
exception, the normal interpreter shutdown destroys the process group and joins helper
threads and processes, and each of those may wait for peers — a barrier in a ``finally``,
NCCL's communicator teardown, a data-loader worker. A peer that is itself waiting for this
rank then never returns, and the job burns its allocation until a collective times out.
Exiting at once lets the launcher (torchrun, or :func:`spawn`) see the failure within its
monitor interval and stop the other ranks; with gloo the peers' pending receives also fail
as soon as this process's sockets close.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import sys
import traceback
from typing import Any, Callable

import torch

__all__ = [
    "free_port",
    "init_process_group",
    "init_model_parallel",
    "rank_tag",
    "is_communication_error",
    "exit_after_failure",
    "EXIT_PEER_FAILED",
    "spawn",
]

# Exit status of a rank that stopped because another process of the job failed first (its own
# error is then only a symptom); the launcher names the rank that exited with 1 as the cause.
EXIT_PEER_FAILED = 3


def free_port() -> int:
    """A TCP port free on this host right now (for a world of one, or a test's world)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend: str) -> None:
    """Join the world torchrun (or :func:`spawn`) described in the environment, or make a
    world of one when the process was started alone (``python -m ...``)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    dist.init_process_group(backend)


def init_model_parallel(*, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                        virtual_pipeline_parallel: int | None = None, seed: int = 1234) -> None:
    """megatron-core's parallel state for this layout, and its model-parallel RNG streams
    (dropout differs across tensor-parallel ranks where it must) seeded from ``seed``."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def rank_tag() -> str:
    """``rank 3 (TP 1, PP 1, DP 0)`` once megatron-core's parallel state exists, else
    ``rank 3``: what a message from one process is prefixed with."""
    rank = os.environ.get("RANK", "0")
    ps = sys.modules.get("megatron.core.parallel_state")  # never import megatron-core just to name a rank
    try:
        if ps is not None and ps.model_parallel_is_initialized():
            return (f"rank {rank} (TP {ps.get_tensor_model_parallel_rank()}, "
                    f"PP {ps.get_pipeline_model_parallel_rank()}, DP {ps.get_data_parallel_rank()})")
    except Exception:  # naming a rank must never fail the report of another error
        pass
    return f"rank {rank}"


# Messages of errors that a collective raises because a *peer* went away (gloo closes the
# connection; NCCL reports a remote error or a watchdog timeout): this rank is not the cause.
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed",
              "remote process exited", "nccl communicator was aborted", "watchdog caught collective",
              "connection refused")


def is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` says that another process of the job failed first."""
    import torch.distributed as dist

    if isinstance(error, (dist.DistBackendError, dist.DistNetworkError)):
        return True
    text = str(error).lower()
    return any(marker in text for marker in _PEER_GONE)


def exit_after_failure(error: BaseException, *, clear_errors: tuple[type[BaseException], ...] = (),
                       collective_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Report ``error`` once, tagged with this rank, and end the process at once (exit 1;
    :data:`EXIT_PEER_FAILED` when a peer failed first; 130 for Ctrl-C). See the module doc for
    why nothing is cleaned up.

    - errors of a type in ``clear_errors`` (a bad input, a stop the program decided): one line;
      of a type in ``collective_errors`` (decided by all ranks together, so raised by all):
      one line from rank 0 only;
    - a collective failing because a peer died: one line saying so (the peer reports the cause);
    - anything else: the traceback, which is what a developer needs.
    """
    tag = rank_tag()
    if isinstance(error, KeyboardInterrupt):
        if os.environ.get("RANK", "0") == "0":
            print(f"interrupted ({tag})", file=sys.stderr, flush=True)
        code = 130
    elif isinstance(error, collective_errors):
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        code = 1
    elif isinstance(error, clear_errors):
        print(f"error: [{tag}] {error}", file=sys.stderr, flush=True)
        code = 1
    elif is_communication_error(error):
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"[{tag}] stopping: another process of the job failed ({first_line[:200]})",
              file=sys.stderr, flush=True)
        code = EXIT_PEER_FAILED
    else:
        text = "".join(traceback.format_exception(error)).rstrip()
        print(f"error: [{tag}] {type(error).__name__}: {error}\n{text}", file=sys.stderr, flush=True)
        code = 1
    sys.stdout.flush()
    os._exit(code)


# ---------------------------------------------------------------------------------------------
# a multi-process world without torchrun (tests, the converter)
# ---------------------------------------------------------------------------------------------


def _child(worker: Callable[..., Any], rank: int, world_size: int, port: int, results, threads: int,
           kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        # By value (plain pickle): multiprocessing would send tensors as shared-memory handles,
        # which vanish when this process exits before the parent reads them.
        results.put((rank, "ok", pickle.dumps(worker(rank=rank, world_size=world_size, **kwargs))))
    except BaseException as error:  # every failure goes to the parent, which reports it once
        try:
            sent = pickle.dumps(error)
        except Exception:  # an exception that cannot travel still sends its traceback
            sent = pickle.dumps(None)
        results.put((rank, "error", (sent, traceback.format_exc())))
        results.close()
        results.join_thread()  # the message is sent before the process ends
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # no teardown that could wait on the other ranks (see the module doc)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class SpawnedRankError(RuntimeError):
    """A rank of :func:`spawn` failed; ``error`` is its exception (when it could be sent)."""

    def __init__(self, message: str, *, rank: int, error: BaseException | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.error = error


def spawn(worker: Callable[..., Any], world_size: int, *, timeout: float = 600, threads: int = 1,
          **kwargs) -> list[Any]:
    """Run ``worker(rank=, world_size=, **kwargs)`` in ``world_size`` fresh processes that form
    a world through the usual environment variables (the worker joins it, e.g. with
    :func:`init_process_group`), and return the results in rank order.

    Ends promptly on the first failure: a rank that raises (its exception, with its
    traceback, becomes a :class:`SpawnedRankError`), or dies without a word (e.g. killed for
    memory); the other ranks are then killed. ``timeout`` bounds the whole run.
    """
    import time

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(worker, rank, world_size, port, results, threads, kwargs))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    failure: SpawnedRankError | None = None
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world_size and failure is None:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    code = procs[dead[0]].exitcode
                    hint = " (killed: out of memory?)" if code in (-9, 137) else ""
                    failure = SpawnedRankError(f"rank {dead[0]} died with exit code {code}{hint}", rank=dead[0])
                elif time.monotonic() > deadline:
                    failure = SpawnedRankError(
                        f"timed out after {timeout:.0f} s; ranks {sorted(set(range(world_size)) - set(done))} "
                        "did not finish", rank=-1)
                continue
            if status == "ok":
                done[rank] = pickle.loads(payload)
            else:
                error, text = payload
                failure = SpawnedRankError(f"rank {rank} failed:\n{text}", rank=rank, error=pickle.loads(error))
    finally:
        for p in procs:
            p.join(timeout=5 if failure else 60)
            if p.is_alive():
                p.kill()
                p.join()
    if failure is not None:
        raise failure
    return [done[r] for r in range(world_size)]
