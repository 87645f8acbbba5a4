"""Assignment of selected visual tokens to prompt-pool entries (SPEC §1.2).

One entry point, :func:`assign`, maps a batch of cost matrices ``[B, N, K]`` (N selected
visual tokens, K pool entries, N <= K) to the pool column chosen for every row:

* ``method="hungarian"`` -- one-to-one (each column at most once per sample), minimum total
  cost: the rectangular linear sum assignment problem (LSAP).
* ``method="nearest"`` -- per-row argmin (many-to-one), what the released Croc code did.

Two LSAP solvers sit behind ``method="hungarian"``:

* ``solver="scipy"`` -- the reference: :func:`scipy.optimize.linear_sum_assignment` per sample,
  the samples of a batch solved concurrently in a thread pool after ONE device-to-host copy.
  scipy's C solver releases the GIL (a pure-Python thread keeps running during a solve), so
  the threads scale with idle cores: 2x on 2 idle cores for 8 matrices of 432 x 2048, nothing
  when the cores are busy.
* ``solver="gpu"`` -- a batched exact solver written in plain torch that solves all B samples at
  once on the cost's device (works on CPU too). See :class:`_BatchedAuction`.

``solver="auto"`` picks ``scipy`` (run for all samples of the micro-batch concurrently) until
the batched solver is measured faster on a GPU; ``solver="gpu"`` selects it explicitly.

:func:`assign_async` starts the same solve without waiting for it: on CUDA the costs go to
pinned host memory with a non-blocking copy, and the solver threads wait on a CUDA event, so
neither the caller's thread nor the GPU stream stalls. The training step uses it to solve the
next micro-batch's assignment while the GPU computes the current one (``CrocModel.prefetch_visual``).

How the batched solver works
----------------------------
Costs are mapped to an integer grid so that every comparison is exact:
``C = round((c - min) / range * R) * M + eta`` with ``M = (N + 1) * 256`` and a deterministic
tie-breaking perturbation ``eta in [0, 255]``. Any assignment that is within ``N`` units of the
optimum of ``C`` is exactly optimal for the gridded costs (the classic ``eps < 1/N`` argument,
the ``M`` factor absorbing the perturbation), and the grid (``R ~ 2^35``) is far finer than
fp32, so the result matches scipy's optimum to ~1e-10 relative.

The gridded problem is solved by epsilon-scaling (Bertsekas): phases with a shrinking ``eps``,
each maintaining eps-complementary slackness (eps-CS: every row's column is within ``eps`` of
its cheapest column at the current column prices). A phase has two stages:

1. forward: rows violating eps-CS are (re)assigned. While many rows violate, a Jacobi auction
   round lets all of them bid at once (one dense pass over ``[B, N, K]``). When few remain, or
   rounds stop making progress, the long single-bidder "price wars" typical of nearly tied
   costs are replaced by shortest augmenting path searches (Dijkstra, one row scan per step,
   all samples in lock step) that preserve eps-CS.
2. reverse: the asymmetric (N < K) problem also needs every unassigned column to be priced no
   higher than every assigned one (Bertsekas & Castanon's ``lambda`` condition), otherwise
   prices carried over from earlier phases leave the result sub-optimal. Over-priced free
   columns are fixed by reverse auction rounds and, when few remain, by reverse shortest path
   searches.

After the last phase (``eps = 1``) a dual certificate (primal minus the Lagrangian lower bound,
summed per row, computed exactly in integers) proves optimality per sample. Any sample whose
certificate fails, or that is still unfinished when an iteration cap is hit, is re-solved
with scipy and a warning is logged (counted in the solver statistics); with a correct solver
this never triggers.

Cost model: every round or path step is some 30 small kernels plus one host sync, so on a GPU
the solver is bound by launches, not by the ~60 MB dense passes, and its time is roughly
(dense passes + path steps) x launch overhead. Costs whose rows all prefer the same columns
(an N(0, 1) pool, or strongly correlated tokens) need many more of both than unit-norm pools.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment

from megatron_croc.platform import host_to_device

__all__ = ["PendingAssignment", "assign", "assign_async", "resolve_solver"]

logger = logging.getLogger(__name__)

_METHODS = ("hungarian", "nearest")
_SOLVERS = ("auto", "scipy", "gpu")


def assign(cost: torch.Tensor, *, method: str = "hungarian", solver: str = "auto") -> torch.Tensor:
    """Assign every row of each cost matrix to a column.

    Args:
        cost: ``[B, N, K]`` floating-point costs with ``N <= K`` (e.g. ``cdist`` between the
            432 selected visual tokens of a sample and the 2048 pool entries). Not
            differentiated.
        method: ``"hungarian"`` (one-to-one, minimum total cost) or ``"nearest"`` (per-row
            argmin, many-to-one).
        solver: for ``"hungarian"``: ``"scipy"`` (reference, CPU, samples in parallel
            threads), ``"gpu"`` (batched exact torch solver on ``cost.device``), or
            ``"auto"`` (currently ``scipy``, see above). Ignored by ``"nearest"``.

    Returns:
        int64 ``[B, N]`` on ``cost.device``: the column assigned to each row. For
        ``"hungarian"`` the columns of a sample are distinct and their total cost is minimal.

    Raises:
        ValueError: wrong rank or dtype, ``N > K``, non-finite costs (naming the first bad
        sample), unknown method or solver.
    """
    return assign_async(cost, method=method, solver=solver).result()


def resolve_solver(solver: str) -> str:
    """The solver ``"auto"`` stands for (``"scipy"`` or ``"gpu"``)."""
    if solver not in _SOLVERS:
        raise ValueError(f"unknown assignment solver {solver!r}; expected one of {_SOLVERS}")
    # The batched solver is exact but, measured on an H200, still slower than scipy on
    # 8x432x2048 (kernel-launch bound); until it wins, "auto" is the concurrent scipy path.
    return "scipy" if solver == "auto" else solver


def assign_async(cost: torch.Tensor, *, method: str = "hungarian", solver: str = "auto",
                 group: "dist.ProcessGroup | None" = None) -> "PendingAssignment":
    """:func:`assign` without waiting: returns a :class:`PendingAssignment` at once.

    Only the scipy path runs in the background (on the solver threads, after a non-blocking
    device-to-host copy); ``"nearest"`` is queued on the costs' device as usual, and the batched
    solver, which syncs with its device every round, runs before this returns.

    ``group``: ranks that hold the very same ``cost`` (tensor-parallel ranks of one pipeline
    stage). On the scipy path each of them then solves every ``size``-th sample only, and
    :meth:`PendingAssignment.result` all-gathers the columns, so every rank gets the whole
    assignment for 1/size of the host work. Every rank of ``group`` must call ``result()``.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown assignment method {method!r}; expected one of {_METHODS}")
    solver = resolve_solver(solver)
    # Only the batched solver checks the costs on the device (it needs them finite to grid
    # them; a sync). The scipy path checks them on the host; with "nearest" a NaN cost shows
    # as a non-finite loss, which training reports and skips.
    _validate(cost, values=method == "hungarian" and solver == "gpu")
    cost = cost.detach()
    if method == "nearest":
        return PendingAssignment(ready=cost.argmin(dim=2))
    if solver == "gpu":
        return PendingAssignment(ready=_gpu_assign(cost)[0])
    if group is not None and dist.get_world_size(group) > 1:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        return _scipy_assign_async(cost[rank::size].contiguous(), split=(group, cost.shape[0]))
    return _scipy_assign_async(cost)


