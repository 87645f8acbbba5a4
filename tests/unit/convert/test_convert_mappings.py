"""The declarative mappings: each kind's layout and round trip, the name rules for every input
layout, pipeline placement, full coverage of CrocModel and of transformers' LLaVA, and the
HF config -> ModelConfig checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import tiny_hf as T

from megatron_croc.convert.hf import (
    ConvertError,
    check_against_preset,
    language_config_from_hf,
    model_config_from_hf,
    vision_config_from_hf,
)
from megatron_croc.convert.mappings import (
    HF_VISION,
    GatedMLP,
    MappingEngine,
    MappingError,
    PaddedVocab,
    QKVFusion,
    Reshape,
    canonical_hf_name,
    croc_extras_mappings,
    croc_llava_mappings,
    local_spec_name,
    pp_placement,
    to_global_name,
    to_local_name,
)


def test_qkv_fusion_is_per_query_group():
    heads, groups, d, h = 4, 2, 3, 5
    q = torch.arange(heads * d * h, dtype=torch.float32).reshape(heads * d, h)
    k = -torch.arange(groups * d * h, dtype=torch.float32).reshape(groups * d, h) - 1
    v = 1000 + torch.arange(groups * d * h, dtype=torch.float32).reshape(groups * d, h)
    kind = QKVFusion(heads=heads, groups=groups, head_dim=d)
    fused = kind.to_megatron([q, k, v])
    # group g: its q heads (2g, 2g+1: HF's repeat_kv pairs query head j with kv head j // 2), k_g, v_g
    expected = torch.cat([torch.cat([q[2 * g * d:(2 * g + 2) * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]])
                          for g in range(groups)])
    assert torch.equal(fused, expected)
    assert [torch.equal(a, b) for a, b in zip(kind.to_hf(fused), (q, k, v))] == [True] * 3
    assert kind.hf_shapes(tuple(fused.shape)) == [(heads * d, h), (groups * d, h), (groups * d, h)]
    # biases (CLIP: groups = heads) fuse the same way
    clip = QKVFusion(heads=heads, groups=heads, head_dim=d)
    qb, kb, vb = (torch.randn(heads * d) for _ in range(3))
    assert all(torch.equal(a, b) for a, b in zip(clip.to_hf(clip.to_megatron([qb, kb, vb])), (qb, kb, vb)))
    assert torch.equal(clip.to_megatron([qb, kb, vb])[: 3 * d], torch.cat([qb[:d], kb[:d], vb[:d]]))


def test_gated_vocab_and_reshape_kinds():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = GatedMLP().to_megatron([gate, up])
    assert torch.equal(fc1, torch.cat([gate, up])) and all(torch.equal(a, b) for a, b in zip(GatedMLP().to_hf(fc1), (gate, up)))

    emb = torch.randn(300, 8)
    vocab = PaddedVocab(vocab=300, padded=384, hf_rows=301)
    padded = vocab.to_megatron([torch.cat([emb, torch.ones(1, 8)])])  # an <image> row on the HF side
    assert padded.shape == (384, 8) and torch.equal(padded[:300], emb) and not padded[300:].any()
    back = vocab.to_hf(padded)[0]
    assert back.shape == (301, 8) and torch.equal(back[:300], emb) and not back[300:].any()
    assert PaddedVocab(vocab=300, padded=384, hf_rows=300).to_hf(padded)[0].shape == (300, 8)

    cls = torch.randn(32)
    assert Reshape((32,)).to_hf(cls.reshape(1, 1, 32))[0].shape == (32,)


def test_engine_checks_shapes_and_names_the_tensor():
    config = model_config_from_hf(T.llama_config(), T.clip_config())
    engine = MappingEngine(config, croc_llava_mappings(config))
    name = "language_model.decoder.layers.1.self_attention.linear_qkv.weight"
    shapes = {"model.language_model.layers.1.self_attn.q_proj.weight": (64, 64),
              "model.language_model.layers.1.self_attn.k_proj.weight": (64, 64),  # should be 2 kv heads: 32
              "model.language_model.layers.1.self_attn.v_proj.weight": (32, 64)}
    with pytest.raises(MappingError, match=r"k_proj\.weight: shape \(64, 64\), expected \(32, 64\)"):
        engine.to_megatron(name, lambda n: torch.zeros(shapes[n]), (128, 64))


@pytest.mark.parametrize("name,source,expected", [
    ("model.layers.3.mlp.up_proj.weight", "llm", "model.language_model.layers.3.mlp.up_proj.weight"),
    ("lm_head.weight", "llm", "lm_head.weight"),
    ("model.layers.0.self_attn.rotary_emb.inv_freq", "llm", None),
    ("encoder.layers.2.mlp.fc1.bias", "vision", f"{HF_VISION}.encoder.layers.2.mlp.fc1.bias"),  # transformers 5
    ("vision_model.pre_layrnorm.weight", "vision", f"{HF_VISION}.pre_layrnorm.weight"),  # transformers 4 / CLIPModel
    ("text_model.embeddings.token_embedding.weight", "vision", None),
    ("logit_scale", "vision", None),
    ("model.mm_projector.0.weight", "projector", "model.multi_modal_projector.linear_1.weight"),
    ("model.mm_projector.2.bias", "projector", "model.multi_modal_projector.linear_2.bias"),
    ("language_model.model.norm.weight", "llava", "model.language_model.norm.weight"),  # llava-hf (transformers 4)
    ("language_model.lm_head.weight", "llava", "lm_head.weight"),
    ("vision_tower.vision_model.post_layernorm.bias", "llava", f"{HF_VISION}.post_layernorm.bias"),
    ("model.vision_tower.encoder.layers.0.layer_norm1.weight", "llava", f"{HF_VISION}.encoder.layers.0.layer_norm1.weight"),
    ("something.else", "llm", ""),
])
def test_canonical_names(name, source, expected):
    assert canonical_hf_name(name, source) == expected


def test_pipeline_placement_and_names():
    assert [pp_placement(i, 8, 4) for i in (0, 1, 2, 7)] == [(0, 0), (0, 1), (1, 0), (3, 1)]
    local = "language_model.decoder.layers.1.mlp.linear_fc2.weight"
    assert to_global_name(local, 4) == "language_model.decoder.layers.5.mlp.linear_fc2.weight"
    assert to_local_name(to_global_name(local, 4), 4) == local
    assert to_global_name("vision.encoder.decoder.layers.1.mlp.linear_fc2.weight", 4).endswith("layers.1.mlp.linear_fc2.weight")
    assert local_spec_name("x.layers.0.self_attention.linear_qkv.layer_norm_weight") == "x.layers.0.input_layernorm.weight"
    assert local_spec_name("x.layers.0.mlp.linear_fc1.layer_norm_weight") == "x.layers.0.pre_mlp_layernorm.weight"


@pytest.mark.parametrize("tied", [False, True])
def test_every_parameter_on_both_sides_has_one_mapping(megatron_world, tied):
    """Each CrocModel parameter (comprehension stage: pool and VTR head too) is made by exactly
    one mapping, and the HF side names exactly transformers' LLaVA parameters (less CLIP's last
    layer and post-LN, which LLaVA computes but does not use)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from megatron_croc.config import CrocConfig
    from megatron_croc.convert.streaming import build_meta_stage

    config = model_config_from_hf(T.llama_config(tied=tied), T.clip_config()).replace(croc=CrocConfig(stage="croc", pool_size=64))
    model = build_meta_stage(config)
    names = [n for n, v in model.state_dict().items() if v is not None]
    engine = MappingEngine(config, croc_llava_mappings(config) + croc_extras_mappings(names))
    assert sorted(engine.by_megatron) == sorted(names)
    for name, param in model.state_dict().items():
        if param is not None:
            engine.expected_hf_shapes(name, tuple(param.shape))

    llava = LlavaForConditionalGeneration(LlavaConfig(text_config=T.llama_config(tied=tied), vision_config=T.clip_config(),
                                                      image_token_index=T.VOCAB - 1))
    hf_names = {n for n in llava.state_dict() if not (tied and n == "lm_head.weight")}
    unused = {n for n in hf_names if n.startswith((f"{HF_VISION}.encoder.layers.2.", f"{HF_VISION}.post_layernorm."))}
    assert set(engine.hf_names("model")) == hf_names - unused
    assert sorted(engine.hf_names("extras")) == sorted(n for n in names if n.startswith(("pool.", "vtr_head.")))


