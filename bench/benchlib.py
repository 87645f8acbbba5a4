"""Plumbing shared by the benchmarks: timing, the SIGTERM stop, JSON output.

The benchmark scripts import it as a sibling module (``sys.path`` holds ``bench/`` when a
script runs); it holds no measured logic.
"""

from __future__ import annotations

import collections
import json
import math
import os
import statistics
import time
import warnings
from typing import Callable, Sequence

import torch



class BenchInterrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, print what was measured, exit non-zero.
    A BaseException so that per-row ``except Exception`` handlers do not swallow it."""


def stop_on_sigterm() -> None:
    import signal

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills
        raise BenchInterrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], *, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Per-call times in ms after ``warmup`` calls: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def wall_ms(fn: Callable[[], object], *, device: torch.device, repeat: int, warmup: bool = True
            ) -> tuple[float, object]:
    """Median wall time of ``fn`` in ms and its last result, after one warm-up call unless
    ``warmup`` is False; synchronised before and after each call. For work that waits on the
    host (solvers that sync every round), where CUDA events would time only the device."""
    if warmup:
        fn()
    times, result = [], None
    for _ in range(repeat):
        synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), result


def emit_json(tag: str, result: dict, json_out: str | None) -> None:
    """One ``TAG {json}`` line on stdout (non-finite floats as null), and the same JSON in
    ``json_out`` when given."""
    line = json.dumps(finite_or_none(result))
    print(f"{tag} {line}", flush=True)
    if json_out:
        with open(json_out, "w") as f:
            f.write(line + "\n")


def host_syncs(fn: Callable[[], object], device: torch.device) -> dict | None:
    """Run ``fn`` once with CUDA's sync debug mode on and list the host syncs it makes: their
    count and the Python lines that made them (most frequent first). None off CUDA.

    A sync makes the host wait for the GPU to drain, so the GPU then idles while the host
    queues the next kernels; the Croc step aims to have none per micro-batch."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    sites = collections.Counter(
        f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    )
    return {"count": sum(sites.values()), "sites": [f"{site} x{n}" for site, n in sites.most_common()]}