def _validate(cost: torch.Tensor, *, values: bool = True) -> None:
    """Shape and dtype (no device sync); with ``values`` also finiteness, which on a GPU waits
    for the costs (the background scipy path checks them on the host instead)."""
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
    if not values:
        return
    # NaN and Inf survive a sum: one cheap reduction in the costs' own precision (a float64
    # accumulator or the elementwise test cost 6-8x more on a CPU), and the exact test only
    # when the sum is not finite, which a sum of huge finite costs can also be.
    wide = None if cost.dtype in (torch.float32, torch.float64) else torch.float32
    if bool(torch.isfinite(cost.sum(dim=(1, 2), dtype=wide)).all()):
        return
    finite = torch.isfinite(cost).flatten(1).all(dim=1)
    if not bool(finite.all()):
        _raise_nonfinite(torch.nonzero(~finite)[:, 0].tolist())


def _raise_nonfinite(bad: list[int]) -> None:
    raise ValueError(f"cost contains NaN or Inf in sample index {bad[0]}"
                     + (f" (and {len(bad) - 1} more samples)" if len(bad) > 1 else ""))


# ----------------------------------------------------------------------------------------------
# scipy reference
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


# ----------------------------------------------------------------------------------------------
# batched exact solver (GPU fast path; runs on any device)
# ----------------------------------------------------------------------------------------------

