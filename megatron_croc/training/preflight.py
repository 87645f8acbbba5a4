"""Everything the arguments and the files they name decide, checked in one place before any
process group exists: the launcher runs it once (a bad input is then one ``error:`` line and
exit 2, with no rank started), and every rank runs it again to resolve the same plan.

Checks, each naming the flag and the fix: the model and layout against this machine and the
world size (``config.validate``), the data prefixes and their sidecars, the data's image size,
visual tokens and sample lengths against the model and ``--seq-length``, the tokenizer's
vocabulary against ``--vocab-size``; and for checkpoints: that ``--load`` exists, that its model
matches ``--model`` and holds what the stage starts from, that ``--save`` holds no other run, and
that a resumed run keeps its LR schedule unless a flag says otherwise (Megatron's
``--override-opt-param-scheduler`` / ``--use-checkpoint-opt-param-scheduler``) and never trains
at LR 0 because the checkpoint's decay has ended.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_croc.config import ConfigError, ModelConfig, validate
from megatron_croc.training.config import DEMO_DATA_DIR, TrainConfig

__all__ = ["RunPlan", "plan_run"]


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """The resolved run: the config to train with, where it starts, and what to tell the user."""

    config: TrainConfig
    resume_iteration: int  # 0 unless the run resumes a checkpoint of the same stage
    notes: tuple[str, ...] = ()
    # Set when there is nothing to train: the message to print (exit 0).
    nothing_to_do: str | None = None


def plan_run(config: TrainConfig, *, has_te: bool, has_apex: bool, has_cuda: bool = True,
             build_demo_data: bool = True) -> RunPlan:
    """Check ``config`` against the machine and the files; raise ConfigError with the fix."""
    validate(config.model, has_te=has_te, has_apex=has_apex, has_cuda=has_cuda)
    notes = list(config.notes)
    config = _resolve_data(config, build_demo_data=build_demo_data)
    config, load_notes, resume, common = _resolve_checkpoints(config)
    notes += load_notes
    config = _resolve_vocabulary(config, common)
    if resume and common is not None:
        iteration = int(common["iteration"])
        if iteration >= config.train_iters:
            return RunPlan(config=config, resume_iteration=iteration, notes=tuple(notes), nothing_to_do=(
                f"already at iteration {iteration} of --train-iters {config.train_iters} "
                f"({config.checkpoint.load}); nothing to train. Raise --train-iters to continue "
                "(with --override-opt-param-scheduler to stretch the LR schedule over the new length)."))
        notes += _check_schedule(config, common, iteration)
        return RunPlan(config=config, resume_iteration=iteration, notes=tuple(notes))
    return RunPlan(config=config, resume_iteration=0, notes=tuple(notes))


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _resolve_data(config: TrainConfig, *, build_demo_data: bool) -> TrainConfig:
    data, model = config.data, config.model
    if data.demo:
        if not build_demo_data:
            return config
        from megatron_croc.data.demo import ensure_demo_dataset

        kwargs = dict(image_size=model.vision.image_size, num_image_tokens=model.vision.num_image_tokens,
                      seq_length=data.seq_length)
        # built once and cached (a lock serialises ranks that ask at the same time)
        train = ensure_demo_dataset(DEMO_DATA_DIR, **kwargs)
        # other images and captions (seed + 1), tokenized like the training set
        valid = ensure_demo_dataset(DEMO_DATA_DIR, num_samples=128, seed=config.seed + 1,
                                    tokenizer_model=train.tokenizer_model, **kwargs)
        data = dataclasses.replace(data, data_path=((None, train.prefix),), valid_data_path=((None, valid.prefix),))
        config = dataclasses.replace(config, data=data)
    tokenizers: dict[str, str] = {}
    for flag, paths in (("--data-path", data.data_path), ("--valid-data-path", data.valid_data_path)):
        for _, prefix in paths:
            meta = _check_dataset(flag, prefix, config)
            tokenizers.setdefault(meta["tokenizer"].get("sha256", "?"), f"{flag} {prefix}")
    if len(tokenizers) > 1:
        first, second = list(tokenizers.values())[:2]
        raise ConfigError(
            f"{first} and {second} were tokenized with different tokenizers (their sidecars' tokenizer.sha256 "
            "differ), so the same ids mean different text; preprocess every dataset with the model's tokenizer"
        )
    return config


def _check_dataset(flag: str, prefix: str, config: TrainConfig) -> dict[str, Any]:
    from megatron_croc.data.indexed import META_SUFFIX, MultimodalIndexedDataset

    missing = [prefix + suffix for suffix in (".bin", ".idx", META_SUFFIX) if not Path(prefix + suffix).is_file()]
    if missing and not (Path(prefix + META_SUFFIX).is_file() and _unmerged(prefix)):
        raise ConfigError(
            f"{flag} {prefix}: {', '.join(missing)} not found; give the --output-prefix that "
            "tools/preprocess_data.py wrote (the path without .bin/.idx)"
        )
    try:
        dataset = MultimodalIndexedDataset(prefix)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{flag} {prefix}: {err}") from None
    meta = dataset.meta
    vision = config.model.vision
    size = meta.get("image", {}).get("size")
    if size and size != vision.image_size:
        raise ConfigError(
            f"{flag} {prefix}: images are {size} px but the --model {config.model_name} vision encoder takes "
            f"{vision.image_size} px; preprocess again with --image-size {vision.image_size}"
        )
    tokens = meta.get("num_image_tokens")
    if tokens is not None and tokens != vision.num_image_tokens:
        raise ConfigError(
            f"{flag} {prefix}: expanded each <image> to {tokens} visual tokens but the vision encoder gives "
            f"{vision.num_image_tokens}; preprocess again with --num-image-tokens {vision.num_image_tokens}"
        )
    longest = meta.get("counts", {}).get("max_expanded_length")
    if longest is not None and longest > config.data.seq_length and not config.data.pack_sequences:
        raise ConfigError(
            f"{flag} {prefix}: holds samples of up to {longest} positions, more than --seq-length "
            f"{config.data.seq_length}; train with --seq-length {longest} or more, or preprocess with "
            f"--seq-length {config.data.seq_length} (longer samples are then skipped and reported)"
        )
    return meta


def _unmerged(prefix: str) -> bool:
    """A ``--no-merge`` dataset keeps its samples in partition files named by the sidecar."""
    from megatron_croc.data.indexed import read_meta

    try:
        return bool(read_meta(prefix).get("parts"))
    except (OSError, ValueError):
        return False


def _data_vocab(config: TrainConfig) -> tuple[int, str] | None:
    """The largest tokenizer vocabulary of the datasets, and the prefix it comes from."""
    from megatron_croc.data.indexed import read_meta

    best = None
    for _, prefix in (*config.data.data_path, *config.data.valid_data_path):
        vocab = int(read_meta(prefix)["tokenizer"]["vocab_size"])
        if best is None or vocab > best[0]:
            best = (vocab, prefix)
    return best


def _resolve_vocabulary(config: TrainConfig, common: dict[str, Any] | None) -> TrainConfig:
    """The model's vocabulary: --vocab-size when given, else the one the checkpoint records
    (a converted or trained model), else the data's tokenizer's; never smaller than the
    tokenizer's (tokens without an embedding row)."""
    language = config.model.language
    explicit = config.vocab_size
    recorded = _recorded_vocab(common)
    data = _data_vocab(config)
    vocab = explicit or recorded or (data[0] if data else language.vocab_size)
    if data and data[0] > vocab:
        source = "--vocab-size" if explicit else ("the checkpoint's vocabulary" if recorded else "the vocabulary")
        raise ConfigError(
            f"the tokenizer of {data[1]} has {data[0]} tokens but {source} is {vocab}; pass --vocab-size "
            f"{data[0]} or more, or preprocess with the model's tokenizer"
        )
    if recorded and explicit and explicit != recorded:
        raise ConfigError(
            f"--vocab-size {explicit} differs from the --load checkpoint's vocabulary ({recorded}); drop "
            "--vocab-size or pass the checkpoint's"
        )
    model = config.model.replace(language=dataclasses.replace(language, vocab_size=vocab))
    return dataclasses.replace(config, model=model)


