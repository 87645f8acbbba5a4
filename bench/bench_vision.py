"""The vision tower as the training step runs it: the frozen CLIP encoder's forward plus the
projector's forward and backward, eager versus replayed from CUDA graphs, in one run.

    PYTHONPATH=$PWD python bench/bench_vision.py                      # CLIP-L/336, bf16, on a GPU
    PYTHONPATH=$PWD python bench/bench_vision.py --device cpu --tiny  # toy encoder, < 30 s on a CPU

For each image count (default 4 and 16) two rows, both through ``VisionTower.encode`` and
``VisionTower.project`` (megatron_croc.models.vision), the model's own code:

- ``eager``: the tower's graphs switched off (what ``--no-vision-cuda-graph`` gives);
- ``graphed``: the tower's CUDA graphs (one capture per image count, timed separately as the
  first call); "n/a on CPU".

Columns: device time of the encoder alone and of the tower (encoder + projector fwd+bwd; CUDA
events, median), the tower's model TFLOP/s (``training.logging.model_flops_per_step``'s
counting: encoder forward, projector forward and backward) and its share of this card's bf16
matmul rate (8192^3 GEMM measured in the same run, as bench_step does); host ms per encode call
(the time the host spends issuing it, no sync); aten ops per encode call and per encoder layer
(torch.profiler, top-level ops / all ops), and the graphed features' max abs difference from
eager.

Prints a table between ``=== vision table`` markers and a ``BENCH_VISION_JSON`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from typing import Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    BenchInterrupted, device_name, emit_json, matmul_tflops, median, stop_on_sigterm, synchronize, time_ms,
)


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny vision preset (CPU smoke run)")
    p.add_argument("--vision", default=None, help="vision preset (default clip-l-336, tiny with --tiny)")
    p.add_argument("--llm-hidden", type=int, default=None,
                   help="projector output width (default 2048, bench_step's 0.89B LLM; 64 with --tiny)")
    p.add_argument("--images", type=int, nargs="+", default=[4, 16], help="image counts, one row pair each")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--matmul-n", type=int, default=None, help="GEMM size of the matmul-rate row (8192; 256 tiny)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.tiny = args.tiny or args.vision == "tiny"
    args.vision = args.vision or ("tiny" if args.tiny else "clip-l-336")
    args.llm_hidden = args.llm_hidden or (64 if args.tiny else 2048)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.iters = args.iters if args.iters is not None else (3 if args.tiny else 10)
    args.matmul_n = args.matmul_n or (256 if args.tiny else 8192)
    if min(args.images) < 1:
        p.error(f"--images must be positive counts, got {args.images}")
    return args


def _init(args) -> torch.device:
    if args.device == "cpu":
        os.environ["MEGATRON_CROC_FORCE_CPU"] = "1"
    elif not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible; use --device cpu --tiny")
    from megatron_croc.distributed import init_model_parallel, init_process_group
    from megatron_croc.platform import init_platform

    platform = init_platform(force_cpu=args.device == "cpu")
    init_process_group(platform.backend)
    init_model_parallel(seed=args.seed)
    return platform.device


def build_tower(args, device):
    """A VisionTower with the preset's shapes, random weights, on ``device`` in the run's dtype
    (buffers too, as Float16Module leaves them in training), and the config that counts its FLOPs."""
    from megatron_croc.config import (
        LANGUAGE_PRESETS, VISION_PRESETS, CrocConfig, ModelConfig, PrecisionConfig,
    )
    from megatron_croc.models.vision import VisionTower

    language = dataclasses.replace(LANGUAGE_PRESETS["tiny"], hidden_size=args.llm_hidden, num_attention_heads=1,
                                   num_query_groups=1)
    # stage "align": no pool or VTR head, so model_flops_per_step counts the vision tower only
    config = ModelConfig(vision=VISION_PRESETS[args.vision], language=language, croc=CrocConfig(stage="align"),
                         precision=PrecisionConfig(bf16=args.dtype == "bf16"))
    tower = VisionTower(config, use_te=False).to(device=device, dtype=config.params_dtype)
    generator = torch.Generator(device=device).manual_seed(args.seed)  # drawn on the device: fast at CLIP-L
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    return tower, config


def count_ops(fn) -> tuple[int, int]:
    """aten ops one call of ``fn`` issues: (top-level ones, all including nested calls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(top), len(ops)


def host_ms(fn, device, iters: int) -> float:
    """Median host time to issue ``fn`` (no sync inside the timed span; synced between calls)."""
    times = []
    for _ in range(iters):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    synchronize(device)
    return median(times)


def measure(tower, config, images, *, graphed: bool, args, device, matmul: float) -> dict:
    from megatron_croc.training.logging import model_flops_per_step

    graphs = tower.encoder_graphs
    if not graphed:
        tower.encoder_graphs = None  # the eager path, as with --no-vision-cuda-graph
    try:
        n = images.shape[0]
        row: dict[str, object] = {"images": n, "path": "graphed" if graphed else "eager"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
            reserved = torch.cuda.memory_reserved(device)
        first = time.perf_counter()
        features = tower.encode(images)
        synchronize(device)
        row["first_call_s"] = time.perf_counter() - first  # the capture, for the graphed row
        if device.type == "cuda":
            # what stays reserved after the first call: a graph's private pool (its forward's
            # intermediates) and static buffers, plus the features returned
            torch.cuda.empty_cache()
            row["first_call_kept_mib"] = (torch.cuda.memory_reserved(device) - reserved) / 2**20
        if graphed and (tower.encoder_graphs is None or not tower.uses_cuda_graphs(images)
                        or tower.encoder_graphs.failure or not tower.encoder_graphs.graphs):
            raise RuntimeError(f"the graphed path did not replay a graph "
                               f"({tower.encoder_graphs and tower.encoder_graphs.failure})")
        grad = torch.randn_like(tower.project(features).detach())

        def tower_step():
            tower.project(tower.encode(images)).backward(grad)

        row["encoder_ms"] = median(time_ms(lambda: tower.encode(images), device=device, warmup=args.warmup,
                                           iters=args.iters))
        row["tower_ms"] = median(time_ms(tower_step, device=device, warmup=args.warmup, iters=args.iters))
        row["host_ms"] = host_ms(lambda: tower.encode(images), device, args.iters)
        flops = model_flops_per_step(config, num_tokens=0, seq_length=1, num_images=n)
        row["tflop"] = flops / 1e12
        row["tflops"] = flops / (row["tower_ms"] * 1e-3) / 1e12
        row["pct_matmul"] = 100 * row["tflops"] / matmul
        row["ops_per_call"], row["all_ops_per_call"] = count_ops(lambda: tower.encode(images))
        row["features"] = tower.encode(images)
        return row
    finally:
        tower.encoder_graphs = graphs


def layer_ops(tower, images) -> tuple[int, int]:
    """aten ops of one encoder layer's forward, as the frozen path runs it (inference mode)."""
    layer = tower.encoder.decoder.layers[0]
    seq = tower.encoder.seq_length
    hidden = torch.randn(seq, images.shape[0], tower.config.hidden_size, device=images.device,
                         dtype=tower.config.params_dtype)
    with torch.inference_mode():
        layer(hidden, attention_mask=None)
        return count_ops(lambda: layer(hidden, attention_mask=None))


def format_table(rows: list[dict], matmul: float) -> str:
    head = (f"{'images':>6} {'path':<8} {'encoder ms':>10} {'tower ms':>9} {'GFLOP':>9} {'TFLOP/s':>8} "
            f"{'% matmul':>8} {'host ms':>8} {'ops/call':>9} {'first s':>8} {'max|g-e|':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "na" in r:
            lines.append(f"{r['images']:>6} {r['path']:<8} {r['na']}")
            continue
        diff = r.get("max_abs_diff_vs_eager")
        lines.append(
            f"{r['images']:>6} {r['path']:<8} {r['encoder_ms']:>10.3f} {r['tower_ms']:>9.3f} {r['tflop'] * 1e3:>9.4g} "
            f"{r['tflops']:>8.1f} {r['pct_matmul']:>7.1f}% {r['host_ms']:>8.3f} {r['ops_per_call']:>9d} "
            f"{r['first_call_s']:>8.2f} {'' if diff is None else f'{diff:.2e}':>9}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    previous = stop_on_sigterm()
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    device = _init(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tower, config = build_tower(args, device)
    vis = config.vision
    matmul = matmul_tflops(device, dtype, args.matmul_n)
    print(f"bench_vision on {device_name(device)}; torch {torch.__version__}; {args.dtype}; {args.vision} "
          f"({vis.num_built_layers} layers built, {vis.num_image_tokens} tokens + class token per image, "
          f"hidden {vis.hidden_size}); projector -> {args.llm_hidden}; {args.dtype} matmul "
          f"{args.matmul_n}^3: {matmul:.1f} TFLOP/s; median of {args.iters} after {args.warmup} warm-up",
          flush=True)
    rows: list[dict] = []
    interrupted = None
    ops_layer = None
    generator = torch.Generator().manual_seed(args.seed)
    try:
        for n in args.images:
            images = torch.randint(0, 256, (n, 3, vis.image_size, vis.image_size), dtype=torch.uint8,
                                   generator=generator).to(device)
            if ops_layer is None:
                ops_layer = layer_ops(tower, images)
            eager = measure(tower, config, images, graphed=False, args=args, device=device, matmul=matmul)
            rows.append(eager)
            if device.type != "cuda":
                rows.append({"images": n, "path": "graphed", "na": "n/a on CPU (CUDA graphs need a GPU)"})
            else:
                graphed = measure(tower, config, images, graphed=True, args=args, device=device, matmul=matmul)
                graphed["max_abs_diff_vs_eager"] = (graphed["features"].float() - eager["features"].float()
                                                    ).abs().max().item()
                rows.append(graphed)
            for r in rows[-2:]:
                r.pop("features", None)
            print(format_table(rows[-2:], matmul).split("\n", 2)[-1], flush=True)
    except BenchInterrupted as err:
        interrupted = f"interrupted ({err})"
    for r in rows:
        r.pop("features", None)
    print(f"\n=== vision table ({device_name(device)}, {args.dtype}, {args.vision}; tower = frozen encoder fwd + "
          f"projector fwd+bwd; CUDA events / wall, median) ===")
    print(format_table(rows, matmul))
    if ops_layer is not None:
        print(f"aten ops per encoder layer (eager, inference mode): {ops_layer[0]} top-level, {ops_layer[1]} in all")
    if interrupted:
        print(interrupted)
    kept = [f"{r['images']} images {r['first_call_kept_mib']:.0f} MiB" for r in rows
            if r.get("path") == "graphed" and "first_call_kept_mib" in r]
    if kept:
        print(f"memory kept reserved by each graph (its private pool, static buffers): {', '.join(kept)}")
    print(f"% matmul: tower TFLOP/s over the {args.dtype} {args.matmul_n}^3 matmul rate of this card "
          f"({matmul:.1f} TFLOP/s; target >= 50%). host ms: time to issue one encode call. "
          "first s: the first call (the graph capture for graphed rows).")
    print("=== end vision table ===", flush=True)
    result = {
        "device": device_name(device), "torch": torch.__version__, "dtype": args.dtype, "vision": args.vision,
        "layers_built": vis.num_built_layers, "matmul_tflops": matmul, "matmul_n": args.matmul_n,
        "aten_ops_per_layer": None if ops_layer is None else {"top_level": ops_layer[0], "all": ops_layer[1]},
        "rows": rows, "interrupted": interrupted, "wall_s": time.perf_counter() - start,
    }
    emit_json("BENCH_VISION_JSON", result, args.json_out)
    return result


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:])["interrupted"] else 0)
