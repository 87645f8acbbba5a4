"""Prompt-pool assignment (SPEC §1.2): serial vs concurrent scipy per micro-batch, both pool regimes.

    PYTHONPATH=$PWD python bench/bench_assignment.py --device cuda     # GPU machine
    PYTHONPATH=$PWD python bench/bench_assignment.py --device cpu      # same shapes on a CPU
    PYTHONPATH=$PWD python bench/bench_assignment.py --tiny            # toy size, seconds

For each pool initialisation it builds one micro-batch of realistic costs -- ``cdist`` between
the 432 selected (of 576) visual tokens, projected to the LLM width H (4096 by default) by a
random ``mlp2x_gelu`` and L2-normalised as in the model, and the K = 2048 pool rows -- for 4
samples by default (the step benchmark's micro-batch), in two regimes:

- ``unit``: unit-norm pool rows (the model's default ``token_scale`` init): the easy regime;
- ``normal``: N(0, 1) pool rows as in the released code. Their norms (~sqrt(H)) dwarf the
  token differences, all costs of a row are nearly equal, and scipy takes ~60x longer.

and times, on the host clock, alternating the two (median of the timed calls):

- ``serial scipy``: the released code's way: one device-to-host copy, then
  ``linear_sum_assignment`` sample after sample;
- ``concurrent scipy``: ``assign(cost)``, the path the model takes: one (pinned, non-blocking on
  CUDA) copy, then the samples on the solver threads (scipy releases the GIL), the columns back
  on the costs' device. (With tensor parallelism each TP rank of the first stage solves every
  TP-th sample of this micro-batch; that split is not timed here.)

Both are exact; the table's last column is the largest relative disagreement of their total
costs (0 expected). The hard regime gets fewer timed calls (``--repeat-hard``) and no warm-up
call (the easy regime has warmed the solver threads), and a time budget (``--budget-s``) caps
the repeats, so the table is always printed: every regime gets at least one call of each path.
On SIGTERM (e.g. the suite's ``timeout``) the rows measured so far are printed.

How much of a step this is: the training step solves micro-batch m+1's assignment on the solver
threads while the device computes micro-batch m (``CrocModel.prefetch_visual``). Only the first
micro-batch of each optimizer step waits for its own solve (its costs depend on the projector
and pool that the previous step just updated), so with M micro-batches of T ms per step the
exposed time is about one concurrent solve c, plus ``max(0, c - T)`` for each of micro-batches
2..M whose solve outlasts the micro-batch it hides behind; when ``c <= T`` its share of the step
``c / (M T + c)`` falls as 1/M. ``--microbatch-ms T`` prints this estimate for M = 4, 8, 16
(``bench_step`` measures the exposed time of a real step directly).

Prints a table between ``=== assignment table`` markers and a ``BENCH_ASSIGNMENT_JSON`` line;
``run(args)`` returns the same figures for a combined benchmark.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from megatron_croc.models.matching import assign

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import BenchInterrupted, emit_json, stop_on_sigterm, synchronize  # noqa: E402

VISUAL_TOKENS = 576   # CLIP ViT-L/14 at 336 px, class token dropped
VISION_WIDTH = 1024
POOL_INITS = ("unit", "normal")
STEP_MICROBATCHES = (4, 8, 16)  # micro-batches per step for the exposed-share estimate
# --tiny: the whole benchmark's plumbing in well under a second on a CPU
TINY = {"batch": 3, "rows": 12, "cols": 40, "hidden": 16, "visual_tokens": 16, "vision_width": 8}


def make_costs(batch: int, rows: int, cols: int, hidden: int, pool_init: str,
               device: torch.device, seed: int = 0, common: float = 0.5, *,
               visual_tokens: int = VISUAL_TOKENS, vision_width: int = VISION_WIDTH) -> torch.Tensor:
    """``[batch, rows, cols]`` fp32 costs as the comprehension stage computes them.

    Vision features get a per-image common component of weight ``common`` (tokens of one image
    are correlated; 0.5 gives a mean pairwise cosine of ~0.3 after the projector). Alike rows
    make the assignment harder: scipy's time per unit-pool sample roughly doubles from
    ``common=0`` to ``common=1``.
    """
    if pool_init not in POOL_INITS:
        raise ValueError(f"unknown pool init {pool_init!r}; expected one of {POOL_INITS}")
    if not 0 < rows <= min(visual_tokens, cols):
        raise ValueError(f"rows must be in [1, min(visual tokens {visual_tokens}, cols {cols})], got {rows}")
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    feats = common * randn(batch, 1, vision_width) + randn(batch, visual_tokens, vision_width)
    w1 = randn(vision_width, hidden) / vision_width ** 0.5
    w2 = randn(hidden, hidden) / hidden ** 0.5
    tokens = F.normalize(F.gelu(feats @ w1) @ w2, dim=-1)
    keep = torch.argsort(torch.rand(batch, visual_tokens, generator=g), dim=1)[:, :rows]
    selected = tokens.gather(1, keep.to(device)[..., None].expand(-1, -1, hidden))
    pool = randn(cols, hidden)
    if pool_init == "unit":
        pool = F.normalize(pool, dim=-1)
    return torch.cdist(selected, pool.expand(batch, -1, -1)).float().contiguous()


def serial_scipy(cost: torch.Tensor) -> torch.Tensor:
    """The released code's loop: one copy to the host, then one sample after another."""
    host = cost.detach().cpu().numpy()
    cols = [linear_sum_assignment(m)[1] for m in host]
    return torch.from_numpy(np.stack(cols)).to(cost.device)


