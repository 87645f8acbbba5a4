"""Known third-party warnings are silenced by exact message; every other one still shows."""

from __future__ import annotations

import logging
import warnings

from megatron_croc.quiet import _KNOWN_LOG_LINES, _KNOWN_WARNINGS, quiet_known_warnings


def test_known_warnings_are_silenced_and_others_still_show(caplog):
    quiet_known_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_known_warnings()  # catch_warnings reset the filters; install them inside
        for category, start in _KNOWN_WARNINGS:
            warnings.warn(start + " (rest of the message)", category)
        warnings.warn("Apex is installed but broken", UserWarning)  # a near miss: not a known message
        warnings.warn("something new from megatron-core", UserWarning)
    assert [str(w.message) for w in caught] == ["Apex is installed but broken", "something new from megatron-core"]

    with caplog.at_level(logging.WARNING):
        for name, start in _KNOWN_LOG_LINES.items():
            logging.getLogger(name).warning(start + " details")
            logging.getLogger(name).warning("another line of the same logger")
    assert [r.getMessage() for r in caplog.records] == ["another line of the same logger"] * len(_KNOWN_LOG_LINES)
