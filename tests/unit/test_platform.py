"""Each CPU shim in megatron_croc.platform is still needed (its megatron-core code path fails
in a fresh interpreter without shims) and still works (the same path passes with them).

Run as a script, this file executes the probes without any shim and prints which failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import traceback

import pytest
import torch


def probe_cuda_allocations_on_cpu():
    from megatron.core.utils import GlobalMemoryBuffer

    # megatron-core's local attention path allocates on torch.cuda.current_device()
    t = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "probe")
    assert t.device.type == "cpu"
    # pipeline schedules/optimizer allocate with a literal device="cuda"
    assert torch.zeros(1, device="cuda").device.type == "cpu"
    # CLIPViTModel's .cuda() buffer: on the CPU, except in a model built on the meta device
    assert torch.zeros(1).cuda().device.type == "cpu" and torch.zeros(1, device="meta").cuda().is_meta
    # DistributedOptimizer only wraps parameters whose type() is a CUDA type name
    assert torch.nn.Parameter(torch.zeros(1)).type() == "torch.cuda.FloatTensor"
    # backward functions allocate on the current device too (sequence parallelism's
    # reduce-scatter), also in a backward run inside backward (megatron-core's recomputation)
    devices = []

    class AllocatesInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            devices.append(torch.empty(1, device=torch.cuda.current_device()).device.type)
            if len(devices) == 1:  # once: a backward inside this backward, as recomputation runs
                with torch.enable_grad():
                    torch.autograd.backward(AllocatesInBackward.apply(torch.ones(1, requires_grad=True)).sum())
            return grad * 2

    x = torch.ones(3, requires_grad=True)
    AllocatesInBackward.apply(x).sum().backward()
    torch.autograd.backward(AllocatesInBackward.apply(x), grad_tensors=torch.ones(3))
    assert devices == ["cpu"] * 3 and torch.equal(x.grad, torch.full((3,), 4.0))


def probe_noop_streams():
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()
    event = torch.cuda.Event()
    event.record()
    stream.wait_event(event)
    with torch.cuda.stream(torch.cuda.Stream()):
        pass


def probe_cpu_rng_tracker():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(5, force_reset_rng=True)
    tracker = get_cuda_rng_tracker()
    with tracker.fork():
        a = torch.rand(3)
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the tracked state advances
    model_parallel_cuda_manual_seed(5, force_reset_rng=True)
    with get_cuda_rng_tracker().fork():
        c = torch.rand(3)
    assert torch.equal(a, c)  # and is reproducible from the seed


def probe_eager_jit_fuser():
    import torch._dynamo
    from megatron.core import jit

    if jit.jit_fuser is torch.compile and not torch._dynamo.config.disable:
        # Fail without paying for the ~20-40 s inductor build that calling it would cost.
        raise AssertionError("megatron-core's fusions would be compiled by inductor on the CPU")
    from megatron.core.fusions.fused_bias_swiglu import swiglu

    torch._dynamo.utils.counters.clear()
    swiglu(torch.randn(4, 8))
    assert not torch._dynamo.utils.counters["frames"]["total"], "dynamo compiled a megatron fusion"


PROBES = {
    "cuda_allocations_on_cpu": probe_cuda_allocations_on_cpu,
    "noop_streams": probe_noop_streams,
    "cpu_rng_tracker": probe_cpu_rng_tracker,
    "eager_jit_fuser": probe_eager_jit_fuser,
}


def _run_probes() -> dict[str, str | None]:
    results = {}
    for name, probe in PROBES.items():
        try:
            probe()
            results[name] = None
        except BaseException:
            results[name] = traceback.format_exc(limit=2)
    return results


needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shims apply only without CUDA")


@needs_cpu
def test_every_shim_has_a_probe():
    from megatron_croc.platform import CPU_SHIMS

    assert set(CPU_SHIMS) == set(PROBES)


@needs_cpu
def test_each_shim_is_still_needed():
    """Without shims, every probe fails. If one passes, megatron-core no longer needs that shim:
    delete it (and this probe)."""
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    still_passing = [name for name, error in failures.items() if error is None]
    assert not still_passing, f"these shims are no longer needed: {still_passing}"


@needs_cpu
def test_each_shim_works(megatron_world):
    from megatron_croc.platform import CPU_SHIMS, cpu_shims_active, get_platform

    assert cpu_shims_active() and get_platform().backend == "gloo"
    assert all(s.applied for s in CPU_SHIMS.values())
    failures = {name: err for name, err in _run_probes().items() if err is not None}
    assert not failures, failures


@needs_cpu
def test_init_platform_is_idempotent(megatron_world):
    from megatron_croc.platform import init_platform

    assert init_platform() is init_platform()


if __name__ == "__main__":
    print(json.dumps(_run_probes()))


def test_host_to_device_keeps_host_tensors_in_place_on_the_cpu():
    from megatron_croc.platform import host_to_device

    t = torch.arange(6)
    assert host_to_device(t, "cpu") is t
    assert host_to_device(t, torch.device("meta")).is_meta


def test_probe_platform_decides_like_init_platform_without_its_side_effects(megatron_world):
    """The launcher's check of a run (a fresh process): the same answer as init_platform, no
    shim applied and megatron-core not imported for it."""
    from megatron_croc.platform import init_platform

    code = ("import sys; from megatron_croc.platform import probe_platform, cpu_shims_active; p = probe_platform(); "
            "print(p.device.type, p.backend, p.has_cuda, cpu_shims_active(), 'megatron.core' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    expected = init_platform()
    assert out.stdout.split() == [expected.device.type, expected.backend, str(expected.has_cuda), "False", "False"]
