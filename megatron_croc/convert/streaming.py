"""Writing and reading megatron-core distributed checkpoints one tensor at a time.

Neither direction of a conversion ever materialises the whole model:

* The model is built on the ``meta`` device (:func:`meta_device`): no memory, no initialisation
  (a 7B CrocModel builds in under a second). Its ``sharded_state_dict()`` still says exactly
  which checkpoint keys, global shapes and chunk offsets this rank owns at this TP/PP layout —
  megatron-core's own rules, so what we write is what ``load_checkpoint`` expects.
* **Write** (:func:`save_streaming`): ``dist_checkpointing.save`` with a strategy whose planner
  computes each chunk only when the writer asks for it (``resolve_data``), from the *full*
  megatron tensor (cached for the chunks that follow it: TP shards, the gate and up halves)
  sliced at the chunk's global offsets. One file per chunk, so the writer never holds more
  than the chunk it is writing (torch's one-file-per-rank writer keeps every tensor of the
  file alive until the file is closed).
* **Read** (:class:`CheckpointReader`): a few parameters at a time (one layer), whatever layout
  the checkpoint was saved at. A TP=1/PP=1 meta model's sharded state dict names the checkpoint
  key and layer slot of each parameter; torch.distributed.checkpoint reads exactly that region
  (megatron-core's own loader cannot load part of a stacked-layer tensor).
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from megatron_croc.convert.mappings import local_spec_name
from megatron_croc.convert.sources import ConvertError

# ---------------------------------------------------------------------------------------------
# meta-device models
# ---------------------------------------------------------------------------------------------


class _KeepMeta(TorchFunctionMode):
    """Inside :func:`meta_device`: moving a meta tensor to another device (CLIPViTModel calls
    ``.cuda()`` on its position ids at construction) keeps it on meta."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func in (torch.Tensor.cuda, torch.Tensor.cpu, torch.Tensor.to)
            and args
            and isinstance(args[0], torch.Tensor)
            and args[0].is_meta
        ):
            dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
            return args[0] if dtype is None else args[0].to(dtype=dtype)
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device():
    """Build modules without allocating or initialising their parameters."""
    with torch.device("meta"), _KeepMeta():
        yield


def build_meta_stage(config):
    """This rank's CrocModel pipeline stage (megatron-core's parallel state decides which), on
    the meta device, with the local (non-TE) specs whose parameter names the mappings use."""
    from megatron.core import parallel_state as ps

    from megatron_croc.models.croc import CrocModel

    with meta_device():
        return CrocModel(
            config,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False),
            use_te=False,
        )


# ---------------------------------------------------------------------------------------------
# chunk index: checkpoint key + layer -> global parameter name
# ---------------------------------------------------------------------------------------------

_LAYER_NUMBER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ChunkTarget:
    global_name: str  # local-spec parameter name with global layer numbers
    prepend: int  # axes megatron prepends to the stored tensor (1 for stacked layers)
    shape: tuple[int, ...]  # the full (unsharded) tensor of this one parameter


def _sharded_tensors(value) -> list:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(value, ShardedTensor):
        return [value]
    if isinstance(value, ShardedTensorFactory):
        return [t for t in nested_values(value.build()) if isinstance(t, ShardedTensor)]
    return []


def chunk_index(sharded_state_dict: dict[str, Any]) -> dict[tuple[str, int | None], ChunkTarget]:
    """For every chunk this rank writes (main replicas only): (checkpoint key, global layer or
    None) -> the full parameter it is a piece of."""
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    index: dict[tuple[str, int | None], ChunkTarget] = {}
    for local_name, value in sharded_state_dict.items():
        for sh in _sharded_tensors(value):
            if not is_main_replica(sh.replica_id):
                continue
            if sh.prepend_axis_num > 1:
                raise ConvertError(f"{sh.key}: {sh.prepend_axis_num} prepended axes are not supported")
            layer = int(sh.global_offset[0]) if sh.prepend_axis_num else None
            name = local_name
            if layer is not None:
                name = _LAYER_NUMBER.sub(f".layers.{layer}.", local_name, count=1)
            target = ChunkTarget(local_spec_name(name), sh.prepend_axis_num, tuple(sh.global_shape[sh.prepend_axis_num:]))
            previous = index.setdefault((sh.key, layer), target)
            if previous != target:
                raise ConvertError(f"{sh.key} (layer {layer}) belongs to both {previous.global_name} and {target.global_name}")
    return index


