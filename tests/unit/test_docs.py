"""The examples in docs/DATA.md and docs/CONVERT.md run as written.

Every ```python and ```bash block is either run (in a scratch folder, with small stand-ins for
the datasets and models it names: same file names, same commands and code) or listed in EXTERNAL with the
reason it cannot run here (7B weights, several GPUs); the tool commands of those are still
parsed by the tools' own argument parsers, so a renamed flag is caught. A new block that is in
neither list fails this test until it is classified.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit" / "convert"))

# The blocks run here, by their first line.
STAGES = "# Stage 1 (alignment, LCS-558K): plain template, resize + centre crop"
READING = "from megatron_croc.data.dataset import DataLoaderConfig, build_data_loader"
DEMO = "from megatron_croc.data.demo import ensure_demo_dataset"
LOAD_EXPORT = "from transformers import AutoModelForImageTextToText, AutoProcessor"
RUN = {("DATA.md", STAGES), ("DATA.md", READING), ("DATA.md", DEMO), ("CONVERT.md", LOAD_EXPORT)}

# (doc, first line of the block) -> why it cannot run on a CI machine
EXTERNAL = {
    ("CONVERT.md", "# stage 1 (align): Vicuna-7B-v1.5 + CLIP ViT-L/14-336, for a TP=2 PP=2 run in bf16"):
        "Vicuna-7B / CLIP-L / Llama-3-8B weights (the presets check the real sizes), a 4-process training run",
    ("CONVERT.md", "python tools/convert_checkpoint.py megatron-to-hf --load runs/croc-instruct --save hf/croc-7b \\"):
        "a trained Vicuna-7B checkpoint and the original HF folders",
}


def doc_blocks(name: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced python/bash block of docs/NAME."""
    text = (REPO / "docs" / name).read_text()
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(python|bash)\n(.*?)^```", text, re.M | re.S)]


def commands(code: str) -> list[list[str]]:
    """The commands of a bash block (continuations joined, comments dropped), split like a shell."""
    joined = re.sub(r"\\\n", " ", code)
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run_tool_commands(code: str, cwd: Path) -> None:
    """Each ``python tools/X.py ARGS`` of a bash block through the tool's own ``main(ARGS)``, in
    ``cwd``, globs expanded as the shell would (tools/X.py only calls that main; running it in
    this process spares an interpreter start per command)."""
    from megatron_croc.convert.cli import main as convert_main
    from megatron_croc.data.preprocess import main as preprocess_main

    mains = {"tools/preprocess_data.py": preprocess_main, "tools/convert_checkpoint.py": convert_main}
    old = os.getcwd()
    os.chdir(cwd)
    try:
        for argv in commands(code):
            assert argv[0] == "python" and argv[1] in mains, f"not a tool command: {argv}"
            args = [a for arg in argv[2:] for a in (sorted(glob.glob(arg)) if glob.has_magic(arg) else [arg])]
            assert mains[argv[1]](args) == 0, argv
    finally:
        os.chdir(old)


def run_python(code: str, cwd: Path, namespace: dict) -> dict:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(code, "<doc block>", "exec"), namespace)
    finally:
        os.chdir(old)
    return namespace


def _stage_inputs(root: Path) -> None:
    """Stand-ins for the files the stage commands of DATA.md name: a few LLaVA records each,
    their images, and a SentencePiece tokenizer at vicuna-7b-v1.5/tokenizer.model."""
    from PIL import Image

    from megatron_croc.data.demo import generate_records, train_demo_tokenizer

    records = [r for r, _ in generate_records(40, seed=3)]
    (root / "vicuna-7b-v1.5").mkdir(parents=True)
    train_demo_tokenizer(records, root / "vicuna-7b-v1.5" / "tokenizer.model")

    def sample(i: int, image: str | None, turns: list[dict]) -> dict:
        rec = {"id": f"s{i}", "conversations": turns}
        if image:
            rec["image"] = image
        return rec

    q = lambda text, answer: [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]  # noqa: E731
    for folder, name in (("LLaVA-Pretrain/images", "00000/a.jpg"), ("images", "b.png"), ("llava_images", "coco/c.jpg")):
        path = root / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 32), (200, 30, 30)).save(path)
    (root / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(
        [sample(i, "00000/a.jpg", q("<image>\nRender a clear and concise summary of the photo.", "a red image"))
         for i in range(3)]))
    (root / "croc_1.5m_part1.jsonl").write_text("".join(
        json.dumps(sample(i, "b.png", q("<image>\nDescribe the image in detail.", "A red rectangle."))) + "\n"
        for i in range(3)))
    (root / "llava_v1_5_mix665k.json").write_text(json.dumps(
        [sample(0, "coco/c.jpg", q("What colour is it?\n<image>", "Red.")), sample(1, None, q("Hello?", "Hi."))]))


def test_every_block_is_run_or_marked_external():
    seen = set()
    for doc in ("DATA.md", "CONVERT.md"):
        for _, code in doc_blocks(doc):
            key = (doc, code.splitlines()[0])
            seen.add(key)
            assert key in EXTERNAL or key in RUN, f"classify this new block of docs/{doc}: {key[1]!r}"
    assert not (set(EXTERNAL) | set(RUN)) - seen, "a listed block is no longer in the docs"


def test_external_blocks_use_only_existing_flags():
    from megatron_croc.convert.cli import build_parser as convert_parser
    from megatron_croc.data.preprocess import build_parser as preprocess_parser

    parsers = {"tools/convert_checkpoint.py": convert_parser(), "tools/preprocess_data.py": preprocess_parser()}
    checked = 0
    for doc, first_line in EXTERNAL:
        code = next(c for _, c in doc_blocks(doc) if c.splitlines()[0] == first_line)
        for argv in commands(code):
            if argv[:1] == ["python"] and argv[1] in parsers and "..." not in argv:
                parsers[argv[1]].parse_args(argv[2:])  # exits (fails the test) on an unknown flag
                checked += 1
    assert checked >= 4


def test_data_md_examples_run_as_written(tmp_path):
    blocks = {code.splitlines()[0]: code for _, code in doc_blocks("DATA.md")}
    _stage_inputs(tmp_path)
    run_tool_commands(blocks[STAGES], tmp_path)
    for stage in ("stage1", "stage15", "stage2"):
        meta = json.loads((tmp_path / "data" / f"{stage}.meta.json").read_text())
        assert meta["counts"]["samples"] >= 2, (stage, meta["counts"])
    # the reading example blends stage 1.5 with a second dataset: stage 2 under the name it uses
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copyfile(tmp_path / "data" / f"stage2{suffix}", tmp_path / "data" / f"extra{suffix}")
    ns = run_python(blocks[READING], tmp_path, {"dp_rank": 0, "dp_size": 1, "consumed": 0, "ckpt": {}})
    assert ns["batch"]["tokens"].shape == (4, 2048) and ns["ckpt"]["data"]["consumed_samples"] == 4
    ns = run_python(blocks[DEMO], tmp_path, {})
    assert ns["demo"].meta["counts"]["samples"] > 1900


def test_convert_md_python_example_runs_as_written(tmp_path, megatron_world):
    import tiny_hf as T

    from megatron_croc.convert.hf import hf_to_megatron, megatron_to_hf

    # an export at the path the example loads
    paths = T.make_hf_models(tmp_path / "models", with_processors=True)
    ckpt = hf_to_megatron(tmp_path / "ckpt", model="from-hf", progress=False, **{k: paths[k] for k in ("llm", "vision", "projector")})
    megatron_to_hf(ckpt, tmp_path / "hf" / "croc-7b", llm=str(paths["llm"]), vision=str(paths["vision"]), progress=False)
    blocks = {code.splitlines()[0]: code for _, code in doc_blocks("CONVERT.md")}
    ns = run_python(blocks[LOAD_EXPORT], tmp_path, {})
    assert type(ns["model"]).__name__ == "CrocLlavaForConditionalGeneration"
    assert type(ns["processor"]).__name__ == "LlavaProcessor"
