"""Test-only faults, off unless their environment variable is set: they exercise, end to end
and at every layout, what a real failure does to a job (tests/parallel/test_reliability.py,
docs/RELIABILITY.md).

- ``MEGATRON_CROC_INJECT_FAULT="RANK:ITERATION:WHERE"``: that rank raises during that
  (1-based) iteration, at WHERE = data | forward | backward | optimizer | save.
- ``MEGATRON_CROC_INJECT_NONFINITE="5,6"``: those iterations' losses become NaN (every rank),
  to exercise the skip-and-report path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PLACES = ("data", "forward", "backward", "optimizer", "save")


class InjectedFault(RuntimeError):
    """Raised by a fault planted with MEGATRON_CROC_INJECT_FAULT."""


@dataclass(frozen=True)
class FaultPlan:
    rank: int
    iteration: int
    where: str

    def due(self, where: str, iteration: int) -> bool:
        return where == self.where and iteration == self.iteration and int(os.environ.get("RANK", "0")) == self.rank

    def fire(self, where: str, iteration: int) -> None:
        if self.due(where, iteration):
            raise InjectedFault(f"injected fault at {where} of iteration {iteration} (MEGATRON_CROC_INJECT_FAULT)")


def planned_fault() -> FaultPlan | None:
    raw = os.environ.get("MEGATRON_CROC_INJECT_FAULT", "").strip()
    if not raw:
        return None
    try:
        rank, iteration, where = raw.split(":")
        plan = FaultPlan(int(rank), int(iteration), where)
    except ValueError:
        raise ValueError(f"MEGATRON_CROC_INJECT_FAULT={raw!r}: expected RANK:ITERATION:WHERE") from None
    if plan.where not in PLACES:
        raise ValueError(f"MEGATRON_CROC_INJECT_FAULT={raw!r}: WHERE must be one of {PLACES}")
    return plan


def nonfinite_iterations() -> set[int]:
    raw = os.environ.get("MEGATRON_CROC_INJECT_NONFINITE", "")
    return {int(x) for x in raw.split(",") if x.strip()}