def _recorded_vocab(common: dict[str, Any] | None) -> int | None:
    if not common:
        return None
    model = common.get("model_config") or {}
    if "vocab_size" in model:
        return int(model["vocab_size"])
    record = common.get("hf_conversion") or {}
    if isinstance(record, dict) and "llm_vocab_size" in record:
        return int(record["llm_vocab_size"])
    return None


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def _latest(root: str | None) -> int | None:
    from megatron_croc.training.checkpoint import read_latest_iteration

    if root is None or not Path(root).is_dir():
        return None
    try:
        return read_latest_iteration(root)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _resolve_checkpoints(config: TrainConfig):
    """The checkpoint to load (with --auto-resume: --save when it holds one), its common
    state, and whether the run resumes it (same stage, with optimizer state)."""
    from megatron_croc.training.checkpoint import checkpoint_common_state, resolve_checkpoint_dir

    ckpt = config.checkpoint
    notes: list[str] = []
    save_latest = _latest(ckpt.save)
    load = ckpt.load
    if ckpt.auto_resume and save_latest is not None and not _same(load, ckpt.save):
        notes.append(f"--auto-resume: continuing the run in --save {ckpt.save} (iteration {save_latest})"
                     + (f" instead of starting from --load {load}" if load else ""))
        load = ckpt.save
        # --finetune named how the run starts (from --load's weights); its continuation resumes
        ckpt = dataclasses.replace(ckpt, finetune=False)
        config = dataclasses.replace(config, checkpoint=ckpt)
    if save_latest is not None and not _same(load, ckpt.save):
        raise ConfigError(
            f"--save {ckpt.save} already holds checkpoints of a run (latest iteration {save_latest}); continue it "
            f"with --load {ckpt.save} (or --auto-resume), or choose an empty --save so nothing is overwritten"
        )
    if load is None:
        return dataclasses.replace(config, checkpoint=dataclasses.replace(ckpt, load=None)), notes, False, None
    if _same(load, ckpt.save) and save_latest is None:
        notes.append(f"no checkpoint in {load} yet: starting from scratch")
        return dataclasses.replace(config, checkpoint=dataclasses.replace(ckpt, load=None)), notes, False, None
    if not Path(load).exists():
        raise ConfigError(f"--load {load}: no such folder; point it at a --save folder or a converted checkpoint")
    try:
        folder = resolve_checkpoint_dir(load)
        common = checkpoint_common_state(folder)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"--load {load}: {err}") from None
    _check_checkpoint_model(config, folder, common)
    stage = config.model.croc.stage
    same_stage = "scheduler" in common and common.get("croc_stage") == stage
    resume = same_stage and not ckpt.no_load_optim and not ckpt.finetune
    if "scheduler" in common and common.get("croc_stage") not in (None, stage):
        notes.append(f"--load {load} is a {common.get('croc_stage')!r}-stage checkpoint: starting the {stage!r} stage "
                     "from its weights (fresh optimizer, iteration 0)")
    elif same_stage and ckpt.finetune:
        notes.append(f"--finetune: starting from the weights of --load {load} (iteration {common.get('iteration')}): "
                     "fresh optimizer, schedule and RNG, iteration 0, the data from its start")
    if _same(ckpt.save, load) and save_latest is not None and not resume and "scheduler" in common:
        why = ("this run starts over from its weights (--finetune)" if same_stage and ckpt.finetune
               else f"this is a {stage!r}-stage run")
        raise ConfigError(
            f"--save {ckpt.save} holds a {common.get('croc_stage')!r}-stage run, and {why}; "
            "saving here would overwrite it. Choose another --save (and --load it to start from its weights)"
        )
    config = dataclasses.replace(config, checkpoint=dataclasses.replace(ckpt, load=str(load)))
    return config, notes, resume, common


