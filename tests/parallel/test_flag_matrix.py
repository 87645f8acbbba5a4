"""Every option the trainer accepts that can run on a CPU, run for a few iterations of the real
trainer (``training.pretrain.train`` from ``parse_args``, on two gloo processes) at PP=2 and at
TP=2, each launch under its own timeout: an option that crashes or hangs fails here, not in a
user's allocation. Each run must finish its iterations with finite losses.

To stay fast, compatible options share a run, and the runs of one launch follow each other in
the same two processes (a save, then a load of it). ``test_every_option_is_in_the_matrix``
keeps the matrix complete: each flag of the parser, and each value of a flag with choices,
is run here, or is listed with the reason it cannot run on a CPU (and is then checked to be
refused with an error naming it), or with the test that covers it.
"""

from __future__ import annotations

import math
import os

import pytest

from megatron_croc.testing import run_distributed

pytestmark = pytest.mark.parallel

ITERS = 3
LAYOUTS = {
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "tp2": ["--tensor-model-parallel-size", "2"],
}
ONLY_AT = {  # options that need a layout's dimension: added there only
    "pp2": ["--virtual-pipeline-model-parallel-size", "2"],  # interleaved 1F1B (4 layers: 2 stages x 2 chunks)
    "tp2": ["--sequence-parallel"],  # splits over the tensor-parallel ranks
}

# Launches: each a list of runs (argv additions) executed one after the other in the same two
# processes. "{save}", "{tensorboard}" and "{valid}" are filled in per launch.
LAUNCHES = {
    "full-uniform-recompute": [[
        "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
        "--pack-sequences", "--croc-attention", "prefix", "--croc-matcher", "nearest", "--croc-vtr-positions",
        "masked", "--croc-pool-init", "normal", "--croc-pool-size", "32", "--croc-mask-ratio", "0.5",
        "--croc-vtr-weight", "5", "--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce",
        "--valid-data-path", "{valid}", "--eval-interval", "2", "--eval-iters", "1", "--lr-decay-style", "linear",
        "--lr", "1e-3", "--min-lr", "1e-5", "--lr-warmup-fraction", "0.5", "--weight-decay", "0.01",
        "--clip-grad", "0.5", "--adam-beta1", "0.8", "--adam-beta2", "0.95", "--adam-eps", "1e-6",
        "--projector-lr", "2e-3", "--pool-lr", "3e-3", "--num-layers", "4", "@only-at",
    ]],
    "block-recompute": [[
        "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1",
        "--num-layers", "4", "--unfreeze-vision", "--attention-backend", "split", "--no-vision-cuda-graph",
        "--no-croc-assignment-lookahead", "--lr-decay-style", "constant", "--seed", "7",
        "--log-interval", "1", "--max-skipped-steps", "3", "--tensorboard-dir", "{tensorboard}", "@only-at",
    ]],
    "selective-recompute-save-load-resume-stages": [
        ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp",
         "--lr-decay-style", "cosine", "--save", "{save}",
         "--save-interval", "2", "--keep-last", "1", "--min-lr", "1e-5", "--num-layers", "4", "@only-at"],
        ["--recompute-granularity", "selective", "--load", "{save}", "--no-load-optim", "--no-load-rng",
         "--train-iters", str(ITERS + 2), "--exit-interval", str(ITERS + 1), "--min-lr", "1e-5", "--num-layers", "4",
         "@only-at"],
        # the run continues in its own --save with a longer schedule, then past its end at min-lr
        ["--auto-resume", "--save", "{save}", "--train-iters", str(ITERS + 1), "--override-opt-param-scheduler",
         "--min-lr", "1e-5", "--num-layers", "4", "@only-at"],
        ["--load", "{save}", "--save", "{save}", "--train-iters", str(ITERS + 2), "--use-checkpoint-opt-param-scheduler",
         "--min-lr", "1e-5", "--exit-signal-handler", "--exit-signal", "SIGUSR1", "--num-layers", "4", "@only-at"],
        # the same stage again from those weights only: iteration 0, fresh optimizer
        ["--load", "{save}", "--finetune", "--min-lr", "1e-5", "--num-layers", "4", "@only-at"],
        ["--croc-stage", "align", "--croc-matcher", "hungarian", "--croc-attention", "visual",
         "--croc-vtr-positions", "all", "--croc-pool-init", "token_scale",
         "--croc-assignment-lookahead", "--attention-backend", "sdpa", "--vision-cuda-graph"],
        ["--croc-stage", "instruct", "--exit-duration-in-mins", "1e-6"],  # stops at the first iteration boundary
    ],
}
# Every run: the trainer's flags for a tiny, fast run on the demo data. No data-loader worker
# processes (each would start its own interpreter: ~5 s apiece on two cores); the default of 2
# workers runs in tests/parallel/test_demo_launcher.py.
COMMON = ["--model", "tiny", "--vocab-size", "640", "--seq-length", "160", "--micro-batch-size", "2",
          "--global-batch-size", "4", "--num-workers", "0", "--train-iters", str(ITERS), "--log-interval", "1"]

