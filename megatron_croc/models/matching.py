"""Assignment of selected visual tokens to prompt-pool entries (SPEC §1.2).

One entry point, :func:`assign`, maps a batch of cost matrices ``[B, N, K]`` (N selected
visual tokens, K pool entries, N <= K) to the pool column chosen for every row:

* ``method="hungarian"`` -- one-to-one (each column at most once per sample), minimum total
  cost: the rectangular linear sum assignment problem (LSAP), solved exactly by
  :func:`scipy.optimize.linear_sum_assignment` per sample, the samples of a batch concurrently
  in a thread pool after ONE device-to-host copy. scipy's C solver releases the GIL (a
  pure-Python thread keeps running during a solve), so the threads scale with idle cores: 2x on
  2 idle cores for 8 matrices of 432 x 2048, nothing when the cores are busy.
* ``method="nearest"`` -- per-row argmin (many-to-one), what the released Croc code did; stays
  on the costs' device.

:func:`assign_async` starts the same solve without waiting for it: on CUDA the costs go to
pinned host memory with a non-blocking copy, and the solver threads wait on a CUDA event, so
neither the caller's thread nor the GPU stream stalls. The training step uses it to solve the
next micro-batch's assignment while the GPU computes the current one (``CrocModel.prefetch_visual``),
which leaves only the first micro-batch of each optimizer step's solve on the critical path.

A batched exact GPU solver (epsilon-scaling auction with shortest-path repair, in plain torch)
used to sit beside scipy. It was removed (issue 12): on an H200 it took 199 ms for a micro-batch
of 4 x 432 x 2048 that the concurrent scipy path solves in 15.9 ms, bound by the ~30 kernel
launches and one host sync of each of its many auction rounds and path steps.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment

from megatron_croc.platform import host_to_device

__all__ = ["PendingAssignment", "assign", "assign_async"]

_METHODS = ("hungarian", "nearest")


def assign(cost: torch.Tensor, *, method: str = "hungarian") -> torch.Tensor:
    """Assign every row of each cost matrix to a column.

    Args:
        cost: ``[B, N, K]`` floating-point costs with ``N <= K`` (e.g. ``cdist`` between the
            432 selected visual tokens of a sample and the 2048 pool entries). Not
            differentiated.
        method: ``"hungarian"`` (one-to-one, minimum total cost; scipy on the host, the
            samples in parallel threads) or ``"nearest"`` (per-row argmin, many-to-one, on
            ``cost.device``).

    Returns:
        int64 ``[B, N]`` on ``cost.device``: the column assigned to each row. For
        ``"hungarian"`` the columns of a sample are distinct and their total cost is minimal.

    Raises:
        ValueError: wrong rank or dtype, ``N > K``, non-finite costs for ``"hungarian"``
        (naming the first bad sample), unknown method.
    """
    return assign_async(cost, method=method).result()


def assign_async(cost: torch.Tensor, *, method: str = "hungarian",
                 group: "dist.ProcessGroup | None" = None) -> "PendingAssignment":
    """:func:`assign` without waiting: returns a :class:`PendingAssignment` at once.

    ``"hungarian"`` runs in the background (on the solver threads, after a non-blocking
    device-to-host copy); ``"nearest"`` is queued on the costs' device as usual.

    ``group``: ranks that hold the very same ``cost`` (tensor-parallel ranks of one pipeline
    stage). For ``"hungarian"`` each of them then solves every ``size``-th sample only, and
    :meth:`PendingAssignment.result` all-gathers the columns, so every rank gets the whole
    assignment for 1/size of the host work. Every rank of ``group`` must call ``result()``.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown assignment method {method!r}; expected one of {_METHODS}")
    _validate(cost)
    cost = cost.detach()
    if method == "nearest":
        # A NaN cost shows up as a non-finite loss, which training reports and skips.
        return PendingAssignment(ready=cost.argmin(dim=2))
    if group is not None and dist.get_world_size(group) > 1:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        return _scipy_assign_async(cost[rank::size].contiguous(), split=(group, cost.shape[0]))
    return _scipy_assign_async(cost)


