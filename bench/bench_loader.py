#!/usr/bin/env python
"""Loader throughput: our indexed reader vs. a LLaVA-style JSON + JPEG loader, side by side.

Ours: ``build_data_loader`` over the preprocessed ``.bin/.idx`` (uint8 pixels, pre-tokenized,
collated to the fixed ``--seq-length`` with the image expanded to 576 positions).
Baseline: what the paper's (LLaVA's) ``LazySupervisedDataset`` does per sample at training time:
read the record from the JSON loaded at start-up, open and decode the JPEG, expand2square with
the CLIP mean, transformers' ``CLIPImageProcessor`` (resize, crop, normalise to float32),
apply the conversation template and tokenize; then pad the batch.

Both read the same 640x480 JPEG set (page-cached: this measures CPU cost, not disk).

    python bench/bench_loader.py                      # ~1 minute on 2 cores
    python bench/bench_loader.py --workers 0,4,8 --samples 4096
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

import torch  # noqa: E402


class LlavaStyleDataset(torch.utils.data.Dataset):
    """The baseline: JSON records decoded and processed at every access (LLaVA's way)."""

    def __init__(self, json_path: str, folder: str, tokenizer, template: str, size: int) -> None:
        from transformers import CLIPImageProcessor

        from megatron_croc.data.constants import CLIP_MEAN, CLIP_STD

        self.records = json.loads(Path(json_path).read_text())
        self.folder = folder
        self.tokenizer = tokenizer
        self.template = template
        self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        from megatron_croc.data.images import CLIP_MEAN_RGB, pad_to_square
        from megatron_croc.data.records import parse_record
        from megatron_croc.data.templates import get_template

        r = self.records[i % len(self.records)]
        conv = parse_record(r, fallback_id=str(i))
        rendered = get_template(self.template).render(conv.turns, self.tokenizer)
        image = Image.open(os.path.join(self.folder, r["image"])).convert("RGB")
        image = pad_to_square(image, CLIP_MEAN_RGB)
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        ids = torch.from_numpy(rendered.tokens.astype("int64"))
        labels = torch.where(torch.from_numpy(rendered.loss_mask.astype(bool)), ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "labels": labels, "image": pixels}


def llava_collate(items: list[dict]) -> dict:
    ids = torch.nn.utils.rnn.pad_sequence([x["input_ids"] for x in items], batch_first=True, padding_value=0)
    labels = torch.nn.utils.rnn.pad_sequence([x["labels"] for x in items], batch_first=True, padding_value=-100)
    return {"input_ids": ids, "labels": labels, "attention_mask": ids.ne(0), "images": torch.stack([x["image"] for x in items])}


def time_iter(it, batches: int, batch_size: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=256, help="distinct 640x480 JPEG samples (cycled)")
    ap.add_argument("--samples", type=int, default=512, help="samples timed per configuration")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--workers", default="0,2", help="DataLoader worker counts to measure")
    ap.add_argument("--image-size", type=int, default=336)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    # One thread per process on both sides: a per-core comparison (transformers' image processor
    # would otherwise spread its float ops over every core of the machine; DataLoader workers and
    # our preprocessing workers run single-threaded anyway).
    import torch

    torch.set_num_threads(1)

    import megatron.core.datasets.indexed_dataset  # noqa: F401

    from megatron_croc.data.dataset import DataLoaderConfig, build_data_loader
    from megatron_croc.data.demo import generate_records, train_demo_tokenizer, write_photo_like_source
    from megatron_croc.data.preprocess import PreprocessConfig, run_preprocess
    from megatron_croc.data.tokenizers import build_tokenizer

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_loader_"))
    work.mkdir(parents=True, exist_ok=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores; python {platform.python_version()}, torch {torch.__version__}")
    photo_json, folder = write_photo_like_source(work / "photo", num_samples=args.photos, seed=0)
    tok_path = train_demo_tokenizer([r for r, _ in generate_records(500, seed=0)], work / "tok.model")
    tok = build_tokenizer("SentencePieceTokenizer", tok_path)
    prefixes = {}
    for storage in ("pixels", "encoded"):
        t = time.perf_counter()
        run_preprocess(PreprocessConfig(
            inputs=[photo_json], image_folder=folder, output_prefix=str(work / f"ds_{storage}"),
            tokenizer_type="SentencePieceTokenizer", tokenizer_model=tok_path, template="vicuna_v1",
            image_size=args.image_size, seq_length=args.seq_length, num_image_tokens=576,
            image_storage=storage, workers=1, progress_bar=False), log=lambda m: None)
        prefixes[storage] = str(work / f"ds_{storage}")
        print(f"one-time preprocessing ({storage}): {args.photos / (time.perf_counter() - t):.1f} samples/s, "
              f"{os.path.getsize(prefixes[storage] + '.bin') / args.photos / 1024:.0f} KB/sample")

    mbs = args.micro_batch_size
    batches = max(1, args.samples // mbs)
    results = []
    for w in [int(x) for x in args.workers.split(",")]:
        for storage in ("pixels", "encoded"):
            cfg = DataLoaderConfig(data_path=[(None, prefixes[storage])], seq_length=args.seq_length, num_image_tokens=576,
                                   micro_batch_size=mbs, global_batch_size=mbs, seed=0, num_workers=w)
            rate = time_iter(iter(build_data_loader(cfg, dp_rank=0, dp_size=1)), batches, mbs)
            results.append((f"ours, indexed ({storage})", w, rate))
        base_ds = LlavaStyleDataset(photo_json, folder, tok, "vicuna_v1", args.image_size)
        sampler = torch.utils.data.RandomSampler(base_ds, replacement=True, num_samples=10**9,
                                                 generator=torch.Generator().manual_seed(0))
        loader = torch.utils.data.DataLoader(base_ds, batch_size=mbs, sampler=sampler, num_workers=w,
                                             collate_fn=llava_collate)
        results.append(("baseline, LLaVA-style JSON + JPEG", w, time_iter(iter(loader), batches, mbs)))

    print(f"\n{'loader (micro-batch %d, seq %d, %dpx)' % (mbs, args.seq_length, args.image_size):44s} "
          f"{'workers':>7s} {'samples/s':>10s} {'vs baseline':>11s}")
    base = {w: r for name, w, r in results if name.startswith("baseline")}
    for name, w, rate in results:
        print(f"{name:44s} {w:7d} {rate:10.1f} {rate / base[w]:10.1f}x")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