# Flags not run here, and why.
NEEDS_GPU = {  # refused on a CPU, checked in test_options_that_need_a_gpu_are_refused_clearly
    "--fp8-format": ["--fp8-format", "hybrid"],
    "--fp8-recipe": ["--fp8-format", "e4m3", "--fp8-recipe", "mxfp8"],
    "--apply-rope-fusion": ["--apply-rope-fusion"],
    "--gradient-accumulation-fusion": ["--gradient-accumulation-fusion"],
}
NEEDS_CUDA_VALUES = {  # values of a flag refused on a CPU, checked in the same test
    ("--attention-backend", "flex"): ["--attention-backend", "flex"],
}
COVERED_ELSEWHERE = {
    "--help": "argparse",
    "--data-path": "every run here (the demo data)",
    "--dry-run": "tests/parallel/test_memory_report.py (no training)",
    "--dry-run-world-size": "tests/parallel/test_memory_report.py",
    "--gpu-memory-gb": "tests/parallel/test_memory_report.py",
}
# Presets too large for a CPU: the tiny model runs here; the memory report's tests build the
# others on the meta device. The other exit signals: tests/unit/training/test_exits.py.
VALUES_ELSEWHERE = {("--model", v) for v in ("vicuna-7b", "vicuna-13b", "llama3-8b")} | {
    ("--exit-signal", v) for v in ("SIGUSR2", "SIGINT")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_croc.data.demo import ensure_demo_dataset

    root = tmp_path_factory.mktemp("matrix_data")
    train = ensure_demo_dataset(root, image_size=32, num_image_tokens=16, seq_length=160, num_samples=200)
    valid = ensure_demo_dataset(root, image_size=32, num_image_tokens=16, seq_length=160, num_samples=32, seed=99,
                                tokenizer_model=train.tokenizer_model)
    return train.prefix, valid.prefix


def _runs(launch: str, layout: str, data, tmp_path) -> list[list[str]]:
    fill = {"{save}": str(tmp_path / "ckpt"), "{tensorboard}": str(tmp_path / "tb"), "{valid}": data[1]}
    runs = []
    for extra in LAUNCHES[launch]:
        argv = [*COMMON, "--data-path", data[0], *LAYOUTS[layout]]
        for item in extra:
            argv += ONLY_AT[layout] if item == "@only-at" else [fill.get(item, item)]
        runs.append(argv)
    return runs


def _matrix_worker(rank, world_size, runs):
    from megatron_croc.training.arguments import parse_args
    from megatron_croc.training.pretrain import train

    results = []
    for argv in runs:
        summary = train(parse_args(argv, world_size=world_size))
        results.append((summary["iteration"], summary["history"]) if summary["is_writer"] else None)
    return results


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_trainer_runs_with_option(launch, layout, data, tmp_path):
    runs = _runs(launch, layout, data, tmp_path)
    # ~10 s to start two processes and 1-4 s per run when the machine is free; a hang fails
    results = run_distributed(_matrix_worker, 2, runs=runs, timeout=60 + 45 * len(runs))
    writer = [next(per_rank[i] for per_rank in results if per_rank[i] is not None) for i in range(len(runs))]
    for argv, (iteration, history) in zip(runs, writer):
        last = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag.startswith("--")}  # as argparse
        expected = 1 if "--exit-duration-in-mins" in last else int(last.get("--exit-interval", last["--train-iters"]))
        assert iteration == expected, (argv, iteration)
        assert history, argv
        for step in history:
            losses = {k: v for k, v in step.items() if k.endswith("loss")}
            assert losses and all(math.isfinite(v) for v in losses.values()), (argv, step)
        if "--finetune" in argv:  # from the weights of the run before, counting from iteration 1
            assert history[0]["iteration"] == 1, (argv, history)
        elif "--load" in argv or "--auto-resume" in argv:  # continued from the checkpoint of the run before
            assert history[0]["iteration"] == expected, (argv, history)
    if launch == "block-recompute":
        assert os.listdir(tmp_path / "tb")  # TensorBoard events were written


def test_every_option_is_in_the_matrix():
    from megatron_croc.training.arguments import build_parser

    used = set()
    for launch in LAUNCHES.values():
        for extra in launch:
            used.update(extra)
    used.update(COMMON)
    for flags in [*LAYOUTS.values(), *ONLY_AT.values()]:
        used.update(flags)
    missing = []
    for action in build_parser()._actions:
        flags = [f for f in action.option_strings if f.startswith("--")]
        if not flags:
            continue
        flag = flags[0]
        if flag in NEEDS_GPU or flag in COVERED_ELSEWHERE:
            continue
        if not set(action.option_strings) & used:
            missing.append(flag)
        for value in action.choices or ():
            # the default value runs wherever the flag is not given
            if (value not in used and value != action.default and (flag, value) not in VALUES_ELSEWHERE
                    and (flag, value) not in NEEDS_CUDA_VALUES):
                missing.append(f"{flag} {value}")
    assert not missing, f"options not in the flag matrix (add them to a run, or say why not): {missing}"


def test_options_that_need_a_gpu_are_refused_clearly(capsys, data):
    from megatron_croc.platform import init_platform
    from megatron_croc.training.pretrain import main

    if init_platform().has_te:
        pytest.skip("TransformerEngine is present: these options run (tests/gpu)")
    for flag, extra in NEEDS_GPU.items():
        assert main([*COMMON, "--data-path", data[0], *extra]) != 0, flag
        err = capsys.readouterr().err
        named = flag if flag != "--fp8-recipe" else "--fp8-format"
        assert f"error: {named}" in err and ("TransformerEngine" in err or "apex" in err), (flag, err)
    for (flag, value), extra in NEEDS_CUDA_VALUES.items():
        assert main([*COMMON, "--data-path", data[0], *extra]) != 0, (flag, value)
        err = capsys.readouterr().err
        assert f"error: {flag} {value} needs a CUDA GPU" in err, (flag, value, err)
