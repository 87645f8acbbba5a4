"""Layout-independent initial weights (models.initialization): megatron-core's distributions,
a function of the seed alone, every parameter covered. That TP=2, PP=2, DP=2 and TP2xPP2 then
start from the single process's weights is shown end to end by the from-scratch loss curves of
tests/parallel/test_training.py."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from megatron_croc.config import CrocConfig, model_preset


def _model(seed=1234, **overrides):
    from megatron_croc.models.croc import CrocModel

    return CrocModel(model_preset("tiny", croc=CrocConfig(pool_size=64), seed=seed, **overrides))


def _megatron_initialised():
    """The same model initialised by megatron-core itself (the distributions we must keep)."""
    import megatron_croc.config as model_configs
    from megatron_croc.models import croc

    common = model_configs._common_transformer_kwargs
    with mock.patch.object(model_configs, "_common_transformer_kwargs",
                           lambda c: {**common(c), "perform_initialization": True}), \
            mock.patch.object(croc, "initialize_parameters", lambda *a, **k: None):
        return _model()


def test_distributions_are_megatron_cores(megatron_world):
    ours = dict(_model().named_parameters())
    theirs = dict(_megatron_initialised().named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        q = theirs[name]
        if q.numel() > 1 and q.std() == 0:  # constants: norms (ones), biases (zeros)
            assert torch.equal(p, q), name
        elif q.numel() >= 256:
            ratio = (p.float().std() / q.float().std()).item()
            assert 0.85 < ratio < 1.15, (name, ratio)  # e.g. the output projections' scaled std, N(0,1) of CLIP's
            assert abs(p.float().mean().item()) < 0.1 * q.float().std().item() + 1e-3, name


def test_a_function_of_the_seed_alone(megatron_world):
    torch.manual_seed(0)
    a = _model(seed=7).state_dict()
    torch.manual_seed(999)  # the global RNG state does not matter
    b = _model(seed=7).state_dict()
    c = _model(seed=8).state_dict()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
    weights = [k for k in a if k.endswith("linear_qkv.weight")]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)


def test_vocabulary_padding_rows_start_at_zero(megatron_world):
    from megatron_croc.config import LANGUAGE_PRESETS

    import dataclasses

    language = dataclasses.replace(LANGUAGE_PRESETS["tiny"], vocab_size=500)  # padded to 512
    model = _model(language=language)
    embedding = model.language_model.embedding.word_embeddings.weight
    assert embedding.shape[0] == 512
    assert embedding[500:].abs().sum() == 0 and embedding[:500].std() > 0
    # the real rows do not depend on how much padding there is
    wider = _model(language=language, make_vocab_size_divisible_by=256)
    assert torch.equal(wider.language_model.embedding.word_embeddings.weight[:500], embedding[:500])


def test_an_unknown_parameter_is_an_error(megatron_world):
    from megatron_croc.models.initialization import initialize_parameters

    model = _model()
    model.vtr_head.adapter = torch.nn.Module()  # a module no rule knows
    model.vtr_head.adapter.scale = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="no initialisation rule for parameter 'vtr_head.adapter.scale'"):
        initialize_parameters(model, seed=1)
