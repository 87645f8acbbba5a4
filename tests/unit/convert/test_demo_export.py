"""The embedded demo, trained briefly by the real trainer, exported with its own SentencePiece
tokenizer: the export loads with AutoProcessor, tokenizes prompts as the data pipeline did, and
generate() continues a prompt with exactly the tokens the megatron model picks greedily."""

from __future__ import annotations

import json

import pytest
import torch

QUESTION = "Describe the image in detail."
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory, megatron_world):
    from megatron_croc.data.demo import ensure_demo_dataset
    from megatron_croc.training.arguments import parse_args
    from megatron_croc.training.pretrain import train

    root = tmp_path_factory.mktemp("demo_export")
    demo = ensure_demo_dataset(root / "data", image_size=32, num_image_tokens=16, seq_length=160, num_samples=200)
    save = root / "ckpt"
    # The trainer itself, in this process (a world of one, as megatron_world set up it). One
    # intra-op thread: the model is tiny, and on a loaded 2-core machine more threads made the
    # steps ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(parse_args(["--data-path", demo.prefix, "--vocab-size", "640", "--seq-length", "160",
                          "--micro-batch-size", "2", "--global-batch-size", "8", "--num-workers", "0", "--lr", "2e-3",
                          "--train-iters", "20", "--log-interval", "20", "--save", str(save)], world_size=1))
    finally:
        torch.set_num_threads(threads)
    return demo, save


def _megatron_greedy(ckpt, prompt_ids, image_id, image, pad_id, eos_id):
    """The reference: argmax over the megatron model's logits, one token at a time (no cache),
    in the inference setting (causal attention, no pool replacement), never ending the answer
    (generate() below runs with min_new_tokens, which suppresses EOS the same way)."""
    import dataclasses

    from megatron_croc.config import CrocConfig, model_preset
    from megatron_croc.models.attention import build_attention_layout
    from megatron_croc.models.croc import CrocModel
    from megatron_croc.training.checkpoint import load_checkpoint

    config = model_preset("tiny")
    config = config.replace(language=dataclasses.replace(config.language, vocab_size=640),
                            croc=CrocConfig(stage="instruct"))
    model = CrocModel(config).eval()
    load_checkpoint(str(ckpt), model_chunks=[model], optimizer=None, scheduler=None, stage="instruct")
    ids, new = list(prompt_ids), []
    for _ in range(NEW_TOKENS):
        row = torch.tensor([ids])
        visual = row == image_id
        n = row.shape[1]
        layout = build_attention_layout("causal", segment_ids=torch.ones(1, n, dtype=torch.int32), visual_mask=visual,
                                        loss_mask=torch.zeros(1, n))
        with torch.no_grad():
            logits = model(tokens=row.masked_fill(visual, pad_id), position_ids=torch.arange(n)[None], layout=layout,
                           visual_mask=visual, images=image[None], image_keys=torch.tensor([0]))
        scores = logits[0, -1, :640].clone()  # the real vocabulary, not megatron's padding rows
        scores[eos_id] = float("-inf")
        token = int(scores.argmax())
        new.append(token)
        ids.append(token)
    return new


def test_demo_checkpoint_exports_with_its_tokenizer_and_generates_as_megatron_does(demo_checkpoint, tmp_path,
                                                                                   megatron_world):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from megatron_croc.convert.cli import main
    from megatron_croc.data.constants import IMAGE_TOKEN_ID
    from megatron_croc.data.indexed import MultimodalIndexedDataset
    from megatron_croc.data.templates import VICUNA_SYSTEM, Turn, get_template
    from megatron_croc.data.tokenizers import build_tokenizer

    demo, ckpt = demo_checkpoint
    out = tmp_path / "hf"
    # a training --save folder: no conversion record, so the preset and vocabulary are given
    assert main(["megatron-to-hf", "--load", str(ckpt), "--save", str(out), "--model", "tiny", "--vocab-size", "640",
                 "--tokenizer", demo.tokenizer_model, "--no-progress"]) == 0
    processor = AutoProcessor.from_pretrained(str(out))
    model = AutoModelForImageTextToText.from_pretrained(str(out), trust_remote_code=True).eval()
    image_id = model.config.image_token_index
    assert image_id == 640 and json.loads((out / "config.json").read_text())["croc"]["image_token_added"]

    dataset = MultimodalIndexedDataset(demo.prefix)
    pixels = next(s.image for s in map(dataset.__getitem__, range(20)) if s.image is not None).copy()
    prompt = f"{VICUNA_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    inputs = processor(text=[prompt], images=[Image.fromarray(pixels.transpose(1, 2, 0))], return_tensors="pt")
    prompt_ids = inputs["input_ids"][0].tolist()
    assert prompt_ids.count(image_id) == 16
    # the exported tokenizer tokenizes as training did (the image run collapsed to the data's placeholder)
    ours = build_tokenizer("sentencepiece", demo.tokenizer_model)
    rendered = get_template("vicuna_v1").render([Turn(role="user", text=QUESTION, image=True),
                                                 Turn(role="assistant", text="x")], ours).tokens.tolist()
    collapsed = [t for i, t in enumerate(prompt_ids) if t != image_id or prompt_ids[i - 1] != image_id]
    collapsed = [IMAGE_TOKEN_ID if t == image_id else t for t in collapsed]
    assert collapsed == rendered[: len(collapsed)]

    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    hf_tokens = generated[0, len(prompt_ids):].tolist()
    image = torch.from_numpy(pixels)
    megatron_tokens = _megatron_greedy(ckpt, prompt_ids, image_id, image, ours.pad_id, ours.eos_id)
    assert hf_tokens == megatron_tokens, (ours.decode(hf_tokens), ours.decode(megatron_tokens))
    assert len(set(hf_tokens)) > 2  # a real continuation, not one token repeated
