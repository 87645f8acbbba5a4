"""HuggingFace <-> megatron-core checkpoints of a CrocModel.

* :func:`hf_to_megatron`: a Llama-architecture LLM folder (``LlamaForCausalLM``) + a CLIP
  folder (``CLIPVisionModel`` or a full ``CLIPModel``) [+ a stage-1 projector], or one LLaVA
  folder (our own export, or e.g. ``llava-hf/llava-1.5-7b-hf``), into a dist checkpoint at any
  TP/PP layout, ready for ``--load`` (iteration 0: weights only, training starts fresh).
* :func:`megatron_to_hf`: a checkpoint at any layout into a folder transformers loads:
  ``config.json`` (LLaVA, with the small model class in ``modeling_croc.py`` that adds Croc's
  per-token L2 normalisation; ``trust_remote_code=True``), safetensors shards with an index,
  ``croc_extras.safetensors`` (pool, VTR head), tokenizer and image processor when given.

Both directions stream (see :mod:`megatron_croc.convert.streaming`), run on the CPU with gloo,
check every input before writing anything, and write into a temporary folder renamed into
place at the end: an error leaves nothing behind.

What the HF side lacks, and where it is kept:

* CLIP's last layer and ``post_layernorm`` (LLaVA reads the penultimate layer; CrocModel does
  not build the last one): saved beside the megatron checkpoint in
  ``hf_conversion/unused_hf_tensors.safetensors`` and written back on export (from there or from
  ``--hf-vision``). Without them the export has one CLIP layer fewer and reads its last one
  (``vision_feature_layer=-1``): the same features.
* the ``<image>`` token: our data never tokenizes it (IMAGE_TOKEN_ID = -200 is spliced in), so
  the LLM vocabulary has no row for it, but transformers' LLaVA needs a real id. The export uses
  the tokenizer's ``<image>`` if it has one, else appends one (tokenizer, config, and one zero
  row in the embedding and LM head, suppressed in ``generation_config.json``). Importing that
  export drops the row again (``config.json`` records ``croc.llm_vocab_size``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_croc.config import (
    MODEL_PRESETS,
    ConfigError,
    CrocConfig,
    LanguageModelConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    STAGE_SPECIFIC_PREFIXES,
    VisionConfig,
    model_preset,
    validate,
)
from megatron_croc.convert.mappings import (
    HF_LM_HEAD,
    HF_VISION,
    LLAVA_LAYOUTS,
    croc_engine,
)
from megatron_croc.convert.sources import ConvertError, HFInputs, TensorSource

RECORD_FORMAT = "megatron_croc.hf_conversion"
RECORD_DIR = "hf_conversion"
RECORD_FILE = "record.json"
UNUSED_FILE = "unused_hf_tensors.safetensors"
EXTRAS_FILE = "croc_extras.safetensors"
MODELING_FILE = "modeling_croc.py"
IMAGE_TOKEN = "<image>"  # the placeholder string of megatron_croc.data.constants
FROM_HF = "from-hf"

__all__ = [
    "ConvertError",
    "hf_to_megatron",
    "megatron_to_hf",
    "language_config_from_hf",
    "vision_config_from_hf",
    "model_config_from_hf",
    "check_against_preset",
    "llava_config",
]

# ---------------------------------------------------------------------------------------------
# HF configs -> ModelConfig
# ---------------------------------------------------------------------------------------------

# ModelConfig field -> the HF config field it comes from (for messages).
_LM_FIELDS = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads", "ffn_hidden_size": "intermediate_size", "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings", "rotary_base": "rope_theta",
    "norm_epsilon": "rms_norm_eps", "untie_embeddings": "tie_word_embeddings (negated)",
}
_VISION_FIELDS = {
    "image_size": "image_size", "patch_size": "patch_size", "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
    "ffn_hidden_size": "intermediate_size", "layernorm_epsilon": "layer_norm_eps",
}


def _rope_theta(cfg, where: str) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConvertError(
            f"{where}: RoPE scaling {rope_type!r} is not supported (CrocModel uses megatron-core's "
            "plain rotary embedding); convert a model without rope_scaling"
        )
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        theta = 10000.0
    if float(theta) != int(theta):
        raise ConvertError(f"{where}: rope_theta {theta} is not a whole number; CrocModel passes it to megatron-core as an int")
    return float(theta)


def language_config_from_hf(cfg, where: str = "the LLM config") -> LanguageModelConfig:
    """A Llama-architecture HF config -> LanguageModelConfig, refusing what the model cannot be."""
    heads = cfg.num_attention_heads
    checks = [
        (getattr(cfg, "hidden_act", "silu") == "silu", f"hidden_act is {getattr(cfg, 'hidden_act', None)!r}, the decoder uses SwiGLU ('silu')"),
        (not getattr(cfg, "attention_bias", False), "attention_bias is true; the decoder has no QKV/output biases"),
        (not getattr(cfg, "mlp_bias", False), "mlp_bias is true; the decoder has no MLP biases"),
        ((getattr(cfg, "head_dim", None) or cfg.hidden_size // heads) * heads == cfg.hidden_size,
         f"head_dim {getattr(cfg, 'head_dim', None)} x {heads} heads != hidden_size {cfg.hidden_size}"),
    ]
    for ok, why in checks:
        if not ok:
            raise ConvertError(f"{where}: {why} (model_type {getattr(cfg, 'model_type', '?')!r})")
    return LanguageModelConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=heads,
        num_query_groups=getattr(cfg, "num_key_value_heads", None) or heads,
        ffn_hidden_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rotary_base=_rope_theta(cfg, where),
        norm_epsilon=float(getattr(cfg, "rms_norm_eps", 1e-5)),
        untie_embeddings=not bool(getattr(cfg, "tie_word_embeddings", False)),
    )


def vision_config_from_hf(cfg, where: str = "the CLIP config", *, feature_layers: int | None = None) -> VisionConfig:
    """A CLIP vision config -> VisionConfig. ``feature_layers``: how many layers the features
    come out of (LLaVA's vision_feature_layer); VisionConfig.num_layers is that plus one (the
    checkpoint depth of a model read at its penultimate layer). Default: all but the last."""
    if getattr(cfg, "hidden_act", "quick_gelu") != "quick_gelu":
        raise ConvertError(f"{where}: hidden_act is {cfg.hidden_act!r}; CLIP ViT-L in CrocModel uses 'quick_gelu'")
    if getattr(cfg, "num_channels", 3) != 3:
        raise ConvertError(f"{where}: num_channels is {cfg.num_channels}; images are RGB")
    used = cfg.num_hidden_layers - 1 if feature_layers is None else feature_layers
    return VisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_layers=used + 1,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size,
        layernorm_epsilon=float(getattr(cfg, "layer_norm_eps", 1e-5)),
    )


def model_config_from_hf(text_cfg, vision_cfg, *, feature_layers: int | None = None, vocab_size: int | None = None,
                         where: dict[str, str] | None = None) -> ModelConfig:
    where = where or {}
    language = language_config_from_hf(text_cfg, where.get("language", "the LLM config"))
    if vocab_size is not None:
        language = dataclasses.replace(language, vocab_size=vocab_size)
    vision = vision_config_from_hf(vision_cfg, where.get("vision", "the CLIP config"), feature_layers=feature_layers)
    return ModelConfig(vision=vision, language=language)


def check_against_preset(preset: str, derived: ModelConfig, where: dict[str, str] | None = None) -> ModelConfig:
    """The preset's ModelConfig, after checking that the HF-derived one has the same shape.
    The vocabulary is taken from the checkpoint (train with --vocab-size to match)."""
    if preset not in MODEL_PRESETS:
        raise ConvertError(f"unknown --model {preset!r}; choose one of {sorted(MODEL_PRESETS)} or {FROM_HF!r}")
    base = model_preset(preset)
    where = where or {}
    for section, names in (("language", _LM_FIELDS), ("vision", _VISION_FIELDS)):
        ours, theirs = getattr(base, section), getattr(derived, section)
        for f, hf_name in names.items():
            if f == "vocab_size":
                continue
            a, b = getattr(ours, f), getattr(theirs, f)
            same = math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) else a == b
            if not same:
                raise ConvertError(
                    f"--model {preset}: {section}.{f} is {a} in the preset but {b} in "
                    f"{where.get(section, 'the HF config')} ({hf_name}). Pass the preset that matches "
                    f"this checkpoint, or --model {FROM_HF} to take the architecture from the HF config."
                )
    return base.replace(language=dataclasses.replace(base.language, vocab_size=derived.language.vocab_size))


def _auto_config(path: Path):
    from transformers import AutoConfig

    if not (path / "config.json").exists():
        raise ConvertError(f"{path}: no config.json; point at a HuggingFace model folder")
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise ConvertError(f"{path}/config.json cannot be read by transformers ({e})") from None


def _config_from_dict(d: dict):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[d["model_type"]].from_dict(d)


def _config_dict(cfg) -> dict:
    return json.loads(cfg.to_json_string(use_diff=False))


def _feature_layers(llava_cfg, vision_cfg, where: str) -> int:
    if getattr(llava_cfg, "vision_feature_select_strategy", "default") != "default":
        raise ConvertError(f"{where}: vision_feature_select_strategy must be 'default' (class token dropped)")
    layer = getattr(llava_cfg, "vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConvertError(f"{where}: vision_feature_layer {layer} (several layers) is not supported")
    n = vision_cfg.num_hidden_layers
    used = n + 1 + layer if layer < 0 else layer
    if not 1 <= used <= n:
        raise ConvertError(f"{where}: vision_feature_layer {layer} is outside the {n} CLIP layers")
    act = getattr(llava_cfg, "projector_hidden_act", "gelu")
    if act != "gelu" or not getattr(llava_cfg, "multimodal_projector_bias", True):
        raise ConvertError(f"{where}: the projector must be Linear-GELU-Linear with biases (got {act!r})")
    return used


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------


def _init_model_parallel(tp: int, pp: int) -> None:
    from megatron_croc.distributed import init_model_parallel

    init_model_parallel(tensor_parallel=tp, pipeline_parallel=pp)  # the meta-device models draw nothing


def _joined_world(needed: int) -> bool:
    """Whether this process is one of a process group of several (torchrun, or a test's
    workers) that converts together; that group must have exactly ``needed`` processes."""
    import torch.distributed as dist

    from megatron_croc.platform import init_platform

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if world != needed:
        raise ConvertError(
            f"launched with {world} processes, but TP x PP = {needed}; launch TP x PP processes, "
            "or one process (it starts the others itself)"
        )
    if not dist.is_initialized():
        init_platform(force_cpu=True)  # conversion is CPU work, also on a GPU node
        dist.init_process_group("gloo")
    return True


def _ensure_single_process_world() -> None:
    """torch.distributed (gloo, one process) and megatron-core at TP=PP=1, unless already so."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_croc.platform import init_platform

    init_platform(force_cpu=True)  # conversion is CPU work, also on a GPU node
    if not dist.is_initialized():
        from megatron_croc.distributed import free_port

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise ConvertError("run this conversion step in one process (not under torchrun)")
    if not (
        parallel_state.model_parallel_is_initialized()
        and parallel_state.get_tensor_model_parallel_world_size() == 1
        and parallel_state.get_pipeline_model_parallel_world_size() == 1
    ):
        _init_model_parallel(1, 1)


