"""Croc for transformers: LLaVA whose projected visual tokens are L2-normalised per token.

Croc (Xie et al., 2024, arXiv 2410.14332) normalises every visual token right after the
mlp2x_gelu projector, in training and at inference; without it the language model sees tokens
of the wrong scale. Everything else is transformers' ``LlavaForConditionalGeneration``: the CLIP
vision tower read at ``vision_feature_layer`` with the class token dropped, the projector, a
Llama decoder. Written by megatron_croc's ``tools/convert_checkpoint.py megatron-to-hf``; load
with ``AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)``.

The ``<image>`` token is a placeholder the model reads, never a token it may write: its logit is
``-inf`` in the LM head, so neither greedy nor sampled generation (whatever the generation
config) can emit it, and a loss never puts probability on it.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector


class CrocMultiModalProjector(LlavaMultiModalProjector):
    """Linear -> GELU -> Linear, then unit L2 norm per visual token."""

    def forward(self, image_features):
        return F.normalize(super().forward(image_features), dim=-1)


class CrocLMHead(nn.Linear):
    """The LM head with the ``<image>`` placeholder's logit fixed at -inf (same weights and
    state-dict names as ``nn.Linear``)."""

    def __init__(self, in_features, out_features, image_token_index):
        super().__init__(in_features, out_features, bias=False)
        self.image_token_index = image_token_index

    def forward(self, hidden_states):
        logits = super().forward(hidden_states)
        if 0 <= self.image_token_index < logits.shape[-1]:
            logits = logits.index_fill(-1, torch.tensor([self.image_token_index], device=logits.device), float("-inf"))
        return logits


class CrocLlavaModel(LlavaModel):
    def __init__(self, config):
        super().__init__(config)
        self.multi_modal_projector = CrocMultiModalProjector(config)
        self.post_init()


class CrocLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, config):
        super().__init__(config)
        self.model.multi_modal_projector = CrocMultiModalProjector(config)
        self.lm_head = CrocLMHead(config.text_config.hidden_size, config.text_config.vocab_size,
                                  config.image_token_index)
        self.post_init()


__all__ = ["CrocMultiModalProjector", "CrocLMHead", "CrocLlavaModel", "CrocLlavaForConditionalGeneration"]
