"""Prompt-pool assignment (SPEC §1.2): scipy serial vs scipy concurrent vs the batched solver.

    PYTHONPATH=$PWD python bench/bench_assignment.py --device cuda          # GPU machine
    PYTHONPATH=$PWD python bench/bench_assignment.py                        # CPU, small hidden

For each pool initialisation it builds one micro-batch of realistic costs -- ``cdist`` between
the 432 selected (of 576) visual tokens, projected by a random ``mlp2x_gelu`` and L2-normalised
as in the model, and the K pool rows (unit-norm rows, or N(0, 1) rows as in the released code)
-- and times, median over ``--repeat`` calls after a warm-up call (none for the batched solver on
the CPU, where one call takes seconds):

- ``serial scipy``: the released code's way, one device-to-host copy and then
  ``linear_sum_assignment`` sample after sample;
- ``concurrent scipy``: ``assign(..., solver="scipy")``, the samples in a thread pool;
- ``gpu solver``: the batched solver behind ``assign(..., solver="gpu")`` on ``--device``
  (synchronised on CUDA).

It reports the speed-ups over serial scipy, the largest relative total-cost disagreement of the
two other solvers with serial scipy (exact solvers: ~0), and the batched solver's work counters.
Prints a table between ``=== assignment table`` markers and a ``BENCH_ASSIGNMENT_JSON`` line;
``run(args)`` returns the same figures for a combined benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from megatron_croc.models.matching import _gpu_assign, assign

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import emit_json, wall_ms  # noqa: E402

VISUAL_TOKENS = 576   # CLIP ViT-L/14 at 336 px, class token dropped
VISION_WIDTH = 1024


def make_costs(batch: int, rows: int, cols: int, hidden: int, pool_init: str,
               device: torch.device, seed: int = 0, common: float = 0.5) -> torch.Tensor:
    """``[batch, rows, cols]`` fp32 costs as the comprehension stage computes them.

    Vision features get a per-image common component of weight ``common`` (tokens of one image
    are correlated; 0.5 gives a mean pairwise cosine of ~0.3 after the projector). Alike rows
    make the assignment harder: scipy's time per unit-pool sample roughly doubles from
    ``common=0`` to ``common=1``.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    feats = common * randn(batch, 1, VISION_WIDTH) + randn(batch, VISUAL_TOKENS, VISION_WIDTH)
    w1 = randn(VISION_WIDTH, hidden) / VISION_WIDTH ** 0.5
    w2 = randn(hidden, hidden) / hidden ** 0.5
    tokens = F.normalize(F.gelu(feats @ w1) @ w2, dim=-1)
    keep = torch.argsort(torch.rand(batch, VISUAL_TOKENS, generator=g), dim=1)[:, :rows]
    selected = tokens.gather(1, keep.to(device)[..., None].expand(-1, -1, hidden))
    pool = randn(cols, hidden)
    if pool_init == "unit":
        pool = F.normalize(pool, dim=-1)
    elif pool_init != "normal":
        raise ValueError(f"unknown pool init {pool_init!r}")
    return torch.cdist(selected, pool.expand(batch, -1, -1)).float().contiguous()


def serial_scipy(cost: torch.Tensor) -> torch.Tensor:
    """The released code's loop: one copy to the host, then one sample after another."""
    host = cost.detach().cpu().numpy()
    cols = [linear_sum_assignment(m)[1] for m in host]
    return torch.from_numpy(np.stack(cols)).to(cost.device)