def _spawn(fn, world_size: int, payload) -> None:
    """Run ``fn(payload)`` in ``world_size`` fresh processes (a gloo world), each on its share of
    the CPU; the first rank that fails or dies ends the others (distributed.spawn)."""
    from megatron_croc.distributed import SpawnedRankError, spawn

    try:
        spawn(_spawned_rank, world_size, timeout=24 * 3600, threads=max(1, (os.cpu_count() or 1) // world_size),
              fn=fn, payload=payload)
    except SpawnedRankError as err:
        if isinstance(err.error, (ConvertError, ConfigError)):  # a clear message: no traceback
            raise ConvertError(f"conversion rank {err.rank} failed: {err.error}") from None
        hint = " use more pipeline stages or --bf16" if "(killed: out of memory?)" in str(err) else ""
        raise ConvertError(f"conversion {err}{hint}") from None


def _spawned_rank(*, rank: int, world_size: int, fn, payload) -> None:
    fn(payload)


# ---------------------------------------------------------------------------------------------
# output folders
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _staging(final: Path, overwrite: bool, *, primary: bool = True, barrier=None):
    """A temporary sibling folder renamed to ``final`` on success, removed on failure. In a
    process group, only the ``primary`` rank touches the folders; ``barrier`` syncs the rest."""
    final = Path(final).resolve()
    sync = barrier or (lambda: None)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise ConvertError(f"{final} exists and is not empty; choose a new folder (or pass --overwrite)")
    tmp = final.with_name(f".{final.name}.converting")
    if primary:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    sync()
    try:
        yield tmp
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    sync()
    if primary:
        _respect_umask(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    sync()


def _umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def _respect_umask(folder: Path) -> None:
    """Give every file of the output the mode a plain ``open()`` would (0666 & ~umask; folders
    0777 & ~umask): safetensors writes its files 0600, which would hide the weights shards from the
    group while config.json and the rest are readable."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def _log(msg: str) -> None:
    print(f"[convert] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# HF -> megatron
# ---------------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    """What the HF side holds: tensor sources, configs and bookkeeping, opened from paths."""

    specs: list[tuple[str, str, list[str] | None]]  # (path, kind, files) to reopen in workers
    text_config: dict
    vision_config: dict
    feature_layers: int | None
    llm_vocab: int  # the LLM vocabulary (rows past it are the export's <image> token)
    hf_vocab_rows: int | None
    image_token: dict | None
    where: dict[str, str]
    dtype: torch.dtype = torch.float32

    def open(self) -> HFInputs:
        return HFInputs([TensorSource(p, k, files=[Path(f) for f in fs] if fs else None) for p, k, fs in self.specs])


def _gather_inputs(*, llm, vision, projector, llava) -> _Inputs:
    if llava is not None:
        if llm or vision or projector:
            raise ConvertError("give either --hf-llava, or --hf-llm and --hf-vision [--hf-projector], not both")
        path = Path(llava)
        cfg = _auto_config(path)
        if not hasattr(cfg, "text_config") or not hasattr(cfg, "vision_config"):
            raise ConvertError(f"{path}/config.json is a {cfg.model_type!r} config, not LLaVA")
        where = f"{path}/config.json"
        for sub, expected in ((cfg.text_config, "llama"), (cfg.vision_config, "clip_vision_model")):
            if getattr(sub, "model_type", "") != expected:
                raise ConvertError(f"{where}: a {sub.model_type!r} part; CrocModel needs a {expected!r} one")
        croc = getattr(cfg, "croc", None) or {}
        text = _config_dict(cfg.text_config)
        rows = text["vocab_size"]
        llm_vocab = int(croc.get("llm_vocab_size", rows))
        text["vocab_size"] = llm_vocab
        specs = [(str(path), "llava", None)]
        extras = path / EXTRAS_FILE
        if extras.exists():
            specs.append((str(extras), "raw", [str(extras)]))
        return _Inputs(
            specs=specs, text_config=text, vision_config=_config_dict(cfg.vision_config),
            feature_layers=_feature_layers(cfg, cfg.vision_config, where), llm_vocab=llm_vocab, hf_vocab_rows=rows,
            image_token={"id": int(cfg.image_token_index), "added_row": bool(croc.get("image_token_added", False))},
            where={"language": f"{where} (text_config)", "vision": f"{where} (vision_config)"},
        )
    if not llm or not vision:
        raise ConvertError("give --hf-llm (a LlamaForCausalLM folder) and --hf-vision (a CLIP folder), or --hf-llava")
    llm, vision = Path(llm), Path(vision)
    text_cfg = _auto_config(llm)
    vision_cfg = _auto_config(vision)
    if getattr(vision_cfg, "model_type", "") == "clip":
        vision_cfg = vision_cfg.vision_config
    if getattr(vision_cfg, "model_type", "") != "clip_vision_model":
        raise ConvertError(f"{vision}/config.json is a {vision_cfg.model_type!r} config; expected CLIP (clip or clip_vision_model)")
    if getattr(text_cfg, "model_type", "") != "llama":
        raise ConvertError(
            f"{llm}/config.json is a {text_cfg.model_type!r} config; expected a Llama-architecture "
            "LLM (model_type 'llama': Llama 2/3, Vicuna)"
        )
    specs = [(str(llm), "llm", None), (str(vision), "vision", None)]
    if projector is not None:
        p = Path(projector)
        if not p.exists():
            raise ConvertError(f"--hf-projector {p}: no such file or folder")
        specs.append((str(p), "projector", None))
    return _Inputs(
        specs=specs, text_config=_config_dict(text_cfg), vision_config=_config_dict(vision_cfg),
        feature_layers=None, llm_vocab=text_cfg.vocab_size, hf_vocab_rows=None, image_token=None,
        where={"language": f"{llm}/config.json", "vision": f"{vision}/config.json"},
    )


@dataclass
class _ImportPlan:
    """Everything a conversion rank needs (picklable)."""

    config: ModelConfig
    inputs: _Inputs
    checkpoint_dir: str
    drop_prefixes: tuple[str, ...]
    fresh: tuple[str, ...]  # megatron tensors initialised here (no HF source: the projector)
    common: dict[str, Any]
    seed: int
    progress: bool


def _import_rank(plan: _ImportPlan) -> None:
    """One rank of the import: its meta stage, its chunks, computed from the HF tensors."""
    from megatron_croc.convert.streaming import build_meta_stage, save_streaming

    model = build_meta_stage(plan.config)
    inputs = plan.inputs.open()
    names = [n for n, v in model.state_dict().items() if v is not None]
    engine = croc_engine(plan.config, names, hf_vocab_rows=plan.inputs.hf_vocab_rows)

    def full_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name in plan.fresh:
            # what training from scratch with this --seed draws, at every layout
            fresh = model.initial_value(name, seed=plan.seed)
            if tuple(fresh.shape) != tuple(shape):
                raise ConvertError(f"{name}: the initialised tensor is {tuple(fresh.shape)}, expected {tuple(shape)}")
            return fresh
        return engine.to_megatron(name, inputs.get, shape)

    import torch.distributed as dist

    rank = dist.get_rank()
    if rank == 0:
        Path(plan.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    try:
        save_streaming(
            plan.checkpoint_dir, model, full_tensor, common=plan.common, drop_prefixes=plan.drop_prefixes,
            progress=f"writing rank 0/{dist.get_world_size()}" if plan.progress and rank == 0 else None,
        )
    finally:
        inputs.close()


def _import_worker(plan: _ImportPlan) -> None:
    """Entry point of a spawned conversion process."""
    import torch.distributed as dist

    from megatron_croc.platform import init_platform

    init_platform(force_cpu=True)
    dist.init_process_group("gloo")
    _init_model_parallel(plan.config.parallel.tensor_model_parallel_size, plan.config.parallel.pipeline_model_parallel_size)
    _import_rank(plan)


def hf_to_megatron(
    save: str | os.PathLike,
    *,
    model: str,
    llm: str | None = None,
    vision: str | None = None,
    projector: str | None = None,
    llava: str | None = None,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    stage: str = "auto",
    bf16: bool = False,
    pool_size: int | None = None,
    seed: int = 1234,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert HF weights into a megatron-core dist checkpoint folder ``save`` (the ``--load``
    root: ``iter_0000000/`` + ``latest_checkpointed_iteration.txt`` + ``hf_conversion/``).

    ``model``: a preset name (checked against the HF configs) or ``"from-hf"``. ``stage``:
    align / croc / instruct, or auto (croc when the input carries a pool, else align).
    Parameters are stored in bf16 with ``bf16`` (as ``--bf16`` training keeps them), else fp32.
    Returns the folder.
    """
    from megatron_croc.training.checkpoint import FORMAT_VERSION, LATEST_FILE, iteration_dir

    start = time.time()
    tp, pp = int(tensor_parallel), int(pipeline_parallel)
    if tp < 1 or pp < 1:
        raise ConvertError("--target-tensor-parallel-size and --target-pipeline-parallel-size must be >= 1")
    gathered = _gather_inputs(llm=llm, vision=vision, projector=projector, llava=llava)
    inputs = gathered.open()
    try:
        gathered.dtype = inputs.main_dtype()
        text_cfg = _config_from_dict(gathered.text_config)
        vision_cfg = _config_from_dict(gathered.vision_config)
        derived = model_config_from_hf(text_cfg, vision_cfg, feature_layers=gathered.feature_layers,
                                       vocab_size=gathered.llm_vocab, where=gathered.where)
        base = derived if model == FROM_HF else check_against_preset(model, derived, gathered.where)

        has_pool = "pool.weight" in inputs
        if stage == "auto":
            stage = "croc" if has_pool else "align"
        if stage not in ("align", "croc", "instruct"):
            raise ConvertError(f"--croc-stage {stage!r}: choose align, croc, instruct or auto")
        if pool_size is None:
            pool_size = inputs.entry("pool.weight").shape[0] if has_pool else (base.croc.pool_size if model != FROM_HF else CrocConfig().pool_size)
        config = base.replace(
            croc=dataclasses.replace(base.croc, stage=stage, pool_size=pool_size, seed=seed),
            parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
            precision=PrecisionConfig(bf16=bf16),
        )
        _check_target_layout(config, model, gathered.where)
        validate(config, has_te=False, has_apex=False)
        in_world = _joined_world(tp * pp)
        if in_world:
            _init_model_parallel(1, 1)  # the checks look at the whole model
        else:
            _ensure_single_process_world()
        plan_checks = _check_import(config, inputs, gathered, stage)
    finally:
        inputs.close()

    import torch.distributed as dist

    save = Path(save)
    primary = not in_world or dist.get_rank() == 0
    with _staging(save, overwrite, primary=primary, barrier=dist.barrier if in_world else None) as tmp:
        ckpt_dir = iteration_dir(tmp, 0)
        record = _record(config, gathered, model, plan_checks["unused"], stage)
        plan = _ImportPlan(
            config=config, inputs=gathered, checkpoint_dir=str(ckpt_dir),
            drop_prefixes=plan_checks["drop"], fresh=plan_checks["fresh"],
            common={
                "iteration": 0,
                "layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "data_parallel_size": 1},
                "format_version": FORMAT_VERSION,
                "hf_conversion": record,
            },
            seed=seed, progress=progress,
        )
        if primary:
            _log(f"{model} ({config.language.num_layers}-layer LLM, {config.vision.num_layers}-layer CLIP), "
                 f"stage {stage}, TP={tp} PP={pp}, {'bf16' if bf16 else 'fp32'} -> {save}")
            for note in plan_checks["notes"]:
                _log(note)
        if in_world:  # launched by torchrun (or a test) with TP x PP processes
            _init_model_parallel(tp, pp)
            _import_rank(plan)
        elif tp * pp == 1:
            _import_rank(plan)
        else:
            _spawn(_import_worker, tp * pp, plan)
        if primary:
            side = tmp / RECORD_DIR
            side.mkdir()
            if plan_checks["unused"]:
                _save_unused(gathered, plan_checks["unused"], side / UNUSED_FILE)
            (side / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
            (tmp / LATEST_FILE).write_text("0\n")
    if not primary:
        return save
    _log(f"done in {time.time() - start:.0f} s: train with --load {save} "
         f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}"
         f"{' --bf16' if bf16 else ''} --vocab-size {config.language.vocab_size}")
    return save


def _check_target_layout(config: ModelConfig, model: str, where: dict[str, str]) -> None:
    """The target TP/PP must split the model; said with this tool's flags and where each size
    comes from (config.validate speaks of the training flags and presets)."""
    lm, vis = config.language, config.vision
    tp, pp = config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size
    origin = {section: (where[section] if model == FROM_HF else f"the --model {model} preset")
              for section in ("language", "vision")}
    for what, value, hf_field, section in (
        ("the LLM's attention heads", lm.num_attention_heads, "num_attention_heads", "language"),
        ("the LLM's query groups", lm.num_query_groups, "num_key_value_heads", "language"),
        ("the LLM's MLP size", lm.ffn_hidden_size, "intermediate_size", "language"),
        ("CLIP's attention heads", vis.num_attention_heads, "num_attention_heads", "vision"),
        ("CLIP's MLP size", vis.ffn_hidden_size, "intermediate_size", "vision"),
    ):
        if value % tp:
            raise ConvertError(
                f"--target-tensor-parallel-size {tp} does not divide {what} ({value}: {hf_field} in "
                f"{origin[section]}); choose a size that divides {value}"
            )
    if lm.num_layers % pp:
        raise ConvertError(
            f"--target-pipeline-parallel-size {pp} does not divide the LLM's {lm.num_layers} layers "
            f"(num_hidden_layers in {origin['language']}); choose a size that divides {lm.num_layers}"
        )


def _check_import(config: ModelConfig, inputs: HFInputs, gathered: _Inputs, stage: str) -> dict[str, Any]:
    """Every tensor the model needs is there with the right shape; what is left over is
    understood. All problems at once, before anything is written."""
    from megatron_croc.convert.streaming import build_meta_stage

    # The whole model (TP=PP=1 here) with the target layout's vocabulary padding.
    check_config = config.replace(
        parallel=ParallelConfig(),
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by * config.parallel.tensor_model_parallel_size,
    )
    model = build_meta_stage(check_config)
    shapes = {n: tuple(v.shape) for n, v in model.state_dict().items() if v is not None}
    engine = croc_engine(check_config, shapes, hf_vocab_rows=gathered.hf_vocab_rows)
    problems, notes, fresh, drop = [], [], [], set()
    missing_tensors: list[str] = []
    consumed: set[str] = set()
    for name, shape in shapes.items():
        r = engine.by_megatron.get(name)
        if r is None:
            problems.append(f"{name}: no mapping (a CrocModel parameter the converter does not know)")
            continue
        missing = [h for h in r.hf if h not in inputs]
        if missing:
            if r.stage_specific:
                drop.add(next(p for p in STAGE_SPECIFIC_PREFIXES if name.startswith(p)))
                continue
            if name.startswith("vision.projector."):
                fresh.append(name)
                continue
            missing_tensors.append(f"{missing[0]} (for {name}; expected in {_expected_input(missing[0], gathered)})")
            continue
        for h, expected in engine.expected_hf_shapes(name, shape).items():
            got = inputs.entry(h).shape
            if tuple(got) != tuple(expected):
                problems.append(
                    f"{inputs.where(h)}: shape {tuple(got)}, expected {tuple(expected)} for {name} "
                    f"(from {gathered.where['language' if name.startswith('language_model') else 'vision']})"
                )
        consumed.update(r.hf)
    for prefix in sorted(drop):
        have = [n for n in shapes if n.startswith(prefix) and all(h in inputs for h in engine.by_megatron[n].hf)]
        if have:
            problems.append(f"{EXTRAS_FILE} has only part of {prefix.rstrip('.')} (e.g. {have[0]}); it is incomplete")
        else:
            notes.append(f"no {prefix.rstrip('.')} in the input: the {stage} stage initialises it when training starts")
    if fresh:
        projector = [n for n in shapes if n.startswith("vision.projector.")]
        if len(fresh) != len(projector):
            problems.append(f"the projector input is incomplete: no {engine.by_megatron[fresh[0]].hf[0]} (for {fresh[0]})")
        notes.append("no projector in the input: initialised here (normal, std "
                     f"{config.init_method_std}), as for stage-1 training from scratch")
    unused, unknown = [], inputs.unknown()
    built = config.vision.num_built_layers
    for name in inputs.owner:
        if name in consumed:
            continue
        if name.startswith(f"{HF_VISION}.post_layernorm.") or _vision_layer(name) is not None and _vision_layer(name) >= built:
            unused.append(name)
        elif name.startswith(STAGE_SPECIFIC_PREFIXES):
            note = (f"the input's {name.split('.')[0]} is not part of the {stage} stage; dropped "
                    "(--croc-stage croc keeps it)")
            if note not in notes:
                notes.append(note)
        else:
            unknown.append(f"{inputs.where(name)}")
    if unknown or missing_tensors:
        # Names first: a layout the renames do not know shows up as tensors "missing" under the
        # expected names *and* present under others; say both, side by side, and what it looks like.
        head = []
        if unknown:
            head.append(f"{len(unknown)} input tensors have names the converter does not recognise, e.g. "
                        + ", ".join(unknown[:5]))
        if missing_tensors:
            head.append(f"{len(missing_tensors)} tensors the model needs are missing, e.g. " + "; ".join(missing_tensors[:5]))
        if unknown and missing_tensors:
            head.append(_layout_hint([u.rsplit(":", 1)[-1].strip() for u in unknown],
                                     [m.split(" ", 1)[0] for m in missing_tensors]))
        problems = head + problems
    if problems:
        raise ConvertError("the HF input does not fit the model:\n  " + "\n  ".join(problems[:20])
                           + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    return {"unused": sorted(unused), "fresh": tuple(fresh), "drop": tuple(sorted(drop)), "notes": notes}


def _layout_hint(unknown: list[str], missing: list[str]) -> str:
    """What the unrecognised names probably stand for: the name prefixes that turn them into
    missing names (matched on their longest common dotted suffix), and the layouts we read."""
    def splits(name: str):
        """(prefix, suffix) at each dot, suffixes of at least two components; a layer number
        belongs to the suffix (layer 2 of one layout is not layer 0 of another)."""
        parts = name.split(".")
        for i in range(1, len(parts) - 1):
            if any(p.isdigit() for p in parts[:i]):
                break
            yield ".".join(parts[:i]) + ".", ".".join(parts[i:])

    by_suffix: dict[str, str] = {}
    for name in missing:
        for prefix, suffix in splits(name):
            by_suffix.setdefault(suffix, prefix)
    renames: dict[tuple[str, str], int] = {}
    for name in unknown:
        for prefix, suffix in splits(name):
            if suffix in by_suffix:
                pair = (prefix, by_suffix[suffix])
                renames[pair] = renames.get(pair, 0) + 1
                break
    layouts = "; ".join(f"{what}: {', '.join(p + '*' for p in prefixes)}" for what, prefixes in LLAVA_LAYOUTS.items())
    if renames:
        top = sorted(renames.items(), key=lambda kv: -kv[1])[:3]
        guess = ", ".join(f"{a}* where {b}* is expected ({n} tensors)" for (a, b), n in top)
        return (f"the unrecognised names look like another layout: {guess}. The LLaVA layouts read are {layouts}; "
                "re-save the model with transformers, or report the layout")
    return f"the LLaVA layouts read are {layouts}"


def _vision_layer(name: str) -> int | None:
    prefix = f"{HF_VISION}.encoder.layers."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def _expected_input(hf_name: str, gathered: _Inputs) -> str:
    kinds = {k: p for p, k, _ in gathered.specs}
    if "llava" in kinds:
        return kinds["llava"] if not hf_name.startswith(STAGE_SPECIFIC_PREFIXES) else f"{kinds['llava']}/{EXTRAS_FILE}"
    if hf_name.startswith("model.language_model") or hf_name == HF_LM_HEAD:
        return kinds.get("llm", "--hf-llm")
    if hf_name.startswith("model.vision_tower"):
        return kinds.get("vision", "--hf-vision")
    return kinds.get("projector", "--hf-projector")


def _record(config: ModelConfig, gathered: _Inputs, model: str, unused: list[str], stage: str) -> dict[str, Any]:
    return {
        "format": RECORD_FORMAT,
        "version": 1,
        "model": model,
        "stage": stage,
        "text_config": gathered.text_config,
        "vision_config": gathered.vision_config,
        "vision_feature_layers": config.vision.num_built_layers,
        "llm_vocab_size": config.language.vocab_size,
        "hf_dtype": str(gathered.dtype).removeprefix("torch."),
        "image_token": gathered.image_token,
        "unused_hf_tensors": UNUSED_FILE if unused else None,
        "sources": {k: p for p, k, _ in gathered.specs},
    }


def _save_unused(gathered: _Inputs, names: list[str], path: Path) -> None:
    from safetensors.torch import save_file

    inputs = gathered.open()
    try:
        save_file({n: inputs.get(n).contiguous() for n in names}, str(path), metadata={"format": "pt"})
    finally:
        inputs.close()


# ---------------------------------------------------------------------------------------------
# megatron -> HF
# ---------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(t)


class _ShardWriter:
    """safetensors shards of at most ``max_bytes`` (+ one tensor), and their index."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self._flush()
        # A private contiguous copy: safetensors refuses tensors that share memory.
        self.buffer[name] = tensor.detach().clone(memory_format=torch.contiguous_format)
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        save_file(self.buffer, str(self.folder / f"part-{len(self.files):05d}.safetensors"), metadata={"format": "pt"})
        self.files.append(list(self.buffer))
        self.buffer, self.size = {}, 0

    def finish(self) -> None:
        self._flush()
        n = len(self.files)
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"part-{i:05d}.safetensors", self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _checkpoint_dir(load: Path, iteration: int | None) -> Path:
    from megatron_croc.training.checkpoint import resolve_checkpoint_dir

    try:
        return resolve_checkpoint_dir(load, iteration)
    except FileNotFoundError as err:
        raise ConvertError(str(err)) from None


def _find_record(load: Path, ckpt: Path) -> tuple[dict | None, Path | None]:
    """The conversion record (and the folder with its side files): in the checkpoint's common
    state, beside the checkpoint (``hf_conversion/``)."""
    from megatron.core import dist_checkpointing

    for folder in (load / RECORD_DIR, ckpt.parent / RECORD_DIR):
        if (folder / RECORD_FILE).exists():
            return json.loads((folder / RECORD_FILE).read_text()), folder
    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except Exception:
        common = {}
    record = common.get("hf_conversion") if isinstance(common, dict) else None
    return record, None


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def megatron_to_hf(
    load: str | os.PathLike,
    save: str | os.PathLike,
    *,
    model: str | None = None,
    llm: str | None = None,
    vision: str | None = None,
    tokenizer: str | None = None,
    image_processor: str | None = None,
    image_token_id: int | None = None,
    vocab_size: int | None = None,
    dtype: str = "auto",
    iteration: int | None = None,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export a checkpoint (any TP/PP layout) to a HuggingFace LLaVA folder ``save``.

    The architecture comes from ``model`` (a preset, or ``"from-hf"`` with ``llm``/``vision``
    folders), else from the conversion record the checkpoint was imported with. ``llm`` and
    ``vision`` also provide the HF configs, the tokenizer, the image processor and CLIP's unused
    last layer (the frozen original). Returns the folder.
    """
    from megatron_croc.convert.streaming import CheckpointReader, build_meta_stage, read_checkpoint_metadata

    start = time.time()
    load = Path(load)
    ckpt = _checkpoint_dir(load, iteration)
    _ensure_single_process_world()
    record, record_dir = _find_record(load, ckpt)
    llm_path, vision_path = (Path(llm) if llm else None), (Path(vision) if vision else None)

    # -- the architecture --
    text_dict = _config_dict(_auto_config(llm_path)) if llm_path else (record or {}).get("text_config")
    vision_cfg_obj = None
    if vision_path:
        vision_cfg_obj = _auto_config(vision_path)
        if getattr(vision_cfg_obj, "model_type", "") == "clip":
            vision_cfg_obj = vision_cfg_obj.vision_config
    vision_dict = _config_dict(vision_cfg_obj) if vision_cfg_obj is not None else (record or {}).get("vision_config")
    feature_layers = None if vision_path else (record or {}).get("vision_feature_layers")
    model = model or (record or {}).get("model")
    if model is None:
        raise ConvertError(f"{ckpt}: no conversion record; pass --model (a preset, or {FROM_HF} with --hf-llm and --hf-vision)")
    where = {"language": str(llm_path / "config.json") if llm_path else "the conversion record",
             "vision": str(vision_path / "config.json") if vision_path else "the conversion record"}
    vocab = vocab_size or (record or {}).get("llm_vocab_size") or (text_dict or {}).get("vocab_size")
    if text_dict is not None and vision_dict is not None:
        derived = model_config_from_hf(_config_from_dict(text_dict), _config_from_dict(vision_dict),
                                       feature_layers=feature_layers, vocab_size=vocab, where=where)
        config = derived if model == FROM_HF else check_against_preset(model, derived, where)
    elif model == FROM_HF:
        raise ConvertError(f"--model {FROM_HF} needs --hf-llm and --hf-vision (or a checkpoint converted from HF)")
    else:
        config = model_preset(model)
        if vocab:
            config = config.replace(language=dataclasses.replace(config.language, vocab_size=int(vocab)))

    # -- what the checkpoint holds --
    keys = read_checkpoint_metadata(ckpt)
    has_pool = "pool.weight" in keys
    pool_size = int(keys["pool.weight"].size[0]) if has_pool else config.croc.pool_size
    config = config.replace(
        croc=CrocConfig(stage="croc" if has_pool else "align", pool_size=pool_size),
        parallel=ParallelConfig(), precision=PrecisionConfig(),
    )
    meta = build_meta_stage(config)
    reader = CheckpointReader(ckpt, meta, metadata=keys)
    problems = reader.check_shapes()
    emb = "language_model.embedding.word_embeddings.weight"
    stored_rows = reader.stored_shape(emb)[0] if reader.present(emb) else 0
    if stored_rows < config.language.vocab_size:
        problems.append(f"{reader.key(emb)}: {stored_rows} rows, fewer than the vocabulary {config.language.vocab_size} "
                        "(pass the right --vocab-size)")
    names = [n for n in reader.names if reader.present(n)]
    missing = [n for n in reader.names if not reader.present(n) and not n.startswith(STAGE_SPECIFIC_PREFIXES)]
    if missing:
        problems.append(f"{len(missing)} tensors of the model are not in the checkpoint, e.g. {missing[:3]}")
    if problems:
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ConvertError(f"{ckpt} does not match the model --model {model} builds; pass the preset the checkpoint "
                           "was trained with:\n  " + "\n  ".join(problems[:5]) + more)
    out_dtype = _export_dtype(dtype, record, reader, names)

    # -- tokenizer, image processor and the <image> token: loaded before anything is written --
    tok_path = Path(tokenizer) if tokenizer else (llm_path if llm_path and _has_tokenizer(llm_path) else None)
    tok = _load_tokenizer(tok_path) if tok_path is not None else None
    processor_flag = "--image-processor"
    if image_processor is None and vision_path is not None and (vision_path / "preprocessor_config.json").exists():
        image_processor, processor_flag = vision_path, "the image processor of --hf-vision"
    processor = None
    if image_processor is not None:
        from transformers import AutoImageProcessor

        processor = _load_pretrained(AutoImageProcessor, Path(image_processor), processor_flag)
    elif tok is not None:
        processor = _clip_image_processor(config)
        _log(f"no --image-processor: writing CLIP's ({config.vision.image_size} px, CLIP mean/std), so that "
             "AutoProcessor loads the export")
    image_id, added_row = _image_token(config.language.vocab_size, tok, image_token_id, (record or {}).get("image_token"))
    hf_rows = config.language.vocab_size + (1 if added_row else 0)

    # -- CLIP's unused layers --
    unused_source = None
    if vision_path is not None:
        unused_source = TensorSource(vision_path, "vision")
    elif record_dir is not None and (record_dir / UNUSED_FILE).exists():
        unused_source = TensorSource(record_dir / UNUSED_FILE, "raw", files=[record_dir / UNUSED_FILE])
    built = config.vision.num_built_layers
    unused_names = []
    if unused_source is not None:
        unused_names = sorted(
            n for n in unused_source.entries
            if n.startswith(f"{HF_VISION}.post_layernorm.") or (_vision_layer(n) or 0) >= built
        )
    extra_layers = sorted({_vision_layer(n) for n in unused_names if _vision_layer(n) is not None})
    if extra_layers != list(range(built, built + len(extra_layers))):
        raise ConvertError(f"the unused CLIP layers {extra_layers} do not follow the {built} converted ones")
    vision_layers_out = built + len(extra_layers)
    feature_layer = -1 - len(extra_layers)

    engine = croc_engine(config, names, hf_vocab_rows=hf_rows)
    save = Path(save)
    # config.croc.stage only says which modules to read (the pool and VTR head, or not)
    holds = "with" if has_pool else "without"
    _log(f"{ckpt} ({model}, {holds} the pool and VTR head) -> {save} in {str(out_dtype).removeprefix('torch.')}")
    with _staging(save, overwrite) as tmp:
        writer = _ShardWriter(tmp, _parse_size(max_shard_size))
        extras: dict[str, torch.Tensor] = {}
        groups = _groups(names)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(groups), desc="exporting", unit="group", dynamic_ncols=True)
        for group in groups:
            for name, tensor in reader.load(group).items():
                for hf_name, hf_tensor in engine.to_hf(name, tensor).items():
                    hf_tensor = hf_tensor.to(out_dtype)
                    if engine.by_megatron[name].where == "extras":
                        extras[hf_name] = hf_tensor.clone(memory_format=torch.contiguous_format)
                    else:
                        writer.add(hf_name, hf_tensor)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        for n in unused_names:
            writer.add(n, unused_source.get(n))
        if unused_source is None:
            # LLaVA's CLIPVisionModel has a post-LN (unused for features): an identity one.
            c = config.vision.hidden_size
            writer.add(f"{HF_VISION}.post_layernorm.weight", torch.ones(c, dtype=out_dtype))
            writer.add(f"{HF_VISION}.post_layernorm.bias", torch.zeros(c, dtype=out_dtype))
        writer.finish()
        if extras:
            from safetensors.torch import save_file

            save_file(extras, str(tmp / EXTRAS_FILE), metadata={"format": "pt"})
        llava_cfg = llava_config(
            config, text_dict, vision_dict, vision_layers_out=vision_layers_out, feature_layer=feature_layer,
            image_id=image_id, added_row=added_row, hf_rows=hf_rows, dtype=out_dtype,
            record={"stage": config.croc.stage, "pool_size": pool_size if has_pool else None},
        )
        llava_cfg.save_pretrained(str(tmp))
        _generation_config(llava_cfg, llm_path, image_id if added_row else None).save_pretrained(str(tmp))
        shutil.copyfile(Path(__file__).parent / "hf_modeling" / MODELING_FILE, tmp / MODELING_FILE)
        _save_processors(tmp, tok, processor, config)
        if unused_source is not None:
            unused_source.close()
    _log(f"done in {time.time() - start:.0f} s: AutoModelForImageTextToText.from_pretrained({str(save)!r}, trust_remote_code=True)")
    return save


def _export_dtype(dtype: str, record: dict | None, reader, names: list[str]) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ConvertError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
        return _DTYPES[dtype]
    if record and record.get("hf_dtype") in _DTYPES:
        return _DTYPES[record["hf_dtype"]]
    return reader.stored_dtype("language_model.decoder.final_layernorm.weight") if "language_model.decoder.final_layernorm.weight" in names else torch.float32


def _image_token(vocab: int, tok, explicit: int | None, recorded: dict | None) -> tuple[int, bool]:
    """(image token id, whether a row is appended for it)."""
    if explicit is not None:
        if not 0 <= explicit <= vocab:
            raise ConvertError(f"--image-token-id {explicit} is outside the vocabulary (0..{vocab}; {vocab} appends a row)")
        return explicit, explicit == vocab
    if tok is not None:
        if IMAGE_TOKEN not in tok.get_vocab():
            tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id > vocab:
            raise ConvertError(
                f"the tokenizer has {len(tok)} tokens, more than the model's vocabulary {vocab}; "
                "pass the tokenizer the model was trained with (or --vocab-size)"
            )
        return image_id, image_id == vocab
    if recorded and recorded.get("id") is not None and recorded["id"] <= vocab:
        return int(recorded["id"]), int(recorded["id"]) == vocab
    return vocab, True


def _groups(names: list[str]) -> list[list[str]]:
    """Tensors grouped to be read together: everything outside the layers, then layer by layer."""
    import re

    layered: dict[tuple[str, int], list[str]] = {}
    rest = []
    for n in names:
        m = re.match(r"^(language_model\.decoder|vision\.encoder\.decoder)\.layers\.(\d+)\.", n)
        if m:
            layered.setdefault((m.group(1), int(m.group(2))), []).append(n)
        else:
            rest.append(n)
    return [rest] + [layered[k] for k in sorted(layered, key=lambda k: (k[0] != "vision.encoder.decoder", k[1]))]


def llava_config(config: ModelConfig, text_dict, vision_dict, *, vision_layers_out, feature_layer, image_id,
                 added_row, hf_rows, dtype, record):
    """The transformers ``LlavaConfig`` of an export of ``config``: the HF text/vision configs
    of the source model where known (``text_dict``/``vision_dict``), else built from our sizes.
    Also used by bench/bench_step.py to build the paper's-stack baseline at our sizes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    lm, vis = config.language, config.vision
    tied = not lm.untie_embeddings
    if text_dict:
        text = _config_from_dict({**text_dict, "vocab_size": hf_rows, "tie_word_embeddings": tied})
    else:
        text = LlamaConfig(
            hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size, num_hidden_layers=lm.num_layers,
            num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.num_query_groups,
            head_dim=lm.kv_channels, vocab_size=hf_rows, max_position_embeddings=lm.max_position_embeddings,
            rms_norm_eps=lm.norm_epsilon, rope_theta=lm.rotary_base, tie_word_embeddings=tied,
            hidden_act="silu", attention_bias=False, mlp_bias=False,
        )
    if vision_dict:
        vision = _config_from_dict({**vision_dict, "num_hidden_layers": vision_layers_out})
    else:
        vision = CLIPVisionConfig(
            hidden_size=vis.hidden_size, intermediate_size=vis.ffn_hidden_size, num_hidden_layers=vision_layers_out,
            num_attention_heads=vis.num_attention_heads, image_size=vis.image_size, patch_size=vis.patch_size,
            layer_norm_eps=vis.layernorm_epsilon, hidden_act="quick_gelu",
        )
    cfg = LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=image_id, image_seq_length=vis.num_image_tokens,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=feature_layer,
        multimodal_projector_bias=True, tie_word_embeddings=tied,
        croc={"llm_vocab_size": lm.vocab_size, "image_token_added": added_row, "l2_normalized_visual_tokens": True,
              **record},
    )
    cfg.architectures = ["CrocLlavaForConditionalGeneration"]
    cfg.auto_map = {
        "AutoModelForImageTextToText": "modeling_croc.CrocLlavaForConditionalGeneration",
        "AutoModel": "modeling_croc.CrocLlavaModel",
    }
    cfg.dtype = dtype
    return cfg


def _generation_config(llava_cfg, llm_path: Path | None, suppress: int | None):
    from transformers import GenerationConfig

    gen = None
    if llm_path is not None and (llm_path / "generation_config.json").exists():
        with contextlib.suppress(Exception):
            gen = GenerationConfig.from_pretrained(str(llm_path))
    if gen is None:
        gen = GenerationConfig.from_model_config(llava_cfg.text_config)
    if suppress is not None:
        gen.suppress_tokens = sorted(set(gen.suppress_tokens or []) | {suppress})
    return gen


def _load_pretrained(auto_class, path: Path, what: str):
    """``auto_class.from_pretrained(path)``, or a ConvertError naming the input."""
    try:
        # Never run code shipped with an input (auto_map modules); see docs/SECURITY.md.
        return auto_class.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise ConvertError(f"{what} {path}: transformers cannot load it ({e})") from None


def _load_tokenizer(path: Path):
    """``--tokenizer``: a HuggingFace tokenizer folder, or a SentencePiece ``.model`` file (Llama-2,
    Vicuna, the demo's tokenizer), converted to a fast Llama tokenizer that adds BOS as our
    templates do; its special tokens are the model's own pieces."""
    if not path.is_file():
        from transformers import AutoTokenizer

        return _load_pretrained(AutoTokenizer, path, "--tokenizer")
    import tempfile

    from sentencepiece import sentencepiece_model_pb2
    from transformers import LlamaTokenizer

    model = sentencepiece_model_pb2.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
        if not model.pieces:
            raise ValueError("no pieces")
    except Exception as e:
        raise ConvertError(f"--tokenizer {path}: neither a tokenizer folder nor a SentencePiece .model file ({e})") from None
    spec = model.trainer_spec

    def piece(i: int) -> str | None:
        return model.pieces[i].piece if 0 <= i < len(model.pieces) else None

    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(path, Path(folder) / "tokenizer.model")
        specials = {"bos_token": piece(spec.bos_id), "eos_token": piece(spec.eos_id), "unk_token": piece(spec.unk_id),
                    "pad_token": piece(spec.pad_id)}
        try:
            return LlamaTokenizer.from_pretrained(folder, add_bos_token=spec.bos_id >= 0, add_eos_token=False,
                                                  **{k: v for k, v in specials.items() if v is not None})
        except Exception as e:
            raise ConvertError(f"--tokenizer {path}: transformers cannot convert this SentencePiece model ({e})") from None


def _clip_image_processor(config: ModelConfig):
    """The image processor of the vision tower when none was given: CLIP's resize of the shortest
    side + centre crop to the encoder's size, CLIP mean/std (as the model normalises)."""
    from transformers import CLIPImageProcessor

    from megatron_croc.config import CLIP_MEAN, CLIP_STD

    size = config.vision.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def _save_processors(folder: Path, tok, image_processor, config: ModelConfig) -> None:
    if tok is not None and image_processor is not None:
        from transformers import LlavaProcessor

        try:
            LlavaProcessor(
                image_processor=image_processor, tokenizer=tok, patch_size=config.vision.patch_size,
                vision_feature_select_strategy="default", image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
            ).save_pretrained(str(folder))
            return
        except Exception as e:  # fall back to saving both parts on their own
            _log(f"could not save a LlavaProcessor ({e}); saving the tokenizer and image processor separately")
    if tok is not None:
        tok.save_pretrained(str(folder))
    if image_processor is not None:
        image_processor.save_pretrained(str(folder))