def totals(cost: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per-sample total cost in float64."""
    return cost.double().gather(2, cols[..., None]).sum(dim=(1, 2))


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    """Host wall time in ms of one call, synchronised before and after (the solve's copies and
    its result's upload are part of what the step waits for)."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3, out


def measure_regime(cost: torch.Tensor, *, repeat: int, warmup: bool, deadline: float) -> dict:
    """Serial and concurrent scipy on one micro-batch's costs, alternating, median of the timed
    calls; repeats stop early (never below one call each) once the next pair would end past
    ``deadline`` (a ``time.perf_counter()`` value)."""
    device = cost.device
    serial = lambda: serial_scipy(cost)  # noqa: E731
    concurrent = lambda: assign(cost)  # noqa: E731
    if warmup:  # the solver threads' start, scipy's first call, the pinned buffers
        concurrent()
        serial()
    times: dict[str, list[float]] = {"serial": [], "concurrent": []}
    results = {}
    for i in range(repeat):
        if i and time.perf_counter() + (times["serial"][-1] + times["concurrent"][-1]) / 1e3 > deadline:
            break
        for name, fn in (("serial", serial), ("concurrent", concurrent)):
            ms, results[name] = _timed(fn, device)
            times[name].append(ms)
    ref = totals(cost, results["serial"])
    rel = (totals(cost, results["concurrent"]) - ref).abs() / ref.abs().clamp_min(1e-30)
    serial_ms = statistics.median(times["serial"])
    concurrent_ms = statistics.median(times["concurrent"])
    return {"serial_scipy_ms": serial_ms, "concurrent_scipy_ms": concurrent_ms,
            "concurrent_scipy_speedup": serial_ms / concurrent_ms,
            "serial_scipy_ms_per_sample": serial_ms / cost.shape[0],
            "concurrent_scipy_max_rel_diff": float(rel.max()),
            "timed_calls": len(times["serial"]),
            "serial_scipy_all_ms": times["serial"], "concurrent_scipy_all_ms": times["concurrent"]}


def exposed_estimate(concurrent_ms: float, microbatch_ms: float) -> dict[str, dict[str, float]]:
    """The assignment's exposed time per step and its share of the step, for M micro-batches of
    ``microbatch_ms`` with the look-ahead (see the module docstring)."""
    out = {}
    for m in STEP_MICROBATCHES:
        exposed = concurrent_ms + (m - 1) * max(0.0, concurrent_ms - microbatch_ms)
        out[str(m)] = {"exposed_ms": exposed, "share": exposed / (m * microbatch_ms + exposed)}
    return out


def run(args: argparse.Namespace) -> dict:
    """Benchmark every requested pool init; returns ``{"config": ..., "rows": [...]}``, with
    ``"interrupted"`` in the config when a SIGTERM stopped it (rows measured so far kept).

    ``args`` as made by :func:`parse_args` (e.g. ``parse_args(["--device", "cuda"])``).
    """
    start = time.perf_counter()
    deadline = start + args.budget_s
    device = torch.device(args.device)
    image = ({"visual_tokens": TINY["visual_tokens"], "vision_width": TINY["vision_width"]}
             if args.tiny else {})
    inits = list(POOL_INITS) if args.pool_init == "both" else [args.pool_init]
    config = {"batch": args.batch, "rows": args.rows, "cols": args.cols, "hidden": args.hidden,
              "device": str(device), "repeat": args.repeat, "repeat_hard": args.repeat_hard,
              "budget_s": args.budget_s, "common": args.common, "tiny": args.tiny,
              "microbatch_ms": args.microbatch_ms, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "solver_threads": min(32, len(os.sched_getaffinity(0))),
              "cpus": len(os.sched_getaffinity(0))}
    results = []
    try:
        for init in inits:
            cost = make_costs(args.batch, args.rows, args.cols, args.hidden, init, device, args.seed,
                              args.common, **image)
            # Warm up once, on the first regime; the hard one is long enough not to need it.
            row = {"pool_init": init, **measure_regime(
                cost, repeat=args.repeat if init == "unit" else args.repeat_hard,
                warmup=not results, deadline=deadline)}
            if args.microbatch_ms is not None:
                row["exposed_per_step"] = exposed_estimate(row["concurrent_scipy_ms"], args.microbatch_ms)
            results.append(row)
    except BenchInterrupted as stop:
        config["interrupted"] = str(stop)
    config["elapsed_s"] = time.perf_counter() - start
    return {"config": config, "rows": results}


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"=== assignment table: B={c['batch']} N={c['rows']} K={c['cols']} H={c['hidden']} "
             f"device={c['device']}{' (' + c['gpu'] + ')' if c['gpu'] else ''}, {c['solver_threads']} "
             f"solver threads on {c['cpus']} CPUs, ms per micro-batch (median of the timed calls)",
             f"{'pool':7s} {'calls':>5s} {'serial scipy':>13s} {'per sample':>11s} "
             f"{'concurrent scipy':>17s} {'speed-up':>9s} {'max rel diff':>13s}"]
    for r in result["rows"]:
        lines.append(
            f"{r['pool_init']:7s} {r['timed_calls']:5d} {r['serial_scipy_ms']:13.2f} "
            f"{r['serial_scipy_ms_per_sample']:11.2f} {r['concurrent_scipy_ms']:17.2f} "
            f"{r['concurrent_scipy_speedup']:8.2f}x {r['concurrent_scipy_max_rel_diff']:13.1e}")
    if c["microbatch_ms"] is not None and result["rows"]:
        lines.append(f"exposed assignment per step (estimate, look-ahead on, micro-batches of "
                     f"{c['microbatch_ms']:g} ms):")
        for r in result["rows"]:
            cells = [f"M={m}: {e['exposed_ms']:.1f} ms = {100 * e['share']:.2f}%"
                     for m, e in r["exposed_per_step"].items()]
            lines.append(f"  {r['pool_init']:7s} " + ", ".join(cells))
    if "interrupted" in c:
        lines.append(f"(interrupted by {c['interrupted']}: only the rows above were measured)")
    lines.append(f"=== end assignment table ({c['elapsed_s']:.1f} s)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="samples per micro-batch (default 4)")
    p.add_argument("--rows", type=int, default=None, help="selected visual tokens per sample (default 432)")
    p.add_argument("--cols", type=int, default=None, help="pool size K (default 2048)")
    p.add_argument("--hidden", type=int, default=None,
                   help="LLM hidden size H of the projected tokens and the pool (default 4096)")
    p.add_argument("--tiny", action="store_true",
                   help=f"toy sizes for a CPU plumbing check ({TINY}); explicit size flags still win")
    p.add_argument("--pool-init", choices=[*POOL_INITS, "both"], default="both",
                   help="pool rows unit-norm, N(0,1), or both regimes (default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per path, unit-norm pool (default 5)")
    p.add_argument("--repeat-hard", type=int, default=2,
                   help="timed calls per path, N(0,1) pool, where scipy is ~60x slower (default 2)")
    p.add_argument("--budget-s", type=float, default=25.0,
                   help="stop repeating once this much time has passed (each regime still gets one "
                        "call per path); default 25")
    p.add_argument("--microbatch-ms", type=float, default=None,
                   help="one micro-batch's compute time T: also print the estimated exposed "
                        f"assignment per step for M = {', '.join(map(str, STEP_MICROBATCHES))}")
    p.add_argument("--common", type=float, default=0.5,
                   help="weight of the per-image common component of the vision features")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the JSON line's content to this file")
    args = p.parse_args(argv)
    defaults = {"batch": 4, "rows": 432, "cols": 2048, "hidden": 4096}
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, TINY[name] if args.tiny else default)
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.rows > args.cols:
        p.error(f"--rows ({args.rows}) must not exceed --cols ({args.cols}): one pool entry per row")
    if args.rows > (TINY["visual_tokens"] if args.tiny else VISUAL_TOKENS):
        p.error(f"--rows ({args.rows}) must not exceed the image's visual tokens "
                f"({TINY['visual_tokens'] if args.tiny else VISUAL_TOKENS})")
    if args.repeat < 1 or args.repeat_hard < 1:
        p.error("--repeat and --repeat-hard must be at least 1")
    if args.budget_s < 0:
        p.error(f"--budget-s must not be negative, got {args.budget_s}")
    if args.microbatch_ms is not None and args.microbatch_ms <= 0:
        p.error(f"--microbatch-ms must be positive, got {args.microbatch_ms}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.getsignal(signal.SIGTERM)
    stop_on_sigterm()
    try:
        result = run(args)
    finally:  # main() may run inside another program (the tests): give its handler back
        signal.signal(signal.SIGTERM, previous)
    print(format_table(result))
    emit_json("BENCH_ASSIGNMENT_JSON", result, args.json_out)
    return 1 if "interrupted" in result["config"] else 0


if __name__ == "__main__":
    sys.exit(main())
