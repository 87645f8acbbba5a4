"""The CrocModel on one process: forward/backward, stage presets, bad input, config checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_croc.config import ConfigError, CrocConfig, ParallelConfig, PrecisionConfig, model_preset, validate
from megatron_croc.models.attention import build_attention_layout
from megatron_croc.models.croc import CrocModel, CrocOutputs
from megatron_croc.testing import croc_forward_backward, synthetic_batch

ROWS = [
    [dict(prompt=3, image=True, question=2, answer=5)],
    [dict(prompt=1, image=True, question=0, answer=4), dict(prompt=2, image=False, question=1, answer=3)],
]


def _batch(config, rows=ROWS, seq_length=48, seed=0):
    return synthetic_batch(
        num_image_tokens=config.vision.num_image_tokens, image_size=config.vision.image_size,
        vocab_size=config.language.vocab_size, seq_length=seq_length, rows=rows, seed=seed,
    )


def _run(model, config, batch, *, backward=True, visual_prefetch=None, visual_index=None):
    return croc_forward_backward(model, config, batch, backward=backward, visual_prefetch=visual_prefetch,
                                 visual_index=visual_index)


def _model(stage="croc", **croc):
    config = model_preset("tiny", croc=CrocConfig(stage=stage, pool_size=64, **croc))
    torch.manual_seed(0)
    return config, CrocModel(config)


def test_croc_stage_reports_both_losses_and_trains_what_it_should(megatron_world):
    config, model = _model("croc")
    out, loss, parts = _run(model, config, _batch(config))
    assert isinstance(out, CrocOutputs) and out.lm_loss_per_token.shape == (2, 48)
    assert set(parts) == {"lm loss", "vtr loss"}
    torch.testing.assert_close(loss, parts["lm loss"] + 10.0 * parts["vtr loss"])
    for name, p in model.named_parameters():
        if name.startswith("vision.encoder."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad, name
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


STAGE_TRAINABLE = {
    # SPEC §1.5: align trains the projector only; croc and instruct all but the vision encoder
    "align": {"vision.projector"},
    "croc": {"vision.projector", "pool", "language_model", "vtr_head"},
    "instruct": {"vision.projector", "language_model"},
}


@pytest.mark.parametrize("stage", ["align", "croc", "instruct"])
def test_stage_presets_freeze_exactly_what_the_spec_says(megatron_world, stage):
    config, model = _model(stage)
    top = {n.split(".")[0] if not n.startswith("vision.") else ".".join(n.split(".")[:2])
           for n, _ in model.named_parameters()}
    assert ("pool" in top) == (stage == "croc") and ("vtr_head" in top) == (stage == "croc")
    trainable = {".".join(n.split(".")[:2]) if n.startswith("vision.") else n.split(".")[0]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == STAGE_TRAINABLE[stage]
    assert config.croc.attention_variant == ("visual" if stage == "croc" else "causal")
    _, _, parts = _run(model, config, _batch(config))
    assert ("vtr loss" in parts) == (stage == "croc")
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_masked_only_vtr_loss_and_prefix_attention_run(megatron_world):
    config, model = _model("croc", vtr_loss_positions="masked", attention="prefix", matcher="nearest")
    _, loss, parts = _run(model, config, _batch(config))
    assert torch.isfinite(loss) and parts["vtr loss"] > 0


def test_text_only_batch_keeps_every_trainable_parameter_in_the_graph(megatron_world):
    config, model = _model("croc")
    rows = [[dict(prompt=4, image=False, question=2, answer=6)]]
    _, loss, parts = _run(model, config, _batch(config, rows=rows, seq_length=16))
    assert parts["vtr loss"] == 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
    # direct callers may leave out the image keys of a text-only batch
    batch = _batch(config, rows=rows, seq_length=16)
    batch["image_keys"] = None
    assert _run(model, config, batch)[2]["vtr loss"] == 0


def test_prefetched_visual_work_gives_the_same_loss_and_gradients(megatron_world):
    config, model = _model("croc")
    batch = _batch(config)
    _, loss, _ = _run(model, config, batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert model.prefetches_visual
    prefetch = model.prefetch_visual(batch["images"], batch["image_keys"])
    _, loss_ahead, _ = _run(model, config, batch, visual_prefetch=prefetch)
    # the same tokens, costs and assignment: bit-identical, not merely close
    assert torch.equal(loss_ahead, loss)
    for name, p in model.named_parameters():
        if name in grads:
            assert torch.equal(p.grad, grads[name]), name
        else:
            assert p.grad is None, name
    with pytest.raises(ValueError, match="other images"):
        _run(model, config, _batch(config, seed=1), visual_prefetch=prefetch, backward=False)
    assert model.prefetch_visual(batch["images"][:0], batch["image_keys"][:0]) is None


def test_visual_index_from_the_host_gives_the_same_step(megatron_world):
    config, model = _model("croc", vtr_loss_positions="masked")
    batch = _batch(config)
    _, loss, _ = _run(model, config, batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    index = batch["visual_mask"].flatten().nonzero().squeeze(1)
    _, loss_indexed, _ = _run(model, config, batch, visual_index=index)
    assert torch.equal(loss_indexed, loss)
    for name, grad in grads.items():
        assert torch.equal(dict(model.named_parameters())[name].grad, grad), name
    with pytest.raises(ValueError, match="not a multiple of"):
        _run(model, config, batch, visual_index=index[:-1], backward=False)


@pytest.mark.parametrize("setting", ["nearest", "align", "unfrozen encoder"])
def test_visual_prefetch_only_where_it_saves_time(megatron_world, setting):
    stage, croc = "croc", {}
    if setting == "nearest":
        croc = dict(matcher="nearest")
    elif setting == "align":
        stage = "align"
    config = model_preset("tiny", croc=CrocConfig(stage=stage, pool_size=64, **croc))
    if setting == "unfrozen encoder":
        config = config.replace(vision=dataclasses.replace(config.vision, frozen=False))
    model = CrocModel(config)
    assert not model.prefetches_visual
    batch = _batch(config)
    with pytest.raises(RuntimeError, match="prefetch_visual needs"):
        model.prefetch_visual(batch["images"], batch["image_keys"])


def test_bad_input_gives_clear_errors(megatron_world):
    config, model = _model("croc")
    batch = _batch(config)
    layout = build_attention_layout("visual", segment_ids=batch["segment_ids"],
                                    visual_mask=batch["visual_mask"], loss_mask=batch["loss_mask"])
    common = dict(position_ids=batch["position_ids"], layout=layout, labels=batch["labels"],
                  image_keys=batch["image_keys"])
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        model(tokens=batch["tokens"], visual_mask=batch["visual_mask"], images=batch["images"][:1], **common)
    broken = batch["visual_mask"].clone()
    broken[0, 40] = True
    with pytest.raises(ValueError, match="not a multiple of 16 tokens per image"):
        model(tokens=batch["tokens"], visual_mask=broken, images=batch["images"], **common)
    with pytest.raises(ValueError, match="empty or malformed batch"):
        model(tokens=batch["tokens"][:0], visual_mask=batch["visual_mask"][:0], images=batch["images"][:0],
              **{**common, "position_ids": batch["position_ids"][:0]})
    too_long = config.language.max_position_embeddings + 1
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        model(tokens=torch.zeros(1, too_long, dtype=torch.long), visual_mask=torch.zeros(1, too_long, dtype=torch.bool),
              images=None, position_ids=torch.zeros(1, too_long, dtype=torch.long), layout=None, labels=None)
    with pytest.raises(ValueError, match="uint8"):
        model.vision(batch["images"].float())


def test_config_refuses_what_cannot_work():
    tiny = model_preset("tiny")
    for change, flag in (
        (dict(precision=PrecisionConfig(fp8_format="hybrid")), "--fp8-format"),
        (dict(apply_rope_fusion=True), "--apply-rope-fusion"),
        (dict(gradient_accumulation_fusion=True), "--gradient-accumulation-fusion"),
    ):
        with pytest.raises(ConfigError, match=flag):
            validate(tiny.replace(**change), has_te=False, has_apex=False)
    # sequence parallelism needs no TE (models.specs.SequenceParallelTorchNorm)
    for has_te in (False, True):
        validate(tiny.replace(parallel=ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)),
                 has_te=has_te, has_apex=False)
    with pytest.raises(ConfigError, match="does not divide the attention heads"):
        validate(tiny.replace(parallel=ParallelConfig(tensor_model_parallel_size=3)), has_te=False, has_apex=False)
    with pytest.raises(ConfigError, match="cannot be split evenly"):
        validate(tiny.replace(parallel=ParallelConfig(pipeline_model_parallel_size=4)), has_te=False, has_apex=False)
    with pytest.raises(ConfigError, match="Hungarian matcher needs"):
        validate(tiny.replace(croc=CrocConfig(pool_size=4)), has_te=False, has_apex=False)
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_preset("gpt-5")
