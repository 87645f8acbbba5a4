"""Everything the arguments and files decide is checked before any process group exists, each
failure naming the flag and the fix (training.preflight)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from megatron_croc.config import ConfigError
from megatron_croc.training.arguments import parse_args
from megatron_croc.training.preflight import _check_schedule, plan_run


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megatron_croc.data.demo import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("demo"), num_samples=48, seq_length=160)


def _plan(*argv, world_size=1):
    return plan_run(parse_args(list(argv), world_size=world_size), has_te=False, has_apex=False)


def _args(prefix, *extra):
    return ["--data-path", prefix, "--train-iters", "4", "--seq-length", "160", *extra]


def test_a_good_run_takes_the_data_tokenizer_vocabulary(demo):
    plan = _plan(*_args(demo.prefix))
    assert plan.config.model.language.vocab_size == demo.meta["tokenizer"]["vocab_size"]
    assert plan.resume_iteration == 0 and plan.nothing_to_do is None
    bigger = _plan(*_args(demo.prefix, "--vocab-size", "1000"))
    assert bigger.config.model.language.vocab_size == 1000


def test_missing_prefix_and_sidecars(demo, tmp_path):
    with pytest.raises(ConfigError, match=r"--data-path .*nope: .*nope.bin, .*nope.idx, .*nope.meta.json not found; "
                                          r"give the --output-prefix"):
        _plan(*_args(str(tmp_path / "nope")))
    partial = tmp_path / "partial"
    for suffix in (".bin", ".meta.json"):
        shutil.copy(demo.prefix + suffix, str(partial) + suffix)
    with pytest.raises(ConfigError, match=r"partial.idx not found"):
        _plan(*_args(str(partial)))


def test_images_of_another_size_and_too_long_samples(demo, tmp_path):
    from megatron_croc.data.demo import ensure_demo_dataset

    big = ensure_demo_dataset(tmp_path / "big", num_samples=8, image_size=64, seq_length=160)
    with pytest.raises(ConfigError, match="images are 64 px but the --model tiny vision encoder takes 32 px; "
                                          "preprocess again with --image-size 32"):
        _plan(*_args(big.prefix))
    longest = demo.meta["counts"]["max_expanded_length"]
    with pytest.raises(ConfigError, match=f"holds samples of up to {longest} positions, more than --seq-length 100"):
        _plan("--data-path", demo.prefix, "--train-iters", "4", "--seq-length", "100")


def test_datasets_of_other_tokenizers_are_refused(demo, tmp_path):
    from megatron_croc.data.demo import ensure_demo_dataset

    other = ensure_demo_dataset(tmp_path / "other", num_samples=16, seed=99, seq_length=160)  # its own tokenizer
    with pytest.raises(ConfigError, match="were tokenized with different tokenizers"):
        _plan(*_args(demo.prefix, "--valid-data-path", other.prefix))
    same = ensure_demo_dataset(tmp_path / "same", num_samples=16, seed=99, seq_length=160,
                               tokenizer_model=demo.tokenizer_model)
    _plan(*_args(demo.prefix, "--valid-data-path", same.prefix))


def test_vocabulary_smaller_than_the_tokenizer(demo):
    with pytest.raises(ConfigError, match=r"has 640 tokens but --vocab-size is 100; pass --vocab-size 640 or more"):
        _plan(*_args(demo.prefix, "--vocab-size", "100"))


def test_layout_against_the_model_and_the_world():
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size 4 does not divide the query groups"):
        _plan("--tensor-model-parallel-size", "4", world_size=4)
    with pytest.raises(ConfigError, match="cannot be split evenly over 4 pipeline stages"):
        _plan("--pipeline-model-parallel-size", "4", world_size=4)
    with pytest.raises(ConfigError, match="--attention-backend split covers the visual .* not --croc-attention prefix"):
        _plan("--attention-backend", "split", "--croc-attention", "prefix")


def test_checkpoint_folders(demo, tmp_path):
    with pytest.raises(ConfigError, match="--load .*missing: no such folder"):
        _plan(*_args(demo.prefix, "--load", str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="--load .*empty: neither a checkpoint folder"):
        _plan(*_args(demo.prefix, "--load", str(tmp_path / "empty")))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "latest_checkpointed_iteration.txt").write_text("5\n")
    with pytest.raises(ConfigError, match=r"--save .*taken already holds checkpoints of a run \(latest iteration 5\); "
                                          r"continue it with --load .*taken \(or --auto-resume\)"):
        _plan(*_args(demo.prefix, "--save", str(taken)))
    fresh = _plan(*_args(demo.prefix, "--save", str(tmp_path / "new"), "--load", str(tmp_path / "new")))
    assert fresh.config.checkpoint.load is None and any("starting from scratch" in n for n in fresh.notes)


def _schedule_case(*extra, train_iters=8, stored_iters=6, gbs=16):
    config = parse_args(["--train-iters", str(train_iters), *extra])
    from megatron_croc.training.optim import lr_schedule

    stored = lr_schedule(parse_args(["--train-iters", str(stored_iters)]).optim, train_iters=stored_iters,
                         global_batch_size=gbs)
    return config, {"lr_schedule": stored, "scheduler": {}}


def test_a_longer_resume_must_say_which_schedule_it_follows():
    config, common = _schedule_case()
    with pytest.raises(ConfigError) as err:
        _check_schedule(config, common, iteration=6)
    text = str(err.value)
    assert "decay length (--train-iters): checkpoint 96 samples (6 iterations), this command 128 samples (8 iterations)" in text
    assert "--override-opt-param-scheduler" in text and "--use-checkpoint-opt-param-scheduler" in text
    config, common = _schedule_case("--override-opt-param-scheduler")
    assert "following this command's LR schedule" in _check_schedule(config, common, iteration=6)[0]


def test_the_checkpoint_schedule_may_not_train_at_lr_zero():
    config, common = _schedule_case("--use-checkpoint-opt-param-scheduler")
    with pytest.raises(ConfigError, match=r"iterations 7..8 would train at LR 0: the checkpoint's schedule ends its "
                                          r"decay at iteration 6 with min-lr 0"):
        _check_schedule(config, common, iteration=6)
    # with a floor, the extra iterations train at --min-lr: allowed
    config, common = _schedule_case("--use-checkpoint-opt-param-scheduler", "--min-lr", "1e-5")
    common["lr_schedule"]["min_lr"] = 1e-5
    assert "keeping the checkpoint's LR schedule" in _check_schedule(config, common, iteration=6)[0]


def test_a_changed_projector_lr_is_a_schedule_change():
    config, common = _schedule_case("--projector-lr", "1e-3", train_iters=6)
    with pytest.raises(ConfigError, match=r"--projector-lr: checkpoint None, this command 0.001"):
        _check_schedule(config, common, iteration=3)


@pytest.mark.parametrize("stage,present,missing", [
    ("croc", ("language_model.", "vision.encoder."), "projector (the align stage trains it)"),
    ("align", ("vision.encoder.", "vision.projector."), "LLM"),
    ("instruct", ("language_model.", "vision.projector."), "vision encoder"),
])
def test_a_stage_needs_what_it_starts_from(monkeypatch, tmp_path, stage, present, missing):
    from megatron_croc.training import checkpoint, preflight

    shapes = {f"{prefix}some.weight": (4, 4) for prefix in present}
    monkeypatch.setattr(checkpoint, "checkpoint_tensor_shapes", lambda folder: shapes)
    config = parse_args(["--croc-stage", stage])
    with pytest.raises(ConfigError, match=rf"has no {re.escape(missing)}, which the '{stage}' stage starts from"):
        preflight._check_checkpoint_model(config, tmp_path, {})
    shapes["language_model.x"] = shapes["vision.encoder.x"] = shapes["vision.projector.x"] = (1,)
    preflight._check_checkpoint_model(config, tmp_path, {})


def test_finetune_takes_only_the_weights_of_a_same_stage_checkpoint(monkeypatch, demo, tmp_path):
    from megatron_croc.training import checkpoint, preflight

    (tmp_path / "prev").mkdir()
    common = {"iteration": 6, "croc_stage": "croc", "scheduler": {}, "lr_schedule": {}}
    monkeypatch.setattr(checkpoint, "resolve_checkpoint_dir", lambda load: Path(load))
    monkeypatch.setattr(checkpoint, "checkpoint_common_state", lambda folder: common)
    monkeypatch.setattr(preflight, "_check_checkpoint_model", lambda config, folder, common: None)
    load = ["--load", str(tmp_path / "prev")]
    # without --finetune the same stage resumes (and the 4-iteration run is already done)
    assert _plan(*_args(demo.prefix, *load)).resume_iteration == 6
    plan = _plan(*_args(demo.prefix, *load, "--finetune"))
    assert plan.resume_iteration == 0 and plan.nothing_to_do is None
    assert any("--finetune: starting from the weights of --load" in n and "iteration 0" in n for n in plan.notes)
    with pytest.raises(ConfigError, match="--finetune starts from the weights of --load; pass --load DIR"):
        _plan(*_args(demo.prefix, "--finetune"))
    # --save holding the very run --finetune starts from would be overwritten
    (tmp_path / "prev" / "latest_checkpointed_iteration.txt").write_text("6\n")
    with pytest.raises(ConfigError, match=r"this run starts over from its weights \(--finetune\); saving here would "
                                          "overwrite it"):
        _plan(*_args(demo.prefix, *load, "--save", str(tmp_path / "prev"), "--finetune"))
    # a requeued --finetune job continues its own run in --save
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("2\n")
    from megatron_croc.training.optim import lr_schedule

    same = parse_args(_args(demo.prefix))
    common.update(iteration=2, lr_schedule=lr_schedule(same.optim, train_iters=same.train_iters,
                                                       global_batch_size=same.global_batch_size))
    plan = _plan(*_args(demo.prefix, *load, "--save", str(tmp_path / "run"), "--auto-resume", "--finetune"))
    assert plan.resume_iteration == 2 and not plan.config.checkpoint.finetune
