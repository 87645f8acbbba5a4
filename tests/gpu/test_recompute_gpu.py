"""Activation recomputation on CUDA with the FlexAttention block mask: selective and full
(uniform, block) give the losses and gradients of no recomputation, and the block mask is built
once per micro-batch — the recomputed forward reuses it (the layout travels as
AttentionLayout.as_attention_mask(); see tests/unit/models/test_recompute.py for the CPU path).

Tolerance: recomputation reruns the same kernels on the same inputs; FlexAttention's backward
may accumulate in a different order between runs, so 1e-5 relative rather than bit identity."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import croc_cpu_reference as case  # noqa: E402

RECOMPUTE = {
    "selective": dict(recompute_granularity="selective", recompute_modules=("core_attn", "mlp")),
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def test_recomputation_with_flex_attention(megatron_world, monkeypatch):
    from megatron_croc.models import attention
    from megatron_croc.models.croc import CrocModel

    base = case.make_config()
    base = base.replace(language=dataclasses.replace(base.language, num_layers=3))
    batch = case.make_batch(base)
    torch.manual_seed(0)
    model = CrocModel(base)
    state = model.state_dict()
    ref = case.run(model.cuda(), base, batch, torch.device("cuda"))
    assert ref["backend"] == "flex"

    built = []
    build = attention._build_block_mask
    monkeypatch.setattr(attention, "_build_block_mask", lambda layout: built.append(layout) or build(layout))
    for name, recompute in RECOMPUTE.items():
        config = base.replace(**recompute)
        torch.manual_seed(0)
        model = CrocModel(config)
        model.load_state_dict(state)
        built.clear()
        got = case.run(model.cuda(), config, batch, torch.device("cuda"))
        assert len(built) == 1, f"{name}: the block mask was built {len(built)} times"
        assert _rel(got["loss"], ref["loss"]) < 1e-5, name
        assert set(got["grads"]) == set(ref["grads"])
        for pname, grad in ref["grads"].items():
            assert _rel(got["grads"][pname], grad) < 1e-5, f"{name}: {pname}"
