"""Deterministic, resumable global-batch sampling (Megatron's pretraining sampler semantics).

The data order is an endless stream of *rows* (one sample per row, or several packed samples),
fixed by the seed (see ``dataset.BlendedDataset``). Global batch ``b`` is rows
``[b*G, (b+1)*G)`` with ``G = micro_batch_size * num_micro_batches * dp_size``; within it,
micro-step ``k`` of DP rank ``r`` takes rows ``[k*m*dp + r*m, k*m*dp + (r+1)*m)`` (m =
micro_batch_size) — each rank its own slice, all ranks together exactly the global batch.

The position is ``consumed_samples`` (rows, over all DP ranks). It is the whole state: a
checkpoint that saves it resumes with the next row, not the first, under any DP size whose
``micro_batch_size * dp_size`` divides it. Save ``ResumableDataLoader.state_dict()`` rather than
the sampler's: a DataLoader runs its sampler ahead of the training loop (prefetching), the
loader counts only what it handed out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch


class RowSource(Protocol):
    """The endless, deterministic stream of rows; a row is a tuple of global sample positions."""

    def rows(self, start: int) -> Iterator[tuple[int, ...]]: ...


class SingleRows:
    """One sample per row: row r is position r."""

    def rows(self, start: int) -> Iterator[tuple[int, ...]]:
        return ((g,) for g in itertools.count(start))


class GlobalBatchSampler:
    """Yields this DP rank's micro-batches: lists of ``micro_batch_size`` rows."""

    def __init__(
        self,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
        total_samples: int | None = None,
        rows: RowSource | None = None,
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global batch size {global_batch_size} is not a multiple of micro_batch_size x dp_size = "
                f"{micro_batch_size} x {dp_size}"
            )
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_micro_batches = global_batch_size // (micro_batch_size * dp_size)
        self.total_samples = total_samples
        self.rows_source: RowSource = rows if rows is not None else SingleRows()
        self.consumed_samples = 0
        self._set_consumed(consumed_samples)

    @property
    def step_size(self) -> int:
        """Rows per micro-step over all DP ranks."""
        return self.micro_batch_size * self.dp_size

    def _set_consumed(self, consumed: int) -> None:
        if consumed < 0 or consumed % self.step_size:
            raise ValueError(
                f"consumed_samples {consumed} is not a multiple of micro_batch_size x dp_size = {self.step_size}; "
                "the position must fall on a micro-step boundary"
            )
        self.consumed_samples = consumed

    def _stop(self) -> int | None:
        if self.total_samples is None:
            return None
        return (self.total_samples // self.global_batch_size) * self.global_batch_size  # whole global batches

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        stop = self._stop()
        rows = self.rows_source.rows(self.consumed_samples)
        lo = self.dp_rank * self.micro_batch_size
        hi = lo + self.micro_batch_size
        while stop is None or self.consumed_samples + self.step_size <= stop:
            step = list(itertools.islice(rows, self.step_size))
            self.consumed_samples += self.step_size
            yield step[lo:hi]

    def __len__(self) -> int:
        stop = self._stop()
        if stop is None:
            raise TypeError("an endless sampler (total_samples=None) has no length")
        return max(0, (stop - self.consumed_samples) // self.step_size)

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed_samples": self.consumed_samples,
            "micro_batch_size": self.micro_batch_size,
            "global_batch_size": self.global_batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Only the position matters; batch sizes and DP size may change across a resume.
        self._set_consumed(int(state["consumed_samples"]))


class ResumableDataLoader:
    """A DataLoader over a ``GlobalBatchSampler`` whose state is what it actually delivered.

    Iterating gives collated micro-batches forever (or until ``total_samples``). ``state_dict()``
    counts micro-batches returned by ``next()``, not those prefetched by workers, so a checkpoint
    taken between steps resumes at exactly the next unseen row.
    """

    def __init__(
        self,
        dataset: Any,
        sampler: GlobalBatchSampler,
        collate_fn: Callable[[list[Any]], Any],
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.persistent_workers = persistent_workers and num_workers > 0
        self._iterator: Iterator[Any] | None = None
        self._start = sampler.consumed_samples
        self._delivered = 0

    def _make_iterator(self) -> Iterator[Any]:
        self._start = self.sampler.consumed_samples
        self._delivered = 0
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=self.persistent_workers,
        )
        return iter(loader)

    def __iter__(self) -> "ResumableDataLoader":
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._make_iterator()
        batch = next(self._iterator)
        self._delivered += 1
        return batch

    @property
    def consumed_samples(self) -> int:
        """Rows (over all DP ranks) consumed by the training loop so far."""
        if self._iterator is None:
            return self.sampler.consumed_samples
        return self._start + self._delivered * self.sampler.step_size

    def state_dict(self) -> dict[str, Any]:
        return {**self.sampler.state_dict(), "consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._iterator = None  # drop prefetched batches; restart from the saved position
        self.sampler.load_state_dict(state)


def rank_slices(global_rows: Sequence[Any], *, micro_batch_size: int, dp_size: int) -> list[list[list[Any]]]:
    """Reference split of one global batch into [micro-step][dp rank] -> rows (for tests/tools)."""
    step = micro_batch_size * dp_size
    return [
        [list(global_rows[k + r * micro_batch_size : k + (r + 1) * micro_batch_size]) for r in range(dp_size)]
        for k in range(0, len(global_rows), step)
    ]
