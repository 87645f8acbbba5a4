"""LLaVA-format JSON/JSONL + an image folder -> one megatron-core indexed multimodal dataset.

The run is split into ``--partitions`` contiguous ranges of input records. Each partition is
processed by one worker process into its own ``.bin/.idx`` plus a skip report, and marked done
by a small JSON file written last; an interrupted run therefore resumes by redoing only the
partitions without a done marker, and several processes or nodes can each take a subset of
partitions (``--partition-index``). When all partitions are done they are merged, in order, into
``<prefix>.bin/.idx`` with megatron-core's builder, the skip reports are concatenated into
``<prefix>.skipped.jsonl``, and ``<prefix>.meta.json`` gets the settings and counts.

Per-sample problems never stop the run: they are skipped with a reason (see ``SkipReason``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import queue
import shutil
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from megatron_croc.data.constants import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_TOKEN_ID,
    ItemMode,
    SkipReason,
    SkipSample,
)
from megatron_croc.data.images import CLIP_MEAN_RGB, TRANSFORMS, process_image_bytes, read_image_file
from megatron_croc.data.records import parse_record
from megatron_croc.data.templates import TEMPLATES, TemplateError, get_template
from megatron_croc.data.tokenizers import TOKENIZER_TYPES, Tokenizer, TokenizerError, build_tokenizer

STORAGES = ("pixels", "encoded")
DEFAULT_RECORDS_PER_PARTITION = 5000


class PreprocessArgumentError(ValueError):
    """A bad argument or input file: the message says which, what is wrong and what to do."""


class PreprocessError(RuntimeError):
    """The run stopped (e.g. a worker process died); finished partitions are kept."""


@dataclass(kw_only=True)
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    template: str
    image_folder: str | None = None
    image_size: int = 336
    image_transform: str = "pad"
    image_storage: str = "pixels"
    seq_length: int | None = None
    num_image_tokens: int = 576
    workers: int = 1
    partitions: int | None = None
    partition_index: list[int] | None = None
    keep_partitions: bool = False
    no_merge: bool = False
    prepend_missing_image_token: bool = False
    jpeg_draft: bool = False
    overwrite: bool = False
    progress_bar: bool = True


@dataclass(kw_only=True)
class PartitionCounts:
    records: int = 0
    samples: int = 0
    with_image: int = 0
    text_only: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    max_expanded_length: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def add(self, other: "PartitionCounts") -> None:
        for name in ("records", "samples", "with_image", "text_only", "tokens", "supervised_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_expanded_length = max(self.max_expanded_length, other.max_expanded_length)
        merged = Counter(self.skipped)
        merged.update(other.skipped)
        self.skipped = dict(sorted(merged.items()))

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass(kw_only=True)
class PreprocessResult:
    output_prefix: str
    complete: bool  # False when only some partitions were asked for (--partition-index)
    counts: PartitionCounts
    processed_partitions: list[int]
    reused_partitions: list[int]
    seconds: float
    process_seconds: float = 0.0  # the partitions (parallel part)
    merge_seconds: float = 0.0  # concatenating them (a sequential copy of the whole .bin)
    meta: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(kw_only=True)
class _Source:
    path: str
    kind: str  # "json" or "jsonl"
    records: list[Any] | None = None  # json: the parsed array
    offsets: np.ndarray | None = None  # jsonl: byte offset of each non-blank line
    line_numbers: np.ndarray | None = None  # jsonl: 1-based line number of each record

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else len(self.offsets)  # type: ignore[arg-type]


def _load_source(path: str) -> _Source:
    p = Path(path)
    if not p.is_file():
        raise PreprocessArgumentError(f"--input {path!r}: no such file; pass LLaVA-format .json or .jsonl files")
    with open(p, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if head.startswith(b"["):
        try:
            with open(p, encoding="utf-8-sig") as f:
                records = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PreprocessArgumentError(
                f"--input {path!r} starts like a JSON array but is not valid JSON ({err}); fix the file, "
                "or convert it to JSON Lines (one record per line) so bad records are skipped one by one"
            ) from None
        return _Source(path=str(p), kind="json", records=records)
    # JSON Lines: index the byte offset of every non-blank line; workers parse their own lines.
    offsets: list[int] = []
    lines: list[int] = []
    pos = 0
    with open(p, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                offsets.append(pos)
                lines.append(lineno)
            pos += len(line)
    return _Source(
        path=str(p), kind="jsonl", offsets=np.asarray(offsets, np.int64), line_numbers=np.asarray(lines, np.int64)
    )


# ---------------------------------------------------------------------------------------------
# The job (module-level so forked workers inherit it without pickling)


@dataclass(kw_only=True)
class _Job:
    cfg: PreprocessConfig
    tokenizer: Tokenizer
    sources: list[_Source]
    source_starts: np.ndarray  # global record index where each source starts
    total_records: int
    num_partitions: int
    parts_dir: str
    progress_queue: Any = None

    def partition_range(self, k: int) -> tuple[int, int]:
        n, p = self.total_records, self.num_partitions
        return (k * n) // p, ((k + 1) * n) // p

    def part_prefix(self, k: int) -> str:
        return os.path.join(self.parts_dir, f"part-{k:05d}-of-{self.num_partitions:05d}")


_JOB: _Job | None = None


def _done_path(part_prefix: str) -> str:
    return part_prefix + ".done.json"


def _image_path(job: _Job, source: _Source, image: str) -> str:
    if os.path.isabs(image):
        return image
    folder = job.cfg.image_folder if job.cfg.image_folder is not None else os.path.dirname(source.path)
    return os.path.join(folder, image)


def _process_record(job: _Job, source: _Source, local: int, raw: Any, fallback_id: str) -> dict[str, Any]:
    cfg = job.cfg
    if source.kind == "jsonl":
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SkipSample(SkipReason.MALFORMED_JSON, str(err)) from None
    conv = parse_record(raw, fallback_id=fallback_id, prepend_missing_image_token=cfg.prepend_missing_image_token)
    template = get_template(cfg.template)
    try:
        rendered = template.render(conv.turns, job.tokenizer)
    except TemplateError as err:
        raise SkipSample(SkipReason.TURN_ORDER, f"{cfg.template}: {err}") from None
    has_image = conv.image is not None
    expanded = len(rendered.tokens) + (cfg.num_image_tokens - 1 if has_image else 0)
    if cfg.seq_length is not None and expanded > cfg.seq_length:
        raise SkipSample(
            SkipReason.TOO_LONG,
            f"{expanded} positions after expanding the image to {cfg.num_image_tokens} tokens > --seq-length {cfg.seq_length}",
        )
    out: dict[str, Any] = {
        "tokens": rendered.tokens,
        "loss_mask": rendered.loss_mask,
        "sample_id": conv.sample_id,
        "expanded": expanded,
    }
    if has_image:
        data = read_image_file(_image_path(job, source, conv.image))  # type: ignore[arg-type]
        # Decode even when keeping the encoded bytes: a bad image must be caught here, not in training.
        pixels = process_image_bytes(data, size=cfg.image_size, transform=cfg.image_transform, jpeg_draft=cfg.jpeg_draft)
        if cfg.image_storage == "pixels":
            out["image_pixels"] = pixels
        else:
            out["image_encoded"] = data
    return out


def _iter_partition(job: _Job, k: int):
    """Yield (source, local index, raw record, fallback id, location) for partition k."""
    start, stop = job.partition_range(k)
    for s_i, source in enumerate(job.sources):
        s0 = int(job.source_starts[s_i])
        s1 = s0 + len(source)
        lo, hi = max(start, s0), min(stop, s1)
        if lo >= hi:
            continue
        name = os.path.basename(source.path)
        if source.kind == "json":
            for g in range(lo, hi):
                local = g - s0
                yield source, local, source.records[local], f"{name}#{local}", {"record": local}  # type: ignore[index]
        else:
            with open(source.path, "rb") as f:
                f.seek(int(source.offsets[lo - s0]))  # type: ignore[index]
                for g in range(lo, hi):
                    local = g - s0
                    line = f.readline()
                    lineno = int(source.line_numbers[local])  # type: ignore[index]
                    while line and not line.strip():  # blank lines are not records
                        line = f.readline()
                    yield source, local, line, f"{name}:{lineno}", {"record": local, "line": lineno}


def _process_partition(k: int, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    job = _JOB
    assert job is not None, "preprocessing job not initialised"
    from megatron_croc.data.indexed import IndexedSampleWriter

    prefix = job.part_prefix(k)
    tmp = prefix + ".tmp"
    writer = IndexedSampleWriter(tmp)
    counts = PartitionCounts()
    skipped = Counter()
    report_lines: list[str] = []
    pending_done = pending_skip = 0
    last_report = time.monotonic()

    def report(force: bool = False) -> None:
        nonlocal pending_done, pending_skip, last_report
        if not (force or pending_done >= 256 or time.monotonic() - last_report > 0.5):
            return
        if pending_done:
            if progress is not None:
                progress(pending_done, pending_skip)
            elif job.progress_queue is not None:
                job.progress_queue.put((pending_done, pending_skip))
        pending_done = pending_skip = 0
        last_report = time.monotonic()

    for source, local, raw, fallback_id, location in _iter_partition(job, k):
        counts.records += 1
        pending_done += 1
        try:
            out = _process_record(job, source, local, raw, fallback_id)
        except SkipSample as skip:
            skipped[skip.reason.value] += 1
            pending_skip += 1
            sid = fallback_id
            if isinstance(raw, dict) and raw.get("id") is not None:
                sid = str(raw["id"])
            elif source.kind == "jsonl":
                try:
                    parsed = json.loads(raw)
                    if isinstance(parsed, dict) and parsed.get("id") is not None:
                        sid = str(parsed["id"])
                except Exception:
                    pass
            report_lines.append(json.dumps(
                {"id": sid, "source": source.path, **location, "reason": skip.reason.value, "detail": skip.detail},
                ensure_ascii=False,
            ))
            report()
            continue
        except Exception as err:  # a bug must not kill a 1.5M-sample run; it is reported instead
            skipped[SkipReason.INTERNAL_ERROR.value] += 1
            pending_skip += 1
            detail = f"{type(err).__name__}: {err} | {traceback.format_exc(limit=3)!r}"
            report_lines.append(json.dumps(
                {"id": fallback_id, "source": source.path, **location, "reason": SkipReason.INTERNAL_ERROR.value,
                 "detail": detail}, ensure_ascii=False,
            ))
            report()
            continue
        writer.add(
            tokens=out["tokens"],
            loss_mask=out["loss_mask"],
            sample_id=out["sample_id"],
            image_pixels=out.get("image_pixels"),
            image_encoded=out.get("image_encoded"),
        )
        counts.samples += 1
        if "image_pixels" in out or "image_encoded" in out:
            counts.with_image += 1
        else:
            counts.text_only += 1
        counts.tokens += len(out["tokens"])
        counts.supervised_tokens += int(out["loss_mask"].sum())
        counts.max_expanded_length = max(counts.max_expanded_length, out["expanded"])
        report()
    report(force=True)
    counts.skipped = dict(sorted(skipped.items()))

    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

    writer.finalize(get_idx_path(tmp))
    os.replace(get_bin_path(tmp), get_bin_path(prefix))
    os.replace(get_idx_path(tmp), get_idx_path(prefix))
    with open(prefix + ".skipped.jsonl.tmp", "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in report_lines))
    os.replace(prefix + ".skipped.jsonl.tmp", prefix + ".skipped.jsonl")
    done = {"partition": k, "range": list(job.partition_range(k)), "counts": asdict(counts)}
    with open(_done_path(prefix) + ".tmp", "w") as f:
        json.dump(done, f)
    os.replace(_done_path(prefix) + ".tmp", _done_path(prefix))  # written last: marks it complete
    return done


def _worker_init(q: Any) -> None:
    assert _JOB is not None
    _JOB.progress_queue = q
    try:
        import torch

        torch.set_num_threads(1)  # one core per worker process
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------
# Driver


def _validate(cfg: PreprocessConfig) -> None:
    if not cfg.inputs:
        raise PreprocessArgumentError("--input: give at least one LLaVA-format .json or .jsonl file")
    if cfg.template not in TEMPLATES:
        raise PreprocessArgumentError(f"--template {cfg.template!r}: choose one of {', '.join(TEMPLATES)}")
    if cfg.image_transform not in TRANSFORMS:
        raise PreprocessArgumentError(f"--image-transform {cfg.image_transform!r}: choose one of {TRANSFORMS}")
    if cfg.image_storage not in STORAGES:
        raise PreprocessArgumentError(f"--image-storage {cfg.image_storage!r}: choose one of {STORAGES}")
    if cfg.image_size < 1:
        raise PreprocessArgumentError(f"--image-size {cfg.image_size}: must be a positive pixel count (e.g. 336)")
    if cfg.num_image_tokens < 1:
        raise PreprocessArgumentError(f"--num-image-tokens {cfg.num_image_tokens}: must be >= 1 (576 for CLIP-L/336)")
    if cfg.seq_length is not None and cfg.seq_length <= cfg.num_image_tokens:
        raise PreprocessArgumentError(
            f"--seq-length {cfg.seq_length} leaves no room for text after {cfg.num_image_tokens} image tokens"
        )
    if cfg.workers < 1:
        raise PreprocessArgumentError(f"--workers {cfg.workers}: must be >= 1")
    if cfg.partitions is not None and cfg.partitions < 1:
        raise PreprocessArgumentError(f"--partitions {cfg.partitions}: must be >= 1")
    if cfg.image_folder is not None and not os.path.isdir(cfg.image_folder):
        raise PreprocessArgumentError(f"--image-folder {cfg.image_folder!r}: no such directory")
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    if os.path.isdir(cfg.output_prefix):
        raise PreprocessArgumentError(
            f"--output-prefix {cfg.output_prefix!r} is a directory; give a file prefix such as {cfg.output_prefix}/train"
        )
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise PreprocessArgumentError(f"--output-prefix: cannot create {out_dir!r}: {err}") from None
    for inp in cfg.inputs:
        if os.path.abspath(inp) in {os.path.abspath(cfg.output_prefix + s) for s in (".bin", ".idx", ".meta.json")}:
            raise PreprocessArgumentError(f"--output-prefix {cfg.output_prefix!r} would overwrite --input {inp!r}")


def _fingerprint(cfg: PreprocessConfig, tokenizer: Tokenizer, sources: list[_Source], total: int) -> dict[str, Any]:
    inputs = []
    for s in sources:
        st = os.stat(s.path)
        inputs.append({"path": os.path.abspath(s.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "records": len(s)})
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "inputs": inputs,
        "total_records": total,
        "image_folder": os.path.abspath(cfg.image_folder) if cfg.image_folder else None,
        "tokenizer_sha256": tokenizer.fingerprint(),
        "template": cfg.template,
        "image_size": cfg.image_size,
        "image_transform": cfg.image_transform,
        "image_storage": cfg.image_storage,
        "seq_length": cfg.seq_length,
        "num_image_tokens": cfg.num_image_tokens,
        "prepend_missing_image_token": cfg.prepend_missing_image_token,
        "jpeg_draft": cfg.jpeg_draft,
    }


def _fingerprint_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _remove_outputs(prefix: str) -> None:
    for suffix in (".bin", ".idx", ".meta.json", ".skipped.jsonl"):
        if os.path.exists(prefix + suffix):
            os.remove(prefix + suffix)


def run_preprocess(cfg: PreprocessConfig, *, log: Callable[[str], None] = print) -> PreprocessResult:
    """Run (or resume) preprocessing; see the module docstring."""
    global _JOB
    t0 = time.monotonic()
    _validate(cfg)
    try:
        tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)
        get_template(cfg.template).check_tokenizer(tokenizer)
    except TokenizerError as err:
        raise PreprocessArgumentError(f"--tokenizer-type/--tokenizer-model/--template: {err}") from None

    sources = [_load_source(p) for p in cfg.inputs]
    sizes = [len(s) for s in sources]
    total = int(sum(sizes))
    if total == 0:
        raise PreprocessArgumentError(f"--input {cfg.inputs}: the inputs hold no records")
    fp = _fingerprint(cfg, tokenizer, sources, total)
    fp_hash = _fingerprint_hash(fp)
    prefix = cfg.output_prefix
    from megatron_croc.data.indexed import merge_indexed, meta_path, skip_report_path

    if os.path.exists(meta_path(prefix)):
        with open(meta_path(prefix)) as f:
            old = json.load(f)
        if old.get("fingerprint") == fp_hash and not cfg.overwrite:
            log(f"{prefix}: already complete with these inputs and settings; nothing to do")
            counts = PartitionCounts(**{k: v for k, v in old["counts"].items() if k in PartitionCounts.__dataclass_fields__})
            return PreprocessResult(output_prefix=prefix, complete=True, counts=counts, processed_partitions=[],
                                    reused_partitions=[], seconds=time.monotonic() - t0, meta=old)
        if not cfg.overwrite:
            raise PreprocessArgumentError(
                f"--output-prefix {prefix!r}: a dataset made with other inputs/settings already exists "
                f"(different: {_diff(old.get('fingerprint_fields', {}), fp)}); pass --overwrite or another prefix"
            )
        _remove_outputs(prefix)

    parts_dir = prefix + ".parts"
    manifest_file = os.path.join(parts_dir, "manifest.json")
    if cfg.overwrite and os.path.isdir(parts_dir):
        shutil.rmtree(parts_dir)
    num_partitions = cfg.partitions
    if os.path.exists(manifest_file):
        with open(manifest_file) as f:
            manifest = json.load(f)
        if manifest["fingerprint"] != fp_hash:
            raise PreprocessArgumentError(
                f"{parts_dir!r} holds an unfinished run with other inputs/settings "
                f"(different: {_diff(manifest.get('fingerprint_fields', {}), fp)}); pass --overwrite to start "
                "over, or rerun with the original arguments to resume it"
            )
        if num_partitions is not None and num_partitions != manifest["partitions"]:
            raise PreprocessArgumentError(
                f"--partitions {num_partitions}: the unfinished run in {parts_dir!r} uses "
                f"{manifest['partitions']} partitions; rerun with --partitions {manifest['partitions']} (or "
                "without it) to resume, or pass --overwrite to start over"
            )
        num_partitions = int(manifest["partitions"])
    else:
        if num_partitions is None:
            num_partitions = max(cfg.workers, math.ceil(total / DEFAULT_RECORDS_PER_PARTITION))
        num_partitions = min(num_partitions, total)
        os.makedirs(parts_dir, exist_ok=True)
        with open(manifest_file + ".tmp", "w") as f:
            json.dump({"fingerprint": fp_hash, "fingerprint_fields": fp, "partitions": num_partitions}, f, indent=1)
        os.replace(manifest_file + ".tmp", manifest_file)

    wanted = list(range(num_partitions))
    if cfg.partition_index is not None:
        bad = [k for k in cfg.partition_index if not 0 <= k < num_partitions]
        if bad:
            raise PreprocessArgumentError(
                f"--partition-index {bad}: out of range for {num_partitions} partitions (0..{num_partitions - 1})"
            )
        wanted = sorted(set(cfg.partition_index))

    job = _Job(
        cfg=cfg,
        tokenizer=tokenizer,
        sources=sources,
        source_starts=np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
        total_records=total,
        num_partitions=num_partitions,
        parts_dir=parts_dir,
    )
    done_parts = [k for k in wanted if os.path.exists(_done_path(job.part_prefix(k)))]
    pending = [k for k in wanted if k not in done_parts]
    pending_records = sum(job.partition_range(k)[1] - job.partition_range(k)[0] for k in pending)
    if done_parts:
        log(f"resuming: {len(done_parts)} of {len(wanted)} partitions already done, {len(pending)} to go")

    _JOB = job
    t_process = time.monotonic()
    try:
        _run_partitions(job, pending, pending_records, cfg)
    finally:
        _JOB = None
    process_seconds = time.monotonic() - t_process

    counts = PartitionCounts()
    for k in wanted:
        with open(_done_path(job.part_prefix(k))) as f:
            counts.add(PartitionCounts(**json.load(f)["counts"]))
    seconds = time.monotonic() - t0
    if cfg.partition_index is not None:
        missing = [k for k in range(num_partitions) if not os.path.exists(_done_path(job.part_prefix(k)))]
        log(f"partitions {wanted} done ({counts.samples} samples, {counts.num_skipped} skipped); "
            + (f"{len(missing)} partitions still to do" if missing else "all partitions done: rerun without "
               "--partition-index to merge"))
        return PreprocessResult(output_prefix=prefix, complete=False, counts=counts, processed_partitions=pending,
                                reused_partitions=done_parts, seconds=seconds, process_seconds=process_seconds)

    # Merge in partition order: output order = input order minus skipped records.
    if counts.samples == 0:
        raise PreprocessError(
            f"every record was skipped ({counts.skipped}); see {parts_dir}/*.skipped.jsonl for the reasons"
        )
    parts = [job.part_prefix(k) for k in range(num_partitions)]
    t_merge = time.monotonic()
    if not cfg.no_merge:
        merge_indexed(parts, prefix)
    merge_seconds = time.monotonic() - t_merge
    with open(skip_report_path(prefix) + ".tmp", "w", encoding="utf-8") as out:
        for p in parts:
            with open(p + ".skipped.jsonl", encoding="utf-8") as f:
                shutil.copyfileobj(f, out)
    os.replace(skip_report_path(prefix) + ".tmp", skip_report_path(prefix))
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "item_modes": {m.name.lower(): int(m) for m in ItemMode},
        "image_token_id": IMAGE_TOKEN_ID,
        "tokenizer": tokenizer.describe(),
        "template": cfg.template,
        "image": {
            "size": cfg.image_size,
            "transform": cfg.image_transform,
            "storage": cfg.image_storage,
            "layout": "CHW",
            "dtype": "uint8",
            "pad_color": list(CLIP_MEAN_RGB),
            "jpeg_draft": cfg.jpeg_draft,
        },
        "seq_length": cfg.seq_length,
        "num_image_tokens": cfg.num_image_tokens,
        "counts": {**asdict(counts), "skipped_total": counts.num_skipped},
        "inputs": fp["inputs"],
        "image_folder": fp["image_folder"],
        "skip_report": os.path.abspath(skip_report_path(prefix)),
        "partitions": num_partitions,
        # --no-merge: the samples stay in the partition files, in this order (paths relative to
        # the prefix's folder); the reader concatenates them.
        "parts": [os.path.relpath(p, os.path.dirname(os.path.abspath(prefix))) for p in parts] if cfg.no_merge else None,
        "fingerprint": fp_hash,
        "fingerprint_fields": fp,
    }
    with open(meta_path(prefix) + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path(prefix) + ".tmp", meta_path(prefix))  # the sidecar marks the dataset complete
    if not cfg.keep_partitions and not cfg.no_merge:
        shutil.rmtree(parts_dir, ignore_errors=True)
    seconds = time.monotonic() - t0
    _print_summary(log, prefix, counts, seconds, process_seconds, pending_records, cfg.no_merge)
    return PreprocessResult(output_prefix=prefix, complete=True, counts=counts, processed_partitions=pending,
                            reused_partitions=done_parts, seconds=seconds, process_seconds=process_seconds,
                            merge_seconds=merge_seconds, meta=meta)


def _run_partitions(job: _Job, pending: list[int], pending_records: int, cfg: PreprocessConfig) -> None:
    if not pending:
        return
    from tqdm import tqdm

    def make_bar() -> Any:
        # No tqdm monitor thread: worker processes are forked and a live thread makes fork unsafe.
        tqdm.monitor_interval = 0
        return tqdm(total=pending_records, unit="sample", dynamic_ncols=True, disable=not cfg.progress_bar,
                    desc="preprocess", smoothing=0.05, mininterval=0.5)

    skipped_total = 0
    bar = None

    def progress(done: int, skipped: int) -> None:
        nonlocal skipped_total
        skipped_total += skipped
        bar.update(done)
        if skipped:
            bar.set_postfix(skipped=skipped_total, refresh=False)

    if cfg.workers == 1 or len(pending) == 1:
        bar = make_bar()
        try:
            for k in pending:
                _process_partition(k, progress)
        finally:
            bar.close()
        return

    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(cfg.workers, len(pending)), mp_context=ctx, initializer=_worker_init, initargs=(q,)
    ) as pool:
        # Submitting forks every worker now, before the progress bar exists.
        futures = {pool.submit(_process_partition, k): k for k in pending}
        remaining = set(futures)
        bar = make_bar()
        try:
            while remaining:
                try:
                    while True:
                        progress(*q.get(timeout=0.1))
                except queue.Empty:
                    pass
                finished = {f for f in remaining if f.done()}
                remaining -= finished
                for f in finished:
                    f.result()  # re-raise a worker failure here
            while True:  # drain the last progress messages
                try:
                    progress(*q.get(timeout=0.05))
                except queue.Empty:
                    break
        except BaseException as err:
            for f in remaining:
                f.cancel()
            if isinstance(err, KeyboardInterrupt):
                raise
            failed = [futures[f] for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
            raise PreprocessError(
                f"partition(s) {failed} failed ({type(err).__name__}: {err}); finished partitions are kept in "
                f"{job.parts_dir!r}: rerun the same command to resume"
            ) from err
        finally:
            bar.close()


def _print_summary(log: Callable[[str], None], prefix: str, counts: PartitionCounts, seconds: float,
                   process_seconds: float, processed: int, no_merge: bool) -> None:
    rate = processed / process_seconds if process_seconds > 0 else float("nan")
    where = f"{prefix}.meta.json (samples in {prefix}.parts/)" if no_merge else f"{prefix}.bin/.idx/.meta.json"
    log(f"wrote {where}: {counts.samples} samples ({counts.with_image} with image, "
        f"{counts.text_only} text-only), {counts.tokens} tokens, max expanded length {counts.max_expanded_length}")
    log(f"skipped {counts.num_skipped} of {counts.records} records"
        + ("".join(f"\n  {reason:28s} {n}" for reason, n in counts.skipped.items()) if counts.skipped else "")
        + (f"\n  report: {prefix}.skipped.jsonl" if counts.skipped else ""))
    log(f"{processed} records processed in {process_seconds:.1f}s ({rate:.1f} samples/s); {seconds:.1f}s in all")


# ---------------------------------------------------------------------------------------------
# Command line


def _parse_index_list(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list like '0,3,5-7'") from None
    if not out:
        raise argparse.ArgumentTypeError("empty partition list")
    return out


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/preprocess_data.py",
        description="Turn LLaVA-format JSON/JSONL conversations and their images into a megatron-core indexed "
        "multimodal dataset (<prefix>.bin/.idx + <prefix>.meta.json + <prefix>.skipped.jsonl). Parallel, "
        "partitioned and resumable: rerun the same command after an interruption.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", action="extend", required=True, metavar="FILE",
                   help="LLaVA-format .json (array) or .jsonl (one record per line) files with 'id', 'image' and "
                   "'conversations'; several files are concatenated in the order given")
    g.add_argument("--image-folder", default=None,
                   help="folder the records' 'image' paths are relative to (default: each input file's folder)")
    g.add_argument("--prepend-missing-image-token", action="store_true",
                   help="for records with an 'image' but no <image> in the text, put the image at the start of "
                   "the first human turn instead of skipping them (reason no_image_token)")
    g = p.add_argument_group("tokenizer and template")
    g.add_argument("--tokenizer-type", required=True, metavar="TYPE",
                   help=f"one of {', '.join(TOKENIZER_TYPES)} (SentencePiece .model file, or HuggingFace folder)")
    g.add_argument("--tokenizer-model", required=True, metavar="PATH",
                   help="SentencePiece tokenizer.model file, or HuggingFace tokenizer folder")
    g.add_argument("--template", required=True, choices=sorted(TEMPLATES),
                   help="conversation template: plain (stage 1 alignment), vicuna_v1 (stages 1.5 and 2), "
                   "llama3, chatml (Qwen)")
    g.add_argument("--seq-length", type=_positive_int, default=None,
                   help="skip (reason too_long) samples longer than this after expanding the image to "
                   "--num-image-tokens positions; default: no limit")
    g.add_argument("--num-image-tokens", type=_positive_int, default=576,
                   help="visual tokens per image in the model (576 for CLIP ViT-L/14 at 336 px)")
    g = p.add_argument_group("images")
    g.add_argument("--image-size", type=_positive_int, default=336, help="square input resolution of the vision encoder")
    g.add_argument("--image-transform", choices=TRANSFORMS, default="pad",
                   help="pad: pad to square with the CLIP mean colour then resize (stages 1.5/2); "
                   "crop: resize the shortest side then centre-crop (stage 1)")
    g.add_argument("--image-storage", choices=STORAGES, default="pixels",
                   help="pixels: store uint8 RGB at --image-size (no decoding during training); encoded: keep the "
                   "original file bytes (smaller; decoded and transformed by the reader)")
    g.add_argument("--jpeg-draft", action="store_true",
                   help="let the JPEG decoder downscale by a power of two first (faster on large JPEGs; pixels "
                   "differ slightly from LLaVA's full-resolution decode)")
    g = p.add_argument_group("output and parallelism")
    g.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="output path prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json, PREFIX.skipped.jsonl; "
                   "partitions live in PREFIX.parts/ until merged")
    g.add_argument("--workers", type=_positive_int, default=1, help="worker processes (one partition each at a time)")
    g.add_argument("--partitions", type=_positive_int, default=None,
                   help="split the records into this many partitions, the unit of parallelism and of resume "
                   f"(default: max(workers, records/{DEFAULT_RECORDS_PER_PARTITION})); fixed once a run has started")
    g.add_argument("--partition-index", type=_parse_index_list, default=None, metavar="LIST",
                   help="process only these partitions (e.g. '0-15' on node 0, '16-31' on node 1) and do not merge; "
                   "a final run without it merges")
    g.add_argument("--keep-partitions", action="store_true", help="keep PREFIX.parts/ after the merge")
    g.add_argument("--no-merge", action="store_true",
                   help="leave the samples in the partition files instead of copying them into PREFIX.bin (saves a "
                   "sequential copy of the whole dataset and half the peak disk); readers open PREFIX as usual")
    g.add_argument("--overwrite", action="store_true",
                   help="discard an existing output or unfinished run made with other inputs/settings")
    g.add_argument("--no-progress-bar", action="store_true", help="no tqdm progress bar (e.g. in batch logs)")
    return p


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(
        inputs=list(args.input),
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        template=args.template,
        image_folder=args.image_folder,
        image_size=args.image_size,
        image_transform=args.image_transform,
        image_storage=args.image_storage,
        seq_length=args.seq_length,
        num_image_tokens=args.num_image_tokens,
        workers=args.workers,
        partitions=args.partitions,
        partition_index=args.partition_index,
        keep_partitions=args.keep_partitions,
        no_merge=args.no_merge,
        prepend_missing_image_token=args.prepend_missing_image_token,
        jpeg_draft=args.jpeg_draft,
        overwrite=args.overwrite,
        progress_bar=not args.no_progress_bar,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run_preprocess(config_from_args(args))
    except PreprocessArgumentError as err:
        parser.error(str(err))
    except PreprocessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: finished partitions are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
