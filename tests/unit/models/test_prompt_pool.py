"""Seeded masks, pool initialisation and the replacement's gradients (SPEC §1.2)."""

from __future__ import annotations

import pytest
import torch

from megatron_croc.models.matching import assign
from megatron_croc.models.prompt_pool import PromptPool, draw_mask_positions


def _pool(pool_size=16, hidden=8, init="token_scale", seed=7):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1)
    return PromptPool(config, pool_size=pool_size, hidden_size=hidden, init=init, seed=seed)


def _masks(positions: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return torch.zeros(positions.shape[0], num_tokens, dtype=torch.bool).scatter(1, positions, True)


def test_masks_are_a_function_of_seed_and_key():
    keys = torch.tensor([0, 1, 2, 3, 1])
    cpu = torch.device("cpu")
    a = draw_mask_positions(seed=3, keys=keys, num_tokens=20, num_masked=15, device=cpu)
    b = draw_mask_positions(seed=3, keys=keys, num_tokens=20, num_masked=15, device=cpu)
    c = draw_mask_positions(seed=4, keys=keys, num_tokens=20, num_masked=15, device=cpu)
    assert a.dtype == torch.int64 and a.shape == (5, 15)
    assert torch.equal(a, b)  # reproducible (resume, every TP rank, every pipeline stage)
    assert (a.diff(dim=1) > 0).all()  # ascending, hence distinct
    assert ((a >= 0) & (a < 20)).all()
    assert torch.equal(a[1], a[4])  # same key, same mask
    assert len({tuple(r.tolist()) for r in a[:4]}) == 4  # different keys, different masks
    assert not torch.equal(a, c)
    empty = draw_mask_positions(seed=3, keys=keys[:0], num_tokens=20, num_masked=15, device=cpu)
    assert empty.shape == (0, 15)


def test_masks_are_uniform_over_positions():
    keys = torch.arange(4000)
    positions = draw_mask_positions(seed=0, keys=keys, num_tokens=8, num_masked=6, device=torch.device("cpu"))
    freq = _masks(positions, 8).float().mean(dim=0)
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
    positions = draw_mask_positions(seed=1, keys=torch.tensor([5, 6, 7]), num_tokens=6, num_masked=4,
                                    device=torch.device("cpu"))
    masks = _masks(positions, 6)
    assignment = assign(pool.cost(tokens, positions), method=matcher)
    replaced = pool(tokens, positions, assignment)
    assert assignment.shape == (3, 4)
    # masked positions hold their assigned pool entries, the others are untouched
    torch.testing.assert_close(replaced[masks], pool.weight[assignment.reshape(-1)])
    torch.testing.assert_close(replaced[~masks], tokens[~masks])
    if matcher == "hungarian":
        for row in assignment:
            assert len(set(row.tolist())) == 4  # one-to-one within a sample
        # the assignment minimises the total distance between the replaced tokens and their entries
        from scipy.optimize import linear_sum_assignment

        cost = pool.cost(tokens, positions)
        assert torch.equal(cost, torch.cdist(tokens.detach()[masks].view(3, 4, 8), pool.weight.detach().expand(3, -1, -1)))
        for n in range(3):
            rows, cols = linear_sum_assignment(cost[n].numpy())
            assert cost[n, rows, assignment[n]].sum().item() == pytest.approx(cost[n, rows, cols].sum().item())
    weights = torch.randn_like(replaced)
    (replaced * weights).sum().backward()
    used = torch.zeros(16, dtype=torch.bool)
    used[assignment.reshape(-1)] = True
    grad_norms = pool.weight.grad.norm(dim=-1)
    assert (grad_norms[used] > 0).all()  # assigned rows learn
    assert (grad_norms[~used] == 0).all()  # the others get nothing
    assert (tokens.grad[masks] == 0).all()  # replaced tokens no longer reach the LLM
    assert (tokens.grad[~masks] != 0).any()
