"""Plumbing shared by the benchmarks: timing, the SIGTERM stop, JSON output, and the
profiler's attribution of a step's time to named scopes (:class:`Scopes`,
:func:`attribute_profile`).

The benchmark scripts import it as a sibling module (``sys.path`` holds ``bench/`` when a
script runs); it holds no measured logic.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


class BenchInterrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, print what was measured, exit non-zero.
    A BaseException so that per-row ``except Exception`` handlers do not swallow it."""


def stop_on_sigterm():
    """SIGTERM (the suite's per-part timeout) raises BenchInterrupted, so a benchmark still
    prints what it measured. Returns the previous handler: a benchmark run in-process (the CPU
    tests call main()) puts it back."""
    import signal

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills
        raise BenchInterrupted(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """The card's rate for an n x n x n matmul in ``dtype``: the denominator of "% of matmul"."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    ms = median(time_ms(lambda: a @ b, device=device, warmup=3, iters=20 if device.type == "cuda" else 3))
    return 2 * n**3 / (ms * 1e-3) / 1e12


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


# ---------------------------------------------------------------------------------------------
# profiler attribution: where a step's time goes
# ---------------------------------------------------------------------------------------------

SCOPE_PREFIX = "bench_scope/"
WINDOW = "window"  # the scope that brackets the profiled step (host wall time, sync included)
_EVALUATE = "autograd::engine::evaluate_function: "
# kineto's optional CUDA-sync activities sit on the device timeline but are the host waiting,
# not the device working (off by default in torch; dropped if a build turns them on)
_DEVICE_WAITS = ("Context Sync", "Stream Sync", "Event Sync", "Device Sync", "Stream Wait Event")


class Scopes:
    """``record_function`` scopes put around a live model's modules and methods by the
    benchmark, so a profile can say which part of the model each op belongs to, with no edit
    to the model.

    Modules get a forward pre-hook that opens the scope and a forward hook (``always_call``)
    that closes it; methods are shadowed by an instance attribute that calls the original
    inside the scope (for code that is not a module call, or modules that must not get hooks,
    e.g. compiled or CUDA-graphed ones). Only forwards are bracketed: :func:`attribute_profile`
    gives each backward op the scope of the forward op that made its autograd node.
    :meth:`remove` undoes everything."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.installed: list[str] = []
        self.missing: list[str] = []

    @staticmethod
    def scope(key: str):
        return torch.autograd.profiler.record_function(SCOPE_PREFIX + key)

    def module(self, module: torch.nn.Module, key: str, where: str) -> None:
        open_scopes: list = []

        def enter(mod, args):
            rf = self.scope(key)
            rf.__enter__()
            open_scopes.append(rf)

        def leave(mod, args, output):
            if open_scopes:
                open_scopes.pop().__exit__(None, None, None)

        handles = (module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True))
        self._undo.append(lambda: [h.remove() for h in handles])
        self.installed.append(f"{where} -> {key}")

    def method(self, owner: object, name: str, key: str, where: str) -> None:
        original = getattr(owner, name, None)
        if not callable(original):
            self.missing.append(f"{where}.{name} ({key})")
            return
        shadowed = name in vars(owner)

        @functools.wraps(original)
        def scoped(*args, **kwargs):
            with self.scope(key):
                return original(*args, **kwargs)

        setattr(owner, name, scoped)
        self._undo.append(lambda: setattr(owner, name, original) if shadowed else delattr(owner, name))
        self.installed.append(f"{where}.{name}() -> {key}")

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


@dataclass(kw_only=True)
class _Node:
    """A host-side profiler event (op, scope or autograd-engine call) in its thread's tree."""

    name: str
    start: int
    end: int
    thread: int
    fwd_thread: int
    seq: int
    parent: "_Node | None" = None
    children: list = field(default_factory=list)
    owner: tuple | None = None  # (key, phase), resolved lazily


def _is_op(name: str) -> bool:
    """A dispatcher op (``aten::mm``, ``c10d::...``): what does the work on a CPU. Not a scope,
    not the autograd engine's wrapper, not a Python-level autograd.Function name."""
    return "::" in name and not name.startswith(("autograd::", "profiler::", SCOPE_PREFIX))


