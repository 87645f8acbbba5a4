"""Layer specs per platform: megatron-core's own TE specs when TransformerEngine is present,
its local specs otherwise — with the core attention swapped for :class:`CrocCoreAttention`,
and, on the local path, the LLM's norms swapped for :class:`SequenceParallelTorchNorm` so that
``--sequence-parallel`` works without TE.

Why our core attention on both paths: the comprehension stage's mixed mask is arbitrary from
TE's point of view and would push TE's attention onto its unfused path (~14x causal flash,
O(s^2) memory); megatron-core's local DotProductAttention is unfused too (216 vs 339 model
TFLOP/s measured for a 0.95B GPT on an H200). CrocCoreAttention runs SDPA flash / FlexAttention
kernels; TE still provides every GEMM (and FP8) through its linear layers.
"""

from __future__ import annotations

import copy
import dataclasses

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_croc.models.attention import CrocCoreAttention


class SequenceParallelTorchNorm:
    """megatron-core's torch LayerNorm/RMSNorm (``WrappedTorchNorm``) that also runs with
    sequence parallelism — the local-spec counterpart of TE's norms, used through the layer and
    block specs below.

    Why megatron-core's wrapper refuses sequence parallelism: a norm is per token, so running it
    on this rank's slice of the sequence is already right; what sequence parallelism needs is
    that the norm's weight gradients, each computed from one slice, are summed over the
    tensor-parallel ranks. megatron-core's ``finalize_model_grads`` does that for every
    parameter marked ``sequence_parallel`` (as its apex ``FusedLayerNorm`` and TE's norms mark
    theirs); ``WrappedTorchNorm`` does not mark its parameters, hence its assertion. This builds
    the same torch norm through ``WrappedTorchNorm`` (from a copy of the config that does not
    ask for sequence parallelism, so its other checks still apply) and marks its parameters.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        local = copy.copy(config)  # a shallow copy: no TransformerConfig re-validation
        local.sequence_parallel = False
        norm = WrappedTorchNorm(config=local, hidden_size=hidden_size, eps=eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _with_core_attention(spec: ModuleSpec, core_attention: type) -> ModuleSpec:
    attn = spec.submodules.self_attention
    attn = dataclasses.replace(
        attn, submodules=dataclasses.replace(attn.submodules, core_attention=core_attention)
    )
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn)
    )


def language_layer_spec(*, use_te: bool) -> ModuleSpec:
    """A Llama decoder layer (RMSNorm, SwiGLU; causal mask type, layouts via attention_mask)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec = dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, input_layernorm=SequenceParallelTorchNorm,
            pre_mlp_layernorm=SequenceParallelTorchNorm))
    return _with_core_attention(spec, CrocCoreAttention)


def language_block_spec(config, *, use_te: bool, vp_stage: int | None = None):
    """The LLM's transformer block on this pipeline stage (virtual stage ``vp_stage``): its
    layers, and a final norm that supports sequence parallelism on both paths (megatron-core's
    block otherwise picks the plain torch norm without TE or apex)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = SequenceParallelTorchNorm
    layer = language_layer_spec(use_te=use_te)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=final_norm
    )


def bidirectional_layer_spec(*, use_te: bool) -> ModuleSpec:
    """The language layer with a no-mask attention: the VTR head's transformer layer."""
    from megatron.core.transformer.enums import AttnMaskType

    spec = language_layer_spec(use_te=use_te)
    attn = spec.submodules.self_attention
    attn = dataclasses.replace(attn, params={**attn.params, "attn_mask_type": AttnMaskType.no_mask})
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn)
    )


def vision_layer_spec(*, use_te: bool) -> ModuleSpec:
    """A CLIP ViT layer (LayerNorm, quick-GELU MLP, bidirectional)."""
    from megatron.core.models.vision.vit_layer_specs import (
        get_vit_layer_with_local_spec,
        get_vit_layer_with_transformer_engine_spec,
    )

    spec = get_vit_layer_with_transformer_engine_spec() if use_te else get_vit_layer_with_local_spec()
    return _with_core_attention(spec, CrocCoreAttention)


def projector_spec(*, use_te: bool):
    """mlp2x_gelu: column-parallel Linear(vision->H), GELU, row-parallel Linear(H->H)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TERowParallelLinear,
        )

        return MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def vision_norm_impl(*, use_te: bool):
    """CLIP's pre-LayerNorm. Without TE, megatron-core's CLIPViTModel defaults to
    torch.nn.LayerNorm and then passes it ``config=`` (TypeError); WrappedTorchNorm takes it."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm
