"""Tiny random HuggingFace models for the conversion tests (no hub downloads): a Llama LLM with
grouped-query attention, a CLIP vision tower, an mlp2x_gelu projector, the LLaVA reference
built from them, and a batch in both our format and transformers'."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300  # pads to 384 at TP=1 and to 512 at TP=2: exercises both paddings
# The reference LLaVA reads id VOCAB - 1 as <image>; our shipped LM head fixes that logit at -inf,
# so logits are compared over the ids below it.
TEXT_IDS = VOCAB - 1
IMAGE_SIZE, PATCH = 32, 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
ROPE_THETA = 500000.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def llama_config(*, tied: bool = False, vocab: int = VOCAB):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=256, rope_theta=ROPE_THETA, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def clip_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1), so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def make_hf_models(root: Path, *, tied: bool = False, seed: int = 0, with_processors: bool = False) -> dict[str, Path]:
    """Save a LlamaForCausalLM, a CLIPVisionModel and a projector file under ``root`` (with a
    tokenizer and an image processor when asked)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel, LlamaForCausalLM

    torch.manual_seed(seed)
    llm = LlamaForCausalLM(llama_config(tied=tied)).eval()
    clip = CLIPVisionModel(clip_config()).eval()
    _randomize(llm, seed + 1)
    _randomize(clip, seed + 2)
    paths = {"llm": root / "llm", "vision": root / "clip", "projector": root / "mm_projector.safetensors"}
    llm.save_pretrained(paths["llm"])
    clip.save_pretrained(paths["vision"])
    g = torch.Generator().manual_seed(seed + 3)
    projector = {
        "model.mm_projector.0.weight": 0.1 * torch.randn(64, 32, generator=g),
        "model.mm_projector.0.bias": 0.1 * torch.randn(64, generator=g),
        "model.mm_projector.2.weight": 0.1 * torch.randn(64, 64, generator=g),
        "model.mm_projector.2.bias": 0.1 * torch.randn(64, generator=g),
    }
    save_file(projector, str(paths["projector"]))
    if with_processors:
        tokenizer().save_pretrained(paths["llm"])
        from transformers import CLIPImageProcessor

        CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(paths["vision"])
    return paths


def tokenizer():
    """A word-level tokenizer with exactly VOCAB tokens (no <image>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def reference_llava(paths: dict[str, Path], *, image_token_index: int):
    """transformers' LLaVA (with Croc's L2 norm: our shipped subclass) assembled from the HF
    parts by plain prefix renames — independent of our mappings."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from megatron_croc.convert.hf_modeling.modeling_croc import CrocLlavaForConditionalGeneration

    text = LlamaConfig.from_pretrained(paths["llm"])
    vision = CLIPVisionConfig.from_pretrained(paths["vision"])
    cfg = LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=image_token_index,
        image_seq_length=NUM_IMAGE_TOKENS, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=text.tie_word_embeddings,
    )
    model = CrocLlavaForConditionalGeneration(cfg).eval()
    state = {}
    for name, t in load_file(paths["llm"] / "model.safetensors").items():
        state[name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name] = t
    for name, t in load_file(paths["vision"] / "model.safetensors").items():
        state["model.vision_tower." + name.removeprefix("vision_model.")] = t
    for name, t in load_file(paths["projector"]).items():
        state[name.replace("model.mm_projector.0.", "model.multi_modal_projector.linear_1.")
              .replace("model.mm_projector.2.", "model.multi_modal_projector.linear_2.")] = t
    if text.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(m == "lm_head.weight" for m in missing) if text.tie_word_embeddings else not missing, missing
    if text.tie_word_embeddings:
        model.tie_weights()
    return model


ROWS = [
    [dict(prompt=3, image=True, question=2, answer=5)],
    [dict(prompt=2, image=True, question=4, answer=4)],
]
SEQ = 3 + NUM_IMAGE_TOKENS + 2 + 5


def batch():
    """Our micro-batch (no padding: every row is full) for the tiny models."""
    from megatron_croc.testing import synthetic_batch

    # text ids stay below VOCAB - 1, the reference's image token
    return synthetic_batch(num_image_tokens=NUM_IMAGE_TOKENS, image_size=IMAGE_SIZE, vocab_size=VOCAB - 1,
                           seq_length=SEQ, rows=ROWS, seed=3)


def hf_inputs(b: dict, image_token_index: int) -> dict[str, torch.Tensor]:
    """The same batch for transformers: the image token at the visual positions, CLIP-normalised
    float pixels."""
    input_ids = b["tokens"].clone()
    input_ids[b["visual_mask"]] = image_token_index
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixel_values = (b["images"].float() / 255.0 - mean) / std
    return {"input_ids": input_ids, "pixel_values": pixel_values, "attention_mask": torch.ones_like(input_ids)}


def our_logits(model, b: dict) -> torch.Tensor:
    """Our forward (TP=1, one stage) -> logits [B, S, padded vocab]."""
    from megatron_croc.models.attention import build_attention_layout

    layout = build_attention_layout("causal", segment_ids=b["segment_ids"], visual_mask=b["visual_mask"],
                                    loss_mask=b["loss_mask"])
    with torch.no_grad():
        return model(tokens=b["tokens"], position_ids=b["position_ids"], layout=layout,
                     visual_mask=b["visual_mask"], images=b["images"], image_keys=b["image_keys"])


def canonical_tensors(sources: list[tuple[str, Path]]) -> dict[str, torch.Tensor]:
    """Every tensor of some HF inputs under its canonical LLaVA name."""
    from megatron_croc.convert.sources import TensorSource

    out = {}
    for kind, path in sources:
        source = TensorSource(path, kind)
        out.update({name: source.get(name) for name in source.entries})
        source.close()
    return out


def assert_export_equals_inputs(export: Path, paths: dict[str, Path], *, vocab: int = VOCAB) -> None:
    """Every tensor of the HF inputs is in the export, bit for bit (same dtype); the vocabulary
    tensors may carry the appended <image> row, which is zero."""
    inputs = canonical_tensors([("llm", paths["llm"]), ("vision", paths["vision"]), ("projector", paths["projector"])])
    exported = canonical_tensors([("llava", export)])
    assert set(inputs) == set(exported), set(inputs) ^ set(exported)
    for name, t in inputs.items():
        got = exported[name]
        assert got.dtype == t.dtype, (name, got.dtype, t.dtype)
        if got.shape != t.shape and name in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
            assert got.shape[0] == vocab + 1 and not got[vocab:].any(), name
            got = got[:vocab]
        assert torch.equal(got, t), f"{name} differs after HF -> megatron -> HF"
