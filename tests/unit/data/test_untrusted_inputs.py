"""tools/preprocess_data.py against hostile inputs: image paths that leave the image folder,
special files, oversized records, broken text, duplicate ids, and concurrent or killed runs."""

from __future__ import annotations

import builtins
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from data_helpers import jpeg_bytes, write_jsonl
from PIL import Image

from megatron_croc.data.constants import SkipReason
from megatron_croc.data.indexed import MultimodalIndexedDataset, skip_report_path
from megatron_croc.data.locking import LockHeldError, RunLock
from megatron_croc.data.preprocess import (
    OutputBusyError,
    PreprocessArgumentError,
    PreprocessConfig,
    lock_path,
    run_preprocess,
)

REPO = Path(__file__).resolve().parents[3]
SIZE, K, SEQ = 8, 4, 96


def rec(sid, image=None, answer="A red image.", question="<image>\nDescribe the image."):
    r = {"id": sid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        r["image"] = image
    return r


def config(inputs, img, out, sp_model_path, **kw) -> PreprocessConfig:
    base = dict(inputs=[str(p) for p in inputs], image_folder=str(img) if img else None, output_prefix=str(out),
                tokenizer_type="SentencePieceTokenizer", tokenizer_model=sp_model_path, template="vicuna_v1",
                image_size=SIZE, seq_length=SEQ, num_image_tokens=K, progress_bar=False)
    base.update(kw)
    return PreprocessConfig(**base)


def report(out) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, Path(skip_report_path(out)).read_text().splitlines())}


def stored_ids(out) -> list[str]:
    ds = MultimodalIndexedDataset(out)
    return [ds[i].sample_id for i in range(len(ds))]