def test_config_from_hf_and_preset_checks():
    config = model_config_from_hf(T.llama_config(), T.clip_config())
    lm, vis = config.language, config.vision
    assert (lm.num_layers, lm.hidden_size, lm.num_attention_heads, lm.num_query_groups, lm.ffn_hidden_size) == (2, 64, 4, 2, 128)
    assert (lm.vocab_size, lm.rotary_base, lm.untie_embeddings) == (T.VOCAB, T.ROPE_THETA, True)
    assert (vis.num_layers, vis.num_built_layers, vis.num_image_tokens, vis.hidden_size) == (3, 2, 16, 32)
    assert not model_config_from_hf(T.llama_config(tied=True), T.clip_config()).language.untie_embeddings

    with pytest.raises(ConvertError, match=r"language\.num_layers is 32 in the preset but 2 in llm/config\.json \(num_hidden_layers\)"):
        check_against_preset("vicuna-7b", config, {"language": "llm/config.json"})
    # a matching architecture passes, the vocabulary comes from the checkpoint
    from megatron_croc.config import model_preset

    tiny = model_preset("tiny")
    same = dataclasses.replace(tiny, language=dataclasses.replace(tiny.language, vocab_size=1000))
    assert check_against_preset("tiny", same).language.vocab_size == 1000
    with pytest.raises(ConvertError, match="unknown --model"):
        check_against_preset("gpt-5", config)

    scaled = T.llama_config()
    scaled.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    with pytest.raises(ConvertError, match="RoPE scaling 'llama3' is not supported"):
        language_config_from_hf(scaled)
    biased = T.llama_config()
    biased.attention_bias = True
    with pytest.raises(ConvertError, match="attention_bias"):
        language_config_from_hf(biased)
    gelu = T.clip_config()
    gelu.hidden_act = "gelu"
    with pytest.raises(ConvertError, match="quick_gelu"):
        vision_config_from_hf(gelu)
