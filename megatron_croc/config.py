"""Typed, keyword-only configuration of the Croc model and its parallel layout, with presets.

Everything that decides the model's shape or behaviour lives here as data; megatron-core's
``TransformerConfig`` objects are derived from it in one place
(:func:`language_transformer_config`, :func:`vision_transformer_config`), never assembled by
hand elsewhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from megatron_croc.data.constants import CLIP_MEAN, CLIP_STD  # noqa: F401  (re-exported for models.vision)

if TYPE_CHECKING:  # torch is imported where it is used: argument parsing and --help stay fast
    import torch

Stage = Literal["align", "croc", "instruct"]
AttentionVariant = Literal["causal", "visual", "prefix"]
Matcher = Literal["hungarian", "nearest"]


class ConfigError(ValueError):
    """A configuration that cannot work, with what to do about it."""


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """A CLIP ViT. ``num_layers`` is the checkpoint's depth; features are taken from the
    penultimate layer (LLaVA's ``select_layer=-2``), so only ``num_layers - 1`` are built."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    layernorm_epsilon: float = 1e-5
    frozen: bool = True
    # A frozen encoder's forward replays CUDA graphs on a GPU (models.vision; --no-vision-cuda-graph).
    cuda_graph: bool = True

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: the patch grid, class token dropped."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_built_layers(self) -> int:
        return self.num_layers - 1


@dataclass(frozen=True, kw_only=True)
class LanguageModelConfig:
    """A Llama-architecture decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention,
    untied input and output embeddings."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    untie_embeddings: bool = True

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Parameter-name prefixes of the modules CrocModel builds only in the comprehension stage
# (CrocConfig.uses_pool): a checkpoint of another stage lacks them (they then keep their fresh
# initialisation, align -> croc), and HF exports keep them beside the LLaVA weights.
STAGE_SPECIFIC_PREFIXES = ("pool.", "vtr_head.")


@dataclass(frozen=True, kw_only=True)
class CrocConfig:
    """The cross-modal comprehension method (SPEC §1.2–1.5) and the stage being trained."""

    stage: Stage = "croc"
    pool_size: int = 2048
    mask_ratio: float = 0.75
    # "hungarian": exact, solved by scipy on the host (models.matching); "nearest": argmin.
    matcher: Matcher = "hungarian"
    # Solve micro-batch m+1's assignment on the host while the device computes micro-batch m
    # (within one optimizer step; training.step). Same result, the solve off the critical path.
    assignment_lookahead: bool = True
    # Only meaningful in the comprehension stage; align/instruct are causal (SPEC §1.5).
    attention: Literal["visual", "prefix"] = "visual"
    vtr_weight: float = 10.0
    vtr_smooth_l1_beta: float = 0.01
    vtr_loss_positions: Literal["all", "masked"] = "all"
    # "token_scale": unit-norm rows, the scale of the L2-normalised visual tokens (SPEC §1.2
    # pitfall); "normal": N(0,1) as in the released code.
    pool_init: Literal["token_scale", "normal"] = "token_scale"
    seed: int = 1234

    @property
    def uses_pool(self) -> bool:
        return self.stage == "croc"

    @property
    def attention_variant(self) -> AttentionVariant:
        return self.attention if self.stage == "croc" else "causal"

    @property
    def trains_language_model(self) -> bool:
        return self.stage != "align"


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    bf16: bool = False
    fp8_format: Literal["hybrid", "e4m3"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything needed to build a CrocModel."""

    vision: VisionConfig
    language: LanguageModelConfig
    croc: CrocConfig = field(default_factory=CrocConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    # Kernel options that need TransformerEngine or apex; refused without them.
    apply_rope_fusion: bool = False
    gradient_accumulation_fusion: bool = False
    # The route of the mixed (visual/prefix) attention, models.attention.BACKEND_CHOICES: "auto"
    # (FlexAttention on CUDA, SDPA with the dense mask elsewhere), "flex", "split" (causal flash +
    # the image rows; unpacked micro-batches, others take auto's route), "sdpa".
    attention_backend: Literal["auto", "flex", "split", "sdpa"] = "auto"
    # Activation recomputation, as Megatron's --recompute-* flags (validate() checks the
    # combination): "selective" recomputes parts of every layer (recompute_modules; megatron-core's
    # default: core attention); "full" recomputes whole layers, either in chunks of
    # recompute_num_layers ("uniform") or only the first recompute_num_layers of each
    # (virtual) pipeline stage ("block").
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    recompute_modules: tuple[str, ...] | None = None
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    # Seeds the initial weights, which are the same at every parallel layout (models.initialization).
    seed: int = 1234

    @property
    def params_dtype(self) -> "torch.dtype":
        import torch

        return torch.bfloat16 if self.precision.bf16 else torch.float32

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary padded so every tensor-parallel shard has the same size (Megatron's rule)."""
        multiple = self.make_vocab_size_divisible_by * self.parallel.tensor_model_parallel_size
        return -(-self.language.vocab_size // multiple) * multiple

    def replace(self, **changes: object) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

VISION_PRESETS: dict[str, VisionConfig] = {
    "clip-l-336": VisionConfig(
        image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_attention_heads=16,
        ffn_hidden_size=4096,
    ),
    # CPU-sized: 32x32 images, 8x8 patches -> 16 visual tokens per image.
    "tiny": VisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_attention_heads=4,
        ffn_hidden_size=64,
    ),
}

LANGUAGE_PRESETS: dict[str, LanguageModelConfig] = {
    "tiny": LanguageModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, vocab_size=512, max_position_embeddings=1024,
    ),
    "vicuna-7b": LanguageModelConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=32,
        ffn_hidden_size=11008, vocab_size=32000, max_position_embeddings=4096,
    ),
    "vicuna-13b": LanguageModelConfig(
        num_layers=40, hidden_size=5120, num_attention_heads=40, num_query_groups=40,
        ffn_hidden_size=13824, vocab_size=32000, max_position_embeddings=4096,
    ),
    "llama3-8b": LanguageModelConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, vocab_size=128256, max_position_embeddings=8192,
        rotary_base=500000.0,
    ),
}

