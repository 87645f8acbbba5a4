"""Croc for transformers: LLaVA whose projected visual tokens are L2-normalised per token.

Croc (Xie et al., 2024, arXiv 2410.14332) normalises every visual token right after the
mlp2x_gelu projector, in training and at inference; without it the language model sees tokens
of the wrong scale. Everything else is transformers' ``LlavaForConditionalGeneration``: the CLIP
vision tower read at ``vision_feature_layer`` with the class token dropped, the projector, a
Llama decoder. Written by megatron_croc's ``tools/convert_checkpoint.py megatron-to-hf``; load
with ``AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)``.
"""

import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration, LlavaModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector


class CrocMultiModalProjector(LlavaMultiModalProjector):
    """Linear -> GELU -> Linear, then unit L2 norm per visual token."""

    def forward(self, image_features):
        return F.normalize(super().forward(image_features), dim=-1)


class CrocLlavaModel(LlavaModel):
    def __init__(self, config):
        super().__init__(config)
        self.multi_modal_projector = CrocMultiModalProjector(config)
        self.post_init()


class CrocLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, config):
        super().__init__(config)
        self.model.multi_modal_projector = CrocMultiModalProjector(config)
        self.post_init()


__all__ = ["CrocMultiModalProjector", "CrocLlavaModel", "CrocLlavaForConditionalGeneration"]
