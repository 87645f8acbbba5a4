"""tools/preprocess_data.py end to end: a corrupted set, resume, merge, bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_helpers import jpeg_bytes, png_bytes, supervised_runs, write_jsonl
from PIL import Image

from megatron_croc.data.constants import IMAGE_TOKEN_ID
from megatron_croc.data.images import ALPHA_BACKGROUND
from megatron_croc.data.indexed import MultimodalIndexedDataset, skip_report_path
from megatron_croc.data.preprocess import (
    PreprocessArgumentError,
    PreprocessConfig,
    build_parser,
    main,
    run_preprocess,
)
from megatron_croc.data.tokenizers import build_tokenizer

REPO = Path(__file__).resolve().parents[3]
SIZE, K, SEQ = 8, 4, 96


def conv(q: str, a: str, *more: str) -> list[dict]:
    turns = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    for i, v in enumerate(more):
        turns.append({"from": "human" if i % 2 == 0 else "gpt", "value": v})
    return turns


def make_corrupt_set(root: Path) -> tuple[Path, Path, dict, dict]:
    """Return (jsonl, image folder, {kept id: (expected centre RGB or None, answers)}, {skipped id: reason})."""
    img = root / "images"
    img.mkdir(parents=True)
    (img / "red.png").write_bytes(png_bytes(Image.new("RGB", (20, 10), (255, 0, 0))))
    (img / "blue.jpg").write_bytes(jpeg_bytes(Image.new("RGB", (40, 30), (0, 0, 255))))
    (img / "cmyk.jpg").write_bytes(jpeg_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=100))
    (img / "grey16.png").write_bytes(png_bytes(Image.fromarray(np.full((8, 8), 32768, np.uint16))))
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 200, 0] + [0] * 765)
    (img / "palette.png").write_bytes(png_bytes(pal))
    (img / "alpha.png").write_bytes(png_bytes(Image.new("RGBA", (8, 8), (0, 0, 0, 0))))
    full = jpeg_bytes(Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)))
    (img / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (img / "zero.jpg").write_bytes(b"")
    (img / "garbage.jpg").write_bytes(b"not a jpeg")

    desc = "<image>\nDescribe the image."
    kept = {
        "good_png": ("red.png", conv(desc, "A red image."), (255, 0, 0), ["A red image."]),
        "good_jpeg": ("blue.jpg", conv("Describe the image.\n<image>", "A blue image."), (0, 0, 255), ["A blue image."]),
        "cmyk": ("cmyk.jpg", conv(desc, "Red."), (255, 0, 0), ["Red."]),
        "grey16": ("grey16.png", conv(desc, "Grey."), (128, 128, 128), ["Grey."]),
        "palette": ("palette.png", conv(desc, "Green."), (0, 200, 0), ["Green."]),
        "alpha": ("alpha.png", conv(desc, "Nothing."), ALPHA_BACKGROUND, ["Nothing."]),
        "text_only": (None, conv("How many corners does a square have?", "Four."), None, ["Four."]),
        "multi_turn": ("red.png", conv(desc, "A red image.", "What color?", "Red."), (255, 0, 0), ["A red image.", "Red."]),
    }
    skipped = {
        "missing": ("nope.jpg", conv(desc, "x"), "image_missing"),
        "truncated": ("truncated.jpg", conv(desc, "x"), "image_truncated"),
        "zero_byte": ("zero.jpg", conv(desc, "x"), "image_empty"),
        "garbage": ("garbage.jpg", conv(desc, "x"), "image_decode_error"),
        "no_token": ("red.png", conv("Describe the image.", "x"), "no_image_token"),
        "two_tokens": ("red.png", conv("<image> and <image>", "x"), "multiple_image_tokens"),
        "token_no_image": (None, conv(desc, "x"), "image_token_without_image"),
        "gpt_first": ("red.png", [{"from": "gpt", "value": "x"}, {"from": "human", "value": desc}], "turn_order"),
        "ends_human": ("red.png", conv(desc, "x", "And?"), "turn_order"),
        "empty_answer": ("red.png", conv(desc, "   "), "empty_answer"),
        "too_long": ("red.png", conv(desc, "red circle " * 60), "too_long"),
        "bad_turn": ("red.png", [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], "malformed_sample"),
    }
    lines: list = []
    order = ["good_png", "missing", "good_jpeg", "truncated", "cmyk", "zero_byte", "grey16", "garbage", "palette",
             "no_token", "alpha", "two_tokens", "text_only", "token_no_image", "multi_turn", "gpt_first",
             "ends_human", "empty_answer", "too_long", "bad_turn"]
    for sid in order:
        image, convs = (kept[sid][0], kept[sid][1]) if sid in kept else (skipped[sid][0], skipped[sid][1])
        rec = {"id": sid, "conversations": convs}
        if image is not None:
            rec["image"] = image
        lines.append(rec)
    lines.insert(5, '{"id": "broken", "image": "red.png", "conversations": [')  # malformed JSON line
    lines.insert(9, "")  # a blank line is not a record
    lines.insert(12, "[1, 2, 3]")  # valid JSON, not a record
    path = root / "data.jsonl"
    write_jsonl(path, lines)
    expected_skips = {sid: reason for sid, (_, _, reason) in skipped.items()}
    expected_skips["broken"] = "malformed_json"  # not JSON, but its leading id is still read
    expected_skips["data.jsonl:13"] = "malformed_sample"
    expected_kept = {sid: (kept[sid][2], kept[sid][3]) for sid in order if sid in kept}
    return path, img, expected_kept, expected_skips


def config(src: Path, img: Path, out: Path, sp_model_path: str, **kw) -> PreprocessConfig:
    base = dict(inputs=[str(src)], image_folder=str(img), output_prefix=str(out), tokenizer_type="SentencePieceTokenizer",
                tokenizer_model=sp_model_path, template="vicuna_v1", image_size=SIZE, seq_length=SEQ,
                num_image_tokens=K, progress_bar=False)
    base.update(kw)
    return PreprocessConfig(**base)


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    return make_corrupt_set(tmp_path_factory.mktemp("corrupt"))


@pytest.fixture(scope="module")
def processed(corrupt, sp_model_path, tmp_path_factory):
    src, img, kept, skips = corrupt
    out = tmp_path_factory.mktemp("out") / "ds"
    result = run_preprocess(config(src, img, out, sp_model_path, workers=2, partitions=3), log=lambda m: None)
    return result, out


def test_corrupted_set_skips_and_keeps_exactly_the_expected(corrupt, processed, sp_model_path):
    _, _, kept, skips = corrupt
    result, out = processed
    report = [json.loads(line) for line in Path(skip_report_path(out)).read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in report} == skips
    assert all(r["detail"] and r["source"].endswith("data.jsonl") and "line" in r for r in report)
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["counts"]["samples"] == len(kept) and meta["counts"]["skipped_total"] == len(skips)
    assert meta["counts"]["records"] == len(kept) + len(skips)
    assert meta["counts"]["skipped"]["turn_order"] == 2 and meta["counts"]["text_only"] == 1
    assert meta["image_token_id"] == IMAGE_TOKEN_ID and meta["template"] == "vicuna_v1"
    assert meta["tokenizer"]["vocab_size"] == 640 and meta["image"]["size"] == SIZE
    assert result.complete and not os.path.exists(str(out) + ".parts")


def test_round_trip_tokens_masks_images(corrupt, processed, sp_model_path):
    _, _, kept, _ = corrupt
    _, out = processed
    tok = build_tokenizer("sentencepiece", sp_model_path)
    ds = MultimodalIndexedDataset(out)
    assert [ds[i].sample_id for i in range(len(ds))] == list(kept)  # input order, skipped removed
    for i, (sid, (colour, answers)) in enumerate(kept.items()):
        s = ds[i]
        assert (s.image is None) == (colour is None)
        if colour is not None:
            assert s.image.shape == (3, SIZE, SIZE) and s.image.dtype == np.uint8
            # centre pixel (inside the content, away from the pad bars)
            assert np.abs(s.image[:, SIZE // 2, SIZE // 2].astype(int) - colour).max() <= 4, sid
            assert (s.tokens == IMAGE_TOKEN_ID).sum() == 1
            text = tok.decode(s.tokens)
            assert "USER: <image>\nDescribe the image. ASSISTANT:" in text  # image moved to the front
        # supervised runs = answers + EOS, nothing else
        runs = supervised_runs(s.tokens.tolist(), s.loss_mask.tolist())
        assert [tok.decode(r[:-1]).strip() for r in runs] == answers and all(r[-1] == tok.eos_id for r in runs)


def test_megatron_core_reader_reads_our_files(processed):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _, out = processed
    ours = MultimodalIndexedDataset(out)
    theirs = IndexedDataset(str(out), multimodal=True)
    docs = theirs.document_indices
    assert len(docs) - 1 == len(ours)
    for i in range(len(ours)):
        tokens, mode = theirs[int(docs[i])]
        assert mode == 0 and np.array_equal(tokens, ours[i].tokens)
        mask, mode = theirs[int(docs[i]) + 1]
        assert mode == 1 and np.array_equal(mask, ours[i].loss_mask)
        if ours[i].image is not None:
            pixels, mode = theirs[int(docs[i]) + 3]
            assert mode == 2 and np.array_equal(pixels.view(np.uint8).reshape(3, SIZE, SIZE), ours[i].image)


def test_encoded_storage_reads_back_same_pixels(corrupt, processed, sp_model_path, tmp_path):
    src, img, _, _ = corrupt
    _, out = processed
    enc = tmp_path / "enc"
    run_preprocess(config(src, img, enc, sp_model_path, image_storage="encoded"), log=lambda m: None)
    a, b = MultimodalIndexedDataset(out), MultimodalIndexedDataset(enc)
    assert os.path.getsize(str(enc) + ".bin") != os.path.getsize(str(out) + ".bin")
    for i in range(len(a)):
        assert np.array_equal(a[i].tokens, b[i].tokens)
        assert (a[i].image is None and b[i].image is None) or np.array_equal(a[i].image, b[i].image)


def test_prepend_missing_image_token_and_json_array_input(sp_model_path, tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "a.png").write_bytes(png_bytes(Image.new("RGB", (4, 4), (255, 0, 0))))
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"id": "j0", "image": "a.png", "conversations": conv("Describe.", "Red.")}]))
    jl = tmp_path / "b.jsonl"
    write_jsonl(jl, [{"id": "l0", "image": "a.png", "conversations": conv("<image>\nDescribe.", "Red.")}])
    out = tmp_path / "o"
    cfg = config(arr, img, out, sp_model_path, inputs=[str(arr), str(jl)], prepend_missing_image_token=True)
    result = run_preprocess(cfg, log=lambda m: None)
    ds = MultimodalIndexedDataset(out)
    assert result.counts.samples == 2 and [ds[i].sample_id for i in range(2)] == ["j0", "l0"]
    assert np.array_equal(ds[0].tokens, ds[1].tokens)  # prepended image = LLaVA's normalised form


def test_resume_reuses_finished_partitions(corrupt, processed, sp_model_path, tmp_path):
    src, img, _, _ = corrupt
    _, reference = processed
    out = tmp_path / "res"
    cfg = config(src, img, out, sp_model_path, partitions=3)
    # Node A does partition 1 only: no merge yet.
    r1 = run_preprocess(config(src, img, out, sp_model_path, partitions=3, partition_index=[1]), log=lambda m: None)
    assert not r1.complete and r1.processed_partitions == [1]
    assert not os.path.exists(str(out) + ".bin")
    # An interrupted partition 0: files without a done marker are redone.
    parts = Path(str(out) + ".parts")
    (parts / "part-00000-of-00003.bin").write_bytes(b"garbage")
    r2 = run_preprocess(cfg, log=lambda m: None)
    assert r2.complete and r2.reused_partitions == [1] and r2.processed_partitions == [0, 2]
    for suffix in (".bin", ".idx", ".skipped.jsonl"):
        assert Path(str(out) + suffix).read_bytes() == Path(str(reference) + suffix).read_bytes()
    # Already complete: nothing to do.
    r3 = run_preprocess(cfg, log=lambda m: None)
    assert r3.processed_partitions == [] and r3.counts.samples == r2.counts.samples
    # Other settings on an existing output: refused unless --overwrite.
    with pytest.raises(PreprocessArgumentError, match="overwrite"):
        run_preprocess(config(src, img, out, sp_model_path, image_size=16), log=lambda m: None)
    r4 = run_preprocess(config(src, img, out, sp_model_path, image_size=16, overwrite=True), log=lambda m: None)
    assert MultimodalIndexedDataset(out)[0].image.shape == (3, 16, 16) and r4.complete


def test_resume_refuses_other_partition_count(corrupt, sp_model_path, tmp_path):
    src, img, _, _ = corrupt
    out = tmp_path / "p"
    run_preprocess(config(src, img, out, sp_model_path, partitions=3, partition_index=[0]), log=lambda m: None)
    with pytest.raises(PreprocessArgumentError, match="--partitions 3"):
        run_preprocess(config(src, img, out, sp_model_path, partitions=4), log=lambda m: None)


def _cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bad_arguments_give_clear_errors(corrupt, sp_model_path, tmp_path, capsys):
    src, img, _, _ = corrupt
    base = ["--input", str(src), "--image-folder", str(img), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", sp_model_path, "--template", "vicuna_v1", "--output-prefix", str(tmp_path / "x"),
            "--no-progress-bar"]

    def with_(**over: str) -> list[str]:
        argv = list(base)
        for k, v in over.items():
            flag = "--" + k.replace("_", "-")
            if flag in argv:
                argv[argv.index(flag) + 1] = v
            else:
                argv += [flag, v]
        return argv

    assert "--input" in _cli_error(capsys, with_(input=str(tmp_path / "missing.jsonl")))
    assert "does not exist" in _cli_error(capsys, with_(tokenizer_model=str(tmp_path / "tok.model")))
    assert "unknown tokenizer type" in _cli_error(capsys, with_(tokenizer_type="WordPiece"))
    assert "<|start_header_id|>" in _cli_error(capsys, with_(template="llama3"))
    assert "invalid choice" in _cli_error(capsys, with_(template="vicuna"))
    assert "no room" in _cli_error(capsys, with_(seq_length="8", num_image_tokens="8"))
    assert "--image-folder" in _cli_error(capsys, with_(image_folder=str(tmp_path / "nodir")))
    assert "is a directory" in _cli_error(capsys, with_(output_prefix=str(tmp_path)))
    assert "must be >= 1" in _cli_error(capsys, with_(workers="0"))
    assert "out of range" in _cli_error(capsys, with_(partitions="2", partition_index="0,5"))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,')
    assert "not valid JSON" in _cli_error(capsys, with_(input=str(bad)))
    assert "required" in _cli_error(capsys, ["--input", str(src)])


def test_help_documents_every_option():
    parser = build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    out = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for action in parser._actions:
        assert action.option_strings[-1] in out.stdout


def test_no_merge_reads_the_same_samples(corrupt, processed, sp_model_path, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src, img, _, _ = corrupt
    _, reference = processed
    out = tmp_path / "nm"
    res = run_preprocess(config(src, img, out, sp_model_path, partitions=3, workers=2, no_merge=True),
                         log=lambda m: None)
    assert not os.path.exists(str(out) + ".bin") and res.merge_seconds < 1.0
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["parts"] == [f"nm.parts/part-{k:05d}-of-00003" for k in range(3)]
    a, b = MultimodalIndexedDataset(reference), MultimodalIndexedDataset(out)
    assert len(a) == len(b)
    for i in range(len(a)):
        assert a[i].sample_id == b[i].sample_id and np.array_equal(a[i].tokens, b[i].tokens)
        assert (a[i].image is None) == (b[i].image is None)
        assert a[i].image is None or np.array_equal(a[i].image, b[i].image)
    assert sum(len(IndexedDataset(str(tmp_path / p), multimodal=True).document_indices) - 1
               for p in meta["parts"]) == len(a)  # each part is a plain megatron-core dataset
    assert Path(skip_report_path(out)).read_bytes() == Path(skip_report_path(reference)).read_bytes()