# Sentinel for "infinite" distances. Gridded costs stay below 2^53 and prices within a few times
# that, so sums of two such values never reach it, and 2 * _BIG + 1 still fits in int64.
_BIG = 1 << 61
_ETA_BITS = 8
_GRID_BITS = 35          # resolution of the integer grid: range / 2^35 ~ 3e-11 of the range
_SPAN_BITS = 53          # gridded costs (times M) stay below 2^53
_THETA = 8               # eps reduction factor between phases
_FORWARD_SAP_MAX = 4     # switch from auction rounds to shortest paths at <= this many bidders
_REVERSE_SAP_MAX = 4     # same for over-priced free columns in the reverse stage
_STALL_ROUNDS = 8        # ... or when rounds stop making progress


@dataclass
class SolverStats:
    """Work counters of one batched solve (for benchmarks and tests)."""

    phases: int = 0
    dense_passes: int = 0          # passes over the whole [B, N, K] cost tensor
    auction_rounds: int = 0
    reverse_rounds: int = 0
    path_steps: int = 0            # forward Dijkstra steps (one row scan each)
    reverse_path_steps: int = 0    # reverse Dijkstra steps (one column scan each)
    augmentations: int = 0
    fallbacks: int = 0             # samples re-solved by scipy (should stay 0)


def _gpu_assign(cost: torch.Tensor, max_iterations: int | None = None
                ) -> tuple[torch.Tensor, SolverStats]:
    """Exact batched LSAP; returns the assignment and work counters.

    ``max_iterations`` caps the number of solver iterations (auction rounds plus shortest-path
    steps); samples not finished by then are solved by scipy. The default cap is far above
    anything seen on real or adversarial inputs and only guards against an endless loop.
    """
    b, n, k = cost.shape
    stats = SolverStats()
    # nothing to solve; with k == 1 (then n == 1 too) nothing to choose, and bids need a
    # second-best column
    if b == 0 or n == 0 or k == 1:
        return torch.zeros(b, n, dtype=torch.long, device=cost.device), stats
    if max_iterations is None:
        max_iterations = 200 * n + 20_000
    solver = _BatchedAuction(cost, stats, max_iterations)
    finished = solver.run()
    cols = solver.row_col.clone()
    ok = finished & solver.certified()
    if not bool(ok.all()):
        bad = torch.nonzero(~ok)[:, 0].tolist()
        stats.fallbacks += len(bad)
        logger.warning("batched assignment solver %s for samples %s; re-solving them with scipy",
                       "hit its iteration cap" if not bool(finished.all())
                       else "could not certify optimality", bad)
        cols[bad] = _scipy_assign_async(cost[bad]).result()
    return cols, stats


def _stalled(history: list[int], count: int) -> bool:
    """Record ``count`` (work left after a round); True once it has not dropped for
    ``_STALL_ROUNDS`` rounds. Rounds then cost more than shortest paths, whose every search
    is sure to fix one row or column."""
    history.append(count)
    return len(history) > _STALL_ROUNDS and history[-1 - _STALL_ROUNDS] <= count


