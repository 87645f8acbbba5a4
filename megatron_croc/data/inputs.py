"""LLaVA-format input files: indexed without holding them, read record by record within bounds.

A ``.jsonl`` file is indexed in fixed-size chunks (the byte offset, length and line number of
every non-blank line), so a gigabyte-long line costs no memory to index; a line longer than
``max_record_bytes`` is never read, only reported. Each line is decoded as strict UTF-8 and
parsed as JSON here, with errors that say which line and which byte. A ``.json`` array is
parsed whole up front (that is the format: convert huge arrays to JSON Lines).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from megatron_croc.data.constants import SkipReason, SkipSample

DEFAULT_MAX_RECORD_BYTES = 16 * 2**20  # LLaVA records are a few KB; 16 MiB is far above any real one
_INDEX_CHUNK = 2**20
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True


class InputError(ValueError):
    """An input file cannot be used at all (the message names it and says what to do)."""


@dataclass(kw_only=True)
class Oversized:
    """A JSONL line that was not read because it is longer than ``--max-record-bytes``."""

    nbytes: int
    head: bytes  # its first bytes, for the record's id


@dataclass(kw_only=True)
class Source:
    path: str
    kind: str  # "json" or "jsonl"
    records: list[Any] | None = None  # json: the parsed array
    offsets: np.ndarray | None = None  # jsonl: byte offset of each non-blank line
    lengths: np.ndarray | None = None  # jsonl: its length in bytes (without the newline)
    line_numbers: np.ndarray | None = None  # jsonl: 1-based line number of each record

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else len(self.offsets)  # type: ignore[arg-type]

    def where(self, local: int) -> str:
        """``file.jsonl:LINE`` or ``file.json#INDEX`` of record ``local`` (for messages and ids)."""
        name = os.path.basename(self.path)
        if self.kind == "jsonl":
            return f"{name}:{int(self.line_numbers[local])}"  # type: ignore[index]
        return f"{name}#{local}"

    def location(self, local: int) -> dict[str, int]:
        """The skip report's location fields of record ``local``."""
        if self.kind == "jsonl":
            return {"record": local, "line": int(self.line_numbers[local])}  # type: ignore[index]
        return {"record": local}

    def iter_raw(self, lo: int, hi: int, *, max_record_bytes: int) -> Iterator[Any]:
        """Records ``lo..hi-1``: parsed objects (json), line bytes or :class:`Oversized` (jsonl)."""
        if self.kind == "json":
            yield from self.records[lo:hi]  # type: ignore[index]
            return
        with open(self.path, "rb") as f:
            for i in range(lo, hi):
                f.seek(int(self.offsets[i]))  # type: ignore[index]
                n = int(self.lengths[i])  # type: ignore[index]
                if n > max_record_bytes:
                    yield Oversized(nbytes=n, head=f.read(min(n, 4096)))
                else:
                    yield f.read(n)


def load_source(path: str) -> Source:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--input {path!r}: no such file; pass LLaVA-format .json or .jsonl files")
    with open(p, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if head.startswith(b"["):
        try:
            with open(p, encoding="utf-8-sig") as f:
                records = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(
                f"--input {path!r} starts like a JSON array but is not valid JSON ({err}); fix the file, "
                "or convert it to JSON Lines (one record per line) so bad records are skipped one by one"
            ) from None
        return Source(path=str(p), kind="json", records=records)
    offsets, lengths, lines = _index_lines(p)
    return Source(path=str(p), kind="jsonl", offsets=offsets, lengths=lengths, line_numbers=lines)


def _index_lines(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offset, length, 1-based line number) of every non-blank line, reading fixed chunks."""
    offsets: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    numbers: list[np.ndarray] = []
    pos = 0  # file offset of the chunk
    line_start, line_no, has_content = 0, 1, False  # the line that is open at the chunk's start
    with open(path, "rb") as f:
        while chunk := f.read(_INDEX_CHUNK):
            arr = np.frombuffer(chunk, dtype=np.uint8)
            newlines = np.flatnonzero(arr == 10)
            # content[i] = non-whitespace bytes in chunk[:i]
            content = np.concatenate([[0], np.cumsum(~_WHITESPACE[arr], dtype=np.int32)])
            starts = np.concatenate([[0], newlines + 1])  # line starts inside the chunk
            if len(newlines):
                nonblank = content[newlines] - content[starts[:-1]] > 0
                nonblank[0] |= has_content
                first_start = np.concatenate([[line_start - pos], starts[1:-1]])
                idx = np.flatnonzero(nonblank)
                offsets.append(pos + first_start[idx])
                ends.append(pos + newlines[idx])
                numbers.append(line_no + idx)
                line_no += len(newlines)
                line_start = pos + int(newlines[-1]) + 1
                has_content = bool(content[-1] - content[starts[-1]] > 0)
            else:
                has_content = has_content or bool(content[-1] > 0)
            pos += len(chunk)
    if has_content:  # a last line without a newline
        offsets.append(np.asarray([line_start]))
        ends.append(np.asarray([pos]))
        numbers.append(np.asarray([line_no]))
    cat = (lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64))
    off, end = cat(offsets), cat(ends)
    return off, end - off, cat(numbers)


_LEADING_ID = re.compile(rb'^\s*\{\s*"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')


def leading_id(raw: bytes | Oversized) -> str | None:
    """The id of a line that cannot be parsed (or is not read: ``Oversized``), when it is the
    line's first key, as LLaVA files write it; so that such skips carry the record's own id."""
    head = raw.head if isinstance(raw, Oversized) else raw[:4096]
    m = _LEADING_ID.match(head.removeprefix(b"\xef\xbb\xbf"))
    if not m:
        return None
    try:
        value = json.loads(m.group(1).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return str(value) if value != "" else None


def decode_line(raw: bytes, *, line: int, max_record_bytes: int) -> Any:
    """One JSONL line -> its JSON value, or ``SkipSample`` naming the line and the byte."""
    if isinstance(raw, Oversized):
        raise SkipSample(
            SkipReason.RECORD_TOO_LARGE,
            f"line {line} has {raw.nbytes} bytes > --max-record-bytes {max_record_bytes}; not read (raise the "
            "limit if such records are meant)",
        )
    skipped = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark
    try:
        text = raw[skipped:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = skipped + err.start
        raise SkipSample(
            SkipReason.MALFORMED_JSON,
            f"line {line}, byte {at}: invalid UTF-8 ({raw[at:at + 4]!r}: {err.reason}); JSON Lines input must be "
            "UTF-8: re-encode the file (e.g. iconv -f latin1 -t utf-8)",
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        at = skipped + len(text[:nul].encode("utf-8"))
        raise SkipSample(
            SkipReason.MALFORMED_JSON,
            f"line {line}, byte {at}: a NUL byte; not JSON text (a binary file, or UTF-16 text: re-encode it as UTF-8)",
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = skipped + len(text[: err.pos].encode("utf-8"))
        raise SkipSample(SkipReason.MALFORMED_JSON, f"line {line}, byte {at} (column {err.colno}): {err.msg}") from None
    except RecursionError:
        raise SkipSample(SkipReason.MALFORMED_JSON, f"line {line}: JSON nested too deeply to parse") from None
