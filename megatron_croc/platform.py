"""Where we run: CUDA/NCCL or CPU/gloo, and what is installed (TransformerEngine, apex).

megatron-core assumes CUDA in a handful of places (each shim below names the one it covers). On a machine without CUDA, :func:`init_platform` applies a small set of shims so
that the same code path users run on GPUs (tensor/pipeline/data parallelism, the distributed
optimizer, pipeline schedules, dist_checkpointing) runs on the CPU with gloo. On a CUDA machine
it changes nothing.

Every shim is a named entry of :data:`CPU_SHIMS`; tests/unit/test_platform.py checks for each
one that the megatron-core code path it exists for still fails without it (so a shim that is no
longer needed is noticed) and works with it.

This module imports nothing of ours, and nothing else in the package patches megatron-core for
the CPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "Platform",
    "init_platform",
    "probe_platform",
    "get_platform",
    "te_available",
    "apex_available",
    "CPU_SHIMS",
    "cpu_shims_active",
    "host_to_device",
]


@dataclass(frozen=True, kw_only=True)
class Platform:
    """Facts about the machine, decided once per process."""

    device: torch.device
    backend: str  # torch.distributed backend: "nccl" or "gloo"
    has_cuda: bool
    has_te: bool
    has_apex: bool


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def te_available() -> bool:
    """TransformerEngine is usable: installed *and* a GPU present.

    Importing TE without a GPU raises RuntimeError/OSError (no libcuda/cudnn) that
    megatron-core's own import guard does not catch, so we only try with CUDA present.
    """
    if not torch.cuda.is_available() or not _importable("transformer_engine"):
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install must not break the non-TE path
        return False
    return True


def apex_available() -> bool:
    if not torch.cuda.is_available() or not _importable("apex"):
        return False
    try:
        import apex.optimizers  # noqa: F401
    except Exception:
        return False
    return True


_PLATFORM: Platform | None = None


def probe_platform(*, force_cpu: bool = False) -> Platform:
    """What :func:`init_platform` would decide, without its side effects: no CUDA device
    selected (no CUDA context in the calling process), no CPU shims applied (they import
    megatron-core: ~6 s on a slow CPU). For a process that only checks a run and then starts
    the ranks: the launcher."""
    force_cpu = force_cpu or os.environ.get("MEGATRON_CROC_FORCE_CPU", "0") == "1"
    if torch.cuda.is_available() and not force_cpu:
        return Platform(device=torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), backend="nccl",
                        has_cuda=True, has_te=te_available(), has_apex=apex_available())
    return Platform(device=torch.device("cpu"), backend="gloo", has_cuda=False, has_te=False, has_apex=False)


def init_platform(*, force_cpu: bool = False) -> Platform:
    """Decide the platform once; without CUDA, apply the CPU shims for megatron-core.

    Idempotent. ``force_cpu`` (or ``MEGATRON_CROC_FORCE_CPU=1``) runs on the CPU on a GPU
    machine too — useful to compare a GPU run against the CPU reference.
    """
    global _PLATFORM
    if _PLATFORM is not None:
        return _PLATFORM
    platform = probe_platform(force_cpu=force_cpu)
    if platform.has_cuda:
        torch.cuda.set_device(platform.device.index)
    else:
        for shim in CPU_SHIMS.values():
            shim.apply()
    _PLATFORM = platform
    return _PLATFORM


def get_platform() -> Platform:
    if _PLATFORM is None:
        raise RuntimeError("megatron_croc.platform.init_platform() has not been called")
    return _PLATFORM


def cpu_shims_active() -> bool:
    return any(s.applied for s in CPU_SHIMS.values())


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device`` without the host waiting for the device: a host tensor bound for
    a GPU is pinned first (a copy from pageable memory may wait for the stream)."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# CPU shims
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Shim:
    """One named patch: why it exists, how to apply it."""

    name: str
    why: str
    apply_fn: Callable[[], None]
    applied: bool = False

    def apply(self) -> None:
        if not self.applied:
            self.apply_fn()
            self.applied = True


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron-core passes torch.cuda.current_device() (an int) as a device
    return isinstance(device, int) and not isinstance(device, bool)


_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects tensors megatron-core asks for on "cuda" to the CPU.

    megatron-core allocates with literal ``device="cuda"`` / ``torch.cuda.current_device()``
    in its pipeline schedules, p2p communication, optimizer (found-inf flag), DDP buffers and
    dist_checkpointing, and calls ``.cuda()`` on buffers (CLIPViTModel's position ids). A
    function mode catches all of them at one place instead of patching each call site. It
    also answers ``Tensor.type()`` with the CUDA type name, because DistributedOptimizer
    accepts only ``torch.cuda.*Tensor`` parameters.

    Backward functions allocate on ``torch.cuda.current_device()`` too (sequence
    parallelism's reduce-scatter and all-gather buffers), so the mode must stay on inside
    backward passes — see :func:`_backward_keeping_mode`.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            return _backward_keeping_mode(self, func, args, kwargs or {})
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            # a module built on the meta device (the memory report) keeps its buffers there
            return args[0].to(_CPU) if not (kwargs.get("non_blocking") or args[0].is_meta) else args[0]
        if func is torch.Tensor.to and len(args) > 1:
            args = tuple(_CPU if _is_cuda_device(a) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        return func(*args, **kwargs)


def _backward_keeping_mode(mode: TorchFunctionMode, func, args, kwargs):
    """Run ``torch.autograd.backward`` / ``Tensor.backward`` with ``mode`` on.

    torch dispatches both through function modes, and a mode is off while its own handler runs:
    calling ``func`` from the handler would run every backward function without the mode (and
    megatron-core's recomputation calls ``torch.autograd.backward`` inside backward). Calling
    the autograd engine directly, as ``torch.autograd.backward`` does after its dispatch check
    (and as megatron-core's own ``custom_backward`` does), with the mode pushed back, keeps it on.
    The arguments are normalised by torch's own helpers, so the semantics are torch's.
    """
    import inspect

    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    tensors = given["self"] if func is torch.Tensor.backward else given["tensors"]
    grads = given["gradient"] if func is torch.Tensor.backward else given["grad_tensors"]
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    inputs = given["inputs"]
    inputs = () if inputs is None else (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    create_graph = given["create_graph"]
    retain_graph = create_graph if given["retain_graph"] is None else given["retain_graph"]
    with mode:
        grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)), is_grads_batched=False)
        _engine_run_backward(tensors, grads, retain_graph, create_graph, inputs, allow_unreachable=True,
                             accumulate_grad=True)


_MODE: _CudaToCpuMode | None = None


def _apply_cuda_allocations_on_cpu() -> None:
    global _MODE
    _MODE = _CudaToCpuMode()
    # Entered for the rest of the process: the shims are process-wide by design.
    _MODE.__enter__()
    torch.cuda.current_device = lambda: 0  # an int device that the mode maps to the CPU
    torch.cuda.set_device = lambda *a, **k: None


class _NoOpStream:
    """Stands in for torch.cuda.Stream / current_stream(): CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _NoOpEvent()

    def synchronize(self) -> None:
        pass


class _NoOpEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _apply_noop_streams() -> None:
    # DDP (grad sync), p2p communication and dist_checkpointing synchronise CUDA streams.
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _NoOpStream  # type: ignore[misc,assignment]
    torch.cuda.Event = _NoOpEvent  # type: ignore[misc,assignment]
    torch.cuda.current_stream = lambda *a, **k: _NoOpStream()
    torch.cuda.default_stream = lambda *a, **k: _NoOpStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


def _apply_cpu_rng_tracker() -> None:
    # megatron-core's model-parallel RNG tracker saves/restores the *CUDA* generator so that
    # dropout differs across TP ranks where it must. On the CPU the device generator is the CPU
    # generator, so route the tracker's get/set/seed there: same semantics, other device.
    from megatron.core.tensor_parallel import random as mpu_random

    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all itself.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mpu_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _apply_eager_jit_fuser() -> None:
    # megatron-core decorates its element-wise fusions (SwiGLU, RMSNorm, bias-dropout-add, ...)
    # with jit_fuser = torch.compile. On the CPU, inductor first builds and probes a C++
    # toolchain: ~20-40 s in *every* process, for functions that take microseconds eagerly.
    # The decorators are applied at import time, so switch dynamo off rather than the fuser.
    import torch._dynamo

    torch._dynamo.config.disable = True


CPU_SHIMS: dict[str, _Shim] = {
    s.name: s
    for s in (
        _Shim(
            name="cuda_allocations_on_cpu",
            why='literal device="cuda"/current_device() allocations, .cuda() buffers and the '
            "DistributedOptimizer's torch.cuda.*Tensor type check",
            apply_fn=_apply_cuda_allocations_on_cpu,
        ),
        _Shim(
            name="noop_streams",
            why="torch.cuda.synchronize/Stream/Event in DDP, p2p and dist_checkpointing",
            apply_fn=_apply_noop_streams,
        ),
        _Shim(
            name="cpu_rng_tracker",
            why="the model-parallel RNG tracker reads and seeds the CUDA generator",
            apply_fn=_apply_cpu_rng_tracker,
        ),
        _Shim(
            name="eager_jit_fuser",
            why="megatron-core's jit_fuser (torch.compile) costs ~20-40 s of inductor C++ "
            "builds per process on the CPU",
            apply_fn=_apply_eager_jit_fuser,
        ),
    )
}