# ---------------------------------------------------------------------------------------------
# streaming save
# ---------------------------------------------------------------------------------------------

FullTensorFn = Callable[[str, tuple[int, ...]], torch.Tensor]


class _ChunkResolver:
    """Computes chunks from full tensors; keeps the last few full tensors for the chunks that
    follow (the other half of [gate; up], the next TP shard)."""

    def __init__(self, index, full_tensor: FullTensorFn, *, cache_size: int = 2):
        self.index = index
        self.prepend = {key: t.prepend for (key, _), t in index.items()}
        self.full_tensor = full_tensor
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size

    def __call__(self, key: str, offsets, sizes, dtype: torch.dtype) -> torch.Tensor:
        prepend = self.prepend[key]
        layer = int(offsets[0]) if prepend else None
        target = self.index[(key, layer)]
        full = self.cache.get(target.global_name)
        if full is None:
            full = self.full_tensor(target.global_name, target.shape)
            if tuple(full.shape) != target.shape:
                raise ConvertError(f"{target.global_name}: made a tensor of shape {tuple(full.shape)}, the model has {target.shape}")
            self.cache[target.global_name] = full
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        region = tuple(slice(int(o), int(o) + int(s)) for o, s in zip(offsets[prepend:], sizes[prepend:]))
        return full[region].reshape(tuple(int(s) for s in sizes)).to(dtype)


@functools.cache
def _classes():
    """The DCP/megatron-core subclasses, defined once (classes built per call would sit in
    reference cycles, and with them every tensor their closures saw, until a full gc pass)."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, WriteItemType
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class StreamingPlanner(MCoreSavePlanner):
        """Computes each tensor chunk when the writer asks for it."""

        def __init__(self, resolver, progress, **kwargs):
            super().__init__(**kwargs)
            self.resolver, self.progress, self.bar = resolver, progress, None

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            if self.bar is None and self.progress:
                from tqdm import tqdm

                total = sum(1 for i in self.plan.items if i.type != WriteItemType.BYTE_IO)
                self.bar = tqdm(total=total, desc=self.progress, unit="tensor", dynamic_ncols=True)
            chunk = write_item.tensor_data.chunk
            out = self.resolver(write_item.index.fqn, chunk.offsets, chunk.sizes, write_item.tensor_data.properties.dtype)
            if self.bar is not None:
                self.bar.update(1)
            return out

    class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
        """megatron-core's torch_dist format, written chunk by chunk, synchronously."""

        def __init__(self, resolver, progress):
            super().__init__()
            self.resolver, self.progress = resolver, progress

        def save(self, sharded_state_dict, checkpoint_dir):
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
            writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=False, thread_count=1)
            planner = StreamingPlanner(self.resolver, self.progress, flatten_state_dict=False,
                                       flatten_sharded_tensors=False)
            try:
                dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)
            except CheckpointException as e:  # our own clear error, not DCP's wrapper around it
                for error, _ in e.failures.values():
                    if isinstance(error, ValueError):
                        raise error from None
                raise
            finally:
                if planner.bar is not None:
                    planner.bar.close()

        def async_save(self, *args, **kwargs):
            raise NotImplementedError("the streaming conversion writer is synchronous")

    class RegionLoadPlanner(LoadPlanner):
        """Reads given regions of stored tensors into given tensors: {key: (offsets, dest)}."""

        def __init__(self, requests):
            self.requests = requests

        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            self.metadata = metadata

        def create_local_plan(self):
            items = []
            for key, (offsets, dest) in self.requests.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def create_global_plan(self, global_plan):
            return global_plan

        def finish_plan(self, central_plan):
            return central_plan

        def load_bytes(self, read_item, value):
            pass

        def resolve_tensor(self, read_item):
            dest = self.requests[read_item.dest_index.fqn][1]
            return narrow_tensor_by_index(dest, read_item.dest_offsets, read_item.lengths)

        def commit_tensor(self, read_item, tensor):
            pass

    return StreamingSaveStrategy, RegionLoadPlanner


