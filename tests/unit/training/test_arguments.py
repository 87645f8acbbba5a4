"""Megatron-style flags become typed configs; impossible combinations fail at argument time."""

from __future__ import annotations

import pytest

from megatron_croc.config import ConfigError
from megatron_croc.training.arguments import parse_args


def test_embedded_default_is_the_tiny_demo():
    config = parse_args([])
    assert config.data.demo and config.model.language.num_layers == 2
    assert config.model.croc.stage == "croc" and config.train_iters == 300
    assert config.global_batch_size % config.micro_batch_size == 0


def test_flags_reach_the_configs():
    config = parse_args(
        ["--data-path", "0.3", "a", "0.7", "b", "--model", "vicuna-7b", "--train-iters", "10",
         "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--croc-stage", "instruct",
         "--croc-matcher", "nearest", "--croc-attention", "prefix", "--projector-lr", "1e-4", "--pool-lr", "3e-4",
         "--lr", "2e-5", "--min-lr", "1e-6", "--bf16", "--use-distributed-optimizer", "--global-batch-size", "32",
         "--micro-batch-size", "2", "--seq-length", "4096"],
        world_size=8,
    )
    assert config.data.data_path == ((0.3, "a"), (0.7, "b"))
    equal = parse_args(["--data-path", "a", "b", "--train-iters", "1", "--seq-length", "512"])
    assert equal.data.data_path == ((None, "a"), (None, "b"))  # by size, as Megatron
    assert config.model.parallel.tensor_model_parallel_size == 2
    assert config.model.croc.stage == "instruct" and config.model.croc.attention_variant == "causal"
    assert config.model.croc.matcher == "nearest" and config.model.precision.bf16
    assert config.optim.projector_lr == 1e-4 and config.optim.pool_lr == 3e-4
    assert config.optim.use_distributed_optimizer and config.data.seq_length == 4096
    assert config.model.croc.assignment_lookahead
    assert not parse_args(["--no-croc-assignment-lookahead"]).model.croc.assignment_lookahead


@pytest.mark.parametrize("argv,world,message", [
    (["--data-path", "a"], 1, "--train-iters is required"),
    (["--train-iters", "1", "--data-path", "x", "a", "1", "b"], 1, "pairs 'weight prefix"),
    (["--train-iters", "1", "--data-path", "-1", "a", "1", "b"], 1, "must be positive"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "multiple of --micro-batch-size"),
    (["--tensor-model-parallel-size", "2"], 3, "cannot be split"),
    (["--model", "vicuna-7b"], 1, "embedded demo"),
    (["--save-interval", "5"], 1, "--save-interval needs --save"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], 1, "larger than --lr"),
    # the tiny model has 1024 positions; --data-path runs default to --seq-length 2048
    (["--data-path", "x", "--train-iters", "4"], 1, "--seq-length 2048 exceeds the tiny model's 1024 positions"),
    (["--auto-resume"], 1, "--auto-resume resumes from --save"),
    (["--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"], 1, "exclude each other"),
    (["--train-iters", "0"], 1, "--train-iters must be at least 1"),
    (["--exit-duration-in-mins", "0"], 1, "must be positive"),
])
def test_bad_flags_give_clear_errors(argv, world, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv, world_size=world)


def test_main_reports_config_errors_without_a_traceback(capsys):
    from megatron_croc.training.pretrain import main

    assert main(["--global-batch-size", "6", "--micro-batch-size", "4"]) == 2
    assert "error: --global-batch-size 6" in capsys.readouterr().err


@pytest.mark.parametrize("flags,seq,expected,reason", [
    ([], 2000, 2000, None),
    (["--fp8-format", "hybrid"], 2001, 2016, "FP8 recipe delayed (blocks of 16 tokens)"),
    (["--fp8-format", "e4m3", "--fp8-recipe", "mxfp8"], 2000, 2016, "FP8 recipe mxfp8 (blocks of 32 tokens)"),
    (["--fp8-format", "hybrid", "--fp8-recipe", "blockwise"], 2000, 2048, "blocks of 128 tokens"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--fp8-format", "hybrid",
      "--fp8-recipe", "mxfp8"], 2000, 2048, "sequence parallelism over TP=2 and FP8 recipe mxfp8"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "4"], 2046, 2048, "sequence parallelism over TP=4"),
    (["--fp8-format", "hybrid"], 2048, 2048, None),
])
def test_sequence_length_is_padded_to_what_fp8_and_sequence_parallelism_need(flags, seq, expected, reason):
    config = parse_args(["--data-path", "x", "--train-iters", "1", "--model", "vicuna-7b",
                         "--seq-length", str(seq), *flags], world_size=4)
    assert config.data.seq_length == expected
    if reason is None:
        assert config.notes == ()
    else:
        (note,) = config.notes
        assert f"--seq-length {seq} padded to {expected}" in note and reason in note


def test_padding_past_the_model_positions_is_refused():
    with pytest.raises(ConfigError, match="padded to 4098.*only 4096 positions.*use --seq-length 4095 or less"):
        parse_args(["--data-path", "x", "--train-iters", "1", "--model", "vicuna-7b", "--seq-length", "4096",
                    "--sequence-parallel", "--tensor-model-parallel-size", "3"], world_size=3)


def test_flag_equals_value_and_flag_value_are_the_same():
    spaced = parse_args(["--data-path", "x", "--train-iters", "4", "--seq-length", "512", "--tensor-model-parallel-size",
                         "2"], world_size=2)
    joined = parse_args(["--data-path=x", "--train-iters=4", "--seq-length=512", "--tensor-model-parallel-size=2"],
                        world_size=2)
    assert spaced == joined


def test_parsing_imports_neither_torch_nor_megatron():
    """--help must answer at once: the entry point and its parser import nothing heavy before
    the arguments are read (importing torch alone takes ~2 s)."""
    import subprocess
    import sys

    code = ("import sys, megatron_croc.training.pretrain, megatron_croc.training.launcher; "
            "from megatron_croc.training.arguments import build_parser; build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'megatron.core', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_flag_explains_itself_and_shows_its_default():
    import argparse

    from megatron_croc.training.arguments import build_parser

    parser = build_parser()
    text = parser.format_help()
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented
    assert "--croc-assignment-lookahead, --no-croc-assignment-lookahead" in text
    assert "(default: on)" in text and "(default: True)" not in text and "(default: None)" not in text
    for flag, shown in (("--lr", "(default: 2e-05; embedded demo: 0.002)"), ("--min-lr", "(default: 0.0)"),
                        ("--train-iters", "(default: required; embedded demo: 300)"),
                        ("--tensor-model-parallel-size", "(default: 1;")):
        assert shown in " ".join(text.split()), flag
    assert all(isinstance(a.help, str) for a in parser._actions if not isinstance(a, argparse._HelpAction))
