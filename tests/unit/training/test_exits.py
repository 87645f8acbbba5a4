"""The exit conditions of a run (training.exits): each --exit-signal and SIGTERM are caught and
only recorded (the loop agrees on them at an iteration boundary), the duration and the interval."""

from __future__ import annotations

import os
import signal
import time

import pytest

from megatron_croc.training.arguments import EXIT_SIGNALS
from megatron_croc.training.config import ExitConfig
from megatron_croc.training.exits import NO_STOP, STOP_DURATION, STOP_SIGNAL, ExitConditions


@pytest.mark.parametrize("name", EXIT_SIGNALS)
def test_each_exit_signal_and_sigterm_are_recorded(name):
    for sent in dict.fromkeys((name, "SIGTERM")):
        exits = ExitConditions(config=ExitConfig(signal_handler=True, signal=name)).install()
        try:
            assert exits.local_request() == NO_STOP
            os.kill(os.getpid(), getattr(signal, sent))  # the process lives on: only recorded
            time.sleep(0.01)
            assert exits.local_request() == STOP_SIGNAL
            assert exits.describe(STOP_SIGNAL, 7) == f"signal {sent} (--exit-signal-handler)"
        finally:
            exits.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back


def test_without_the_handler_nothing_is_installed():
    exits = ExitConditions(config=ExitConfig(signal="SIGUSR1")).install()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    exits.uninstall()


def test_duration_and_interval():
    exits = ExitConditions(config=ExitConfig(duration_in_mins=1e-5, interval=4))
    time.sleep(0.01)
    assert exits.local_request() == STOP_DURATION
    assert exits.describe(STOP_DURATION, 3) == "--exit-duration-in-mins 1e-05"
    assert exits.at_interval(8) and not exits.at_interval(6)
    assert exits.describe(NO_STOP, 8) == "--exit-interval 4" and exits.describe(NO_STOP, 6) is None