class _BatchedAuction:
    """Forward/reverse epsilon-scaling auction with shortest-path finishing, B samples at once.

    State (per sample ``b``): integer costs ``C[b]``, column prices ``price[b]``, the column of
    every row ``row_col[b]`` (-1: unassigned) and the row owning every column ``col_row[b]``
    (-1: free). Invariants between operations: a row's column is within ``eps`` of its
    cheapest ``C + price`` (eps-CS), ``row_col`` and ``col_row`` are consistent.
    """

    def __init__(self, cost: torch.Tensor, stats: SolverStats, max_iterations: int) -> None:
        b, n, k = cost.shape
        dev = cost.device
        self.B, self.N, self.K, self.dev = b, n, k, dev
        self.stats = stats
        self.iterations_left = max_iterations
        eta_max = (1 << _ETA_BITS) - 1
        # M absorbs the tie-breaking perturbation: a total within N of the optimum of C is
        # optimal for the gridded costs because N * eta_max + N < M.
        self.M = (n + 1) * (eta_max + 1)
        self.eta_max = eta_max
        grid = 1 << min(_GRID_BITS, _SPAN_BITS - math.ceil(math.log2(self.M)))
        c64 = cost.to(torch.float64)
        lo = c64.amin(dim=(1, 2), keepdim=True)
        rng = c64.amax(dim=(1, 2), keepdim=True) - lo
        scale = torch.where(rng > 0, grid / rng, torch.zeros_like(rng))
        cint = torch.round((c64 - lo) * scale).to(torch.long)
        del c64
        self.span = grid * self.M
        # Deterministic pseudo-random tie-breaker (a multiplicative hash of the row-major
        # position), so that rows with identical costs spread their first bids over
        # different columns instead of all bidding for the first one.
        pos = torch.arange(n * k, device=dev, dtype=torch.long).view(1, n, k)
        eta = ((pos * 2654435761) & 0xFFFFFFFF) >> (32 - _ETA_BITS)
        self.C = cint * self.M + eta
        del cint, pos, eta
        self.price = torch.zeros(b, k, dtype=torch.long, device=dev)
        self.row_col = torch.full((b, n), -1, dtype=torch.long, device=dev)
        self.col_row = torch.full((b, k), -1, dtype=torch.long, device=dev)
        self.rows = torch.arange(n, device=dev).expand(b, n)
        self.cols = torch.arange(k, device=dev).expand(b, k)
        self.bidx = torch.arange(b, device=dev)
        self.row_off = (self.bidx * n)[:, None]
        self.col_off = (self.bidx * k)[:, None]

    # -- helpers --------------------------------------------------------------------------

    def _tick(self) -> bool:
        """Count one iteration; False once the cap is exhausted."""
        self.iterations_left -= 1
        return self.iterations_left >= 0

    def _scan(self) -> tuple[torch.Tensor, ...]:
        """One dense pass: best and second-best value per row, best column, and the value of
        the row's current column (meaningless for unassigned rows)."""
        self.stats.dense_passes += 1
        values = self.C + self.price[:, None, :]
        # min, then min again with the winner masked: two plain reductions instead of an int64
        # topk(2), which runs a radix select per row
        v1, j1 = values.min(dim=2)
        v2 = values.scatter_(2, j1[..., None], _BIG).amin(dim=2)
        rc = self.row_col.clamp(min=0)
        cur = self.C.gather(2, rc[..., None])[..., 0] + self.price.gather(1, rc)
        return v1, v2, j1, cur

    def _violators(self, scan: tuple[torch.Tensor, ...], eps: torch.Tensor) -> torch.Tensor:
        v1, _, _, cur = scan
        return (self.row_col < 0) | (cur > v1 + eps)

    def _lam(self) -> torch.Tensor:
        """Lowest price of an assigned column, per sample ``[B, 1]``."""
        return torch.where(self.col_row >= 0, self.price, _BIG).amin(dim=1, keepdim=True)

    def _scatter_rows(self, mask: torch.Tensor, row: torch.Tensor, value: torch.Tensor) -> None:
        """``row_col[b, row[b, x]] = value[b, x]`` where ``mask``; sync-free (no nonzero)."""
        flat = torch.cat([self.row_col.view(-1), self.row_col.new_full((1,), -1)])
        idx = torch.where(mask, self.row_off + row, self.B * self.N)
        flat.scatter_(0, idx.reshape(-1), value.expand_as(idx).reshape(-1))
        self.row_col = flat[:-1].view(self.B, self.N)

    def _scatter_cols(self, mask: torch.Tensor, col: torch.Tensor, value: torch.Tensor) -> None:
        """``col_row[b, col[b, x]] = value[b, x]`` where ``mask``."""
        flat = torch.cat([self.col_row.view(-1), self.col_row.new_full((1,), -1)])
        idx = torch.where(mask, self.col_off + col, self.B * self.K)
        flat.scatter_(0, idx.reshape(-1), value.expand_as(idx).reshape(-1))
        self.col_row = flat[:-1].view(self.B, self.K)

    # -- driver ---------------------------------------------------------------------------

    def run(self) -> torch.Tensor:
        """Run all phases; returns a ``[B]`` mask of samples that finished within the cap."""
        eps = torch.full((self.B, 1), max(1, self.span // _THETA), dtype=torch.long,
                         device=self.dev)
        scan = self._scan()
        while True:
            self.stats.phases += 1
            # The reverse stage runs in every phase, not only the last: at eps = 1 alone its
            # price decrements shrink to single grid units and nearly identical rows then take
            # tens of thousands of rounds.
            if not (self._forward_stage(eps, scan) and self._reverse_stage(eps)):
                return self._finished_mask(eps)
            if bool((eps == 1).all()):
                return torch.ones(self.B, dtype=torch.bool, device=self.dev)
            # Next eps: the usual eps / theta, but no larger than the largest slack now
            # present, so that phases in which no row would violate eps-CS are skipped.
            scan = self._scan()
            slack = (scan[3] - scan[0]).amax(dim=1, keepdim=True)
            eps = torch.clamp(torch.minimum(eps // _THETA, slack), min=1)

    def _finished_mask(self, eps: torch.Tensor) -> torch.Tensor:
        """After the cap: samples already at eps = 1 with a complete, stage-clean state."""
        scan = self._scan()
        clean = ~self._violators(scan, eps).any(dim=1)
        clean &= ~((self.col_row < 0) & (self.price > self._lam())).any(dim=1)
        return clean & (eps[:, 0] == 1)

    def certified(self) -> torch.Tensor:
        """Per-sample proof of optimality for the gridded costs (``[B]`` bool).

        With prices shifted so that the cheapest assigned column costs 0 and free columns are
        set to 0 (allowed: they are priced no higher), ``sum_i min_j (C_ij + p_j) - sum_j p_j``
        is a lower bound on the optimum (LP duality). Its gap to the primal total is the sum
        of the per-row slacks below, each small, so the integer sum cannot overflow.
        """
        self.stats.dense_passes += 1
        assigned = self.col_row >= 0
        complete = (self.row_col >= 0).all(dim=1)
        p = torch.where(assigned, self.price - self._lam(), 0)
        lam_ok = ~((~assigned) & (self.price > self._lam())).any(dim=1)
        rc = self.row_col.clamp(min=0)
        cur = self.C.gather(2, rc[..., None])[..., 0] + p.gather(1, rc)
        best = (self.C + p[:, None, :]).amin(dim=2)
        gap = (cur - best).sum(dim=1)
        return complete & lam_ok & (gap < self.M - self.N * self.eta_max)

    # -- forward stage --------------------------------------------------------------------

    def _forward_stage(self, eps: torch.Tensor, scan: tuple[torch.Tensor, ...]) -> bool:
        """Assign all rows under eps-CS. False if the iteration cap was hit."""
        history: list[int] = []
        while True:
            viol = self._violators(scan, eps)
            most = int(viol.sum(dim=1).max())
            if most == 0:
                return True
            if not self._tick():
                return False
            if most > _FORWARD_SAP_MAX and not _stalled(history, most):
                self._auction_round(scan, viol, eps)
            else:
                # Few violators, or no progress: an auction would move them one price
                # increment per round around a cycle of nearly tied rows; a shortest path
                # does it in one search.
                self._unassign(viol)
                if not self._forward_paths():
                    return False
            scan = self._scan()

    def _unassign(self, mask: torch.Tensor) -> None:
        self._scatter_cols(mask & (self.row_col >= 0), self.row_col.clamp(min=0),
                           torch.full_like(self.row_col, -1))
        self.row_col = torch.where(mask, -1, self.row_col)

    def _auction_round(self, scan: tuple[torch.Tensor, ...], bidders: torch.Tensor,
                       eps: torch.Tensor) -> None:
        """One Jacobi round: every violating row bids for its best column at once."""
        B, N, K = self.B, self.N, self.K
        v1, v2, j1, cur = scan
        price, rc = self.price, self.row_col
        assigned = rc >= 0
        # A bid raises the price until the bidder is indifferent to its 2nd choice, plus eps.
        bid = torch.where(bidders, price.gather(1, j1) + (v2 - v1) + eps, -1)
        fj = (self.col_off + j1).reshape(-1)
        best = torch.full((B * K,), -1, dtype=torch.long, device=self.dev)
        best.scatter_reduce_(0, fj, bid.reshape(-1), "amax")
        top = bidders & (bid == best[fj].view(B, N))
        win = torch.full((B * K,), N, dtype=torch.long, device=self.dev)
        win.scatter_reduce_(0, fj, torch.where(top, self.rows, N).reshape(-1), "amin")
        is_win = top & (win[fj].view(B, N) == self.rows)
        # The winner pays only what it takes to keep the runner-up and the current holder away
        # (their own indifference prices plus eps), never less than +eps, never more than its
        # bid. Paying the full bid would leave uncontested rows with a slack of eps that the
        # next phase must undo; paying only +eps would let holder and bidder outbid each other
        # by eps for many rounds.
        pay = torch.full((B * K,), -1, dtype=torch.long, device=self.dev)
        pay.scatter_reduce_(0, fj, torch.where(is_win, -1, bid).reshape(-1), "amax")
        holder = assigned & ~bidders
        alt = torch.where(j1 == rc, v2, v1)  # holder's best value elsewhere
        keep = torch.where(holder, price.gather(1, rc.clamp(min=0)) + (alt - cur) + eps, -1)
        pay.scatter_reduce_(0, (self.col_off + rc.clamp(min=0)).reshape(-1), keep.reshape(-1),
                            "amax")
        pay = torch.minimum(torch.maximum(pay.view(B, K), price + eps), best.view(B, K))
        won = best.view(B, K) >= 0
        # Displaced holders lose their column; winners leave theirs and take the new one.
        prev = self.col_row
        self._scatter_rows(won & (prev >= 0), prev.clamp(min=0), torch.full_like(prev, -1))
        self._scatter_cols(is_win & assigned, rc.clamp(min=0), torch.full_like(rc, -1))
        self._scatter_rows(is_win, self.rows, j1)
        self.col_row = torch.where(won, win.view(B, K), self.col_row)
        self.price = torch.where(won, pay, price)
        self.stats.auction_rounds += 1

    def _forward_paths(self) -> bool:
        """Augment every unassigned row along a shortest path (batched Dijkstra).

        Reduced costs are ``C_ij + p_j - min_k (C_ik + p_k)`` and an assigned row is entered at
        the distance of its own column, i.e. each assigned edge is treated as tight (its cost
        lowered by the row's slack, at most eps). Standard Dijkstra price updates on that
        problem keep every row within eps of its minimum in the true costs, never touch free
        columns other than the sink, and make the new edges exactly tight. Each sample runs
        its own search; a sample that finishes starts its next unassigned row at once.
        Called with at least one unassigned row.
        """
        B, K, dev = self.B, self.K, self.dev
        distance = torch.full((B, K), _BIG, dtype=torch.long, device=dev)
        pred = torch.full((B, K), -1, dtype=torch.long, device=dev)
        done = torch.zeros(B, K, dtype=torch.bool, device=dev)
        row = torch.zeros(B, dtype=torch.long, device=dev)
        row_d = torch.zeros(B, dtype=torch.long, device=dev)
        active = torch.zeros(B, dtype=torch.bool, device=dev)
        need_start = True
        while True:
            if need_start:  # only after an augmentation: saves a dozen launches per step
                free = self.row_col < 0
                start = ~active & free.any(dim=1)
                row = torch.where(start, free.to(torch.int8).argmax(dim=1), row)
                row_d = torch.where(start, 0, row_d)
                distance = torch.where(start[:, None], _BIG, distance)
                done &= ~start[:, None]
                active |= start
                need_start = False
            if not self._tick():
                return False
            self.stats.path_steps += 1
            vals = self.C[self.bidx, row] + self.price
            cand = row_d[:, None] + (vals - vals.amin(dim=1, keepdim=True))
            better = active[:, None] & ~done & (cand < distance)
            distance = torch.where(better, cand, distance)
            pred = torch.where(better, row[:, None], pred)
            # Closest unsettled column; on ties a free one, which ends the search sooner.
            key = torch.where(done, _BIG, distance) * 2 + (self.col_row >= 0)
            j = key.argmin(dim=1)
            d = distance.gather(1, j[:, None])[:, 0]
            owner = self.col_row.gather(1, j[:, None])[:, 0]
            done |= active[:, None] & (self.cols == j[:, None])
            found = active & (owner < 0)
            row = torch.where(active & ~found, owner, row)
            row_d = torch.where(active, d, row_d)
            # One host sync per step: how many searches ended, and is anything left after?
            left = (active & ~found) | ((self.row_col < 0).sum(dim=1) > found.long())
            n_found, more = torch.stack([found.sum(), left.any().long()]).tolist()
            if n_found:
                # Settled columns get cheaper relative to the sink by their distance.
                self.price = self.price + torch.where(found[:, None] & done, d[:, None] - distance, 0)
                self._augment_forward(found, j, pred)
                active &= ~found
                need_start = True
            if not more:
                return True

    def _augment_forward(self, found: torch.Tensor, sink: torch.Tensor,
                         pred: torch.Tensor) -> None:
        """Flip the alternating path ending at ``sink`` (host walk: paths are short)."""
        f = torch.nonzero(found)[:, 0]
        nf, N, K = f.numel(), self.N, self.K
        self.stats.augmentations += nf
        # One device-to-host copy for everything the walk reads.
        host = torch.cat([pred[f], self.col_row[f], self.row_col[f], sink[f, None]], 1).cpu()
        pred_h, cr_h = host[:, :K], host[:, K:2 * K].clone()
        rc_h, sink_h = host[:, 2 * K:2 * K + N].clone(), host[:, -1].tolist()
        for x in range(nf):
            j = sink_h[x]
            while j >= 0:
                i = int(pred_h[x, j])
                j_prev = int(rc_h[x, i])
                rc_h[x, i] = j
                cr_h[x, j] = i
                j = j_prev
        self.row_col[f] = rc_h.to(self.dev)
        self.col_row[f] = cr_h.to(self.dev)

    # -- reverse stage --------------------------------------------------------------------

    def _reverse_stage(self, eps: torch.Tensor) -> bool:
        """Bring every free column's price down to at most ``lam`` (the cheapest assigned
        column), keeping all rows assigned and eps-CS. False if the iteration cap was hit."""
        lam = self._lam()
        history: list[int] = []
        while True:
            over = (self.col_row < 0) & (self.price > lam)
            most = int(over.sum(dim=1).max())
            if most == 0:
                return True
            if not self._tick():
                return False
            if most > _REVERSE_SAP_MAX and not _stalled(history, most):
                self._reverse_round(over, eps, lam)
            elif not self._reverse_paths(lam):
                return False

    def _reverse_round(self, over: torch.Tensor, eps: torch.Tensor, lam: torch.Tensor) -> None:
        """One Jacobi round of Bertsekas' reverse auction for over-priced free columns.

        Each such column finds the row gaining most by switching to it. If even that row
        would not switch at price ``lam`` (within eps), the column simply drops to ``lam``;
        otherwise it offers itself at the highest price that keeps every other row within
        eps, and the row accepts its best offer (other offers retry next round). Rows only
        ever improve, which bounds the number of rounds.
        """
        B, N, K = self.B, self.N, self.K
        self.stats.dense_passes += 1
        self.stats.reverse_rounds += 1
        rc = self.row_col
        cur = self.C.gather(2, rc[..., None])[..., 0] + self.price.gather(1, rc)
        gain = cur[..., None] - self.C  # [B, N, K]: row's value now minus column's cost
        beta, best_row = gain.max(dim=1)
        # second best row per column (-BIG when N == 1)
        omega = gain.scatter_(1, best_row[:, None, :], -_BIG).amax(dim=1)
        del gain
        drop = over & (beta - eps <= lam)
        offer = over & ~drop
        ask = torch.maximum(lam, omega - eps)
        new_val = self.C.gather(1, best_row[:, None, :])[:, 0] + ask
        new_val = torch.where(offer, new_val, _BIG)
        fi = (self.row_off + best_row).reshape(-1)
        best_off = torch.full((B * N,), _BIG, dtype=torch.long, device=self.dev)
        best_off.scatter_reduce_(0, fi, new_val.reshape(-1), "amin")
        top_off = offer & (new_val == best_off[fi].view(B, K))
        pick = torch.full((B * N,), K, dtype=torch.long, device=self.dev)
        pick.scatter_reduce_(0, fi, torch.where(top_off, self.cols, K).reshape(-1), "amin")
        accepted = top_off & (pick[fi].view(B, K) == self.cols)
        self.price = torch.where(accepted, ask, torch.where(drop, lam, self.price))
        old_col = rc.gather(1, best_row)
        self._scatter_cols(accepted, old_col, torch.full_like(old_col, -1))
        self.col_row = torch.where(accepted, best_row, self.col_row)
        self._scatter_rows(accepted, best_row, self.cols)

    def _reverse_paths(self, lam: torch.Tensor) -> bool:
        """Fix every over-priced free column by a reverse shortest path (batched Dijkstra).

        From free column ``j`` the search walks column -> row (a row that would switch to the
        column once its price drops by the edge's reduced cost) -> that row's column, with a
        virtual sink reached from column ``k`` at extra length ``p_k - lam``. At the sink of
        length ``D`` every settled column drops by ``D - d_k`` and every settled row's
        potential by ``D - d_r``; then rows along the path shift one column towards ``j``
        and the column at the end becomes free priced exactly ``lam``. Row potentials are
        tracked (start: row minima), matched edges treated as tight as in the forward search.
        Called with at least one over-priced free column.
        """
        B, N, K, dev = self.B, self.N, self.K, self.dev
        self.stats.dense_passes += 1
        u = (self.C + self.price[:, None, :]).amin(dim=2)
        rdist = torch.full((B, N), _BIG, dtype=torch.long, device=dev)
        rpred = torch.zeros(B, N, dtype=torch.long, device=dev)
        rdone = torch.zeros(B, N, dtype=torch.bool, device=dev)
        cdist = torch.full((B, K), -1, dtype=torch.long, device=dev)  # -1: not settled
        src = torch.zeros(B, dtype=torch.long, device=dev)
        col = torch.zeros(B, dtype=torch.long, device=dev)
        col_d = torch.zeros(B, dtype=torch.long, device=dev)
        sink_d = torch.zeros(B, dtype=torch.long, device=dev)
        sink_col = torch.zeros(B, dtype=torch.long, device=dev)
        active = torch.zeros(B, dtype=torch.bool, device=dev)
        need_start = True
        while True:
            over = (self.col_row < 0) & (self.price > lam)
            if need_start:
                start = ~active & over.any(dim=1)
                first = over.to(torch.int8).argmax(dim=1)
                src = torch.where(start, first, src)
                col = torch.where(start, first, col)
                col_d = torch.where(start, 0, col_d)
                sink_d = torch.where(start, _BIG, sink_d)
                rdist = torch.where(start[:, None], _BIG, rdist)
                rdone &= ~start[:, None]
                cdist = torch.where(start[:, None],
                                    torch.where(self.cols == first[:, None], 0, -1), cdist)
                active |= start
                need_start = False
            if not self._tick():
                return False
            self.stats.reverse_path_steps += 1
            p_col = self.price.gather(1, col[:, None])[:, 0]
            c_col = self.C.gather(2, col[:, None, None].expand(B, N, 1))[..., 0]
            cand = col_d[:, None] + (c_col + p_col[:, None] - u)
            better = active[:, None] & ~rdone & (cand < rdist)
            rdist = torch.where(better, cand, rdist)
            rpred = torch.where(better, col[:, None], rpred)
            to_sink = col_d + (p_col - lam[:, 0])
            better_sink = active & (to_sink < sink_d)
            sink_d = torch.where(better_sink, to_sink, sink_d)
            sink_col = torch.where(better_sink, col, sink_col)
            d, r = torch.where(rdone, _BIG, rdist).min(dim=1)
            found = active & (sink_d <= d)
            go = active & ~found
            rdone |= go[:, None] & (self.rows == r[:, None])
            nxt = self.row_col.gather(1, r[:, None])[:, 0]
            col = torch.where(go, nxt, col)
            col_d = torch.where(go, d, col_d)
            cdist = torch.where(go[:, None] & (self.cols == nxt[:, None]), d[:, None], cdist)
            # A finished search fixes its source column and creates no new over-priced one.
            left = go | (over.sum(dim=1) > found.long())
            n_found, more = torch.stack([found.sum(), left.any().long()]).tolist()
            if n_found:
                D = sink_d[:, None]
                self.price = self.price - torch.where(found[:, None] & (cdist >= 0),
                                                      D - cdist, 0)
                u = u - torch.where(found[:, None] & rdone, D - rdist, 0)
                self._augment_reverse(found, src, sink_col, rpred)
                active &= ~found
                need_start = True
            if not more:
                return True

    def _augment_reverse(self, found: torch.Tensor, src: torch.Tensor, sink_col: torch.Tensor,
                         rpred: torch.Tensor) -> None:
        """Shift the rows on the path ``src <- ... <- sink_col`` one column towards ``src``."""
        f = torch.nonzero(found)[:, 0]
        nf, N, K = f.numel(), self.N, self.K
        self.stats.augmentations += nf
        host = torch.cat([rpred[f], self.col_row[f], self.row_col[f], src[f, None],
                          sink_col[f, None]], 1).cpu()
        rp_h, cr_h = host[:, :N], host[:, N:N + K].clone()
        rc_h = host[:, N + K:N + K + N].clone()
        src_h, end_h = host[:, -2].tolist(), host[:, -1].tolist()
        for x in range(nf):
            k, j = end_h[x], src_h[x]
            old = cr_h[x].clone()
            if k != j:
                cr_h[x, k] = -1
            while k != j:
                r = int(old[k])
                k = int(rp_h[x, r])
                rc_h[x, r] = k
                cr_h[x, k] = r
        self.row_col[f] = rc_h.to(self.dev)
        self.col_row[f] = cr_h.to(self.dev)