def totals(cost: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per-sample total cost in float64."""
    return cost.double().gather(2, cols[..., None]).sum(dim=(1, 2))


def run(args: argparse.Namespace) -> dict:
    """Benchmark every requested pool init; returns ``{"config": ..., "rows": [...]}``.

    ``args`` as made by :func:`parse_args` (e.g. ``parse_args(["--device", "cuda"])``).
    """
    device = torch.device(args.device)
    hidden = args.hidden or (4096 if device.type == "cuda" else 256)
    inits = ["unit", "normal"] if args.pool_init == "both" else [args.pool_init]
    results = []
    for init in inits:
        cost = make_costs(args.batch, args.rows, args.cols, hidden, init, device, args.seed,
                          args.common)
        row: dict = {"pool_init": init}
        row["serial_scipy_ms"], reference = wall_ms(lambda: serial_scipy(cost), device=device,
                                                    repeat=args.repeat)
        ref_total = totals(cost, reference)
        row["concurrent_scipy_ms"], conc = wall_ms(lambda: assign(cost, solver="scipy"), device=device,
                                                   repeat=args.repeat)
        # The batched solver on the CPU takes seconds: no warm-up there (nothing to warm).
        row["gpu_solver_ms"], (ours, stats) = wall_ms(lambda: _gpu_assign(cost), device=device,
                                                      repeat=args.repeat, warmup=device.type == "cuda")
        for name, cols in (("concurrent_scipy", conc), ("gpu_solver", ours)):
            rel = (totals(cost, cols) - ref_total).abs() / ref_total.abs().clamp_min(1e-30)
            row[f"{name}_max_rel_diff"] = float(rel.max())
            row[f"{name}_speedup"] = row["serial_scipy_ms"] / row[f"{name}_ms"]
        row["gpu_solver_stats"] = asdict(stats)
        results.append(row)
    config = {"batch": args.batch, "rows": args.rows, "cols": args.cols, "hidden": hidden,
              "device": str(device), "repeat": args.repeat, "common": args.common,
              "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "threads": torch.get_num_threads()}
    return {"config": config, "rows": results}


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"=== assignment table: B={c['batch']} N={c['rows']} K={c['cols']} H={c['hidden']} "
             f"device={c['device']}{' (' + c['gpu'] + ')' if c['gpu'] else ''}, "
             f"median of {c['repeat']}, ms per micro-batch",
             f"{'pool':7s} {'serial scipy':>13s} {'concurrent scipy':>17s} {'gpu solver':>11s} "
             f"{'conc x':>7s} {'gpu x':>7s} {'max rel diff (conc/gpu)':>24s}  gpu solver work"]
    for r in result["rows"]:
        s = r["gpu_solver_stats"]
        lines.append(
            f"{r['pool_init']:7s} {r['serial_scipy_ms']:13.2f} {r['concurrent_scipy_ms']:17.2f} "
            f"{r['gpu_solver_ms']:11.2f} {r['concurrent_scipy_speedup']:7.2f} "
            f"{r['gpu_solver_speedup']:7.2f} "
            f"{r['concurrent_scipy_max_rel_diff']:11.1e} / {r['gpu_solver_max_rel_diff']:9.1e}  "
            f"phases {s['phases']}, dense passes {s['dense_passes']}, path steps "
            f"{s['path_steps'] + s['reverse_path_steps']}, scipy fallbacks {s['fallbacks']}")
    lines.append("=== end assignment table")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="samples per micro-batch")
    p.add_argument("--rows", type=int, default=432, help="selected visual tokens per sample")
    p.add_argument("--cols", type=int, default=2048, help="pool size K")
    p.add_argument("--hidden", type=int, default=None,
                   help="LLM hidden size H (default 4096 on CUDA, 256 on the CPU)")
    p.add_argument("--pool-init", choices=["unit", "normal", "both"], default=None,
                   help="pool rows unit-norm or N(0,1) (default: both on CUDA, unit on the CPU, "
                        "where the batched solver is slow on the hard N(0,1) costs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed calls per solver (default 3 on CUDA, 1 on the CPU)")
    p.add_argument("--common", type=float, default=0.5,
                   help="weight of the per-image common component of the vision features")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the JSON line's content to this file")
    args = p.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    if args.pool_init is None:
        args.pool_init = "both" if on_cuda else "unit"
    if args.repeat is None:
        args.repeat = 3 if on_cuda else 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    emit_json("BENCH_ASSIGNMENT_JSON", result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
