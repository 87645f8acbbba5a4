"""Layer specs per platform: megatron-core's own TE specs when TransformerEngine is present,
its local specs otherwise — with the core attention swapped for :class:`CrocCoreAttention`.

Why our core attention on both paths: the comprehension stage's mixed mask is arbitrary from
TE's point of view and would push TE's attention onto its unfused path (~14x causal flash,
O(s^2) memory); megatron-core's local DotProductAttention is unfused too (216 vs 339 model
TFLOP/s measured for a 0.95B GPT on an H200). CrocCoreAttention runs SDPA flash / FlexAttention
kernels; TE still provides every GEMM (and FP8) through its linear layers.
"""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_croc.models.attention import CrocCoreAttention


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
    return _with_core_attention(spec, CrocCoreAttention)


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
