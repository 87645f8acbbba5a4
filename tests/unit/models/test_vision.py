"""The vision tower's frozen encode path on the CPU: eager there and identical to the encoder's
own forward; the CUDA-graph cache's bookkeeping (keys, bound, copy-out, weight replacement,
failed capture) run on the tower's real forward with a stand-in for the CUDA capture.

What the stand-in proves and what it does not: it keeps the one property of a CUDA graph the
cache relies on — every replay writes the same static output buffer from the same static input
buffer — so the cache's own code (signature keys, the bound, the copy handed out, dropping graphs
when the weights are replaced, the fallback after a failed capture, encode's wiring) runs as on a
GPU. It does not prove that megatron-core's ViT forward can be captured, that a replay equals
the eager forward, or that a real capture failure leaves CUDA usable: tests/gpu/test_vision_gpu.py
checks those.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from megatron_croc.config import CLIP_MEAN, CLIP_STD, model_preset
from megatron_croc.models.vision import CapturedForward, FrozenForwardGraphs, VisionTower


def _tower(**vision_changes) -> VisionTower:
    config = model_preset("tiny")
    config = config.replace(vision=dataclasses.replace(config.vision, **vision_changes))
    tower = VisionTower(config, use_te=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tower.parameters():  # megatron-core leaves them uninitialised (CrocModel draws them)
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return tower


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _encoder_forward(tower: VisionTower, images: torch.Tensor) -> torch.Tensor:
    """The encoder module's own forward on CLIP-normalised pixels, class token dropped."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        return tower.encoder((images.float() - mean) / std)[:, 1:]


class _Replay:
    """A CUDA graph's replay semantics on the CPU: recompute the forward of the static input
    into the static output, the same two buffers every time."""

    def __init__(self, forward, static_input, static_output):
        self.forward, self.static_input, self.static_output = forward, static_input, static_output

    def replay(self):
        with torch.inference_mode():  # the static output is an inference tensor, as on a GPU
            self.static_output.copy_(self.forward(self.static_input))


def _stand_in_capture(calls: list):
    def capture(forward, example):
        calls.append(tuple(example.shape))
        static_input = example.clone()
        static_output = forward(static_input)
        return CapturedForward(graph=_Replay(forward, static_input, static_output), static_input=static_input,
                               static_output=static_output)

    return capture


def _failing_capture(calls: list):
    def capture(forward, example):
        calls.append(tuple(example.shape))
        raise RuntimeError("operation not permitted when stream is capturing")

    return capture