# What each stage starts from (SPEC §1.5): module prefix -> why it is needed.
_NEEDED_MODULES = {
    "align": {"language_model.": "LLM", "vision.encoder.": "vision encoder"},
    "croc": {"language_model.": "LLM", "vision.encoder.": "vision encoder",
             "vision.projector.": "projector (the align stage trains it)"},
    "instruct": {"language_model.": "LLM", "vision.encoder.": "vision encoder",
                 "vision.projector.": "projector (the align stage trains it)"},
}


def _check_checkpoint_model(config: TrainConfig, folder: Path, common: dict[str, Any]) -> None:
    """The checkpoint holds the model --model builds, and what the stage starts from."""
    from megatron_croc.training.checkpoint import checkpoint_tensor_shapes

    shapes = checkpoint_tensor_shapes(folder)
    model: ModelConfig = config.model
    lm, vis = model.language, model.vision
    problems = []
    qkv = shapes.get("language_model.decoder.layers.self_attention.linear_qkv.weight")
    if qkv is not None:
        layers, hidden = qkv[0], qkv[-1]
        if hidden != lm.hidden_size:
            problems.append(f"LLM hidden size {hidden} (this model: {lm.hidden_size})")
        if layers != lm.num_layers:
            problems.append(f"{layers} LLM layers (this model: {lm.num_layers}; --num-layers)")
    fc1 = shapes.get("language_model.decoder.layers.mlp.linear_fc1.weight")
    if fc1 is not None and fc1[1] != 2 * lm.ffn_hidden_size:
        problems.append(f"LLM FFN size {fc1[1] // 2} (this model: {lm.ffn_hidden_size})")
    vqkv = shapes.get("vision.encoder.decoder.layers.self_attention.linear_qkv.weight")
    if vqkv is not None and vqkv[-1] != vis.hidden_size:
        problems.append(f"vision hidden size {vqkv[-1]} (this model: {vis.hidden_size})")
    if problems:
        raise ConfigError(
            f"--load {folder} holds another model than --model {config.model_name} builds: "
            f"{'; '.join(problems)}. Pass the --model (and --num-layers) the checkpoint was made with"
        )
    stage = model.croc.stage
    absent = [what for prefix, what in _NEEDED_MODULES[stage].items() if not any(k.startswith(prefix) for k in shapes)]
    if absent:
        raise ConfigError(
            f"--load {folder} has no {' and no '.join(absent)}, which the {stage!r} stage starts from; "
            "load a checkpoint of the previous stage, or convert one with tools/convert_checkpoint.py "
            "(--hf-vision / --hf-llava)"
        )


