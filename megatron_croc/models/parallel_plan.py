"""How each parameter of a Croc model is split across tensor-parallel ranks, and the two
operations that follow from it: shard a full tensor, gather the full tensor back.

megatron-core marks every split parameter with ``tensor_model_parallel`` and
``partition_dim``; the one layout it does not mark is the gated MLP's ``linear_fc1``
(SwiGLU), whose shard on each rank is ``[gate_shard; up_shard]`` — so the full tensor is
``[gate; up]`` with each half split separately. Fused QKV is stored per query group
(``[q_g, k_g, v_g]`` for each group g), so a plain split along dim 0 keeps whole groups.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, kw_only=True)
class TensorParallelSplit:
    dim: int | None  # None: replicated on every tensor-parallel rank
    gated: bool = False  # [gate; up] halves split separately


def split_of(model: torch.nn.Module, name: str, param: torch.Tensor) -> TensorParallelSplit:
    if not getattr(param, "tensor_model_parallel", False):
        return TensorParallelSplit(dim=None)
    dim = int(getattr(param, "partition_dim", 0))
    gated = False
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")) and dim == 0:
        owner = model.get_submodule(name.rsplit(".", 2)[0])
        gated = bool(getattr(owner.config, "gated_linear_unit", False))
    return TensorParallelSplit(dim=dim, gated=gated)


def shard_tensor(full: torch.Tensor, split: TensorParallelSplit, rank: int, size: int) -> torch.Tensor:
    """This rank's shard of a full tensor."""
    if split.dim is None or size == 1:
        return full
    if split.gated:
        gate, up = full.chunk(2, dim=split.dim)
        return torch.cat(
            [gate.chunk(size, dim=split.dim)[rank], up.chunk(size, dim=split.dim)[rank]], dim=split.dim
        )
    return full.chunk(size, dim=split.dim)[rank]


def join_shards(shards: list[torch.Tensor], split: TensorParallelSplit) -> torch.Tensor:
    """The full tensor from all ranks' shards, in rank order."""
    if split.dim is None or len(shards) == 1:
        return shards[0]
    if split.gated:
        halves = [s.chunk(2, dim=split.dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=split.dim)
    return torch.cat(shards, dim=split.dim)


def gather_tensor(shard: torch.Tensor, split: TensorParallelSplit, group) -> torch.Tensor:
    size = dist.get_world_size(group) if group is not None else 1
    if split.dim is None or size == 1:
        return shard
    shards = [torch.empty_like(shard) for _ in range(size)]
    dist.all_gather(shards, shard.contiguous(), group=group)
    return join_shards(shards, split)


def full_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    """Gather tensors keyed by parameter name (weights, or their grads) to full size."""
    params = dict(model.named_parameters())
    return {
        name: gather_tensor(t, split_of(model, name, params[name]), group)
        for name, t in tensors.items()
    }


def load_full_state(model: torch.nn.Module, full: dict[str, torch.Tensor], rank: int, size: int, *,
                    keep: Collection[str] = ()) -> None:
    """Copy full-size tensors into this rank's parameter shards (names must match); parameters
    named in ``keep`` keep their values."""
    params = {n: p for n, p in model.named_parameters() if n not in keep}
    missing = sorted(set(params) - set(full))
    if missing:
        raise KeyError(f"no full tensor for parameters: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, param in params.items():
            shard = shard_tensor(full[name], split_of(model, name, param), rank, size)
            if shard.shape != param.shape:
                raise ValueError(
                    f"{name}: shard of shape {tuple(shard.shape)} does not fit parameter "
                    f"{tuple(param.shape)} at tensor-parallel rank {rank} of {size}"
                )
            param.copy_(shard)