def _build_trees(events) -> tuple[list[_Node], dict[int, _Node]]:
    """The host events as per-thread trees (events nest on a thread) and a map from the
    correlation id of each to its node (what device kernels link to)."""
    by_thread: dict[int, list] = collections.defaultdict(list)
    for e in events:
        if e.device_type() != torch.autograd.DeviceType.CPU or e.linked_correlation_id() != 0:
            continue  # device activity, or a runtime call (cudaLaunchKernel) linked to its op
        if e.is_async() or e.start_thread_id() != e.end_thread_id():
            continue
        by_thread[e.start_thread_id()].append(e)
    nodes: list[_Node] = []
    by_corr: dict[int, _Node] = {}
    for thread, evs in by_thread.items():
        evs.sort(key=lambda e: (e.start_ns(), -e.end_ns()))
        stack: list[_Node] = []
        for e in evs:
            node = _Node(name=e.name(), start=e.start_ns(), end=e.end_ns(), thread=thread,
                         fwd_thread=e.fwd_thread_id(), seq=e.sequence_nr())
            while stack and stack[-1].end < node.end:  # ended before, or (malformed) overlaps: not a parent
                stack.pop()
            if stack:
                node.parent = stack[-1]
                stack[-1].children.append(node)
            stack.append(node)
            nodes.append(node)
            by_corr[e.correlation_id()] = node
    return nodes, by_corr


def _scope_owner(node: _Node) -> tuple[str | None, _Node | None]:
    """The innermost benchmark scope or autograd-engine call above ``node`` (itself included):
    (scope key, None) or (None, the engine call); (None, None) if neither."""
    n = node
    while n is not None:
        if n.name.startswith(SCOPE_PREFIX) and n.name != SCOPE_PREFIX + WINDOW:
            return n.name[len(SCOPE_PREFIX):], None
        if n.name.startswith(_EVALUATE):
            return None, n
        n = n.parent
    return None, None


def _in_backward(node: _Node) -> bool:
    n = node
    while n is not None:
        if n.name.startswith(_EVALUATE):
            return True
        n = n.parent
    return False