@pytest.fixture
def escape_set(tmp_path):
    """An image folder, files outside it, and records that try to reach them."""
    red = jpeg_bytes(Image.new("RGB", (8, 8), (255, 0, 0)))
    img = tmp_path / "data" / "images"
    img.mkdir(parents=True)
    (img / "ok.jpg").write_bytes(red)
    (img / "sub").mkdir()
    (img / "sub" / "inner.jpg").write_bytes(red)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "outside.jpg").write_bytes(red)
    (outside / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (img / "link.jpg").symlink_to(outside / "outside.jpg")
    (img / "link_passwd").symlink_to(outside / "passwd")
    (img / "inner_link.jpg").symlink_to(img / "ok.jpg")  # a symlink that stays inside is fine
    records = [
        rec("ok", "ok.jpg"),
        rec("inside_dotdot", "sub/../ok.jpg"),
        rec("inner_link", "inner_link.jpg"),
        rec("dotdot", "../../secret/outside.jpg"),
        rec("passwd", "../../../../../../../../" + str(outside / "passwd").lstrip("/")),
        rec("absolute", str(outside / "outside.jpg")),
        rec("symlink", "link.jpg"),
        rec("symlink_passwd", "link_passwd"),
    ]
    src = tmp_path / "data" / "data.jsonl"
    write_jsonl(src, records)
    return src, img, outside


def _record_opens(monkeypatch) -> list[str]:
    """Every path opened from now on (os.open and open), resolved."""
    opened: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def os_open(path, *a, **kw):
        opened.append(os.path.realpath(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path))
        return real_os_open(path, *a, **kw)

    def open_(file, *a, **kw):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    return opened


def test_image_paths_that_leave_the_folder_are_skipped_unopened(escape_set, sp_model_path, tmp_path, monkeypatch):
    src, img, outside = escape_set
    out = tmp_path / "out" / "ds"
    opened = _record_opens(monkeypatch)
    run_preprocess(config([src], img, out, sp_model_path), log=lambda m: None)
    monkeypatch.undo()
    assert not [p for p in opened if p.startswith(str(outside))], "a file outside --image-folder was opened"
    assert stored_ids(out) == ["ok", "inside_dotdot", "inner_link"]
    skips = report(out)
    assert {sid: r["reason"] for sid, r in skips.items()} == {
        sid: SkipReason.IMAGE_OUTSIDE_FOLDER.value for sid in ("dotdot", "passwd", "absolute", "symlink", "symlink_passwd")}
    assert "'..'" in skips["dotdot"]["detail"] and "--allow-absolute-image-paths" in skips["absolute"]["detail"]
    assert "--allow-image-symlinks-outside" in skips["symlink"]["detail"]


def test_opt_in_flags_accept_absolute_paths_and_outward_symlinks_but_never_dotdot(escape_set, sp_model_path, tmp_path):
    src, img, _ = escape_set
    out = tmp_path / "trusting"
    run_preprocess(config([src], img, out, sp_model_path, allow_absolute_image_paths=True,
                          allow_image_symlinks_outside=True), log=lambda m: None)
    assert stored_ids(out) == ["ok", "inside_dotdot", "inner_link", "absolute", "symlink"]
    skips = report(out)
    assert skips["dotdot"]["reason"] == skips["passwd"]["reason"] == "image_outside_folder"
    assert skips["symlink_passwd"]["reason"] == "image_decode_error"  # opened (trusted), not an image


def _within(seconds: float, fn):
    """fn() in a daemon thread; fails (instead of hanging the suite) if it does not return in time."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:  # re-raised below
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (blocked on a special file?)"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_special_files_and_oversized_images_are_not_read(sp_model_path, tmp_path, monkeypatch):
    img = tmp_path / "images"
    img.mkdir()
    (img / "ok.jpg").write_bytes(jpeg_bytes(Image.new("RGB", (8, 8), (255, 0, 0))))
    os.mkfifo(img / "fifo.jpg")
    (img / "folder.jpg").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(img / "sock.jpg"))
    (img / "zero.jpg").symlink_to("/dev/zero")
    with open(img / "huge.jpg", "wb") as f:  # sparse: 64 MiB + 1 byte on no disk
        f.truncate(64 * 2**20 + 1)
    (img / "big.jpg").write_bytes(b"\xff" * 5000)
    names = ["ok", "fifo", "folder", "sock", "zero", "huge", "big"]
    src = tmp_path / "d.jsonl"
    write_jsonl(src, [rec(n, f"{n}.jpg") for n in names] + [rec("devzero", "/dev/zero")])
    read_sizes: list[int] = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: read_sizes.append(n) or real_read(fd, n))
    out = tmp_path / "o"
    # the symlink to /dev/zero is followed (trusted) and /dev/zero accepted as a path: still not read
    _within(60, lambda: run_preprocess(config([src], img, out, sp_model_path, max_image_bytes=4096,
                                              allow_image_symlinks_outside=True, allow_absolute_image_paths=True),
                                       log=lambda m: None))
    sock.close()
    assert stored_ids(out) == ["ok"]
    skips = report(out)
    assert {sid: r["reason"] for sid, r in skips.items()} == {
        "fifo": "image_not_regular_file", "folder": "image_not_regular_file", "sock": "image_not_regular_file",
        "zero": "image_not_regular_file", "devzero": "image_not_regular_file", "huge": "image_too_large",
        "big": "image_too_large"}
    assert "FIFO" in skips["fifo"]["detail"] and "character device" in skips["devzero"]["detail"]
    assert "--max-image-bytes 4096" in skips["big"]["detail"]
    # the default limit (64 MiB) refuses the sparse file from its size alone
    out2 = tmp_path / "o2"
    run_preprocess(config([src], img, out2, sp_model_path), log=lambda m: None)
    assert report(out2)["huge"]["reason"] == "image_too_large" and report(out2)["big"]["reason"] == "image_decode_error"


_MEASURE = textwrap.dedent("""
    import json, sys, time
    from megatron_croc.data.preprocess import PreprocessConfig, run_preprocess
    small, big, tok, out = sys.argv[1:5]
    def cfg(src, prefix, **kw):
        return PreprocessConfig(inputs=[src], output_prefix=prefix, tokenizer_type="SentencePieceTokenizer",
                                tokenizer_model=tok, template="vicuna_v1", seq_length=96, num_image_tokens=4,
                                image_size=8, progress_bar=False, **kw)
    run_preprocess(cfg(small, out + "/warm"), log=lambda m: None)  # imports, builders: not the record's cost
    def peak_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    def current_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS
    rss0 = current_kb()
    cpu0, wall0 = time.process_time(), time.monotonic()
    run_preprocess(cfg(big, out + "/big"), log=lambda m: None)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "extra_rss_mb": (peak_kb() - rss0) / 1024}))
