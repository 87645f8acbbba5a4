"""The launcher's command line: what the STAGE/TP/PP variables, the embedded demo's layout and
the launcher's defaults add to the user's flags, and which wins (no process is started here)."""

from __future__ import annotations

import pytest

from megatron_croc.training.launcher import build_trainer_argv


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("STAGE", "TP", "PP", "NPROC_PER_NODE", "NNODES", "OUTPUT_DIR"):
        monkeypatch.delenv(var, raising=False)


def _value(argv, flag):
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]
    return values[-1] if values else None


def test_embedded_demo_on_two_cpu_processes_takes_one_pipeline_stage_each():
    argv, nproc, notes, chose_save = build_trainer_argv([], num_gpus=0)
    assert nproc == 2 and _value(argv, "--pipeline-model-parallel-size") == "2"
    assert _value(argv, "--num-workers") == "0" and chose_save
    assert _value(argv, "--save") == "outputs/croc_run/checkpoints" and "--auto-resume" in argv
    assert any("PP=2" in n for n in notes)


@pytest.mark.parametrize("flags", [["--data-path=x"], ["--data-path", "x"], ["--tensor-model-parallel-size=1"],
                                   ["--pipeline-model-parallel-size", "1"]])
def test_explicit_flags_in_either_spelling_turn_the_demo_layout_off(flags):
    argv, _, _, _ = build_trainer_argv(flags, num_gpus=0)
    assert argv.count("--pipeline-model-parallel-size") == flags.count("--pipeline-model-parallel-size")


def test_flags_win_over_the_variables(monkeypatch):
    monkeypatch.setenv("TP", "2")
    monkeypatch.setenv("PP", "2")
    monkeypatch.setenv("STAGE", "align")
    argv, _, notes, _ = build_trainer_argv(["--tensor-model-parallel-size=1", "--croc-stage", "instruct"], num_gpus=0)
    assert "--tensor-model-parallel-size=1" in argv and "--tensor-model-parallel-size" not in argv
    assert _value(argv, "--pipeline-model-parallel-size") == "2"  # from PP: no flag given
    assert "--croc-stage" in argv and _value(argv, "--croc-stage") == "instruct"
    assert any("TP=2 ignored" in n for n in notes) and any("STAGE=align ignored" in n for n in notes)


def test_the_variables_apply_where_no_flag_is_given(monkeypatch):
    monkeypatch.setenv("TP", "2")
    monkeypatch.setenv("STAGE", "align")
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    argv, nproc, _, _ = build_trainer_argv(["--data-path", "x"], num_gpus=0)
    assert nproc == 4 and _value(argv, "--tensor-model-parallel-size") == "2" and _value(argv, "--croc-stage") == "align"


def test_a_given_save_or_load_is_left_alone(monkeypatch):
    monkeypatch.setenv("OUTPUT_DIR", "/runs/x")
    argv, _, _, chose_save = build_trainer_argv(["--save=/ckpt"], num_gpus=0)
    assert not chose_save and "--auto-resume" not in argv and "--save" not in argv
    assert _value(argv, "--tensorboard-dir") == "/runs/x/tensorboard"
    argv, _, _, chose_save = build_trainer_argv(["--load", "ckpt/align"], num_gpus=0)
    # the launcher still saves under OUTPUT_DIR, but never resumes over an explicit --load
    assert chose_save and _value(argv, "--save") == "/runs/x/checkpoints" and "--auto-resume" not in argv


def test_bad_variables_are_refused():
    from megatron_croc.config import ConfigError

    import os

    os.environ["NPROC_PER_NODE"] = "h100:8"
    try:
        with pytest.raises(ConfigError, match="NPROC_PER_NODE='h100:8': expected a positive integer"):
            build_trainer_argv([], num_gpus=0)
    finally:
        del os.environ["NPROC_PER_NODE"]
