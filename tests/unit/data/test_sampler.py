"""Global-batch sampler: DP slicing, resume position, the resumable loader with prefetching."""

from __future__ import annotations

import itertools

import pytest
from data_helpers import make_dataset

from megatron_croc.data.dataset import DataLoaderConfig, build_data_loader
from megatron_croc.data.sampler import GlobalBatchSampler, rank_slices


def take(sampler: GlobalBatchSampler, n: int) -> list[list[tuple[int, ...]]]:
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_each_rank_gets_its_slice_and_all_ranks_make_the_global_batch(dp):
    mbs, gbs = 2, 16
    per_rank = [take(GlobalBatchSampler(micro_batch_size=mbs, global_batch_size=gbs, dp_rank=r, dp_size=dp), 2 * gbs // (mbs * dp))
                for r in range(dp)]
    steps = len(per_rank[0])
    assert steps == 2 * GlobalBatchSampler(micro_batch_size=mbs, global_batch_size=gbs, dp_size=dp).num_micro_batches
    seen = []
    for k in range(steps):
        for r in range(dp):
            mb = per_rank[r][k]
            assert len(mb) == mbs
            seen += [g for row in mb for g in row]
    assert seen == list(range(2 * gbs))  # disjoint, complete, Megatron's order
    expected = rank_slices(list(range(gbs)), micro_batch_size=mbs, dp_size=dp)
    assert [[g for row in per_rank[r][k] for g in row] for k in range(len(expected)) for r in range(dp)] == \
        [x for step in expected for x in step]


def test_resume_continues_with_next_sample_even_with_other_dp_size():
    a = GlobalBatchSampler(micro_batch_size=2, global_batch_size=8, dp_rank=0, dp_size=2)
    it = iter(a)
    consumed_batches = [next(it) for _ in range(4)]  # two global batches
    assert consumed_batches[-1] == [(12,), (13,)]
    state = a.state_dict()
    assert state["consumed_samples"] == 16
    b = GlobalBatchSampler(micro_batch_size=2, global_batch_size=8, dp_rank=0, dp_size=2)
    b.load_state_dict(state)
    assert take(b, 1) == [[(16,), (17,)]]
    # Resume the same position on 4 DP ranks (rank 3 of 4).
    c = GlobalBatchSampler(micro_batch_size=2, global_batch_size=8, dp_rank=3, dp_size=4)
    c.load_state_dict(state)
    assert take(c, 1) == [[(22,), (23,)]]


def test_total_samples_and_bad_configs():
    s = GlobalBatchSampler(micro_batch_size=2, global_batch_size=4, dp_size=2, dp_rank=1, total_samples=10)
    assert len(s) == 2 and [r for mb in iter(s) for r in mb] == [(2,), (3,), (6,), (7,)]  # 2 whole global batches
    with pytest.raises(ValueError, match="not a multiple"):
        GlobalBatchSampler(micro_batch_size=3, global_batch_size=8)
    with pytest.raises(ValueError, match="dp_rank"):
        GlobalBatchSampler(micro_batch_size=1, global_batch_size=2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="micro-step boundary"):
        GlobalBatchSampler(micro_batch_size=2, global_batch_size=4, consumed_samples=3)
    with pytest.raises(TypeError):
        len(GlobalBatchSampler(micro_batch_size=1, global_batch_size=1))


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")  # torch DataLoader workers fork
def test_resumable_loader_counts_delivered_not_prefetched(tmp_path, packing):
    prefix = make_dataset(tmp_path / "d", [8 + (i % 7) for i in range(40)])
    cfg = DataLoaderConfig(data_path=[(None, prefix)], seq_length=48, num_image_tokens=4, micro_batch_size=2,
                           global_batch_size=8, seed=11, packing=packing, num_workers=2)
    ref = build_data_loader(cfg, dp_rank=1, dp_size=2)
    batches = [next(ref) for _ in range(5)]
    state = ref.state_dict()
    assert state["consumed_samples"] == 5 * 2 * 2  # 5 micro-batches x mbs x dp, whatever was prefetched
    assert ref.sampler.consumed_samples > state["consumed_samples"]  # the workers ran ahead
    cont = next(ref)
    resumed = build_data_loader(cfg, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    again = next(resumed)
    assert again["sample_ids"].tolist() == cont["sample_ids"].tolist()
    assert (again["tokens"] == cont["tokens"]).all() and (again["images"] == cont["images"]).all()
    # Nothing repeats before the resume point (rank 1 of 2).
    seen = [i for b in batches for i in b["sample_ids"].tolist()]
    assert not set(seen) & set(cont["sample_ids"].tolist())
    # In-place reload of the same loader also discards its prefetched batches.
    ref.load_state_dict(state)
    assert next(ref)["sample_ids"].tolist() == cont["sample_ids"].tolist()


def test_loader_config_takes_megatron_data_path_as_written():
    common = dict(seq_length=48, num_image_tokens=4, micro_batch_size=2, global_batch_size=8)
    pairs = [(0.7, "data/a"), (0.3, "data/b")]
    assert DataLoaderConfig(data_path=["0.7", "data/a", "0.3", "data/b"], **common).data_path == pairs
    assert DataLoaderConfig(data_path="0.7 data/a 0.3 data/b", **common).data_path == pairs
    assert DataLoaderConfig(data_path=pairs, **common).data_path == pairs
    assert DataLoaderConfig(data_path=["data/a", "data/b"], **common).data_path == [(None, "data/a"), (None, "data/b")]
    with pytest.raises(ValueError, match="weights must be positive"):
        DataLoaderConfig(data_path=["0", "data/a"], **common)