# Each LLM preset pairs with a vision preset; the tiny model has a tiny encoder and pool.
MODEL_PRESETS: dict[str, tuple[str, str]] = {
    "tiny": ("tiny", "tiny"),
    "vicuna-7b": ("vicuna-7b", "clip-l-336"),
    "vicuna-13b": ("vicuna-13b", "clip-l-336"),
    "llama3-8b": ("llama3-8b", "clip-l-336"),
}


def model_preset(name: str, **overrides: object) -> ModelConfig:
    """A ModelConfig from a preset name, e.g. ``model_preset("tiny", croc=CrocConfig(...))``."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    language, vision = MODEL_PRESETS[name]
    croc = CrocConfig(pool_size=64) if name == "tiny" else CrocConfig()
    kwargs: dict[str, object] = dict(
        vision=VISION_PRESETS[vision], language=LANGUAGE_PRESETS[language], croc=croc
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# validation and megatron-core TransformerConfigs
# ---------------------------------------------------------------------------------------------


def validate(config: ModelConfig, *, has_te: bool, has_apex: bool, has_cuda: bool = True) -> None:
    """Refuse, at argument time, what cannot work on this machine or with these sizes."""
    if config.attention_backend == "flex" and not has_cuda:
        raise ConfigError(
            "--attention-backend flex needs a CUDA GPU (FlexAttention has no backward on a CPU); "
            "use --attention-backend auto or sdpa here."
        )
    needs_te = {
        "--fp8-format": config.precision.fp8_format is not None,
        "--apply-rope-fusion": config.apply_rope_fusion,
    }
    for flag, wanted in needs_te.items():
        if wanted and not has_te:
            raise ConfigError(
                f"{flag} needs TransformerEngine on a CUDA GPU, which is not available here. "
                "Drop the flag, or run inside NVIDIA's PyTorch container (it ships TE)."
            )
    if config.gradient_accumulation_fusion and not has_apex and not has_te:
        raise ConfigError(
            "--gradient-accumulation-fusion needs apex or TransformerEngine on a CUDA GPU; "
            "drop the flag on this machine."
        )
    if config.attention_backend == "split" and config.croc.attention == "prefix":
        raise ConfigError(
            "--attention-backend split covers the visual mixed attention (and causal rows), not "
            "--croc-attention prefix; use --attention-backend auto, flex or sdpa with it."
        )
    _validate_recompute(config)
    lm, tp, pp = config.language, config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size
    vp = config.parallel.virtual_pipeline_model_parallel_size or 1
    for what, value in (
        ("attention heads", lm.num_attention_heads),
        ("query groups (the preset's num_query_groups)", lm.num_query_groups),
        ("FFN hidden size", lm.ffn_hidden_size),
        ("vision attention heads", config.vision.num_attention_heads),
        ("vision FFN hidden size", config.vision.ffn_hidden_size),
    ):
        if value % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} does not divide the {what} ({value}); "
                "choose a tensor-parallel size that divides it."
            )
    if lm.num_layers % (pp * vp):
        raise ConfigError(
            f"{lm.num_layers} language-model layers cannot be split evenly over "
            f"{pp} pipeline stages x {vp} virtual stages; choose sizes that divide it."
        )
    if lm.num_attention_heads % lm.num_query_groups:
        raise ConfigError("the number of attention heads must be a multiple of the query groups")
    if config.vision.image_size % config.vision.patch_size:
        raise ConfigError("the vision image size must be a multiple of its patch size")
    croc = config.croc
    if croc.uses_pool:
        n_masked = masked_count(config)
        if not 0 < n_masked <= croc.pool_size and croc.matcher == "hungarian":
            raise ConfigError(
                f"--croc-mask-ratio {croc.mask_ratio} selects {n_masked} of "
                f"{config.vision.num_image_tokens} visual tokens, but the one-to-one Hungarian "
                f"matcher needs between 1 and --croc-pool-size ({croc.pool_size}) of them."
            )
        if n_masked == 0:
            raise ConfigError(f"--croc-mask-ratio {croc.mask_ratio} selects no visual token")


# What --recompute-modules may name for our dense Llama layer (megatron-core's names; its MoE
# and MLA modules do not apply). Not "layernorm": with TE's specs the norms are fused into the
# next linear layer (nothing to recompute), and without TE megatron-core 0.19.2's
# CheckpointWithoutOutput, which it uses for them, reads TE's FP8 state unconditionally and fails.
RECOMPUTE_MODULES = ("core_attn", "mlp")


def _validate_recompute(config: ModelConfig) -> None:
    """Megatron's rules for the --recompute-* flags, as clear errors (megatron-core would
    otherwise stop with an assertion deep in TransformerConfig)."""
    granularity, method = config.recompute_granularity, config.recompute_method
    num_layers, modules = config.recompute_num_layers, config.recompute_modules
    if granularity is None:
        given = [flag for flag, value in (("--recompute-method", method), ("--recompute-num-layers", num_layers),
                                          ("--recompute-modules", modules)) if value is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} only apply with --recompute-granularity; add "
                              "--recompute-granularity full (with --recompute-method) or selective")
        return
    if granularity == "selective":
        if method is not None or num_layers is not None:
            raise ConfigError(
                "--recompute-method and --recompute-num-layers apply to --recompute-granularity full; "
                "selective recomputation recomputes --recompute-modules (default core_attn) in every layer"
            )
        unknown = sorted(set(modules or ()) - set(RECOMPUTE_MODULES))
        if unknown or modules == ():
            why = (" (layernorm: TE fuses the norms into the next linear layer, and without TE "
                   "megatron-core 0.19.2 fails on it)" if "layernorm" in unknown else "")
            raise ConfigError(f"--recompute-modules {' '.join(modules)}: choose one or more of "
                              f"{', '.join(RECOMPUTE_MODULES)}{why}")
        return
    if modules is not None:
        raise ConfigError("--recompute-modules applies to --recompute-granularity selective; "
                          "full recomputes whole layers")
    if method not in ("uniform", "block"):
        raise ConfigError(
            "--recompute-granularity full needs --recompute-method uniform (recompute the layers in chunks "
            "of --recompute-num-layers) or block (recompute only the first --recompute-num-layers layers "
            "of each pipeline stage)"
        )
    if num_layers is None or num_layers < 1:
        raise ConfigError(f"--recompute-num-layers must be at least 1 with --recompute-granularity full, "
                          f"got {num_layers}")


# The tokens dimension of an FP8 GEMM must be a multiple of the recipe's block: 16 for per-tensor
# scaling (cuBLASLt FP8 leading dimensions), 32 for MXFP8 blocks, 128 for 128x128 block scaling.
FP8_TOKEN_MULTIPLE = {"delayed": 16, "tensorwise": 16, "mxfp8": 32, "blockwise": 128}


def sequence_multiple(config: ModelConfig) -> int:
    """What the (padded) training sequence length must be a multiple of.

    Only the language model's transformer layers run in FP8 (megatron-core enters the FP8
    context inside its TransformerBlock; the encoder is built without FP8, and the projector,
    the VTR head and the output layer run outside that context), and their GEMMs see
    ``S x B`` tokens, or ``S / TP x B`` per rank with sequence parallelism. Since every row is
    padded to the same S, S being a multiple of the FP8 block (times TP with sequence
    parallelism) makes every GEMM aligned whatever the micro-batch size.
    """
    multiple = 1
    if config.parallel.sequence_parallel:
        multiple = config.parallel.tensor_model_parallel_size
    if config.precision.fp8_format is not None:
        multiple *= FP8_TOKEN_MULTIPLE[config.precision.fp8_recipe]
    return multiple


def padded_sequence_length(config: ModelConfig, seq_length: int) -> tuple[int, str | None]:
    """``seq_length`` rounded up to :func:`sequence_multiple`, and a note saying why when it
    changed. Raises ConfigError when the rounded length exceeds the model's positions."""
    multiple = sequence_multiple(config)
    padded = -(-seq_length // multiple) * multiple
    if padded == seq_length:
        return seq_length, None
    reasons = []
    if config.parallel.sequence_parallel:
        reasons.append(f"sequence parallelism over TP={config.parallel.tensor_model_parallel_size}")
    if config.precision.fp8_format is not None:
        reasons.append(f"FP8 recipe {config.precision.fp8_recipe} "
                       f"(blocks of {FP8_TOKEN_MULTIPLE[config.precision.fp8_recipe]} tokens)")
    note = (f"--seq-length {seq_length} padded to {padded}, a multiple of {multiple} for "
            f"{' and '.join(reasons)}; rows are padded with masked positions")
    if padded > config.language.max_position_embeddings:
        raise ConfigError(
            f"{note}, but the model has only {config.language.max_position_embeddings} positions "
            f"(max_position_embeddings); use --seq-length {padded - multiple} or less"
        )
    return padded, note


def masked_count(config: ModelConfig) -> int:
    """Visual tokens replaced by pool entries per image (432 of 576 at ratio 0.75)."""
    return int(round(config.croc.mask_ratio * config.vision.num_image_tokens))


def _common_transformer_kwargs(config: ModelConfig) -> dict[str, object]:
    par, prec = config.parallel, config.precision
    return dict(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        sequence_parallel=par.sequence_parallel,
        bf16=prec.bf16,
        params_dtype=config.params_dtype,
        pipeline_dtype=config.params_dtype,
        fp8=prec.fp8_format,
        fp8_recipe=prec.fp8_recipe,
        # Parameters are allocated on the default device (a `torch.device` context: the GPU
        # when training, "meta" when converting) and drawn by CrocModel itself, layout-
        # independently (models.initialization); megatron-core's own draws would depend on
        # the layout and be overwritten.
        use_cpu_initialization=True,
        perform_initialization=False,
        init_method_std=config.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # The fused kernels below need apex/TE; without them megatron-core would fall back
        # anyway, we just make it explicit.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=config.apply_rope_fusion,
        gradient_accumulation_fusion=config.gradient_accumulation_fusion,
        recompute_granularity=config.recompute_granularity,
        recompute_method=config.recompute_method,
        recompute_num_layers=config.recompute_num_layers,
        recompute_modules=list(config.recompute_modules) if config.recompute_modules else None,
        # As Megatron-LM sets it: a pipeline stage frees the data of the activations it sent
        # once they are sent (the next stage has them; backward needs only their graph), one
        # activation-sized tensor per micro-batch in flight less.
        deallocate_pipeline_outputs=True,
    )


def language_transformer_config(config: ModelConfig):
    """megatron-core TransformerConfig for the Llama-architecture LLM."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    lm = config.language
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        ffn_hidden_size=lm.ffn_hidden_size,
        kv_channels=lm.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=lm.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        **_common_transformer_kwargs(config),
    )


def vision_transformer_config(config: ModelConfig):
    """megatron-core TransformerConfig for CLIP ViT (LayerNorm, quick-GELU, biases).

    Pipeline sizes are 1: the encoder lives whole on the first pipeline stage. Never
    sequence-parallel: its sequence is an image's patches, and its output is spliced into the
    LLM's embeddings, which are scattered to the sequence-parallel ranks after the splice.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    vis = config.vision
    kwargs = _common_transformer_kwargs(config)
    kwargs.update(
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        sequence_parallel=False,
        recompute_granularity=None,
        recompute_method=None,
        recompute_num_layers=None,
        recompute_modules=None,
        # The encoder is frozen by default and small next to the LLM: FP8 buys little.
        fp8=None,
    )
    from megatron.core.activations import quick_gelu

    return TransformerConfig(
        num_layers=vis.num_built_layers,
        hidden_size=vis.hidden_size,
        num_attention_heads=vis.num_attention_heads,
        ffn_hidden_size=vis.ffn_hidden_size,
        kv_channels=vis.hidden_size // vis.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=vis.layernorm_epsilon,
        gated_linear_unit=False,
        activation_func=quick_gelu,
        add_bias_linear=True,
        add_qkv_bias=True,
        **kwargs,
    )


def projector_transformer_config(config: ModelConfig):
    """Config for the mlp2x_gelu projector (Linear(vision->H), GELU, Linear(H->H)); not
    sequence-parallel, as the encoder (its input is [images, tokens, C], not a sequence)."""
    import torch

    from megatron.core.transformer.transformer_config import TransformerConfig

    lm = config.language
    kwargs = _common_transformer_kwargs(config)
    kwargs.update(pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
                  sequence_parallel=False, recompute_granularity=None, recompute_method=None,
                  recompute_num_layers=None, recompute_modules=None)
    return TransformerConfig(
        num_layers=1,
        hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_attention_heads,  # unused by the MLP; must divide by TP
        ffn_hidden_size=lm.hidden_size,
        gated_linear_unit=False,
        activation_func=torch.nn.functional.gelu,
        add_bias_linear=True,
        **kwargs,
    )
