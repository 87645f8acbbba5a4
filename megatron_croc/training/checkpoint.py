"""Checkpoints with megatron-core's dist_checkpointing: model, optimizer, scheduler, RNG
states, iteration and data position, loadable at any TP/PP/DP layout.

Layout of ``--save``::

    iter_0000200/                     a dist_checkpointing directory
    latest_checkpointed_iteration.txt the iteration to resume from (Megatron's name)

Crash safety: a checkpoint is written to ``iter_XXXXXXX.tmp``, renamed once every rank has
finished, and only then is the latest-pointer replaced (write + atomic rename). A kill at any
moment leaves the previous checkpoint and pointer intact; stale ``.tmp`` folders are removed by
the next save.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.utils import unwrap_model

from megatron_croc.config import STAGE_SPECIFIC_PREFIXES

LATEST_FILE = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_latest_iteration(root: str | os.PathLike) -> int | None:
    path = Path(root) / LATEST_FILE
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def resolve_checkpoint_dir(path: str | os.PathLike, iteration: int | None = None) -> Path:
    """A dist_checkpointing folder: ``path`` itself when it is one (an ``iter_XXXXXXX``), else
    the latest (or the given) iteration under a ``--save`` root."""
    path = Path(path)
    if (path / ".metadata").exists():
        return path
    if iteration is None:
        iteration = read_latest_iteration(path)
        if iteration is None:
            raise FileNotFoundError(
                f"--load {path}: neither a checkpoint folder (no .metadata) nor a --save root (no {LATEST_FILE}). "
                "Point --load at a folder written by --save or by tools/convert_checkpoint.py."
            )
    ckpt = iteration_dir(path, iteration)
    if not (ckpt / ".metadata").exists():
        raise FileNotFoundError(f"--load {path}: {ckpt} is missing or incomplete (no .metadata)")
    return ckpt


def checkpoint_common_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The non-tensor state of one checkpoint folder (iteration, stage, schedule, ...); needs no
    process group, so the launcher can read it before any rank starts."""
    from megatron.core import dist_checkpointing

    return dict(dist_checkpointing.load_common_state_dict(str(folder)))


def checkpoint_tensor_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor a checkpoint folder holds, by key (layers stacked on a
    leading axis), read from its metadata alone."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {k: tuple(v.size) for k, v in stored.items() if isinstance(v, TensorStorageMetadata)}


RUN_STATE_FILE = "run_state.json"


def write_run_state(root: str, *, iteration: int, train_iters: int, stopped_by: str | None) -> None:
    """``--save``/run_state.json: how the last process of the run ended (rank 0 writes it,
    atomically). A Slurm script requeues a job whose run is not complete
    (examples/slurm/pretrain_croc.sbatch)."""
    import json

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = Path(root) / RUN_STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"iteration": iteration, "train_iters": train_iters,
                               "complete": iteration >= train_iters, "stopped_by": stopped_by}, indent=1) + "\n")
    os.replace(tmp, path)


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


def _rng_sharded_object(state: Any):
    """Per-rank RNG state as a ShardedObject (one per TP x PP position, replicated over DP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _model_sharded_state_dict(model_chunks: list) -> dict[str, Any]:
    # Keys of the CrocModel itself, whatever wraps it (DDP, Float16Module): a checkpoint must
    # not depend on how the model was trained.
    chunks = unwrap_model(list(model_chunks))
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in chained if isinstance(o, DistributedOptimizer)]


def _prepare_torch_adam_for_load(optimizer) -> None:
    """Work around megatron-core 0.19 bugs of DistributedOptimizer with torch's AdamW (the
    fallback without apex/TE, i.e. every CPU run and GPU machines without TE), measured:

    - before the first step the torch optimizer has no state, and DistributedOptimizer's
      state_dict() asserts on the missing 'step' while building the load request: create the
      state AdamW would create (step 0, zero moments); the load overwrites it;
    - ``_set_main_param_and_optimizer_states`` copies every state tensor, 'step' included, from
      a dict without 'step' (KeyError), and into fp32 main params that are leaves requiring
      grad (in-place error): copy only what the checkpoint has, without autograd.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for dist_opt in _distributed_optimizers(optimizer):
        inner = dist_opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state.get(param):
                    inner.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                    }
        dist_opt._set_main_param_and_optimizer_states = _set_main_param_and_states.__get__(dist_opt)