def attribute_profile(kineto_results, *, on_device: bool, accumulate_key: str, default_key: str = "other") -> dict:
    """Split the profiled window (the ``SCOPE_PREFIX + WINDOW`` scope: the host's wall time of
    the step, final sync included) into time per (scope key, phase) and idle time, summing to
    the window exactly.

    What counts as busy: on a GPU, the device's kernels, copies and sets (not its user
    annotations); on a CPU, the self time of dispatcher ops (their time minus their child
    ops'), the CPU analogue of kernel time. Idle is the window minus the union of the busy
    intervals: on a GPU the time its queue ran dry because the host was late or waiting.
    Where busy intervals overlap (several streams), each instant is split evenly between them,
    so the per-scope times add up to the union.

    Whose time it is: a kernel belongs to the host op that launched it (kineto's correlation
    id), a host op to the innermost :class:`Scopes` scope above it. Backward ops run outside
    every forward scope (on the autograd engine's thread on a GPU), inside an
    ``autograd::engine::evaluate_function`` call that carries the sequence number and forward
    thread of the forward op that made its node; they get that forward op's scope, so a
    module's backward is attributed to the module without bracketing backward (which hooks
    cannot do reliably). A forward sequence number is recorded by several nested ops (a
    composite and its parts), and by ops that make no node, before the one that does: the
    last op recorded with it is the one that made the node, so its scope wins.
    Gradient accumulation (``AccumulateGrad`` nodes, no forward op) goes to ``accumulate_key``;
    everything without a scope to ``default_key``.

    Returns ``window_ns``, ``busy_ns``, ``idle_ns``, ``by_key`` {key: {"fwd": ns, "bwd": ns}},
    ``device_events`` and ``unlinked_device_events`` (kernels whose launching op was not
    recorded; counted in ``default_key``).
    """
    events = kineto_results.events()
    nodes, by_corr = _build_trees(events)
    windows = [n for n in nodes if n.name == SCOPE_PREFIX + WINDOW]
    if len(windows) != 1:
        raise RuntimeError(f"expected one {SCOPE_PREFIX + WINDOW!r} scope in the profile, found {len(windows)}")
    w0, w1 = windows[0].start, windows[0].end

    # forward ops' scopes by (thread, sequence number): the last op recorded with a number wins.
    # By number alone as a fallback, should a build report the forward thread differently from
    # the thread ids of the ops (numbers are per thread, but only one thread runs forwards here).
    forward_scope: dict[tuple[int, int], str] = {}
    by_number: dict[int, str] = {}
    for node in sorted(nodes, key=lambda n: n.start):
        if node.seq >= 0 and not node.name.startswith(_EVALUATE) and not _in_backward(node):
            key, _ = _scope_owner(node)
            forward_scope[(node.thread, node.seq)] = by_number[node.seq] = key or default_key

    def owner(node: _Node) -> tuple[str, str]:
        if node.owner is None:
            key, engine_call = _scope_owner(node)
            phase = "bwd" if _in_backward(node) else "fwd"
            if key is None and engine_call is not None:
                if "AccumulateGrad" in engine_call.name:
                    key = accumulate_key
                else:
                    key = forward_scope.get((engine_call.fwd_thread, engine_call.seq),
                                            by_number.get(engine_call.seq, default_key))
            node.owner = (key or default_key, phase)
        return node.owner

    intervals: list[tuple[int, int, tuple[str, str]]] = []
    device_events = unlinked = 0
    if on_device:
        for e in events:
            if e.device_type() == torch.autograd.DeviceType.CPU or e.is_user_annotation():
                continue
            if e.name() in _DEVICE_WAITS:
                continue
            start, end = max(e.start_ns(), w0), min(e.end_ns(), w1)
            if end <= start:
                continue
            device_events += 1
            node = by_corr.get(e.linked_correlation_id())
            if node is None:
                unlinked += 1
            intervals.append((start, end, owner(node) if node is not None else (default_key, "fwd")))
    else:
        for node in nodes:
            if not _is_op(node.name) or node.end <= w0 or node.start >= w1:
                continue
            cursor = node.start
            for child in sorted(node.children, key=lambda c: c.start):
                if child.start > cursor:
                    intervals.append((cursor, child.start, owner(node)))
                cursor = max(cursor, child.end)
            if node.end > cursor:
                intervals.append((cursor, node.end, owner(node)))
        intervals = [(max(s, w0), min(e, w1), o) for s, e, o in intervals if min(e, w1) > max(s, w0)]

    # sweep: each instant split evenly between the intervals active then
    edges = sorted([(s, 1, o) for s, _, o in intervals] + [(e, -1, o) for _, e, o in intervals],
                   key=lambda x: (x[0], x[1]))
    share: dict[tuple[str, str], float] = collections.defaultdict(float)
    active: collections.Counter = collections.Counter()
    depth, busy, last = 0, 0, w0
    for t, delta, o in edges:
        if depth and t > last:
            dt = t - last
            busy += dt
            for key, count in active.items():
                share[key] += dt * count / depth
        last = t
        active[o] += delta
        if not active[o]:
            del active[o]
        depth += delta
    by_key: dict[str, dict[str, float]] = {}
    for (key, phase), ns in share.items():
        by_key.setdefault(key, {"fwd": 0.0, "bwd": 0.0})[phase] += ns
    return {"window_ns": w1 - w0, "busy_ns": busy, "idle_ns": (w1 - w0) - busy, "by_key": by_key,
            "device_events": device_events, "unlinked_device_events": unlinked}


def profile_one_call(fn: Callable[[], object], device: torch.device):
    """Run ``fn`` once under torch.profiler (host activity, and the GPU's on CUDA) inside the
    ``SCOPE_PREFIX + WINDOW`` scope, synchronised before and inside it; returns kineto's
    results for :func:`attribute_profile`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Profiler clears events at the end of each cycle"
        with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
            with Scopes.scope(WINDOW):
                fn()
                synchronize(device)
    return prof.profiler.kineto_results