def _validate(cost: torch.Tensor) -> None:
    """Shape and dtype only, which needs no device sync; finiteness is checked on the host by
    the solver threads, where the costs are read anyway."""
    if not isinstance(cost, torch.Tensor):
        raise ValueError(f"cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() != 3:
        raise ValueError(f"cost must have shape [B, N, K], got {tuple(cost.shape)}")
    if not cost.is_floating_point():
        raise ValueError(f"cost must be a floating-point tensor, got {cost.dtype}")
    _, n, k = cost.shape
    if n > k:
        raise ValueError(f"cost has more rows than columns (N={n} > K={k}): a one-to-one "
                         "assignment of every row is impossible")


def _raise_nonfinite(bad: list[int]) -> None:
    raise ValueError(f"cost contains NaN or Inf in sample index {bad[0]}"
                     + (f" (and {len(bad) - 1} more samples)" if len(bad) > 1 else ""))


# ----------------------------------------------------------------------------------------------
# the scipy solve on the solver threads
# ----------------------------------------------------------------------------------------------

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _thread_pool() -> ThreadPoolExecutor:
    """Process-wide pool, created once: spawning threads per micro-batch costs ~0.1 ms each."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            workers = max(1, min(32, len(os.sched_getaffinity(0))))
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lsap")
        return _POOL


def _lsap_columns(matrix: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(matrix)
    # rows come back sorted and, since N <= K, cover every row exactly once.
    assert rows.shape[0] == matrix.shape[0]
    return cols


class PendingAssignment:
    """An assignment being solved; :meth:`result` waits for it ([B, N] int64 on the costs'
    device). Either already computed (``ready``) or one future per sample."""

    def __init__(self, *, ready: torch.Tensor | None = None, futures: list[Future] | None = None,
                 shape: tuple[int, int] | None = None, device: torch.device | None = None,
                 split: tuple[dist.ProcessGroup, int] | None = None) -> None:
        self._ready = ready
        self._futures = futures
        self._shape = shape
        self._device = device
        # (group, batch size) when this rank solved every size-th sample of the batch only
        self._split = split

    def done(self) -> bool:
        """Whether this rank's solves are finished (a split one still gathers in result())."""
        return self._ready is not None or all(f.done() for f in self._futures)

    def result(self) -> torch.Tensor:
        """The assignment; raises ValueError naming the first sample with NaN or Inf costs."""
        if self._ready is None:
            cols = [f.result() for f in self._futures]
            bad = [i for i, c in enumerate(cols) if c is None]
            placeholder = np.zeros(self._shape[1], dtype=np.int64)
            columns = _columns_tensor([placeholder if c is None else c for c in cols], self._shape, self._device)
            size, rank = 1, 0
            if self._split is not None:
                group, batch = self._split
                size, rank = dist.get_world_size(group), dist.get_rank(group)
                # Gather before raising, so no rank waits in the collective for one that raised.
                columns = _gather_interleaved(columns, batch=batch, group=group)
            if bad:  # this rank's samples are rank, rank + size, ...
                _raise_nonfinite([rank + size * i for i in bad])
            self._ready, self._futures = columns, None
        return self._ready


def _gather_interleaved(local: torch.Tensor, *, batch: int, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather the rows rank r solved (samples r, r + size, ...) into the [batch, N] whole."""
    size = dist.get_world_size(group)
    per_rank = -(-batch // size)
    padded = local.new_zeros(per_rank, local.shape[1])
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    # row j * size + r is rank r's j-th sample; rows past the batch are padding
    return torch.stack(parts, dim=1).reshape(per_rank * size, local.shape[1])[:batch]


def _solve_after(ready, matrix: np.ndarray) -> np.ndarray | None:
    """One sample's scipy solve on a solver thread, after its costs have landed on the host;
    None for non-finite costs (checked here, on the host, so the caller never waits)."""
    if ready is not None:
        ready.synchronize()  # the non-blocking copy into ``matrix`` has landed (releases the GIL)
    if not np.isfinite(matrix).all():
        return None
    return _lsap_columns(matrix)


def _scipy_assign_async(cost: torch.Tensor, split: tuple[dist.ProcessGroup, int] | None = None
                        ) -> PendingAssignment:
    """scipy per sample, all samples concurrently on the solver threads, after one
    device-to-host copy for the batch (``split``: see :class:`PendingAssignment`)."""
    # Copy in the cost's own precision (half the bytes of float64 over PCIe for fp32 costs);
    # scipy converts each matrix to float64 inside its own thread. numpy has no bf16.
    if cost.dtype not in (torch.float32, torch.float64):
        cost = cost.float()
    b, n, _ = cost.shape
    ready = None
    if cost.device.type == "cuda":
        host = torch.empty(cost.shape, dtype=cost.dtype, pin_memory=True)
        host.copy_(cost, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    else:
        # a CPU cost tensor is computed already; keep a reference, not a copy
        host = cost if cost.device.type == "cpu" else cost.cpu()
    matrices = host.numpy()
    pool = _thread_pool()
    futures = [pool.submit(_solve_after, ready, matrices[i]) for i in range(b)]
    # ``host`` stays alive through the futures' references to its rows.
    return PendingAssignment(futures=futures, shape=(b, n), device=cost.device, split=split)


def _columns_tensor(cols: list[np.ndarray], shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    out = np.stack(cols) if cols else np.zeros(shape, dtype=np.int64)
    return host_to_device(torch.from_numpy(out.astype(np.int64, copy=False)), device)