""")


def test_a_10mb_answer_is_skipped_as_too_long_in_bounded_time_and_memory(sp_model_path, tmp_path):
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    write_jsonl(small, [rec("a", answer="Red.", question="Hi")])
    write_jsonl(big, [rec("a", answer="Red.", question="Hi"), rec("huge", answer="red circle " * 1_000_000, question="Hi")])
    assert big.stat().st_size > 10_000_000
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(small), str(big), sp_model_path, str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    print("10 MB answer:", measured)
    assert measured["cpu_s"] < 1.0 and measured["extra_rss_mb"] < 200, measured
    skip = report(tmp_path / "big")["huge"]
    assert skip["reason"] == "too_long" and "not tokenized" in skip["detail"]
    assert stored_ids(tmp_path / "big") == ["a"]


def test_oversized_lines_are_not_read_and_keep_their_id(sp_model_path, tmp_path):
    src = tmp_path / "d.jsonl"
    write_jsonl(src, [rec("a", answer="Red.", question="Hi"), rec("long", answer="x" * 300_000, question="Hi"),
                      rec("b", answer="Blue.", question="Hi")])
    out = tmp_path / "o"
    run_preprocess(config([src], None, out, sp_model_path, max_record_bytes=100_000), log=lambda m: None)
    skip = report(out)["long"]
    assert skip["reason"] == "record_too_large" and "--max-record-bytes 100000" in skip["detail"] and skip["line"] == 2
    assert stored_ids(out) == ["a", "b"]


def test_broken_text_is_reported_with_its_id_line_and_byte(sp_model_path, tmp_path, monkeypatch):
    lines = [
        json.dumps(rec("good", answer="Red.", question="Hi")).encode(),
        b'{"id": "surrogate", "conversations": [{"from": "human", "value": "Hi \\ud800"}, {"from": "gpt", "value": "x"}]}',
        b'{"id": "bad\\udfff id", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}]}',
        b'\x00{"id": "nul"}',
        b'{"id": "latin1", "value": "caf\xe9"}',
        b'{"id": "cut", ',
        json.dumps(rec("boom", answer="Red.", question="boom")).encode(),
        b'{"id": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ]
    src = tmp_path / "d.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    import megatron_croc.data.templates as templates

    real = templates.Template.render

    def render(self, turns, tokenizer):  # an unexpected error on one record
        if turns[0].text == "boom":
            raise RuntimeError("unexpected")
        return real(self, turns, tokenizer)

    monkeypatch.setattr(templates.Template, "render", render)
    out = tmp_path / "o"
    run_preprocess(config([src], None, out, sp_model_path), log=lambda m: None)
    skips = report(out)
    assert skips["surrogate"]["reason"] == "malformed_sample" and "\\ud800 at character 3" in skips["surrogate"]["detail"]
    assert skips["bad\\udfff id"]["reason"] == "malformed_sample"  # its own id, escaped
    assert skips["d.jsonl:4"]["detail"].startswith("line 4, byte 0: a NUL byte")
    bad_byte = lines[4].index(b"\xe9")
    # a line that cannot be parsed still carries the id it starts with
    assert skips["latin1"]["detail"].startswith(f"line 5, byte {bad_byte}: invalid UTF-8 (b'\\xe9")
    assert skips["cut"]["detail"].startswith(f"line 6, byte {len(lines[5])} (column {len(lines[5]) + 1}): "
                                             "Expecting property name")
    assert {skips[sid]["reason"] for sid in ("d.jsonl:4", "latin1", "cut", "deep")} == {"malformed_json"}
    assert skips["boom"]["reason"] == "internal_error" and "unexpected" in skips["boom"]["detail"]
    assert skips["deep"]["detail"] == "line 8: JSON nested too deeply to parse"
    assert stored_ids(out) == ["good"]


def test_duplicate_ids_are_counted_or_dropped(sp_model_path, tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "ok.jpg").write_bytes(jpeg_bytes(Image.new("RGB", (8, 8), (255, 0, 0))))
    src = tmp_path / "d.jsonl"
    write_jsonl(src, [rec("x", "missing.jpg"), rec("x", "ok.jpg"), rec("y", "ok.jpg"), rec("x", "ok.jpg"),
                      rec("z", answer="Text.", question="Hi"), rec("y", answer="Again.", question="Hi"),
                      rec(7, answer="Seven.", question="Hi"), rec("7", answer="Seven again.", question="Hi")])
    kept = tmp_path / "kept"
    r = run_preprocess(config([src], img, kept, sp_model_path, partitions=3, workers=2), log=lambda m: None)
    assert stored_ids(kept) == ["x", "y", "x", "z", "y", "7", "7"]
    assert r.counts.duplicate_ids == 3 and r.meta["counts"]["duplicate_ids"] == 3
    first = r.meta["duplicate_id_examples"][0]
    assert first == {"id": "x", "first": "d.jsonl:2", "again": "d.jsonl:4", "dropped": False}

    for no_merge in (False, True):
        out = tmp_path / f"dedup{int(no_merge)}"
        messages: list[str] = []
        r = run_preprocess(config([src], img, out, sp_model_path, partitions=3, workers=2, dedupe_ids=True,
                                  no_merge=no_merge), log=messages.append)
        assert stored_ids(out) == ["x", "y", "z", "7"]  # the first *stored* x (the first x had no image)
        assert r.counts.samples == 4 and r.counts.skipped == {"duplicate_id": 3, "image_missing": 1}
        assert r.counts.duplicate_ids == 0 and r.counts.text_only == 2 and r.counts.with_image == 2
        lines = [json.loads(line) for line in Path(skip_report_path(out)).read_text().splitlines()]
        assert [(x["id"], x["reason"], x["line"]) for x in lines] == [
            ("x", "image_missing", 1), ("x", "duplicate_id", 4), ("y", "duplicate_id", 6), ("7", "duplicate_id", 8)]
        assert "d.jsonl:2 has the same id" in lines[1]["detail"]
        assert any("dropped 3 samples" in m for m in messages)
        ds = MultimodalIndexedDataset(out)
        assert int(ds.token_lengths.sum()) == r.counts.tokens
        assert r.counts.max_expanded_length == int(ds.expanded_lengths(K).max())


def test_jsonl_index_reads_lines_across_chunks(tmp_path, monkeypatch):
    import megatron_croc.data.inputs as inputs

    monkeypatch.setattr(inputs, "_INDEX_CHUNK", 7)  # every line crosses chunk borders
    text = b'{"a": 1}\r\n\n   \n{"bb": [1, 2, 3]}\n\t\n  {"c": "x y"}  \n\n{"d": 4}'
    path = tmp_path / "x.jsonl"
    path.write_bytes(text)
    source = inputs.load_source(str(path))
    raw = list(source.iter_raw(0, len(source), max_record_bytes=1000))
    assert [json.loads(r) for r in raw] == [{"a": 1}, {"bb": [1, 2, 3]}, {"c": "x y"}, {"d": 4}]
    assert source.line_numbers.tolist() == [1, 4, 6, 8]
    assert isinstance(list(source.iter_raw(1, 2, max_record_bytes=5))[0], inputs.Oversized)


# -- one run per output prefix ------------------------------------------------------------------


def test_run_lock_names_its_holder_and_is_taken_over_when_the_holder_is_gone(tmp_path):
    path = tmp_path / "x.lock"
    first = RunLock(path)
    assert first.acquire() is None
    with pytest.raises(LockHeldError, match=rf"in use by another run: pid {os.getpid()} on host "):
        RunLock(path).acquire()
    with pytest.raises(LockHeldError):
        RunLock(path, shared=True).acquire()
    first.release()
    assert not path.exists()  # nothing left behind
    # a note without a holder: the run that wrote it was killed; the next one takes over
    path.write_text(json.dumps({"pid": 999999, "host": "gone", "started": 0, "command": "old run"}))
    lock = RunLock(path)
    assert lock.acquire()["host"] == "gone" and json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    a, b = RunLock(path, shared=True), RunLock(path, shared=True)
    a.acquire(), b.acquire()
    with pytest.raises(LockHeldError):
        RunLock(path).acquire()
    a.release(), b.release()


def test_partition_index_runs_share_the_prefix_but_not_their_partitions(sp_model_path, tmp_path):
    src = tmp_path / "d.jsonl"
    write_jsonl(src, [rec(f"s{i}", answer="Red.", question="Hi") for i in range(6)])
    out = tmp_path / "o"
    cfg = lambda **kw: config([src], None, out, sp_model_path, partitions=3, **kw)  # noqa: E731
    run_preprocess(cfg(partition_index=[2]), log=lambda m: None)  # creates the manifest
    other_node = RunLock(lock_path(str(out)), shared=True)
    other_node.acquire()
    part0 = RunLock(str(out) + ".parts/part-00000-of-00003.lock")
    part0.acquire()  # another node is on partition 0
    with pytest.raises(OutputBusyError, match=r"partition 0 of .* in use by another run: pid \d+"):
        run_preprocess(cfg(partition_index=[0, 1]), log=lambda m: None)
    run_preprocess(cfg(partition_index=[1]), log=lambda m: None)  # beside it: fine
    with pytest.raises(PreprocessArgumentError, match="--overwrite with --partition-index"):
        run_preprocess(cfg(partition_index=[1], overwrite=True), log=lambda m: None)  # would delete the others' work
    with pytest.raises(OutputBusyError, match=r"being written by --partition-index run\(s\): pid \d+ on host"):
        run_preprocess(cfg(), log=lambda m: None)  # the merge waits for the nodes
    part0.release(), other_node.release()
    r = run_preprocess(cfg(), log=lambda m: None)
    assert r.complete and r.processed_partitions == [0] and stored_ids(out) == [f"s{i}" for i in range(6)]
    assert not Path(lock_path(str(out))).exists()


_SLOW_RUN = textwrap.dedent("""
    import sys, time
    import megatron_croc.data.preprocess as p
    real = p._process_record
    def slow(*args, **kwargs):
        time.sleep(0.1)
        return real(*args, **kwargs)
    p._process_record = slow
    sys.exit(p.main(sys.argv[1:]))
