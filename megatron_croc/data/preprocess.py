"""LLaVA-format JSON/JSONL + an image folder -> one megatron-core indexed multimodal dataset.

The run is split into ``--partitions`` contiguous ranges of input records. Each partition is
processed by one worker process into its own ``.bin/.idx`` plus a skip report, and marked done
by a small JSON file written last; an interrupted run therefore resumes by redoing only the
partitions without a done marker, and several processes or nodes can each take a subset of
partitions (``--partition-index``). When all partitions are done they are merged, in order, into
``<prefix>.bin/.idx`` with megatron-core's builder, the skip reports are concatenated into
``<prefix>.skipped.jsonl``, and ``<prefix>.meta.json`` gets the settings and counts.

Per-sample problems never stop the run: they are skipped with a reason (see ``SkipReason``).

Inputs are not trusted (see docs/SECURITY.md): image paths stay inside the image folder and only
regular files of bounded size are read (``ImageFolder``), JSONL lines are read only up to
``--max-record-bytes``, and a record whose text cannot fit ``--seq-length`` is skipped before it
is tokenized. The output prefix is locked for the run (``PREFIX.lock``), and the worker
processes die with the parent.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import hashlib
import json
import math
import multiprocessing
import os
import queue
import shutil
import socket
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
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
from megatron_croc.data.images import (
    CLIP_MEAN_RGB,
    DEFAULT_MAX_IMAGE_BYTES,
    TRANSFORMS,
    ImageFolder,
    process_image_bytes,
)
from megatron_croc.data.inputs import (
    DEFAULT_MAX_RECORD_BYTES,
    InputError,
    Source,
    decode_line,
    load_source,
    leading_id,
)
from megatron_croc.data.locking import LockHeldError, RunLock, describe_holder, read_lock_note
from megatron_croc.data.records import parse_record, record_id
from megatron_croc.data.templates import TEMPLATES, TemplateError, get_template
from megatron_croc.data.tokenizers import TOKENIZER_TYPES, Tokenizer, TokenizerError, build_tokenizer

STORAGES = ("pixels", "encoded")
DEFAULT_RECORDS_PER_PARTITION = 5000


class PreprocessArgumentError(ValueError):
    """A bad argument or input file: the message says which, what is wrong and what to do."""


class PreprocessError(RuntimeError):
    """The run stopped (e.g. a worker process died); finished partitions are kept."""


class OutputBusyError(PreprocessError):
    """Another live run writes the same output prefix (the message names it)."""


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
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    allow_absolute_image_paths: bool = False
    allow_image_symlinks_outside: bool = False
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    dedupe_ids: bool = False
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
    # kept samples whose id an earlier kept sample already has (found when the partitions are
    # merged; with --dedupe-ids they are dropped and counted in skipped["duplicate_id"] instead)
    duplicate_ids: int = 0

    def add(self, other: "PartitionCounts") -> None:
        for name in ("records", "samples", "with_image", "text_only", "tokens", "supervised_tokens", "duplicate_ids"):
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
# The job (module-level so forked workers inherit it without pickling)


@dataclass(kw_only=True)
class _Job:
    cfg: PreprocessConfig
    tokenizer: Tokenizer
    sources: list[Source]
    image_folders: list[ImageFolder]  # one per source (the default folder is the source's own)
    source_starts: np.ndarray  # global record index where each source starts
    total_records: int
    num_partitions: int
    parts_dir: str
    parent_pid: int = 0
    progress_queue: Any = None

    def partition_range(self, k: int) -> tuple[int, int]:
        n, p = self.total_records, self.num_partitions
        return (k * n) // p, ((k + 1) * n) // p

    def part_prefix(self, k: int) -> str:
        return os.path.join(self.parts_dir, f"part-{k:05d}-of-{self.num_partitions:05d}")

    def report_line_order(self, line: str) -> int:
        """Global record index of a skip-report line (they are written in input order)."""
        entry = json.loads(line)
        s_i = next(i for i, s in enumerate(self.sources) if s.path == entry["source"])
        return int(self.source_starts[s_i]) + int(entry["record"])

    def locate(self, record: int) -> str:
        """``file.jsonl:LINE`` (or ``file.json#INDEX``) of global record ``record``."""
        s_i = int(np.searchsorted(self.source_starts, record, side="right")) - 1
        return self.sources[s_i].where(record - int(self.source_starts[s_i]))


_JOB: _Job | None = None

# The per-partition files, beside PREFIX.parts/part-K-of-N.{bin,idx}.
_DONE, _SKIPS, _IDS = ".done.json", ".skipped.jsonl", ".ids.npy"
_IDS_DTYPE = np.dtype([("record", np.int64), ("hash", np.uint64)])


def _done_path(part_prefix: str) -> str:
    return part_prefix + _DONE


def _id_hash(sample_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest(), "little")


def _process_record(job: _Job, s_i: int, record: Any, fallback_id: str) -> dict[str, Any]:
    """One decoded record -> the arrays to store, or ``SkipSample``."""
    cfg = job.cfg
    conv = parse_record(record, fallback_id=fallback_id, prepend_missing_image_token=cfg.prepend_missing_image_token)
    template = get_template(cfg.template)
    has_image = conv.image is not None
    image_positions = cfg.num_image_tokens - 1 if has_image else 0
    try:
        if cfg.seq_length is not None:
            # Before tokenizing: a record whose text alone cannot fit costs milliseconds, not a
            # tokenization of megabytes (see Template.min_length).
            at_least = template.min_length(conv.turns, job.tokenizer) + image_positions
            if at_least > cfg.seq_length:
                raise SkipSample(
                    SkipReason.TOO_LONG,
                    f"at least {at_least} positions (text not tokenized: it cannot fit) > --seq-length {cfg.seq_length}",
                )
        rendered = template.render(conv.turns, job.tokenizer)
    except TemplateError as err:
        raise SkipSample(SkipReason.TURN_ORDER, f"{cfg.template}: {err}") from None
    expanded = len(rendered.tokens) + image_positions
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
        data = job.image_folders[s_i].read(conv.image)  # type: ignore[arg-type]
        # Decode even when keeping the encoded bytes: a bad image must be caught here, not in training.
        pixels = process_image_bytes(data, size=cfg.image_size, transform=cfg.image_transform, jpeg_draft=cfg.jpeg_draft)
        if cfg.image_storage == "pixels":
            out["image_pixels"] = pixels
        else:
            out["image_encoded"] = data
    return out


def _iter_partition(job: _Job, k: int):
    """Yield (source index, local index, raw record) for partition k."""
    start, stop = job.partition_range(k)
    for s_i, source in enumerate(job.sources):
        s0 = int(job.source_starts[s_i])
        lo, hi = max(start, s0), min(stop, s0 + len(source))
        if lo >= hi:
            continue
        raws = source.iter_raw(lo - s0, hi - s0, max_record_bytes=job.cfg.max_record_bytes)
        for local, raw in zip(range(lo - s0, hi - s0), raws):
            yield s_i, local, raw


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
    kept_ids: list[tuple[int, int]] = []  # (global record, id hash) of each stored sample
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

    for s_i, local, raw in _iter_partition(job, k):
        source = job.sources[s_i]
        counts.records += 1
        pending_done += 1
        fallback_id = source.where(local)
        location = source.location(local)
        sid = fallback_id  # until the record names itself: every skip carries the best id known
        try:
            if source.kind == "jsonl":
                try:
                    record = decode_line(raw, line=location["line"], max_record_bytes=job.cfg.max_record_bytes)
                except SkipSample:
                    sid = leading_id(raw) or fallback_id
                    raise
            else:
                record = raw
            sid = record_id(record) or fallback_id
            out = _process_record(job, s_i, record, fallback_id)
        except Exception as err:  # a bug must not kill a 1.5M-sample run either: it is reported
            if isinstance(err, SkipSample):
                reason, detail = err.reason.value, err.detail
            else:
                reason = SkipReason.INTERNAL_ERROR.value
                detail = f"{type(err).__name__}: {err} | {traceback.format_exc(limit=3)!r}"
            skipped[reason] += 1
            pending_skip += 1
            report_lines.append(_skip_line(sid, source.path, location, reason, detail))
            report()
            continue
        writer.add(
            tokens=out["tokens"],
            loss_mask=out["loss_mask"],
            sample_id=out["sample_id"],
            image_pixels=out.get("image_pixels"),
            image_encoded=out.get("image_encoded"),
        )
        kept_ids.append((int(job.source_starts[s_i]) + local, _id_hash(out["sample_id"])))
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
    _write_text(prefix + _SKIPS, "".join(line + "\n" for line in report_lines))
    with open(prefix + _IDS + ".tmp", "wb") as f:
        np.save(f, np.array(kept_ids, dtype=_IDS_DTYPE))
    os.replace(prefix + _IDS + ".tmp", prefix + _IDS)
    done = {"partition": k, "range": list(job.partition_range(k)), "counts": asdict(counts)}
    _write_text(_done_path(prefix), json.dumps(done))  # written last: marks it complete
    return done


def _skip_line(sample_id: str, source: str, location: dict[str, int], reason: str, detail: str) -> str:
    return json.dumps({"id": sample_id, "source": source, **location, "reason": reason, "detail": detail},
                      ensure_ascii=False)


def _write_text(path: str, text: str) -> None:
    """Write ``path`` atomically (a temporary file renamed over it). Text that a record carried
    could hold lone surrogates: they are written escaped rather than failing the run."""
    with open(path + ".tmp", "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _worker_init(q: Any) -> None:
    assert _JOB is not None
    _exit_with_parent(_JOB.parent_pid)
    _JOB.progress_queue = q
    try:
        import torch

        torch.set_num_threads(1)  # one core per worker process
    except Exception:
        pass


def _exit_with_parent(parent_pid: int) -> None:
    """Make this worker die with the run's parent process (even on SIGKILL of the parent), so
    no orphan keeps writing partitions that a new run is about to redo.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` through libc (no library wraps it in our stack);
    elsewhere a daemon thread that notices the re-parenting within a second.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before the prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    import threading

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


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
    for flag, value in (("--workers", cfg.workers), ("--partitions", cfg.partitions),
                        ("--max-image-bytes", cfg.max_image_bytes), ("--max-record-bytes", cfg.max_record_bytes)):
        if value is not None and value < 1:
            raise PreprocessArgumentError(f"{flag} {value}: must be >= 1")
    if cfg.overwrite and cfg.partition_index is not None:
        raise PreprocessArgumentError("--overwrite with --partition-index: other nodes may be using the partitions; "
                                      "start over in one run without --partition-index")
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


def _fingerprint(cfg: PreprocessConfig, tokenizer: Tokenizer, sources: list[Source], total: int) -> dict[str, Any]:
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
        "max_image_bytes": cfg.max_image_bytes,
        "allow_absolute_image_paths": cfg.allow_absolute_image_paths,
        "allow_image_symlinks_outside": cfg.allow_image_symlinks_outside,
        "max_record_bytes": cfg.max_record_bytes,
        "dedupe_ids": cfg.dedupe_ids,
    }


def _fingerprint_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _remove_outputs(prefix: str) -> None:
    for suffix in (".bin", ".idx", ".meta.json", ".skipped.jsonl"):
        if os.path.exists(prefix + suffix):
            os.remove(prefix + suffix)


def lock_path(prefix: str) -> str:
    return prefix + ".lock"


class _OutputLocks:
    """The locks of one run on its output prefix (see ``megatron_croc.data.locking``): the
    prefix lock (exclusive; shared for a ``--partition-index`` run, which also locks each of its
    partitions). Released together, on any exit."""

    def __init__(self, prefix: str, log: Callable[[str], None]) -> None:
        self.prefix, self.log = prefix, log
        self.locks: list[RunLock] = []

    def take_prefix(self, *, shared: bool) -> None:
        lock = RunLock(lock_path(self.prefix), shared=shared, what=f"--output-prefix {self.prefix!r}")
        try:
            stale = lock.acquire()
        except LockHeldError as err:
            holders = self._partition_holders()
            raise OutputBusyError(
                (f"--output-prefix {self.prefix!r} is being written by --partition-index run(s): "
                 + "; ".join(holders) if holders and not shared else str(err))
                + ". Wait for it to finish, or use another --output-prefix (if that run is gone, its lock "
                "is released with it: rerun)"
            ) from None
        self.locks.append(lock)
        self._note_stale(stale)

    def take_partitions(self, parts: list[tuple[int, str]]) -> None:
        for k, part_prefix in parts:
            lock = RunLock(part_prefix + ".lock", what=f"partition {k} of {self.prefix!r}")
            try:
                stale = lock.acquire()
            except LockHeldError as err:
                raise OutputBusyError(f"{err}; give this run other --partition-index values") from None
            self.locks.append(lock)
            self._note_stale(stale)

    def _partition_holders(self) -> list[str]:
        notes = {}
        for path in sorted(glob.glob(glob.escape(self.prefix + ".parts") + "/*.lock")):
            note = read_lock_note(path)
            if note:
                notes[(note.get("host"), note.get("pid"))] = describe_holder(note)
        return list(notes.values())

    def _note_stale(self, stale: dict[str, Any] | None) -> None:
        if stale:
            self.log(f"taking over a lock left by a run that is gone ({describe_holder(stale)}); its unfinished "
                     "partitions are redone")

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()


def run_preprocess(cfg: PreprocessConfig, *, log: Callable[[str], None] = print) -> PreprocessResult:
    """Run (or resume) preprocessing; see the module docstring."""
    _validate(cfg)
    try:
        tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)
        get_template(cfg.template).check_tokenizer(tokenizer)
    except TokenizerError as err:
        raise PreprocessArgumentError(f"--tokenizer-type/--tokenizer-model/--template: {err}") from None
    locks = _OutputLocks(cfg.output_prefix, log)
    try:
        # Before anything under the prefix is read or written: a second run is refused here.
        locks.take_prefix(shared=cfg.partition_index is not None)
        return _run_locked(cfg, tokenizer, locks, log)
    finally:
        locks.release()


def _write_manifest(manifest_file: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Create the manifest unless it exists (several --partition-index runs may start at once:
    the first one's wins, atomically) and return the one on disk."""
    tmp = f"{manifest_file}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    try:
        os.link(tmp, manifest_file)
    except FileExistsError:
        pass
    finally:
        os.remove(tmp)
    with open(manifest_file) as f:
        return json.load(f)


def _run_locked(cfg: PreprocessConfig, tokenizer: Tokenizer, locks: _OutputLocks,
                log: Callable[[str], None]) -> PreprocessResult:
    global _JOB
    t0 = time.monotonic()
    try:
        sources = [load_source(p) for p in cfg.inputs]
    except InputError as err:
        raise PreprocessArgumentError(str(err)) from None
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
    if not os.path.exists(manifest_file):
        if num_partitions is None:
            num_partitions = max(cfg.workers, math.ceil(total / DEFAULT_RECORDS_PER_PARTITION))
        num_partitions = min(num_partitions, total)
        os.makedirs(parts_dir, exist_ok=True)
        manifest = _write_manifest(manifest_file, {"fingerprint": fp_hash, "fingerprint_fields": fp,
                                                   "partitions": num_partitions})
        num_partitions = cfg.partitions  # whatever was asked, it is checked against the manifest below
    else:
        with open(manifest_file) as f:
            manifest = json.load(f)
    if manifest["fingerprint"] != fp_hash:
        raise PreprocessArgumentError(
            f"{parts_dir!r} holds an unfinished run with other inputs/settings "
            f"(different: {_diff(manifest.get('fingerprint_fields', {}), fp)}); pass --overwrite to start "
            "over, or rerun with the original arguments to resume it"
        )
    if num_partitions is not None and min(num_partitions, total) != manifest["partitions"]:
        raise PreprocessArgumentError(
            f"--partitions {num_partitions}: the unfinished run in {parts_dir!r} uses "
            f"{manifest['partitions']} partitions; rerun with --partitions {manifest['partitions']} (or "
            "without it) to resume, or pass --overwrite to start over"
        )
    num_partitions = int(manifest["partitions"])

    wanted = list(range(num_partitions))
    if cfg.partition_index is not None:
        bad = [k for k in cfg.partition_index if not 0 <= k < num_partitions]
        if bad:
            raise PreprocessArgumentError(
                f"--partition-index {bad}: out of range for {num_partitions} partitions (0..{num_partitions - 1})"
            )
        wanted = sorted(set(cfg.partition_index))

    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    job = _Job(
        cfg=cfg,
        tokenizer=tokenizer,
        sources=sources,
        image_folders=[
            ImageFolder(cfg.image_folder if cfg.image_folder is not None else os.path.dirname(os.path.abspath(s.path)),
                        allow_absolute=cfg.allow_absolute_image_paths,
                        allow_symlinks_outside=cfg.allow_image_symlinks_outside, max_bytes=cfg.max_image_bytes)
            for s in sources
        ],
        source_starts=starts,
        total_records=total,
        num_partitions=num_partitions,
        parts_dir=parts_dir,
        parent_pid=os.getpid(),
    )
    if cfg.partition_index is not None:
        # Several nodes share the prefix: each locks the partitions it was given.
        locks.take_partitions([(k, job.part_prefix(k)) for k in wanted if not os.path.exists(_done_path(job.part_prefix(k)))])
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
    duplicates = _find_duplicates(job, parts)
    counts.duplicate_ids = len(duplicates.pairs)
    keep: list[np.ndarray | None] = [None] * num_partitions
    dedupe_lines: dict[int, list[str]] = {}
    if cfg.dedupe_ids and duplicates.pairs:
        keep, dedupe_lines = _apply_dedupe(job, parts, duplicates, counts)
    t_merge = time.monotonic()
    stored = list(parts)
    if not cfg.no_merge:
        merge_indexed(parts, prefix, keep=keep)
    else:
        for k, mask in enumerate(keep):
            if mask is not None:  # the unmerged output gets a filtered copy; the partition stays as it was
                stored[k] = parts[k] + ".dedup"
                merge_indexed([parts[k]], stored[k], keep=[mask])
    merge_seconds = time.monotonic() - t_merge
    with open(skip_report_path(prefix) + ".tmp", "w", encoding="utf-8") as out:
        for k, p in enumerate(parts):
            with open(p + _SKIPS, encoding="utf-8") as f:
                if k in dedupe_lines:  # in input order with the partition's own skips
                    lines = sorted(f.read().splitlines() + dedupe_lines[k], key=job.report_line_order)
                    out.write("".join(line + "\n" for line in lines))
                else:
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
        # kept samples that repeat an earlier sample's id (kept unless --dedupe-ids), a few of them
        "duplicate_id_examples": duplicates.examples(job, dropped=cfg.dedupe_ids),
        "inputs": fp["inputs"],
        "image_folder": fp["image_folder"],
        "skip_report": os.path.abspath(skip_report_path(prefix)),
        "partitions": num_partitions,
        # --no-merge: the samples stay in the partition files, in this order (paths relative to
        # the prefix's folder); the reader concatenates them.
        "parts": [os.path.relpath(p, os.path.dirname(os.path.abspath(prefix))) for p in stored] if cfg.no_merge else None,
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
    if duplicates.pairs:
        _print_duplicates(log, job, duplicates, dropped=cfg.dedupe_ids)
    return PreprocessResult(output_prefix=prefix, complete=True, counts=counts, processed_partitions=pending,
                            reused_partitions=done_parts, seconds=seconds, process_seconds=process_seconds,
                            merge_seconds=merge_seconds, meta=meta)


# ---------------------------------------------------------------------------------------------
# Duplicate ids (found across all partitions once they are done)


@dataclass(kw_only=True)
class _Duplicates:
    """Stored samples whose id an earlier stored sample already has, in input order."""

    records: np.ndarray  # global record index of every stored sample, in output order
    part_starts: np.ndarray  # output position where each partition's samples start
    pairs: list[tuple[int, int, str]]  # (output position, position of the first with that id, id)

    def examples(self, job: _Job, *, dropped: bool, limit: int = 10) -> list[dict[str, str]]:
        return [{"id": sid, "first": job.locate(int(self.records[first])), "again": job.locate(int(self.records[pos])),
                 "dropped": dropped} for pos, first, sid in self.pairs[:limit]]


def _find_duplicates(job: _Job, parts: list[str]) -> _Duplicates:
    """Compare the id hashes the partitions recorded; read the ids back only where hashes repeat."""
    from megatron_croc.data.indexed import read_summaries

    tables = [np.load(p + _IDS) for p in parts]
    lengths = np.asarray([len(t) for t in tables], dtype=np.int64)
    part_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    table = np.concatenate(tables) if tables else np.zeros(0, _IDS_DTYPE)
    _, inverse, group_sizes = np.unique(table["hash"], return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(group_sizes[inverse] > 1)  # ascending: input order
    pairs: list[tuple[int, int, str]] = []
    if len(repeated):
        owner = np.searchsorted(part_starts, repeated, side="right") - 1
        ids: dict[int, str] = {}
        for k in np.unique(owner):
            positions = repeated[owner == k]
            for pos, summary in zip(positions, read_summaries(parts[k], positions - part_starts[k])):
                ids[int(pos)] = summary.sample_id
        first_of: dict[str, int] = {}
        for pos in repeated:
            sid = ids[int(pos)]
            if sid in first_of:
                pairs.append((int(pos), first_of[sid], sid))
            else:
                first_of[sid] = int(pos)
    return _Duplicates(records=table["record"], part_starts=part_starts, pairs=pairs)


def _apply_dedupe(job: _Job, parts: list[str], duplicates: _Duplicates,
                  counts: PartitionCounts) -> tuple[list[np.ndarray | None], dict[int, list[str]]]:
    """--dedupe-ids: which samples of each partition to keep, the skip-report lines of the dropped
    ones (by partition), and the counts without them."""
    from megatron_croc.data.indexed import read_summaries

    keep: list[np.ndarray | None] = [None] * len(parts)
    lines: dict[int, list[str]] = {}
    by_part: dict[int, list[tuple[int, int, str]]] = {}
    for pos, first, sid in duplicates.pairs:
        k = int(np.searchsorted(duplicates.part_starts, pos, side="right")) - 1
        by_part.setdefault(k, []).append((pos, first, sid))
    for k, drops in by_part.items():
        local = np.asarray([pos for pos, _, _ in drops]) - duplicates.part_starts[k]
        n = (duplicates.part_starts[k + 1] if k + 1 < len(parts) else len(duplicates.records)) - duplicates.part_starts[k]
        mask = np.ones(int(n), dtype=bool)
        mask[local] = False
        keep[k] = mask
        for (pos, first, sid), summary in zip(drops, read_summaries(parts[k], local)):
            counts.samples -= 1
            counts.tokens -= summary.tokens
            counts.supervised_tokens -= summary.supervised_tokens
            if summary.has_image:
                counts.with_image -= 1
            else:
                counts.text_only -= 1
            record = int(duplicates.records[pos])
            s_i = int(np.searchsorted(job.source_starts, record, side="right")) - 1
            source = job.sources[s_i]
            location = source.location(record - int(job.source_starts[s_i]))
            lines.setdefault(k, []).append(_skip_line(
                sid, source.path, location, SkipReason.DUPLICATE_ID.value,
                f"the sample from {job.locate(int(duplicates.records[first]))} has the same id and is kept (--dedupe-ids)",
            ))
    counts.skipped = dict(sorted({**counts.skipped, SkipReason.DUPLICATE_ID.value: len(duplicates.pairs)}.items()))
    counts.duplicate_ids = 0  # none is left in the output
    counts.max_expanded_length = _max_expanded_length(parts, keep, job.cfg.num_image_tokens)
    return keep, lines


def _max_expanded_length(parts: list[str], keep: list[np.ndarray | None], num_image_tokens: int) -> int:
    """The longest kept sample (with its image expanded), from the partitions' indexes alone."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    longest = 0
    for part, mask in zip(parts, keep):
        if os.path.getsize(part + ".bin") == 0:
            continue
        index = IndexedDataset(part, multimodal=True).index
        docs = np.asarray(index.document_indices, dtype=np.int64)
        lengths = np.asarray(index.sequence_lengths, dtype=np.int64)[docs[:-1]]
        expanded = lengths + (docs[1:] - docs[:-1] == 4) * (num_image_tokens - 1)
        if mask is not None:
            expanded = expanded[mask]
        if len(expanded):
            longest = max(longest, int(expanded.max()))
    return longest


def _print_duplicates(log: Callable[[str], None], job: _Job, duplicates: _Duplicates, *, dropped: bool) -> None:
    n = len(duplicates.pairs)
    examples = ", ".join(f"{e['id']!r} at {e['first']} and {e['again']}" for e in duplicates.examples(job, dropped=dropped, limit=3))
    if dropped:
        log(f"dropped {n} samples whose id an earlier sample already has (--dedupe-ids; reason duplicate_id in "
            f"the skip report), e.g. {examples}")
    else:
        log(f"warning: {n} samples repeat the id of an earlier sample and are kept (counts.duplicate_ids and "
            f"duplicate_id_examples in the sidecar; --dedupe-ids drops them), e.g. {examples}")


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
                   help="folder the records' 'image' paths are relative to (default: each input file's folder); "
                   "a path that leads outside it is skipped (image_outside_folder) without being opened")
    g.add_argument("--dedupe-ids", action="store_true",
                   help="drop a sample whose id an earlier sample already has (reason duplicate_id in the skip "
                   "report); without it such samples are kept and counted (counts.duplicate_ids in the sidecar)")
    g.add_argument("--max-record-bytes", type=_positive_int, default=DEFAULT_MAX_RECORD_BYTES, metavar="N",
                   help="skip (reason record_too_large) JSONL lines longer than this without reading them")
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
    g.add_argument("--max-image-bytes", type=_positive_int, default=DEFAULT_MAX_IMAGE_BYTES, metavar="N",
                   help="skip (reason image_too_large) image files larger than this without reading them")
    g.add_argument("--allow-absolute-image-paths", action="store_true",
                   help="accept absolute 'image' paths in the records (default: skipped as image_outside_folder); "
                   "only for records you trust: any regular file the run can read may then be stored")
    g.add_argument("--allow-image-symlinks-outside", action="store_true",
                   help="follow symlinks inside --image-folder that point outside it (e.g. to shared storage); "
                   "default: skipped as image_outside_folder. '..' never leaves the folder")
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
        max_image_bytes=args.max_image_bytes,
        allow_absolute_image_paths=args.allow_absolute_image_paths,
        allow_image_symlinks_outside=args.allow_image_symlinks_outside,
        max_record_bytes=args.max_record_bytes,
        dedupe_ids=args.dedupe_ids,
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