def _unshare_torch_adam_steps(optimizer) -> None:
    """Third bug of the same path: DistributedOptimizer.load_state_dict gives every parameter
    the *same* 'step' tensor, which torch's AdamW then increments once per parameter per step
    (wrong bias correction from the first step after a resume). Give each its own copy."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for dist_opt in _distributed_optimizers(optimizer):
        for state in dist_opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _set_main_param_and_states(self, model_param, tensors) -> None:
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    destinations = {"param": main_param, **{k: v for k, v in self.optimizer.state[main_param].items()
                                            if isinstance(v, torch.Tensor)}}
    with torch.no_grad():
        for key, dst in destinations.items():
            src = tensors.get(key)
            if isinstance(src, torch.Tensor):
                dst.copy_(src)


def _optimizer_sharded_state_dict(optimizer, model_sd: dict[str, Any], *, is_loading: bool):
    # "fully_reshardable": the only sharding of DistributedOptimizer state that measured to
    # save and load across TP/PP/DP changes (tests/parallel/test_training.py reshards it).
    return optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
    )


def use_in_process_write_results_queue() -> None:
    """Make dist_checkpointing's save hand its write results over a plain in-process queue.

    Why: megatron-core's ``FileSystemWriterAsync`` (the torch_dist save strategy) fetches its
    results queue from ``filesystem_async.get_write_results_queue()``, which on first use starts
    a ``multiprocessing`` *spawn* Manager: a fresh Python interpreter per rank that re-imports
    the training module (3.7 s of a 3.8 s first save on the dev VM), and at exit a 1 s join. The
    queue only crosses a process boundary for asynchronous saves, which this package never
    makes (``dist_checkpointing.save`` without ``async_sharded_save``): the writer threads and
    the reader are in the saving process, so a ``queue.Queue`` (the same put/get_nowait) does.
    megatron-core keeps the queue in the module global ``_results_queue`` and creates one only
    while it is None; tests/unit/training/test_checkpoint_queue.py fails if that changes.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _write_atomically(root: str, iteration: int, state: dict[str, Any], keep_last: int) -> Path:
    """dist_checkpointing.save into iter_XXXXXXX.tmp, rename, then move the latest-pointer.
    Collective over the default process group."""
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        for stale in Path(root).glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # re-saving the same iteration (e.g. after a resume)
            shutil.rmtree(final)
        tmp.mkdir(parents=True)
    dist.barrier()
    use_in_process_write_results_queue()
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if rank == 0:
        tmp.rename(final)
        pointer = Path(root) / LATEST_FILE
        pointer_tmp = pointer.with_suffix(".tmp")
        pointer_tmp.write_text(f"{iteration}\n")
        os.replace(pointer_tmp, pointer)
        _prune(root, keep_last)
    dist.barrier()
    return final


