"""Activation recomputation with the mixed-attention layout, on one process: every granularity
and method gives the same losses and gradients as no recomputation — bit for bit (CPU, fp32:
recomputation reruns the same kernels on the same inputs in the same order) — with the layout
reaching the recomputed forward as the same object, its mask built once per micro-batch.

The parallel layouts (PP=2, TP=2, TP2xPP2, with sequence parallelism) run through the trainer's
own schedule in tests/parallel/test_recompute_sequence_parallel.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_croc.config import ConfigError, CrocConfig, model_preset, validate
from megatron_croc.models import attention
from megatron_croc.models.attention import LayoutHandle, build_attention_layout, layout_of
from megatron_croc.models.croc import CrocModel
from megatron_croc.testing import croc_forward_backward, synthetic_batch

# packed rows with images, text-only samples and padding: every rule of the mixed layout
ROWS = [
    [dict(prompt=3, image=True, question=2, answer=5), dict(prompt=2, image=False, question=1, answer=3)],
    [dict(prompt=1, image=True, question=0, answer=4), dict(prompt=0, image=True, question=2, answer=2)],
]

RECOMPUTE = {
    "selective": dict(recompute_granularity="selective"),
    "selective-all-modules": dict(recompute_granularity="selective",
                                  recompute_modules=("core_attn", "mlp")),
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-uniform-2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full-block-1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
}


def _config(attention_variant="visual"):
    base = model_preset("tiny", croc=CrocConfig(stage="croc", pool_size=64, attention=attention_variant))
    return base.replace(language=dataclasses.replace(base.language, num_layers=3))


def _step(config, weights, batch):
    torch.manual_seed(0)
    model = CrocModel(config)
    if weights is not None:
        model.load_state_dict(weights)
    _, loss, parts = croc_forward_backward(model, config, batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, loss.detach(), parts, grads


@pytest.mark.parametrize("attention_variant", ["visual", "prefix"])
def test_recomputation_is_bit_identical_to_none(megatron_world, monkeypatch, attention_variant):
    base = _config(attention_variant)
    batch = synthetic_batch(num_image_tokens=base.vision.num_image_tokens, image_size=base.vision.image_size,
                            vocab_size=base.language.vocab_size, seq_length=64, rows=ROWS)
    ref_model, ref_loss, ref_parts, ref_grads = _step(base, None, batch)
    weights = ref_model.state_dict()

    built = []
    dense = attention._dense_mask
    monkeypatch.setattr(attention, "_dense_mask", lambda layout: built.append(layout) or dense(layout))
    for name, recompute in RECOMPUTE.items():
        config = base.replace(**recompute)
        validate(config, has_te=False, has_apex=False)
        built.clear()
        _, loss, parts, grads = _step(config, weights, batch)
        assert torch.equal(loss, ref_loss), name
        assert parts.keys() == ref_parts.keys() and all(torch.equal(parts[k], ref_parts[k]) for k in parts), name
        assert grads.keys() == ref_grads.keys() and len(grads) > 20, name
        for pname, grad in grads.items():
            assert torch.equal(grad, ref_grads[pname]), f"{name}: gradient of {pname} differs"
        # the mask is built once per micro-batch, also when layers run their forward again
        assert len(built) == 1, f"{name}: the dense mask was built {len(built)} times"


def test_recomputation_really_recomputes(megatron_world, monkeypatch):
    """The layer forwards (and their core attention) run again in backward: the test above
    would pass trivially if megatron-core skipped recomputation."""
    base = _config()
    batch = synthetic_batch(num_image_tokens=base.vision.num_image_tokens, image_size=base.vision.image_size,
                            vocab_size=base.language.vocab_size, seq_length=64, rows=ROWS)
    seen = []
    run = attention.attention
    monkeypatch.setattr(attention, "attention",
                        lambda q, k, v, layout, **kw: seen.append(layout) or run(q, k, v, layout, **kw))
    counts = {}
    for name, recompute in {"none": {}, **RECOMPUTE}.items():
        seen.clear()
        _step(base.replace(**recompute), None, batch)
        llm_calls = [layout for layout in seen if layout is not None]  # the VTR head's layer has no layout
        assert len({id(layout) for layout in llm_calls}) == 1, name  # the same layout object throughout
        counts[name] = len(llm_calls)
    layers = base.language.num_layers
    assert counts["none"] == layers
    assert counts["selective"] == counts["full-uniform-1"] == counts["full-uniform-2"] == 2 * layers
    assert counts["full-block-1"] == layers + 1  # block: only each stage's first layer


def test_layout_handle_survives_what_checkpointing_does_to_it():
    batch = synthetic_batch(num_image_tokens=4, image_size=8, vocab_size=50, seq_length=16,
                            rows=[[dict(prompt=2, image=True, question=1, answer=3)]])
    layout = build_attention_layout("visual", segment_ids=batch["segment_ids"], visual_mask=batch["visual_mask"],
                                    loss_mask=batch["loss_mask"])
    handle = layout.as_attention_mask()
    assert handle is layout.as_attention_mask() and isinstance(handle, torch.Tensor) and handle.numel() == 0
    assert layout_of(handle.detach()) is layout and layout_of(None) is None
    assert type(handle + 0) is torch.Tensor  # other operations give plain tensors
    with pytest.raises(TypeError, match="as_attention_mask"):
        layout_of(layout)
    assert isinstance(handle, LayoutHandle)


@pytest.mark.parametrize("change,message", [
    (dict(recompute_granularity="full", recompute_num_layers=1), "needs --recompute-method uniform"),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=0), "at least 1"),
    (dict(recompute_granularity="selective", recompute_method="uniform"), "apply to --recompute-granularity full"),
    (dict(recompute_granularity="selective", recompute_modules=("layernorm",)), "choose one or more of"),
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
          recompute_modules=("mlp",)), "applies to --recompute-granularity selective"),
    (dict(recompute_method="uniform"), "only apply with --recompute-granularity"),
])
def test_bad_recompute_flags_give_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        validate(model_preset("tiny").replace(**change), has_te=False, has_apex=False)