def save_streaming(
    checkpoint_dir: str | Path,
    model,
    full_tensor: FullTensorFn,
    *,
    common: dict[str, Any],
    drop_prefixes: tuple[str, ...] = (),
    progress: str | None = None,
) -> None:
    """Collective over the default process group: write this rank's part of ``model`` (a meta
    stage) into the dist checkpoint folder ``checkpoint_dir`` (which must exist), computing
    every full parameter with ``full_tensor(global_name, shape)``. Parameters whose names start
    with one of ``drop_prefixes`` are left out; ``common`` is the checkpoint's common state
    (iteration, layout, ...)."""
    from megatron.core import dist_checkpointing

    sharded = {
        name: value for name, value in model.sharded_state_dict().items()
        if not (drop_prefixes and name.startswith(drop_prefixes))
    }
    resolver = _ChunkResolver(chunk_index(sharded), full_tensor)
    state = {"model": sharded, **common}
    dist_checkpointing.save(state, str(checkpoint_dir), sharded_strategy=_classes()[0](resolver, progress))


# ---------------------------------------------------------------------------------------------
# streaming read
# ---------------------------------------------------------------------------------------------


def read_checkpoint_metadata(checkpoint_dir: Path) -> dict:
    """The stored tensors' metadata (key -> shape, dtype) of a dist checkpoint folder."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata
    except Exception as e:
        raise ConvertError(f"{checkpoint_dir}: not a readable megatron-core dist checkpoint ({e})") from None


class CheckpointReader:
    """Full tensors of a dist checkpoint (any TP/PP layout), a few at a time.

    Which checkpoint key and layer slot hold a parameter comes from a TP=1/PP=1 meta model's
    sharded state dict (megatron-core's naming, TE-style norm keys included); the reading is
    torch.distributed.checkpoint's, asked for exactly the region of that one parameter (one
    layer of a stacked tensor), so nothing else is loaded.
    """

    def __init__(self, checkpoint_dir: str | Path, model, metadata: dict | None = None):
        self.dir = Path(checkpoint_dir)
        self.metadata = read_checkpoint_metadata(self.dir) if metadata is None else metadata
        self.where: dict[str, tuple[str, int | None, ChunkTarget]] = {}
        self.flexible: set[str] = set()  # vocabulary-padded: the stored row count may differ
        for local_name, value in model.sharded_state_dict().items():
            for sh in _sharded_tensors(value):
                if sh.allow_shape_mismatch:
                    self.flexible.add(local_spec_name(local_name))
        for (key, layer), target in chunk_index(model.sharded_state_dict()).items():
            self.where[target.global_name] = (key, layer, target)
        self.names = list(self.where)

    def key(self, name: str) -> str:
        return self.where[name][0]

    def present(self, name: str) -> bool:
        return self.key(name) in self.metadata

    def stored_dtype(self, name: str) -> torch.dtype:
        return self.metadata[self.key(name)].properties.dtype

    def stored_shape(self, name: str) -> tuple[int, ...]:
        key, _, target = self.where[name]
        return tuple(self.metadata[key].size)[target.prepend:]

    def check_shapes(self) -> list[str]:
        """Problems: parameters whose stored shape disagrees with the model (the vocabulary
        padding may differ: it depends on the TP size the checkpoint was saved at)."""
        problems = []
        for name, (key, layer, target) in self.where.items():
            stored = self.metadata.get(key)
            if stored is None:
                continue
            size = tuple(stored.size)
            got = size[target.prepend:]
            ok = got[1:] == target.shape[1:] if name in self.flexible else got == target.shape
            if target.prepend and size[0] <= layer:
                ok = False
            if not ok:
                problems.append(f"{key} (parameter {name}): the checkpoint has {size}, this model expects "
                                f"{(('L',) if target.prepend else ()) + target.shape}")
        return problems

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load

        requests: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}
        out = {}
        for name in names:
            key, layer, target = self.where[name]
            if key in requests:
                raise ConvertError(f"{key} requested twice in one read")
            size = self.metadata[key].size
            shape = tuple(size)[target.prepend:]
            offsets = ((layer,) if target.prepend else ()) + (0,) * len(shape)
            dest = torch.empty(((1,) if target.prepend else ()) + shape, dtype=self.metadata[key].properties.dtype)
            requests[key] = (offsets, dest)
            out[name] = dest[0] if target.prepend else dest
        with warnings.catch_warnings():  # "no_dist: assuming a single process" is the point
            warnings.simplefilter("ignore", UserWarning)
            dcp_load({}, storage_reader=FileSystemReader(str(self.dir)), planner=_classes()[1](requests), no_dist=True)
        return out