""")


def _wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_a_second_run_is_refused_and_a_killed_run_leaves_no_workers_and_no_lock(sp_model_path, tmp_path):
    src = tmp_path / "d.jsonl"
    write_jsonl(src, [rec(f"s{i}", answer="Red.", question="Hi") for i in range(200)])
    out = tmp_path / "o"
    argv = ["--input", str(src), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model_path,
            "--template", "vicuna_v1", "--seq-length", str(SEQ), "--num-image-tokens", str(K), "--image-size",
            str(SIZE), "--output-prefix", str(out), "--workers", "2", "--partitions", "2", "--no-progress-bar"]
    first = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        parent = psutil.Process(first.pid)

        def pool_workers() -> list[int]:
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            pids = [c.pid for c in parent.children() if c.status() != psutil.STATUS_ZOMBIE]
            return pids if len(pids) >= 2 else []

        workers = _wait_for(pool_workers, 120, "the first run's two workers")
        _wait_for(lambda: Path(str(out) + ".parts/part-00000-of-00002.tmp.bin").exists(), 60, "work to start")
        cfg = config([src], None, out, sp_model_path, workers=2, partitions=2)
        with pytest.raises(OutputBusyError, match=rf"in use by another run: pid {first.pid} on host .*--workers 2"):
            run_preprocess(cfg, log=lambda m: None)
        with pytest.raises(OutputBusyError, match=rf"pid {first.pid}"):
            run_preprocess(config([src], None, out, sp_model_path, partitions=2, partition_index=[1]),
                           log=lambda m: None)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
        _wait_for(lambda: not _alive(workers), 15, "the workers to exit with their parent")
    finally:
        if first.poll() is None:
            first.kill()
    messages: list[str] = []
    r = run_preprocess(cfg, log=messages.append)  # the dead run's lock is taken over
    assert any("taking over a lock left by a run that is gone" in m and f"pid {first.pid}" in m for m in messages)
    assert r.complete and stored_ids(out) == [f"s{i}" for i in range(200)]
    assert not Path(lock_path(str(out))).exists()


# -- the length bound that lets oversized records skip tokenization ------------------------------


def _tricky_texts() -> list[str]:
    import random

    rng = random.Random(0)
    alphabet = list("abc xyz  \n\t.,!?ÉéЖ中文🙂") + ["\u0301", "\u200b", "\u00a0", "ﬁ", "\u3000", "\r\n"]
    texts = ["", " " * 500, "\u200b" * 300, "e\u0301" * 200, "ﬁ" * 100, "🙂" * 100, "red circle " * 50,
             "中" * 200, "a" + " " * 1000 + "b"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400))) for _ in range(60)]
    return texts


def _sp_model(tmp_path, **options) -> str:
    import io

    import sentencepiece as spm

    corpus = ["the red circle is at the top left", "a small blue square on a grey background"] * 50
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=300, model_type="bpe",
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1, **options)
    path = tmp_path / f"sp{len(list(tmp_path.iterdir()))}.model"
    path.write_bytes(buf.getvalue())
    return str(path)


def _byte_level_bpe(tmp_path) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFKC()  # shrinks some text ("ﬁ" stays 2 chars, "e\u0301" becomes 1)
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["the red circle is at the top left"] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|eot|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|eot|>")
    fast.save_pretrained(str(tmp_path / "bytebpe"))
    return str(tmp_path / "bytebpe")


def test_min_tokens_never_exceeds_the_real_count(sp_model_path, hf_tokenizer_dir, tmp_path):
    from megatron_croc.data.templates import Turn, get_template
    from megatron_croc.data.tokenizers import build_tokenizer

    bounded = {
        "demo sentencepiece": build_tokenizer("sentencepiece", sp_model_path),
        "sentencepiece nmt_nfkc, extra whitespace removed": build_tokenizer(
            "sentencepiece", _sp_model(tmp_path, byte_fallback=True)),
        "byte-level BPE with NFKC": build_tokenizer("huggingface", _byte_level_bpe(tmp_path)),
    }
    for name, tok in bounded.items():
        assert tok.max_chars_per_token is not None, name
        for text in _tricky_texts():
            for continuation in (False, True):
                n = len(tok.encode_with_offsets(text, continuation=continuation)[0])
                assert tok.min_tokens(text) <= n, (name, text, tok.min_tokens(text), n)
        template = get_template("vicuna_v1")
        for text in _tricky_texts()[:20]:
            turns = [Turn(role="user", text=text, image=True), Turn(role="assistant", text=text + "!")]
            assert template.min_length(turns, tok) <= len(template.render(turns, tok).tokens), (name, text)
    # <unk> that swallows a whole run or word: no bound, so nothing is skipped on it
    assert build_tokenizer("sentencepiece", _sp_model(tmp_path)).max_chars_per_token is None  # no byte fallback
    word_level = build_tokenizer("huggingface", hf_tokenizer_dir)
    assert word_level.max_chars_per_token is None and word_level.min_tokens("x" * 10_000) == 0
