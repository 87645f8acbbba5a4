"""dist_checkpointing's save gets an in-process results queue (training.checkpoint): what
megatron-core would start instead, and that a save goes through it."""

from __future__ import annotations

import inspect
import queue

import torch
from megatron.core.dist_checkpointing.strategies import filesystem_async

from megatron_croc.training.checkpoint import use_in_process_write_results_queue


def test_megatron_would_start_a_spawn_manager_and_keeps_the_queue_in_a_global():
    # if megatron-core stops starting a Manager here, the replacement is no longer needed
    source = inspect.getsource(filesystem_async.get_write_results_queue)
    assert "Manager()" in source and "global _results_queue" in source and "_results_queue is None" in source


def test_a_save_writes_its_results_through_the_in_process_queue(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_croc.testing import init_distributed

    init_distributed()
    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    use_in_process_write_results_queue()
    results = filesystem_async._results_queue
    assert type(results) is queue.Queue and filesystem_async.get_write_results_queue() is results
    use_in_process_write_results_queue()  # idempotent: an existing queue is kept
    assert filesystem_async._results_queue is results

    put = []
    monkeypatch.setattr(results, "put", lambda item, *a, **k: (put.append(item), queue.Queue.put(results, item)))
    weight = torch.arange(6.0).view(2, 3)
    state = {"w": ShardedTensor.from_rank_offsets("w", weight, replica_id=0)}
    dist_checkpointing.save(state, str(tmp_path))
    assert len(put) == 1 and results.empty()  # the save put its results there and took them back
    loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.empty(2, 3), replica_id=0)},
                                     str(tmp_path))
    assert torch.equal(loaded["w"], weight)
