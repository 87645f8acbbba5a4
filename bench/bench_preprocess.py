#!/usr/bin/env python
"""Preprocessing throughput: samples/s per worker, on the demo set and on real-size JPEGs.

Runs tools/preprocess_data.py's pipeline (``run_preprocess``) in this process and in worker
processes, then projects the wall time of the 1.5M-sample comprehension stage on a 64-core node.
The baseline is the per-image work LLaVA's loader does for every sample of every epoch (PIL
decode, expand2square, transformers' CLIPImageProcessor): what preprocessing pays once.

    python bench/bench_preprocess.py                 # ~1-2 minutes on 2 cores
    python bench/bench_preprocess.py --photo-samples 1000 --workers 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(cfg_kwargs: dict, out: Path) -> dict:
    """One preprocessing run: overall rate, rate of the parallel part, merge bandwidth."""
    from megatron_croc.data.preprocess import PreprocessConfig, run_preprocess

    for p in out.parent.glob(out.name + "*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    t = time.perf_counter()
    res = run_preprocess(PreprocessConfig(output_prefix=str(out), progress_bar=False, **cfg_kwargs), log=lambda m: None)
    dt = time.perf_counter() - t
    size = os.path.getsize(str(out) + ".bin") if os.path.exists(str(out) + ".bin") else 0
    return {"rate": res.counts.records / dt, "process_rate": res.counts.records / res.process_seconds,
            "merge_mb_s": size / 1e6 / res.merge_seconds if res.merge_seconds > 0 else float("nan"),
            "bytes_per_sample": size / max(res.counts.samples, 1)}


def baseline_llava_images(json_path: str, folder: str, size: int, limit: int) -> float:
    """LLaVA's per-sample image path: open, RGB, expand2square(mean), CLIPImageProcessor -> float tensor."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from megatron_croc.data.constants import CLIP_MEAN, CLIP_STD
    from megatron_croc.data.images import CLIP_MEAN_RGB, pad_to_square

    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    records = json.loads(Path(json_path).read_text())[:limit]
    t = time.perf_counter()
    for r in records:
        img = Image.open(os.path.join(folder, r["image"])).convert("RGB")
        proc(images=pad_to_square(img, CLIP_MEAN_RGB), return_tensors="pt")["pixel_values"]
    return len(records) / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-samples", type=int, default=2000)
    ap.add_argument("--photo-samples", type=int, default=240, help="640x480 JPEG samples")
    ap.add_argument("--image-size", type=int, default=336)
    ap.add_argument("--workers", default="1,2", help="worker counts to measure")
    ap.add_argument("--project-samples", type=int, default=1_500_000)
    ap.add_argument("--project-cores", type=int, default=64)
    ap.add_argument("--work-dir", default=None, help="default: a temporary folder, removed at the end")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    # One thread per process on both sides: a per-core comparison (transformers' image processor
    # would otherwise spread its float ops over every core of the machine; DataLoader workers and
    # our preprocessing workers run single-threaded anyway).
    import torch

    torch.set_num_threads(1)

    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import cost outside the timings)

    from megatron_croc.data.demo import train_demo_tokenizer, write_demo_source, write_photo_like_source

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_pre_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; python {platform.python_version()}")
    t = time.perf_counter()
    demo_json, demo_folder = write_demo_source(work / "demo", num_samples=args.demo_samples, seed=0)
    photo_json, photo_folder = write_photo_like_source(work / "photo", num_samples=args.photo_samples, seed=0)
    tok = train_demo_tokenizer(json.loads(Path(demo_json).read_text()), work / "tok.model")
    jpeg_kb = sum(p.stat().st_size for p in (work / "photo" / "images").iterdir()) / args.photo_samples / 1024
    print(f"inputs generated in {time.perf_counter() - t:.1f}s: {args.demo_samples} demo PNGs (64x64), "
          f"{args.photo_samples} JPEGs 640x480 (mean {jpeg_kb:.0f} KB)")

    common = dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=tok, template="vicuna_v1")
    rows = []
    for w in workers:
        r = run(dict(inputs=[demo_json], image_folder=demo_folder, image_size=32, seq_length=256,
                     num_image_tokens=16, workers=w, **common), work / "out" / "demo")
        rows.append(("demo set, 64px PNG -> 32px pixels", w, r))
    photo = dict(inputs=[photo_json], image_folder=photo_folder, image_size=args.image_size, seq_length=2048,
                 num_image_tokens=576, **common)
    photo_runs = {}
    for w in workers:
        photo_runs[w] = run(dict(workers=w, **photo), work / "out" / "photo")
        rows.append((f"640x480 JPEG -> {args.image_size}px pixels (pad)", w, photo_runs[w]))
    rows.append(("  same, --jpeg-draft", 1, run(dict(workers=1, jpeg_draft=True, **photo), work / "out" / "pd")))
    rows.append(("  same, --image-storage encoded", 1,
                 run(dict(workers=1, image_storage="encoded", **photo), work / "out" / "pe")))
    base = baseline_llava_images(photo_json, photo_folder, args.image_size, args.photo_samples)

    print()
    print(f"{'preprocessing run':40s} {'workers':>7s} {'samples/s':>10s} {'per worker':>10s} "
          f"{'partitions':>10s} {'per worker':>10s} {'merge MB/s':>10s}")
    print(f"{'':40s} {'':7s} {'(overall)':>10s} {'':10s} {'phase /s':>10s}")
    for name, w, r in rows:
        print(f"{name:40s} {w:7d} {r['rate']:10.1f} {r['rate'] / w:10.1f} {r['process_rate']:10.1f} "
              f"{r['process_rate'] / w:10.1f} {r['merge_mb_s']:10.0f}")
    print(f"{'baseline: LLaVA image path per sample':40s} {1:7d} {base:10.1f} {base:10.1f}")
    w1 = workers[0]
    per_worker = photo_runs[w1]["process_rate"] / w1
    print(f"\nours (whole pipeline: JSON, template, tokenizer, image, write) vs LLaVA's image path alone, "
          f"one core: {photo_runs[w1]['rate'] / w1 / base:.2f}x  (LLaVA pays its part every epoch, ours once)")
    eff = 1.0
    if len(workers) > 1:
        wn = workers[-1]
        eff = min(1.0, photo_runs[wn]["process_rate"] / (wn / w1 * photo_runs[w1]["process_rate"]))
        print(f"partition phase {w1}->{wn} workers: {photo_runs[wn]['process_rate'] / photo_runs[w1]['process_rate']:.2f}x "
              f"({eff:.0%} per-worker efficiency; this machine has {os.cpu_count()} cores)")
    node_rate = per_worker * args.project_cores * eff
    n = args.project_samples
    bps = photo_runs[w1]["bytes_per_sample"]
    merge_bw = max(r["merge_mb_s"] for r in photo_runs.values())
    t_proc = n / node_rate
    t_merge = n * bps / 1e6 / merge_bw
    print(f"\nprojection for {n:,} samples at {args.image_size}px on {args.project_cores} cores "
          f"(per-worker rate x cores x {eff:.0%}):\n"
          f"  partitions: {node_rate:,.0f} samples/s -> {t_proc / 60:.0f} min, writing {node_rate * bps / 1e6:,.0f} MB/s\n"
          f"  merge (sequential copy at the {merge_bw:,.0f} MB/s measured here): {t_merge / 60:.0f} min; "
          f"--no-merge skips it\n"
          f"  total {(t_proc + t_merge) / 60:.0f} min ({t_proc / 60:.0f} min with --no-merge); "
          f"{n * bps / 1e9:,.0f} GB on disk ({bps / 1e3:.0f} KB/sample as pixels)")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
