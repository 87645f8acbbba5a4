"""The tiny CrocModel on CUDA (FlexAttention mixed mask) against the same weights and batch on
the CPU (SDPA with the dense mask, megatron_croc's CPU path, in a fresh CUDA-less process), in
fp32; and the same model in bf16 on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import croc_cpu_reference as case  # noqa: E402


def _rel(a, b):
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _fp32_model_and_state(tmp_path):
    from megatron_croc.models.croc import CrocModel

    config = case.make_config()
    torch.manual_seed(0)
    model = CrocModel(config)  # initialised on the CPU (use_cpu_initialization)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return config, model, state


def test_croc_model_on_cuda_matches_the_cpu_path_fp32(megatron_world, tmp_path, no_tf32):
    config, model, state = _fp32_model_and_state(tmp_path)
    batch = case.make_batch(config)
    torch.save(state, tmp_path / "state.pt")
    torch.save(batch, tmp_path / "batch.pt")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MEGATRON_CROC_FORCE_CPU="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(HERE / "croc_cpu_reference.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ref = torch.load(tmp_path / "ref.pt")
    assert ref["backend"] == "sdpa"

    model.cuda()
    got = case.run(model, config, batch, torch.device("cuda"))
    assert got["backend"] == "flex"
    assert _rel(got["loss"], ref["loss"]) < 1e-4
    assert _rel(got["lm"], ref["lm"]) < 1e-4
    assert _rel(got["vtr"], ref["vtr"]) < 1e-3
    assert _rel(got["per_token"], ref["per_token"]) < 1e-4
    assert set(got["grads"]) == set(ref["grads"]) and got["grads"]
    worst = max(((_rel(got["grads"][n], ref["grads"][n]), n) for n in ref["grads"]))
    assert worst[0] < 2e-3, f"largest gradient mismatch: {worst}"


def test_croc_model_runs_in_bf16_on_cuda(megatron_world, tmp_path):
    from megatron.core.transformer.module import Float16Module

    from megatron_croc.models.croc import CrocModel

    config32, model32, state = _fp32_model_and_state(tmp_path)
    batch = case.make_batch(config32)
    model32.cuda()
    ref = case.run(model32, config32, batch, torch.device("cuda"))

    config = case.make_config(bf16=True)
    torch.manual_seed(0)
    chunk = CrocModel(config)
    chunk.load_state_dict(state)
    chunk.cuda()
    model = Float16Module(chunk.config, chunk)  # as the training loop wraps it
    assert next(chunk.language_model.parameters()).dtype == torch.bfloat16
    got = case.run(model, config, batch, torch.device("cuda"))
    assert got["backend"] == "flex"
    assert torch.isfinite(got["loss"]) and torch.isfinite(got["vtr"])
    assert abs(got["lm"].item() - ref["lm"].item()) < 0.05 * ref["lm"].item()
    assert abs(got["vtr"].item() - ref["vtr"].item()) < 0.15 * ref["vtr"].item()
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in got["grads"].items():
        assert torch.isfinite(g).all(), name
    # the bulk of the gradient agrees with fp32 at bf16 precision (the pool's rows depend on
    # the assignment, which bf16 costs may break differently on near-ties)
    names = sorted(n for n in ref["grads"] if n != "pool.weight")
    flat = torch.cat([got["grads"][n].flatten() for n in names])
    flat32 = torch.cat([ref["grads"][n].flatten() for n in names])
    assert _rel(flat, flat32) < 0.1


def test_visual_prefetch_on_cuda_gives_the_same_step_in_bf16(megatron_world, tmp_path):
    """The look-ahead path (pinned copy, CUDA event, solver threads) against the plain forward,
    bf16 in Float16Module as in training: the same costs, assignment, losses and gradients."""
    from megatron.core.transformer.module import Float16Module

    from megatron_croc.models.croc import CrocModel

    config = case.make_config(bf16=True)
    torch.manual_seed(0)
    chunk = CrocModel(config).cuda()
    model = Float16Module(chunk.config, chunk)
    assert chunk.prefetches_visual
    batch = case.make_batch(config)
    plain = case.run(model, config, batch, torch.device("cuda"))
    chunk.zero_grad(set_to_none=True)
    ahead = case.run(model, config, batch, torch.device("cuda"), prefetch=True)
    assert _rel(ahead["loss"], plain["loss"]) < 1e-6 and _rel(ahead["vtr"], plain["vtr"]) < 1e-6
    assert set(ahead["grads"]) == set(plain["grads"])
    for name in plain["grads"]:
        assert _rel(ahead["grads"][name], plain["grads"][name]) < 1e-5, name
