"""Seeded masks, pool initialisation and the replacement's gradients (SPEC §1.2)."""

from __future__ import annotations

import pytest
import torch

from megatron_croc.models.prompt_pool import PromptPool, draw_masks


def _pool(pool_size=16, hidden=8, init="token_scale", seed=7):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1)
    return PromptPool(config, pool_size=pool_size, hidden_size=hidden, init=init, seed=seed)


def test_masks_are_a_function_of_seed_and_key():
    keys = torch.tensor([0, 1, 2, 3, 1])
    a = draw_masks(seed=3, keys=keys, num_tokens=20, num_masked=15, device=torch.device("cpu"))
    b = draw_masks(seed=3, keys=keys, num_tokens=20, num_masked=15, device=torch.device("cpu"))
    c = draw_masks(seed=4, keys=keys, num_tokens=20, num_masked=15, device=torch.device("cpu"))
    assert torch.equal(a, b)  # reproducible (resume, every TP rank, every pipeline stage)
    assert (a.sum(dim=1) == 15).all()
    assert torch.equal(a[1], a[4])  # same key, same mask
    assert len({tuple(r.tolist()) for r in a[:4]}) == 4  # different keys, different masks
    assert not torch.equal(a, c)


def test_masks_are_uniform_over_positions():
    keys = torch.arange(4000)
    masks = draw_masks(seed=0, keys=keys, num_tokens=8, num_masked=6, device=torch.device("cpu"))
    freq = masks.float().mean(dim=0)
    assert torch.allclose(freq, torch.full_like(freq, 0.75), atol=0.03)


def test_pool_init_at_token_scale_by_default():
    pool = _pool(pool_size=32, hidden=64)
    norms = pool.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    normal = _pool(pool_size=32, hidden=64, init="normal")
    assert normal.weight.norm(dim=-1).mean() > 5  # ~sqrt(64)
    assert pool.weight.no_weight_decay
    with pytest.raises(ValueError, match="unknown pool init"):
        _pool(init="zeros")


@pytest.mark.parametrize("matcher", ["hungarian", "nearest"])
def test_replacement_and_gradients(matcher):
    torch.manual_seed(0)
    pool = _pool(pool_size=16, hidden=8)
    tokens = torch.nn.functional.normalize(torch.randn(3, 6, 8), dim=-1).requires_grad_()
    masks = draw_masks(seed=1, keys=torch.tensor([5, 6, 7]), num_tokens=6, num_masked=4, device=torch.device("cpu"))
    replaced, assignment = pool(tokens, masks, matcher=matcher, solver="scipy")
    assert assignment.shape == (3, 4)
    # masked positions hold their assigned pool entries, the others are untouched
    torch.testing.assert_close(replaced[masks], pool.weight[assignment.reshape(-1)])
    torch.testing.assert_close(replaced[~masks], tokens[~masks])
    if matcher == "hungarian":
        for row in assignment:
            assert len(set(row.tolist())) == 4  # one-to-one within a sample
    weights = torch.randn_like(replaced)
    (replaced * weights).sum().backward()
    used = torch.zeros(16, dtype=torch.bool)
    used[assignment.reshape(-1)] = True
    grad_norms = pool.weight.grad.norm(dim=-1)
    assert (grad_norms[used] > 0).all()  # assigned rows learn
    assert (grad_norms[~used] == 0).all()  # the others get nothing
    assert (tokens.grad[masks] == 0).all()  # replaced tokens no longer reach the LLM
    assert (tokens.grad[~masks] != 0).any()