def save_checkpoint(
    root: str,
    iteration: int,
    *,
    model_chunks: list,
    optimizer,
    scheduler,
    extra_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Save a resumable training checkpoint and make it the latest; returns its directory."""
    model_sd = _model_sharded_state_dict(model_chunks)
    state: dict[str, Any] = dict(model_sd)
    state["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=False)
    state["rng_state"] = _rng_sharded_object(_rng_state())
    state["scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    state["layout"] = _layout()
    state["format_version"] = FORMAT_VERSION
    state.update(extra_state)
    return _write_atomically(root, iteration, state, keep_last)


def save_weights(root: str, *, model_chunks: list, extra_state: dict[str, Any] | None = None) -> Path:
    """Save model weights only (no optimizer, scheduler, RNG or data position), as iteration 0:
    ``--load`` then starts training from these weights (e.g. converted from HuggingFace)."""
    state: dict[str, Any] = dict(_model_sharded_state_dict(model_chunks))
    state["iteration"] = 0
    state["layout"] = _layout()
    state["format_version"] = FORMAT_VERSION
    state.update(extra_state or {})
    return _write_atomically(root, 0, state, keep_last=0)


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    dirs = sorted(p for p in Path(root).glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in dirs[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _absent_stage_modules(ckpt: Path) -> tuple[str, ...]:
    """The stage-specific module prefixes of which the checkpoint holds no tensor."""
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    return tuple(p for p in STAGE_SPECIFIC_PREFIXES if not any(k.startswith(p) for k in stored))


def _without_prefixes(tree: Any, prefixes: tuple[str, ...]) -> Any:
    if isinstance(tree, dict):
        return {
            k: _without_prefixes(v, prefixes)
            for k, v in tree.items()
            if not str(getattr(v, "key", "")).startswith(prefixes)
        }
    return tree


def load_checkpoint(
    root: str,
    *,
    model_chunks: list,
    optimizer,
    scheduler,
    stage: str,
    no_load_optim: bool = False,
    no_load_rng: bool = False,
    override_scheduler: bool = False,
    finetune: bool = False,
    iteration: int | None = None,
) -> dict[str, Any]:
    """Load the latest (or the given) checkpoint into the model, and the optimizer, scheduler
    and RNG when the checkpoint has them, belongs to the same stage and they are asked for.
    Returns the common state (iteration, data position, ...).

    Weights only (training restarts at iteration 0, fresh optimizer) when the checkpoint has no
    optimizer state (converted from HuggingFace) or comes from another stage (align -> croc ->
    instruct); modules new to this stage keep their initialisation. ``finetune`` (Megatron's
    ``--finetune``): weights only also from a checkpoint of the same stage.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt = resolve_checkpoint_dir(root, iteration)

    common = dict(dist_checkpointing.load_common_state_dict(str(ckpt)))
    resumable = "scheduler" in common and common.get("croc_stage") == stage and not finetune
    same_layout = common.get("layout") == _layout()

    model_sd = _model_sharded_state_dict(model_chunks)
    absent = _absent_stage_modules(ckpt)
    if absent:
        # Request nothing of a module the checkpoint lacks: megatron-core cannot merge the
        # gated-MLP factories of a module it did not load.
        model_sd = {k: _without_prefixes(v, absent) for k, v in model_sd.items()}
    request: dict[str, Any] = dict(model_sd)
    load_optim = resumable and not no_load_optim and optimizer is not None
    if load_optim:
        _prepare_torch_adam_for_load(optimizer)
        request["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)
    load_rng = resumable and not no_load_rng and same_layout
    if load_rng:
        request["rng_state"] = _rng_sharded_object(None)

    # megatron-core's naming: "unexpected" = requested but absent from the checkpoint (these
    # are skipped and keep their current values), "missing" = in the checkpoint, not requested.
    state, _, missing = dist_checkpointing.load(request, str(ckpt), strict=StrictHandling.RETURN_ALL)
    model_keys = [k for k in ("model", *[f"model{i}" for i in range(len(model_chunks))]) if k in state]
    fresh = sorted(k for k in missing if not k.startswith(STAGE_SPECIFIC_PREFIXES))
    if fresh:
        raise KeyError(f"{ckpt} lacks {len(fresh)} model tensors this model needs, e.g. {fresh[:5]}")
    for chunk, key in zip(model_chunks, model_keys):
        result = unwrap_model(chunk).load_state_dict(state[key], strict=False)
        wrong = [k for k in result.missing_keys if not k.startswith(STAGE_SPECIFIC_PREFIXES) and "_extra_state" not in k]
        if wrong:
            raise KeyError(f"{ckpt}: no values for {wrong[:5]}")
    if load_optim:
        # The optimizer's parameter groups carry each group's peak and final LR (projector,
        # pool); loading restores the checkpoint's. --override-opt-param-scheduler keeps this
        # command's, as the scheduler does for the main LR.
        command_lrs = [(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        if override_scheduler:
            for group, (max_lr, min_lr) in zip(optimizer.param_groups, command_lrs):
                group["max_lr"], group["min_lr"] = max_lr, min_lr
        _unshare_torch_adam_steps(optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(common["scheduler"])
    if load_rng:
        _set_rng_state(state["rng_state"])
    common["loaded_optimizer"] = load_optim
    common["initialised_fresh"] = sorted({p.rstrip(".") for p in absent} | {k.split(".")[0] for k in missing})
    if not resumable:
        common["iteration"] = 0
        common.pop("data", None)
    return common