def test_frozen_encode_on_the_cpu_is_eager_and_equals_the_encoders_own_forward(megatron_world):
    tower = _tower()
    calls = []
    tower.encoder_graphs.capture = _failing_capture(calls)  # would warn if the CPU path tried it
    images = _images(3, seed=1)
    assert not tower.uses_cuda_graphs(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        features = tower.encode(images)
    assert calls == [] and tower.encoder_graphs.graphs == {}
    # bit-identical to the module's forward under no_grad (encode runs it in inference mode)
    assert torch.equal(features, _encoder_forward(tower, images))
    assert features.shape == (3, 16, 32) and features.is_contiguous()
    # a plain tensor: the projector's backward can save it (inference tensors cannot be saved)
    assert not features.is_inference() and not features.requires_grad
    tower.project(features).square().sum().backward()
    assert all(p.grad is not None for p in tower.projector.parameters())
    assert all(p.grad is None for p in tower.encoder.parameters())


def test_unfrozen_encoder_and_graphs_off_build_no_graph_cache(megatron_world):
    assert _tower(cuda_graph=False).encoder_graphs is None
    tower = _tower(frozen=False)
    assert tower.encoder_graphs is None
    images = _images(2, seed=2)
    features = tower.encode(images)
    assert features.requires_grad and torch.equal(features.detach(), _encoder_forward(tower, images))
    features.square().sum().backward()
    assert all(p.grad is not None for p in tower.encoder.parameters())


def test_graph_cache_keys_bound_copy_out_and_replaced_weights(megatron_world):
    tower = _tower()
    calls = []
    cache = FrozenForwardGraphs(tower._frozen_features, reads=tower._frozen_reads, max_graphs=2, name="test encoder",
                                capture=_stand_in_capture(calls))
    first, second = _images(4, seed=3), _images(4, seed=4)
    from_first = cache(first)
    assert calls == [(4, 3, 32, 32)] and torch.equal(from_first, _encoder_forward(tower, first))
    # same signature: the same graph replayed on the new input ...
    from_second = cache(second)
    assert len(calls) == 1 and torch.equal(from_second, _encoder_forward(tower, second))
    # ... and the first result, handed out as a copy, is not overwritten by that replay
    assert torch.equal(from_first, _encoder_forward(tower, first))
    assert not from_second.is_inference() and from_second.is_contiguous()
    # a new image count is a new graph, up to the bound; past it the caller runs eagerly, one warning
    cache(_images(2, seed=5))
    assert calls == [(4, 3, 32, 32), (2, 3, 32, 32)] and cache.captures == 2
    with pytest.warns(RuntimeWarning, match=r"CUDA graphs kept for 2 input shapes already .* run eagerly"):
        assert cache(_images(3, seed=6)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert cache(_images(5, seed=7)) is None
    assert len(calls) == 2
    # replacing a weight tensor (as .to() or a dtype conversion does) drops every graph: recapture
    weight = tower.encoder.decoder.layers[0].mlp.linear_fc1.weight
    weight.data = weight.data * 1.5
    again = cache(first)
    assert calls[-1] == (4, 3, 32, 32) and cache.captures == 3 and list(cache.graphs) == [cache.signature(first)]
    assert torch.equal(again, _encoder_forward(tower, first)) and not torch.equal(again, from_first)
    with pytest.raises(ValueError, match="max_graphs must be at least 1"):
        FrozenForwardGraphs(tower._frozen_features, reads=tower._frozen_reads, max_graphs=0, name="x")


def test_tower_conversions_and_state_dict_loads_invalidate_its_graphs(megatron_world, monkeypatch):
    tower = _tower()
    monkeypatch.setattr(tower, "uses_cuda_graphs", lambda images: True)  # as on a GPU at TP=1
    calls = []
    graphs = tower.encoder_graphs
    graphs.capture = _stand_in_capture(calls)
    images = _images(2, seed=10)
    tower.encode(images)
    old_weights = list(tower.encoder.parameters())
    # new tensor objects in place of the old ones: the cache lists them again and recaptures
    state = {k: v.clone() * 1.1 if torch.is_floating_point(v) else v for k, v in tower.state_dict().items()
             if isinstance(v, torch.Tensor)}
    tower.load_state_dict(state, strict=False, assign=True)
    assert graphs.graphs == {} and graphs._tensors is None
    assert torch.equal(tower.encode(images), _encoder_forward(tower, images)) and len(calls) == 2
    listed = {id(t) for t in graphs._tensors}
    assert all(id(p) in listed for p in tower.encoder.parameters()) and not any(id(p) in listed for p in old_weights)
    # .to(dtype) (what Float16Module's conversion does): the same
    tower.to(torch.float64)
    assert graphs.graphs == {}
    features = tower.encode(images)
    assert features.dtype == torch.float64 and len(calls) == 3


def test_failed_capture_warns_once_and_encode_falls_back_to_eager(megatron_world, monkeypatch):
    tower = _tower()
    monkeypatch.setattr(tower, "uses_cuda_graphs", lambda images: True)  # as on a GPU at TP=1
    calls = []
    tower.encoder_graphs.capture = _stand_in_capture(calls)
    images = _images(2, seed=8)
    # encode goes through the cache when allowed ...
    assert torch.equal(tower.encode(images), _encoder_forward(tower, images)) and calls == [(2, 3, 32, 32)]
    # ... and when capturing fails: one warning, the eager result, no capture tried again
    tower.encoder_graphs = FrozenForwardGraphs(tower._frozen_features, reads=tower._frozen_reads, max_graphs=4,
                                               name="vision encoder", capture=_failing_capture(calls))
    with pytest.warns(RuntimeWarning, match="vision encoder: CUDA graph capture failed .*not permitted"):
        features = tower.encode(images)
    assert torch.equal(features, _encoder_forward(tower, images)) and not features.is_inference()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(tower.encode(_images(3, seed=9)), _encoder_forward(tower, _images(3, seed=9)))
    assert calls == [(2, 3, 32, 32), (2, 3, 32, 32)] and "RuntimeError" in tower.encoder_graphs.failure


def test_vision_cuda_graph_flag():
    from megatron_croc.training.arguments import parse_args

    assert parse_args([]).model.vision.cuda_graph
    assert not parse_args(["--no-vision-cuda-graph"]).model.vision.cuda_graph
