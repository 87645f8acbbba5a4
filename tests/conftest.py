"""Shared test setup: one gloo process group (world size 1) for single-process tests, and a
synthetic micro-batch builder that depends on nothing but the model's batch contract."""

from __future__ import annotations

import pytest
import torch

from megatron_croc.platform import init_platform


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, 1 process) and megatron-core's parallel state at TP=PP=1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_croc.testing import free_port

    init_platform()
    if not dist.is_initialized():
        # an explicit address, not MASTER_PORT: subprocesses the tests start must not inherit
        # (and collide with) this process group's port
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
