"""The bundled demo set: rendered shapes whose detailed caption follows from the picture.

Each image shows 1-3 shapes (circle, square, triangle), each small or large, in one of six
colours, in distinct quadrants of a plain background. The caption states all of it in a fixed
order ("There are two shapes on a white background: a large red circle at the top left and a
small blue square at the bottom right."), so a tiny model can learn to read it off the visual
tokens. About a quarter of the samples have follow-up rounds (counts, colours, background) to
exercise multi-turn ``vicuna_v1``; a few are text-only.

``ensure_demo_dataset`` generates LLaVA-format JSON + PNGs, trains a small SentencePiece
tokenizer on the text, and runs the real preprocessing pipeline; everything is deterministic
from the seed and takes a few seconds, so the set is regenerated into a cache folder rather
than committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from megatron_croc.data.templates import LLAMA3_SYSTEM, VICUNA_SYSTEM

DEMO_VERSION = 1

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 180),
    "orange": (250, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
NUMBERS = ("zero", "one", "two", "three")
DETAIL_PROMPTS = (
    "Describe the image in detail.",
    "What do you see in this picture?",
    "Give a detailed description of the image.",
    "Describe the shapes in the image.",
)
TEXT_ONLY = (
    ("What shapes can appear in the pictures?", "The pictures show circles, squares and triangles."),
    ("Which colors can the shapes have?", "The shapes can be red, green, blue, yellow, purple or orange."),
    ("How many corners does a square have?", "A square has four corners."),
    ("How many corners does a triangle have?", "A triangle has three corners."),
)


@dataclass(kw_only=True, frozen=True)
class ShapeSpec:
    shape: str
    color: str
    size: str
    position: str


@dataclass(kw_only=True, frozen=True)
class SceneSpec:
    background: str
    shapes: tuple[ShapeSpec, ...]  # in POSITIONS order


def sample_scene(rng: np.random.Generator) -> SceneSpec:
    background = str(rng.choice(list(BACKGROUNDS)))
    n = int(rng.integers(1, 4))
    cells = sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())
    shapes = tuple(
        ShapeSpec(
            shape=str(rng.choice(SHAPES)),
            color=str(rng.choice(list(COLORS))),
            size=str(rng.choice(SIZES)),
            position=POSITIONS[c],
        )
        for c in cells
    )
    return SceneSpec(background=background, shapes=shapes)


def caption(scene: SceneSpec) -> str:
    parts = [f"a {s.size} {s.color} {s.shape} at the {s.position}" for s in scene.shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(scene.shapes)
    head = "There is one shape" if n == 1 else f"There are {NUMBERS[n]} shapes"
    return f"{head} on a {scene.background} background: {listed}."


def render(scene: SceneSpec, size: int = 64, *, jitter: np.random.Generator | None = None) -> Image.Image:
    """Draw the scene; each quadrant is a cell, shapes are centred in their cell. ``jitter``
    moves each shape by up to 1/16 of the image and scales it by 0.85-1.1, so that no two
    images are alike even where two scenes are (the recipe's held-out images)."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    half = size // 2
    for s in scene.shapes:
        col, row = POSITIONS.index(s.position) % 2, POSITIONS.index(s.position) // 2
        cx, cy = col * half + half // 2, row * half + half // 2
        r = half * (0.42 if s.size == "large" else 0.22)
        if jitter is not None:
            dx, dy = jitter.integers(-(size // 16), size // 16 + 1, size=2).tolist()
            cx, cy, r = cx + dx, cy + dy, r * float(jitter.uniform(0.85, 1.1))
        r = round(r)
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def follow_up_rounds(scene: SceneSpec, rng: np.random.Generator) -> list[tuple[str, str]]:
    """1-2 question/answer rounds whose answers follow from the picture."""
    options: list[tuple[str, str]] = []
    n = len(scene.shapes)
    options.append(("How many shapes are there?", "There is one shape." if n == 1 else f"There are {NUMBERS[n]} shapes."))
    options.append(("What is the background color?", f"The background is {scene.background}."))
    s = scene.shapes[int(rng.integers(n))]
    options.append((f"What color is the {s.shape} at the {s.position}?", f"The {s.shape} at the {s.position} is {s.color}."))
    options.append((f"What is at the {s.position}?", f"A {s.size} {s.color} {s.shape}."))
    empty = [p for p in POSITIONS if p not in {x.position for x in scene.shapes}]
    if empty:
        p = empty[int(rng.integers(len(empty)))]
        options.append((f"What is at the {p}?", f"Nothing, the {p} is empty."))
    k = int(rng.integers(1, 3))
    picks = rng.choice(len(options), size=k, replace=False)
    return [options[i] for i in sorted(picks.tolist())]


def generate_records(num_samples: int, seed: int, *, multi_turn_fraction: float = 0.25,
                     text_only_fraction: float = 0.03) -> Iterator[tuple[dict[str, Any], SceneSpec | None]]:
    """LLaVA-format records (image path ``images/{id}.png``) and their scenes, deterministically."""
    rng = np.random.default_rng(seed)
    for i in range(num_samples):
        sid = f"demo-{i:06d}"
        u = float(rng.random())
        if u < text_only_fraction:
            q, a = TEXT_ONLY[int(rng.integers(len(TEXT_ONLY)))]
            yield {"id": sid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}, None
            continue
        scene = sample_scene(rng)
        prompt = DETAIL_PROMPTS[int(rng.integers(len(DETAIL_PROMPTS)))]
        first = f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"
        convs = [{"from": "human", "value": first}, {"from": "gpt", "value": caption(scene)}]
        if u < text_only_fraction + multi_turn_fraction:
            for q, a in follow_up_rounds(scene, rng):
                convs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        yield {"id": sid, "image": f"images/{sid}.png", "conversations": convs}, scene


# ---------------------------------------------------------------------------------------------
# The three-stage recipe's splits (examples/croc_recipe_demo.sh, docs/EXPERIMENTS.md)
# ---------------------------------------------------------------------------------------------

# LLaVA-1.5's suffix for short-answer questions (its VQA data): the answer is scored by exact match.
SHORT_ANSWER = "Answer the question using a single word or phrase."
QUESTION_TYPES = ("count", "background", "color", "shape", "size", "position")
EVAL_TYPES = (*QUESTION_TYPES, "caption")
# split -> what it holds; "demo" is the embedded demo's mixed set (captions, follow-ups, text)
RECIPE_SPLITS = {
    "text": "text only: descriptions of imagined scenes and facts of the world (the toy LLM's pretraining)",
    "caption": "one image, one detailed caption (the align stage and stage 1.5)",
    "instruct": "one image, 1-3 short-answer questions, sometimes after a caption (the instruct stage)",
    "eval": "held-out images, one question each, with question_type and facts (tools/evaluate.py)",
}
_SPLIT_STREAMS = {"demo": 0, "text": 1, "caption": 2, "instruct": 3, "eval": 4}


def short_question(kind: str, scene: SceneSpec, rng: np.random.Generator) -> tuple[str, str]:
    """A question of ``kind`` (one of QUESTION_TYPES) whose short answer needs the picture."""
    n = len(scene.shapes)
    s = scene.shapes[int(rng.integers(n))]
    if kind == "count":
        return "How many shapes are there?", NUMBERS[n]
    if kind == "background":
        return "What is the background color?", scene.background
    if kind == "color":
        return f"What color is the {s.shape} at the {s.position}?", s.color
    if kind == "shape":
        return f"Which shape is at the {s.position}?", s.shape
    if kind == "size":
        return f"Is the {s.shape} at the {s.position} small or large?", s.size
    if kind == "position":
        p = POSITIONS[int(rng.integers(len(POSITIONS)))]
        there = next((x for x in scene.shapes if x.position == p), None)
        return f"What is at the {p}?", "nothing" if there is None else f"{there.size} {there.color} {there.shape}"
    raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")


def caption_facts(scene: SceneSpec) -> list[str]:
    """What a detailed caption must state, one fact each: the count, the background, and each
    shape with its size, colour and place (scored after tools/evaluate.py's normalisation)."""
    n = len(scene.shapes)
    return ["one shape" if n == 1 else f"{NUMBERS[n]} shapes", f"{scene.background} background",
            *(f"{s.size} {s.color} {s.shape} at the {s.position}" for s in scene.shapes)]


def _image_turn(prompt: str, rng: np.random.Generator) -> str:
    return f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"


def generate_split_records(split: str, num_samples: int, seed: int) -> Iterator[tuple[dict[str, Any], SceneSpec | None]]:
    """LLaVA-format records of one of the recipe's ``RECIPE_SPLITS`` (or the ``demo`` set), and
    their scenes. Each split draws from its own stream of ``seed``: its scenes and images are
    its own."""
    if split == "demo":
        yield from generate_records(num_samples, seed)
        return
    if split not in RECIPE_SPLITS:
        raise ValueError(f"unknown demo split {split!r}; expected demo or one of {sorted(RECIPE_SPLITS)}")
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
    for i in range(num_samples):
        sid = f"{split}-{i:06d}"
        scene = sample_scene(rng)
        if split == "text":
            if rng.random() < 0.1:
                q, a = TEXT_ONLY[int(rng.integers(len(TEXT_ONLY)))]
            else:
                q, a = "Imagine a picture of shapes and describe it.", caption(scene)
            yield {"id": sid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}, None
            continue
        record: dict[str, Any] = {"id": sid, "image": f"images/{sid}.png"}
        if split == "caption":
            prompt = DETAIL_PROMPTS[int(rng.integers(len(DETAIL_PROMPTS)))]
            convs = [{"from": "human", "value": _image_turn(prompt, rng)}, {"from": "gpt", "value": caption(scene)}]
        elif split == "instruct":
            rounds = []
            if rng.random() < 0.3:
                rounds.append((DETAIL_PROMPTS[int(rng.integers(len(DETAIL_PROMPTS)))], caption(scene)))
            for kind in rng.choice(QUESTION_TYPES, size=int(rng.integers(1, 4)), replace=False).tolist():
                q, a = short_question(kind, scene, rng)
                rounds.append((f"{q}\n{SHORT_ANSWER}", a))
            convs = []
            for j, (q, a) in enumerate(rounds):
                convs += [{"from": "human", "value": _image_turn(q, rng) if j == 0 else q}, {"from": "gpt", "value": a}]
        else:  # eval: the question types in turn, one question per image
            kind = EVAL_TYPES[i % len(EVAL_TYPES)]
            if kind == "caption":
                q, a = DETAIL_PROMPTS[0], caption(scene)
                record["facts"] = caption_facts(scene)
            else:
                q, a = short_question(kind, scene, rng)
                q = f"{q}\n{SHORT_ANSWER}"
            record["question_type"] = kind
            convs = [{"from": "human", "value": _image_turn(q, rng)}, {"from": "gpt", "value": a}]
        record["conversations"] = convs
        yield record, scene


def write_demo_source(out_dir: str | os.PathLike[str], *, num_samples: int, seed: int,
                      render_size: int = 64, split: str = "demo") -> tuple[str, str]:
    """Write ``demo.json`` (LLaVA format) and ``images/*.png``; return (json path, image folder).
    The recipe's splits jitter their shapes (see ``render``) from the split's own stream."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    jitter = None if split == "demo" else np.random.default_rng([seed, _SPLIT_STREAMS[split], 1])
    for record, scene in generate_split_records(split, num_samples, seed):
        if scene is not None and "image" in record:
            render(scene, render_size, jitter=jitter).save(out / record["image"], format="PNG", optimize=False)
        records.append(record)
    path = out / "demo.json"
    path.write_text(json.dumps(records, indent=0))
    return str(path), str(out)


def tokenizer_corpus(records: list[dict[str, Any]]) -> list[str]:
    # The template text occurs in every sample: weight it so BPE learns its words as single pieces.
    lines = [VICUNA_SYSTEM, LLAMA3_SYSTEM, "USER: ASSISTANT:", "You are a helpful assistant."] * max(1, len(records) // 10)
    for r in records:
        lines += [t["value"].replace("<image>", "").strip() for t in r["conversations"]]
    return lines


def train_demo_tokenizer(records: list[dict[str, Any]], model_path: str | os.PathLike[str], *,
                         vocab_size: int = 640) -> str:
    """A small BPE SentencePiece model with byte fallback (so any text encodes), deterministic."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(records)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        hard_vocab_limit=False,  # the corpus is tiny; take what it supports
        character_coverage=1.0,
        # Keep "\n" and spaces exactly: the templates rely on them.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        num_threads=1,  # deterministic merges
        minloglevel=2,
    )
    Path(model_path).write_bytes(buf.getvalue())
    return str(model_path)


_CAPTION_WORDS = (
    "the a an of on in with and near behind under large small bright dark red green blue yellow white black "
    "gray wooden metal glass table chair window door street car tree sky cloud person dog cat building road "
    "light shadow wall floor plate cup book picture sign grass water river boat bridge mountain field"
).split()


def write_photo_like_source(out_dir: str | os.PathLike[str], *, num_samples: int, seed: int = 0,
                            width: int = 640, height: int = 480, caption_words: int = 150,
                            quality: int = 90) -> tuple[str, str]:
    """A LLaVA-format set of real-size JPEGs (smooth colour fields + sensor-like noise, ~60-120 KB at
    640x480) with ~``caption_words``-word detailed captions, for benchmarks at realistic cost.
    Returns (json path, image folder)."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_samples):
        coarse = Image.fromarray((rng.random((height // 32, width // 32, 3)) * 255).astype(np.uint8))
        arr = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
        arr = np.clip(arr + rng.integers(-12, 13, size=arr.shape, dtype=np.int16), 0, 255).astype(np.uint8)
        name = f"images/{i:06d}.jpg"
        Image.fromarray(arr).save(out / name, format="JPEG", quality=quality)
        words = rng.choice(_CAPTION_WORDS, size=caption_words)
        text = " ".join(words.tolist()).capitalize() + "."
        records.append({"id": f"photo-{i:06d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\n" + DETAIL_PROMPTS[i % len(DETAIL_PROMPTS)]},
            {"from": "gpt", "value": text}]})
    path = out / "photo.json"
    path.write_text(json.dumps(records))
    return str(path), str(out)


@dataclass(kw_only=True)
class DemoDataset:
    prefix: str  # pass as --data-path
    meta: dict[str, Any]  # the sidecar
    tokenizer_type: str
    tokenizer_model: str
    source_json: str
    image_folder: str


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # several ranks may call ensure_demo_dataset at once
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_demo_dataset(
    out_dir: str | os.PathLike[str],
    *,
    image_size: int = 32,
    num_samples: int = 2000,
    seed: int = 1234,
    template: str = "vicuna_v1",
    seq_length: int | None = 256,
    num_image_tokens: int = 16,
    image_transform: str = "pad",
    render_size: int = 64,
    tokenizer_model: str | os.PathLike[str] | None = None,
    split: str = "demo",
) -> DemoDataset:
    """Get (or build, in a few seconds) the demo dataset cached under ``out_dir``.

    The cache key covers every argument, so different settings live side by side in
    ``out_dir/demo-<key>/``; a folder without a finished sidecar is rebuilt.
    ``tokenizer_model``: tokenize with this SentencePiece model (e.g. the training set's, for a
    validation set) instead of training one on this set's text. ``split``: the embedded demo's
    mixed set, or one of the recipe's ``RECIPE_SPLITS``.
    """
    from megatron_croc.data.indexed import meta_path, read_meta
    from megatron_croc.data.preprocess import PreprocessConfig, run_preprocess

    params = {
        "version": DEMO_VERSION, "image_size": image_size, "num_samples": num_samples, "seed": seed,
        "template": template, "seq_length": seq_length, "num_image_tokens": num_image_tokens,
        "image_transform": image_transform, "render_size": render_size,
    }
    if split != "demo":  # the embedded demo's cache key stays as it was
        params["split"] = split
    if tokenizer_model is not None:
        params["tokenizer_sha256"] = hashlib.sha256(Path(tokenizer_model).read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(out_dir)
    folder = root / f"demo-{key}"
    prefix = str(folder / "demo")
    with _locked(root / f".demo-{key}.lock"):
        if not os.path.exists(meta_path(prefix)):
            if folder.exists():
                shutil.rmtree(folder)  # an interrupted build
            source_json, image_folder = write_demo_source(folder / "source", num_samples=num_samples, seed=seed,
                                                          render_size=render_size, split=split)
            records = json.loads(Path(source_json).read_text())
            if tokenizer_model is None:
                tok = train_demo_tokenizer(records, folder / "tokenizer.model")
            else:
                tok = str(folder / "tokenizer.model")
                shutil.copyfile(tokenizer_model, tok)
            run_preprocess(
                PreprocessConfig(
                    inputs=[source_json], image_folder=image_folder, output_prefix=prefix,
                    tokenizer_type="SentencePieceTokenizer", tokenizer_model=tok, template=template,
                    image_size=image_size, image_transform=image_transform, seq_length=seq_length,
                    num_image_tokens=num_image_tokens, workers=1, progress_bar=False,
                ),
                log=lambda _msg: None,
            )
            (folder / "demo_params.json").write_text(json.dumps(params, indent=1))
    meta = read_meta(prefix)
    return DemoDataset(
        prefix=prefix, meta=meta, tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=str(folder / "tokenizer.model"), source_json=str(folder / "source" / "demo.json"),
        image_folder=str(folder / "source"),
    )


RECIPE_SIZES = {"text": 2000, "caption": 2000, "instruct": 2000, "eval": 350}


def ensure_recipe_datasets(out_dir: str | os.PathLike[str], *, seed: int,
                           sizes: dict[str, int] | None = None, **kwargs: Any) -> dict[str, DemoDataset]:
    """The recipe's splits (``RECIPE_SPLITS``) for one seed, all tokenized with one SentencePiece
    model trained on the training splits' text (as a real recipe keeps its LLM's tokenizer).
    ``kwargs``: ``ensure_demo_dataset``'s image and sequence settings."""
    sizes = {**RECIPE_SIZES, **(sizes or {})}
    corpus = [r for split in ("text", "caption", "instruct")
              for r, _ in generate_split_records(split, sizes[split], seed)]
    key = hashlib.sha256(json.dumps([DEMO_VERSION, seed, sizes], sort_keys=True).encode()).hexdigest()[:12]
    tokenizer = Path(out_dir) / f"recipe-{key}" / "tokenizer.model"
    with _locked(Path(out_dir) / f".recipe-{key}.lock"):
        if not tokenizer.exists():
            tokenizer.parent.mkdir(parents=True, exist_ok=True)
            train_demo_tokenizer(corpus, tokenizer.with_suffix(".partial"))
            os.replace(tokenizer.with_suffix(".partial"), tokenizer)
    return {split: ensure_demo_dataset(out_dir, num_samples=sizes[split], seed=seed, split=split,
                                       tokenizer_model=tokenizer, **kwargs) for split in RECIPE_SPLITS}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from megatron_croc.quiet import quiet_known_warnings

    quiet_known_warnings()  # preprocessing imports megatron-core

    p = argparse.ArgumentParser(
        description="Build (or find in the cache) the demo dataset and print its prefix and tokenizer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="demo_data", help="cache folder; each setting gets demo-<key>/ inside")
    p.add_argument("--image-size", type=int, default=32, help="stored image resolution (the tiny model's)")
    p.add_argument("--num-samples", type=int, default=2000, help="number of records to generate")
    p.add_argument("--seed", type=int, default=1234, help="everything is deterministic from it")
    p.add_argument("--template", default="vicuna_v1", help="conversation template")
    p.add_argument("--seq-length", type=int, default=256, help="skip samples longer than this (none are)")
    p.add_argument("--num-image-tokens", type=int, default=16, help="visual tokens per image in the model")
    p.add_argument("--recipe", action="store_true",
                   help="build the three-stage recipe's splits instead (" + "; ".join(
                       f"{k}: {v}" for k, v in RECIPE_SPLITS.items()) + ") with one tokenizer, and write "
                   "recipe_seed<SEED>.env (TEXT_DATA=..., CAPTION_DATA=..., INSTRUCT_DATA=..., EVAL_DATA=..., "
                   "TOKENIZER=...) in --output-dir for examples/croc_recipe_demo.sh")
    for split, n in RECIPE_SIZES.items():
        p.add_argument(f"--{split}-samples", type=int, default=n, help=f"with --recipe: records of the {split} split")
    a = p.parse_args(argv)
    if a.recipe:
        sets = ensure_recipe_datasets(
            a.output_dir, seed=a.seed, sizes={split: getattr(a, f"{split}_samples") for split in RECIPE_SIZES},
            image_size=a.image_size, template=a.template, seq_length=a.seq_length,
            num_image_tokens=a.num_image_tokens)
        lines = [f"{split.upper()}_DATA={d.prefix}" for split, d in sets.items()]
        lines.append(f"TOKENIZER={sets['caption'].tokenizer_model}")
        env = Path(a.output_dir) / f"recipe_seed{a.seed}.env"
        env.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        for split, d in sets.items():
            print(f"{split}: {json.dumps(d.meta['counts'])}")
        return 0
    demo = ensure_demo_dataset(a.output_dir, image_size=a.image_size, num_samples=a.num_samples, seed=a.seed,
                               template=a.template, seq_length=a.seq_length, num_image_tokens=a.num_image_tokens)
    print(json.dumps({k: v for k, v in asdict(demo).items() if k != "meta"}, indent=1))
    print(json.dumps(demo.meta["counts"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
