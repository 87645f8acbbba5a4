"""The vision tower's CUDA graphs on a GPU (models.vision): graphed encode against eager encode
for two image counts (fp32 and bf16, the tiny encoder and one with 64-wide heads), a replay after
the inputs change, weights updated in place (seen by the graph) and replaced (recaptured), no
graphs at tensor-parallel size > 1, and a real capture failure falling back to eager with CUDA
still usable (in a process of its own, so that nothing it leaves behind can touch other tests)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[2]

# tiny: 32 px, 8 px patches (16 tokens), hidden 32, heads of 8; wide: 112 px, 14 px patches
# (64 tokens), hidden 256, heads of 64 (the CLIP-L head width: flash attention kernels)
VISION = {"tiny": {}, "wide": dict(image_size=112, patch_size=14, hidden_size=256, num_layers=4,
                                    num_attention_heads=4, ffn_hidden_size=1024)}
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _tower(dtype, vision="tiny"):
    from megatron_croc.config import model_preset
    from megatron_croc.models.vision import VisionTower

    config = model_preset("tiny")
    config = config.replace(vision=dataclasses.replace(config.vision, **VISION[vision]))
    tower = VisionTower(config, use_te=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tower.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return tower.to(device="cuda", dtype=dtype)


def _images(tower, n: int, seed: int) -> torch.Tensor:
    size = tower.encoder.img_h
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator).cuda()


def _eager(tower, images):
    graphs, tower.encoder_graphs = tower.encoder_graphs, None
    try:
        return tower.encode(images)
    finally:
        tower.encoder_graphs = graphs


@pytest.mark.parametrize("vision", sorted(VISION))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graphed_encode_equals_eager_for_two_image_counts_and_new_inputs(megatron_world, no_tf32, dtype, vision):
    tower = _tower(dtype, vision)
    graphs = tower.encoder_graphs
    for n in (2, 5):
        first, second = _images(tower, n, seed=n), _images(tower, n, seed=10 + n)
        assert tower.uses_cuda_graphs(first)
        from_first = tower.encode(first)  # captures
        from_second = tower.encode(second)  # replays the same graph on new inputs
        assert graphs.signature(first) in graphs.graphs
        torch.testing.assert_close(from_first, _eager(tower, first), **TOLERANCE[dtype])
        torch.testing.assert_close(from_second, _eager(tower, second), **TOLERANCE[dtype])
        # a new answer for new inputs, and the first one was not overwritten by the replay
        assert not torch.equal(from_first, from_second)
        torch.testing.assert_close(from_first, _eager(tower, first), **TOLERANCE[dtype])
    assert graphs.failure is None and graphs.captures == 2 and len(graphs.graphs) == 2
    # the projector trains on graphed features as on eager ones
    tower.project(tower.encode(first)).float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tower.projector.parameters())


def test_graphs_see_in_place_weight_updates_and_recapture_replaced_weights(megatron_world, no_tf32):
    tower = _tower(torch.float32)
    images = _images(tower, 3, seed=1)
    before = tower.encode(images)
    with torch.no_grad():  # in place, as load_state_dict does: the captured graph reads the new values
        for p in tower.encoder.parameters():
            p.mul_(1.05)
    updated = tower.encode(images)
    assert tower.encoder_graphs.captures == 1 and not torch.equal(updated, before)
    torch.testing.assert_close(updated, _eager(tower, images), **TOLERANCE[torch.float32])
    tower.to(torch.bfloat16)  # new tensors: the graphs are dropped and the forward captured again
    converted = tower.encode(images)
    assert tower.encoder_graphs.captures == 2 and converted.dtype == torch.bfloat16
    torch.testing.assert_close(converted, _eager(tower, images), **TOLERANCE[torch.bfloat16])


def test_no_graphs_at_tensor_parallel_size_above_one(megatron_world, monkeypatch):
    from megatron.core import parallel_state

    tower = _tower(torch.bfloat16)
    images = _images(tower, 2, seed=2)
    assert tower.uses_cuda_graphs(images)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    assert not tower.uses_cuda_graphs(images)
    tower.encode(images)
    assert tower.encoder_graphs.captures == 0


FAILING_CAPTURE = textwrap.dedent("""
    import warnings
    import torch
    from megatron_croc.models.vision import FrozenForwardGraphs

    def syncs(x):  # .item() waits for the device: legal eagerly, not inside a capture
        y = x * 2
        return y + (y.sum().item() < 0)

    x = torch.ones(4, device="cuda")
    cache = FrozenForwardGraphs(syncs, reads=lambda: (), max_graphs=2, name="probe")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache(x) is None and cache(x) is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "probe: CUDA graph capture failed" in messages[0], messages
    # the caller's stream is current again, and CUDA still works eagerly after the failed capture ...
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert torch.equal(syncs(x), x * 2)
    good = FrozenForwardGraphs(lambda t: t * 3, reads=lambda: (), max_graphs=2, name="after")
    # ... and a new capture works
    assert torch.equal(good(x), x * 3) and torch.equal(good(x + 1), x * 3 + 3) and good.captures == 1
    print("FALLBACK OK:", messages[0])
""")


def test_a_real_capture_failure_falls_back_to_eager_and_leaves_cuda_usable():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", FAILING_CAPTURE], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "FALLBACK OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
