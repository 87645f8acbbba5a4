"""The demo set: deterministic, captions that follow from the pictures, cached, usable for training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_croc.data.dataset import BatchCollator, BlendedDataset
from megatron_croc.data.demo import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    caption,
    ensure_demo_dataset,
    generate_records,
    render,
)
from megatron_croc.data.indexed import MultimodalIndexedDataset
from megatron_croc.data.tokenizers import build_tokenizer

N = 64


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo"), num_samples=N, seed=5)


def test_deterministic_from_seed(demo, tmp_path):
    again = ensure_demo_dataset(tmp_path / "again", num_samples=N, seed=5)
    for suffix in (".bin", ".idx"):
        assert Path(again.prefix + suffix).read_bytes() == Path(demo.prefix + suffix).read_bytes()
    assert Path(again.tokenizer_model).read_bytes() == Path(demo.tokenizer_model).read_bytes()
    other = ensure_demo_dataset(tmp_path / "other", num_samples=N, seed=6)
    assert Path(other.prefix + ".bin").read_bytes() != Path(demo.prefix + ".bin").read_bytes()


def test_cached_not_rebuilt(demo):
    before = os.stat(demo.prefix + ".bin").st_mtime_ns
    same = ensure_demo_dataset(Path(demo.prefix).parent.parent, num_samples=N, seed=5)
    assert same.prefix == demo.prefix and os.stat(demo.prefix + ".bin").st_mtime_ns == before


def test_captions_follow_from_pictures():
    checked = 0
    for record, scene in generate_records(40, seed=3):
        if scene is None:
            continue
        assert record["conversations"][1]["value"] == caption(scene)
        arr = np.asarray(render(scene, 64)).astype(int)
        for i, pos in enumerate(POSITIONS):
            cx, cy = (i % 2) * 32 + 16, (i // 2) * 32 + 16
            shape = next((s for s in scene.shapes if s.position == pos), None)
            want = COLORS[shape.color] if shape else BACKGROUNDS[scene.background]
            assert arr[cy, cx].tolist() == list(want)
            if shape:
                assert f"a {shape.size} {shape.color} {shape.shape} at the {pos}" in caption(scene)
                # size is visible: a large shape reaches farther from the cell centre than a small one
                assert (arr[cy + 8, cx].tolist() == list(COLORS[shape.color])) == (shape.size == "large")
            else:
                assert f"at the {pos}" not in caption(scene)
        checked += 1
    assert checked > 30


def test_dataset_contents_and_stored_images(demo):
    meta = demo.meta
    counts = meta["counts"]
    assert counts["samples"] == N and counts["skipped_total"] == 0 and counts["text_only"] >= 1
    assert meta["image"]["size"] == 32 and meta["template"] == "vicuna_v1"
    assert counts["max_expanded_length"] <= 256
    tok = build_tokenizer(demo.tokenizer_type, demo.tokenizer_model)
    assert 256 < tok.vocab_size <= 1000
    records = {r["id"]: (r, s) for r, s in generate_records(N, seed=5)}
    ds = MultimodalIndexedDataset(demo.prefix)
    multi_turn = 0
    for i in range(len(ds)):
        s = ds[i]
        record, scene = records[s.sample_id]
        answers = [t["value"] for t in record["conversations"][1::2]]
        multi_turn += len(answers) > 1
        text = tok.decode(s.tokens)
        assert all(a in text for a in answers)
        if scene is not None:
            # the stored 32x32 image shows the named colours at the quadrant centres
            for shape in scene.shapes:
                j = POSITIONS.index(shape.position)
                cx, cy = (j % 2) * 16 + 8, (j // 2) * 16 + 8
                assert np.abs(s.image[:, cy, cx].astype(int) - COLORS[shape.color]).max() < 40
    assert multi_turn >= 5


def test_collates_for_the_tiny_model(demo):
    ds = MultimodalIndexedDataset(demo.prefix)
    bl = BlendedDataset([ds], seed=0)
    col = BatchCollator(seq_length=256, num_image_tokens=16, pad_token_id=ds.pad_id, image_size=32)
    batch = col([[bl[g]] for g in range(8)])
    assert batch["visual_mask"].sum() == 16 * batch["images"].shape[0]
    assert batch["loss_mask"].sum() > 0


def test_source_is_llava_format(demo):
    records = json.loads(Path(demo.source_json).read_text())
    assert len(records) == N
    for r in records:
        assert set(r) <= {"id", "image", "conversations"}
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt"] * (len(r["conversations"]) // 2)
        if "image" in r:
            assert Image.open(Path(demo.image_folder) / r["image"]).size == (64, 64)


# --- the three-stage recipe's splits (examples/croc_recipe_demo.sh) ---------------------------


def test_recipe_splits_answers_follow_from_the_scene():
    from megatron_croc.data.demo import EVAL_TYPES, SHORT_ANSWER, caption_facts, generate_split_records
    from megatron_croc.evaluation.metrics import normalize_answer

    seen_types = set()
    for record, scene in generate_split_records("eval", 70, seed=2):
        question, answer = (t["value"] for t in record["conversations"])
        kind = record["question_type"]
        seen_types.add(kind)
        assert "<image>" in question
        if kind == "caption":
            assert answer == caption(scene) and record["facts"] == caption_facts(scene)
            # every fact is stated by the reference caption, as the evaluation scores it
            assert all(normalize_answer(f) in normalize_answer(answer) for f in record["facts"]), record
            assert len(record["facts"]) == 2 + len(scene.shapes)
        else:
            assert SHORT_ANSWER in question and "facts" not in record
            assert len(answer.split()) <= 3  # a word or a phrase
        if kind == "count":
            assert answer == ("one", "two", "three")[len(scene.shapes) - 1]
        elif kind == "background":
            assert answer == scene.background
        elif kind == "position":
            where = question.split("What is at the ")[1].split("?")[0]
            there = [s for s in scene.shapes if s.position == where]
            assert answer == (f"{there[0].size} {there[0].color} {there[0].shape}" if there else "nothing")
        elif kind in ("color", "shape", "size"):
            shape = next(s for s in scene.shapes if f"at the {s.position}" in question)
            assert answer == getattr(shape, kind)
    assert seen_types == set(EVAL_TYPES)
    for record, scene in generate_split_records("text", 30, seed=2):
        assert "image" not in record and scene is None
    for record, scene in generate_split_records("instruct", 30, seed=2):
        humans = [t["value"] for t in record["conversations"][::2]]
        assert sum("<image>" in h for h in humans) == 1 and "<image>" in humans[0]
    with pytest.raises(ValueError, match="unknown demo split 'test'"):
        next(generate_split_records("test", 1, seed=2))


def test_recipe_splits_share_one_tokenizer_and_the_eval_images_are_held_out(tmp_path):
    import hashlib

    from megatron_croc.data.demo import ensure_recipe_datasets, main

    sizes = {"text": 40, "caption": 40, "instruct": 40, "eval": 40}
    sets = ensure_recipe_datasets(tmp_path, seed=4, sizes=sizes, seq_length=192)
    assert set(sets) == {"text", "caption", "instruct", "eval"}
    assert len({Path(d.tokenizer_model).read_bytes() for d in sets.values()}) == 1
    assert {d.meta["tokenizer"]["sha256"] for d in sets.values()} == {sets["caption"].meta["tokenizer"]["sha256"]}
    assert sets["text"].meta["counts"]["with_image"] == 0 and sets["eval"].meta["counts"]["samples"] == 40

    def image_hashes(split):
        folder = Path(sets[split].image_folder) / "images"
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.png")}

    train = image_hashes("caption") | image_hashes("instruct")
    assert not image_hashes("eval") & train  # no held-out picture occurs in training, pixel for pixel
    # the recipe's env file, for examples/croc_recipe_demo.sh
    assert main(["--recipe", "--output-dir", str(tmp_path), "--seed", "4", "--seq-length", "192",
                 *[f"--{k}-samples={v}" for k, v in sizes.items()]]) == 0
    env = dict(line.split("=", 1) for line in (tmp_path / "recipe_seed4.env").read_text().splitlines())
    assert env["EVAL_DATA"] == sets["eval"].prefix and env["TOKENIZER"] == sets["caption"].tokenizer_model