# ---------------------------------------------------------------------------------------------
# the LR schedule on resume
# ---------------------------------------------------------------------------------------------


def _check_schedule(config: TrainConfig, common: dict[str, Any], iteration: int) -> list[str]:
    from megatron_croc.training.optim import lr_schedule, schedule_from_scheduler_state

    command = lr_schedule(config.optim, train_iters=config.train_iters, global_batch_size=config.global_batch_size)
    stored = common.get("lr_schedule") or schedule_from_scheduler_state(common["scheduler"])
    differences = [
        (key, stored[key], command[key]) for key in _NAMES
        if key in stored and not _equal(stored[key], command[key])
    ]
    if not differences:
        return []
    listed = "; ".join(f"{_describe(key)}: checkpoint {_show(key, old, stored)}, this command {_show(key, new, command)}"
                       for key, old, new in differences)
    optim = config.optim
    if optim.override_opt_param_scheduler:
        return [f"--override-opt-param-scheduler: following this command's LR schedule ({listed})"]
    if not optim.use_checkpoint_opt_param_scheduler:
        raise ConfigError(
            f"the LR schedule differs from the checkpoint's in --load {config.checkpoint.load}: {listed}. Pass "
            "--override-opt-param-scheduler to follow this command's schedule, or "
            "--use-checkpoint-opt-param-scheduler to keep the checkpoint's"
        )
    decay_end = int(stored["lr_decay_steps"])
    samples_at_end = config.train_iters * config.global_batch_size
    if stored.get("lr_decay_style") != "constant" and float(stored["min_lr"]) == 0.0 and samples_at_end > decay_end:
        first_zero = max(iteration, math.ceil(decay_end / config.global_batch_size)) + 1
        raise ConfigError(
            f"with --use-checkpoint-opt-param-scheduler, iterations {first_zero}..{config.train_iters} would train at "
            f"LR 0: the checkpoint's schedule ends its decay at iteration {decay_end // config.global_batch_size} "
            "with min-lr 0. Pass --override-opt-param-scheduler to stretch the schedule over --train-iters "
            f"{config.train_iters}, or lower --train-iters"
        )
    return [f"--use-checkpoint-opt-param-scheduler: keeping the checkpoint's LR schedule ({listed})"]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


_NAMES = {
    "lr": "peak LR (--lr)", "min_lr": "--min-lr", "lr_warmup_steps": "warm-up (--lr-warmup-fraction)",
    "lr_decay_steps": "decay length (--train-iters)", "lr_decay_style": "--lr-decay-style",
    "projector_lr": "--projector-lr", "pool_lr": "--pool-lr",
}


def _describe(key: str) -> str:
    return _NAMES.get(key, key)


def _show(key: str, value: Any, schedule: dict[str, Any]) -> str:
    """Schedule lengths are counted in samples (as Megatron-LM's scheduler); shown in
    iterations of that run's global batch too."""
    if key in ("lr_warmup_steps", "lr_decay_steps") and schedule.get("global_batch_size"):
        return f"{int(value)} samples ({int(value) / int(schedule['global_batch_size']):g} iterations)"
    return str(value)
