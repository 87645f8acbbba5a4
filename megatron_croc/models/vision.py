"""Vision side of the first pipeline stage: CLIP ViT (penultimate layer, class token dropped)
-> mlp2x_gelu projector -> per-token L2 normalisation (SPEC §1.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.module import MegatronModule

from megatron_croc.config import (
    CLIP_MEAN,
    CLIP_STD,
    ModelConfig,
    projector_transformer_config,
    vision_transformer_config,
)
from megatron_croc.models import specs


class VisionTower(MegatronModule):
    """uint8 images [N, 3, H, W] -> unit-norm visual tokens [N, T, H_llm]."""

    def __init__(self, config: ModelConfig, *, use_te: bool):
        vision_config = vision_transformer_config(config)
        super().__init__(config=vision_config)
        vis = config.vision
        self.frozen = vis.frozen
        # Built with num_layers - 1 layers: LLaVA reads hidden_states[-2], the output of the
        # penultimate layer before any post-norm, so the last layer is never needed.
        self.encoder = CLIPViTModel(
            vision_config,
            specs.vision_layer_spec(use_te=use_te),
            ln_pre_impl=specs.vision_norm_impl(use_te=use_te),
            add_class_token=True,
            class_token_len=1,
            patch_dim=vis.patch_size,
            img_h=vis.image_size,
            img_w=vis.image_size,
            model_subtype="clip",
        )
        self.projector = MultimodalProjector(
            projector_transformer_config(config),
            specs.projector_spec(use_te=use_te),
            projector_type="mlp",
            input_size=vis.hidden_size,
        )
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255, persistent=False)
        if self.frozen:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.encode(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 3, H, W] -> encoder features [N, T, C] (class token dropped)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 [N, 3, H, W] RGB, got {images.dtype} {tuple(images.shape)}"
            )
        pixels = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        pixels = pixels.to(self.config.params_dtype)
        # A frozen encoder needs no activations kept for backward.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            features = self.encoder(pixels)  # [N, 1 + T, C]
        return features[:, self.encoder.class_token_len :]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features [N, T, C] -> unit-norm visual tokens [N, T, H_llm]."""
        return F.normalize(self.projector(features), dim=-1)
