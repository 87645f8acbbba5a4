"""Tensor parallelism changes nothing: with TP=2 on two gloo processes the loss and the
gradient of every parameter equal the TP=1 run (fp32), for the comprehension stage."""

from __future__ import annotations

import pytest
import torch

from megatron_croc.testing import run_distributed

pytestmark = pytest.mark.parallel

ROWS = [
    [dict(prompt=3, image=True, question=2, answer=6)],
    [dict(prompt=1, image=True, question=1, answer=4), dict(prompt=2, image=False, question=1, answer=3)],
]


def _loss_and_grads(config, batch):
    from megatron.core import parallel_state

    from megatron_croc.models.croc import CrocModel
    from megatron_croc.models.parallel_plan import full_tensors

    torch.manual_seed(0)
    model = CrocModel(config)
    return model, lambda: _step(model, config, batch, full_tensors, parallel_state.get_tensor_model_parallel_group())


def _step(model, config, batch, full_tensors, tp_group):
    from megatron_croc.testing import croc_forward_backward

    _, loss, parts = croc_forward_backward(model, config, batch)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), {k: float(v) for k, v in parts.items()}, full_tensors(model, grads, tp_group)


def _worker(rank, world_size, attention):
    from megatron_croc.config import CrocConfig, ParallelConfig, model_preset
    from megatron_croc.models.parallel_plan import load_full_state
    from megatron_croc.testing import init_distributed, synthetic_batch
    from megatron.core import parallel_state

    base = model_preset("tiny", croc=CrocConfig(stage="croc", pool_size=64, attention=attention))
    batch = synthetic_batch(num_image_tokens=base.vision.num_image_tokens, image_size=base.vision.image_size,
                            vocab_size=base.language.vocab_size, seq_length=48, rows=ROWS)

    init_distributed(tensor_parallel=1)
    ref_model, ref_step = _loss_and_grads(base, batch)
    weights = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    ref = ref_step()

    init_distributed(tensor_parallel=2)
    config = base.replace(parallel=ParallelConfig(tensor_model_parallel_size=2))
    model, step = _loss_and_grads(config, batch)
    load_full_state(model, weights, parallel_state.get_tensor_model_parallel_rank(), 2)
    from megatron_croc.models import matching

    solves = []
    solve = matching._lsap_columns
    matching._lsap_columns = lambda m: solves.append(m.shape) or solve(m)
    got = step()
    # the sharding really happened, of the layers and of the host assignment (2 images: one
    # solved on each TP rank)
    assert model.language_model.decoder.layers[0].mlp.linear_fc1.weight.shape[0] == \
        ref_model.language_model.decoder.layers[0].mlp.linear_fc1.weight.shape[0] // 2
    assert len(solves) == 1, solves
    return ref, got


@pytest.mark.parametrize("attention", ["visual", "prefix"])
def test_tp2_equals_tp1(attention):
    results = run_distributed(_worker, 2, attention=attention)
    for (ref_loss, ref_parts, ref_grads), (loss, parts, grads) in results:
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
        for k in ref_parts:
            assert abs(parts[k] - ref_parts[k]) <= 1e-5 * abs(ref_parts[k]) + 1e-8, k
        assert set(grads) == set(ref_grads) and len(grads) == 29, set(grads) ^ set(ref_grads)
        for name, ref_grad in ref_grads.items():
            diff = (grads[name] - ref_grad).norm() / ref_grad.norm().clamp(min=1e-12)
            assert diff <= 1e-5, f"{name}: relative gradient difference {diff:.2e}"
