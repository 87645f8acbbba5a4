"""Stopping a run early without losing work: Megatron-LM's ``--exit-signal-handler``,
``--exit-duration-in-mins`` and ``--exit-interval``.

A signal (Slurm's time-limit warning, preemption, torchrun passing on SIGTERM) reaches every
rank at slightly different moments; each rank only records it here, and the training loop
agrees on it at the next iteration boundary through the one all-reduce it already does per
step. Then every rank saves the same checkpoint (atomically, like every save) and exits 0.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

from megatron_croc.training.config import ExitConfig

# Codes agreed across ranks with a MAX all-reduce; the highest wins when several apply.
NO_STOP, STOP_DURATION, STOP_SIGNAL = 0, 1, 2


@dataclass(kw_only=True)
class ExitConditions:
    """This rank's view of the exit conditions; :meth:`local_request` is what it contributes
    to the step's all-reduce, :meth:`describe` names the agreed result."""

    config: ExitConfig
    start_time: float = field(default_factory=time.monotonic)
    received: str | None = None
    _previous: object = None

    @property
    def signals(self) -> tuple[str, ...]:
        """--exit-signal, and SIGTERM always: the signal of preemption, of the time limit, and
        of torchrun passing a stop on (a Slurm job warned by SIGUSR1 may still be preempted)."""
        return tuple(dict.fromkeys((self.config.signal, "SIGTERM")))

    def install(self) -> "ExitConditions":
        """Catch the exit signals (with --exit-signal-handler). Call from the main thread, before
        the data loader starts its workers, so they inherit the handler and not the default
        action (which would kill them)."""
        if self.config.signal_handler and threading.current_thread() is threading.main_thread():
            self._previous = {name: signal.signal(getattr(signal, name), self._on_signal) for name in self.signals}
        return self

    def uninstall(self) -> None:
        for name, previous in (self._previous or {}).items():
            signal.signal(getattr(signal, name), previous)
        self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def local_request(self) -> int:
        if self.received is not None:
            return STOP_SIGNAL
        minutes = self.config.duration_in_mins
        if minutes is not None and time.monotonic() - self.start_time >= minutes * 60:
            return STOP_DURATION
        return NO_STOP

    def at_interval(self, iteration: int) -> bool:
        return self.config.interval is not None and iteration % self.config.interval == 0

    def describe(self, code: int, iteration: int) -> str | None:
        if code == STOP_SIGNAL:
            return f"signal {self.received or self.config.signal} (--exit-signal-handler)"
        if code == STOP_DURATION:
            return f"--exit-duration-in-mins {self.config.duration_in_mins:g}"
        if self.at_interval(iteration):
            return f"--exit-interval {self.config.interval}"
        return None
